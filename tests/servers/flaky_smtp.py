"""
A recording SMTP downstream that misbehaves at random, for the soak: it
drops connections (before its banner, after MAIL, in the middle of DATA,
after the final dot without a reply), answers 421 at connect and 451 to
RCPT or to the end of DATA, and refuses recipients whose local part starts
with C{bounce-} with 550.  Only a message it answered 250 after DATA is
recorded as delivered, once per accepted recipient: a sender that delivers
a message twice shows up as a duplicate.

Threads (socketserver) like L{tests.servers.scripted_smtp}, so that it serves
while the test blocks; the choices come from one seeded random generator.
"""

from __future__ import annotations

import random
import re
import socketserver
import threading
from collections import Counter

import attrs

from tests.servers.threaded import ServedInThread

__all__ = ["FaultRates", "FlakySMTP", "Delivery"]

_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.I | re.M)


@attrs.frozen
class FaultRates:
    """The chance of each fault, per connection or per command."""

    drop_at_connect: float = 0.03
    busy_at_connect: float = 0.02  # 421 then close
    drop_after_mail: float = 0.02
    defer_rcpt: float = 0.05  # 451 to one RCPT
    drop_mid_data: float = 0.03
    drop_after_dot: float = 0.03  # the data is in, the reply never comes
    defer_after_dot: float = 0.04  # 451 to the final dot


@attrs.define
class Delivery:
    """One message answered 250: its first Message-ID field, recipients, data."""

    message_id: str
    sender: str
    recipients: list[str]
    data: bytes


class _Drop(Exception):
    pass


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = 60

    def _send(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        try:
            self._session()
        except (_Drop, OSError):
            pass

    def _session(self) -> None:
        f, rates = self.server.fault, self.server.rates
        self.server.count("connections")
        if f(rates.drop_at_connect, "drop_at_connect"):
            raise _Drop
        if f(rates.busy_at_connect, "busy_at_connect"):
            self._send("421 4.3.2 flaky.test busy")
            raise _Drop
        self._send("220 flaky.test ESMTP")
        sender: str | None = None
        rcpts: list[str] = []
        while line := self.rfile.readline(4096):
            verb, _, arg = line.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                self._send("250-flaky.test\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 SMTPUTF8")
            elif verb in ("HELO", "NOOP"):
                self._send("250 ok")
            elif verb == "MAIL":
                if f(rates.drop_after_mail, "drop_after_mail"):
                    raise _Drop
                sender, rcpts = _address(arg), []
                self._send("250 2.1.0 ok")
            elif verb == "RCPT" and sender is not None:
                address = _address(arg)
                if address.lower().startswith("bounce-"):
                    self._send("550 5.1.1 no such user here")
                elif f(rates.defer_rcpt, "defer_rcpt"):
                    self._send("451 4.3.0 try that one later")
                else:
                    rcpts.append(address)
                    self._send("250 2.1.5 ok")
            elif verb == "DATA" and sender is not None and rcpts:
                self._send("354 go ahead")
                data = self._data(f(rates.drop_mid_data, "drop_mid_data"))
                if f(rates.drop_after_dot, "drop_after_dot"):
                    raise _Drop
                if f(rates.defer_after_dot, "defer_after_dot"):
                    self._send("451 4.3.0 not now")
                else:
                    self.server.record(sender, rcpts, data)
                    self._send("250 2.0.0 delivered")
                sender, rcpts = None, []
            elif verb == "DATA":
                self._send("503 5.5.1 no valid recipients")
            elif verb == "RSET":
                sender, rcpts = None, []
                self._send("250 ok")
            elif verb == "QUIT":
                self._send("221 bye")
                break
            else:
                self._send("503 5.5.1 bad sequence")

    def _data(self, drop: bool) -> bytes:
        lines = []
        while (line := self.rfile.readline(1 << 20)) not in (b".\r\n", b""):
            lines.append(line[1:] if line.startswith(b".") else line)
            if drop and len(lines) > 2:
                raise _Drop
        if not line:
            raise _Drop
        return b"".join(lines)


def _address(arg: str) -> str:
    start, end = arg.find("<"), arg.find(">")
    return arg[start + 1 : end] if 0 <= start < end else ""


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, host: str, port: int, rates: FaultRates, seed: int) -> None:
        super().__init__((host, port), _Handler)
        self.rates = rates
        self.lock = threading.Lock()
        self.random = random.Random(seed)
        self.deliveries: list[Delivery] = []
        self.faults: Counter[str] = Counter()

    def fault(self, rate: float, name: str) -> bool:
        with self.lock:
            hit = self.random.random() < rate
            if hit:
                self.faults[name] += 1
            return hit

    def count(self, name: str) -> None:
        with self.lock:
            self.faults[name] += 1

    def record(self, sender: str, rcpts: list[str], data: bytes) -> None:
        found = _ID.search(data)
        mid = found.group(1).decode("ascii", "replace") if found else ""
        with self.lock:
            self.deliveries.append(Delivery(mid, sender, list(rcpts), data))


class FlakySMTP(ServedInThread):
    """Serve on C{host:port} (port 0: any) until L{stop}."""

    def __init__(self, rates: FaultRates = FaultRates(), *, seed: int = 0,
                 host: str = "127.0.0.1", port: int = 0) -> None:  # fmt: skip
        self._serve(_Server(host, port, rates, seed))

    def deliveries(self) -> list[Delivery]:
        """Every message answered 250 so far (a copy)."""
        with self._server.lock:
            return list(self._server.deliveries)

    def faults(self) -> Counter[str]:
        """How often each fault was injected (and C{connections}: how many were taken)."""
        with self._server.lock:
            return Counter(self._server.faults)
