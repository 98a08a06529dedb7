// AT2 Cited Chat: plain JS, no build step. Streams answers from POST /api/chat (server-sent events over fetch),
// then turns the final Attribution into citation marks, a ranked source list and highlighted documents.
// Conversations are kept in localStorage; documents can be uploaded, listed and removed (/api/documents).
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), empty: $("empty-state"), suggestions: $("suggestions"),
  form: $("composer"), box: document.querySelector(".composer-box"), question: $("question"), send: $("send"),
  stop: $("stop"), newChat: $("new-chat"), error: $("composer-error"), count: $("question-count"),
  statusDocs: $("status-docs"), statusModel: $("status-model"), banner: $("status-banner"),
  sources: $("sources"), sourcesSub: $("sources-sub"),
  docCard: $("doc-card"), docTitle: $("doc-title"), docMeta: $("doc-meta"), docClaim: $("doc-claim"),
  docView: $("doc-view"), docClose: $("doc-close"), docScrim: $("doc-scrim"),
  preview: $("preview"), theme: $("theme"),
  chatsButton: $("chats-button"), chatsPanel: $("chats-panel"), chatsList: $("chats-list"),
  docsCard: $("docs-card"), docsList: $("docs-list"), docsSub: $("docs-sub"), fileInput: $("file-input"),
  uploadButton: $("upload-button"), dropZone: $("drop-zone"), uploadMsg: $("upload-message"), dropOverlay: $("drop-overlay"),
};

const STORE_CHATS = "at2-chat:chats", STORE_CURRENT = "at2-chat:current", STORE_THEME = "at2-chat:theme";
const STORE_TOKEN = "at2-chat:token";  // sessionStorage: this tab only, gone when it closes
const MAX_CHATS = 30;

const state = {
  history: [],        // [{role, content, answer?}] of completed turns (answer: index into answers), sent with every question
  answers: [],        // per assistant message: {attribution, retrieval, el, seconds, historyStart, question, userEl}
  selected: null,     // index into answers
  busy: false,
  current: null,      // the answer being streamed: {controller, streamId, stopped, gen}
  gen: 0,             // bumped by New chat / switching chats: a stream of an older generation is dropped
  chatId: null,       // the conversation on screen (its key in localStorage)
  online: null,       // did the last /api/status answer?
  // the server's limits, from /api/status (null until it answers; the server checks them anyway)
  limits: { question: null, history: null, historyChars: null, uploadBytes: null, uploadFiles: null, uploadTypes: null },
  docCache: new Map(), // doc_id -> whole-document JSON (GET /api/documents/{id}) or null when gone
};

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
const pct = (x) => `${Math.round(x * 100)}%`;
const num = (n) => n.toLocaleString("en-US");
const chars = (s) => [...s].length;  // code points, as the server (Python's len) counts them
const size = (n) => n >= 1048576 ? `${(n / 1048576).toFixed(1).replace(/\.0$/, "")} MB` : n >= 1024 ? `${Math.round(n / 1024)} KB` : `${n} bytes`;

// ---------------------------------------------------------------- access token (a server started with --auth)
// A first visit may carry the token in the address's fragment (#token=…): it is kept for this tab only and removed
// from the address at once (a fragment never reaches the server, its logs or a Referer). Otherwise the page asks.
(function takeTokenFromAddress() {
  const m = location.hash.match(/(?:^#|&)token=([^&]*)/);
  if (!m) return;
  try { sessionStorage.setItem(STORE_TOKEN, decodeURIComponent(m[1])); } catch (_) { /* storage off: the page asks */ }
  history.replaceState(null, "", location.pathname + location.search);
})();

function token() { try { return sessionStorage.getItem(STORE_TOKEN); } catch (_) { return null; } }

// fetch for the API: sends the token when there is one; a 401 opens the token prompt
async function api(url, opts = {}) {
  const headers = new Headers(opts.headers || {});
  const sent = token();
  if (sent) headers.set("Authorization", `Bearer ${sent}`);
  const res = await fetch(url, { ...opts, headers });
  if (res.status === 401) askToken(sent);
  return res;
}

function askToken(rejected) {
  const form = $("auth-form");
  if (rejected && rejected === token()) { try { sessionStorage.removeItem(STORE_TOKEN); } catch (_) { /* */ } }
  if (!form.hidden) return;
  $("auth-message").textContent = rejected
    ? "That access token was not accepted. Enter the token you were given."
    : "This server keeps a workspace per person. Enter the access token you were given.";
  form.hidden = false;
  $("auth-token").value = "";
  $("auth-token").focus();
}

$("auth-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("auth-token").value.trim();
  if (!value) return;
  try { sessionStorage.setItem(STORE_TOKEN, value); } catch (_) { /* */ }
  $("auth-form").hidden = true;
  loadStatus();
  loadDocuments();
});

// ---------------------------------------------------------------- theme
function applyTheme() {
  const pref = localStorage.getItem(STORE_THEME) || "auto";
  const dark = pref === "dark" || (pref === "auto" && window.matchMedia("(prefers-color-scheme: dark)").matches);
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  els.theme.textContent = { auto: "◐ Auto", dark: "☾ Dark", light: "☀ Light" }[pref];
  els.theme.title = `Theme: ${pref} (click to change)`;
}
els.theme.addEventListener("click", () => {
  const order = ["auto", "dark", "light"];
  const pref = localStorage.getItem(STORE_THEME) || "auto";
  localStorage.setItem(STORE_THEME, order[(order.indexOf(pref) + 1) % order.length]);
  applyTheme();
});
window.matchMedia("(prefers-color-scheme: dark)").addEventListener?.("change", applyTheme);

// ---------------------------------------------------------------- status (polled: the badge follows the server)
async function loadStatus() {
  try {
    const res = await api("/api/status", { cache: "no-store" });
    if (res.status === 401) {
      state.online = true;
      els.statusDocs.className = "pill warn";
      els.statusDocs.innerHTML = `<span class="dot"></span>Access token needed`;
      els.statusDocs.title = "This server has per-user workspaces: enter your access token.";
      return;
    }
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    renderStatus(await res.json());
    state.online = true;
  } catch (e) {
    state.online = false;
    els.statusDocs.className = "pill error";
    els.statusDocs.innerHTML = `<span class="dot"></span>Server unreachable`;
    els.statusDocs.title = `The server did not answer (${e.message}); retrying every few seconds.`;
  }
}

function renderStatus(s) {
  state.limits = {
    question: s.max_question_chars ?? null, history: s.max_history ?? null, historyChars: s.max_history_chars ?? null,
    uploadBytes: s.max_upload_bytes ?? null, uploadFiles: s.max_upload_files ?? null, uploadTypes: s.upload_types ?? null,
  };
  updateCount();
  if (s.error) {
    els.statusDocs.className = "pill error";
    els.statusDocs.innerHTML = `<span class="dot"></span>No documents`;
  } else {
    els.statusDocs.className = s.problems.length ? "pill warn" : "pill";
    const skipped = s.problems.length ? ` · ${s.problems.length} skipped` : "";
    els.statusDocs.innerHTML = `<span class="dot"></span>${s.num_files} document${s.num_files === 1 ? "" : "s"} indexed${skipped}`;
  }
  els.statusDocs.title = `Folder: ${s.folder}\nPassages: ${s.num_passages} · top-${s.top_k} retrieval (BM25)`;
  if (s.model) {
    els.statusModel.hidden = false;
    els.statusModel.textContent = s.model.split("/").pop() + (s.estimator_trained === false ? " · untrained estimator" : "");
    els.statusModel.title = `Model: ${s.model}${s.model_loaded ? "" : " (loads on the first question)"}\n${s.estimator || ""}`;
  }
  const parts = [];
  if (s.error) parts.push(`<strong>${esc(s.error)}</strong>`);
  if (s.problems.length) {
    const items = s.problems.map((p) => `<li><code>${esc(p.file)}</code> — ${esc(p.error)}</li>`).join("");
    parts.push(`${s.problems.length === 1 ? "One file" : s.problems.length + " files"} in <code>${esc(s.folder)}</code> could not be indexed; the other files are searchable:<ul>${items}</ul>`);
  }
  const banner = parts.join("");
  if (els.banner.innerHTML !== banner) {
    els.banner.hidden = parts.length === 0;
    els.banner.className = s.error ? "banner error" : "banner";
    els.banner.innerHTML = banner;
  }
  const suggestions = JSON.stringify(s.suggestions || []);
  if (els.suggestions.dataset.list !== suggestions) {
    els.suggestions.dataset.list = suggestions;
    els.suggestions.innerHTML = "";
    for (const q of s.suggestions || []) {
      const b = document.createElement("button");
      b.type = "button"; b.className = "suggestion"; b.textContent = q;
      b.addEventListener("click", () => { els.question.value = q; autosize(); els.question.focus(); });
      els.suggestions.appendChild(b);
    }
  }
}

// ---------------------------------------------------------------- composer
function showError(msg) {
  els.error.textContent = msg;
  els.error.hidden = !msg;
  els.box.classList.toggle("invalid", !!msg);
}

// the same words as the server's 413 `question_too_long`; null when the question is within the limit
function tooLongMessage(question) {
  const limit = state.limits.question, n = chars(question);
  if (limit == null || n <= limit) return null;
  return `Your question is ${num(n)} characters long; the limit is ${num(limit)}. Please shorten it and send it again.`;
}

// "1,234 / 2,000" once the question nears the limit; red when over it
function updateCount() {
  const limit = state.limits.question, n = chars(els.question.value.trim());
  const show = limit != null && n >= 0.8 * limit;
  els.count.hidden = !show;
  els.count.textContent = show ? `${num(n)} / ${num(limit)} characters` : "";
  els.count.classList.toggle("over", show && n > limit);
}

// the most recent turns within the server's limits on messages and characters (the server refuses more);
// always a suffix of state.history, so turn i of what was sent is state.history[state.history.length - sent.length + i]
function historyToSend() {
  const { history: most, historyChars } = state.limits;
  let turns = most == null ? state.history.slice() : state.history.slice(state.history.length - Math.min(most, state.history.length));
  if (historyChars != null) {
    let total = turns.reduce((sum, t) => sum + chars(t.content), 0);
    while (turns.length && total > historyChars) total -= chars(turns.shift().content);
  }
  return turns.map((t) => ({ role: t.role, content: t.content }));
}

function autosize() {
  els.question.style.height = "auto";
  els.question.style.height = Math.min(els.question.scrollHeight, 160) + "px";
}

els.question.addEventListener("input", () => {
  autosize(); updateCount();
  if (!els.error.hidden) showError(els.question.value.trim() ? tooLongMessage(els.question.value.trim()) || "" : els.error.textContent);
});
els.question.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); els.form.requestSubmit(); }
});
els.form.addEventListener("submit", (e) => { e.preventDefault(); ask(els.question.value); });
els.stop.addEventListener("click", stopAnswer);
els.newChat.addEventListener("click", () => newChat());
els.docClose.addEventListener("click", closeDoc);
els.docScrim.addEventListener("click", closeDoc);
document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape") return;
  hidePreview();
  if (!els.chatsPanel.hidden) { els.chatsPanel.hidden = true; els.chatsButton.setAttribute("aria-expanded", "false"); }
  else if (!els.docCard.hidden && document.body.classList.contains("sheet-open")) closeDoc();
});

function setBusy(busy) {
  state.busy = busy;
  els.send.hidden = busy;
  els.stop.hidden = !busy;
  els.stop.disabled = false;
  document.querySelectorAll(".msg-actions [data-action=regenerate]").forEach((b) => { b.disabled = busy; });
}

// Stop: ask the server to end the generation (the answer so far is still attributed); abort when it cannot
async function stopAnswer() {
  const cur = state.current;
  if (!cur) return;
  cur.stopped = true;
  els.stop.disabled = true;
  if (cur.streamId) {
    try {
      const res = await api("/api/chat/stop", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ stream_id: cur.streamId }),
      });
      if (res.ok) return;
    } catch (_) { /* fall through to abort */ }
  }
  cur.controller.abort();
}

// New chat: works during streaming too (the running answer is stopped and dropped)
function newChat() {
  if (state.current) {
    const cur = state.current;
    cur.stopped = true;
    if (cur.streamId) api("/api/chat/stop", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ stream_id: cur.streamId }) }).catch(() => {});
    cur.controller.abort();
  }
  state.gen++;
  resetConversation();
  state.chatId = null;
  localStorage.removeItem(STORE_CURRENT);
  renderChatList();
  els.question.focus();
}

function resetConversation() {
  state.history = []; state.answers = []; state.selected = null; state.current = null;
  els.messages.querySelectorAll(".msg").forEach((m) => m.remove());
  clearRecalled();
  els.empty.hidden = false;
  setBusy(false);
  renderSources(null); closeDoc(); showError("");
}

function addMessage(role, html) {
  els.empty.hidden = true;
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  const who = { user: "You", assistant: "Assistant", error: "Error" }[role];
  el.innerHTML = `<div class="who">${who}</div><div class="bubble">${html}</div>`;
  els.messages.appendChild(el);
  els.messages.scrollTop = els.messages.scrollHeight;
  return el;
}

// the end of the conversation in view: the chat pane scrolls, and on a phone the page does
function scrollToEnd(el) {
  els.messages.scrollTop = els.messages.scrollHeight;
  const last = el || els.messages.lastElementChild;
  if (last) {
    const r = last.getBoundingClientRect();
    if (r.bottom > window.innerHeight) last.scrollIntoView({ block: "end" });
  }
}

async function ask(raw, opts = {}) {
  const question = raw.trim();
  if (!question) { showError("Please type a question before sending."); els.question.focus(); return; }
  const tooLong = tooLongMessage(question);
  if (tooLong) { showError(tooLong); els.question.focus(); return; }
  if (state.busy) return;
  showError("");
  const gen = state.gen;
  const cur = { controller: new AbortController(), streamId: null, stopped: false };
  state.current = cur;
  setBusy(true);
  hidePreview();
  if (!opts.regenerate) { els.question.value = ""; autosize(); updateCount(); }
  const userEl = addMessage("user", esc(question));
  const msg = addMessage("assistant", `<div class="answer-text"><span class="thinking">Searching the documents…</span></div>`);
  msg.classList.add("streaming");
  const textEl = msg.querySelector(".answer-text");
  let streamed = "", retrieval = null, attribution = null, failure = null, seconds = null;
  const history = historyToSend();
  const historyStart = state.history.length - history.length;  // where the sent turns start in state.history
  // the sentences cited so far while the answer streams (`citation` events), shown until the attribution replaces them
  const live = { citations: [], documents: [] };
  Object.assign(cur, { msg, live, historyStart });
  const renderLive = () => {
    textEl.innerHTML = renderMarkdown(streamed, live.citations, citationDecorate(live, state.answers.length, historyStart));
    keepPreview(textEl);
  };

  try {
    const res = await api("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({ question, history, regenerate: !!opts.regenerate }),
      signal: cur.controller.signal,
    });
    if (!res.ok) {
      let body = {};
      try { body = await res.json(); } catch (_) { /* not JSON */ }
      failure = { kind: body.error || `http_${res.status}`, message: body.message || `The server answered ${res.status} ${res.statusText}.` };
    } else {
      await readEvents(res, (event, data) => {
        if (gen !== state.gen) return;
        if (event === "retrieval") {
          retrieval = data; cur.streamId = data.stream_id || null;
          if (cur.stopped && cur.streamId) stopAnswer();  // Stop was pressed before the stream had an id
          textEl.innerHTML = `<span class="thinking">Reading ${data.documents.length} documents…</span>`;
        } else if (event === "status") { textEl.innerHTML = `<span class="thinking">${esc(data.message)}</span>`; }
        else if (event === "token") {
          streamed += data.text;
          renderLive();
          els.messages.scrollTop = els.messages.scrollHeight;
        } else if (event === "citation") {  // a sentence is complete: its marks show now (the same as in the attribution)
          for (const d of data.documents) {
            if (docById(live, d.id)) continue;
            const found = retrieval?.documents.find((r) => r.id === d.id);
            live.documents.push({ index: d.index, id: d.id, title: d.title, metadata: { path: found?.path } });
          }
          live.citations.push(data);
          renderLive();
        } else if (event === "attribution") { attribution = data; }
        else if (event === "done") { seconds = data.seconds; }
        else if (event === "error") { failure = { kind: data.error, message: data.message }; }
      });
      if (!attribution && !failure) failure = { kind: "incomplete", message: "The answer stream ended before the attribution arrived." };
    }
  } catch (e) {
    failure = e.name === "AbortError"
      ? { kind: "stopped", message: "You stopped the answer before it was attributed." }
      : { kind: "network", message: `Could not reach the server: ${e.message}` };
  }
  if (gen !== state.gen) { return; }  // New chat (or another chat) was opened meanwhile: drop this answer

  state.current = null;
  msg.classList.remove("streaming");
  if (failure) {
    msg.remove();
    const err = addMessage("error", `<strong>${esc(errorTitle(failure.kind))}</strong>${esc(failure.message)}`);
    err.dataset.kind = failure.kind;
    // the question was not answered: give it back to the box to edit and resend (unless a new one is being typed)
    if (!els.question.value.trim()) { els.question.value = opts.regenerate ? question : raw; autosize(); updateCount(); }
    scrollToEnd(err);
  } else {
    const idx = state.answers.length;
    msg.id = `answer-${idx + 1}`;
    state.answers.push({ attribution, retrieval, el: msg, seconds, historyStart, question, userEl });
    state.history.push({ role: "user", content: question }, { role: "assistant", content: attribution.answer, answer: idx });
    renderAnswer(idx);
    selectAnswer(idx);
    saveChat();
    scrollToEnd(msg);
    if (els.statusModel.hidden) loadStatus();
  }
  setBusy(false);
  refreshActions();
  els.question.focus();
}

function errorTitle(kind) {
  return {
    empty_question: "Empty question",
    question_too_long: "Question too long",
    history_too_long: "Conversation too long",
    context_too_long: "Too long for the model",
    no_documents: "No documents",
    no_match: "No matching documents",
    invalid_request: "Invalid request",
    invalid_input: "Invalid input",
    network: "Connection problem",
    stopped: "Stopped",
  }[kind] || "Something went wrong";
}

async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(event, JSON.parse(data));
    }
  }
}

// ---------------------------------------------------------------- safe Markdown
// Escape first, then a small subset: paragraphs, "-"/"*"/"1." lists, "#" headings, ``` code blocks, `code`,
// **bold**, *italic*, and [links](http(s)://...). No raw HTML ever reaches the page. Citation spans (character
// offsets into the raw answer) are kept: each line is cut at sentence boundaries and the inline formatting is
// applied to each piece, so marks go right after the sentence they belong to.
function inlineMd(raw) {
  const codes = [];
  let s = esc(raw).replace(/`([^`\n]+)`/g, (_, c) => { codes.push(c); return `\u0000${codes.length - 1}\u0000`; });
  s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/g, (_, t, u) => `<a href="${u}" target="_blank" rel="noopener noreferrer nofollow">${t}</a>`);
  s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>").replace(/__([^_\n]+)__/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^*\w])\*([^*\s][^*\n]*?)\*(?!\*)/g, "$1<em>$2</em>").replace(/(^|[^_\w])_([^_\s][^_\n]*?)_(?![_\w])/g, "$1<em>$2</em>");
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[Number(i)]}</code>`);
}

// text: the raw answer; spans: [{start, end, open(ci) -> html, close(ci) -> html after the sentence}]
function renderMarkdown(text, spans = [], decorate = null) {
  const lines = [];
  let pos = 0;
  for (const line of text.split("\n")) { lines.push({ start: pos, text: line }); pos += line.length + 1; }
  const out = [];
  let list = null, para = [], inCode = false, code = [];
  const flushPara = () => { if (para.length) { out.push(`<p>${para.join("<br>")}</p>`); para = []; } };
  const flushList = () => { if (list) { out.push(`</${list}>`); list = null; } };
  const pieces = (a, b) => {  // [a, b) of the raw text, cut at sentence boundaries, inline formatting per piece
    let html = "", p = a;
    for (const [ci, s] of spans.entries()) {
      if (s.end <= p || s.start >= b) continue;
      if (s.start > p) { html += inlineMd(text.slice(p, s.start)); p = s.start; }
      const e = Math.min(b, s.end);
      html += decorate ? decorate.wrap(ci, inlineMd(text.slice(p, e))) : inlineMd(text.slice(p, e));
      if (s.end <= b && decorate) html += decorate.after(ci);
      p = e;
    }
    if (p < b) html += inlineMd(text.slice(p, b));
    return html;
  };
  const marksEndingIn = (a, b) => spans.map((s, ci) => (s.end > a && s.end <= b && decorate ? decorate.after(ci) : "")).join("");
  for (const { start, text: line } of lines) {
    const end = start + line.length;
    if (/^\s*```/.test(line)) {
      if (inCode) { out.push(`<pre><code>${esc(code.map((c) => c.text).join("\n"))}</code></pre>${marksEndingIn(code.length ? code[0].start : start, end)}`); code = []; inCode = false; }
      else { flushPara(); flushList(); inCode = true; }
      continue;
    }
    if (inCode) { code.push({ start, text: line }); continue; }
    if (!line.trim()) { flushPara(); flushList(); continue; }
    let m;
    if ((m = /^(\s*)(#{1,6})\s+/.exec(line))) {
      flushPara(); flushList();
      out.push(`<p class="md-h">${pieces(start + m[0].length, end)}</p>`);
    } else if ((m = /^(\s*)([-*+]|\d{1,3}[.)])\s+/.exec(line))) {
      flushPara();
      const kind = /\d/.test(m[2]) ? "ol" : "ul";
      if (list !== kind) { flushList(); out.push(`<${kind}>`); list = kind; }
      out.push(`<li>${pieces(start + m[0].length, end)}</li>`);
    } else {
      flushList();
      para.push(pieces(start, end));
    }
  }
  if (inCode) out.push(`<pre><code>${esc(code.map((c) => c.text).join("\n"))}</code></pre>`);
  flushPara(); flushList();
  return out.join("");
}

// ---------------------------------------------------------------- answers with citations
function docByIndex(att, index) { return att.documents.find((d) => d.index === index); }
function docById(att, id) { return att.documents.find((d) => d.id === id); }

// the page's answer (index into state.answers) that history turn `historyIndex` of answer `idx`'s request was;
// null when that turn is not an answer on this page
function earlierAnswerOf(idx, historyIndex, historyStart = state.answers[idx].historyStart) {
  const turn = state.history[historyStart + historyIndex];
  return turn && turn.role === "assistant" && turn.answer != null && turn.answer < idx ? turn.answer : null;
}

function earlierAnswerMark(idx, ci, c, historyStart) {
  const target = earlierAnswerOf(idx, c.earlier_answer.history_index, historyStart);
  const label = `<span class="ctx-icon" aria-hidden="true">↩</span>from the earlier answer`;
  // measured groundedness: how much less likely the sentence is without the earlier turns (nats)
  const drop = c.earlier_answer.context_grounded;
  const why = drop != null
    ? `it depends on the earlier turns (without them the model is ${drop.toFixed(1)} nats less likely to write it)`
    : null;
  if (target == null) {
    const title = why ? `This sentence draws on an earlier reply: ${why}` : "This sentence repeats an earlier reply rather than a retrieved document";
    return `<span class="ctx-mark static" data-citation="${ci}" title="${esc(title)}">${label}</span>`;
  }
  const tip = why
    ? `This sentence draws on answer ${target + 1}: ${why}. Show it in the conversation`
    : `This sentence repeats answer ${target + 1} more than any retrieved document: show it in the conversation`;
  return `<button type="button" class="ctx-mark" data-citation="${ci}" data-answer="${target}" aria-controls="answer-${target + 1}" aria-label="From the earlier answer: show answer ${target + 1} in the conversation" title="${esc(tip)}">${label}</button>`;
}

// how answer `idx` (whose request's history starts at `historyStart` in state.history) marks its cited sentences:
// `att` is its attribution, or while it streams the citations so far and their documents
function citationDecorate(att, idx, historyStart) {
  return {
    wrap(ci, html) {
      const c = att.citations[ci];
      const cls = c.mark === "earlier_answer" ? "sent repeat" : c.mark === "not_from_documents" ? "sent unsupported" : "sent";
      return `<span class="${cls}" data-citation="${ci}">${html}</span>`;
    },
    after(ci) {
      const c = att.citations[ci];
      let html = "";
      for (const id of c.cited) {
        const d = docById(att, id);
        const n = d.index + 1;
        html += `<button type="button" class="cite" data-citation="${ci}" data-doc="${esc(id)}" data-n="${n}" aria-label="Source ${n}: ${esc(d.title || id)}" aria-describedby="preview">${n}</button>`;
      }
      if (c.mark === "earlier_answer") html += earlierAnswerMark(idx, ci, c, historyStart);
      else if (c.mark === "not_from_documents") html += `<span class="flag-sentence" data-citation="${ci}" title="No retrieved document supports this sentence">not from your documents</span>`;
      return html;
    },
  };
}

function renderAnswer(idx) {
  const a = state.answers[idx];
  const { attribution: att, el, seconds } = a;
  const decorate = citationDecorate(att, idx, a.historyStart);
  const bubble = el.querySelector(".bubble");
  const body = att.answer.trim() ? renderMarkdown(att.answer, att.citations, decorate) : '<span class="thinking">(empty answer)</span>';
  bubble.innerHTML = `<div class="answer-text">${body}</div>`;
  el.querySelectorAll(".unsupported-flag, .meta, .msg-actions").forEach((x) => x.remove());

  const repeats = att.citations.some((c) => c.mark === "earlier_answer");
  if (!att.supported && !repeats) {
    bubble.insertAdjacentHTML("afterend",
      `<div class="unsupported-flag" role="note"><span aria-hidden="true">⚠</span><span><strong>Not from your documents.</strong> No retrieved document clearly supports this answer — treat it with caution.</span></div>`);
  } else if (att.citations.some((c) => c.mark === "not_from_documents")) {
    bubble.insertAdjacentHTML("afterend",
      `<div class="unsupported-flag" role="note"><span aria-hidden="true">⚠</span><span>Sentences underlined in red are not from your documents: no retrieved document supports them.</span></div>`);
  }
  const meta = [`${att.documents.length} documents retrieved`];
  if (seconds != null) meta.push(`${seconds.toFixed(1)} s`);
  if (att.stopped) meta.push("stopped");
  else if (att.finish_reason === "length") meta.push("answer cut at the token limit");
  if (att.sampled) meta.push("regenerated (sampled)");
  el.insertAdjacentHTML("beforeend",
    `<div class="meta">${meta.map((m) => `<span>${esc(m)}</span>`).join("")}</div>` +
    `<div class="msg-actions">` +
    `<button type="button" class="act" data-action="copy" title="Copy the answer with its citation numbers and sources">Copy</button>` +
    `<button type="button" class="act" data-action="regenerate" title="Ask the model for another answer to this question">Regenerate</button>` +
    `</div>`);

  if (!el.dataset.wired) {
    el.dataset.wired = "1";
    el.addEventListener("click", (e) => {
      const i = state.answers.findIndex((x) => x.el === el);
      if (i < 0) return;
      const act = e.target.closest(".act");
      if (act) { if (act.dataset.action === "copy") copyAnswer(i, act); else regenerate(i); return; }
      if (!e.target.closest(".bubble")) return;
      const cite = e.target.closest(".cite");
      const earlier = e.target.closest("button.ctx-mark");
      selectAnswer(i);
      if (cite) { hidePreview(); showCitation(i, Number(cite.dataset.citation), cite.dataset.doc, cite); }
      else if (earlier) showEarlierAnswer(i, Number(earlier.dataset.citation), Number(earlier.dataset.answer), earlier);
    });
  }
}

// Regenerate is offered on the newest answer: it is replaced by a sampled one for the same question
function refreshActions() {
  state.answers.forEach((a, i) => {
    const b = a.el.querySelector("[data-action=regenerate]");
    if (b) { b.hidden = i !== state.answers.length - 1; b.disabled = state.busy; }
  });
}

function regenerate(idx) {
  if (state.busy || idx !== state.answers.length - 1) return;
  const a = state.answers.pop();
  state.history.splice(state.history.length - 2, 2);
  a.el.remove(); a.userEl?.remove();
  // an error message right after the answer would otherwise stay between the turns
  if (state.selected === idx) state.selected = null;
  renderSources(state.answers.length ? state.answers.length - 1 : null);
  closeDoc();
  ask(a.question, { regenerate: true });
}

function citedText(att) {
  const sources = att.documents
    .filter((d) => att.citations.some((c) => c.cited.includes(d.id)))
    .sort((x, y) => x.index - y.index)
    .map((d) => `[${d.index + 1}] ${d.title || d.id} (${d.metadata?.path || d.id})`);
  return att.cited_answer + (sources.length ? `\n\nSources:\n${sources.join("\n")}` : "");
}

async function copyAnswer(idx, button) {
  const text = citedText(state.answers[idx].attribution);
  let ok = false;
  try { await navigator.clipboard.writeText(text); ok = true; } catch (_) {
    const ta = document.createElement("textarea");
    ta.value = text; ta.setAttribute("readonly", ""); ta.style.position = "fixed"; ta.style.opacity = "0";
    document.body.appendChild(ta); ta.select();
    try { ok = document.execCommand("copy"); } catch (_) { ok = false; }
    ta.remove();
  }
  button.textContent = ok ? "Copied" : "Copy failed";
  button.classList.toggle("done", ok);
  setTimeout(() => { button.textContent = "Copy"; button.classList.remove("done"); }, 1800);
}

function selectAnswer(idx) {
  if (state.selected === idx) return;
  state.selected = idx;
  closeDoc();  // the open document (and its [n] number) belonged to the previously selected answer
  state.answers.forEach((a, i) => a.el.classList.toggle("selected", i === idx));
  renderSources(idx);
}

function renderSources(idx) {
  if (idx == null) {
    els.sources.innerHTML = `<p class="placeholder">Ask a question to see which retrieved documents the answer actually used.</p>`;
    els.sourcesSub.textContent = "Ranked by attribution score";
    return;
  }
  const { attribution: att } = state.answers[idx];
  const ranked = [...att.documents].sort((a, b) => b.score - a.score);
  const cited = new Set(att.citations.flatMap((c) => c.cited));
  els.sourcesSub.textContent = `Answer ${idx + 1} · ranked by attribution`;
  // bars on one scale: the share of the answer's attribution (not relative to the best document)
  els.sources.innerHTML = ranked.map((d, r) => `
    <button type="button" class="source-row${r === 0 && d.share > 0 ? " top" : ""}${cited.has(d.id) ? " cited" : ""}" data-doc-id="${esc(d.id)}" data-n="${d.index + 1}" title="Attribution score ${d.score.toFixed(4)} · BM25 rank ${d.metadata.bm25_rank ?? "?"}${cited.has(d.id) ? " · cited in the answer" : " · not cited"}">
      <span class="num">${d.index + 1}</span>
      <span class="title">${esc(d.title || d.id)}</span>
      <span class="pct">${pct(d.share)}</span>
      <span class="bar"><span style="width:${(100 * d.share).toFixed(1)}%"></span></span>
      <span class="path">${esc(d.metadata.path || d.id)}${d.metadata.source === "upload" ? " · uploaded" : ""}</span>
    </button>`).join("") +
    `<p class="sources-note${att.estimator_trained ? "" : " warn"}">${att.estimator_trained
      ? "Share of the answer's attribution; the numbers are the citation marks' numbers."
      : "Scores come from an untrained estimator (uniform average attention)."}</p>` +
    earlierAnswersNote(idx);
  els.sources.querySelectorAll(".source-row").forEach((row) =>
    row.addEventListener("click", () => showDocument(idx, row.dataset.docId)));
}

// which earlier answers of this conversation the selected answer repeats (it drew on them more than on any document)
function earlierAnswersNote(idx) {
  const targets = [...new Set(state.answers[idx].attribution.citations
    .filter((c) => c.mark === "earlier_answer")
    .map((c) => earlierAnswerOf(idx, c.earlier_answer.history_index))
    .filter((t) => t != null))].sort((a, b) => a - b);
  if (!targets.length) return "";
  const names = targets.map((t) => `answer ${t + 1}`).join(", ");
  return `<p class="sources-note ctx"><span aria-hidden="true">↩</span> Sentences marked “from the earlier answer” draw more on ${esc(names)} of this conversation than on any document listed here.</p>`;
}

// ---------------------------------------------------------------- highlights on one scale
// `scale` is the strongest sentence score over *all* documents of this answer (or answer sentence), so a weak
// document's sentences look weak: strength = score / scale, the same colour ramp for every document.
function sentenceScale(lists) {
  let best = 0;
  for (const list of lists) for (const s of list || []) best = Math.max(best, s.score);
  return best || 1;
}

function highlightMarks(sentences, scale, offset = 0, topOnly = 3) {
  const chosen = (sentences || []).filter((s) => s.score > 0).sort((a, b) => b.score - a.score).slice(0, topOnly);
  return chosen.filter((s) => s.score >= 0.05 * scale)
    .map((s, r) => ({ start: s.start + offset, end: s.end + offset, score: s.score, strength: Math.min(1, s.score / scale), first: r === 0 }))
    .sort((a, b) => a.start - b.start);
}

// text with <mark>s (and, for a whole file, the retrieved passage outlined)
function highlight(text, marks, passage = null) {
  const cuts = [];
  for (const m of marks) cuts.push({ at: m.start, open: m }, { at: m.end, close: m });
  if (passage) cuts.push({ at: passage.start, popen: true }, { at: passage.end, pclose: true });
  const rank = (c) => (c.close ? 0 : c.pclose ? 1 : c.popen ? 2 : 3);  // at one position: close, then open
  cuts.sort((a, b) => a.at - b.at || rank(a) - rank(b));
  let out = "", last = 0, inMark = null;
  for (const c of cuts) {
    if (c.at < last) continue;
    out += esc(text.slice(last, c.at)); last = c.at;
    if (c.popen) out += inMark ? `</mark><span class="passage">${markOpen(inMark)}` : `<span class="passage">`;
    else if (c.pclose) out += inMark ? `</mark></span>${markOpen(inMark)}` : `</span>`;
    else if (c.open) { out += markOpen(c.open); inMark = c.open; }
    else if (c.close && inMark === c.close) { out += `</mark>`; inMark = null; }
  }
  return out + esc(text.slice(last));
}

function markOpen(m) {
  const alpha = (0.08 + 0.62 * m.strength).toFixed(2);
  return `<mark class="hl${m.first ? " top" : ""}${m.strength >= 0.5 ? " strong" : ""}" data-score="${m.score.toFixed(4)}" data-strength="${m.strength.toFixed(3)}" title="score ${m.score.toFixed(4)} · ${pct(m.strength)} of the strongest sentence of this answer" style="background: rgba(var(--hl), ${alpha})">`;
}

async function fetchWholeDocument(docId) {
  if (state.docCache.has(docId)) return state.docCache.get(docId);
  let doc = null;
  try {
    const res = await api(`/api/documents/${docId.split("/").map(encodeURIComponent).join("/")}`);
    if (res.ok) doc = await res.json();
  } catch (_) { doc = null; }
  if (doc) state.docCache.set(docId, doc);
  return doc;
}

function openDoc(att, doc, claimHtml, sentences, scale, rowId) {
  els.docCard.hidden = false;
  $("help-card").hidden = true;
  els.docsCard.hidden = true;
  document.body.classList.add("sheet-open");
  els.docScrim.hidden = false;
  els.docTitle.textContent = `[${doc.index + 1}] ${doc.title || doc.id}`;
  const m = doc.metadata || {};
  const metaHtml = [
    `<span class="tag">${esc(m.path || doc.id)}</span>`,
    `<span>answer share ${pct(doc.share)}</span>`,
    m.bm25_rank ? `<span>BM25 rank ${m.bm25_rank}</span>` : "",
  ].join("");
  els.docMeta.innerHTML = metaHtml;
  els.docClaim.hidden = !claimHtml;
  els.docClaim.innerHTML = claimHtml || "";
  const marks = highlightMarks(sentences, scale);
  els.docView.innerHTML = highlight(doc.text, marks);
  els.docView.dataset.docId = doc.id;
  els.docView.dataset.view = "passage";
  els.sources.querySelectorAll(".source-row").forEach((r) => r.classList.toggle("active", r.dataset.docId === rowId));
  const scrollTop = () => {
    const top = els.docView.querySelector("mark.top") || els.docView.querySelector(".passage");
    if (top) els.docView.scrollTop = Math.max(0, top.offsetTop - els.docView.offsetTop - 40);
  };
  scrollTop();
  if (!document.body.classList.contains("phone")) els.docCard.scrollIntoView({ block: "nearest" });
  els.docClose.focus({ preventScroll: true });
  // the whole file, with this passage outlined and the same highlights at their place in the file
  const token = Symbol("doc");
  els.docView.token = token;
  const wholeId = m.doc_id || m.path;
  if (!wholeId) return;
  fetchWholeDocument(wholeId).then((whole) => {
    if (els.docView.token !== token || els.docCard.hidden) return;
    const offset = m.offset ?? null;
    if (!whole || offset == null || whole.text.slice(offset, offset + doc.text.length) !== doc.text) {
      els.docMeta.innerHTML = metaHtml + `<span class="warn-tag">${whole ? "the file has changed since" : "no longer indexed"}: showing the passage the model read</span>`;
      return;
    }
    els.docView.innerHTML = highlight(whole.text, highlightMarks(sentences, scale, offset), { start: offset, end: offset + doc.text.length });
    els.docView.dataset.view = "file";
    const part = m.parts > 1 ? `passage ${m.part} of ${m.parts} outlined` : "the passage the model read is outlined";
    els.docMeta.innerHTML = metaHtml + `<span>whole file · ${part}</span>`;
    scrollTop();
  });
}

function clearActive() {
  document.querySelectorAll(".cite.active, .sent.active, .ctx-mark.active").forEach((x) => x.classList.remove("active"));
  clearRecalled();
}

function clearRecalled() {
  document.querySelectorAll(".msg.recalled").forEach((m) => m.classList.remove("recalled"));
  document.querySelectorAll(".recall-note").forEach((n) => n.remove());
}

// "from the earlier answer": scroll to that earlier assistant message and highlight it
function showEarlierAnswer(idx, ci, target, button) {
  const earlier = state.answers[target];
  if (!earlier) return;
  clearActive();
  button.classList.add("active");
  state.answers[idx].el.querySelector(`.sent[data-citation="${ci}"]`)?.classList.add("active");
  earlier.el.classList.add("recalled");
  earlier.el.querySelector(".bubble").insertAdjacentHTML("beforebegin",
    `<div class="recall-note" role="status"><span aria-hidden="true">↩</span> Answer ${idx + 1} repeats this earlier answer</div>`);
  earlier.el.tabIndex = -1;
  earlier.el.focus({ preventScroll: true });
  earlier.el.scrollIntoView({ block: "center", behavior: "smooth" });
}

function citationSupport(att, ci, docId) {
  const c = att.citations[ci];
  const support = c.documents.find((d) => d.id === docId);
  const total = c.documents.reduce((s, d) => s + Math.max(0, d.score), 0) || 1;
  return { c, support, share: support ? Math.max(0, support.score) / total : 0 };
}

function showCitation(idx, ci, docId, button) {
  const att = state.answers[idx].attribution;
  const doc = docById(att, docId);
  const { c, support, share } = citationSupport(att, ci, docId);
  clearActive();
  button.classList.add("active");
  state.answers[idx].el.querySelector(`.sent[data-citation="${ci}"]`)?.classList.add("active");
  const claim = `<span class="label">Answer sentence · ${pct(share)} of its attribution goes to this document</span>“${esc(c.text)}”`;
  openDoc(att, doc, claim, support ? support.sentences : [], sentenceScale(c.documents.map((d) => d.sentences)), docId);
  els.docCard.dataset.mode = "citation";
}

function showDocument(idx, docId) {
  const att = state.answers[idx].attribution;
  const doc = docById(att, docId);
  clearActive();
  openDoc(att, doc, `<span class="label">Whole answer</span>Sentences highlighted by their attribution to the complete answer, on one scale for all documents.`,
    doc.sentences, sentenceScale(att.documents.map((d) => d.sentences)), docId);
  els.docCard.dataset.mode = "document";
}

function closeDoc() {
  els.docCard.hidden = true;
  els.docScrim.hidden = true;
  document.body.classList.remove("sheet-open");
  $("help-card").hidden = false;
  els.docsCard.hidden = false;
  clearActive();
  els.sources.querySelectorAll(".source-row.active").forEach((r) => r.classList.remove("active"));
}

// ---------------------------------------------------------------- hover / focus preview of a citation
let previewFor = null;
function showPreview(cite) {
  const msgEl = cite.closest(".msg");
  const idx = state.answers.findIndex((a) => a.el === msgEl);
  const streaming = state.current && state.current.msg === msgEl ? state.current.live : null;  // marks before the end
  if (idx < 0 && !streaming) return;
  const att = idx >= 0 ? state.answers[idx].attribution : streaming;
  const ci = Number(cite.dataset.citation), docId = cite.dataset.doc;
  const doc = docById(att, docId);
  const { support, share } = citationSupport(att, ci, docId);
  const best = support ? [...support.sentences].sort((a, b) => b.score - a.score)[0] : null;
  const sentence = best ? best.text.trim() : "";
  els.preview.innerHTML =
    `<div class="pv-title"><span class="pv-num">${doc.index + 1}</span>${esc(doc.title || doc.id)}</div>` +
    (sentence ? `<blockquote class="pv-quote">${esc(sentence)}</blockquote>` : "") +
    `<div class="pv-meta">${pct(share)} of this sentence's attribution · ${esc(doc.metadata?.path || doc.id)}</div>` +
    `<div class="pv-hint">Click to open the document</div>`;
  els.preview.hidden = false;
  previewFor = cite;
  const r = cite.getBoundingClientRect();
  const w = Math.min(340, window.innerWidth - 16);
  els.preview.style.width = `${w}px`;
  const left = Math.max(8, Math.min(r.left + r.width / 2 - w / 2, window.innerWidth - w - 8));
  const h = els.preview.offsetHeight;
  const above = r.top - h - 8 >= 8;
  els.preview.style.left = `${left + window.scrollX}px`;
  els.preview.style.top = `${(above ? r.top - h - 8 : r.bottom + 8) + window.scrollY}px`;
}
function hidePreview() { els.preview.hidden = true; previewFor = null; }
// a streaming answer is redrawn on every chunk: the preview follows its mark to the redrawn one
function keepPreview(container) {
  if (!previewFor || previewFor.isConnected) return;
  const again = container.querySelector(`.cite[data-citation="${previewFor.dataset.citation}"][data-doc="${CSS.escape(previewFor.dataset.doc)}"]`);
  if (again) previewFor = again; else hidePreview();
}
els.messages.addEventListener("mouseover", (e) => { const c = e.target.closest(".cite"); if (c && c !== previewFor) showPreview(c); });
els.messages.addEventListener("mouseout", (e) => { const c = e.target.closest(".cite"); if (c && !c.contains(e.relatedTarget)) hidePreview(); });
els.messages.addEventListener("focusin", (e) => { const c = e.target.closest(".cite"); if (c) showPreview(c); });
els.messages.addEventListener("focusout", (e) => { if (e.target.closest(".cite")) hidePreview(); });
els.messages.addEventListener("scroll", hidePreview, { passive: true });

// ---------------------------------------------------------------- memory: conversations in localStorage
function loadChats() {
  try { const v = JSON.parse(localStorage.getItem(STORE_CHATS) || "[]"); return Array.isArray(v) ? v : []; } catch (_) { return []; }
}

function writeChats(chats) {
  chats.sort((a, b) => b.updated - a.updated);
  chats = chats.slice(0, MAX_CHATS);
  for (;;) {
    try { localStorage.setItem(STORE_CHATS, JSON.stringify(chats)); return; } catch (e) {
      if (chats.length <= 1) { console.warn("could not save the conversation", e); return; }
      chats.pop();  // storage is full: forget the oldest conversation
    }
  }
}

function saveChat() {
  const chats = loadChats();
  if (!state.chatId) state.chatId = `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
  const items = state.answers.map((a) => ({ question: a.question, attribution: a.attribution, retrieval: a.retrieval, seconds: a.seconds, historyStart: a.historyStart }));
  const existing = chats.find((c) => c.id === state.chatId);
  const chat = existing || { id: state.chatId, created: Date.now() };
  Object.assign(chat, { title: (items[0]?.question || "New chat").slice(0, 80), updated: Date.now(), items });
  if (!existing) chats.push(chat);
  writeChats(chats);
  localStorage.setItem(STORE_CURRENT, state.chatId);
  renderChatList();
}

function openChat(id) {
  const chat = loadChats().find((c) => c.id === id);
  if (!chat) return;
  if (state.current) { state.current.controller.abort(); }
  state.gen++;
  resetConversation();
  state.chatId = chat.id;
  localStorage.setItem(STORE_CURRENT, chat.id);
  for (const item of chat.items || []) {
    if (!item || !item.attribution || typeof item.question !== "string") continue;
    const userEl = addMessage("user", esc(item.question));
    const el = addMessage("assistant", "");
    const idx = state.answers.length;
    el.id = `answer-${idx + 1}`;
    state.answers.push({ ...item, el, userEl });
    state.history.push({ role: "user", content: item.question }, { role: "assistant", content: item.attribution.answer, answer: idx });
    renderAnswer(idx);
  }
  if (state.answers.length) selectAnswer(state.answers.length - 1);
  refreshActions();
  renderChatList();
  scrollToEnd();
}

function deleteChat(id) {
  writeChats(loadChats().filter((c) => c.id !== id));
  if (state.chatId === id) newChat();
  renderChatList();
}

function renderChatList() {
  const chats = loadChats().sort((a, b) => b.updated - a.updated);
  els.chatsButton.textContent = `Chats${chats.length ? ` (${chats.length})` : ""}`;
  if (!chats.length) { els.chatsList.innerHTML = `<li class="placeholder">No saved conversations yet.</li>`; return; }
  els.chatsList.innerHTML = chats.map((c) => `
    <li class="chat-item${c.id === state.chatId ? " current" : ""}" data-chat="${esc(c.id)}">
      <button type="button" class="chat-open" data-chat="${esc(c.id)}">
        <span class="chat-title">${esc(c.title || "New chat")}</span>
        <span class="chat-when">${esc(new Date(c.updated).toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "short" }))} · ${(c.items || []).length} answer${(c.items || []).length === 1 ? "" : "s"}</span>
      </button>
      <button type="button" class="icon chat-delete" data-chat="${esc(c.id)}" aria-label="Delete this conversation" title="Delete">×</button>
    </li>`).join("");
}
els.chatsButton.addEventListener("click", () => {
  els.chatsPanel.hidden = !els.chatsPanel.hidden;
  els.chatsButton.setAttribute("aria-expanded", String(!els.chatsPanel.hidden));
  if (!els.chatsPanel.hidden) renderChatList();
});
els.chatsList.addEventListener("click", (e) => {
  const del = e.target.closest(".chat-delete");
  const open = e.target.closest(".chat-open");
  if (del) deleteChat(del.dataset.chat);
  else if (open) { openChat(open.dataset.chat); els.chatsPanel.hidden = true; els.chatsButton.setAttribute("aria-expanded", "false"); }
});
document.addEventListener("click", (e) => {
  if (!els.chatsPanel.hidden && !e.target.closest("#chats-panel, #chats-button")) { els.chatsPanel.hidden = true; els.chatsButton.setAttribute("aria-expanded", "false"); }
});
window.addEventListener("storage", (e) => { if (e.key === STORE_CHATS) renderChatList(); });

// ---------------------------------------------------------------- your documents: upload, list, remove
async function loadDocuments() {
  try {
    const res = await api("/api/documents", { cache: "no-store" });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    renderDocuments((await res.json()).documents);
  } catch (e) {
    els.docsSub.textContent = "could not load the list";
  }
}

function renderDocuments(docs) {
  const uploaded = docs.filter((d) => d.source === "upload");
  const folder = docs.filter((d) => d.source !== "upload");
  els.docsSub.textContent = `${docs.length} indexed · ${uploaded.length} uploaded`;
  const row = (d) => `
    <li class="doc-item" data-doc-id="${esc(d.id)}" data-source="${esc(d.source)}">
      <span class="doc-kind ${esc(d.kind)}">${esc({ pdf: "PDF", markdown: "MD", text: "TXT" }[d.kind] || "TXT")}</span>
      <span class="doc-name" title="${esc(d.title)}">${esc(d.name)}</span>
      <span class="doc-size">${esc(size(d.bytes))}</span>
      ${d.removable ? `<button type="button" class="icon doc-remove" data-doc-id="${esc(d.id)}" aria-label="Remove ${esc(d.name)}" title="Remove from the index">×</button>` : ""}
    </li>`;
  els.docsList.innerHTML =
    (uploaded.length ? `<ul class="doc-list uploaded">${uploaded.map(row).join("")}</ul>` : `<p class="placeholder small">No uploaded documents yet.</p>`) +
    (folder.length ? `<details class="folder-docs"><summary>${folder.length} from the server's folder</summary><ul class="doc-list">${folder.map(row).join("")}</ul></details>` : "");
}

function uploadMessage(html, kind = "") {
  els.uploadMsg.hidden = !html;
  els.uploadMsg.className = `upload-message ${kind}`;
  els.uploadMsg.innerHTML = html;
}

async function uploadFiles(fileList) {
  const files = [...fileList];
  if (!files.length) return;
  const { uploadBytes, uploadFiles: most, uploadTypes } = state.limits;
  const types = uploadTypes || [".txt", ".md", ".markdown", ".pdf"];
  const refused = [];
  const ok = files.filter((f) => {
    const ext = (f.name.match(/\.[^.]+$/) || [""])[0].toLowerCase();
    if (!types.includes(ext)) { refused.push(`${f.name}: ${ext || "(no extension)"} files are not supported; upload .txt, .md or .pdf files.`); return false; }
    if (uploadBytes != null && f.size > uploadBytes) { refused.push(`${f.name} is larger than the limit of ${size(uploadBytes)}; split it or upload a shorter file.`); return false; }
    return true;
  });
  if (most != null && ok.length > most) {
    uploadMessage(`At most ${most} files can be uploaded at once; you chose ${ok.length}.`, "error");
    return;
  }
  if (!ok.length) { uploadMessage(refused.map(esc).join("<br>"), "error"); return; }
  uploadMessage(`Uploading ${ok.length} file${ok.length === 1 ? "" : "s"}…`, "busy");
  const form = new FormData();
  for (const f of ok) form.append("file", f, f.name);
  let body = {}, status = 0;
  try {
    const res = await api("/api/documents", { method: "POST", body: form });
    status = res.status;
    try { body = await res.json(); } catch (_) { body = {}; }
  } catch (e) {
    uploadMessage(`Could not reach the server: ${esc(e.message)}`, "error");
    return;
  }
  for (const r of body.rejected || []) refused.push(r.message);
  if (status !== 201 && status !== 200) {
    uploadMessage((refused.length ? refused : [body.message || `The server answered ${status}.`]).map(esc).join("<br>"), "error");
  } else {
    // 200: every file was already stored (same name, same content), so nothing was added twice
    const names = (docs) => docs.map((d) => `<strong>${esc(d.name)}</strong>`).join(", ");
    const added = body.documents.filter((d) => !d.duplicate), kept = body.documents.filter((d) => d.duplicate);
    const parts = [];
    if (added.length) parts.push(`Added ${names(added)}: searchable now.`);
    if (kept.length) parts.push(`Already uploaded: ${names(kept)} (not stored twice).`);
    uploadMessage(parts.join("<br>") + (refused.length ? `<br>${refused.map(esc).join("<br>")}` : ""), refused.length ? "warn" : "ok");
  }
  els.fileInput.value = "";
  await Promise.all([loadDocuments(), loadStatus()]);
}

els.uploadButton.addEventListener("click", () => els.fileInput.click());
els.fileInput.addEventListener("change", () => uploadFiles(els.fileInput.files));
els.docsList.addEventListener("click", async (e) => {
  const rm = e.target.closest(".doc-remove");
  if (!rm) return;
  rm.disabled = true;
  const id = rm.dataset.docId;
  let res;
  try { res = await api(`/api/documents/${encodeURIComponent(id)}`, { method: "DELETE" }); } catch (err) { res = null; }
  if (res && res.ok) { state.docCache.delete(id); uploadMessage("Removed: it is no longer searched.", "ok"); }
  else {
    let msg = "Could not remove the document.";
    try { msg = (await res.json()).message || msg; } catch (_) { /* keep */ }
    uploadMessage(esc(msg), "error");
  }
  await Promise.all([loadDocuments(), loadStatus()]);
});

// drag and drop: anywhere on the page
let dragDepth = 0;
const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
window.addEventListener("dragenter", (e) => { if (!hasFiles(e)) return; e.preventDefault(); dragDepth++; els.dropOverlay.hidden = false; });
window.addEventListener("dragover", (e) => { if (!hasFiles(e)) return; e.preventDefault(); e.dataTransfer.dropEffect = "copy"; });
window.addEventListener("dragleave", (e) => { if (!hasFiles(e)) return; dragDepth = Math.max(0, dragDepth - 1); if (!dragDepth) els.dropOverlay.hidden = true; });
window.addEventListener("drop", (e) => {
  if (!hasFiles(e)) return;
  e.preventDefault(); dragDepth = 0; els.dropOverlay.hidden = true;
  uploadFiles(e.dataTransfer.files);
});

// ---------------------------------------------------------------- phone layout
function updatePhone() { document.body.classList.toggle("phone", window.matchMedia("(max-width: 600px)").matches); }
window.addEventListener("resize", () => { updatePhone(); hidePreview(); });

// ---------------------------------------------------------------- start
applyTheme();
updatePhone();
loadStatus();
loadDocuments();
setInterval(loadStatus, 5000);
renderChatList();
const lastChat = localStorage.getItem(STORE_CURRENT);
if (lastChat) openChat(lastChat);
els.question.focus();
