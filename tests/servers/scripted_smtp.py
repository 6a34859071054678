"""
A small SMTP receiver in a thread, for end-to-end tests that run the
gateway as a process: it answers each recipient by a rule of the test
(C{550} for one recipient of two, C{451} until a count is reached) and
records every transaction it saw, including the refused ones.

smtp-sink answers every recipient alike; a Twisted server in the test's
reactor cannot serve while the test blocks on the gateway, so this one
runs in its own thread (socketserver, one thread per connection).
"""

from __future__ import annotations

import re
import socketserver
import threading
from typing import Callable

import attrs

from tests.servers.threaded import ServedInThread

__all__ = ["ScriptedSMTP", "Transaction"]

#: A recipient address -> the RCPT reply, or C{None} for 250.
Rule = Callable[[str], "str | None"]


@attrs.define
class Transaction:
    """
    One MAIL transaction: its sender, the recipients answered 250, the data
    (when sent; dot-unstuffed) and C{raw}, the data as it came over the wire
    (still dot-stuffed, the end marker excluded).
    """

    sender: str
    accepted: list[str] = attrs.Factory(list)
    refused: list[str] = attrs.Factory(list)
    data: bytes | None = None
    raw: bytes | None = None


#: The ends of data that lenient receivers accept (SMTP smuggling research):
#: any line end before and after the dot, NULs around it ignored.
LENIENT_END = re.compile(rb"(?:\r\n|\r|\n)\x00*\.\x00*(?:\r\n|\r|\n)")


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = 30

    def _send(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def _readline(self, limit: int) -> bytes:
        if self._pushback:
            line, nl, self._pushback = self._pushback.partition(b"\n")
            return line + nl
        return self.rfile.readline(limit)

    def handle(self) -> None:
        self._pushback = b""
        self._send("220 scripted.test ESMTP")
        txn: Transaction | None = None
        while line := self._readline(4096):
            verb, _, arg = line.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                self._send("250-scripted.test\r\n250-8BITMIME\r\n250 SMTPUTF8")
            elif verb in ("HELO", "NOOP"):
                self._send("250 ok")
            elif verb == "MAIL":
                txn = Transaction(_address(arg))
                self._send("250 2.1.0 ok")
            elif verb == "RCPT" and txn is not None:
                address = _address(arg)
                reply = self.server.rule(address)
                (txn.refused if reply else txn.accepted).append(address)
                self._send(reply or "250 2.1.5 ok")
            elif verb == "DATA" and txn is not None and txn.accepted:
                self._send("354 go ahead")
                txn.raw = self._lenient_data() if self.server.lenient else self._data()
                txn.data = _unstuffed(txn.raw)
                self.server.record(txn)
                txn = None
                self._send("250 2.0.0 queued")
            elif verb == "RSET":
                if txn is not None:
                    self.server.record(txn)
                txn = None
                self._send("250 ok")
            elif verb == "QUIT":
                self._send("221 bye")
                break
            else:
                self._send("503 5.5.1 bad sequence")
        if txn is not None:
            self.server.record(txn)

    def _data(self) -> bytes:
        lines = []
        while (line := self._readline(1 << 20)) not in (b".\r\n", b""):
            lines.append(line)
        return b"".join(lines)

    def _lenient_data(self) -> bytes:
        # A deliberately lenient receiver (the downstream half of SMTP
        # smuggling): the first LENIENT_END ends the data; what follows it is
        # read as commands.
        stream = b"\r\n"
        while line := self._readline(1 << 20):
            stream += line
            end = LENIENT_END.search(stream)
            if end is not None:
                self._pushback = stream[end.end():] + self._pushback
                return stream[2 : end.start()] + b"\r\n" if end.start() >= 2 else b""
        return stream[2:]


def _unstuffed(raw: bytes) -> bytes:
    """Data lines with the first dot of each removed (RFC 5321 section 4.5.2)."""
    lines = raw.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def _address(arg: str) -> str:
    start, end = arg.find("<"), arg.find(">")
    return arg[start + 1 : end] if 0 <= start < end else ""


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog (5) left a gateway's extra concurrent
    # connections waiting for a banner that never came.
    request_queue_size = 128

    def __init__(self, host: str, port: int, rule: Rule, lenient: bool) -> None:
        super().__init__((host, port), _Handler)
        self.rule = rule
        self.lenient = lenient
        self.lock = threading.Lock()
        self.transactions: list[Transaction] = []

    def record(self, txn: Transaction) -> None:
        with self.lock:
            self.transactions.append(txn)


class ScriptedSMTP(ServedInThread):
    """
    Serve SMTP on C{host:port} (port 0: any) until L{stop}.

    @param rule: decides each RCPT reply; it runs in the connection's thread.
    @param lenient: end the data at the first L{LENIENT_END} (C{LF.LF},
        C{CR.CR}, C{CRLF\\x00.CRLF}...), as the receivers fooled by SMTP
        smuggling do, and read what follows as commands; otherwise only at
        C{CRLF.CRLF}.
    """

    def __init__(
        self, rule: Rule, host: str = "127.0.0.1", port: int = 0, *, lenient: bool = False
    ) -> None:
        self._serve(_Server(host, port, rule, lenient))

    def transactions(self) -> list[Transaction]:
        """Every transaction so far (a copy)."""
        with self._server.lock:
            return list(self._server.transactions)
