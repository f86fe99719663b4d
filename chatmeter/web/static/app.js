// The chat page: sign in, pick or start a chat, stream replies, watch the budget.
// A person's text is only ever set with textContent; the model's is rendered as
// sanitized Markdown by markdown.js, never put into the page as HTML directly.

import { Api, ApiError, describe } from "./api.js";
import { copyCode, showMarkdown } from "./markdown.js";
import { readEvents } from "./sse.js";
import { money, showUsagePanel } from "./usage.js";

const TOKEN_KEY = "chatmeter.token";
const CHAT_KEY = "chatmeter.chat";
const STOP_GRACE_MS = 8000; // after Stop, how long to wait for the end event
const RESUME_DELAYS_MS = [250, 500, 1000, 2000, 4000, 8000]; // a dropped stream's retries
const DEFAULT_TITLE = "New chat";

const $ = (id) => document.getElementById(id);
const ui = {
  signin: $("signin"),
  signinForm: $("signin-form"),
  tokenInput: $("token-input"),
  signinMessage: $("signin-message"),
  app: $("app"),
  budgetBar: $("budget-bar"),
  budgetText: $("budget-text"),
  budget: $("budget"),
  who: $("who"),
  signout: $("signout"),
  chatControls: $("chat-controls"),
  newChat: $("new-chat"),
  chatList: $("chat-list"),
  noChats: $("no-chats"),
  moreChats: $("more-chats"),
  chatTitle: $("chat-title"),
  chatModel: $("chat-model"),
  titleRow: $("title-row"),
  renameChat: $("rename-chat"),
  deleteChat: $("delete-chat"),
  renameForm: $("rename-form"),
  renameInput: $("rename-input"),
  renameCancel: $("rename-cancel"),
  messages: $("messages"),
  empty: $("empty"),
  notice: $("notice"),
  noticeText: $("notice-text"),
  noticeClose: $("notice-close"),
  composer: $("composer"),
  message: $("message"),
  send: $("send"),
  stop: $("stop"),
  status: $("status"),
  modelPicker: $("model-picker"),
  modelSelect: $("model-select"),
  usage: {
    panel: $("usage-panel"),
    plan: $("usage-plan"),
    period: $("usage-period"),
    resets: $("usage-resets"),
    tokens: $("usage-tokens"),
    spend: $("usage-spend"),
    chartBox: $("usage-chart-box"),
    chart: $("usage-chart"),
  },
};

const numbers = new Intl.NumberFormat();
const fmt = (n) => numbers.format(n);

const state = {
  api: null,
  chats: [], // newest first, as the server lists them
  next: null, // cursor of older chats
  current: null, // the open chat: {chat_id, title, model, messages}
  streaming: null, // {chatId, controller, stopRequested, stopTimer}
  usage: null, // the last GET /api/usage
};

// ---------------------------------------------------------------- small helpers

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showNotice(text) {
  ui.noticeText.textContent = text;
  ui.notice.hidden = false;
}

function hideNotice() {
  ui.notice.hidden = true;
  ui.noticeText.textContent = "";
}

function setStatus(text) {
  ui.status.textContent = text;
}

function rememberChat(chatId) {
  if (chatId) sessionStorage.setItem(CHAT_KEY, chatId);
  else sessionStorage.removeItem(CHAT_KEY);
  const hash = chatId ? `#chat=${encodeURIComponent(chatId)}` : "";
  history.replaceState(null, "", location.pathname + location.search + hash);
}

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function autosize() {
  const box = ui.message;
  box.style.height = "auto";
  box.style.height = Math.min(box.scrollHeight, 220) + "px";
}

function shortDate(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const today = new Date();
  if (date.toDateString() === today.toDateString()) {
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  return date.toLocaleDateString([], { month: "short", day: "numeric" });
}

// ---------------------------------------------------------------- sign-in

function tokenFromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  const chat = params.get("chat");
  if (token !== null) {
    // the token must not linger in the address bar, the history or a screenshot;
    // kept for the tab instead, so a reload after a network hiccup still signs in
    history.replaceState(null, "", location.pathname + location.search);
    if (token.trim()) sessionStorage.setItem(TOKEN_KEY, token.trim());
  }
  return { token: token && token.trim(), chat };
}

function showSignin(message) {
  ui.app.hidden = true;
  ui.signin.hidden = false;
  ui.signinMessage.hidden = !message;
  ui.signinMessage.textContent = message || "";
  ui.tokenInput.value = "";
  ui.tokenInput.focus();
  document.title = "Sign in · chatmeter";
}

function signOut(message) {
  if (state.streaming) state.streaming.controller.abort();
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(CHAT_KEY);
  history.replaceState(null, "", location.pathname + location.search);
  state.api = null;
  state.chats = [];
  state.next = null;
  state.current = null;
  ui.chatList.replaceChildren();
  renderConversation();
  hideNotice();
  setStatus("");
  showSignin(message);
}

/** Handle an error of any call: signed out goes back to sign-in, the rest is a notice. */
function report(err) {
  if (err && err.name === "AbortError") return;
  if (err instanceof ApiError) {
    if (err.code === "UNAUTHORIZED") {
      signOut(err.message);
      return;
    }
    showNotice(err.message);
    return;
  }
  console.error(err);
  showNotice(describe("INTERNAL_ERROR", "", 500));
}

async function signIn(token, wantedChat) {
  const api = new Api(token);
  const usage = await api.usage(); // proves the token before anything is shown
  sessionStorage.setItem(TOKEN_KEY, token);
  state.api = api;
  ui.signin.hidden = true;
  ui.app.hidden = false;
  document.title = "chatmeter";
  ui.who.textContent = usage.user_id;
  ui.who.title = `Signed in as ${usage.user_id}`;
  renderUsage(usage);
  ui.usage.panel.open = window.matchMedia("(min-width: 701px)").matches;
  const chatId = wantedChat || sessionStorage.getItem(CHAT_KEY); // before any send sets it
  await Promise.all([loadChats(), loadModels(), refreshUsagePanel(usage)]);
  // the message box works from here on: a message sent (or a chat picked) while the rest
  // loaded wins over the chat remembered from before, which would replace its live reply
  if (state.current || state.streaming) return;
  if (chatId) {
    await openChat(chatId);
  } else {
    renderConversation();
  }
  ui.message.focus();
}

// ---------------------------------------------------------------- budget

function renderUsage(usage) {
  if (usage.token_limit === null) {
    // a plan without a token limit: nothing to run out of
    ui.budgetBar.max = 1;
    ui.budgetBar.value = 0;
    ui.budgetText.textContent = `${fmt(usage.total_tokens_used)} tokens used, no limit`;
    ui.budget.dataset.level = "ok";
    state.usage = usage;
    return;
  }
  const limit = Math.max(usage.token_limit, 0);
  const spent = usage.total_tokens_used + usage.reserved_tokens;
  ui.budgetBar.max = Math.max(limit, 1);
  ui.budgetBar.value = Math.min(spent, Math.max(limit, 1));
  const left = Math.max(usage.tokens_remaining, 0);
  ui.budgetText.textContent = `${fmt(left)} of ${fmt(limit)} tokens left`;
  const ratio = limit ? left / limit : 0;
  ui.budget.dataset.level = left <= 0 ? "spent" : ratio < 0.1 ? "low" : "ok";
  state.usage = usage;
}

async function refreshUsage() {
  const usage = await state.api.usage();
  renderUsage(usage);
  refreshUsagePanel(usage).catch(report);
  return usage;
}

function refreshUsagePanel(usage) {
  return showUsagePanel(state.api, usage, ui.usage);
}

// ---------------------------------------------------------------- model picker

function priceWords(model, currency) {
  const prices = model.prices;
  if (!prices || (!prices.input && !prices.output)) return "";
  const perMillion = (price) => money(Math.round(price * 1_000_000), currency);
  return ` · ${perMillion(prices.input)} in / ${perMillion(prices.output)} out per 1M tokens`;
}

/** Fill the Model select from GET /api/models; hidden when the server has none to offer. */
async function loadModels() {
  let listed;
  try {
    listed = await state.api.models();
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      ui.modelPicker.hidden = true;
      return;
    }
    throw err;
  }
  const options = listed.models.map((model) => {
    const option = el("option", "", model.name + priceWords(model, listed.currency));
    option.value = model.name;
    option.selected = model.default;
    return option;
  });
  ui.modelSelect.replaceChildren(...options);
  ui.modelPicker.hidden = options.length === 0;
}

function chosenModel() {
  return ui.modelPicker.hidden ? undefined : ui.modelSelect.value || undefined;
}

// ---------------------------------------------------------------- chat list

async function loadChats(more = false) {
  const page = await state.api.listChats(more ? state.next : undefined);
  state.chats = more ? state.chats.concat(page.chats) : page.chats;
  state.next = page.next;
  renderChatList();
}

function renderChatList() {
  const items = state.chats.map((chat) => {
    const item = el("li");
    const button = el("button", "chat-item");
    button.type = "button";
    button.dataset.chatId = chat.chat_id;
    button.append(el("span", "chat-item-title", chat.title));
    button.append(el("span", "chat-item-date", shortDate(chat.updated_at)));
    if (state.current && state.current.chat_id === chat.chat_id) {
      button.setAttribute("aria-current", "page");
    }
    button.addEventListener("click", () => {
      hideNotice();
      openChat(chat.chat_id).catch(report);
    });
    item.append(button);
    return item;
  });
  ui.chatList.replaceChildren(...items);
  ui.noChats.hidden = state.chats.length > 0;
  ui.moreChats.hidden = !state.next;
}

function forgetChat(chatId) {
  state.chats = state.chats.filter((c) => c.chat_id !== chatId);
  if (state.current && state.current.chat_id === chatId) {
    state.current = null;
    rememberChat(null);
    renderConversation();
  }
  renderChatList();
}

// ---------------------------------------------------------------- conversation

async function openChat(chatId) {
  const streaming = state.streaming;
  let chat;
  try {
    chat = await state.api.getChat(chatId);
  } catch (err) {
    const gone = ["CHAT_NOT_FOUND", "FORBIDDEN", "INVALID_CHAT_ID"];
    if (err instanceof ApiError && gone.includes(err.code)) {
      forgetChat(chatId);
      rememberChat(null);
      showNotice(err.message);
      return;
    }
    throw err;
  }
  // a reply started while the chat loaded: it is what the person is doing now, and
  // showing this older copy would take its live text off the page
  if (state.streaming && state.streaming !== streaming) return;
  state.current = chat;
  rememberChat(chat.chat_id);
  renderConversation();
  renderChatList();
  scrollToBottom();
  if (window.matchMedia("(min-width: 701px)").matches) ui.message.focus();
  resumeOpenChat(chat).catch(report);
}

function renderConversation() {
  const chat = state.current;
  ui.renameForm.hidden = true;
  ui.titleRow.hidden = false;
  ui.chatTitle.textContent = chat ? chat.title : "New conversation";
  ui.chatModel.textContent = chat ? chat.model : "";
  if (chat && [...ui.modelSelect.options].some((o) => o.value === chat.model)) {
    ui.modelSelect.value = chat.model; // "New chat" then starts on the same model
  }
  ui.chatModel.hidden = !chat;
  ui.renameChat.hidden = !chat;
  ui.deleteChat.hidden = !chat;
  const nodes = chat ? chat.messages.map(messageNode) : [];
  ui.messages.replaceChildren(...(nodes.length ? nodes : [ui.empty]));
  document.title = chat ? `${chat.title} · chatmeter` : "chatmeter";
}

const STATUS_WORDS = {
  stopped: "Stopped",
  interrupted: "Interrupted",
  failed: "Failed",
};

/** One message bubble: a person's text as text, the model's as sanitized Markdown. */
function messageNode(message) {
  const node = el("article", `msg ${message.role}`);
  node.dataset.role = message.role;
  node.append(el("span", "sr-only", message.role === "user" ? "You said:" : "The model said:"));
  const assistant = message.role === "assistant";
  const body = el("div", "msg-body", assistant ? undefined : message.content);
  if (assistant) showMarkdown(body, message.content);
  node.append(body);
  if (assistant) {
    const meta = el("div", "msg-meta");
    const tokens = el("span", "msg-tokens");
    meta.append(tokens);
    node.append(meta);
    finishNode(node, message.status, message.tokens_consumed ?? 0);
  }
  return node;
}

function finishNode(node, status, tokens) {
  node.removeAttribute("aria-busy");
  node.classList.remove("streaming");
  node.dataset.status = status;
  const meta = node.querySelector(".msg-meta");
  meta.querySelector(".msg-tokens").textContent = `${fmt(tokens)} tokens`;
  meta.querySelector(".badge")?.remove();
  if (STATUS_WORDS[status]) meta.append(el("span", `badge ${status}`, STATUS_WORDS[status]));
  const body = node.querySelector(".msg-body");
  if (!body.textContent && status !== "complete") body.classList.add("nothing");
}

/** The reply being written: its text so far, re-rendered as Markdown at most once a
 *  frame. The view follows the reply down unless the reader has scrolled up. */
class ReplyView {
  constructor() {
    this.node = messageNode({ role: "assistant", content: "", status: "complete" });
    this.node.classList.add("streaming");
    this.node.setAttribute("aria-busy", "true");
    this.node.querySelector(".msg-tokens").textContent = "Writing…";
    this.body = this.node.querySelector(".msg-body");
    this.text = "";
    this.frame = 0;
  }

  append(chunk) {
    this.text += chunk;
    if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
  }

  flush() {
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    const follow = nearBottom();
    showMarkdown(this.body, this.text);
    if (follow) scrollToBottom();
  }

  finish(status, tokens) {
    this.flush();
    finishNode(this.node, status, tokens);
  }
}

function appendNode(node) {
  if (ui.empty.isConnected) ui.empty.remove();
  ui.messages.append(node);
  scrollToBottom();
}

// ---------------------------------------------------------------- sending

function setStreaming(streaming) {
  ui.send.hidden = streaming;
  ui.stop.hidden = !streaming;
  ui.stop.disabled = false;
  ui.chatControls.disabled = streaming;
  ui.renameChat.disabled = streaming;
  ui.deleteChat.disabled = streaming;
}

async function ensureChat() {
  if (state.current) return state.current;
  const chat = await state.api.createChat(chosenModel());
  state.current = { ...chat, messages: [] };
  state.chats = [chat, ...state.chats];
  rememberChat(chat.chat_id);
  renderConversation();
  renderChatList();
  return state.current;
}

async function send() {
  if (state.streaming || !state.api) return;
  const text = ui.message.value;
  if (!text.trim()) {
    ui.message.focus();
    return;
  }
  hideNotice();
  setStatus("");
  const controller = new AbortController();
  const stream = newStream(controller);
  state.streaming = stream;
  setStreaming(true);
  ui.stop.disabled = true; // until the reply has started
  let userNode = null;
  let view = null;
  let unanswered = null; // the network failed before the answer's head
  let busy = false; // another window's reply is streaming in this chat
  let sentAfter = 0; // the chat's messages before this one
  try {
    const chat = await ensureChat();
    stream.chatId = chat.chat_id;
    sentAfter = chat.messages.length;
    const firstMessage = chat.messages.length === 0;
    userNode = messageNode({ role: "user", content: text });
    appendNode(userNode);
    ui.message.value = "";
    autosize();
    const response = await state.api.openReply(chat.chat_id, text, controller.signal);
    ui.stop.disabled = stream.stopRequested;
    chat.messages.push({ role: "user", content: text, status: "complete", tokens_consumed: 0 });
    view = new ReplyView();
    appendNode(view.node);
    const ended = await followReply(stream, view, response);
    if (ended === null) {
      // the reply is over and no longer replayable: the saved chat has it
      view.finish("complete", 0);
      await resync(stream.chatId);
      return;
    }
    const { status, tokens } = endReply(chat, view, ended);
    await afterReply(chat, text, firstMessage, status, tokens);
  } catch (err) {
    if (view) {
      // the stream broke for good (network, server gone, abort): show what the server kept
      if (err.name !== "AbortError") showNotice(describe("CONNECTION_LOST"));
      view.finish("interrupted", 0);
      if (state.api && stream.chatId) await resync(stream.chatId);
    } else if (err instanceof ApiError && err.code === "NETWORK" && stream.chatId) {
      // no answer came: the message may have reached the server, which then replies
      userNode?.remove();
      unanswered = err;
    } else if (err.name !== "AbortError") {
      // refused before streaming: nothing was saved, so the text goes back in the box
      userNode?.remove();
      if (!ui.message.value) {
        ui.message.value = text;
        autosize();
      }
      if (err instanceof ApiError && err.code === "CHAT_NOT_FOUND" && stream.chatId) {
        forgetChat(stream.chatId);
      }
      report(err);
      if (err instanceof ApiError && err.code === "TOKEN_BUDGET_EXCEEDED") {
        await refreshUsage().catch(report);
      }
      busy = err instanceof ApiError && err.code === "REPLY_IN_PROGRESS";
    }
  } finally {
    clearTimeout(stream.stopTimer);
    if (state.streaming === stream) state.streaming = null;
    setStreaming(false);
    if (state.api) ui.message.focus();
  }
  if (unanswered) await lookForUnanswered(stream.chatId, sentAfter, text, unanswered);
  // the words say to wait for that reply or stop it: load the chat so it shows, with Stop
  if (busy) await resync(stream.chatId);
}

/** The network failed before the message's answer came: the server may have saved the
 *  message and be replying (a second send would then be refused, a reply in progress).
 *  The chat is loaded again: if the message is in it, its reply shows as after a reload
 *  (followed live if it still streams); if not, it was not sent, and the text goes back. */
async function lookForUnanswered(chatId, sentAfter, text, err) {
  await resync(chatId);
  const chat = state.current;
  const saved = chat && chat.chat_id === chatId ? chat.messages[sentAfter] : null;
  if (saved && saved.role === "user" && saved.content === text) return;
  if (!ui.message.value) {
    ui.message.value = text;
    autosize();
  }
  report(err);
}

/** The reply is saved: show what it cost, title a new chat, refresh the list. */
async function afterReply(chat, text, firstMessage, status, tokens) {
  try {
    const usage = await refreshUsage();
    const left = fmt(Math.max(usage.tokens_remaining, 0));
    const stopped = status === "stopped" ? "Stopped. " : "";
    setStatus(`${stopped}This reply used ${fmt(tokens)} tokens · ${left} tokens left.`);
    if (firstMessage && chat.title === DEFAULT_TITLE) await titleFrom(chat, text);
    await loadChats();
  } catch (err) {
    report(err);
  }
}

function newStream(controller) {
  return {
    chatId: null,
    controller,
    stopRequested: false,
    stopTimer: 0,
    messageId: null, // the reply, named by its first event (SPEC 11)
    lastEventId: 0, // the last event shown: a resume asks for the ones after it
  };
}

/** Show each chunk as it arrives; resolves to the end or error event. Events at or
 *  before the last one shown (a resume overlapping) are skipped: each piece shows once. */
async function readReply(response, view, stream) {
  for await (const { id, data: event } of readEvents(response.body)) {
    const number = Number(id);
    if (id !== "" && Number.isInteger(number)) {
      if (number <= stream.lastEventId) continue;
      stream.lastEventId = number;
    }
    if (event.message_id && !stream.messageId) stream.messageId = event.message_id;
    if (event.error || event.done) return event;
    if (typeof event.chunk === "string" && event.chunk) view.append(event.chunk);
  }
  const lost = new Error("stream ended early");
  lost.name = "ConnectionLost";
  throw lost;
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Read the reply to its end; when the connection drops, resume it from the last event
 *  shown (SPEC 11) a few times, waiting longer each time. Resolves to the end or error
 *  event, or null when the server has nothing left to resume (the chat has the reply). */
async function followReply(stream, view, response) {
  let attempt = 0;
  for (;;) {
    try {
      return await readReply(response, view, stream);
    } catch (err) {
      if (err.name === "AbortError" || attempt >= RESUME_DELAYS_MS.length) throw err;
    }
    setStatus("Connection lost; reconnecting…");
    for (;;) {
      await pause(RESUME_DELAYS_MS[attempt]);
      attempt += 1;
      try {
        response = await state.api.resumeReply(
          stream.chatId,
          stream.messageId,
          stream.lastEventId,
          stream.controller.signal,
        );
        break;
      } catch (err) {
        const network = err instanceof ApiError && err.code === "NETWORK";
        if (!network || attempt >= RESUME_DELAYS_MS.length) throw err;
      }
    }
    setStatus("");
    if (response === null) return null;
  }
}

/** The end (or error) event arrived: show how the reply ended and keep it in the chat. */
function endReply(chat, view, ended) {
  const tokens = ended.tokens_used || 0;
  const stopped = ended.finish_reason === "stopped";
  const status = ended.error ? "failed" : stopped ? "stopped" : "complete";
  view.finish(status, tokens);
  if (ended.error) showNotice(describe(ended.code, ended.message, 200));
  chat.messages.push({ role: "assistant", content: view.text, status, tokens_consumed: tokens });
  return { status, tokens };
}

/** The open chat's last message is the person's: its reply may still be streaming (the
 *  page was reloaded, or another window sent it). Follow it from its first event. */
async function resumeOpenChat(chat) {
  const last = chat.messages[chat.messages.length - 1];
  if (!last || last.role !== "user" || state.streaming) return;
  const firstMessage = chat.messages.length === 1; // the reply then titles the chat
  const controller = new AbortController();
  const stream = newStream(controller);
  stream.chatId = chat.chat_id;
  let response;
  try {
    response = await state.api.resumeReply(chat.chat_id, null, 0, controller.signal);
  } catch (err) {
    report(err);
    return;
  }
  if (response === null || state.current !== chat || state.streaming) {
    response?.body?.cancel().catch(() => {});
    return;
  }
  state.streaming = stream;
  setStreaming(true);
  const view = new ReplyView();
  appendNode(view.node);
  try {
    const ended = await followReply(stream, view, response);
    if (ended === null) {
      view.finish("complete", 0);
      await resync(chat.chat_id);
      return;
    }
    const { status, tokens } = endReply(chat, view, ended);
    await afterReply(chat, last.content, firstMessage, status, tokens);
  } catch (err) {
    if (err.name !== "AbortError") showNotice(describe("CONNECTION_LOST"));
    view.finish("interrupted", 0);
    if (state.api) await resync(chat.chat_id);
  } finally {
    clearTimeout(stream.stopTimer);
    if (state.streaming === stream) state.streaming = null;
    setStreaming(false);
  }
}

/** After a broken stream, load the chat as the server saved it. */
async function resync(chatId) {
  try {
    await refreshUsage();
    if (state.current && state.current.chat_id === chatId) await openChat(chatId);
  } catch (err) {
    report(err);
  }
}

async function stopReply() {
  const stream = state.streaming;
  if (!stream || !stream.chatId || stream.stopRequested) return;
  stream.stopRequested = true;
  ui.stop.disabled = true;
  setStatus("Stopping…");
  // if the end event does not come, stop reading: the server saves the partial reply
  stream.stopTimer = setTimeout(() => stream.controller.abort(), STOP_GRACE_MS);
  try {
    await state.api.stop(stream.chatId);
  } catch (err) {
    if (err instanceof ApiError && err.code === "NO_ACTIVE_REPLY") return; // just finished
    report(err);
  }
}

async function titleFrom(chat, text) {
  const firstLine = text.trim().split("\n")[0];
  const title = firstLine.length > 60 ? firstLine.slice(0, 57).trimEnd() + "…" : firstLine;
  try {
    const renamed = await state.api.renameChat(chat.chat_id, title);
    chat.title = renamed.title;
    if (state.current === chat) ui.chatTitle.textContent = chat.title;
  } catch {
    // a title is a nicety: the chat works without one
  }
}

// ---------------------------------------------------------------- rename, delete

function startRename() {
  if (!state.current) return;
  ui.titleRow.hidden = true;
  ui.renameForm.hidden = false;
  ui.renameInput.value = state.current.title;
  ui.renameInput.focus();
  ui.renameInput.select();
}

function endRename() {
  ui.renameForm.hidden = true;
  ui.titleRow.hidden = false;
}

async function saveRename() {
  const chat = state.current;
  const title = ui.renameInput.value.trim();
  if (!chat) return endRename();
  if (!title) {
    showNotice("A chat needs a title; it cannot be empty.");
    ui.renameInput.focus();
    return;
  }
  try {
    const renamed = await state.api.renameChat(chat.chat_id, title);
    chat.title = renamed.title;
    const listed = state.chats.find((c) => c.chat_id === chat.chat_id);
    if (listed) listed.title = renamed.title;
    hideNotice();
    renderConversation();
    renderChatList();
  } catch (err) {
    if (err instanceof ApiError && err.code === "CHAT_NOT_FOUND") forgetChat(chat.chat_id);
    report(err);
  }
}

async function deleteCurrent() {
  const chat = state.current;
  if (!chat) return;
  if (!window.confirm(`Delete the chat “${chat.title}”? It will no longer be listed.`)) return;
  try {
    await state.api.deleteChat(chat.chat_id);
  } catch (err) {
    if (!(err instanceof ApiError && err.code === "CHAT_NOT_FOUND")) {
      report(err);
      return;
    }
  }
  forgetChat(chat.chat_id);
  setStatus(`Deleted “${chat.title}”.`);
}

// ---------------------------------------------------------------- wiring

ui.signinForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const token = ui.tokenInput.value.trim();
  if (!token) {
    showSignin("Paste a token first.");
    return;
  }
  signIn(token).catch((err) => {
    if (err instanceof ApiError && err.code === "UNAUTHORIZED") {
      showSignin("That token was not accepted: it is expired or not valid for this server.");
    } else {
      showSignin(err instanceof ApiError ? err.message : describe("INTERNAL_ERROR", "", 500));
    }
  });
});

ui.signout.addEventListener("click", () => signOut("You are signed out."));
ui.newChat.addEventListener("click", () => {
  hideNotice();
  setStatus("");
  state.current = null;
  rememberChat(null);
  renderConversation();
  renderChatList();
  ui.message.focus();
});
ui.moreChats.addEventListener("click", () => loadChats(true).catch(report));
ui.modelSelect.addEventListener("change", () => {
  // the model is a new chat's: picking one while a chat is open starts a new one
  if (!state.current || state.streaming) return;
  state.current = null;
  rememberChat(null);
  renderConversation();
  renderChatList();
  setStatus(`The next message starts a new chat on ${ui.modelSelect.value}.`);
});
ui.renameChat.addEventListener("click", startRename);
ui.renameCancel.addEventListener("click", endRename);
ui.renameForm.addEventListener("submit", (event) => {
  event.preventDefault();
  saveRename();
});
ui.renameInput.addEventListener("keydown", (event) => {
  if (event.key === "Escape") endRename();
});
ui.deleteChat.addEventListener("click", () => deleteCurrent());
ui.noticeClose.addEventListener("click", hideNotice);

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    if (!state.streaming) send();
  }
});
ui.message.addEventListener("input", autosize);
ui.stop.addEventListener("click", () => stopReply());
ui.messages.addEventListener("click", (event) => {
  const button = event.target.closest?.("button.copy-code");
  if (button) copyCode(button);
});

// back online after an outage that outlasted the resumes: the reply went on without the
// page (SPEC 11), so show the chat as the server has it, following a reply still streaming
window.addEventListener("online", () => {
  if (!state.api || !state.current || state.streaming) return;
  hideNotice();
  resync(state.current.chat_id);
});

// a `#token=` (or `#chat=`) link opened in a tab that already shows the page
window.addEventListener("hashchange", () => {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.has("token")) {
    if (state.streaming) state.streaming.controller.abort();
    sessionStorage.removeItem(CHAT_KEY);
    state.current = null;
    hideNotice();
    setStatus("");
    start();
  } else if (params.get("chat") && state.api && !state.streaming) {
    openChat(params.get("chat")).catch(report);
  }
});

function start() {
  const fromHash = tokenFromHash();
  const token = fromHash.token || sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    showSignin("");
    return;
  }
  signIn(token, fromHash.chat).catch((err) => {
    if (err instanceof ApiError && err.code === "UNAUTHORIZED") {
      signOut(err.message);
    } else if (state.api) {
      report(err);
    } else {
      // the server is unreachable or failing: keep the token, a reload tries again
      showSignin(err instanceof ApiError ? err.message : describe("INTERNAL_ERROR", "", 500));
    }
  });
}

start();
