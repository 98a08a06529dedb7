"""What the chatbot refuses before any route runs: requests for a name it does not serve (DNS rebinding),
writes that a browser marks as coming from another site (cross-site request forgery), and over-large
non-multipart bodies.

Why: the server listens on the user's own machine with no login. Any web page the user visits can send it
requests: a `fetch(..., {mode: "no-cors"})` POST with a form body needs no CORS preflight, so without a check a
hostile page could plant or delete documents. A page on a domain that re-resolves to 127.0.0.1 (DNS rebinding)
can even read the answers, but its requests still carry its own name in `Host`. So:

- every request's `Host` must be one of the names the server answers to (421 `misdirected_request`; 400
  `missing_host` without one);
- a request that changes something (POST, PUT, PATCH, DELETE) is refused with 403 `cross_site` when the browser
  says it comes from elsewhere: `Sec-Fetch-Site` other than `same-origin` or `none`, or an `Origin` whose host
  is not the request's own `Host`. Clients that are not browsers send neither header and are not affected;
- a body that is not multipart (the JSON endpoints) is read up to `max_body_bytes` and refused beyond (413
  `request_too_large`), before anything parses it. Uploads are bounded by their own handler;
- with per-user workspaces (`--auth FILE`, `read_tokens`), every request under `/api/` (but the API's own
  documentation page) must carry `Authorization: Bearer <token>` of a listed user (401 `unauthorized` otherwise);
  the user is put in the request's state (`request.state.user`) for the routes to choose the workspace.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("at2_rag.chatbot")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ALLOWED_FETCH_SITES = frozenset({"same-origin", "none"})  # "none": typed in the address bar, a bookmark


USER_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # also a folder name: no "/", no leading "."
MIN_TOKEN_CHARS = 16
OPEN_API_PATHS = frozenset({"/api/docs", "/api/docs/oauth2-redirect"})  # the API's documentation page: no data


class AuthFileError(ValueError):
    """A token file that cannot be used; the message names the line."""


def read_tokens(path: str | Path) -> dict[str, str]:
    """{user: token} from a token file: one `user:token` a line; blank lines and lines starting with `#` are
    skipped. A user name is 1-64 letters, digits, `_`, `.`, `-` (not starting with `.`: it names the user's upload
    folder); a token has at least 16 characters and no spaces; names and tokens are unique. Raises AuthFileError."""
    file = Path(path).expanduser()
    try:
        lines = file.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthFileError(f"cannot read the token file {str(file)!r}: {exc}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, token = line.partition(":")
        user, token = user.strip(), token.strip()
        where = f"{file}, line {number}"
        if not sep or not USER_NAME.match(user):
            raise AuthFileError(
                f"{where}: expected `user:token` with a user name of letters, digits, '_', '.', '-' (at most 64)"
            )
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
            raise AuthFileError(
                f"{where}: the token of {user!r} must have at least {MIN_TOKEN_CHARS} characters and no spaces "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')"
            )
        if user in users:
            raise AuthFileError(f"{where}: the user {user!r} is listed twice")
        if token in users.values():
            raise AuthFileError(f"{where}: the token of {user!r} is another user's too")
        users[user] = token
    if not users:
        raise AuthFileError(f"the token file {str(file)!r} lists no user (one `user:token` a line)")
    return users


def split_host(value: str) -> tuple[str, str | None]:
    """`Host`/netloc -> (lower-case name without brackets, port or None): "[::1]:80" -> ("::1", "80")."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") and rest[1:].isdigit() else None
    name, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name, port
    return value, None


class HostNames:
    """The names the server answers to: "name" (any port) or "name:port" ("[::1]:8000" for IPv6)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = [split_host(n) for n in names if n.strip()]

    def allows(self, host: str) -> bool:
        name, port = split_host(host)
        return any(name == n and (p is None or p == port) for n, p in self.names)

    def __str__(self) -> str:
        return ", ".join((f"[{n}]" if ":" in n else n) + (f":{p}" if p else "") for n, p in self.names)


def _reply(status: int, kind: str, message: str) -> tuple[dict[str, Any], bytes]:
    body = json.dumps({"error": kind, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="at2-chatbot"'))
    start = {"type": "http.response.start", "status": status, "headers": headers}
    return start, body


class RequestGuard:
    """ASGI middleware for the checks in this module's docstring."""

    def __init__(
        self,
        app: ASGIApp,
        allowed_hosts: Iterable[str],
        max_body_bytes: int,
        tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.hosts = HostNames(allowed_hosts)
        self.max_body_bytes = max_body_bytes
        # {user: token}; None: no login (single-user and local)
        self.tokens = [(user, token.encode()) for user, token in tokens.items()] if tokens is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self.refusal(scope["method"], headers)
        if refusal is not None:
            await self._send(send, *refusal)
            return
        if self.tokens is not None and scope["path"].startswith("/api/") and scope["path"] not in OPEN_API_PATHS:
            user = self.user(headers)
            if user is None:
                await self._send(send, *self._unauthorized(headers))
                return
            scope.setdefault("state", {})["user"] = user
        ctype = headers.get("content-type", "")
        if scope["method"] in MUTATING_METHODS and not ctype.startswith("multipart/form-data"):
            body = await self._read_body(headers, receive)
            if body is None:
                await self._send(send, *self._too_large(headers))
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def refusal(self, method: str, headers: Headers) -> tuple[int, str, str] | None:
        """(status, kind, message) when the request is refused before the app sees it, else None."""
        host = headers.get("host")
        if not host:
            return 400, "missing_host", "The request has no Host header; send one naming this server."
        if not self.hosts.allows(host):
            logger.warning("refused a request for host %r (serving %s)", host, self.hosts)
            return (
                421,
                "misdirected_request",
                f"This server does not answer to the name {host!r}; it answers to {self.hosts}. If you reach it "
                "through another name, start it with --allowed-host NAME.",
            )
        if method not in MUTATING_METHODS:
            return None
        site = headers.get("sec-fetch-site")
        origin = headers.get("origin")
        if site is not None and site.lower() not in ALLOWED_FETCH_SITES:
            reason = f"your browser marked it as coming from another site (Sec-Fetch-Site: {site})"
        elif origin is not None and split_host(urlsplit(origin).netloc) != split_host(host):
            reason = f"it was sent by a page of another origin ({origin})"
        else:
            return None
        logger.warning("refused a cross-site %s: %s", method, reason)
        return (
            403,
            "cross_site",
            f"This request was refused because {reason}. Documents and answers can only be changed from this "
            "server's own page or from a client that is not a browser.",
        )

    def user(self, headers: Headers) -> str | None:
        """The user whose token the request's `Authorization: Bearer` header carries, or None. Every token is
        compared in constant time."""
        scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip() or self.tokens is None:
            return None
        given = credentials.strip().encode()
        found = None
        for user, token in self.tokens:
            if secrets.compare_digest(given, token):
                found = user
        return found

    @staticmethod
    def _unauthorized(headers: Headers) -> tuple[int, str, str]:
        if headers.get("authorization"):
            logger.warning("refused a request with an unknown token")
            reason = "The access token sent with this request is not valid."
        else:
            reason = "This server has per-user workspaces and needs an access token."
        return (
            401,
            "unauthorized",
            f"{reason} Send it as `Authorization: Bearer <token>`; in the page, enter the token you were given "
            "when it asks. Ask the person who runs the server for a token.",
        )

    async def _read_body(self, headers: Headers, receive: Receive) -> bytes | None:
        """The whole body, or None when it is (or says it is) over `max_body_bytes`."""
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _too_large(self, headers: Headers) -> tuple[int, str, str]:
        declared = headers.get("content-length")
        size = f"{int(declared):,} bytes" if declared and declared.isdigit() else "larger than that"
        return (
            413,
            "request_too_large",
            f"The request body is {size}; this server accepts at most {self.max_body_bytes:,} bytes of JSON per "
            "request. Send a shorter question or fewer earlier turns.",
        )

    @staticmethod
    async def _send(send: Send, status: int, kind: str, message: str) -> None:
        start, body = _reply(status, kind, message)
        await send(start)
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, original: Receive) -> Receive:
    """A `receive` that gives the already read body once, then the real one's messages (a streaming answer
    listens there for the client going away)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive
