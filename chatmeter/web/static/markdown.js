// Model output rendered as Markdown, safely. The model's text is untrusted:
// - raw HTML in it is shown as text (escaped), never parsed as markup;
// - images become links (no remote load happens without a click);
// - the HTML marked produces goes through DOMPurify (HTML profile only: no SVG, no MathML,
//   no forms, no frames, no event handlers) before it reaches the page;
// - links keep only http(s) and mailto addresses and open in a new tab without an opener.
// The page's CSP (script-src 'self', img-src 'self') stands behind all of this.

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight.min.js";

const SAFE_HREF = /^(https?:|mailto:)/i;
const HIGHLIGHT_AUTO_MAX = 4000; // longer blocks without a language stay plain (speed)

const escapeHtml = (text) =>
  text
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&#39;");

const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    // raw HTML written by the model is shown as the text it is
    html({ text }) {
      return escapeHtml(text);
    },
    // an image is a link to it, so nothing is fetched from elsewhere by just reading
    image({ href, text }) {
      const label = escapeHtml(text || "image");
      if (!SAFE_HREF.test(href || "")) return label;
      return `<a href="${escapeHtml(href)}" class="image-link">🖼 ${label}</a>`;
    },
  },
});

const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "img", "form", "input", "button", "textarea", "select", "iframe"],
  FORBID_ATTR: ["style", "id", "name"],
  ALLOW_DATA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

function hardenLinks(root) {
  for (const link of root.querySelectorAll("a")) {
    const href = link.getAttribute("href") || "";
    if (!SAFE_HREF.test(href.trim())) {
      link.removeAttribute("href");
      continue;
    }
    link.target = "_blank";
    link.rel = "noopener noreferrer";
  }
}

function highlight(code) {
  const text = code.textContent;
  const match = /(?:^|\s)language-([\w+#.-]+)/.exec(code.className);
  const language = match && hljs.getLanguage(match[1]) ? match[1] : null;
  let html = null;
  if (language) {
    html = hljs.highlight(text, { language, ignoreIllegals: true }).value;
  } else if (text.length <= HIGHLIGHT_AUTO_MAX) {
    html = hljs.highlightAuto(text).value;
  }
  if (html === null) return;
  // highlight.js escapes the code itself; purified anyway, as every HTML string here is
  code.replaceChildren(DOMPurify.sanitize(html, PURIFY));
  code.classList.add("hljs");
}

/** A fenced block with its language and a Copy button (handled by `copyCode`). */
function decorateCode(pre) {
  const code = pre.querySelector("code");
  if (!code) return;
  const match = /(?:^|\s)language-([\w+#.-]+)/.exec(code.className);
  highlight(code);
  const block = document.createElement("div");
  block.className = "code-block";
  const head = document.createElement("div");
  head.className = "code-head";
  const lang = document.createElement("span");
  lang.className = "code-lang";
  lang.textContent = match ? match[1] : "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-code ghost";
  copy.textContent = "Copy";
  head.append(lang, copy);
  pre.replaceWith(block);
  block.append(head, pre);
}

function wrapTables(root) {
  for (const table of root.querySelectorAll("table")) {
    const scroller = document.createElement("div");
    scroller.className = "table-scroll";
    table.replaceWith(scroller);
    scroller.append(table);
  }
}

/** Markdown text as a sanitized DocumentFragment. */
export function renderMarkdown(text) {
  const html = marked.parse(text || "");
  const fragment = DOMPurify.sanitize(html, PURIFY);
  hardenLinks(fragment);
  for (const pre of fragment.querySelectorAll("pre")) decorateCode(pre);
  wrapTables(fragment);
  // the newlines marked puts between blocks: without them a plain-text reply's text
  // content is exactly what the model wrote
  for (const node of [...fragment.childNodes]) {
    if (node.nodeType === Node.TEXT_NODE && !node.data.trim()) node.remove();
  }
  return fragment;
}

/** Put a rendered body's content in place of its old one. */
export function showMarkdown(body, text) {
  body.replaceChildren(renderMarkdown(text));
  body.dataset.markdown = "true";
}

/** A click on a code block's Copy button copies its code (wired once, by delegation). */
export async function copyCode(button) {
  const code = button.closest(".code-block")?.querySelector("pre code");
  if (!code) return;
  const text = code.textContent;
  let copied = false;
  try {
    await navigator.clipboard.writeText(text);
    copied = true;
  } catch {
    copied = copyBySelection(code);
  }
  button.textContent = copied ? "Copied" : "Copy failed";
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
}

function copyBySelection(node) {
  const range = document.createRange();
  range.selectNodeContents(node);
  const selection = getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch {
    ok = false;
  }
  selection.removeAllRanges();
  return ok;
}
