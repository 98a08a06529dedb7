// AT2 Cited Chat: plain JS, no build step. Streams answers from POST /api/chat (server-sent events over fetch),
// then turns the final Attribution into citation marks, a ranked source list and highlighted documents.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), empty: $("empty-state"), suggestions: $("suggestions"),
  form: $("composer"), box: document.querySelector(".composer-box"), question: $("question"), send: $("send"),
  newChat: $("new-chat"), error: $("composer-error"), count: $("question-count"),
  statusDocs: $("status-docs"), statusModel: $("status-model"), banner: $("status-banner"),
  sources: $("sources"), sourcesSub: $("sources-sub"),
  docCard: $("doc-card"), docTitle: $("doc-title"), docMeta: $("doc-meta"), docClaim: $("doc-claim"),
  docView: $("doc-view"), docClose: $("doc-close"),
};

const state = {
  history: [],        // [{role, content, answer?}] of completed turns (answer: index into answers), sent with every question
  answers: [],        // per assistant message: {attribution, retrieval, el, seconds, historyStart}
  selected: null,     // index into answers
  busy: false,
  // the server's limits, from /api/status (null until it answers; the server checks them anyway)
  limits: { question: null, history: null, historyChars: null },
};

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
const pct = (x) => `${Math.round(x * 100)}%`;
const num = (n) => n.toLocaleString("en-US");
const chars = (s) => [...s].length;  // code points, as the server (Python's len) counts them

// ---------------------------------------------------------------- status
async function loadStatus() {
  try {
    const res = await fetch("/api/status");
    const s = await res.json();
    renderStatus(s);
  } catch (e) {
    els.statusDocs.className = "pill error";
    els.statusDocs.innerHTML = `<span class="dot"></span>Server unreachable`;
  }
}

function renderStatus(s) {
  state.limits = {
    question: s.max_question_chars ?? null, history: s.max_history ?? null, historyChars: s.max_history_chars ?? null,
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
    els.statusModel.title = s.estimator || "";
  }
  const parts = [];
  if (s.error) parts.push(`<strong>${esc(s.error)}</strong>`);
  if (s.problems.length) {
    const items = s.problems.map((p) => `<li><code>${esc(p.file)}</code> — ${esc(p.error)}</li>`).join("");
    parts.push(`${s.problems.length === 1 ? "One file" : s.problems.length + " files"} in <code>${esc(s.folder)}</code> could not be indexed; the other files are searchable:<ul>${items}</ul>`);
  }
  els.banner.hidden = parts.length === 0;
  els.banner.className = s.error ? "banner error" : "banner";
  els.banner.innerHTML = parts.join("");
  els.suggestions.innerHTML = "";
  for (const q of s.suggestions || []) {
    const b = document.createElement("button");
    b.type = "button"; b.className = "suggestion"; b.textContent = q;
    b.addEventListener("click", () => { els.question.value = q; autosize(); els.question.focus(); });
    els.suggestions.appendChild(b);
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
els.newChat.addEventListener("click", () => {
  if (state.busy) return;
  state.history = []; state.answers = []; state.selected = null;
  els.messages.querySelectorAll(".msg").forEach((m) => m.remove());
  clearRecalled();
  els.empty.hidden = false;
  renderSources(null); closeDoc(); showError("");
});
els.docClose.addEventListener("click", closeDoc);

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

async function ask(raw) {
  const question = raw.trim();
  if (!question) { showError("Please type a question before sending."); els.question.focus(); return; }
  const tooLong = tooLongMessage(question);
  if (tooLong) { showError(tooLong); els.question.focus(); return; }
  if (state.busy) return;
  showError("");
  state.busy = true; els.send.disabled = true; els.send.textContent = "Answering…";
  els.question.value = ""; autosize(); updateCount();
  addMessage("user", esc(question));
  const msg = addMessage("assistant", `<span class="answer-text"><span class="thinking">Searching the documents…</span></span>`);
  msg.classList.add("streaming");
  const textEl = msg.querySelector(".answer-text");
  let streamed = "", retrieval = null, attribution = null, failure = null, seconds = null;
  const history = historyToSend();
  const historyStart = state.history.length - history.length;  // where the sent turns start in state.history

  try {
    const res = await fetch("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({ question, history }),
    });
    if (!res.ok) {
      let body = {};
      try { body = await res.json(); } catch (_) { /* not JSON */ }
      failure = { kind: body.error || `http_${res.status}`, message: body.message || `The server answered ${res.status} ${res.statusText}.` };
    } else {
      await readEvents(res, (event, data) => {
        if (event === "retrieval") { retrieval = data; textEl.innerHTML = `<span class="thinking">Reading ${data.documents.length} documents…</span>`; }
        else if (event === "status") { textEl.innerHTML = `<span class="thinking">${esc(data.message)}</span>`; }
        else if (event === "token") { streamed += data.text; textEl.textContent = streamed; els.messages.scrollTop = els.messages.scrollHeight; }
        else if (event === "attribution") { attribution = data; }
        else if (event === "done") { seconds = data.seconds; }
        else if (event === "error") { failure = { kind: data.error, message: data.message }; }
      });
      if (!attribution && !failure) failure = { kind: "incomplete", message: "The answer stream ended before the attribution arrived." };
    }
  } catch (e) {
    failure = { kind: "network", message: `Could not reach the server: ${e.message}` };
  }

  msg.classList.remove("streaming");
  if (failure) {
    msg.remove();
    const err = addMessage("error", `<strong>${esc(errorTitle(failure.kind))}</strong>${esc(failure.message)}`);
    err.dataset.kind = failure.kind;
    // the question was not answered: give it back to the box to edit and resend (unless a new one is being typed)
    if (!els.question.value.trim()) { els.question.value = raw; autosize(); updateCount(); }
  } else {
    const idx = state.answers.length;
    msg.id = `answer-${idx + 1}`;
    state.answers.push({ attribution, retrieval, el: msg, seconds, historyStart });
    state.history.push({ role: "user", content: question }, { role: "assistant", content: attribution.answer, answer: idx });
    renderAnswer(idx);
    selectAnswer(idx);
    if (els.statusModel.hidden) loadStatus();  // the server loads the model lazily on the first question
  }
  state.busy = false; els.send.disabled = false; els.send.textContent = "Send";
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

// ---------------------------------------------------------------- answers with citations
function docByIndex(att, index) { return att.documents.find((d) => d.index === index); }
function docById(att, id) { return att.documents.find((d) => d.id === id); }

// the page's answer (index into state.answers) that history turn `historyIndex` of answer `idx`'s request was;
// null when that turn is not an answer on this page
function earlierAnswerOf(idx, historyIndex) {
  const turn = state.history[state.answers[idx].historyStart + historyIndex];
  return turn && turn.role === "assistant" && turn.answer != null && turn.answer < idx ? turn.answer : null;
}

function earlierAnswerMark(idx, ci, c) {
  const target = earlierAnswerOf(idx, c.earlier_answer.history_index);
  const label = `<span class="ctx-icon" aria-hidden="true">↩</span>from the earlier answer`;
  if (target == null) {
    return `<span class="ctx-mark static" data-citation="${ci}" title="This sentence repeats an earlier reply rather than a retrieved document">${label}</span>`;
  }
  const tip = `This sentence repeats answer ${target + 1} more than any retrieved document: show it in the conversation`;
  return `<button type="button" class="ctx-mark" data-citation="${ci}" data-answer="${target}" aria-controls="answer-${target + 1}" aria-label="From the earlier answer: show answer ${target + 1} in the conversation" title="${esc(tip)}">${label}</button>`;
}

function renderAnswer(idx) {
  const { attribution: att, el, seconds } = state.answers[idx];
  const parts = [];
  let last = 0;
  att.citations.forEach((c, ci) => {
    parts.push(esc(att.answer.slice(last, c.start)));
    const cls = c.mark === "earlier_answer" ? "sent repeat" : c.mark === "not_from_documents" ? "sent unsupported" : "sent";
    parts.push(`<span class="${cls}" data-citation="${ci}">${esc(att.answer.slice(c.start, c.end))}</span>`);
    for (const id of c.cited) {
      const d = docById(att, id);
      const n = d.index + 1;
      parts.push(`<button type="button" class="cite" data-citation="${ci}" data-doc="${esc(id)}" data-n="${n}" title="${esc(d.title || id)}" aria-label="Source ${n}: ${esc(d.title || id)}">${n}</button>`);
    }
    if (c.mark === "earlier_answer") parts.push(earlierAnswerMark(idx, ci, c));
    else if (c.mark === "not_from_documents") parts.push(`<span class="flag-sentence" data-citation="${ci}" title="No retrieved document supports this sentence">not from your documents</span>`);
    last = c.end;
  });
  parts.push(esc(att.answer.slice(last)));
  const bubble = el.querySelector(".bubble");
  bubble.innerHTML = `<span class="answer-text">${parts.join("") || '<span class="thinking">(empty answer)</span>'}</span>`;

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
  if (att.finish_reason === "length") meta.push("answer cut at the token limit");
  el.insertAdjacentHTML("beforeend", `<div class="meta">${meta.map((m) => `<span>${esc(m)}</span>`).join("")}</div>`);

  bubble.addEventListener("click", (e) => {
    const cite = e.target.closest(".cite");
    const earlier = e.target.closest("button.ctx-mark");
    selectAnswer(idx);
    if (cite) showCitation(idx, Number(cite.dataset.citation), cite.dataset.doc, cite);
    else if (earlier) showEarlierAnswer(idx, Number(earlier.dataset.citation), Number(earlier.dataset.answer), earlier);
  });
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
  const best = Math.max(...ranked.map((d) => d.share), 1e-9);
  els.sourcesSub.textContent = `Answer ${idx + 1} · ranked by attribution`;
  els.sources.innerHTML = ranked.map((d) => `
    <button type="button" class="source-row" data-doc-id="${esc(d.id)}" data-n="${d.index + 1}" title="Attribution score ${d.score.toFixed(4)} · BM25 rank ${d.metadata.bm25_rank ?? "?"}">
      <span class="num">${d.index + 1}</span>
      <span class="title">${esc(d.title || d.id)}</span>
      <span class="pct">${pct(d.share)}</span>
      <span class="bar"><span style="width:${(100 * d.share / best).toFixed(1)}%"></span></span>
      <span class="path">${esc(d.metadata.path || d.id)}</span>
    </button>`).join("") +
    `<p class="sources-note${att.estimator_trained ? "" : " warn"}">${att.estimator_trained
      ? "Share of the answer's attribution; numbers match the citation marks."
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

function highlight(text, sentences, topOnly = 3) {
  // sentences: [{start, end, score}] char spans inside `text`; strongest `topOnly` positive ones are marked.
  const chosen = sentences.filter((s) => s.score > 0).sort((a, b) => b.score - a.score).slice(0, topOnly);
  const best = chosen.length ? chosen[0].score : 1;
  const marks = chosen.filter((s) => s.score >= 0.25 * best).sort((a, b) => a.start - b.start);
  let out = "", last = 0;
  for (const s of marks) {
    if (s.start < last) continue;
    out += esc(text.slice(last, s.start));
    const strength = s.score / best;
    const alpha = (0.18 + 0.52 * strength).toFixed(2);
    const top = s.score === best ? " top" : "";
    out += `<mark class="hl${top}" data-score="${s.score.toFixed(4)}" title="score ${s.score.toFixed(4)}" style="background: rgba(var(--hl), ${alpha})">${esc(text.slice(s.start, s.end))}</mark>`;
    last = s.end;
  }
  return out + esc(text.slice(last));
}

function openDoc(att, doc, claimHtml, sentences, rowId) {
  els.docCard.hidden = false;
  $("help-card").hidden = true;
  els.docTitle.textContent = `[${doc.index + 1}] ${doc.title || doc.id}`;
  const m = doc.metadata || {};
  els.docMeta.innerHTML = [
    `<span class="tag">${esc(m.path || doc.id)}</span>`,
    `<span>answer share ${pct(doc.share)}</span>`,
    m.bm25_rank ? `<span>BM25 rank ${m.bm25_rank}</span>` : "",
  ].join("");
  els.docClaim.hidden = !claimHtml;
  els.docClaim.innerHTML = claimHtml || "";
  els.docView.innerHTML = highlight(doc.text, sentences);
  els.docView.dataset.docId = doc.id;
  els.sources.querySelectorAll(".source-row").forEach((r) => r.classList.toggle("active", r.dataset.docId === rowId));
  const top = els.docView.querySelector("mark.top");
  if (top) top.scrollIntoView({ block: "nearest" });
  els.docCard.scrollIntoView({ block: "nearest", behavior: "smooth" });
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

function showCitation(idx, ci, docId, button) {
  const att = state.answers[idx].attribution;
  const c = att.citations[ci];
  const doc = docById(att, docId);
  const support = c.documents.find((d) => d.id === docId);
  const total = c.documents.reduce((s, d) => s + Math.max(0, d.score), 0) || 1;
  clearActive();
  button.classList.add("active");
  state.answers[idx].el.querySelector(`.sent[data-citation="${ci}"]`)?.classList.add("active");
  const claim = `<span class="label">Answer sentence · ${pct(Math.max(0, support.score) / total)} of its attribution goes to this document</span>“${esc(c.text)}”`;
  openDoc(att, doc, claim, support.sentences, docId);
  els.docCard.dataset.mode = "citation";
}

function showDocument(idx, docId) {
  const att = state.answers[idx].attribution;
  const doc = docById(att, docId);
  clearActive();
  openDoc(att, doc, `<span class="label">Whole answer</span>Sentences highlighted by their attribution to the complete answer.`, doc.sentences, docId);
  els.docCard.dataset.mode = "document";
}

function closeDoc() {
  els.docCard.hidden = true;
  $("help-card").hidden = false;
  clearActive();
  els.sources.querySelectorAll(".source-row.active").forEach((r) => r.classList.remove("active"));
}

loadStatus();
els.question.focus();
