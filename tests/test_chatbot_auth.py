"""Per-user workspaces of the chatbot (issue 36, point 3): with `--auth FILE` every API request needs a user's
bearer token (401 otherwise), and each user sees, searches, reads and removes only their own uploads plus the
shared folder; another user's upload answers 404. Without `--auth` nothing changes. No model is loaded."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the example is the package `chatbot` inside examples/

from chatbot.app import create_app  # noqa: E402
from chatbot.security import AuthFileError, read_tokens  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

BASE = "http://127.0.0.1:8000"
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-abcdefghijkl"}
ALICE = {"Authorization": f"Bearer {TOKENS['alice']}"}
BOB = {"Authorization": f"Bearer {TOKENS['bob']}"}
SECRET = "The vault combination of project Quillfeather is 4-8-15."


def no_model():
    raise AssertionError("this request must be answered without loading the model")


def app_for(tmp_path: Path, **kwargs: Any):
    kwargs.setdefault("attributor_factory", no_model)
    return create_app(upload_dir=tmp_path / "uploads", auth=TOKENS, **kwargs)


def upload(client: TestClient, headers: dict[str, str], name: str, text: str):
    return client.post("/api/documents", files=[("file", (name, text.encode(), "text/plain"))], headers=headers)


def test_every_api_request_needs_a_valid_token(tmp_path: Path):
    client = TestClient(app_for(tmp_path), base_url=BASE)
    requests = [
        ("GET", "/api/status", {}),
        ("GET", "/api/documents", {}),
        ("GET", "/api/documents/vacation-policy.md", {}),
        ("DELETE", "/api/documents/0123456789ab", {}),
        ("POST", "/api/chat", {"json": {"question": "How many vacation days?", "history": []}}),
        ("POST", "/api/chat/stop", {"json": {"stream_id": "x"}}),
        ("POST", "/api/documents", {"files": [("file", ("a.txt", b"text", "text/plain"))]}),
    ]
    for method, path, extra in requests:
        for headers, says in (
            ({}, "needs an access token"),
            ({"Authorization": "Bearer not-a-token-of-anyone"}, "not valid"),
            ({"Authorization": f"Basic {TOKENS['alice']}"}, "not valid"),
            ({"Authorization": "Bearer"}, "not valid"),
        ):
            res = client.request(method, path, headers=headers, **extra)
            assert res.status_code == 401, (method, path, headers, res.text)
            body = res.json()
            assert body["error"] == "unauthorized" and says in body["message"]
            assert "Authorization: Bearer <token>" in body["message"]
            assert res.headers["www-authenticate"].startswith("Bearer")
    # the page itself and its files hold no data: served without a token (the page then asks for one)
    assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
    status = client.get("/api/status", headers=ALICE).json()
    assert status["auth"] is True and status["user"] == "alice" and status["num_uploads"] == 0


def test_each_user_sees_and_changes_only_their_own_uploads_plus_the_shared_folder(tmp_path: Path):
    app = app_for(tmp_path)
    client = TestClient(app, base_url=BASE)
    res = upload(client, ALICE, "vault.txt", SECRET)
    assert res.status_code == 201
    secret_id = res.json()["documents"][0]["id"]
    assert upload(client, BOB, "bob-notes.txt", "Bob's garden has seven apple trees.").status_code == 201

    def names(headers: dict[str, str]) -> dict[str, str]:
        return {d["name"]: d["source"] for d in client.get("/api/documents", headers=headers).json()["documents"]}

    alice, bob = names(ALICE), names(BOB)
    assert alice["vault.txt"] == "upload" and "bob-notes.txt" not in alice
    assert bob["bob-notes.txt"] == "upload" and "vault.txt" not in bob
    shared = {n for n, source in alice.items() if source == "folder"}
    assert shared and shared == {n for n, source in bob.items() if source == "folder"}  # the --docs folder, for both
    assert client.get("/api/status", headers=BOB).json()["num_uploads"] == 1

    # Bob can neither read, retrieve nor delete Alice's upload: it is not there for him (404, as for a removed one)
    assert client.get(f"/api/documents/{secret_id}", headers=BOB).status_code == 404
    assert client.get(f"/api/documents/{secret_id}", headers=ALICE).json()["text"] == SECRET
    res = client.post("/api/chat", json={"question": "What is the vault combination of Quillfeather?"}, headers=BOB)
    assert res.status_code == 404 and res.json()["error"] == "no_match"  # retrieval saw none of Alice's words
    service = app.state.service
    question = "vault combination Quillfeather"
    assert [d.metadata["doc_id"] for d in service.retrieve(question, [], "alice")][0] == secret_id
    assert all(d.metadata["doc_id"] != secret_id for d in service.retrieve(question, [], "bob"))
    res = client.delete(f"/api/documents/{secret_id}", headers=BOB)
    assert res.status_code == 404 and res.json()["error"] == "not_found"
    assert "vault.txt" in names(ALICE)  # still there
    # the shared folder is read-only for everyone
    assert client.delete("/api/documents/vacation-policy.md", headers=BOB).status_code == 403
    # the same content under the same name is a separate document per user (Bob's copy is not Alice's)
    res = upload(client, BOB, "vault.txt", SECRET)
    assert res.status_code == 201 and res.json()["documents"][0]["id"] != secret_id
    # Alice removes hers; Bob's copy stays
    assert client.delete(f"/api/documents/{secret_id}", headers=ALICE).status_code == 200
    assert "vault.txt" not in names(ALICE) and "vault.txt" in names(BOB)


def test_stop_of_another_users_answer_is_not_found(tmp_path: Path):
    from chatbot.streaming import Cancelled as _Cancelled

    app = app_for(tmp_path)
    client = TestClient(app, base_url=BASE)
    app.state.service.streams["s1"] = cancel = _Cancelled("alice")
    res = client.post("/api/chat/stop", json={"stream_id": "s1"}, headers=BOB)
    assert res.status_code == 404 and not cancel.event.is_set()
    assert client.post("/api/chat/stop", json={"stream_id": "s1"}, headers=ALICE).status_code == 200
    assert cancel.event.is_set()


def test_the_upload_limit_is_per_user_and_workspaces_survive_a_restart(tmp_path: Path):
    client = TestClient(app_for(tmp_path, max_uploaded_documents=2), base_url=BASE)
    for i in range(2):
        assert upload(client, ALICE, f"a{i}.txt", f"Alice fact {i}.").status_code == 201
    res = upload(client, ALICE, "a2.txt", "Alice fact 2.")
    assert res.status_code == 409 and res.json()["error"] == "too_many_documents"
    assert upload(client, BOB, "b0.txt", "Bob fact.").status_code == 201  # Alice's full workspace is not Bob's
    assert sorted(p.name for p in (tmp_path / "uploads" / "users").iterdir()) == ["alice", "bob"]
    again = TestClient(app_for(tmp_path), base_url=BASE)
    listed = again.get("/api/documents", headers=ALICE).json()["documents"]
    uploads = [d["name"] for d in listed if d["source"] == "upload"]
    assert uploads == ["a0.txt", "a1.txt"]
    # a server without --auth on the same folder keeps its own (single) workspace: no user's uploads in it
    plain = TestClient(create_app(upload_dir=tmp_path / "uploads", attributor_factory=no_model), base_url=BASE)
    assert all(d["source"] == "folder" for d in plain.get("/api/documents").json()["documents"])


def test_without_auth_nothing_changes(tmp_path: Path):
    client = TestClient(create_app(upload_dir=tmp_path / "u", attributor_factory=no_model), base_url=BASE)
    status = client.get("/api/status").json()
    assert status["auth"] is False and status["user"] is None
    assert upload(client, {}, "n.txt", "Plain note.").status_code == 201
    # a stray Authorization header is not an error either
    assert client.get("/api/documents", headers={"Authorization": "Bearer whatever"}).status_code == 200


def test_token_files(tmp_path: Path):
    good = tmp_path / "tokens"
    good.write_text(f"# who may use the chatbot\n\nalice:{TOKENS['alice']}\n bob : {TOKENS['bob']} \n")
    assert read_tokens(good) == TOKENS
    for text, complaint in (
        ("alice\n", "expected `user:token`"),
        ("../x:0123456789abcdefgh\n", "expected `user:token`"),
        (".hidden:0123456789abcdefgh\n", "expected `user:token`"),
        ("alice:short\n", "at least 16 characters"),
        ("alice:0123456789 abcdefgh\n", "no spaces"),
        ("alice:0123456789abcdefgh\nalice:0123456789abcdefgX\n", "listed twice"),
        ("alice:0123456789abcdefgh\nbob:0123456789abcdefgh\n", "another user's"),
        ("# nobody\n", "lists no user"),
    ):
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(AuthFileError, match=complaint.replace("(", r"\(")):
            read_tokens(bad)
    with pytest.raises(AuthFileError, match="cannot read"):
        read_tokens(tmp_path / "missing")


def test_the_command_line_reads_the_token_file_and_says_who_has_a_workspace(tmp_path, monkeypatch, caplog, capsys):
    import chatbot.cli as chatbot_app

    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{user}:{token}\n" for user, token in TOKENS.items()))
    served: dict[str, Any] = {}
    monkeypatch.setattr(chatbot_app, "load_default_attributor", lambda: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))
    with caplog.at_level("INFO", logger="at2_rag.chatbot"):
        assert chatbot_app.main(["--auth", str(tokens), "--upload-dir", str(tmp_path / "up")]) == 0
    assert "Per-user workspaces" in caplog.text and "alice, bob" in caplog.text
    assert "Single-user" not in caplog.text
    assert all(token not in caplog.text + capsys.readouterr().out for token in TOKENS.values())  # never logged
    client = TestClient(served["app"], base_url=BASE)
    assert client.get("/api/status").status_code == 401
    assert client.get("/api/status", headers=BOB).json()["user"] == "bob"
    tokens.write_text("alice:short\n")
    with pytest.raises(SystemExit) as exit_:
        chatbot_app.main(["--auth", str(tokens)])
    assert exit_.value.code == 2 and "at least 16 characters" in capsys.readouterr().err
