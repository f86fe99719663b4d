// The admin console: users with plan, limits, usage and spend (searchable, paged), set a
// plan or a token limit, everyone's usage by day, and a CSV of a date range. Only a token
// the API accepts as admin sees anything: every call here is an /api/admin one.

import { Api, ApiError, describe } from "./api.js";
import { drawDailyChart } from "./chart.js";
import { spendWords, tokens, when } from "./usage.js";

const TOKEN_KEY = "chatmeter.token";
const PAGE_SIZE = 20;

const $ = (id) => document.getElementById(id);
const ui = {
  signin: $("signin"),
  signinForm: $("signin-form"),
  tokenInput: $("token-input"),
  signinMessage: $("signin-message"),
  denied: $("denied"),
  deniedText: $("denied-text"),
  console: $("console"),
  who: $("who"),
  notice: $("notice"),
  status: $("status"),
  searchForm: $("search-form"),
  search: $("search"),
  users: $("users"),
  noUsers: $("no-users"),
  prev: $("prev"),
  next: $("next"),
  pageText: $("page-text"),
  chart: $("chart"),
  csvFrom: $("csv-from"),
  csvTo: $("csv-to"),
  csvBy: $("csv-by"),
  csvLink: $("csv-link"),
};

const state = { api: null, plans: [], query: "", offset: 0, total: 0 };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function notice(text) {
  ui.notice.textContent = text || "";
  ui.notice.hidden = !text;
}

function problem(err) {
  if (err instanceof ApiError) {
    if (err.code === "UNAUTHORIZED") return showSignin(err.message);
    if (err.code === "FORBIDDEN") return deny();
    const words = err.serverMessage && err.status === 400 ? err.serverMessage : err.message;
    return notice(words);
  }
  console.error(err);
  notice(describe("INTERNAL_ERROR", "", 500));
}

function showSignin(message) {
  ui.console.hidden = true;
  ui.denied.hidden = true;
  ui.signin.hidden = false;
  ui.signinMessage.hidden = !message;
  ui.signinMessage.textContent = message || "";
  ui.tokenInput.focus();
}

function deny() {
  // nothing of the admin data was fetched or is shown
  ui.console.hidden = true;
  ui.signin.hidden = true;
  ui.users.replaceChildren();
  ui.chart.replaceChildren();
  ui.denied.hidden = false;
  ui.deniedText.textContent =
    "This page is for administrators only. Your account is not an administrator, " +
    "so no admin data is shown. Ask an administrator for access.";
  document.title = "Not allowed · chatmeter";
}

// ---------------------------------------------------------------- users

function planCell(user) {
  const select = el("select");
  select.setAttribute("aria-label", `Plan for ${user.user_id}`);
  const names = state.plans.map((plan) => plan.name);
  if (!names.includes(user.plan)) names.unshift(user.plan);
  for (const name of names) {
    const option = el("option", "", name);
    option.value = name;
    option.selected = name === user.plan;
    select.append(option);
  }
  select.addEventListener("change", () => setPlan(user.user_id, select.value, select));
  return select;
}

function limitCell(user) {
  const form = el("form", "limit-form");
  const input = el("input");
  input.type = "number";
  input.min = "0";
  input.step = "1";
  input.required = true;
  input.value = user.token_limit === null ? "" : String(user.token_limit);
  input.placeholder = "no limit";
  input.setAttribute("aria-label", `Token limit for ${user.user_id}`);
  const save = el("button", "", "Set");
  save.type = "submit";
  save.setAttribute("aria-label", `Set limit for ${user.user_id}`);
  form.append(input, save);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setLimit(user.user_id, input.value);
  });
  return form;
}

function userRow(user) {
  const row = el("tr");
  row.dataset.userId = user.user_id;
  const who = el("th", "user-id", user.user_id);
  who.scope = "row";
  const cells = [
    who,
    el("td"),
    el("td", "num", tokens(user.total_tokens_used)),
    el("td"),
    el("td", "num", spendWords(user)),
    el("td", "", user.resets_at ? when(user.resets_at) : "never"),
  ];
  cells[1].append(planCell(user));
  cells[3].append(limitCell(user));
  row.append(...cells);
  return row;
}

async function loadUsers() {
  const page = await state.api.adminUsers(state.query, PAGE_SIZE, state.offset);
  state.total = page.total;
  ui.users.replaceChildren(...page.users.map(userRow));
  ui.noUsers.hidden = page.users.length > 0;
  const first = page.users.length ? state.offset + 1 : 0;
  ui.pageText.textContent = `${first}–${state.offset + page.users.length} of ${page.total}`;
  ui.prev.disabled = state.offset === 0;
  ui.next.disabled = state.offset + PAGE_SIZE >= page.total;
}

function replaceRow(usage) {
  const old = [...ui.users.rows].find((row) => row.dataset.userId === usage.user_id);
  if (old) old.replaceWith(userRow(usage));
}

async function setPlan(userId, plan, select) {
  notice("");
  try {
    const usage = await state.api.setPlan(userId, plan);
    replaceRow(usage);
    ui.status.textContent = `${userId} is now on the ${usage.plan} plan.`;
    await loadChart();
  } catch (err) {
    select.disabled = false;
    problem(err);
  }
}

async function setLimit(userId, raw) {
  notice("");
  const limit = Number(raw);
  // past the safe integers a number is rounded: the limit set would not be the one typed
  if (!Number.isSafeInteger(limit) || limit < 0) {
    notice(`A token limit is a whole number from 0 to ${tokens(Number.MAX_SAFE_INTEGER)}.`);
    return;
  }
  try {
    const usage = await state.api.setLimit(userId, limit);
    replaceRow(usage);
    ui.status.textContent = `${userId} may now use ${tokens(usage.token_limit)} tokens.`;
  } catch (err) {
    problem(err);
  }
}

// ---------------------------------------------------------------- chart and CSV

async function loadChart() {
  const summary = await state.api.adminSummary("day");
  drawDailyChart(ui.chart, summary);
  if (!ui.csvFrom.value) ui.csvFrom.value = summary.from;
  if (!ui.csvTo.value) ui.csvTo.value = summary.to;
  updateCsvLink();
}

function csvQuery() {
  const query = new URLSearchParams({ format: "csv", group_by: ui.csvBy.value });
  if (ui.csvFrom.value) query.set("from", ui.csvFrom.value);
  if (ui.csvTo.value) query.set("to", ui.csvTo.value);
  return query;
}

function updateCsvLink() {
  ui.csvLink.href = `/api/admin/usage/summary?${csvQuery()}`;
}

/** A link cannot send the bearer header: fetch the CSV with it, save it as a file. */
async function downloadCsv() {
  notice("");
  const by = ui.csvBy.value;
  const from = ui.csvFrom.value;
  const to = ui.csvTo.value;
  const blob = await state.api.adminSummaryCsv(by, from, to);
  const url = URL.createObjectURL(blob);
  const save = el("a");
  save.href = url;
  save.download = `usage-${from || "start"}-${to || "today"}-by-${by}.csv`;
  document.body.append(save);
  save.click();
  save.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  ui.status.textContent = `Downloaded ${save.download}.`;
}

// ---------------------------------------------------------------- start

/** Who the token names, for the top bar only (the server checked the token). */
function signedInAs(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part));
    return String(claims.user_id || claims.sub || "");
  } catch {
    return "";
  }
}

async function start(token) {
  const api = new Api(token);
  state.api = api;
  let plans;
  try {
    plans = await api.adminPlans(); // proves the token is an admin's before anything shows
  } catch (err) {
    if (err instanceof ApiError && err.code === "UNAUTHORIZED") {
      showSignin("That token was not accepted: it is expired or not valid for this server.");
      return;
    }
    if (err instanceof ApiError && err.code === "FORBIDDEN") {
      sessionStorage.setItem(TOKEN_KEY, token);
      deny();
      return;
    }
    // the server or the identity provider is failing, not the token (503
    // AUTH_UNAVAILABLE in a key set outage): keep it, so a reload tries again
    sessionStorage.setItem(TOKEN_KEY, token);
    showSignin(err instanceof ApiError ? err.message : describe("INTERNAL_ERROR", "", 500));
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  state.plans = plans.plans;
  ui.who.textContent = signedInAs(token);
  ui.signin.hidden = true;
  ui.denied.hidden = true;
  ui.console.hidden = false;
  document.title = "Admin · chatmeter";
  await Promise.all([loadUsers(), loadChart()]);
}

ui.signinForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const token = ui.tokenInput.value.trim();
  if (token) start(token).catch(problem);
});
ui.searchForm.addEventListener("submit", (event) => {
  event.preventDefault();
  state.query = ui.search.value.trim();
  state.offset = 0;
  loadUsers().catch(problem);
});
ui.prev.addEventListener("click", () => {
  state.offset = Math.max(0, state.offset - PAGE_SIZE);
  loadUsers().catch(problem);
});
ui.next.addEventListener("click", () => {
  state.offset += PAGE_SIZE;
  loadUsers().catch(problem);
});
for (const input of [ui.csvFrom, ui.csvTo, ui.csvBy]) {
  input.addEventListener("change", updateCsvLink);
}
ui.csvLink.addEventListener("click", (event) => {
  event.preventDefault();
  downloadCsv().catch(problem);
});

const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromHash !== null) history.replaceState(null, "", location.pathname + location.search);
const token = (fromHash && fromHash.trim()) || sessionStorage.getItem(TOKEN_KEY);
if (token) start(token).catch(problem);
else showSignin("");
