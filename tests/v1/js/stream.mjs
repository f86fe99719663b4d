// Streams one completion through chatmeter with the official OpenAI JS SDK and prints
// what the client saw as JSON: the text, the finish reason, the usage, the chunk ids.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.CHATMETER_V1,
  apiKey: process.env.CHATMETER_KEY,
  maxRetries: 0,
});
const stream = await client.chat.completions.create({
  model: process.argv[2],
  messages: [
    { role: "system", content: "Be brief." },
    { role: "user", content: "Say hello from JavaScript." },
  ],
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let finish = null;
let usage = null;
const ids = new Set();
for await (const chunk of stream) {
  ids.add(chunk.id);
  if (chunk.choices.length) {
    text += chunk.choices[0].delta.content ?? "";
    finish = chunk.choices[0].finish_reason ?? finish;
  }
  if (chunk.usage) usage = chunk.usage;
}
let refused = null;
try {
  await new OpenAI({ baseURL: process.env.CHATMETER_V1, apiKey: "cm-wrong", maxRetries: 0 })
    .chat.completions.create({ model: process.argv[2], messages: [{ role: "user", content: "x" }] });
} catch (error) {
  refused = { status: error.status, code: error.code };
}
console.log(JSON.stringify({ text, finish, usage, ids: [...ids], refused }));
