"""
A local Microsoft Graph-like HTTPS endpoint for C{sendMail} with a MIME
body (issue 9), checked as Microsoft documents it
(learn.microsoft.com/graph/api/user-sendmail, "Send a message using MIME
format"):

  - C{POST /v1.0/users/{id | userPrincipalName}/sendMail};
  - C{Authorization: Bearer {token}}, a token the test's token endpoint
    issued (else 401 C{InvalidAuthenticationToken});
  - C{Content-Type: text/plain}, the body the base64 of the MIME message
    (else 400 C{ErrorMimeContentInvalidBase64String});
  - success: C{202 Accepted} with an empty body.

It stores each accepted message (mailbox, decoded MIME, the To/Cc/Bcc
recipients Graph would send to), and can be scripted to answer the next
requests with another status (429 with Retry-After, 500, 400, 401) in Graph's
JSON error form.  Like L{tests.servers.oauth_endpoint} it runs in its own
thread (stdlib C{http.server} over C{ssl}), so it serves while the test
blocks on a gateway process, and it can be stopped and started again on the
same port (Graph "down").
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import email.utils
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from attrs import frozen

__all__ = ["GraphEndpoint", "Scripted", "Sent", "Seen"]

_PREFIX = "/v1.0/users/"
_SUFFIX = "/sendMail"


@frozen
class Scripted:
    """One scripted answer: a status, Graph's error code and message, a Retry-After."""

    status: int
    code: str = "ErrorScripted"
    message: str = "scripted by the test"
    retry_after: str | None = None


@frozen
class Sent:
    """A message Graph accepted: the mailbox it is sent from, the MIME, its recipients."""

    mailbox: str
    mime: bytes
    recipients: tuple[str, ...]
    at: float
    token: str


@frozen
class Seen:
    """Any request: when, its path and the status answered."""

    at: float
    path: str
    status: int


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: dict[str, object] | None = None,
                retry_after: str | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.server.owner._seen(self.path, status)

    def _error(self, status: int, code: str, message: str, retry_after: str | None = None) -> None:
        self._answer(status, {"error": {"code": code, "message": message,
                                        "innerError": {"request-id": "0000"}}}, retry_after)

    def do_GET(self) -> None:
        self._error(405, "Request_BadRequest", "Only POST is served here.")

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        scripted = owner._next_scripted()
        if scripted is not None:
            self._error(scripted.status, scripted.code, scripted.message, scripted.retry_after)
            return
        if not (self.path.startswith(_PREFIX) and self.path.endswith(_SUFFIX)):
            self._error(404, "Request_ResourceNotFound", f"Resource {self.path} does not exist.")
            return
        mailbox = unquote(self.path[len(_PREFIX):-len(_SUFFIX)])
        auth = self.headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme != "Bearer" or not owner.valid_token(token):
            self._error(401, "InvalidAuthenticationToken", "Access token is empty or invalid.")
            return
        media = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if media != "text/plain":
            self._error(415, "ErrorUnsupportedMediaType", f"Content type {media!r}.")
            return
        try:
            mime = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            self._error(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
            return
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(mime)
        values = [str(v) for name in ("to", "cc", "bcc") for v in headers.get_all(name) or []]
        recipients = tuple(a for _, a in email.utils.getaddresses(values) if a)
        if not recipients:
            self._error(400, "ErrorInvalidRecipients", "At least one recipient is not valid.")
            return
        owner._store(Sent(mailbox, mime, recipients, time.time(), token))
        self._answer(202)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: GraphEndpoint

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.owner.lock:
            self.owner._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.owner.lock:
            self.owner._open.discard(request)
        super().shutdown_request(request)


class GraphEndpoint:
    """
    Serve Graph's sendMail on 127.0.0.1 (port 0: any) until L{stop}.

    @param pem: the server certificate and key (L{tests.servers.recording_smtp.TestCA.issue}).
    @param valid_token: whether a bearer token is good (the token endpoint's C{valid}).
    @ivar sent: the messages accepted, in order.
    @ivar seen: every request answered, in order.
    @ivar script: the answers of the next requests (consumed in order).
    """

    __test__ = False

    def __init__(self, pem: Path, *, valid_token: Callable[[str], bool] = bool,
                 port: int = 0) -> None:
        self.valid_token = valid_token
        self.lock = threading.Lock()
        self.sent: list[Sent] = []
        self.seen: list[Seen] = []
        self.script: list[Scripted] = []
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(pem))
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._open: set[Any] = set()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The base URL, for a route's C{graph_endpoint}."""
        return f"https://127.0.0.1:{self._port}"

    def start(self) -> GraphEndpoint:
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.owner = self
        server.socket = self._context.wrap_socket(server.socket, server_side=True)
        self._port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open (keep-alive) connections: Graph is down until L{start}."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            open_now, self._open = list(self._open), set()
        for conn in open_now:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def push(self, *answers: Scripted) -> None:
        """Answer the next requests with C{answers}, in order."""
        with self.lock:
            self.script.extend(answers)

    def messages(self, subject: str) -> list[Sent]:
        """The accepted messages whose Subject header is C{subject}."""
        with self.lock:
            sent = list(self.sent)
        return [s for s in sent if f"\r\nSubject: {subject}\r\n".encode() in b"\r\n" + s.mime]

    def requests_for(self, subject_seen_after: float) -> list[Seen]:
        """The requests answered at or after a time."""
        with self.lock:
            return [s for s in self.seen if s.at >= subject_seen_after]

    # -- in the handler threads ------------------------------------------------

    def _next_scripted(self) -> Scripted | None:
        with self.lock:
            return self.script.pop(0) if self.script else None

    def _store(self, sent: Sent) -> None:
        with self.lock:
            self.sent.append(sent)

    def _seen(self, path: str, status: int) -> None:
        with self.lock:
            self.seen.append(Seen(time.time(), path, status))
