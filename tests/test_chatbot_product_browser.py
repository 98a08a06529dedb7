"""The chatbot as a product, in headless Chromium (Debian's) driven by Playwright, against the real server and the
real embedded SmolLM2-135M-Instruct: documents uploaded from the page (file picker and drag and drop, .txt/.md/.pdf),
listed and removed; the citation preview on hover and focus; the whole-document view; Copy; conversations kept
over a reload, with the list of past chats; Regenerate; Stop (the partial answer is still attributed); New chat
during streaming; the status badge following the server; safe Markdown; the phone layout and dark mode.

Skipped only when no Chromium binary is found (see test_chatbot_browser.py). Screenshots go to $AT2_ARTIFACTS (or a
temporary folder); docs/img/chatbot-{documents,mobile,dark}.png are written when missing or with AT2_UPDATE_DOCS_IMG=1.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the example is the package `chatbot`

from chatbot.app import create_app, load_default_attributor  # noqa: E402
from chatbot.streaming import model_busy  # noqa: E402
from playwright.sync_api import Page, expect  # noqa: E402
from test_chatbot_browser import (  # noqa: E402, F401  (skips without Chromium; fixtures: artifacts, browser)
    ANSWER_TIMEOUT_MS,
    QUESTION,
    ServerThread,
    artifacts,
    browser,
    docs_screenshot,
    open_app,
)
from test_chatbot_documents import ZEPHYR, make_pdf  # noqa: E402

ZEPHYR_QUESTION = "How long does the Zephyr drone fly on one charge?"


@pytest.fixture()
def context(browser):  # noqa: F811
    context = browser.new_context(viewport={"width": 1360, "height": 860})
    yield context
    context.close()


@pytest.fixture()
def page(context):
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    assert not errors, f"JavaScript errors on the page: {errors}"


def write(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def wait_answers(page: Page, n: int) -> None:
    expect(page.locator(".msg.assistant .meta")).to_have_count(n, timeout=ANSWER_TIMEOUT_MS)


def wait_first_token(page: Page) -> None:
    """Until the streamed answer shows text of its own (not the 'Searching…' / 'Reading…' placeholder)."""
    page.wait_for_function(
        "() => { const m = document.querySelector('.msg.assistant.streaming .answer-text');"
        " return m && !m.querySelector('.thinking') && m.textContent.trim().length > 0; }",
        timeout=ANSWER_TIMEOUT_MS,
    )


# ---- no model ----------------------------------------------------------------------------------------------------
def test_upload_list_and_remove_documents_in_the_page(page, tmp_path, artifacts):  # noqa: F811
    files = tmp_path / "files"
    files.mkdir()
    app = create_app(
        attributor_factory=load_default_attributor, upload_dir=tmp_path / "uploads", max_upload_bytes=64 * 1024
    )
    with ServerThread(app) as server:
        open_app(page, server.url)
        expect(page.locator("#docs-sub")).to_have_text("12 indexed · 0 uploaded")
        uploaded = page.locator(".doc-list.uploaded .doc-item")

        # several files at once through the file picker: text, Markdown and a PDF
        page.set_input_files("#file-input", [
            write(files, "notes.md", b"# Lab notes\n\nThe quartz sample melted at 1712 degrees."),
            write(files, "hours.txt", b"The cafe opens at 8."),
            write(files, "zephyr.pdf", make_pdf([ZEPHYR], title="Zephyr data sheet")),
        ])
        expect(uploaded).to_have_count(3)
        expect(page.locator("#upload-message")).to_contain_text(
            "Added notes.md, hours.txt, zephyr.pdf: searchable now."
        )
        expect(page.locator("#status-docs")).to_contain_text("15 documents indexed")
        expect(uploaded.locator(".doc-kind")).to_have_text(["MD", "TXT", "PDF"])

        # drag and drop anywhere on the page
        page.evaluate("""() => {
            const dt = new DataTransfer();
            dt.items.add(new File(["Dropped facts: the tide peaks at noon."], "dropped.txt", { type: "text/plain" }));
            for (const type of ["dragenter", "dragover", "drop"])
                document.querySelector(".messages").dispatchEvent(
                    new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
        }""")
        expect(uploaded).to_have_count(4)
        expect(page.locator("#drop-overlay")).to_be_hidden()
        names = [
            d["name"]
            for d in page.evaluate("fetch('/api/documents').then(r => r.json())")["documents"]
            if d["source"] == "upload"
        ]
        assert names == ["notes.md", "hours.txt", "zephyr.pdf", "dropped.txt"]

        # refused: an unsupported type and an over-large file (checked in the page), text that is not UTF-8 (by the
        # server)
        page.set_input_files("#file-input", [write(files, "tool.exe", b"MZ")])
        expect(page.locator("#upload-message")).to_have_text(
            "tool.exe: .exe files are not supported; upload .txt, .md or .pdf files."
        )
        expect(page.locator("#upload-message")).to_have_class(re.compile(r"\berror\b"))
        page.set_input_files("#file-input", [write(files, "big.txt", b"x" * (64 * 1024 + 1))])
        expect(page.locator("#upload-message")).to_contain_text("big.txt is larger than the limit of 64 KB")
        page.set_input_files("#file-input", [write(files, "latin1.txt", "caf\u00e9".encode("latin-1"))])
        expect(page.locator("#upload-message")).to_have_text(
            "latin1.txt is not valid UTF-8 text (byte 3); upload UTF-8 text."
        )
        expect(uploaded).to_have_count(4)

        # the folder's files are listed, read-only
        page.locator(".folder-docs summary").click()
        expect(page.locator(".folder-docs .doc-item")).to_have_count(12)
        expect(page.locator(".folder-docs .doc-remove")).to_have_count(0)
        docs_screenshot(page, artifacts, "chatbot-documents-list.png")

        # remove one: it leaves the list and the index
        page.locator(".doc-item", has_text="hours.txt").locator(".doc-remove").click()
        expect(uploaded).to_have_count(3)
        expect(page.locator("#upload-message")).to_have_text("Removed: it is no longer searched.")
        expect(page.locator("#status-docs")).to_contain_text("15 documents indexed")  # 12 + 3
        assert "hours.txt" not in json.dumps(page.evaluate("fetch('/api/documents').then(r => r.json())"))
        assert all(
            d.metadata["path"] != "hours.txt" for d in app.state.service.retrieve("When does the cafe open?", [])
        )
        assert app.state.service.retrieve("quartz", [])[0].metadata["path"] == "notes.md"


def test_the_status_badge_follows_the_server(page):
    app = create_app(attributor_factory=load_default_attributor)
    server = ServerThread(app).__enter__()
    port = server.port
    try:
        open_app(page, server.url)
        expect(page.locator("#status-docs")).to_have_class("pill")
    finally:
        server.__exit__(None, None, None)
    # the server is down: within a poll or two the badge says so
    expect(page.locator("#status-docs")).to_have_text("Server unreachable", timeout=20_000)
    expect(page.locator("#status-docs")).to_have_class(re.compile(r"\berror\b"))
    # back up on the same address: the badge follows
    with ServerThread(create_app(attributor_factory=load_default_attributor), port):
        expect(page.locator("#status-docs")).to_have_text("12 documents indexed", timeout=20_000)
        expect(page.locator("#status-docs")).to_have_class("pill")


def test_with_auth_the_page_asks_for_a_token_and_shows_only_that_users_uploads(browser, tmp_path):  # noqa: F811
    """--auth: a first visit with #token=… keeps the token for the tab and removes it from the address; without a
    token the page asks for one; each user's page lists and uploads only their own documents."""
    tokens = {"alice": "alice-token-0123456789", "bob": "bob-token-abcdefghijkl"}
    app = create_app(attributor_factory=load_default_attributor, upload_dir=tmp_path / "u", auth=tokens)
    files = tmp_path / "files"
    files.mkdir()
    uploaded = ".doc-list.uploaded .doc-item"
    with ServerThread(app) as server:
        root = server.url.rstrip("/") + "/"
        alice = browser.new_context().new_page()
        alice.goto(f"{root}#token={tokens['alice']}")
        expect(alice.locator("#status-docs")).to_contain_text("12 documents indexed")
        assert alice.url == root  # the token left the address (and the history)
        assert alice.evaluate("sessionStorage.getItem('at2-chat:token')") == tokens["alice"]
        expect(alice.locator("#auth-form")).to_be_hidden()
        alice.set_input_files("#file-input", [write(files, "vault.txt", b"The vault code of Quillfeather is 4815.")])
        expect(alice.locator(uploaded)).to_have_count(1)

        bob = browser.new_context().new_page()  # another person: no token yet
        bob.goto(root)
        expect(bob.locator("#auth-form")).to_be_visible()
        expect(bob.locator("#status-docs")).to_have_text("Access token needed")
        bob.fill("#auth-token", "a-wrong-token-0123456789")
        bob.click("#auth-submit")
        expect(bob.locator("#auth-message")).to_contain_text("not accepted")
        bob.fill("#auth-token", tokens["bob"])
        bob.click("#auth-submit")
        expect(bob.locator("#auth-form")).to_be_hidden()
        expect(bob.locator("#status-docs")).to_contain_text("12 documents indexed")
        expect(bob.locator("#docs-sub")).to_have_text("12 indexed · 0 uploaded")
        expect(bob.locator(uploaded)).to_have_count(0)  # Alice's upload is not Bob's
        bob.set_input_files("#file-input", [write(files, "garden.txt", b"Bob's garden has seven apple trees.")])
        expect(bob.locator(uploaded)).to_have_count(1)
        expect(bob.locator(uploaded)).to_contain_text("garden.txt")
        alice.reload()  # the token stays for the tab
        expect(alice.locator(uploaded)).to_have_count(1)
        expect(alice.locator(uploaded)).to_contain_text("vault.txt")
        alice.context.close()
        bob.context.close()


def test_markdown_is_rendered_safely_and_keeps_the_citation_marks(page, tmp_path):
    app = create_app(attributor_factory=load_default_attributor, upload_dir=tmp_path / "u")
    with ServerThread(app) as server:
        open_app(page, server.url)
        result = page.evaluate("""() => {
            const text = "Use **Canopy** and `pip install x`. <script>window.pwned = 1</script> <img src=x onerror=alert(1)>\\n" +
                "- first [docs](https://example.com/a?b=1) item.\\n- second [bad](javascript:alert(1)) item.\\n\\n1. one\\n2. two";
            const first = text.indexOf(".") + 1;
            const spans = [{ start: 0, end: first }, { start: text.indexOf("- first") + 2, end: text.indexOf("item.") + 5 }];
            const decorate = { wrap: (ci, html) => `<span class="sent" data-citation="${ci}">${html}</span>`,
                               after: (ci) => `<button class="cite" data-citation="${ci}">${ci + 1}</button>` };
            const box = document.createElement("div");
            box.innerHTML = renderMarkdown(text, spans, decorate);
            document.body.appendChild(box);
            return {
                html: box.innerHTML, scripts: box.querySelectorAll("script, img").length, pwned: window.pwned ?? null,
                links: [...box.querySelectorAll("a")].map((a) => [a.textContent, a.getAttribute("href"), a.rel]),
                strong: box.querySelector("strong")?.textContent, code: box.querySelector("code")?.textContent,
                ul: [...box.querySelectorAll("ul > li")].map((li) => li.textContent), ol: box.querySelectorAll("ol > li").length,
                sent0: box.querySelector('.sent[data-citation="0"]').textContent,
                afterSent0: box.querySelector('.sent[data-citation="0"]').nextElementSibling?.outerHTML,
                sent1: box.querySelector('.sent[data-citation="1"]').textContent,
            };
        }""")  # noqa: E501 - browser-side JavaScript test data, kept as written
        assert result["scripts"] == 0 and result["pwned"] is None, result["html"]
        assert "&lt;script&gt;" in result["html"] and "&lt;img" in result["html"]
        assert result["links"] == [["docs", "https://example.com/a?b=1", "noopener noreferrer nofollow"]]
        assert "[bad](javascript:alert(1))" in result["ul"][1]
        assert result["strong"] == "Canopy" and result["code"] == "pip install x"
        assert result["ul"][0].startswith("first docs item.") and result["ol"] == 2
        assert result["sent0"] == "Use Canopy and pip install x."
        assert result["afterSent0"] == '<button class="cite" data-citation="0">1</button>'
        assert result["sent1"] == "first docs item."


# ---- with the real model ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_answer_from_an_uploaded_pdf_preview_document_copy_memory_regenerate_phone_and_dark(
    context, page, tmp_path, artifacts  # noqa: F811 - the fixture, imported above so pytest finds it
):
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    pdf = tmp_path / "zephyr.pdf"
    pdf.write_bytes(
        make_pdf(["Zephyr drone specifications.", ZEPHYR, "It weighs 900 grams."], title="Zephyr data sheet")
    )
    app = create_app(attributor_factory=load_default_attributor, max_new_tokens=48, upload_dir=tmp_path / "uploads")
    with ServerThread(app) as server:
        open_app(page, server.url)
        page.set_input_files("#file-input", [str(pdf)])
        expect(page.locator(".doc-list.uploaded .doc-item")).to_have_count(1)

        page.fill("#question", ZEPHYR_QUESTION)
        page.click("#send")
        expect(page.locator("#stop")).to_be_visible()
        wait_answers(page, 1)
        answer = page.locator(".msg.assistant").first
        expect(answer.locator(".answer-text")).to_contain_text("47")
        att = page.evaluate("state.answers[0].attribution")
        (doc,) = [d for d in att["documents"] if d["metadata"]["path"] == "zephyr.pdf"]
        assert doc["metadata"]["source"] == "upload"
        assert doc["score"] == max(d["score"] for d in att["documents"])  # the uploaded PDF is the main source
        expect(page.locator("#sources .source-row").first.locator(".path")).to_have_text("zephyr.pdf · uploaded")
        marks = answer.locator(f"button.cite[data-doc='{doc['id']}']")
        expect(marks.first).to_be_visible()
        n = doc["index"] + 1

        # ---- the preview: on hover, and on keyboard focus, without clicking ---------------------------------------
        preview = page.locator("#preview")
        expect(preview).to_be_hidden()
        marks.first.hover()
        expect(preview).to_be_visible()
        expect(preview.locator(".pv-title")).to_have_text(f"{n}Zephyr data sheet")
        expect(preview.locator(".pv-quote")).to_contain_text("47 minutes")
        expect(preview).to_contain_text("of this sentence's attribution · zephyr.pdf")
        docs_screenshot(page, artifacts, "chatbot-preview.png")
        page.mouse.move(5, 5)
        expect(preview).to_be_hidden()
        marks.first.focus()
        expect(preview).to_be_visible()
        page.keyboard.press("Escape")
        expect(preview).to_be_hidden()

        # ---- the document view: the whole file, the passage outlined, the supporting sentence highlighted ---------
        marks.first.click()
        view = page.locator("#doc-view")
        expect(view).to_have_attribute("data-view", "file")
        expect(view.locator("mark.hl.top")).to_contain_text("47 minutes")
        expect(view.locator(".passage")).to_have_count(1)
        expect(page.locator("#doc-meta")).to_contain_text("whole file")
        whole = page.evaluate(f"fetch('/api/documents/{doc['metadata']['doc_id']}').then(r => r.json())")
        assert view.inner_text().replace("\n", "") == whole["text"].replace("\n", "")
        docs_screenshot(page, artifacts, "chatbot-documents.png")

        # ---- Copy: the answer with its [n] marks and the sources ---------------------------------------------------
        answer.locator("[data-action=copy]").click()
        expect(answer.locator("[data-action=copy]")).to_have_text("Copied")
        copied = page.evaluate("navigator.clipboard.readText()")
        assert copied.startswith(att["cited_answer"]) and f"[{n}]" in copied
        sources = copied.split("\n\nSources:\n", 1)[1].splitlines()
        assert f"[{n}] Zephyr data sheet (zephyr.pdf)" in sources
        cited = {i for c in att["citations"] for i in c["cited"]}
        assert len(sources) == len(cited)

        # ---- memory: the conversation survives a reload; the list of past chats ------------------------------------
        page.reload()
        open_app(page, server.url)
        expect(page.locator(".msg.user .bubble")).to_have_text([ZEPHYR_QUESTION])
        expect(page.locator(".msg.assistant button.cite")).to_have_count(sum(len(c["cited"]) for c in att["citations"]))
        assert page.evaluate("state.answers[0].attribution.answer") == att["answer"]
        expect(page.locator("#chats-button")).to_have_text("Chats (1)")
        page.click("#chats-button")
        expect(page.locator("#chats-list .chat-item.current .chat-title")).to_have_text(ZEPHYR_QUESTION)
        page.keyboard.press("Escape")
        expect(page.locator("#chats-panel")).to_be_hidden()

        # ---- the phone: one line of tagline, nothing wider than the screen, a tapped mark opens a sheet in place ---
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        tagline = page.locator(".tagline").bounding_box()
        assert tagline["height"] <= 20, tagline
        for card in page.locator(".card:visible, .chat, .msg .bubble").all():
            box = card.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390, box
        mark = page.locator(f".msg.assistant button.cite[data-doc='{doc['id']}']").first
        mark.scroll_into_view_if_needed()
        scrolled = page.evaluate("window.scrollY")
        mark.click()
        card = page.locator("#doc-card")
        expect(card).to_be_in_viewport()
        box = card.bounding_box()
        assert box["y"] + box["height"] <= 844 + 1 and box["y"] > 844 * 0.2, box
        assert abs(page.evaluate("window.scrollY") - scrolled) <= 2  # the page did not jump away from the answer
        expect(page.locator("#doc-view mark.hl.top")).to_be_in_viewport()
        docs_screenshot(page, artifacts, "chatbot-mobile.png")
        page.locator("#doc-scrim").click(position={"x": 10, "y": 10})
        expect(card).to_be_hidden()

        # ---- dark mode: the system's preference, and the switch in the header --------------------------------------
        page.set_viewport_size({"width": 1360, "height": 860})
        page.emulate_media(color_scheme="dark")
        expect(page.locator("html")).to_have_attribute("data-theme", "dark")
        page.locator(f".msg.assistant button.cite[data-doc='{doc['id']}']").first.click()
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert sum(int(x) for x in re.findall(r"\d+", background)[:3]) < 120, background
        docs_screenshot(page, artifacts, "chatbot-dark.png")
        page.click("#theme")  # auto -> dark (explicit), kept
        page.click("#theme")  # dark -> light
        expect(page.locator("html")).to_have_attribute("data-theme", "light")
        assert page.evaluate("localStorage.getItem('at2-chat:theme')") == "light"
        page.emulate_media(color_scheme="light")

        # ---- Regenerate: the last answer is replaced by a sampled one -----------------------------------------------
        with page.expect_request(lambda r: r.url.endswith("/api/chat") and r.method == "POST") as req:
            page.locator(".msg.assistant [data-action=regenerate]").click()
        body = json.loads(req.value.post_data)
        assert body == {"question": ZEPHYR_QUESTION, "history": [], "regenerate": True}
        wait_answers(page, 1)
        expect(page.locator(".msg.user")).to_have_count(1)
        expect(page.locator(".msg.assistant .meta")).to_contain_text("regenerated (sampled)")
        assert page.evaluate("state.answers[0].attribution.sampled") is True
        stored = page.evaluate("JSON.parse(localStorage.getItem('at2-chat:chats'))")
        assert len(stored) == 1 and len(stored[0]["items"]) == 1
        assert stored[0]["items"][0]["attribution"]["sampled"] is True


@pytest.mark.slow
def test_stop_keeps_the_partial_answer_attributed_and_new_chat_works_while_streaming(page, tmp_path, artifacts):  # noqa: F811
    app = create_app(attributor_factory=load_default_attributor, max_new_tokens=160, upload_dir=tmp_path / "uploads")
    service = app.state.service
    with ServerThread(app) as server:
        open_app(page, server.url)

        # ---- Stop: generation ends there; the text so far is attributed and shown with its marks ------------------
        page.fill("#question", QUESTION)
        page.click("#send")
        wait_first_token(page)
        started = time.monotonic()
        page.click("#stop")
        wait_answers(page, 1)
        stop_seconds = time.monotonic() - started
        att = page.evaluate("state.answers[0].attribution")
        assert att["stopped"] is True and att["answer"].strip()
        expect(page.locator(".msg.assistant .meta")).to_contain_text("stopped")
        assert att["citations"], att
        expect(page.locator(".msg.assistant .sent")).to_have_count(len(att["citations"]))
        expect(page.locator("#send")).to_be_visible()
        expect(page.locator("#stop")).to_be_hidden()
        print(f"stop to attributed answer: {stop_seconds:.1f} s")

        # ---- New chat while an answer streams: the page starts over at once, the server stops generating ----------
        page.fill("#question", "What is the monthly internet allowance?")
        page.click("#send")
        wait_first_token(page)
        page.click("#new-chat")
        expect(page.locator(".msg")).to_have_count(0)
        expect(page.locator("#empty-state")).to_be_visible()
        expect(page.locator("#send")).to_be_visible()
        deadline = time.monotonic() + 120
        while (service.streams or model_busy(service.attributor)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not service.streams and not model_busy(service.attributor), "the generation went on after New chat"
        page.wait_for_timeout(500)
        expect(page.locator(".msg")).to_have_count(0)  # nothing of the dropped answer arrives afterwards
        stored = page.evaluate("JSON.parse(localStorage.getItem('at2-chat:chats'))")
        assert len(stored) == 1 and stored[0]["items"][0]["question"] == QUESTION  # only the first chat was kept
        assert page.evaluate("localStorage.getItem('at2-chat:current')") is None
