"""API tests of the chatbot example (examples/chatbot) with FastAPI's TestClient.

The validation, corpus and error-path tests never load the model; the `slow` ones generate real answers with the
embedded SmolLM2-135M-Instruct (greedy decoding, so they are deterministic).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the example is the package `chatbot` inside examples/

import chatbot.cli as chatbot_app  # noqa: E402
from chatbot.app import SAMPLE_DOCS, create_app, earlier_answer, load_default_attributor, main  # noqa: E402
from chatbot.corpus import BM25Index, load_folder  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from at2_rag import Citation, InvalidInputError  # noqa: E402
from at2_rag.attribution.marks import sentence_source  # noqa: E402
from at2_rag.attribution.result import (  # noqa: E402
    ATTRIBUTION_SCHEMA_VERSION,  # noqa: E402
    CitedDocument,
    ContextSource,
)

QUESTION = "How many vacation days do I get per year?"
RIGHT_DOC = "vacation-policy.md"

BASE = "http://127.0.0.1:8000"  # the Host the server answers to (it refuses other names: DNS rebinding)


def no_model():
    raise AssertionError("this request must be answered without loading the model")


def client_for(docs: Path | str = SAMPLE_DOCS, **kwargs) -> TestClient:
    kwargs.setdefault("attributor_factory", no_model)
    return TestClient(create_app(docs, **kwargs), base_url=BASE)


def parse_sse(body: str) -> list[tuple[str, dict]]:
    events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# ---- pages and status -----------------------------------------------------------------------------------
def test_page_and_static_files_are_served():
    client = client_for()
    page = client.get("/")
    assert page.status_code == 200 and "AT2 Cited Chat" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert "text/css" in client.get("/static/app.css").headers["content-type"]


def test_status_lists_the_sample_documents():
    status = client_for().get("/api/status").json()
    assert status["num_files"] == len(list(SAMPLE_DOCS.glob("*.md"))) >= 8
    assert RIGHT_DOC in status["files"]
    assert status["problems"] == [] and status["error"] is None
    assert status["suggestions"] and status["model_loaded"] is False  # loads lazily on the first question


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("question", ["", "   ", "\n\t "])
def test_empty_question_is_rejected_server_side(question):
    res = client_for().post("/api/chat", json={"question": question, "history": []})
    assert res.status_code == 400
    assert res.json() == {"error": "empty_question", "message": "Please type a question before sending."}


def test_missing_question_counts_as_empty():
    res = client_for().post("/api/chat", json={})
    assert res.status_code == 400 and res.json()["error"] == "empty_question"


@pytest.mark.parametrize(
    "body",
    [
        {"question": 3},
        {"question": "hi", "history": [{"role": "robot", "content": "x"}]},
        {"question": "hi", "history": "no"},
    ],
)
def test_malformed_requests_get_a_readable_422(body):
    res = client_for().post("/api/chat", json=body)
    assert res.status_code == 422
    data = res.json()
    assert data["error"] == "invalid_request" and data["message"].startswith("The request is malformed:")


def test_question_matching_no_document_is_reported():
    res = client_for().post("/api/chat", json={"question": "xyzzy plugh quux"})
    assert res.status_code == 404 and res.json()["error"] == "no_match"


# ---- size limits: refused before retrieval and the model (`no_model` fails the test if it loads) ------------
def test_over_long_question_is_refused_before_any_model_work():
    client = client_for()
    res = client.post("/api/chat", json={"question": "How many vacation days " * 870})  # 20,010 characters
    assert res.status_code == 413
    assert res.json() == {
        "error": "question_too_long",
        "message": "Your question is 20,009 characters long; the limit is 2,000. Please shorten it and send it again.",
        "length": 20009,
        "limit": 2000,
    }
    assert client.get("/api/status").json()["model_loaded"] is False


def test_question_limit_counts_the_trimmed_question_up_to_the_limit_inclusive():
    client = client_for()
    at_limit = client.post("/api/chat", json={"question": "  " + "x" * 2000 + " \n"})
    assert at_limit.status_code == 404 and at_limit.json()["error"] == "no_match"  # passed the guard
    over = client.post("/api/chat", json={"question": "x" * 2001})
    assert over.status_code == 413 and over.json()["error"] == "question_too_long"


def test_question_limit_is_configurable_and_reported_in_the_status():
    client = client_for(max_question_chars=50, max_history=4, max_history_chars=300)
    status = client.get("/api/status").json()
    assert (status["max_question_chars"], status["max_history"], status["max_history_chars"]) == (50, 4, 300)
    assert client.post("/api/chat", json={"question": "x" * 50}).status_code == 404
    res = client.post("/api/chat", json={"question": "x" * 51})
    assert res.status_code == 413 and "the limit is 50." in res.json()["message"]
    assert client_for().get("/api/status").json()["max_question_chars"] == 2000  # the default


def history(n: int, chars: int = 20) -> list[dict[str, str]]:
    return [{"role": ("user", "assistant")[i % 2], "content": "y" * chars} for i in range(n)]


def test_history_with_too_many_messages_is_refused():
    res = client_for().post("/api/chat", json={"question": "xyzzy", "history": history(8)})
    assert res.status_code == 413
    data = res.json()
    assert data["error"] == "history_too_long" and (data["messages"], data["max_messages"]) == (8, 6)
    assert data["message"] == (
        "The conversation sent with the question is too long (8 earlier messages, 160 characters); this server "
        "accepts at most 6 messages and 8,000 characters of history. Start a New chat, or send only the most "
        "recent turns."
    )


def test_history_with_too_many_characters_is_refused():
    client = client_for(max_history_chars=1000)
    res = client.post("/api/chat", json={"question": "xyzzy", "history": history(2, chars=501)})
    assert res.status_code == 413
    data = res.json()
    assert data["error"] == "history_too_long" and (data["chars"], data["max_chars"]) == (1002, 1000)
    assert "(2 earlier messages, 1,002 characters)" in data["message"]
    within = client.post("/api/chat", json={"question": "xyzzy", "history": history(2, chars=500)})
    assert within.status_code == 404 and within.json()["error"] == "no_match"  # passed the guard


def test_no_history_is_accepted_when_max_history_is_zero():
    client = client_for(max_history=0)
    assert client.post("/api/chat", json={"question": "xyzzy", "history": []}).status_code == 404
    res = client.post("/api/chat", json={"question": "xyzzy", "history": history(1)})
    assert res.status_code == 413 and "at most 0 messages" in res.json()["message"]


# ---- the "from the earlier answer" rule (a pure function of one sentence's scores) ---------------------------
THRESHOLD = 0.002


def sentence(
    docs: list[float],
    context: list[tuple[str, int | None, str, float]],
    supported: bool = True,
    context_grounded: float | None = None,
) -> Citation:
    """An answer sentence with these document scores and context sources (kind, index, role, score), best first;
    `context_grounded`: the measured drop without the earlier turns (None: not measured)."""
    text = "Employees get 27 days."
    return Citation(
        text=text,
        start=0,
        end=22,
        documents=[CitedDocument(index=i, id=f"doc{i}", score=score) for i, score in enumerate(docs)],
        cited=[] if not supported else ["doc0"],
        supported=supported,
        grounded=2.0 if supported else -3.0,
        # the assistant turns say the sentence (it is in them); the others say something else
        context=[
            ContextSource(kind=k, index=i, role=r, text=text if r == "assistant" else "...", score=score)
            for k, i, r, score in context
        ],
        context_grounded=context_grounded,
    )


def test_a_sentence_repeats_the_earlier_answer_that_scores_above_every_document():
    repeat = sentence(
        [0.004, 0.001], [("history", 3, "assistant", 0.05), ("history", 2, "user", 0.02)], supported=False
    )
    assert earlier_answer(repeat, THRESHOLD) == {"history_index": 3, "score": 0.05, "best_document_score": 0.004}
    assert sentence_source(repeat, THRESHOLD).mark == "earlier_answer"  # not also "not from documents"
    # supported by a document and drawing even more on the earlier answer: from the earlier answer, and then
    # without the document's number (one claim per sentence, issue 36 point 8)
    both = sentence([0.03], [("history", 1, "assistant", 0.04)])
    assert (
        earlier_answer(both, THRESHOLD)["history_index"] == 1
        and sentence_source(both, THRESHOLD).mark == "earlier_answer"
    )
    from chatbot.app import citation_payload

    assert both.cited == ["doc0"] and citation_payload(both, THRESHOLD)["cited"] == []


@pytest.mark.parametrize(
    "docs, context, why",
    [
        ([0.042], [("history", 1, "assistant", 0.039)], "a document scores higher"),
        ([0.039], [("history", 1, "assistant", 0.039)], "a tie is not above every document"),
        (
            [0.001],
            [("history", 0, "user", 0.05), ("history", 1, "assistant", 0.01)],
            "the best source is the user's turn",
        ),
        ([0.001], [("system", None, "system", 0.02)], "the best source is the system prompt"),
        ([0.0001], [("history", 1, "assistant", 0.001)], "below the support threshold"),
        ([0.001], [], "no context source"),
    ],
)
def test_no_earlier_answer_mark(docs, context, why):
    assert earlier_answer(sentence(docs, context), THRESHOLD) is None, why


def test_measured_earlier_answer_stands_on_context_grounded():
    """With measured groundedness the sentence is from an earlier answer only when removing the earlier turns lowers
    it by the threshold (1 nat here), and the best earlier turn it lists is an assistant turn; the scores do not
    decide (a document may score higher, the system prompt may come first)."""
    drawn = [("system", None, "system", 0.09), ("history", 3, "assistant", 0.001), ("history", 2, "user", 0.0005)]
    repeat = sentence([0.05], drawn, supported=False, context_grounded=2.5)
    assert earlier_answer(repeat, THRESHOLD, 1.0) == {
        "history_index": 3,
        "score": 0.001,
        "best_document_score": 0.05,
        "context_grounded": 2.5,
    }
    assert sentence_source(repeat, THRESHOLD, 1.0).mark == "earlier_answer"
    # the same scores, but removing the earlier turns barely changes the sentence: not from them
    def unsupported(context_grounded: float) -> Citation:
        return sentence([0.001], drawn, supported=False, context_grounded=context_grounded)

    assert earlier_answer(unsupported(0.4), THRESHOLD, 1.0) is None
    assert earlier_answer(unsupported(0.999), THRESHOLD, 1.0) is None
    assert earlier_answer(unsupported(1.0), THRESHOLD, 1.0)["history_index"] == 3
    assert earlier_answer(unsupported(1.5), THRESHOLD, 2.0) is None  # its threshold
    # supported too (grounded 2.0 nats here): the larger measured drop decides which one source is shown
    assert earlier_answer(sentence([0.001], drawn, context_grounded=1.5), THRESHOLD, 1.0) is None  # the documents
    assert earlier_answer(sentence([0.001], drawn, context_grounded=2.0), THRESHOLD, 1.0) is None  # a tie: documents
    assert earlier_answer(sentence([0.001], drawn, context_grounded=2.5), THRESHOLD, 1.0)["history_index"] == 3
    # drawn from the earlier turns, but the best of them is the user's: not an earlier answer
    user_first = [("history", 2, "user", 0.05), ("history", 3, "assistant", 0.01)]
    assert earlier_answer(sentence([0.001], user_first, context_grounded=3.0), THRESHOLD, 1.0) is None
    system_only = sentence([0.001], [("system", None, "system", 0.02)], context_grounded=3.0)
    assert earlier_answer(system_only, THRESHOLD) is None
    not_from_docs = sentence([0.0], [], supported=False, context_grounded=0.2)
    assert sentence_source(not_from_docs, THRESHOLD).mark == "not_from_documents"


def test_a_sentence_not_from_the_documents_never_cites_one():
    from chatbot.app import citation_payload

    odd = sentence([0.05], [], supported=True).model_copy(update={"supported": False})  # cited, yet unsupported
    assert odd.cited == ["doc0"]
    out = citation_payload(odd, THRESHOLD)
    assert out["mark"] == "not_from_documents" and out["cited"] == []
    assert {"grounded", "supported", "context_grounded"} <= set(out)


def test_sentence_marks():
    assert sentence_source(sentence([0.04], []), THRESHOLD).mark is None
    assert sentence_source(sentence([0.0], [], supported=False), THRESHOLD).mark == "not_from_documents"
    # a sentence that draws on the system prompt but no document is still not from the documents
    assert (
        sentence_source(sentence([0.0], [("system", None, "system", 0.02)], supported=False), THRESHOLD).mark
        == "not_from_documents"
    )


# ---- folders: unreadable files, no documents, long files ---------------------------------------------------
@pytest.fixture()
def messy_folder(tmp_path: Path) -> Path:
    (tmp_path / "good.md").write_text(
        "# Coffee machine\n\nThe espresso machine on floor two is descaled every Monday.\n"
    )
    (tmp_path / "notes.txt").write_text("Parking permits are renewed every January at the front desk.\n")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 opening hours: 9 to 5.".encode("latin-1"))
    (tmp_path / "binary.md").write_bytes(b"\x00\x01\x02 not text")
    (tmp_path / "empty.md").write_text("   \n")
    (tmp_path / "dangling.md").symlink_to(tmp_path / "missing-target.md")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")  # not a .txt/.md file: ignored, not reported
    return tmp_path


def test_unreadable_files_are_reported_and_the_rest_is_indexed(messy_folder: Path):
    client = client_for(messy_folder)
    status = client.get("/api/status").json()
    assert sorted(status["files"]) == ["good.md", "notes.txt"]
    problems = {p["file"]: p["error"] for p in status["problems"]}
    assert set(problems) == {"latin1.txt", "binary.md", "empty.md", "dangling.md"}
    assert "UTF-8" in problems["latin1.txt"] and "binary" in problems["binary.md"]
    assert "empty" in problems["empty.md"] and "cannot be read" in problems["dangling.md"]
    assert status["error"] is None and status["suggestions"] == []
    hits = client.app.state.service.retrieve("When is the espresso machine descaled?", [])
    assert hits[0].id == "good.md" and hits[0].title == "Coffee machine"


def test_no_documents_is_a_clear_error(tmp_path: Path):
    client = client_for(tmp_path)
    status = client.get("/api/status").json()
    assert status["num_files"] == 0 and "No documents are indexed" in status["error"]
    res = client.post("/api/chat", json={"question": "Anything?"})
    assert res.status_code == 503
    assert res.json()["error"] == "no_documents" and str(tmp_path) in res.json()["message"]


def test_long_files_become_several_passages(tmp_path: Path):
    paragraphs = [f"Paragraph {i} talks about topic{i} in some detail. " * 6 for i in range(12)]
    (tmp_path / "handbook.md").write_text("# Big handbook\n\n" + "\n\n".join(paragraphs))
    report = load_folder(tmp_path, max_chars=600)
    assert len(report.passages) > 3
    assert all(len(p.text) <= 600 for p in report.passages)
    assert report.passages[0].id == "handbook.md#1" and report.passages[0].title.startswith("Big handbook (part 1/")
    best = BM25Index(report.passages).search("topic7", k=2)
    assert "topic7" in best[0][0].text


def test_cli_refuses_a_missing_folder(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--docs", "/nonexistent/folder"])
    assert exc.value.code == 2 and "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["--max-question-chars", "0"], "--max-question-chars must be at least 1"),
        (["--max-history", "-1"], "--max-history and --max-history-chars must be at least 0"),
        (["--max-history-chars", "-5"], "--max-history and --max-history-chars must be at least 0"),
    ],
)
def test_cli_refuses_bad_limits(args, complaint, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and complaint in capsys.readouterr().err


def test_cli_refuses_an_unknown_groundedness(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--groundedness", "exact"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--groundedness: invalid choice: 'exact'" in err and "'measured', 'estimated', 'off'" in err


def test_create_app_refuses_an_unknown_groundedness():
    with pytest.raises(InvalidInputError, match="groundedness must be one of 'measured', 'estimated', 'off'"):
        create_app(attributor_factory=no_model, groundedness="exact")
    assert client_for().get("/api/status").json()["groundedness"] == "measured"


def test_cli_limits_reach_the_server(monkeypatch):
    import uvicorn

    served = {}
    monkeypatch.setattr(chatbot_app, "load_default_attributor", lambda: None)  # the model is not needed here
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app))
    assert main(["--max-question-chars", "300", "--max-history", "2", "--max-history-chars", "900"]) == 0
    client = TestClient(served["app"], base_url=BASE)
    status = client.get("/api/status").json()
    assert (status["max_question_chars"], status["max_history"], status["max_history_chars"]) == (300, 2, 900)
    assert status["groundedness"] == "measured"  # the default
    assert main(["--groundedness", "estimated"]) == 0
    assert TestClient(served["app"], base_url=BASE).get("/api/status").json()["groundedness"] == "estimated"
    res = client.post("/api/chat", json={"question": "x" * 301})
    assert res.status_code == 413 and "the limit is 300." in res.json()["message"]


# ---- with the real model ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def attributor():
    return load_default_attributor()


@pytest.mark.slow
def test_context_too_long_is_reported_before_streaming_in_words_for_people(attributor):
    client = client_for(attributor=attributor, max_question_chars=100_000)
    res = client.post("/api/chat", json={"question": "vacation days " * 5000})
    assert res.status_code == 413
    data = res.json()
    assert data["error"] == "context_too_long" and data["context_window"] == 8192 and data["needed_tokens"] > 8192
    message = data["message"]
    assert message.startswith("Your question is too long for the model to read together with the retrieved documents")
    assert message.endswith("Please shorten the question.") and "the model reads at most 8,192" in message
    assert "max_new_tokens" not in message and "Pass fewer" not in message  # the library's words stay in `detail`
    assert "context window is 8192 tokens" in data["detail"]


@pytest.mark.slow
def test_conversation_too_long_for_the_context_says_to_start_a_new_chat(attributor):
    client = client_for(attributor=attributor, max_history_chars=100_000)
    turns = [
        {"role": "user", "content": "Tell me about vacation days. " + "vacation days " * 2500},
        {"role": "assistant", "content": "Employees get 27 days. " + "days " * 3000},
    ]
    res = client.post("/api/chat", json={"question": QUESTION, "history": turns})
    assert res.status_code == 413
    data = res.json()
    assert data["error"] == "context_too_long"
    assert data["message"].startswith("This conversation has grown too long for the model")
    assert "Start a New chat to drop the earlier turns" in data["message"]


@pytest.mark.slow
def test_configured_question_limit_with_the_real_model(attributor):
    client = client_for(attributor=attributor, max_new_tokens=8, max_question_chars=len(QUESTION))
    with client.stream("POST", "/api/chat", json={"question": QUESTION}) as res:
        assert res.status_code == 200
        kinds = [kind for kind, _ in parse_sse(res.read().decode())]
    assert kinds[0] == "retrieval" and kinds[-1] == "done"
    res = client.post("/api/chat", json={"question": QUESTION + " Thanks"})
    assert res.status_code == 413 and res.json()["error"] == "question_too_long"


@pytest.mark.slow
def test_chat_streams_the_answer_then_its_attribution(attributor):
    client = client_for(attributor=attributor, max_new_tokens=64)
    with client.stream("POST", "/api/chat", json={"question": QUESTION, "history": []}) as res:
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(res.read().decode())
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "retrieval" and kinds[-2:] == ["attribution", "done"]
    assert kinds.count("token") >= 2  # streamed in pieces
    retrieved = events[0][1]["documents"]
    assert retrieved[0]["id"] == RIGHT_DOC and len(retrieved) == 4

    att = events[-2][1]
    streamed = "".join(data["text"] for kind, data in events if kind == "token")
    assert streamed.strip() == att["answer"].strip() and "27" in att["answer"]
    ranked = sorted(att["documents"], key=lambda d: d["score"], reverse=True)
    assert ranked[0]["id"] == RIGHT_DOC, [(d["id"], d["score"]) for d in ranked]
    assert abs(sum(d["share"] for d in att["documents"]) - 1) < 1e-6
    assert "prompt" not in att and att["cited_answer"].count("[") >= 1

    first = att["citations"][0]
    assert "27" in first["text"] and first["cited"][0] == RIGHT_DOC and first["supported"]
    support = next(d for d in first["documents"] if d["id"] == RIGHT_DOC)
    doc_text = next(d["text"] for d in att["documents"] if d["id"] == RIGHT_DOC)
    top = support["sentences"][0]
    assert doc_text[top["start"] : top["end"]] == top["text"] and "27 days" in top["text"]
    assert events[-1][1]["history_messages"] == 0
    assert att["schema"] == "at2-rag/attribution" and att["schema_version"] == ATTRIBUTION_SCHEMA_VERSION
    assert set(att["context_scores"]) == {"system", "query"}  # no history: no earlier turns to score
    # measured groundedness by default: one pass with the documents removed
    assert att["groundedness"] == "measured" and att["extra_forward_passes"] == 1
    assert first["grounded"] > att["grounded_threshold"] and first["supported"] and first["context_grounded"] is None
    assert first["mark"] is None and first["earlier_answer"] is None

    # each sentence's `citation` event came as soon as it was complete, equal to its entry in the attribution
    sent = [(i, data) for i, (kind, data) in enumerate(events) if kind == "citation"]
    assert [data["start"] for _, data in sent] == [c["start"] for c in att["citations"]]
    for (_, got), want in zip(sent, att["citations"]):
        assert_same_json(got, want)
    last_token = max(i for i, (kind, _) in enumerate(events) if kind == "token")
    assert len(att["citations"]) >= 2 and sent[0][0] < last_token  # the first sentence's marks before the answer's end


def assert_same_json(got, want, path: str = "") -> None:
    """Equal JSON values, numbers within 1e-6 (the same scores, computed mid-stream or at the end)."""
    if isinstance(got, float) or isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-6), path
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for key in want:
            assert_same_json(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_json(a, b, f"{path}[{i}]")
    else:
        assert got == want, path


def chat_attribution(client: TestClient, question: str, history: list[dict[str, str]]) -> dict:
    with client.stream("POST", "/api/chat", json={"question": question, "history": history}) as res:
        assert res.status_code == 200
        events = dict(parse_sse(res.read().decode()))
    assert events["done"]["history_messages"] == len(history)
    return events["attribution"]


def expected_earlier_answer(
    citation: dict, support_threshold: float, grounded_threshold: float, history: list[dict[str, str]]
) -> int | None:
    """The rule, read off the payload. Measured (`context_grounded` present): removing the earlier turns lowers the
    sentence by the threshold, the best earlier turn it lists is an assistant turn that holds at least half the
    sentence's words, and when the sentence is `supported` too, the earlier turns' drop is the larger. Otherwise: the
    sentence's best context source is such an assistant turn that reaches the threshold and scores above every
    document."""
    words = set(re.findall(r"\w+", citation["text"].casefold()))

    def holds(turn: dict) -> bool:
        said = set(re.findall(r"\w+", history[turn["index"]]["content"].casefold()))
        return bool(words) and len(words & said) >= 0.5 * len(words)

    if citation["context_grounded"] is not None:
        turns = [c for c in citation["context"] if c["kind"] == "history"]
        if (
            citation["context_grounded"] >= grounded_threshold
            and turns
            and turns[0]["role"] == "assistant"
            and holds(turns[0])
            and not (citation["supported"] and citation["grounded"] >= citation["context_grounded"])
        ):
            return turns[0]["index"]
        return None
    if not citation["context"]:
        return None
    best = citation["context"][0]
    best_document = max(d["score"] for d in citation["documents"])
    if (
        best["kind"] == "history"
        and best["role"] == "assistant"
        and best["score"] >= support_threshold
        and best["score"] > best_document
        and holds(best)
    ):
        return best["index"]
    return None


WEATHER = "What is the weather like in the office today?"  # no document says: the small model makes it up
REPEAT = "Can you repeat your previous answer?"  # retrieves other documents than the weather question


@pytest.mark.slow
def test_a_repeated_earlier_answer_is_marked_and_a_sentence_not_from_the_documents_is_flagged(attributor):
    client = client_for(attributor=attributor, max_new_tokens=48)

    # ---- turn 1: an answer no retrieved document supports --------------------------------------------------
    first = chat_attribution(client, WEATHER, [])
    assert first["citations"] and first["supported"] is False
    assert first["groundedness"] == "measured" and first["extra_forward_passes"] == 1
    for c in first["citations"]:
        assert isinstance(c["grounded"], float) and isinstance(c["supported"], bool) and isinstance(c["context"], list)
        assert c["supported"] == (c["grounded"] >= first["grounded_threshold"])  # the measured drop decides
        assert c["earlier_answer"] is None and c["context_grounded"] is None  # there is no earlier answer
        if not c["supported"]:
            assert c["mark"] == "not_from_documents" and c["cited"] == []
    assert any(c["mark"] == "not_from_documents" for c in first["citations"])

    # ---- turn 2: "repeat your previous answer" -------------------------------------------------------------
    history = [{"role": "user", "content": WEATHER}, {"role": "assistant", "content": first["answer"]}]
    second = chat_attribution(client, REPEAT, history)
    assert set(second["context_scores"]) == {"system", "history:0", "history:1", "query"}
    by_key = {c["key"]: c for c in second["context_sources"]}
    assert (
        by_key["history:1"]["role"] == "assistant"
        and by_key["history:1"]["score"] == second["context_scores"]["history:1"]
    )
    assert all("text" not in c for c in second["context_sources"])  # the page sent those texts: not echoed back
    threshold, nats = second["support_threshold"], second["grounded_threshold"]
    assert second["groundedness"] == "measured" and second["extra_forward_passes"] == 2  # documents; earlier turns
    for c in second["citations"]:
        assert isinstance(c["grounded"], float) and isinstance(c["supported"], bool)
        assert isinstance(c["context_grounded"], float)
        assert all(set(x) == {"kind", "index", "role", "score", "key"} and x["kind"] != "query" for x in c["context"])
        index = expected_earlier_answer(c, threshold, nats, history)
        if index is None:
            assert c["earlier_answer"] is None
            assert c["mark"] == (None if c["supported"] else "not_from_documents")
        else:
            assert c["earlier_answer"]["history_index"] == index and c["mark"] == "earlier_answer"
            assert c["earlier_answer"]["context_grounded"] == c["context_grounded"] >= nats
        assert not (c["mark"] and c["cited"])  # one claim per sentence
    # the model repeats (greedy decoding: every run the same) and every repeated sentence is marked as such
    repeated = [c for c in second["citations"] if c["text"].strip() in first["answer"]]
    assert repeated, (first["answer"], second["answer"])
    for c in repeated:
        assert c["mark"] == "earlier_answer" and c["earlier_answer"]["history_index"] == 1, c
        assert history[c["earlier_answer"]["history_index"]]["role"] == "assistant"


CANOPY = "How many requests per minute does the Canopy API allow?"
EXCEED = "What happens if I exceed it?"  # the model first restates its earlier answer, then answers from the document


@pytest.mark.slow
def test_one_claim_per_sentence_documents_or_the_earlier_answer_by_the_larger_measured_drop(attributor):
    """Issue 36 point 8: a follow-up sentence that both the documents and the earlier answer measurably carry was
    shown with a document mark and "from the earlier answer" at once. Now the larger measured drop decides the one
    source shown, and "from the earlier answer" only marks a sentence that is in that answer."""
    client = client_for(attributor=attributor, max_new_tokens=48)
    first = chat_attribution(client, CANOPY, [])
    history = [{"role": "user", "content": CANOPY}, {"role": "assistant", "content": first["answer"]}]
    with client.stream("POST", "/api/chat", json={"question": EXCEED, "history": history}) as res:
        events = parse_sse(res.read().decode())
    second = dict(events)["attribution"]
    streamed = [data for kind, data in events if kind == "citation"]
    nats = second["grounded_threshold"]
    # the restated sentence depends on both (measured), more on the earlier answer (greedy: every run the same)
    both = [
        c
        for c in second["citations"]
        if c["supported"] and c["context_grounded"] >= nats and c["context_grounded"] > c["grounded"]
    ]
    assert both, [(c["text"], c["grounded"], c["context_grounded"]) for c in second["citations"]]
    for c in both:
        assert c["text"].strip() in first["answer"]
        assert c["mark"] == "earlier_answer" and c["earlier_answer"]["history_index"] == 1
        assert c["cited"] == []  # no document number beside "from the earlier answer"
        assert second["cited_answer"].count(c["text"].strip() + "[") == 0
    # a sentence only the documents carry keeps its numbers and no mark
    fresh = [c for c in second["citations"] if c["supported"] and c["context_grounded"] < nats]
    assert fresh and all(c["cited"] and c["mark"] is None for c in fresh)
    for c in [*second["citations"], *streamed]:
        assert not (c["mark"] and c["cited"])  # one claim per sentence
        assert c["mark"] is not None or c["supported"]  # numbers only for a sentence the documents carry
        if c["mark"] == "earlier_answer":
            said = history[c["earlier_answer"]["history_index"]]["content"]
            assert expected_earlier_answer(c, second["support_threshold"], nats, history) is not None, (c, said)
    assert [c["mark"] for c in streamed] == [c["mark"] for c in second["citations"]]
    assert [c["cited"] for c in streamed] == [c["cited"] for c in second["citations"]]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["estimated", "off"])
def test_the_groundedness_setting_reaches_the_answers(attributor, mode):
    client = client_for(attributor=attributor, max_new_tokens=24, groundedness=mode)
    assert client.get("/api/status").json()["groundedness"] == mode
    with client.stream("POST", "/api/chat", json={"question": WEATHER, "history": []}) as res:
        events = parse_sse(res.read().decode())
    att = dict(events)["attribution"]
    assert att["groundedness"] == mode and att["extra_forward_passes"] == 0  # no measured pass
    streamed = [data for kind, data in events if kind == "citation"]
    assert att["citations"] and len(streamed) == len(att["citations"])
    for c in [*att["citations"], *streamed]:
        assert c["context_grounded"] is None
        if mode == "off":  # nothing says a sentence is not from the documents
            assert c["grounded"] is None and c["supported"] is True and c["mark"] is None
        else:
            assert isinstance(c["grounded"], float) and c["supported"] == (c["grounded"] >= att["grounded_threshold"])
        assert not (c["mark"] == "not_from_documents" and c["cited"])


@pytest.mark.slow
def test_follow_up_turn_passes_history_to_the_model(attributor):
    client = client_for(attributor=attributor, max_new_tokens=12)
    history = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "Every full-time employee receives 27 days of paid vacation per year."},
    ]
    sizes = {}
    for name, turns in (("without", []), ("with", history)):
        with client.stream(
            "POST", "/api/chat", json={"question": "Can unused vacation days be carried over?", "history": turns}
        ) as res:
            events = dict(parse_sse(res.read().decode()))
        assert events["done"]["history_messages"] == len(turns)
        sizes[name] = events["attribution"]["num_prompt_tokens"]
        assert events["attribution"]["documents"][0]["id"] == RIGHT_DOC  # retrieved first
    assert sizes["with"] > sizes["without"] + 20


@pytest.mark.slow
def test_questions_waiting_behind_a_stream_share_one_batch(attributor):
    """While one answer streams, the questions that arrive wait in the core's micro-batcher and are answered in
    one batched generation as soon as the model is free: each gets exactly the answer it would get alone."""
    import threading

    from at2_rag import get_micro_batcher

    client = client_for(attributor=attributor, max_new_tokens=48)
    waiting = ["How do I get reimbursed for expenses?", "Can I work remotely?"]
    batcher = get_micro_batcher(attributor)
    before = len(batcher.stats.batch_sizes)
    answers: dict[str, list] = {}

    def ask(question: str) -> None:
        with client.stream("POST", "/api/chat", json={"question": question, "history": []}) as res:
            answers[question] = parse_sse(res.read().decode())

    with client.stream("POST", "/api/chat", json={"question": QUESTION, "history": []}) as first:
        lines = first.iter_lines()
        while not next(lines).startswith("event: token"):  # the first answer is streaming: the model is busy
            pass
        threads = [threading.Thread(target=ask, args=(q,)) for q in waiting]
        for t in threads:
            t.start()
        rest = "\n".join(lines)  # the rest of the first answer
    for t in threads:
        t.join(timeout=600)
    assert "event: attribution" in rest
    assert batcher.stats.batch_sizes[before:] == [2], batcher.stats.batch_sizes[before:]
    for question in waiting:
        events = answers[question]
        kinds = [k for k, _ in events]
        assert kinds[0] == "retrieval" and "status" in kinds and kinds[-2:] == ["attribution", "done"]
        att = dict(events)["attribution"]
        assert att["batched"] is True and att["groundedness"] == "measured" and att["extra_forward_passes"] == 1
        alone = attributor.generate(question, client.app.state.service.retrieve(question, []), max_new_tokens=48)
        assert att["answer"] == alone.answer
        streamed = "".join(d["text"] for k, d in events if k == "token")
        assert streamed == att["answer"] and len(att["citations"]) == kinds.count("citation")
