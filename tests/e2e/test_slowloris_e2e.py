"""
Slowloris where test_hostile_clients_e2e.py does not trickle (issue 11,
"Must show" 5): inside a BDAT chunk, inside an AUTH exchange, and in the TLS
handshake (after STARTTLS and on an implicit-TLS connector).

One gateway (two receiving processes) with command and data timeouts of
TIMEOUT seconds: a plaintext connector (anonymous submit, plaintext AUTH
allowed against a users file), a STARTTLS one and an implicit-TLS one (a
generated self-signed certificate).  Each slow client sends one byte a
second and must be cut by the configured timeout: 421 4.4.2 where a reply
can still be written, a plain close for a TLS handshake that never
completes.  The bound is in bytes sent at that pace (a few timeouts'
worth, against the hundreds the client would need), never a wall-clock
assertion.  Meanwhile the gateway's memory stays bounded and another
client's transaction completes and is delivered.
"""

from __future__ import annotations

import base64
import select
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Launch, gateway_toml, smarthost_relay, spool_entries
from tests.e2e.test_hostile_clients_e2e import (
    FQDN,
    Gateway,
    RSSWatch,
    _closed,
    _connect,
    _greeted,
    _read_until,
    _replies,
)
from tests.servers.ports import free_ports
from tests.servers.scripted_smtp import ScriptedSMTP
from tests.servers.smtp_clients import client_context

pytestmark = pytest.mark.e2e

TIMEOUT = 3  # seconds: the command and the data timeout
#: Bytes a slow client may trickle (one a second) before it must have been
#: cut: the timeout, again as much for a busy machine, and a margin.
CUT_WITHIN = 2 * TIMEOUT + 3
TIMED_OUT = f"421 4.4.2 {FQDN} Timeout waiting for client input\r\n".encode()


def _config(plain: int, starttls: int, implicit: int, admin: int, relay: int) -> str:
    common = f"""
remote_ranges = ["127.0.0.0/8"]
permissions.anonymous = ["submit"]
message_rate_limit = "100000/m"
timeouts = {{ command = "{TIMEOUT}s", data = "{TIMEOUT}s" }}
certificate = "tls/gw.pem"
"""
    return gateway_toml(admin, hostname=FQDN, workers=2) + f"""
[users]
file = "users"
{smarthost_relay(relay)}

[[connectors]]
name = "Plain"
bindings = ["127.0.0.1:{plain}"]
tls = "off"
allow_plaintext_auth = true
{common}
[[connectors]]
name = "STARTTLS"
bindings = ["127.0.0.1:{starttls}"]
{common}
[[connectors]]
name = "Implicit"
bindings = ["127.0.0.1:{implicit}"]
tls = "implicit"
{common}"""


class Ports:
    def __init__(self, gw: Gateway, starttls: int, implicit: int) -> None:
        self.gw, self.starttls, self.implicit = gw, starttls, implicit


@pytest.fixture(scope="module")
def downstream() -> Iterator[ScriptedSMTP]:
    server = ScriptedSMTP(lambda address: None).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gws(module_launch: Launch, module_workdir: Path, downstream: ScriptedSMTP) -> Ports:
    plain, starttls, implicit, admin = free_ports(4)
    root = module_workdir / "gw"
    root.mkdir()
    (root / "users").write_text("")  # no account: AUTH never gets that far here
    proc = module_launch(root, _config(plain, starttls, implicit, admin, downstream.port),
                         [plain, starttls, implicit])
    gw = Gateway(proc, plain, downstream)
    gw.others_served()  # warm: the delivery connection and every import
    return Ports(gw, starttls, implicit)


@pytest.fixture
def gw(gws: Ports) -> Gateway:
    return gws.gw


def trickle(sock: socket.socket, payload: bytes, gw: Gateway) -> tuple[int, bytes, bool]:
    """
    Send C{payload} one byte a second until the gateway answers or closes;
    another client's transaction runs after the first byte.

    @return: bytes sent, what the gateway sent back, whether it closed.
    """
    sent = 0
    served = False
    got = b""
    sock.settimeout(CUT_WITHIN)  # a connection never cut fails, not hangs
    with RSSWatch(gw) as watch:
        for byte in payload:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # closed under us: the cut
                return sent, got, True
            sent += 1
            if not served:
                gw.others_served()
                served = True
            ready, _, _ = select.select([sock], [], [], 1.0)
            if ready:
                got = _read_until(sock, lambda d: d.endswith(b"\r\n"))
                break
        try:
            closed = _closed(sock)
        except TimeoutError:
            closed = False
    watch.check()
    return sent, got, closed


def _auth_ready(sock: socket.socket, command: bytes) -> None:
    _greeted(sock)
    sock.sendall(b"EHLO slow-auth.hostile.test\r\n")
    ehlo = _read_until(sock, lambda d: d.endswith(b"\r\n") and b"\r\n250 " in b"\r\n" + d)
    assert b"AUTH PLAIN LOGIN" in ehlo, ehlo
    sock.sendall(command + b"\r\n")
    challenge = _read_until(sock, lambda d: d.endswith(b"\r\n"))
    assert challenge.startswith(b"334 "), challenge


# -- BDAT ---------------------------------------------------------------------------


def test_bdat_chunk_trickled(gw: Gateway) -> None:
    """
    C{BDAT 100000} then one byte a second: the data timeout restarts only
    with every 1 KiB of chunk data, so the client is cut with 421 4.4.2
    after about one timeout, and nothing of its message is queued.
    """
    spool = gw.proc.workdir / "var" / "spool"
    with _connect(gw.port) as sock:
        _greeted(sock)
        sock.sendall(b"EHLO slow-bdat.hostile.test\r\nMAIL FROM:<h@hostile.test>\r\n"
                     b"RCPT TO:<someone@example.test>\r\nBDAT 100000 LAST\r\n")
        data = _read_until(sock, lambda d: d.count(b"\r\n250 ") >= 2 and d.endswith(b"\r\n"))
        assert [r[:3] for r in _replies(data)] == [b"250", b"250", b"250"], data
        before = len(gw.downstream.transactions())
        sent, got, closed = trickle(sock, b"Subject: slow\r\n\r\n" + b"x" * 1000, gw)
    assert got == TIMED_OUT, f"after {sent} bytes: {got!r}"
    assert sent <= CUT_WITHIN, f"cut only after {sent} bytes"
    assert closed
    assert len(gw.downstream.transactions()) == before + 1  # only the other client's
    assert not spool_entries(spool)


# -- AUTH ---------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN-user", "LOGIN-password"])
def test_auth_response_trickled(gw: Gateway, mechanism: str) -> None:
    """
    Inside an AUTH exchange the client's response is a command line: the
    command timeout restarts only when a whole line arrives, so trickling
    the base64 response of AUTH PLAIN, or the user name or the password
    answer of AUTH LOGIN (the user name sent whole first), is cut with
    421 4.4.2 after about one timeout.
    """
    with _connect(gw.port) as sock:
        _auth_ready(sock, b"AUTH " + mechanism.partition("-")[0].encode())
        response = base64.b64encode(b"\0slowloris\0" + b"p" * 200)
        if mechanism == "LOGIN-password":
            sock.sendall(base64.b64encode(b"slowloris") + b"\r\n")
            prompt = _read_until(sock, lambda d: d.endswith(b"\r\n"))
            assert prompt == b"334 UGFzc3dvcmQ6\r\n", prompt
        sent, got, closed = trickle(sock, response + b"\r\n", gw)
    assert got == TIMED_OUT, f"after {sent} bytes: {got!r}"
    assert sent <= CUT_WITHIN, f"cut only after {sent} bytes"
    assert closed


def test_auth_login_answers_each_just_in_time(gw: Gateway) -> None:
    """
    AUTH LOGIN answered slowly but each answer whole within the timeout is
    a (slow) client, not an attack: the exchange has two prompts, so it is
    bounded by two timeouts, and it ends in 535 for an unknown account.
    """
    with _connect(gw.port) as sock:
        _auth_ready(sock, b"AUTH LOGIN")
        time.sleep(TIMEOUT / 2)
        sock.sendall(base64.b64encode(b"nobody") + b"\r\n")
        assert _read_until(sock, lambda d: d.endswith(b"\r\n")) == b"334 UGFzc3dvcmQ6\r\n"
        time.sleep(TIMEOUT / 2)
        sock.sendall(base64.b64encode(b"wrong") + b"\r\n")
        reply = _read_until(sock, lambda d: d.endswith(b"\r\n"))
    assert reply == b"535 5.7.3 Authentication unsuccessful\r\n", reply


# -- the TLS handshake --------------------------------------------------------------


def client_hello() -> bytes:
    """A real TLS ClientHello (what Python's ssl sends first)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing, server_hostname=None)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and len(hello) > 100, hello[:16]
    return hello


def _after_starttls(port: int, source: str | None = None) -> socket.socket:
    """EHLO, then STARTTLS answered 220: the next bytes are the client's ClientHello."""
    sock = _connect(port, source)
    _greeted(sock)
    sock.sendall(b"EHLO slow-tls.hostile.test\r\n")
    _read_until(sock, lambda d: d.endswith(b"\r\n") and b"\r\n250 " in b"\r\n" + d)
    sock.sendall(b"STARTTLS\r\n")
    assert _read_until(sock, lambda d: d.endswith(b"\r\n")) == b"220 2.0.0 SMTP server ready\r\n"
    return sock


def _open(gws: Ports, where: str) -> socket.socket:
    return _after_starttls(gws.starttls) if where == "starttls" else _connect(gws.implicit)


@pytest.mark.parametrize("where", ["starttls", "implicit"])
def test_client_hello_trickled(gws: Ports, where: str) -> None:
    """
    A ClientHello sent a byte a second never reaches the session's input,
    so nothing restarts its command timeout: the connection is closed
    after about one timeout (no reply: the handshake never completed, so
    nothing can be written to the client), long before the hello is done.
    """
    with _open(gws, where) as sock:
        hello = client_hello()
        sent, got, closed = trickle(sock, hello, gws.gw)
        # What a client reads from a connection closed mid-handshake: the
        # end, maybe after a TLS alert record, never a plaintext reply.
        assert b"421" not in got, got
    assert closed, f"still open after {sent} of {len(hello)} bytes of ClientHello"
    assert sent <= CUT_WITHIN, f"closed only after {sent} bytes"


@pytest.mark.parametrize("where", ["starttls", "implicit"])
def test_handshake_never_started(gws: Ports, where: str) -> None:
    """
    TCP open (and STARTTLS accepted) but no ClientHello at all: closed
    after about one timeout; meanwhile another client is served.
    """
    with _open(gws, where) as sock:
        sock.settimeout(CUT_WITHIN)
        gws.gw.others_served()
        start = time.monotonic()
        try:
            closed = _closed(sock)
        except TimeoutError:
            closed = False
        waited = time.monotonic() - start
    assert closed, f"still open {waited:.1f} s later"


@pytest.mark.parametrize("where", ["starttls", "implicit"])
def test_slow_handshake_then_served(gws: Ports, where: str) -> None:
    """
    The cut is per connection: a real TLS client right after a stalled one
    completes its handshake and a transaction on the same connector.
    """
    with _open(gws, where) as stalled:
        sock = _open(gws, where)
        with client_context().wrap_socket(sock) as tls:
            if where == "implicit":
                _greeted(tls)  # type: ignore[arg-type]
            tls.sendall(b"EHLO fast-tls.hostile.test\r\nMAIL FROM:<f@hostile.test>\r\n"
                        b"RCPT TO:<someone@example.test>\r\nQUIT\r\n")
            data = _read_until(tls, lambda d: d.endswith(b"\r\n") and b"\r\n221 " in d)
        assert [r[:3] for r in _replies(data)] == [b"250", b"250", b"250", b"221"], data
        stalled.settimeout(CUT_WITHIN)
        try:
            assert _closed(stalled)
        except TimeoutError:
            pytest.fail("the stalled handshake was never cut")

