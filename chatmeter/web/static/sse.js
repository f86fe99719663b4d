// Server-sent events read from a fetch() body. EventSource cannot POST, so the page
// parses the stream itself: `id:` and `data:` fields, `:` comments, a blank line ends
// an event (https://html.spec.whatwg.org/multipage/server-sent-events.html).

/** Split text into complete lines; returns [lines, the unfinished rest]. */
export function splitLines(text) {
  const lines = text.split(/\r\n|\r|\n/);
  const rest = lines.pop();
  return [lines, rest];
}

/** Each event of `body` (a ReadableStream of bytes), in order, as `{id, data}`: `data` is
 *  its parsed JSON, `id` the last event id seen (a string, "" before any; SPEC 11 resumes
 *  after it). The reader is cancelled when the caller stops early (break, throw, return). */
export async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  let data = [];
  let id = "";
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        finished = true;
        pending += decoder.decode();
      } else {
        pending += decoder.decode(value, { stream: true });
      }
      const [lines, rest] = splitLines(pending);
      pending = rest;
      if (finished && rest) lines.push(rest, "");
      for (const line of lines) {
        if (line === "") {
          if (data.length) {
            const text = data.join("\n");
            data = [];
            yield { id, data: JSON.parse(text) };
          }
          continue;
        }
        if (line.startsWith(":")) continue; // a comment: `: ping`
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") data.push(value);
        else if (field === "id" && !value.includes("\0")) id = value;
      }
      if (finished) return;
    }
  } finally {
    if (!finished) reader.cancel().catch(() => {});
    try {
      reader.releaseLock();
    } catch {
      // a read still pending on an errored stream: nothing left to release
    }
  }
}
