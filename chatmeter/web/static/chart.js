// A small bar chart of usage by day, drawn as SVG by the page (no chart library needed).
// Every day of the range has a bar, days without usage too; each bar has a tooltip.

const SVG = "http://www.w3.org/2000/svg";
const numbers = new Intl.NumberFormat();

function svg(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

/** Each day from `from` to `to` (YYYY-MM-DD, inclusive). */
export function daysBetween(from, to) {
  const days = [];
  const day = new Date(`${from}T00:00:00Z`);
  const last = new Date(`${to}T00:00:00Z`);
  while (day <= last && days.length < 400) {
    days.push(day.toISOString().slice(0, 10));
    day.setUTCDate(day.getUTCDate() + 1);
  }
  return days;
}

/** Draw `summary` (GET …/usage/summary?group_by=day) into `container`, total tokens a day. */
export function drawDailyChart(container, summary) {
  const byDay = new Map(summary.rows.map((row) => [row.day, row.total_tokens]));
  const days = daysBetween(summary.from, summary.to);
  const values = days.map((day) => byDay.get(day) || 0);
  const top = Math.max(1, ...values);
  const total = values.reduce((a, b) => a + b, 0);
  const width = 300;
  const height = 90;
  const slot = width / Math.max(days.length, 1);
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height + 14}`,
    class: "chart",
    role: "img",
    "aria-label": `Tokens by day from ${summary.from} to ${summary.to}: ${numbers.format(total)} in all, at most ${numbers.format(Math.max(...values, 0))} in a day`,
  });
  chart.append(svg("line", { x1: 0, y1: height, x2: width, y2: height, class: "chart-axis" }));
  days.forEach((day, index) => {
    const value = values[index];
    const barHeight = value ? Math.max(2, (value / top) * (height - 4)) : 0;
    const bar = svg("rect", {
      x: (index * slot + slot * 0.15).toFixed(2),
      y: (height - barHeight).toFixed(2),
      width: (slot * 0.7).toFixed(2),
      height: barHeight.toFixed(2),
      class: "chart-bar",
      "data-day": day,
      "data-value": String(value),
    });
    const tip = svg("title", {});
    tip.textContent = `${day}: ${numbers.format(value)} tokens`;
    bar.append(tip);
    chart.append(bar);
  });
  for (const [index, anchor] of [
    [0, "start"],
    [days.length - 1, "end"],
  ]) {
    if (index < 0) continue;
    const label = svg("text", {
      x: anchor === "start" ? 0 : width,
      y: height + 12,
      "text-anchor": anchor,
      class: "chart-label",
    });
    label.textContent = days[index].slice(5);
    chart.append(label);
  }
  container.replaceChildren(chart);
}
