// The person's plan and usage (GET /api/usage, SPEC 10) and a chart of their last 30
// days (GET /api/usage/summary). Shared with the admin console: money and limits in words.

import { ApiError } from "./api.js";
import { drawDailyChart } from "./chart.js";

const numbers = new Intl.NumberFormat();

/** Micro-units of `currency` as money, exactly: the integer is never divided as a float. */
export function money(micros, currency) {
  const sign = micros < 0 ? "-" : "";
  const digits = String(Math.abs(micros)).padStart(7, "0");
  let fraction = digits.slice(-6).replace(/0+$/, "");
  if (fraction.length < 2) fraction = fraction.padEnd(2, "0");
  const decimal = `${sign}${digits.slice(0, -6)}.${fraction}`;
  try {
    const format = new Intl.NumberFormat(undefined, {
      style: "currency",
      currency: currency || "USD",
      minimumFractionDigits: 2,
      maximumFractionDigits: 6,
    });
    return format.format(decimal); // a decimal string: formatted without rounding through a float
  } catch {
    return `${decimal} ${currency}`;
  }
}

export function tokens(n) {
  return numbers.format(n);
}

export function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
}

export function periodWords(usage) {
  if (!usage.period || usage.period === "none") return "No period: the budget does not reset";
  return `${usage.period}, since ${when(usage.period_start)}`;
}

export function tokenWords(usage) {
  const used = tokens(usage.total_tokens_used);
  return usage.token_limit === null || usage.token_limit === undefined
    ? `${used} (no limit)`
    : `${used} of ${tokens(usage.token_limit)}`;
}

export function spendWords(usage) {
  const spent = money(usage.spend_micros, usage.currency);
  return usage.spend_limit_micros === null || usage.spend_limit_micros === undefined
    ? `${spent} (no limit)`
    : `${spent} of ${money(usage.spend_limit_micros, usage.currency)}`;
}

/** Fill the usage panel of the chat page; a server without plans (no `plan` field) or
 *  without the summary endpoint (404) leaves those parts hidden. */
export async function showUsagePanel(api, usage, parts) {
  const planned = typeof usage.plan === "string";
  parts.panel.hidden = !planned;
  if (!planned) return;
  parts.plan.textContent = usage.plan;
  parts.period.textContent = periodWords(usage);
  parts.resets.textContent = usage.resets_at ? when(usage.resets_at) : "Never";
  parts.resets.dateTime = usage.resets_at || "";
  parts.tokens.textContent = tokenWords(usage);
  parts.spend.textContent = spendWords(usage);
  try {
    const summary = await api.usageSummary("day");
    drawDailyChart(parts.chart, summary);
    parts.chartBox.hidden = false;
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      parts.chartBox.hidden = true;
      return;
    }
    throw err;
  }
}
