// lmforge chat page: talks to the server's OpenAI-compatible API and streams replies.
// Plain browser JavaScript, no build step. The conversation lives in `history`;
// each reply streams from POST /v1/chat/completions as server-sent events.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let controller = null; // AbortController of the reply being streamed, if any
let modelId = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text; // never innerHTML: model output is untrusted text
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) { $("model").textContent = `(${await errorText(r)})`; return; }
    const card = (await r.json()).data[0];
    modelId = card.id;
    const context = card.max_model_len ? `context ${card.max_model_len}` : "unbounded context";
    $("model").textContent = `${card.id} · ${context}`;
  } catch (e) {
    $("model").textContent = "(server unreachable)";
  }
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    messages, stream: true,
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value),
  };
  const maxTokens = parseInt($("max_tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens; // unset: the server fills what the context leaves
  if (modelId) body.model = modelId;
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = parseInt(seed, 10);
  return body;
}

// Reads `data: ...` events from the response body, calling onEvent with each parsed JSON payload.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        onEvent(JSON.parse(payload));
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  $("status").textContent = "generating…";
  let reply = "";
  let finish = null;
  let failed = false;
  // Draw at most once per animation frame: a fast model streams hundreds of tokens a second, and
  // redrawing (and scrolling) on every token would keep the page too busy to answer the Stop button.
  let drawPending = false;
  const draw = () => {
    drawPending = false;
    bubble.textContent = reply;
    bubble.scrollIntoView({ block: "end" });
  };
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorText(r));
    await readEvents(r, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        if (!drawPending) { drawPending = true; requestAnimationFrame(draw); }
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    $("status").textContent = finish === "length" ? "stopped at max tokens" : "done";
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      failed = true;
      addMessage("error", e.message);
      $("status").textContent = "error";
    }
  } finally {
    draw(); // the whole reply, whatever frame was pending
    bubble.classList.remove("streaming");
    bubble.dataset.finished = finish || (failed ? "error" : "stopped");
    if (failed && !reply) {
      bubble.remove();
      history.pop(); // the turn failed: send it again rather than keep a question without an answer
    } else {
      history.push({ role: "assistant", content: reply });
    }
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("conversation").replaceChildren();
  $("status").textContent = "";
});
for (const id of ["temperature", "top_p"]) {
  $(id).addEventListener("input", () => { $(`${id}-value`).textContent = $(id).value; });
}
$("api_key").addEventListener("change", () => {
  sessionStorage.setItem("lmforge_api_key", $("api_key").value);
  loadModel();
});
$("api_key").value = sessionStorage.getItem("lmforge_api_key") || "";
loadModel();
