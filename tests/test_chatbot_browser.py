"""End-to-end tests of the chatbot example in headless Chromium, driven by Playwright.

The app runs in-process (uvicorn in a thread, on a free localhost port) with the real embedded SmolLM2-135M-Instruct
and BM25 over the bundled sample documents. Chromium is Debian's (`apt-get install chromium`), never a downloaded
browser; set AT2_CHROMIUM to use another binary. The tests are skipped only when no Chromium binary is found.

Screenshots go to $AT2_ARTIFACTS (or a pytest temp folder); docs/img/chatbot.png and docs/img/chatbot-earlier-answer.png
are written when they are missing or when AT2_UPDATE_DOCS_IMG=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the example is the package `chatbot` inside examples/


def find_chromium() -> str | None:
    for candidate in (
        os.environ.get("AT2_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip(
        "Chromium not found (looked at $AT2_CHROMIUM, /usr/bin/chromium, `chromium` on PATH): "
        "install it with `apt-get install chromium` to run the browser tests",
        allow_module_level=True,
    )

from chatbot.app import create_app, load_default_attributor  # noqa: E402
from chatbot_server import ServerThread  # noqa: E402
from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUESTION = "How many vacation days do I get per year?"
FOLLOW_UP = "Can unused vacation days be carried over?"
RIGHT_DOC = "vacation-policy.md"
ANSWER_TIMEOUT_MS = 300_000  # a CPU shared with other work can be slow; an idle one answers in seconds


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = (
        Path(os.environ["AT2_ARTIFACTS"])
        if os.environ.get("AT2_ARTIFACTS")
        else tmp_path_factory.mktemp("chatbot-artifacts")
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def sample_server():
    # the model loads on the first question, so tests that never ask one stay fast
    app = create_app(attributor_factory=load_default_attributor, max_new_tokens=64)
    with ServerThread(app) as server:
        yield server


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_app(page: Page, url: str) -> None:
    page.goto(url)
    expect(page.locator("#status-docs")).to_contain_text(" indexed")


def docs_screenshot(page: Page, artifacts: Path, name: str) -> None:
    """A screenshot into the artifacts, copied to docs/img/ when it is missing there or AT2_UPDATE_DOCS_IMG=1."""
    shot = artifacts / name
    page.screenshot(path=str(shot), animations="disabled")
    docs_img = ROOT / "docs" / "img" / name
    if os.environ.get("AT2_UPDATE_DOCS_IMG") == "1" or not docs_img.exists():
        docs_img.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, docs_img)


# records, on every change of the conversation, the citation marks of the answer still streaming while Stop is shown
WATCH_LIVE_MARKS = """() => {
  window.liveMarks = [];
  new MutationObserver(() => {
    const streaming = document.querySelector(".msg.assistant.streaming");
    if (!streaming || document.querySelector("#stop").hidden) return;
    const marks = [...streaming.querySelectorAll("button.cite")];
    if (!marks.length) return;
    const seen = {
      text: streaming.querySelector(".answer-text").innerText.length,
      marks: marks.map((m) => ({ citation: m.dataset.citation, doc: m.dataset.doc, n: m.dataset.n })),
    };
    if (!window.liveMarks.length) {  // hover the first mark now, mid-stream: its preview shows at once
      marks[0].dispatchEvent(new MouseEvent("mouseover", { bubbles: true }));
      const preview = document.querySelector("#preview");
      seen.preview = preview.hidden ? null : preview.innerText;
      marks[0].dispatchEvent(new MouseEvent("mouseout", { bubbles: true }));
    }
    window.liveMarks.push(seen);
  }).observe(document.querySelector("#messages"), { childList: true, subtree: true, characterData: true });
}"""


def ask(page: Page, question: str, answers_before: int) -> None:
    page.fill("#question", question)
    page.click("#send")
    expect(page.locator(".msg.user .bubble").last).to_have_text(question)
    # the answer is done (attribution rendered) when its meta line appears
    expect(page.locator(".msg.assistant .meta")).to_have_count(answers_before + 1, timeout=ANSWER_TIMEOUT_MS)


def test_empty_question_shows_an_error_without_asking_the_server(page, sample_server):
    open_app(page, sample_server.url)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/api/chat" in r.url else None)
    page.click("#send")
    expect(page.locator("#composer-error")).to_be_visible()
    expect(page.locator("#composer-error")).to_have_text("Please type a question before sending.")
    page.fill("#question", "   ")
    page.press("#question", "Enter")
    expect(page.locator("#composer-error")).to_be_visible()
    assert requests == [] and page.locator(".msg").count() == 0
    page.fill("#question", "How")  # typing clears the error
    expect(page.locator("#composer-error")).to_be_hidden()


def chat_requests(page: Page) -> list[dict]:
    """The bodies of the page's POST /api/chat requests, as they happen."""
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/api/chat") else None)
    return sent


def test_over_long_question_is_refused_in_the_page_and_kept_in_the_box(page, sample_server, artifacts):
    open_app(page, sample_server.url)
    sent = chat_requests(page)
    question = "How many vacation days do I get per year? " * 60  # 2,519 characters once trimmed
    page.fill("#question", question)
    count = page.locator("#question-count")
    expect(count).to_have_text("2,519 / 2,000 characters")
    expect(count).to_have_class(re.compile(r"\bover\b"))
    page.click("#send")
    error = page.locator("#composer-error")
    expect(error).to_have_text(
        "Your question is 2,519 characters long; the limit is 2,000. Please shorten it and send it again."
    )
    expect(page.locator("#question")).to_have_value(question)  # kept for editing
    page.screenshot(path=str(artifacts / "chatbot-question-too-long.png"))
    assert sent == [] and page.locator(".msg").count() == 0

    page.fill("#question", question[:1990])  # shortened: the error goes, the counter is no longer red
    expect(error).to_be_hidden()
    expect(count).to_have_text("1,990 / 2,000 characters")
    expect(count).not_to_have_class(re.compile(r"\bover\b"))
    page.fill("#question", "How many vacation days?")
    expect(count).to_be_hidden()


def test_question_refused_by_the_server_is_shown_and_stays_in_the_box(page, sample_server, artifacts):
    # a page that does not know the limit (the status reply without it, as from an older server) still
    # gets the server's 413, shown in the conversation, and the typed question stays in the box
    def status_without_limit(route):
        status = route.fetch().json()
        status.pop("max_question_chars", None)
        route.fulfill(json=status)

    page.route("**/api/status", status_without_limit)
    open_app(page, sample_server.url)
    sent = chat_requests(page)
    question = "How many vacation days do I get per year? " * 60
    page.fill("#question", question)
    expect(page.locator("#question-count")).to_be_hidden()
    page.click("#send")
    error = page.locator(".msg.error")
    expect(error).to_have_attribute("data-kind", "question_too_long")
    expect(error).to_contain_text("Question too long")
    expect(error).to_contain_text("Your question is 2,519 characters long; the limit is 2,000.")
    expect(page.locator("#question")).to_have_value(question)
    expect(page.locator("#send")).to_be_enabled()
    assert len(sent) == 1
    page.screenshot(path=str(artifacts / "chatbot-question-refused-by-server.png"))


def test_history_sent_stays_within_the_servers_limits(page):
    # the server accepts 3 earlier messages of 80 characters in all: the page sends the newest that fit
    app = create_app(attributor_factory=load_default_attributor, max_history=3, max_history_chars=80)
    with ServerThread(app) as server:
        open_app(page, server.url)
        turns = [
            {"role": "user", "content": "u" * 40}, {"role": "assistant", "content": "a" * 30},
            {"role": "user", "content": "U" * 40}, {"role": "assistant", "content": "A" * 30},
        ]
        page.evaluate("(turns) => state.history.push(...turns)", turns)
        sent = chat_requests(page)
        page.fill("#question", "xyzzy plugh")  # matches no document: answered without the model
        page.click("#send")
        error = page.locator(".msg.error")
        expect(error).to_have_attribute("data-kind", "no_match")
        expect(page.locator("#question")).to_have_value("xyzzy plugh")  # a failed send keeps the text
        assert [t["content"] for t in sent[0]["history"]] == ["U" * 40, "A" * 30]


@pytest.mark.slow
def test_multi_turn_chat_with_citations_and_highlighted_sources(page, sample_server, artifacts):
    open_app(page, sample_server.url)

    # ---- turn 1: the answer streams in, each sentence gets its citation marks as soon as it is complete ----
    page.evaluate(WATCH_LIVE_MARKS)
    ask(page, QUESTION, answers_before=0)
    answer = page.locator(".msg.assistant").first
    expect(answer.locator(".answer-text")).to_contain_text("27")
    marks = answer.locator("button.cite")
    assert marks.count() >= 1
    # a mark was on the page while the answer was still streaming (Stop shown), and more text came after it
    live = page.evaluate("window.liveMarks")
    assert live, "no citation mark appeared before the answer ended"
    assert live[-1]["text"] > live[0]["text"], live
    assert live[0]["preview"] and "of this sentence's attribution" in live[0]["preview"], live[0]
    # the final attribution keeps it: the same sentence cites the same document with the same number
    for mark in live[0]["marks"]:
        final = answer.locator(f"button.cite[data-citation='{mark['citation']}'][data-doc='{mark['doc']}']")
        expect(final).to_have_attribute("data-n", mark["n"])
    expect(answer.locator(".unsupported-flag")).to_have_count(0)

    # the side panel ranks the retrieved documents by attribution: the vacation policy first
    rows = page.locator("#sources .source-row")
    expect(rows).to_have_count(4)
    expect(rows.first).to_have_attribute("data-doc-id", RIGHT_DOC)
    expect(rows.first.locator(".title")).to_have_text("Vacation and Paid Time Off")
    percents = [int(t.strip("%")) for t in rows.locator(".pct").all_inner_texts()]
    assert percents == sorted(percents, reverse=True) and percents[0] > percents[1], percents

    # clicking the first sentence's mark for the vacation policy shows it with the supporting sentence highlighted
    mark = answer.locator(f"button.cite[data-citation='0'][data-doc='{RIGHT_DOC}']")
    expect(mark).to_have_count(1)
    mark.click()
    expect(page.locator("#doc-card")).to_be_visible()
    expect(page.locator("#doc-title")).to_have_text(f"[{mark.get_attribute('data-n')}] Vacation and Paid Time Off")
    expect(page.locator("#doc-claim")).to_contain_text("27 days")
    highlights = page.locator("#doc-view mark.hl")
    assert 1 <= highlights.count() <= 3
    expect(page.locator("#doc-view mark.hl.top")).to_contain_text("receives 27 days of paid vacation")
    expect(mark).to_have_class("cite active")
    expect(answer.locator(".sent.active")).to_have_count(1)
    expect(page.locator("#sources .source-row.active")).to_have_attribute("data-doc-id", RIGHT_DOC)

    docs_screenshot(page, artifacts, "chatbot.png")

    # citation numbers: every mark's number is the number its document has in the sources list, with the same title
    for cite in answer.locator("button.cite").all():
        row = page.locator(f"#sources .source-row[data-doc-id='{cite.get_attribute('data-doc')}']")
        expect(row.locator(".num")).to_have_text(cite.get_attribute("data-n"))
        assert (
            cite.get_attribute("aria-label")
            == f"Source {cite.get_attribute('data-n')}: {row.locator('.title').inner_text()}"
        )

    # clicking a source row shows the whole-answer sentence scores of that document
    rows.nth(1).click()
    expect(page.locator("#doc-card")).to_have_attribute("data-mode", "document")
    expect(page.locator("#doc-claim")).to_contain_text("Whole answer")

    # highlights share one scale across documents: the main source's strongest sentence is full strength, a source
    # with a small share looks weak (or has no highlight at all), never as bright as the main one
    def strengths(row_index: int) -> list[float]:
        rows.nth(row_index).click()
        expect(page.locator("#doc-view")).to_have_attribute(
            "data-doc-id", rows.nth(row_index).get_attribute("data-doc-id")
        )
        return [
            float(x) for x in page.locator("#doc-view mark.hl").evaluate_all("ms => ms.map(m => m.dataset.strength)")
        ]

    assert max(strengths(0)) == 1.0
    weak = [i for i, p in enumerate(percents) if p <= 10]
    assert weak, percents
    for i in weak:
        assert all(x < 0.5 for x in strengths(i)), (i, percents)
    rows.nth(1).click()

    # ---- turn 2: the earlier turn goes to the model as history ---------------------------------------------
    with page.expect_request(lambda r: r.url.endswith("/api/chat") and r.method == "POST") as req:
        ask(page, FOLLOW_UP, answers_before=1)
    sent = json.loads(req.value.post_data)
    assert sent["question"] == FOLLOW_UP
    assert [t["role"] for t in sent["history"]] == ["user", "assistant"]
    assert sent["history"][0]["content"] == QUESTION and "27" in sent["history"][1]["content"]
    second = page.locator(".msg.assistant").nth(1)
    expect(second.locator(".answer-text")).not_to_be_empty()
    assert second.locator("button.cite, .flag-sentence, .ctx-mark").count() >= 1
    expect(second).to_have_class(re.compile(r"\bselected\b"))  # the side panel follows the newest answer
    expect(page.locator("#sources-sub")).to_contain_text("Answer 2")
    page.screenshot(path=str(artifacts / "chatbot-two-turns.png"))


@pytest.mark.slow
def test_context_too_long_is_shown_in_the_page(page, artifacts):
    # a server that accepts long questions: the model's context window is the limit that refuses this one
    app = create_app(attributor_factory=load_default_attributor, max_question_chars=100_000)
    with ServerThread(app) as server:
        open_app(page, server.url)
        question = "vacation days " * 5000
        page.fill("#question", question)
        page.click("#send")
        error = page.locator(".msg.error")
        expect(error).to_have_attribute("data-kind", "context_too_long", timeout=ANSWER_TIMEOUT_MS)
        expect(error).to_contain_text("Too long for the model")
        expect(error).to_contain_text(
            "Your question is too long for the model to read together with the retrieved documents"
        )
        expect(error).to_contain_text("Please shorten the question.")
        expect(error).not_to_contain_text("max_new_tokens")
        expect(page.locator("#send")).to_be_enabled()
        expect(page.locator("#question")).to_have_value(question)
        page.screenshot(path=str(artifacts / "chatbot-context-too-long.png"))


def test_unreadable_files_are_listed_in_the_status_area(page, tmp_path):
    (tmp_path / "coffee.md").write_text("# Coffee\n\nThe espresso machine is descaled every Monday.\n")
    (tmp_path / "old-notes.txt").write_bytes("Caf\xe9 menu".encode("latin-1"))
    (tmp_path / "dangling.md").symlink_to(tmp_path / "gone.md")
    with ServerThread(create_app(tmp_path, attributor_factory=load_default_attributor)) as server:
        open_app(page, server.url)
        expect(page.locator("#status-docs")).to_contain_text("1 document indexed · 2 skipped")
        banner = page.locator("#status-banner")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("old-notes.txt")
        expect(banner).to_contain_text("not valid UTF-8")
        expect(banner).to_contain_text("dangling.md")


def test_no_documents_is_shown_in_the_page(page, tmp_path, artifacts):
    with ServerThread(create_app(tmp_path, attributor_factory=load_default_attributor)) as server:
        page.goto(server.url)
        expect(page.locator("#status-docs")).to_contain_text("No documents")
        expect(page.locator("#status-banner")).to_contain_text("No documents are indexed")
        page.fill("#question", "Is anything indexed?")
        page.click("#send")
        error = page.locator(".msg.error")
        expect(error).to_have_attribute("data-kind", "no_documents")
        expect(error).to_contain_text(str(tmp_path))
        page.screenshot(path=str(artifacts / "chatbot-no-documents.png"))


HONESTY = "Citations show what the model used, not whether it is true."
CANOPY = "How many requests per minute does the Canopy API allow?"
WEATHER = "What is the weather like in the office today?"  # no document says: the small model makes it up
REPEAT = "Can you repeat your previous answer?"  # retrieves other documents than the weather question


@pytest.mark.slow
def test_marks_for_an_earlier_answer_and_for_a_sentence_not_from_the_documents(page, artifacts):
    # a server that takes only the last 2 messages of history: the page sends the newest turns, and a history index
    # in the reply must still be mapped to the right message of the conversation on the page
    app = create_app(attributor_factory=load_default_attributor, max_new_tokens=64, max_history=2)
    with ServerThread(app) as server:
        open_app(page, server.url)
        note = page.locator("#honesty-note")
        expect(note).to_be_visible()
        expect(note).to_have_text(HONESTY)
        answers = page.locator(".msg.assistant")

        ask(page, CANOPY, answers_before=0)  # answered from a document: a citation mark, no other mark
        expect(answers.nth(0).locator("button.cite")).not_to_have_count(0)
        expect(answers.nth(0).locator(".flag-sentence, .ctx-mark")).to_have_count(0)

        # ---- an answer no retrieved document supports: "not from your documents" ---------------------------
        ask(page, WEATHER, answers_before=1)
        weather = answers.nth(1)
        payload = page.evaluate("state.answers[1].attribution")
        flagged = [i for i, c in enumerate(payload["citations"]) if c["mark"] == "not_from_documents"]
        assert flagged and all(not payload["citations"][i]["supported"] for i in flagged), payload["citations"]
        flags = weather.locator(".flag-sentence")
        expect(flags).to_have_count(len(flagged))
        expect(flags.first).to_have_text("not from your documents")
        expect(weather.locator(f".sent.unsupported[data-citation='{flagged[0]}']")).to_be_visible()
        expect(weather.locator(".unsupported-flag")).to_contain_text("Not from your documents.")
        expect(weather.locator(".unsupported-flag")).to_be_in_viewport()  # the chat scrolled to it after the citations

        # ---- "repeat your previous answer": "from the earlier answer", which shows that answer -----------------
        with page.expect_request(lambda r: r.url.endswith("/api/chat") and r.method == "POST") as req:
            ask(page, REPEAT, answers_before=2)
        sent = json.loads(req.value.post_data)["history"]
        assert [t["content"] for t in sent] == [WEATHER, page.evaluate("state.answers[1].attribution.answer")]
        payload = page.evaluate("state.answers[2].attribution")
        repeats = [c for c in payload["citations"] if c["mark"] == "earlier_answer"]
        assert repeats and {c["earlier_answer"]["history_index"] for c in repeats} == {1}, payload["citations"]
        # history index 1 of the 2 messages sent is the weather answer: answer 2 on the page, not answer 1
        repeat = answers.nth(2)
        mark = repeat.locator("button.ctx-mark")
        expect(mark).to_have_count(len(repeats))
        expect(mark.first).to_have_text("↩from the earlier answer")
        expect(mark.first).to_have_attribute("data-answer", "1")
        expect(mark.first).to_have_attribute("aria-label", "From the earlier answer: show answer 2 in the conversation")
        expect(repeat.locator(".flag-sentence")).to_have_count(
            sum(c["mark"] == "not_from_documents" for c in payload["citations"])
        )  # a sentence marked as from the earlier answer is not also flagged
        expect(page.locator("#sources .sources-note.ctx")).to_contain_text("answer 2 of this conversation")

        page.locator(".messages").evaluate("el => { el.scrollTop = el.scrollHeight; }")
        mark.first.click()
        expect(weather).to_have_class(re.compile(r"\brecalled\b"))
        expect(weather.locator(".recall-note")).to_have_text("↩ Answer 3 repeats this earlier answer")
        expect(weather).to_be_focused()
        expect(weather).to_be_in_viewport()
        expect(answers.nth(0)).not_to_have_class(re.compile(r"\brecalled\b"))
        expect(mark.first).to_have_class(re.compile(r"\bactive\b"))
        expect(note).to_be_visible()
        docs_screenshot(page, artifacts, "chatbot-earlier-answer.png")

        # a citation mark clears the highlight
        answers.nth(0).locator("button.cite").first.click()
        expect(page.locator(".msg.recalled")).to_have_count(0)
        expect(page.locator(".recall-note")).to_have_count(0)

        # ---- the same conversation on a phone: nothing wider than the screen, the marks readable ---------------
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for locator in (mark.first, flags.first, note):
            locator.scroll_into_view_if_needed()
            box = locator.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, box
        # on a phone the document opened by the citation above is a sheet over the page: tapping outside closes it
        expect(page.locator("#doc-card")).to_be_in_viewport()
        page.locator("#doc-scrim").click(position={"x": 10, "y": 10})
        expect(page.locator("#doc-card")).to_be_hidden()
        mark.first.click()
        expect(weather).to_have_class(re.compile(r"\brecalled\b"))
        expect(weather).to_be_in_viewport()
        page.screenshot(
            path=str(artifacts / "chatbot-earlier-answer-mobile.png"), full_page=True, animations="disabled"
        )
