// duomo web page: text or example-image search over the server's index, and (when the server has BEiT-3 task
// models) questions and captions about an image, (with a generator) images created from a prompt, and (with a
// chat model) a conversation about an image, streamed.
// No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { authRequired: false, objectUrls: [] };

function apiKey() {
  return $("api-key").value.trim() || localStorage.getItem("duomo-api-key") || "";
}

function headers() {
  const key = apiKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = "status" + (kind ? " " + kind : "");
  el.setAttribute("role", kind === "error" ? "alert" : "status");
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return "HTTP " + response.status + " " + response.statusText;
}

async function call(url, options) {
  let response;
  try {
    response = await fetch(url, Object.assign({ headers: headers() }, options || {}));
  } catch (err) {
    throw new Error("cannot reach the server (" + err.message + ")");
  }
  if (!response.ok) {
    const message = await errorMessage(response);
    if (response.status === 401) $("auth").hidden = false;
    throw new Error(message);
  }
  return response.json();
}

function clearResults() {
  state.objectUrls.forEach((u) => URL.revokeObjectURL(u));
  state.objectUrls = [];
  $("results").replaceChildren();
}

async function setImage(img, url) {
  if (!state.authRequired) { img.src = url; return; }
  // <img src> cannot send an Authorization header: fetch the bytes and show a blob URL instead.
  try {
    const response = await fetch(url, { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const objectUrl = URL.createObjectURL(await response.blob());
    state.objectUrls.push(objectUrl);
    img.src = objectUrl;
  } catch (err) {
    img.alt = "cannot load: " + err.message;
  }
}

function render(data, what) {
  clearResults();
  const results = data.results || [];
  if (results.length === 0) {
    setStatus(data.index_size === 0
      ? "The index is empty: add images with `duomo index DIR`, then search again."
      : t("noResults", {what}), "empty");
    return;
  }
  setStatus(t("results", {n: results.length, what, total: data.index_size}));
  for (const hit of results) {
    const card = document.createElement("figure");
    card.className = "card";
    card.dataset.testid = "result";
    const img = document.createElement("img");
    img.loading = "lazy";
    const name = hit.path.split(/[\\/]/).pop();
    img.alt = name;
    img.title = hit.path;
    setImage(img, hit.url);
    const caption = document.createElement("figcaption");
    const nameEl = document.createElement("span");
    nameEl.className = "name";
    nameEl.textContent = name;
    const scoreEl = document.createElement("span");
    scoreEl.className = "score";
    scoreEl.textContent = hit.score.toFixed(3);
    caption.append(nameEl, scoreEl);
    card.append(img, caption);
    $("results").append(card);
  }
}

function busy(on) {
  $("search-button").disabled = on;
  if (on) setStatus(t("searching"));
}

function hidePreview() {
  const preview = $("query-preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  preview.hidden = true;
}

async function searchText(query) {
  hidePreview();
  if (!query.trim()) { setStatus(t("typeSomething"), "empty"); return; }
  busy(true);
  try {
    const url = "/search?" + new URLSearchParams({ q: query, k: $("k").value });
    render(await call(url), "“" + query + "”");
  } catch (err) {
    clearResults();
    setStatus(err.message, "error");
  } finally {
    busy(false);
  }
}

async function searchImage(file) {
  if (!file) return;
  hidePreview();
  if (file.type && !file.type.startsWith("image/")) {
    clearResults();
    setStatus(file.name + " is not an image (" + file.type + "); choose a JPEG, PNG, GIF or WebP file.", "error");
    return;
  }
  const preview = $("query-preview");
  preview.onerror = hidePreview; // a file the browser cannot show: no broken-image icon
  preview.src = URL.createObjectURL(file);
  preview.alt = "query: " + file.name;
  preview.hidden = false;
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("k", $("k").value);
  busy(true);
  try {
    render(await call("/search", { method: "POST", body: form }), "image " + file.name);
  } catch (err) {
    clearResults();
    setStatus(err.message, "error");
  } finally {
    busy(false);
  }
}

function showTaskResult(text, kind) {
  const el = $("task-result");
  el.textContent = text;
  el.className = "task-result" + (kind ? " " + kind : "");
  el.setAttribute("role", kind === "error" ? "alert" : "status");
}

function chooseTaskImage() {
  const preview = $("task-preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  const file = $("task-file").files[0];
  preview.hidden = !file;
  if (!file) { preview.removeAttribute("src"); return; }
  preview.onerror = () => { preview.hidden = true; };
  preview.src = URL.createObjectURL(file);
  preview.alt = file.name;
  showTaskResult("", "");
}

async function runTask(kind) {
  const file = $("task-file").files[0];
  if (!file) { showTaskResult("Choose an image first.", "error"); return; }
  const form = new FormData();
  form.append("image", file, file.name);
  if (kind === "vqa") {
    const question = $("question").value;
    if (!question.trim()) { showTaskResult("Type a question about the image.", "error"); return; }
    form.append("question", question);
  }
  $("ask-button").disabled = $("caption-button").disabled = true;
  showTaskResult(kind === "vqa" ? "thinking…" : "captioning…", "");
  try {
    const data = await call("/" + kind, { method: "POST", body: form });
    showTaskResult(kind === "vqa" ? data.answer + " (" + data.score.toFixed(2) + ")" : data.caption, "done");
  } catch (err) {
    showTaskResult(err.message, "error");
  } finally {
    $("ask-button").disabled = $("caption-button").disabled = false;
  }
}

// --- create: images from a prompt (POST /v1/images/generations), one request per image so each appears as
// soon as it is done; the server steps them together. Clicking one searches the index with it.
function pngBlob(b64) {
  const bytes = atob(b64);
  const buffer = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) buffer[i] = bytes.charCodeAt(i);
  return new Blob([buffer], { type: "image/png" });
}

function showCreateStatus(text, kind) {
  const el = $("create-status");
  el.textContent = text;
  el.className = "task-result" + (kind ? " " + kind : "");
  el.setAttribute("role", kind === "error" ? "alert" : "status");
}

function addCreated(blob, prompt, index) {
  const url = URL.createObjectURL(blob);
  state.objectUrls.push(url);
  const card = document.createElement("figure");
  card.className = "card";
  card.dataset.testid = "created-image";
  const img = document.createElement("img");
  img.src = url;
  img.alt = prompt + " #" + (index + 1);
  img.title = "search the index with this image";
  img.tabIndex = 0;
  const file = new File([blob], "created-" + (index + 1) + ".png", { type: "image/png" });
  img.addEventListener("click", () => searchImage(file));
  img.addEventListener("keydown", (event) => { if (event.key === "Enter") searchImage(file); });
  card.append(img);
  $("created").append(card);
}

async function create(prompt) {
  if (!prompt.trim()) { showCreateStatus("Type what to create.", "error"); return; }
  const n = Number($("create-n").value);
  const seed = Math.floor(Math.random() * 1e9);
  $("created").replaceChildren();
  $("create-button").disabled = true;
  showCreateStatus("creating " + n + "…", "");
  let done = 0;
  let failure = null;
  const one = async (i) => {
    try {
      const body = JSON.stringify({ prompt, n: 1, seed: seed + i, response_format: "b64_json" });
      const data = await call("/v1/images/generations", {
        method: "POST", body, headers: Object.assign({ "Content-Type": "application/json" }, headers()),
      });
      addCreated(pngBlob(data.data[0].b64_json), prompt, i);
      done += 1;
      if (!failure) showCreateStatus(done + " of " + n + " created", done === n ? "done" : "");
    } catch (err) {
      failure = err;
      showCreateStatus(err.message, "error");
    }
  };
  await Promise.all(Array.from({ length: n }, (_, i) => one(i)));
  $("create-button").disabled = false;
  if (!failure) showCreateStatus(n + " created; click one to search with it", "done");
}

// --- chat: a conversation about an image (POST /v1/chat/completions, stream: true); the reply appears piece
// by piece as the server decodes it. The image goes with the first message, as a data: URL.
const chat = { messages: [], image: null };

function chatLine(role, text) {
  const line = document.createElement("p");
  line.className = "chat-" + role;
  line.dataset.testid = "chat-" + role;
  line.textContent = text;
  $("chat-log").append(line);
  return line;
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read " + file.name));
    reader.readAsDataURL(file);
  });
}

function resetChat() {
  chat.messages = [];
  $("chat-log").replaceChildren();
}

async function chooseChatImage() {
  const file = $("chat-file").files[0];
  if (!file) return;
  chat.image = await readDataUrl(file);
  const preview = $("chat-preview");
  preview.src = chat.image;
  preview.alt = file.name;
  preview.hidden = false;
  resetChat();
}

async function sendChat(text) {
  if (!text.trim()) return;
  let content = text;
  if (chat.messages.length === 0 && chat.image) {
    content = [{ type: "image_url", image_url: { url: chat.image } }, { type: "text", text }];
  }
  chat.messages.push({ role: "user", content });
  chatLine("user", text);
  const reply = chatLine("assistant", "");
  $("chat-button").disabled = true;
  $("chat-input").value = "";
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: Object.assign({ "Content-Type": "application/json" }, headers()),
      body: JSON.stringify({ model: "default", messages: chat.messages, stream: true, temperature: 0, max_tokens: 128 }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data:")) continue;
        const data = event.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (piece) { answer += piece; reply.textContent = answer; }
      }
    }
    chat.messages.push({ role: "assistant", content: answer });
    reply.classList.add("done");
  } catch (err) {
    chat.messages.pop();
    reply.textContent = err.message;
    reply.className = "chat-error";
    reply.setAttribute("role", "alert");
  }
  $("chat-button").disabled = false;
}

async function loadInfo() {
  try {
    const info = await call("/healthz");
    state.authRequired = info.auth_required;
    $("auth").hidden = !info.auth_required;
    const index = info.index || {};
    const indexText = index.ready
      ? t("indexed", {n: index.size})
      : "no index (" + (index.error || "search unavailable") + ")";
    $("server-info").textContent = t("serverInfo", {model: info.model, index: indexText});
    const tasks = info.tasks || {};
    $("tasks").hidden = !(tasks.vqa || tasks.caption);
    $("question").hidden = $("ask-button").hidden = !tasks.vqa;
    $("caption-button").hidden = !tasks.caption;
    $("create").hidden = !info.generator;
    $("chat").hidden = !info.chat;
    if (!index.ready) setStatus("Search is unavailable: " + (index.error || "no index"), "error");
    else if (index.size === 0) setStatus("The index is empty: add images with `duomo index DIR`.", "empty");
  } catch (err) {
    $("server-info").textContent = "";
    setStatus("Cannot read the server status: " + err.message, "error");
  }
}

function setup() {
  const saved = localStorage.getItem("duomo-api-key");
  if (saved) $("api-key").value = saved;
  $("api-key").addEventListener("change", () => localStorage.setItem("duomo-api-key", $("api-key").value.trim()));
  $("text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    searchText($("q").value);
  });
  $("task-file").addEventListener("change", chooseTaskImage);
  $("task-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runTask("vqa");
  });
  $("caption-button").addEventListener("click", () => runTask("caption"));
  $("chat-file").addEventListener("change", chooseChatImage);
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sendChat($("chat-input").value);
  });
  $("chat-reset").addEventListener("click", resetChat);
  $("create-form").addEventListener("submit", (event) => {
    event.preventDefault();
    create($("create-prompt").value);
  });
  $("file").addEventListener("change", () => {
    searchImage($("file").files[0]);
    $("file").value = "";
  });
  const zone = $("dropzone");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add("dragover"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("dragover"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = event.dataTransfer ? event.dataTransfer.files : [];
    if (files.length) searchImage(files[0]);
    else setStatus("Drop an image file (not a link or text).", "error");
  });
  // a drop outside the zone must not navigate away from the page
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file").click(); }
  });
  loadInfo();
}

setup();
