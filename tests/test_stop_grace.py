"""
The end of the stop grace (tap.md's SIGTERM row: sessions still open after
it are cut), with the real reactor on loopback: what
tests/e2e/test_stop_handshake_e2e.py cannot wait for with twistd's 30 s.

Sessions that the grace must cut, on connectors with the default 5-minute
command timeout: a STARTTLS handshake with half a ClientHello, an
implicit-TLS connection with no ClientHello, and a client in the middle of
DATA.  The service is built with a 1 s grace: its stop ends, every one of
them is closed (no plaintext reply to a handshake), the abort is logged with
their count and no failure, and the message never finished is not in the
queue.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any, cast

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import TestCase

from relaygw._types import IServeReactor
from relaygw.config._load import load_text
from relaygw.service import RelayGatewayService
from tests.e2e.conftest import LOCAL_MAILDIR
from tests.servers.ports import free_ports

_CONFIG = """
[gateway]
hostname = "mx.example.test"
spool_dir = "spool"
log_dir = "log"
default_route = "local"
""" + LOCAL_MAILDIR + """
[[connectors]]
name = "Submission"
bindings = ["127.0.0.1:{starttls}"]
tls = "starttls"
certificate = "tls/mail.pem"

[[connectors]]
name = "Implicit"
bindings = ["127.0.0.1:{implicit}"]
tls = "implicit"
certificate = "tls/mail.pem"
"""

GRACE = 1.0


def _read_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _half_hello() -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tls = ctx.wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:16]
    return hello[: len(hello) // 2]


def _open_sessions(starttls: int, implicit: int) -> dict[str, socket.socket]:
    """Blocking clients (run in a thread): each left where the grace must cut it."""
    # First the connection that gets no reply: the round trips of the
    # others take reactor iterations that (level-triggered) accept it too,
    # so it is a session, not a backlog entry dropped when the port closes.
    implicit_silent = socket.create_connection(("127.0.0.1", implicit), timeout=10)
    tls = socket.create_connection(("127.0.0.1", starttls), timeout=10)
    assert _read_until(tls, b"\r\n").startswith(b"220 ")
    tls.sendall(b"EHLO stalled.test\r\nSTARTTLS\r\n")
    assert b"\r\n220 2.0.0 " in _read_until(tls, b"220 2.0.0 SMTP server ready\r\n")
    tls.sendall(_half_hello())
    data = socket.create_connection(("127.0.0.1", starttls), timeout=10)
    assert _read_until(data, b"\r\n").startswith(b"220 ")
    data.sendall(b"EHLO printer.test\r\nMAIL FROM:<p@printer.test>\r\n"
                 b"RCPT TO:<carol@example.test>\r\nDATA\r\n")
    assert b"\r\n354 " in _read_until(data, b"end with <CRLF>.<CRLF>\r\n")
    data.sendall(b"Subject: never finished\r\n\r\nhalf\r\n")
    return {
        "STARTTLS, half a ClientHello": tls,
        "implicit TLS, no ClientHello": implicit_silent,
        "in DATA": data,
    }


def _until_closed(sock: socket.socket) -> bytes:
    """What the server sends before it closes (a test timeout if it never does)."""
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return got


class StopGraceTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="relaygw-grace-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        self.starttls, self.implicit = free_ports(2)
        text = _CONFIG.format(starttls=self.starttls, implicit=self.implicit)
        self.config = load_text(text, "test.toml", self.base)
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def test_grace_cuts_stalled_handshakes_and_data(self) -> None:
        from twisted.internet import reactor

        service = RelayGatewayService(self.config, cast(IServeReactor, reactor), stop_grace=GRACE)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)

        async def check() -> None:
            socks: dict[str, socket.socket] = await threads.deferToThread(
                _open_sessions, self.starttls, self.implicit)
            for sock in socks.values():
                sock.settimeout(20)
            await service.stopService()
            for what, sock in socks.items():
                got: bytes = await threads.deferToThread(_until_closed, sock)
                assert b"250 " not in got, (what, got)  # nothing acknowledged
                if what != "in DATA":  # no reply can be written mid-handshake
                    assert b"421" not in got, (what, got)
            aborted = [e for e in self.events if e.get("event") == "stop.sessions-aborted"]
            assert [e["count"] for e in aborted] == [len(socks)], aborted
            failures = [e for e in self.events if "log_failure" in e]
            assert failures == []
            queue = self.base / "spool" / "queue"
            assert queue.is_dir()
            assert sorted(p.name for p in queue.glob("*.msg")) == []

        return Deferred.fromCoroutine(check())  # type: ignore[return-value]
