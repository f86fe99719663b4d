// The chatmeter HTTP API as the page uses it, and every error code in words.

/** What each contract error means for the person reading the page. */
const WORDS = {
  UNAUTHORIZED:
    "You are signed out: your token has expired or is not valid here. " +
    "Sign in again with a new token.",
  AUTH_UNAVAILABLE:
    "Your sign-in cannot be checked right now: the identity provider cannot be reached. " +
    "You are still signed in; try again in a moment.",
  INVALID_CHAT_ID: "That chat address is not valid. Pick a chat from the list.",
  CHAT_NOT_FOUND: "This chat no longer exists; it may have been deleted in another window.",
  FORBIDDEN: "This chat belongs to another account.",
  TOKEN_BUDGET_EXCEEDED:
    "Your token budget is spent: too little is left for this message and its reply. " +
    "Ask an administrator to raise your limit.",
  REPLY_IN_PROGRESS:
    "A reply is still being written in this chat (perhaps in another window). " +
    "Wait for it to finish, or stop it, then send again.",
  INVALID_MESSAGE: "That message cannot be sent: it is empty or too long.",
  NO_ACTIVE_REPLY: "There is no reply to stop; it had already finished.",
  PROVIDER_ERROR: "The model failed while answering. Try again.",
  PROVIDER_RATE_LIMITED: "The model is busy right now. Try again in a moment.",
  PROVIDER_TIMEOUT: "The model stopped responding. Try again.",
  CONTENT_BLOCKED: "The model declined to answer this message.",
  DATABASE_ERROR: "The reply could not be saved yet; it will be recorded shortly.",
  INTERNAL_ERROR: "Something went wrong on the server. Try again.",
  NETWORK: "The server cannot be reached. Check your connection and try again.",
  CONNECTION_LOST:
    "The connection closed before the reply finished. What arrived so far is kept in the chat.",
};

export class ApiError extends Error {
  constructor(status, code, serverMessage) {
    super(describe(code, serverMessage, status));
    this.status = status;
    this.code = code;
    this.serverMessage = serverMessage;
  }
}

/** Words for an error code; the server's own message only where it is already meant
 *  for a person and no better words exist (a bad request names the field). */
export function describe(code, serverMessage, status) {
  if (WORDS[code]) {
    if (code === "INVALID_MESSAGE" && /at most \d+/.test(serverMessage || "")) {
      const limit = serverMessage.match(/at most (\d+)/)[1];
      return `That message is too long: at most ${Number(limit).toLocaleString()} characters.`;
    }
    return WORDS[code];
  }
  if (code === "INVALID_REQUEST" && serverMessage) {
    return `The server did not accept that: ${serverMessage}`;
  }
  if (status >= 500) return WORDS.INTERNAL_ERROR;
  return `The server answered with an error (${status || "no answer"}). Try again.`;
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's error page): only the status is known
  }
  if (body && body.error === true && typeof body.code === "string") {
    return new ApiError(response.status, body.code, String(body.message || ""));
  }
  const code = response.status === 401 ? "UNAUTHORIZED" : "HTTP_" + response.status;
  return new ApiError(response.status, code, "");
}

export class Api {
  constructor(token) {
    this.token = token;
  }

  async _fetch(method, path, body, signal, extraHeaders) {
    const headers = { Authorization: `Bearer ${this.token}`, ...extraHeaders };
    const init = { method, headers, signal, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "NETWORK", "");
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  async _json(method, path, body) {
    const response = await this._fetch(method, path, body);
    if (response.status === 204) return null;
    return response.json();
  }

  usage() {
    return this._json("GET", "/api/usage");
  }

  listChats(before) {
    const query = new URLSearchParams({ limit: "50" });
    if (before) query.set("before", before);
    return this._json("GET", `/api/chat?${query}`);
  }

  createChat(model) {
    return this._json("POST", "/api/chat", model ? { model } : {});
  }

  models() {
    return this._json("GET", "/api/models");
  }

  usageSummary(groupBy = "day", from, to) {
    const query = new URLSearchParams({ group_by: groupBy });
    if (from) query.set("from", from);
    if (to) query.set("to", to);
    return this._json("GET", `/api/usage/summary?${query}`);
  }

  adminUsers(q, limit, offset) {
    const query = new URLSearchParams({ limit: String(limit), offset: String(offset) });
    if (q) query.set("q", q);
    return this._json("GET", `/api/admin/users?${query}`);
  }

  adminPlans() {
    return this._json("GET", "/api/admin/plans");
  }

  setPlan(userId, plan) {
    return this._json("PUT", `/api/admin/users/${encodeURIComponent(userId)}/plan`, { plan });
  }

  setLimit(userId, tokenLimit) {
    const path = `/api/admin/users/${encodeURIComponent(userId)}/limit`;
    return this._json("PUT", path, { token_limit: tokenLimit });
  }

  adminSummary(groupBy = "day", from, to) {
    const query = new URLSearchParams({ group_by: groupBy });
    if (from) query.set("from", from);
    if (to) query.set("to", to);
    return this._json("GET", `/api/admin/usage/summary?${query}`);
  }

  /** Everyone's usage as CSV text (a link cannot send the bearer header). */
  async adminSummaryCsv(groupBy, from, to) {
    const query = new URLSearchParams({ format: "csv", group_by: groupBy });
    if (from) query.set("from", from);
    if (to) query.set("to", to);
    const response = await this._fetch("GET", `/api/admin/usage/summary?${query}`);
    return response.blob();
  }

  getChat(chatId) {
    return this._json("GET", `/api/chat/${encodeURIComponent(chatId)}`);
  }

  renameChat(chatId, title) {
    return this._json("PATCH", `/api/chat/${encodeURIComponent(chatId)}`, { title });
  }

  deleteChat(chatId) {
    return this._json("DELETE", `/api/chat/${encodeURIComponent(chatId)}`);
  }

  stop(chatId) {
    return this._json("POST", `/api/chat/${encodeURIComponent(chatId)}/stop`);
  }

  /** The reply's event stream: resolves to the open Response once the checks passed,
   *  rejects with an ApiError when the server refused the message. */
  openReply(chatId, message, signal) {
    const path = `/api/chat/${encodeURIComponent(chatId)}/message`;
    return this._fetch("POST", path, { message }, signal);
  }

  /** Resume a reply (SPEC 11) after event `lastEventId`: the open Response, or null when
   *  there is nothing to resume (204: the messages are in the chat). */
  async resumeReply(chatId, messageId, lastEventId, signal) {
    const query = new URLSearchParams();
    if (messageId) query.set("message_id", messageId);
    const headers = lastEventId ? { "Last-Event-ID": String(lastEventId) } : {};
    const path = `/api/chat/${encodeURIComponent(chatId)}/stream?${query}`;
    const response = await this._fetch("GET", path, undefined, signal, headers);
    return response.status === 204 ? null : response;
  }
}
