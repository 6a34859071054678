"""
Faults around the real C{twistd -n relaygw} (issue 11, "Must show" 4): a
spool on a full file system, a directory that cannot be reached, DNS that
never answers or fails.

  - Spool full: the spool lives on a small tmpfs mounted here (the tests run
    as root; without the right to mount they skip, saying so).  Messages are
    sent until the file system is full: every reply is 250 or
    C{452 4.3.1}, every 250 is an entry on disk, no partial file is left,
    the delivery process (killed and restarted while the disk is full)
    comes up and delivers every acknowledged message to a real smtp-sink,
    which frees the space, and the gateway takes mail again.
  - Directory unreachable: a closed port and a black hole that accepts TCP
    and never answers (L{tests.servers.slowproxy.BlackHole}) in front of the
    gateway's C{[directory]}: AUTH gets C{454 4.7.0}, and meanwhile an
    anonymous transaction on another connector of the same gateway is
    queued and delivered.  (Slow but answering: test_slow_directory.py.)
  - DNS: an MX route whose resolver is a UDP socket that never answers, and
    a dnsmasq that answers SERVFAIL: the message is deferred (still in
    C{relaygw queue list}, attempts counted), never bounced (no DSN reaches
    the sender's domain).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    Launch,
    gateway_toml,
    mx_internet,
    smarthost_relay,
    smtp,
    spool_entries,
)
from tests.servers.dnsmasq import DNSMASQ_MISSING, Dnsmasq, dnsmasq_missing
from tests.servers.ports import free_port, free_ports, wait_until
from tests.servers.procs import delivery_pids
from tests.servers.relaygw import RelaygwProcess
from tests.servers.sink import SmtpSink
from tests.servers.slapd import (
    BASE_DN,
    PASSWORDS,
    SERVICE_DN,
    SERVICE_PASSWORD,
)
from tests.servers.slowproxy import BlackHole
from tests.servers.smtp_clients import LineClient, client_context, plain_blob

pytestmark = pytest.mark.e2e

RELAYGW = Path(sys.executable).parent / "relaygw"
INTERNAL_ID = re.compile(r"\[InternalId=([0-9A-Z]+),")
SPOOL_FULL = (452, "4.3.1 Insufficient system resources")
AUTH_TEMPFAIL = (454, "4.7.0 Temporary authentication failure")


def _queue_list(config: Path) -> str:
    done = subprocess.run([str(RELAYGW), "queue", "list", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# -- spool disk full ----------------------------------------------------------

#: The tmpfs holding the spool: room for a handful of the messages below.
TMPFS_SIZE = "1m"
BIG = 96 * 1024  # written through to the entry file during DATA (over WRITE_BUFFER)
SMALL = 2 * 1024  # buffered, written by the commit thread at the final dot


@pytest.fixture
def tmpfs_spool(workdir: Path) -> Iterator[Path]:
    """workdir/var/spool as a tmpfs of L{TMPFS_SIZE}, unmounted afterwards."""
    spool = workdir / "gw" / "var" / "spool"
    spool.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the spool needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700",
                           "tmpfs", str(spool)], capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        # Neither a loop device nor a quota could be had where a tmpfs cannot.
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def _message(subject: str, size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return (f"Subject: {subject}\r\nMessage-ID: <{subject}@client.e2e.test>\r\n\r\n".encode()
            + line * (size // len(line)))  # fmt: skip


def _send_one(client: LineClient, subject: str, size: int) -> tuple[int, str]:
    """One transaction on an open session; the final reply (MAIL, RCPT and DATA must pass)."""
    assert client.command("MAIL FROM:<device@client.e2e.test>").code == 250
    assert client.command("RCPT TO:<user@example.test>").code == 250
    assert client.command("DATA").code == 354
    client.send(_message(subject, size) + b".\r\n")
    reply = client.reply()
    return reply.code, reply.text


def _subjects(sink: SmtpSink) -> set[str]:
    got = set()
    for message in sink.messages():
        m = re.search(rb"^Subject: (\S+)", message, re.M)
        if m:
            got.add(m.group(1).decode())
    return got


def _spool_files(spool: Path) -> list[str]:
    return sorted(str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file())


def test_spool_full_nothing_half_acknowledged(
    launch: Launch, workdir: Path, tmpfs_spool: Path
) -> None:
    """
    With the spool's file system full, DATA gets 452 4.3.1 for a message
    written through during DATA and for one committed at the final dot;
    every 250 before is a complete entry on disk, no .tmp is left, and the
    session and gateway go on: after the tmpfs is grown, the next message
    is 250 and every acknowledged message reaches the smtp-sink.
    """
    port, admin, sink_port = free_ports(3)
    config = gateway_toml(admin) + f"""
{smarthost_relay(sink_port)}

[[connectors]]
name = "Devices"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit"]
"""
    gw = launch(workdir / "gw", config, [port])
    acked: dict[str, str] = {}  # subject -> queue id
    refused: list[tuple[str, int, str]] = []
    with LineClient(port) as client:
        assert client.reply().code == 220
        assert client.command("EHLO device.e2e.test").code == 250
        n = 0
        # Big messages until the spool refuses one (bounded: 1 MiB holds ~10).
        while not refused and n < 40:
            subject = f"full-big-{n}"
            code, text = _send_one(client, subject, BIG)
            if code == 250:
                m = INTERNAL_ID.search(text)
                assert m, text
                acked[subject] = m.group(1)
            else:
                refused.append((subject, code, text))
            n += 1
        assert refused, "the 1 MiB spool never filled"
        # The buffered path: small messages until the commit itself fails
        # (the last pages of the tmpfs may take a few).
        for k in range(40):
            subject = f"full-small-{k}"
            code, text = _send_one(client, subject, SMALL)
            if code == 250:
                m = INTERNAL_ID.search(text)
                assert m, text
                acked[subject] = m.group(1)
                continue
            refused.append((subject, code, text))
            break
        assert [(c, t) for _, c, t in refused] == [SPOOL_FULL, SPOOL_FULL], refused
        assert len(acked) >= 2, f"the spool filled before two messages: {acked}"

        files = _spool_files(tmpfs_spool)
        assert not [f for f in files if f.endswith(".tmp")], files
        on_disk = {Path(f).stem for f in files if f.endswith(".msg")}
        assert set(acked.values()) == on_disk, (acked, files)
        listed = _queue_list(gw.config_path or Path())
        for queue_id in acked.values():
            assert queue_id in listed, listed

        # The delivery process restarted while the disk is full must come
        # up (it is what frees the space), and deliver once the sink is up.
        [delivery] = delivery_pids(gw.pid)
        os.kill(delivery, signal.SIGKILL)
        wait_until(lambda: delivery_pids(gw.pid) not in ([], [delivery]), 30,
                   what="a new delivery process")  # fmt: skip
        sink = SmtpSink(workdir / "sink", sink_port, dump=True).start()
        try:
            wait_until(lambda: set(acked) <= _subjects(sink) and not spool_entries(tmpfs_spool),
                       60, interval=0.2, what="every acknowledged message at the sink")  # fmt: skip
            # Space is back: the same session, then a new one, get 250.
            code, text = _send_one(client, "after-space", BIG)
            assert code == 250, text
            acked["after-space"] = text
            assert client.command("QUIT").code == 221
            client2, code, _ = smtp(port)
            assert code == 220
            client2.sendmail("device@client.e2e.test", ["user@example.test"],
                             _message("after-space-2", SMALL))  # fmt: skip
            client2.quit()
            acked["after-space-2"] = ""
            wait_until(lambda: set(acked) <= _subjects(sink) and not spool_entries(tmpfs_spool),
                       60, interval=0.2, what="the later messages at the sink")  # fmt: skip
            delivered = _subjects(sink)
        finally:
            sink.stop()
    assert not {s for s, _, _ in refused} & delivered, "a refused message was delivered"
    assert not [f for f in _spool_files(tmpfs_spool) if f.endswith(".tmp")]
    assert "Traceback" not in gw.output(), gw.output()[-3000:]
    assert gw.running()


# -- directory unreachable ------------------------------------------------------

#: The directory's timeout: how long an AUTH waits on the black hole.
DIRECTORY_TIMEOUT = "2s"


def _directory_gateway(launch: Launch, workdir: Path, ldap_port: int) -> tuple[int, int]:
    """
    A gateway (one receiving process: the sessions below share one reactor)
    whose directory is C{127.0.0.1:ldap_port}: an AUTH connector and an
    anonymous one delivering to a Maildir.  Returns both ports.
    """
    submit, devices, admin = free_ports(3)
    gw_dir = workdir / "gw"
    gw_dir.mkdir(parents=True, exist_ok=True)
    (gw_dir / "ldap.secret").write_text(SERVICE_PASSWORD + "\n")
    os.chmod(gw_dir / "ldap.secret", 0o600)
    config = gateway_toml(admin, workers=1) + f"""
[[accepted_domains]]
domain = "example.test"
route = "local"

[[routes]]
name = "local"
via = "maildir"
maildir = "var/mail"

[directory]
kind = "ldap"
servers = ["ldap://127.0.0.1:{ldap_port}"]
start_tls = false
bind_dn = "{SERVICE_DN}"
bind_password_file = "ldap.secret"
base_dn = "{BASE_DN}"
timeout = "{DIRECTORY_TIMEOUT}"

[[connectors]]
name = "Submission"
bindings = ["127.0.0.1:{submit}"]
remote_ranges = ["127.0.0.0/8"]
tls = "starttls"
certificate = "tls/gw.pem"
permissions.anonymous = []
permissions.authenticated = ["submit"]

[[connectors]]
name = "Devices"
bindings = ["127.0.0.1:{devices}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit"]
"""
    launch(gw_dir, config, [submit, devices])
    return submit, devices


class _PendingAuth:
    """AUTH PLAIN sent on a TLS session; a thread waits for its reply and stamps its order."""

    def __init__(self, port: int, order: list[str], lock: threading.Lock) -> None:
        self.client = LineClient(port, timeout=30)
        assert self.client.reply().code == 220
        assert self.client.command("EHLO client.e2e.test").code == 250
        assert self.client.command("STARTTLS").code == 220
        self.client.starttls(client_context())
        assert self.client.command("EHLO client.e2e.test").code == 250
        self.reply: tuple[int, str] | None = None
        self._order, self._lock = order, lock
        self.client.send(f"AUTH PLAIN {plain_blob('alice', PASSWORDS['alice'])}\r\n".encode())
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        reply = self.client.reply()
        with self._lock:
            self._order.append("auth")
        self.reply = (reply.code, reply.text)

    def result(self) -> tuple[int, str]:
        self._thread.join(30)
        assert self.reply is not None, "no AUTH reply"
        self.client.close()
        return self.reply


def _anonymous_transaction(port: int, subject: str) -> int:
    client, code, _ = smtp(port)
    assert code == 220
    client.ehlo("device.e2e.test")
    client.mail("device@client.e2e.test")
    client.rcpt("user@example.test")
    code, _ = client.data(f"Subject: {subject}\r\n\r\nwhile the directory is down\r\n".encode())
    client.quit()
    return code


class _Unreachable:
    """A directory address that refuses connections, or a black hole."""

    def __init__(self, kind: str) -> None:
        self.hole = BlackHole() if kind == "black-hole" else None
        self.port = self.hole.port if self.hole else free_port()

    def stop(self) -> None:
        if self.hole is not None:
            self.hole.stop()


@pytest.mark.parametrize("kind", ["closed-port", "black-hole"])
def test_directory_unreachable_tempfails_auth_only(
    launch: Launch, workdir: Path, kind: str
) -> None:
    """
    With the directory's port closed, or accepting TCP and never answering,
    AUTH gets 454 4.7.0 (not 535: the password was never judged) and the
    session goes on; an anonymous transaction on the same gateway is queued
    and delivered, for the black hole while the AUTH still waits (its 250
    comes first).  A second AUTH gets 454 too: tempfails feed no throttle.
    """
    target = _Unreachable(kind)
    try:
        submit, devices = _directory_gateway(launch, workdir, target.port)
        order: list[str] = []
        lock = threading.Lock()
        pending = _PendingAuth(submit, order, lock)
        if target.hole is not None:
            wait_until(lambda: target.hole is not None and target.hole.accepted >= 1, 30,
                       what="the gateway's connection to the black hole")  # fmt: skip
        code = _anonymous_transaction(devices, f"anon-{kind}")
        with lock:
            order.append("anonymous")
        assert code == 250
        assert pending.result() == AUTH_TEMPFAIL
        if target.hole is not None:
            assert order == ["anonymous", "auth"], order
        again = _PendingAuth(submit, order, lock)
        assert again.result() == AUTH_TEMPFAIL
        mail = workdir / "gw" / "var" / "mail"
        wait_until(lambda: any(p.read_bytes().count(f"anon-{kind}".encode())
                               for p in mail.glob("*/new/*")), 30,
                   what="the anonymous message in the Maildir")  # fmt: skip
    finally:
        target.stop()


# -- DNS timeouts and SERVFAIL --------------------------------------------------


class _SilentUdp:
    """A UDP socket that is never read: a resolver that never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]


def _mx_gateway(launch: Launch, workdir: Path, dns_port: int) -> tuple[int, RelaygwProcess]:
    """A gateway relaying everything via MX with the resolver C{dns_port}."""
    port, admin, mx_port = free_ports(3)
    config = gateway_toml(admin, default_route="internet") + mx_internet(dns_port, mx_port) + f"""
[[connectors]]
name = "Devices"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit", "relay"]
"""
    return port, launch(workdir, config, [port])


def _track(config: Path) -> list[dict[str, str]]:
    done = subprocess.run([str(RELAYGW), "track", "-c", str(config), "--json"],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def _relay(port: int, rcpts: list[str]) -> str:
    client, code, _ = smtp(port)
    assert code == 220
    client.ehlo("scanner.e2e.test")
    client.mail("scanner@corp.test")
    for rcpt in rcpts:
        assert client.rcpt(rcpt)[0] == 250
    code, text = client.data(b"Subject: dns fault\r\n\r\nvia mx\r\n")
    client.quit()
    assert code == 250, text
    m = INTERNAL_ID.search(text.decode())
    assert m, text
    return m.group(1)


_PENDING = re.compile(r"^\s+(\S+)\s+\((\d+) attempts?, next [^)]*\)(?::\s*(.*))?$", re.M)


def _attempts(config: Path, queue_id: str) -> dict[str, tuple[int, str]]:
    """Per pending recipient of C{queue_id}: its attempts and last reply (from queue list)."""
    listed = _queue_list(config)
    if queue_id not in listed:
        return {}
    block = listed.split(queue_id, 1)[1].split("\n0", 1)[0]
    return {m.group(1): (int(m.group(2)), m.group(3) or "") for m in _PENDING.finditer(block)}


@pytest.mark.skipif(dnsmasq_missing(), reason=DNSMASQ_MISSING)
def test_dns_timeout_and_servfail_defer_never_bounce(launch: Launch, workdir: Path) -> None:
    """
    A resolver that never answers (our silent UDP socket), and dnsmasq
    timing out (timeout.test) or answering SERVFAIL (servfail.test): each
    recipient is deferred with a 4xx, stays in `relaygw queue list` with its
    attempts counted (SERVFAIL: retried on schedule, twice), and no DSN is
    made: the queue holds the one message, the tracking log no FAIL or DSN.
    """
    silent = _SilentUdp()
    dns = Dnsmasq(workdir / "dns").start()
    try:
        port_a, gw_a = _mx_gateway(launch, workdir / "silent", silent.port)
        port_b, gw_b = _mx_gateway(launch, workdir / "dnsmasq", dns.port)
        assert gw_a.config_path is not None and gw_b.config_path is not None
        config_a, config_b = gw_a.config_path, gw_b.config_path
        id_a = _relay(port_a, ["alice@multi.test"])
        id_b = _relay(port_b, ["bob@servfail.test"])
        id_c = _relay(port_b, ["carol@timeout.test"])

        def deferred() -> bool:
            return (_attempts(config_a, id_a).get("alice@multi.test", (0, ""))[0] >= 1
                    and _attempts(config_b, id_b).get("bob@servfail.test", (0, ""))[0] >= 2
                    and _attempts(config_b, id_c).get("carol@timeout.test", (0, ""))[0] >= 1)  # fmt: skip

        wait_until(deferred, 45, interval=0.5, what="every recipient deferred")
        pending = {**_attempts(config_a, id_a), **_attempts(config_b, id_b),
                   **_attempts(config_b, id_c)}  # fmt: skip
        assert set(pending) == {"alice@multi.test", "bob@servfail.test", "carol@timeout.test"}
        for rcpt, (_, reply) in pending.items():
            assert reply.startswith("4"), (rcpt, reply)
        for config, count in ((config_a, 1), (config_b, 2)):
            # A DSN would be another entry (sender <>), and a row in the tracking log.
            listed = _queue_list(config)
            assert f"-- {count} message" in listed and "<>" not in listed, listed
            rows = _track(config)
            assert {r["event-id"] for r in rows} >= {"RECEIVE", "DEFER"}, rows
            assert not {r["event-id"] for r in rows} & {"FAIL", "DSN", "EXPIRE"}, rows
        # Both drain their in-flight lookups (up to 9 s) at once, not in turn.
        gw_a.send_signal(signal.SIGTERM)
        gw_b.send_signal(signal.SIGTERM)
    finally:
        dns.stop()
        silent.sock.close()
