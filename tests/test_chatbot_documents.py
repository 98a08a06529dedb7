"""Documents uploaded to the chatbot (POST/GET/DELETE /api/documents), its corpus offsets and the command line's
--model, with FastAPI's TestClient. None of these tests loads the model: a request that would is an error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the example is the package `chatbot` inside examples/

from chatbot.app import SAMPLE_DOCS, create_app, main  # noqa: E402
from chatbot.corpus import load_folder, text_to_passages  # noqa: E402
from chatbot.uploads import safe_name  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

ZEPHYR = "The Zephyr drone flies for 47 minutes on one charge."


def make_pdf(lines: list[str], title: str | None = None) -> bytes:
    """A one-page PDF with one text line per entry (Helvetica), written by hand: objects, xref table, trailer."""

    def lit(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    content = "BT /F1 12 Tf 72 720 Td 16 TL " + " ".join(f"({lit(line)}) Tj T*" for line in lines) + " ET"
    objs = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> >> "
        "/Contents 5 0 R >>",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
    ]
    if title:
        objs.append(f"<< /Title ({lit(title)}) >>")
    out = b"%PDF-1.4\n"
    offsets = []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode() + b"".join(
        f"{o:010d} 00000 n \n".encode() for o in offsets
    )
    info = f" /Info {len(objs)} 0 R" if title else ""
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R{info} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out

BASE = "http://127.0.0.1:8000"  # the Host the server answers to (it refuses other names: DNS rebinding)


def no_model():
    raise AssertionError("this request must be answered without loading the model")


@pytest.fixture()
def uploads(tmp_path: Path) -> Path:
    return tmp_path / "uploads"


def client_for(uploads: Path, docs: Path | str = SAMPLE_DOCS, **kwargs) -> TestClient:
    return TestClient(create_app(docs, attributor_factory=no_model, upload_dir=uploads, **kwargs), base_url=BASE)


def upload(client: TestClient, *files: tuple[str, bytes]):
    return client.post(
        "/api/documents", files=[("file", (name, data, "application/octet-stream")) for name, data in files]
    )


def retrieved_doc_ids(client: TestClient, question: str) -> list[str]:
    service = client.app.state.service
    return [d.metadata["doc_id"] for d in service.retrieve(question, [])]


# ---- upload, list, remove ---------------------------------------------------------------------------------
def test_upload_several_files_lists_and_indexes_them_without_a_restart(uploads: Path):
    client = client_for(uploads)
    before = client.get("/api/documents").json()["documents"]
    assert len(before) == 12 and all(d["source"] == "folder" and not d["removable"] for d in before)
    assert not retrieved_doc_ids(client, "Zephyr drone")

    r = upload(
        client,
        ("zephyr.pdf", make_pdf([ZEPHYR, "It weighs 900 grams."], title="Zephyr data sheet")),
        ("notes.md", b"# Lab notes\n\nThe quartz sample melted at 1712 degrees.\n\nSecond paragraph."),
        ("plain.txt", "Caf\u00e9 hours: 8 to 16.".encode()),
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["rejected"] == [] and body["num_documents"] == 15
    docs = {d["name"]: d for d in body["documents"]}
    assert set(docs) == {"zephyr.pdf", "notes.md", "plain.txt"}
    assert docs["zephyr.pdf"]["kind"] == "pdf" and docs["zephyr.pdf"]["title"] == "Zephyr data sheet"
    assert docs["notes.md"]["title"] == "Lab notes" and docs["plain.txt"]["kind"] == "text"
    assert all(d["removable"] and d["source"] == "upload" and d["passages"] == 1 for d in docs.values())

    listed = client.get("/api/documents").json()
    assert [d["name"] for d in listed["documents"] if d["source"] == "upload"] == [
        "zephyr.pdf",
        "notes.md",
        "plain.txt",
    ]
    assert listed["max_upload_bytes"] == 2 * 1024 * 1024 and ".pdf" in listed["upload_types"]
    status = client.get("/api/status").json()
    assert status["num_files"] == 15 and status["num_uploads"] == 3

    # searchable at once: the PDF's extracted text and the markdown file
    assert retrieved_doc_ids(client, "How long does the Zephyr drone fly?")[0] == docs["zephyr.pdf"]["id"]
    assert retrieved_doc_ids(client, "quartz melted")[0] == docs["notes.md"]["id"]

    # the whole text, and where the passage the model reads lies in it
    whole = client.get(f"/api/documents/{docs['zephyr.pdf']['id']}").json()
    assert ZEPHYR in whole["text"]
    (span,) = whole["passage_spans"]
    passage = client.app.state.service.retrieve("Zephyr drone", [])[0]
    assert whole["text"][span["offset"] : span["offset"] + span["length"]] == passage.text


def test_remove_an_uploaded_document_and_the_folder_ones_are_read_only(uploads: Path):
    client = client_for(uploads)
    doc = upload(client, ("zephyr.txt", ZEPHYR.encode())).json()["documents"][0]
    assert retrieved_doc_ids(client, "Zephyr drone") == [doc["id"]]

    r = client.delete(f"/api/documents/{doc['id']}")
    assert r.status_code == 200 and r.json() == {"deleted": doc["id"], "num_documents": 12}
    assert not retrieved_doc_ids(client, "Zephyr drone")
    assert all(d["id"] != doc["id"] for d in client.get("/api/documents").json()["documents"])
    assert list(uploads.iterdir()) == []  # its record is gone from disk too

    again = client.delete(f"/api/documents/{doc['id']}")
    assert again.status_code == 404 and again.json()["error"] == "not_found"
    assert client.get(f"/api/documents/{doc['id']}").status_code == 404
    folder = client.delete("/api/documents/vacation-policy.md")
    assert folder.status_code == 403 and folder.json()["error"] == "read_only"
    assert "only uploaded documents can be removed" in folder.json()["message"]
    assert client.delete("/api/documents/../../etc/passwd").status_code == 404


def test_uploads_survive_a_restart_and_broken_records_are_reported(uploads: Path):
    doc = upload(client_for(uploads), ("zephyr.md", ZEPHYR.encode())).json()["documents"][0]
    (uploads / ".abc.tmp").write_text("{half written")  # a writer that died before its rename
    (uploads / "0123456789ab.json").write_text("not json")
    client = client_for(uploads)  # a new server on the same folder
    assert retrieved_doc_ids(client, "Zephyr drone") == [doc["id"]]
    assert not (uploads / ".abc.tmp").exists()
    problems = client.get("/api/status").json()["problems"]
    assert [p["file"] for p in problems] == ["uploads/0123456789ab.json"]


def test_uploading_into_an_empty_folder_makes_the_chat_usable(tmp_path: Path, uploads: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    client = client_for(uploads, docs=empty)
    assert client.post("/api/chat", json={"question": "Zephyr?"}).status_code == 503
    assert "Upload documents" in client.get("/api/status").json()["error"]
    upload(client, ("zephyr.md", ZEPHYR.encode()))
    assert client.get("/api/status").json()["error"] is None
    assert retrieved_doc_ids(client, "Zephyr drone")


# ---- untrusted uploads: limits, types, names ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "data", "status", "error", "words"),
    [
        ("big.txt", b"x" * 2049, 413, "file_too_large", "larger than the limit of 2 KB"),
        ("tool.exe", b"MZ\x90\x00", 415, "unsupported_type", ".exe files are not supported; upload .txt, .md or .pdf"),
        ("README", b"hello", 415, "unsupported_type", "(no extension) files are not supported"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), 422, "unreadable_file", "not valid UTF-8 text"),
        ("binary.md", b"ab\x00cd", 422, "unreadable_file", "binary file"),
        ("empty.txt", b"", 422, "unreadable_file", "is empty"),
        ("blank.md", b"  \n\n \n", 422, "unreadable_file", "only whitespace"),
        ("fake.pdf", b"hello, not a pdf", 422, "unreadable_file", "is not a PDF file"),
        ("broken.pdf", b"%PDF-1.4\n garbage", 422, "unreadable_file", "could not be read as a PDF"),
        ("scan.pdf", make_pdf([]), 422, "unreadable_file", "no extractable text"),
    ],
)
def test_a_refused_file_gets_a_clear_message(uploads: Path, name, data, status, error, words):
    client = client_for(uploads, max_upload_bytes=2048)
    r = upload(client, (name, data))
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error and words in body["message"], body["message"]
    assert body["rejected"][0]["name"] == name
    assert list(uploads.iterdir()) == [] and len(client.get("/api/documents").json()["documents"]) == 12


def test_good_files_are_kept_when_others_in_the_same_upload_are_refused(uploads: Path):
    client = client_for(uploads)
    r = upload(client, ("a.txt", b"Alpha facts."), ("b.docx", b"PK\x03\x04"), ("c.md", b"Gamma facts."))
    assert r.status_code == 201
    assert [d["name"] for d in r.json()["documents"]] == ["a.txt", "c.md"]
    assert [(x["name"], x["error"]) for x in r.json()["rejected"]] == [("b.docx", "unsupported_type")]


def test_request_level_limits(uploads: Path):
    client = client_for(uploads, max_upload_files=2, max_uploaded_documents=3)
    many = upload(client, ("a.txt", b"a"), ("b.txt", b"b"), ("c.txt", b"c"))
    assert many.status_code in (400, 413) and "At most 2 files" in many.json()["message"]
    none = client.post("/api/documents", files=[("other", ("a.txt", b"a", "text/plain"))])
    assert none.status_code == 400 and none.json()["error"] == "no_file"
    not_multipart = client.post("/api/documents", json={"file": "a"})
    assert not_multipart.status_code == 415 and "multipart/form-data" in not_multipart.json()["message"]
    assert upload(client, ("a.txt", b"one"), ("b.txt", b"two")).status_code == 201
    full = upload(client, ("c.txt", b"three"), ("d.txt", b"four"))
    assert full.status_code == 201 and [d["name"] for d in full.json()["documents"]] == ["c.txt"]
    assert full.json()["rejected"][0]["error"] == "too_many_documents"
    refused = upload(client, ("e.txt", b"five"))
    assert refused.status_code == 409 and "at most 3 uploaded documents; remove some first" in refused.json()["message"]


def test_an_upload_larger_than_all_files_together_may_be_is_refused_before_reading(uploads: Path):
    client = client_for(uploads, max_upload_bytes=1024, max_upload_files=1)
    r = upload(client, ("a.txt", b"x" * 200_000))
    assert r.status_code == 413 and r.json()["error"] == "upload_too_large"


def test_file_names_are_labels_never_paths(uploads: Path, tmp_path: Path):
    client = client_for(uploads)
    r = upload(
        client,
        ("../../outside.md", b"Escape attempt."),
        ("..\\..\\win.txt", b"Windows escape."),
        ("/etc/cron.d/x.txt", b"x"),
    )
    assert r.status_code == 201
    assert [d["name"] for d in r.json()["documents"]] == ["outside.md", "win.txt", "x.txt"]
    assert not (tmp_path / "outside.md").exists() and not (ROOT / "outside.md").exists()
    on_disk = sorted(p.name for p in uploads.iterdir())
    assert len(on_disk) == 3 and all(len(n) == len("0123456789ab.json") and n.endswith(".json") for n in on_disk)
    for p in uploads.iterdir():
        assert json.loads(p.read_text())["id"] == p.stem


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("C:\\x\\y.md", "y.md"),
        ("", "untitled.txt"),
        ("..", "untitled.txt"),
        ("<script>.md", "_script_.md"),
        ("a\x00b\nc\u202e.txt", "abc.txt"),
        ("a" * 300 + ".txt", "a" * 116 + ".txt"),
    ],
)
def test_safe_name(raw, expected):
    assert safe_name(raw) == expected


def test_stop_of_an_unknown_answer_is_a_404(uploads: Path):
    r = client_for(uploads).post("/api/chat/stop", json={"stream_id": "nope"})
    assert r.status_code == 404 and r.json()["message"] == "This answer has already finished."


# ---- passages are exact slices of the file (the whole-file view relies on it) -------------------------------
def test_passages_are_exact_slices_of_the_whole_file():
    report = load_folder(SAMPLE_DOCS)
    for p in report.passages:
        assert report.texts[p.path][p.offset : p.offset + len(p.text)] == p.text
    text = "# Title\n\n" + "\n\n\n".join(f"Paragraph {i}. " + "word " * 60 for i in range(12)) + "\n\n" + "long. " * 400
    passages = text_to_passages(text, "x.md", "X", max_chars=700)
    assert len(passages) > 5 and all(len(p.text) <= 700 for p in passages)
    for p in passages:
        assert text[p.offset : p.offset + len(p.text)] == p.text and p.text == p.text.strip()
    assert passages[0].title == f"Title (part 1/{len(passages)})"


# ---- any model ----------------------------------------------------------------------------------------------
def test_cli_reports_a_model_that_cannot_be_loaded(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path / "no-such-model"), "--upload-dir", str(tmp_path / "u")])
    assert exc.value.code == 2
    assert "could not load the model" in capsys.readouterr().err


def test_the_model_name_is_shown_before_the_model_loads(uploads: Path):
    status = client_for(uploads, model_name="my-org/tiny-llama").get("/api/status").json()
    assert status["model"] == "my-org/tiny-llama" and status["model_loaded"] is False
    assert client_for(uploads).get("/api/status").json()["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_cli_serves_any_local_causal_lm_and_shows_its_name(tmp_path: Path, monkeypatch):
    """--model with a local Hugging Face folder (here: the embedded model saved with save_pretrained)."""
    import uvicorn

    from at2_rag import load_default_model

    folder = tmp_path / "my-local-lm"
    model, tokenizer = load_default_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app))
    argv = ["--model", str(folder), "--max-new-tokens", "12", "--upload-dir", str(tmp_path / "u")]
    assert main(argv) == 0
    client = TestClient(served["app"], base_url=BASE)
    status = client.get("/api/status").json()
    assert status["model_loaded"] and status["model"] == str(folder)  # the page shows its last part: my-local-lm
    assert status["estimator_trained"] is False  # no estimator shipped for a folder: average attention, said so
    r = client.post("/api/chat", json={"question": "How many vacation days do I get per year?"})
    assert r.status_code == 200
    events = [block.split("\n", 1)[0] for block in r.text.strip().split("\n\n")]
    assert events[0] == "event: retrieval" and "event: attribution" in events and events[-1] == "event: done"
