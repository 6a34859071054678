"""
SIGTERM while TLS handshakes stall (tap.md's SIGTERM row, SPEC section 7,
README "Slow clients"): the real C{twistd -n relaygw}.

When the SIGTERM comes, the gateway (twistd alone, and with two receiving
processes) holds:
  - stalled handshakes: STARTTLS accepted, then no ClientHello or half of
    one; implicit TLS with half a ClientHello or nothing (on connectors with
    a short command timeout, under which a handshake runs);
  - two handshakes begun the same ways that complete after the SIGTERM (a
    source address whose connectors keep the default timeouts), each then
    sending a message;
  - a client in the middle of DATA, which finishes after the SIGTERM, and
    one that gives up there (no final dot);
  - one message acknowledged before it (over implicit TLS: the certificate
    works, so the stalls are the clients' doing).
The smarthost is down, so the acknowledged messages wait in the spool.

Expected (tap.md's SIGTERM row): the listeners close at once; the sessions
in progress, handshakes included, go on and get their 250s; each stalled
handshake ends under its own command timeout (closed without a plaintext
reply), none is left for the stop grace to cut; twistd exits 0 with no
traceback; the spool holds exactly the four acknowledged messages, and after
a restart with the smarthost up exactly those four are delivered (the
abandoned one never is, and no partial entry is left).
"""

from __future__ import annotations

import signal
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import Launch, gateway_toml, smarthost_relay, smtp, spool_entries
from tests.e2e.test_hostile_clients_e2e import _connect, _read_until
from tests.e2e.test_slowloris_e2e import _after_starttls
from tests.e2e.test_tls_e2e import _connector_pem
from tests.servers.ports import free_ports, wait_until
from tests.servers.sink import SINK_MISSING, SmtpSink, sink_missing
from tests.servers.smtp_clients import client_context

pytestmark = pytest.mark.e2e

TIMEOUT = 3  # seconds: the command timeout of the TLS connectors (handshakes run under it)
#: Generous: the stop grace (30 s) plus the delivery process's bound (30 s) and a margin;
#: a gateway that works exits a few seconds after the handshakes' timeout.
EXIT_WITHIN = 75
HANDSHAKE_TIMED_OUT = "TLS handshake with"
ABORTED_AT_GRACE = "still open after"  # relaygw.reload.Sessions.drain: cut by the grace
RESUMING = "127.0.40.5"  # source of the clients whose handshake goes on after the SIGTERM
TRANSACTION = (b"EHLO resumed.e2e.test\r\nMAIL FROM:<printer@client.e2e.test>\r\n"
               b"RCPT TO:<carol@example.test>\r\nDATA\r\n")


def _config(plain: int, starttls: int, implicit: int, admin: int, relay: int,
            workers: int) -> str:  # fmt: skip
    text = gateway_toml(admin, workers=workers) + smarthost_relay(relay) + f"""
[[connectors]]
name = "Plain"
bindings = ["127.0.0.1:{plain}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
"""
    for name, port, mode in (("STARTTLS", starttls, "starttls"), ("Implicit", implicit, "implicit")):
        # The stalling clients (127.0.0.1) meet a short command timeout; the
        # resuming ones (RESUMING) the default, so that a busy machine
        # cannot cut them before they finish.
        for suffix, ranges, timeouts in (
            ("", "127.0.0.0/8", f'timeouts = {{ command = "{TIMEOUT}s", data = "{TIMEOUT}s" }}'),
            (" resuming", f"{RESUMING}/32", ""),
        ):
            text += f"""
[[connectors]]
name = "{name}{suffix}"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["{ranges}"]
tls = "{mode}"
certificate = "tls/gw.pem"
{timeouts}
"""
    return text


def _message(subject: str) -> bytes:
    return (f"From: <printer@client.e2e.test>\r\nTo: <carol@example.test>\r\n"
            f"Subject: {subject}\r\n\r\n").encode()


def _sock_reader(sock: socket.socket) -> Callable[[Callable[[bytes], bool]], bytes]:
    return lambda done: _read_until(sock, done)


class HalfHello:
    """
    A TLS client over a socket through memory BIOs: it sends part of its
    ClientHello now, and the rest (and the whole handshake) later.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context().wrap_bio(self._in, self._out, server_hostname=None)
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        hello = self._out.read()
        self._rest = hello[len(hello) // 2:]
        sock.sendall(hello[: len(hello) // 2])

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the gateway")
        self._in.write(data)

    def finish_handshake(self) -> None:
        self.sock.sendall(self._rest)
        while True:
            try:
                self.tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def read_until(self, done: Callable[[bytes], bool]) -> bytes:
        data = b""
        while not done(data):
            try:
                data += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        return data


def _submit(send: Callable[[bytes], None], read_until: Callable[[Callable[[bytes], bool]], bytes],
            subject: str, *, greeting: bool) -> bytes:
    """(The greeting,) then one transaction; returns the reply to the final dot."""
    if greeting:
        assert read_until(lambda d: d.endswith(b"\r\n")).startswith(b"220 ")
    send(TRANSACTION)
    got = read_until(lambda d: d.endswith(b"\r\n") and b"\r\n354 " in d)
    assert b"\r\n354 " in got, got
    send(_message(subject) + b"body\r\n.\r\n")
    reply = read_until(lambda d: d.endswith(b"\r\n"))
    send(b"QUIT\r\n")
    return reply


def _stalled_handshakes(starttls: int, implicit: int) -> dict[str, socket.socket]:
    # The implicit-TLS ones get no reply: opened first, they are accepted
    # (level-triggered, by whichever process) during the round trips of
    # the clients after them, so none is still a backlog entry (dropped,
    # not a session) when the SIGTERM closes the listeners.
    silent = _connect(implicit)
    half = HalfHello(_connect(implicit)).sock
    return {
        "implicit, no ClientHello": silent,
        "implicit, half a ClientHello": half,
        "starttls, no ClientHello": _after_starttls(starttls),
        "starttls, half a ClientHello": HalfHello(_after_starttls(starttls)).sock,
    }


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _closed_without_reply(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes (bounded by the socket timeout)."""
    sock.settimeout(EXIT_WITHIN)
    try:
        return _read_until(sock, lambda d: False)
    finally:
        sock.close()


@pytest.mark.skipif(sink_missing(), reason=SINK_MISSING)
@pytest.mark.parametrize("workers", [1, 2], ids=["twistd-alone", "two-receivers"])
def test_sigterm_with_stalled_tls_handshakes(launch: Launch, workdir: Path, workers: int) -> None:
    plain, starttls, implicit, admin, relay = free_ports(5)
    root = workdir / "gw"
    (root / "tls").mkdir(parents=True)
    _connector_pem(root / "tls" / "gw.pem", "gw.e2e.test")
    config = _config(plain, starttls, implicit, admin, relay, workers)
    gw = launch(root, config, [plain, starttls, implicit])

    with client_context().wrap_socket(_connect(implicit)) as tls:
        reply = _submit(tls.sendall, _sock_reader(tls), "acked before stop", greeting=True)
    assert reply.startswith(b"250 "), reply
    stalled = _stalled_handshakes(starttls, implicit)
    finishing, code, _ = smtp(plain)
    assert code == 220
    abandoning, code, _ = smtp(plain)
    assert code == 220
    for client in (finishing, abandoning):
        client.ehlo("printer.e2e.test")
        assert client.mail("printer@client.e2e.test")[0] == 250
        assert client.rcpt("carol@example.test")[0] == 250
        assert client.docmd("DATA")[0] == 354
    assert finishing.sock is not None and abandoning.sock is not None
    finishing.sock.sendall(_message("finished after SIGTERM") + b"first half\r\n")
    abandoning.sock.sendall(_message("abandoned after SIGTERM") + b"first half\r\n")
    # Handshakes begun before the SIGTERM and completed after it.
    resumed_starttls = _after_starttls(starttls, RESUMING)
    resumed_implicit = HalfHello(_connect(implicit, RESUMING))
    time.sleep(0.2)  # the half ClientHellos reach the gateway

    mark = len(gw.output())
    gw.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopped listening" in gw.output()[mark:], 10, 0.05,
               "the listeners to close")
    assert _refused(plain) and _refused(starttls) and _refused(implicit)
    finishing.sock.sendall(b"second half\r\n.\r\n")
    code, reply = finishing.getreply()
    assert code == 250, reply
    finishing.quit()
    abandoning.sock.sendall(b"second half, no final dot\r\n")
    abandoning.close()
    with client_context().wrap_socket(resumed_starttls) as tls:
        reply = _submit(tls.sendall, _sock_reader(tls), "STARTTLS after SIGTERM", greeting=False)
    assert reply.startswith(b"250 "), reply
    resumed_implicit.finish_handshake()
    reply = _submit(resumed_implicit.send, resumed_implicit.read_until,
                    "implicit TLS after SIGTERM", greeting=True)
    assert reply.startswith(b"250 "), reply
    resumed_implicit.sock.close()

    for what, sock in stalled.items():
        got = _closed_without_reply(sock)
        # A close mid-handshake: the end, maybe after a TLS alert record,
        # never a plaintext SMTP reply (nothing can be written before TLS).
        assert b"421" not in got and b"250" not in got, (what, got)
    assert gw.proc is not None
    status = gw.proc.wait(timeout=EXIT_WITHIN)
    out = gw.output()
    assert status == 0, out[mark:]
    assert "Traceback" not in out and "Unhandled" not in out, out
    after = out[mark:]
    # Each stall ended under its own command timeout, none by the grace.
    assert after.count(HANDSHAKE_TIMED_OUT) == len(stalled), after
    assert ABORTED_AT_GRACE not in after, after

    # The four acknowledged messages, nothing else, wait in the spool.
    acked = sorted(["acked before stop", "finished after SIGTERM", "STARTTLS after SIGTERM",
                    "implicit TLS after SIGTERM"])
    spool = root / "var" / "spool"
    queued = [p for p in spool_entries(spool) if p.suffix == ".msg"]
    assert len(queued) == len(acked), spool_entries(spool)

    sink = SmtpSink(workdir / "sink", relay, dump=True).start()
    try:
        again = launch(root, config, [plain])
        wait_until(lambda: sink.count() >= len(acked) and not spool_entries(spool), 30, 0.1,
                   "the acknowledged messages delivered after the restart")
        assert again.stop(timeout=EXIT_WITHIN) == 0
        messages = sink.messages()
    finally:
        sink.stop()
    subjects = sorted(line[len("Subject: "):] for m in messages
                      for line in m.decode().splitlines() if line.startswith("Subject: "))
    assert subjects == acked, subjects
    assert any(b"second half" in m for m in messages), messages
    assert not list(spool.rglob("*.tmp")), list(spool.rglob("*.tmp"))
    assert "Traceback" not in again.output()
