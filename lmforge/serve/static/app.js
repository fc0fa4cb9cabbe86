// The lmforge web chat: streams answers from /v1/chat/completions (server-sent events read from a fetch
// ReadableStream) and wraps each generated token in a span carrying its probability and top alternatives.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return response.statusText;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(`${response.status}: ${await errorText(response)}`);
    const models = (await response.json()).data || [];
    state.model = models.length ? models[0].id : null;
    $("model").textContent = state.model ? `model: ${state.model}` : "the server lists no model";
  } catch (e) {
    $("model").textContent = "model list unavailable (" + e.message + ")";
  }
}

// ---------------------------------------------------------------- rendering

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = "message " + role;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role === "user" ? "You" : "Model";
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  item.append(who, body);
  $("log").append(item);
  item.scrollIntoView({ block: "end" });
  return body;
}

const percent = (logprob) => (100 * Math.exp(logprob)).toFixed(logprob > -4.6 ? 1 : 3) + "%";
const visible = (token) => JSON.stringify(token).slice(1, -1);  // shows spaces and newlines as \n

// One span per token: data-prob is its probability, data-tip the text the hover tooltip shows.
function tokenSpan(text, entries) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  const p = Math.exp(entries.reduce((sum, e) => sum + e.logprob, 0));
  span.dataset.prob = p.toFixed(6);
  span.style.setProperty("--p", p.toFixed(3));
  span.dataset.tip = entries.map((e) => {
    const alts = (e.top_logprobs || []).map((t) => `  ${visible(t.token)}  ${percent(t.logprob)}`).join("\n");
    return `"${visible(e.token)}"  p = ${percent(e.logprob)}` + (alts ? "\ntop alternatives:\n" + alts : "");
  }).join("\n\n");
  return span;
}

// A streamed delta becomes token spans when its logprobs line up with its text, else one span for the piece.
function appendDelta(body, content, entries) {
  if (!entries || !entries.length) {
    body.append(document.createTextNode(content));
  } else if (entries.length > 1 && entries.map((e) => e.token).join("") === content) {
    for (const e of entries) body.append(tokenSpan(e.token, [e]));
  } else {
    body.append(tokenSpan(content, entries));
  }
}

// ---------------------------------------------------------------- the tooltip

function showTip(span) {
  const tip = $("tip");
  tip.textContent = span.dataset.tip;
  tip.hidden = false;
  const r = span.getBoundingClientRect();
  const left = Math.min(window.scrollX + r.left, window.scrollX + document.documentElement.clientWidth - tip.offsetWidth - 8);
  tip.style.left = Math.max(8, left) + "px";
  tip.style.top = window.scrollY + r.bottom + 6 + "px";
}

document.addEventListener("mouseover", (event) => {
  const span = event.target.closest && event.target.closest(".tok");
  if (span) showTip(span); else $("tip").hidden = true;
});

// ---------------------------------------------------------------- server-sent events

// Yields the JSON payload of each `data:` line of an SSE response body until `data: [DONE]`.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/\r$/, "");
      buffer = buffer.slice(cut + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const body = addMessage("assistant", "");
  body.classList.add("streaming");
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.history);
  const request = {
    model: state.model || "default", messages, stream: true,
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
    logprobs: true, top_logprobs: 5, stream_options: { include_usage: true },
  };
  state.controller = new AbortController();
  $("stop").disabled = false;
  $("send").disabled = true;
  setStatus("generating…");
  let answer = "", usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(`${response.status}: ${await errorText(response)}`);
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const content = (choice.delta && choice.delta.content) || "";
        if (!content) continue;
        answer += content;
        appendDelta(body, content, choice.logprobs && choice.logprobs.content);
        body.parentElement.scrollIntoView({ block: "end" });
      }
    }
    state.history.push({ role: "assistant", content: answer });
    setStatus(usage ? `${usage.completion_tokens} tokens (prompt ${usage.prompt_tokens})` : "");
  } catch (e) {
    if (e.name === "AbortError") {
      state.history.push({ role: "assistant", content: answer });
      setStatus("stopped");
    } else {
      state.history.pop();
      body.parentElement.classList.add("failed");
      body.textContent = "no answer: " + e.message;
      setStatus("error: " + e.message, true);
    }
  } finally {
    body.classList.remove("streaming");
    state.controller = null;
    $("stop").disabled = true;
    $("send").disabled = false;
    $("input").focus();
  }
}

// ---------------------------------------------------------------- controls

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("reset").addEventListener("click", () => {
  state.history = [];
  $("log").replaceChildren();
  setStatus("new conversation");
  $("input").focus();
});
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
$("api-key").addEventListener("change", loadModel);
$("show-probs").addEventListener("change", () => document.body.classList.toggle("plain", !$("show-probs").checked));

loadModel();
$("input").focus();
