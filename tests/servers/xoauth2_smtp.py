"""
An Exchange Online-like submission server for the XOAUTH2 tests (issue 9),
in a thread (the gateway runs as a process): STARTTLS with a test CA's
certificate, then only C{AUTH XOAUTH2}, whose SASL string is checked as
Microsoft documents it for SMTP AUTH with OAuth
(learn.microsoft.com/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth):
C{base64("user=" + mailbox + "^Aauth=Bearer " + token + "^A^A")}.

The bearer token is checked by a callback (the local token endpoint's
L{OAuthEndpoint.valid}); L{XOAuth2SMTP.refuse_next} refuses that many
otherwise good tokens (an expired or revoked one), answered Microsoft's way
(C{535 5.7.3}) or, with C{challenge = True}, Google's (a C{334} error
challenge, then C{535} after the client's empty line).
"""

from __future__ import annotations

import base64
import binascii
import socketserver
import ssl
import threading
from pathlib import Path
from typing import Callable

import attrs

from tests.servers.threaded import ServedInThread

__all__ = ["XOAuth2SMTP", "AuthAttempt", "Message"]


@attrs.define
class AuthAttempt:
    """One AUTH XOAUTH2: the user and token sent (C{""} when malformed), the reply code."""

    user: str
    token: str
    code: int
    tls: bool


@attrs.define
class Message:
    """One delivered message."""

    sender: str
    recipients: list[str]
    data: bytes
    user: str


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = 30

    def _send(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        owner = self.server.owner
        tls = False
        user = ""
        sender: str | None = None
        recipients: list[str] = []
        self._send("220 xoauth2.test Microsoft ESMTP MAIL Service ready")
        while line := self.rfile.readline(8192):
            verb, _, arg = line.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                offers = ["SIZE 37748736", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
                offers.append("AUTH XOAUTH2" if tls else "STARTTLS")
                lines = ["xoauth2.test Hello", *offers]
                self._send("\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}")
            elif verb == "STARTTLS" and not tls:
                self._send("220 2.0.0 SMTP server ready")
                self.connection = owner.context.wrap_socket(self.connection, server_side=True)
                self.rfile = self.connection.makefile("rb")
                self.wfile = self.connection.makefile("wb")
                tls = True
                user = ""
            elif verb == "AUTH" and arg.upper().startswith("XOAUTH2") and tls and not user:
                user = self._auth(arg[len("XOAUTH2"):].strip(), tls)
            elif verb == "AUTH":
                self._send("504 5.7.4 Unrecognized authentication type")
            elif verb == "MAIL":
                if not user:
                    self._send("530 5.7.57 Client not authenticated to send mail")
                    continue
                sender, recipients = _address(arg), []
                self._send("250 2.1.0 Sender OK")
            elif verb == "RCPT" and sender is not None:
                recipients.append(_address(arg))
                self._send("250 2.1.5 Recipient OK")
            elif verb == "DATA" and sender is not None and recipients:
                self._send("354 Start mail input; end with <CRLF>.<CRLF>")
                owner._record(Message(sender, recipients, self._data(), user))
                sender, recipients = None, []
                self._send("250 2.6.0 Queued mail for delivery")
            elif verb in ("RSET", "NOOP"):
                sender, recipients = None, []
                self._send("250 2.0.0 OK")
            elif verb == "QUIT":
                self._send("221 2.0.0 Service closing transmission channel")
                break
            else:
                self._send("503 5.5.1 Bad sequence of commands")

    def _auth(self, initial: str, tls: bool) -> str:
        owner = self.server.owner
        try:
            sasl = base64.b64decode(initial, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            sasl = ""
        user, token = "", ""
        # Exactly: user=<mailbox>^Aauth=Bearer <token>^A^A
        if sasl.startswith("user=") and sasl.endswith("\x01\x01") and sasl.count("\x01") == 3:
            user_part, auth_part = sasl[len("user="):-2].split("\x01")
            if auth_part.startswith("auth=Bearer ") and user_part:
                user, token = user_part, auth_part[len("auth=Bearer "):]
        good = bool(user) and user == owner.user and owner.validate(token)
        with owner.lock:
            if good and owner.refuse_next > 0:
                owner.refuse_next -= 1
                good = False
        if good:
            owner._attempt(AuthAttempt(user, token, 235, tls))
            self._send("235 2.7.0 Authentication successful")
            return user
        owner._attempt(AuthAttempt(user, token, 535, tls))
        if owner.challenge:
            self._send("334 " + base64.b64encode(
                b'{"status":"401","schemes":"bearer","scope":"https://outlook.office365.com/"}'
            ).decode())
            self.rfile.readline(8192)  # the client's empty answer
        self._send("535 5.7.3 Authentication unsuccessful")
        return ""

    def _data(self) -> bytes:
        lines = []
        while (line := self.rfile.readline(1 << 20)) not in (b".\r\n", b""):
            lines.append(line[1:] if line.startswith(b".") else line)
        return b"".join(lines)


def _address(arg: str) -> str:
    start, end = arg.find("<"), arg.find(">")
    return arg[start + 1 : end] if 0 <= start < end else ""


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: XOAuth2SMTP


class XOAuth2SMTP(ServedInThread):
    """
    Serve on 127.0.0.1 (port 0: any) until L{stop}.

    @param pem: the server's certificate and key (L{TestCA.issue}).
    @param user: the mailbox the app must send as.
    @param validate: whether a bearer token is good (runs in a handler thread).
    @ivar refuse_next: refuse this many good tokens (then accept again).
    @ivar challenge: refuse with a 334 error challenge before the 535.
    """

    __test__ = False

    def __init__(
        self, pem: Path, user: str, validate: Callable[[str], bool], port: int = 0
    ) -> None:
        self.user = user
        self.validate = validate
        self.refuse_next = 0
        self.challenge = False
        self.lock = threading.Lock()
        self.auths: list[AuthAttempt] = []
        self.messages: list[Message] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(pem))
        server = _Server(("127.0.0.1", port), _Handler)
        server.owner = self
        self._serve(server)

    def _attempt(self, attempt: AuthAttempt) -> None:
        with self.lock:
            self.auths.append(attempt)

    def _record(self, message: Message) -> None:
        with self.lock:
            self.messages.append(message)

    def delivered(self) -> list[Message]:
        """The messages so far (a copy)."""
        with self.lock:
            return list(self.messages)

    def attempts(self) -> list[AuthAttempt]:
        """The AUTH attempts so far (a copy)."""
        with self.lock:
            return list(self.auths)
