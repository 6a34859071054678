"""
Slow and hostile clients against the real gateway (issue 11, "Must show" 5).

One gateway (two receiving processes) with short timeouts (command and data
3 s) and a 4 MiB size limit relays example.test to a scripted downstream.
Each hostile client is bounded by the configured limits and timeouts, the
gateway's memory (VmRSS summed over its process tree) stays bounded, and
meanwhile another client's whole transaction completes: 250 from the
gateway and the message, found by its unique Message-ID, at the downstream.

  - slowloris, one byte a second, in a command line and in DATA: cut with
    421 4.4.2 by the command/data timeout before its line or message is done;
  - a pipelined burst of 1,000 commands, answered in order; 1,000 bad ones
    closed at the tenth with 421 4.7.0;
  - a 1 MiB command line: 500 5.5.2 and closed, without reading the rest;
  - a 2 GiB message announced with SIZE: 552 5.3.4 at MAIL; not announced:
    streamed to its end, discarded, 552 5.3.4, nothing queued, RSS bounded;
  - 10,000 idle connections (from 500 source addresses, 20 each, the
    per-IP limit), with RLIMIT_NOFILE raised for the test and the gateway:
    all greeted, another client served meanwhile, all cut by the command
    timeout, and the gateway's descriptors back to their count before.
"""

from __future__ import annotations

import os
import resource
import select
import smtplib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Launch, gateway_toml, smarthost_relay, spool_entries
from tests.servers.ports import free_ports, wait_until
from tests.servers.procstats import (
    receiving_workers,
    socket_inodes,
    tcp4,
    tree,
    tree_fds,
    tree_rss_kib,
)
from tests.servers.relaygw import RelaygwProcess
from tests.servers.scripted_smtp import ScriptedSMTP

pytestmark = pytest.mark.e2e

HOST = "127.0.0.1"
FQDN = "gw.hostile.test"
TIMEOUT = 3  # seconds, the command and the data timeout of the shared gateway
MAX_SIZE = 4 * 1024 * 1024
#: The most the gateway's tree may grow while one hostile client is active.
RSS_BOUND_KIB = 50 * 1024
IDLE = 10_000
IDLE_SOURCES = 500  # 20 connections each: the default max_connections_per_ip


def _config(port: int, admin: int, relay: int, *, command: int, extra: str = "") -> str:
    return gateway_toml(admin, hostname=FQDN, workers=2) + f"""
{smarthost_relay(relay)}

[[connectors]]
name = "Hostile"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit"]
max_message_size = {MAX_SIZE}
message_rate_limit = "100000/m"
timeouts = {{ command = "{command}s", data = "{TIMEOUT}s" }}
{extra}
"""


@pytest.fixture(scope="module")
def downstream() -> Iterator[ScriptedSMTP]:
    server = ScriptedSMTP(lambda address: None).start()
    yield server
    server.stop()


class Gateway:
    def __init__(self, proc: RelaygwProcess, port: int, downstream: ScriptedSMTP) -> None:
        self.proc, self.port, self.downstream = proc, port, downstream

    def rss_kib(self) -> int:
        return tree_rss_kib(self.proc.pid)

    def others_served(self) -> None:
        """
        Another client's whole transaction: 250 at the end of DATA, then the
        message (its own Message-ID) received by the downstream.
        """
        mid = f"<{uuid.uuid4().hex}@victim.test>"
        with smtplib.SMTP(HOST, self.port, timeout=30) as client:
            client.ehlo("victim.test")
            assert client.mail("victim@victim.test")[0] == 250
            assert client.rcpt("someone@example.test")[0] == 250
            code, text = client.data(f"Message-ID: {mid}\r\nSubject: hi\r\n\r\nserved\r\n")
            assert code == 250, text
        wait_until(lambda: any(mid.encode() in (t.data or b"")
                               for t in self.downstream.transactions()),
                   30, 0.05, "the other client's message at the downstream")


@pytest.fixture(scope="module")
def gw(module_launch: Launch, module_workdir: Path, downstream: ScriptedSMTP) -> Gateway:
    port, admin = free_ports(2)
    proc = module_launch(module_workdir / "gw",
                         _config(port, admin, downstream.port, command=TIMEOUT), [port])
    gateway = Gateway(proc, port, downstream)
    gateway.others_served()  # warm: the delivery connection and every import
    return gateway


class RSSWatch:
    """Samples the gateway tree's RSS in a thread while a hostile client runs."""

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        self.baseline = gw.rss_kib()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._gw.rss_kib())

    def __enter__(self) -> RSSWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self._gw.rss_kib())

    def check(self) -> None:
        grown = self.peak - self.baseline
        print(f"RSS baseline {self.baseline} KiB, peak {self.peak} KiB (+{grown} KiB)")
        assert grown < RSS_BOUND_KIB, f"gateway tree grew by {grown} KiB"


def _connect(port: int, source: str | None = None, timeout: float = 30) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    return sock


def _read_until(sock: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    """Read until C{done(data)} or the end of the stream (bounded by the socket timeout)."""
    data = b""
    while not done(data):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _replies(data: bytes) -> list[bytes]:
    """The last line of each reply in C{data} (multi-line replies count once)."""
    return [line for line in data.split(b"\r\n") if line[3:4] == b" "]


def _greeted(sock: socket.socket) -> None:
    assert _read_until(sock, lambda d: d.endswith(b"\r\n")).startswith(b"220 ")


def _in_data(sock: socket.socket) -> None:
    """EHLO, MAIL, RCPT, DATA up to the 354."""
    _greeted(sock)
    sock.sendall(b"EHLO hostile.test\r\nMAIL FROM:<h@hostile.test>\r\n"
                 b"RCPT TO:<someone@example.test>\r\nDATA\r\n")
    data = _read_until(sock, lambda d: d.endswith(b"\r\n") and b"\r\n354 " in d)
    assert [r[:3] for r in _replies(data)] == [b"250", b"250", b"250", b"354"], data


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- slowloris -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["command", "data"])
def test_slowloris_cut_by_the_timeout(gw: Gateway, mode: str) -> None:
    """
    One byte a second, each byte resetting an idle timer, would hold the
    session forever: the command timeout bounds the wait for a whole command
    line, the data timeout the wait for the next piece of the message.  The
    client is cut with 421 4.4.2 long before it finishes; meanwhile another
    client is served, and nothing of the slow message is queued.
    """
    payload = (b"EHLO one-byte-a-second.hostile.test\r\n" if mode == "command"
               else b"Subject: slow\r\n\r\n" + b"x" * 60 + b"\r\n.\r\n")
    sock = _connect(gw.port)
    try:
        if mode == "command":
            _greeted(sock)
        else:
            _in_data(sock)
        before = len(gw.downstream.transactions())
        got = b""
        sent = 0
        served = False
        for byte in payload:
            sock.sendall(bytes([byte]))
            sent += 1
            if not served:  # the other client, while this one trickles
                gw.others_served()
                served = True
            ready, _, _ = select.select([sock], [], [], 1.0)
            if ready:
                got = _read_until(sock, lambda d: d.endswith(b"\r\n"))
                break
        assert got.startswith(f"421 4.4.2 {FQDN} Timeout waiting for client input".encode()), (
            f"after {sent} of {len(payload)} bytes: {got!r}")
        assert sent < len(payload) // 2, f"cut only after {sent} of {len(payload)} bytes"
        assert _closed(sock)
        assert len(gw.downstream.transactions()) == before + 1  # only the other client's
    finally:
        sock.close()


# -- pipelining ----------------------------------------------------------------------


def test_pipelined_burst_of_1000_commands(gw: Gateway) -> None:
    """
    EHLO, 249 rounds of MAIL, RCPT, RCPT outside the accepted domains, RSET,
    then NOOP, NOOP and QUIT: 1,000 commands in one write, 1,000 replies in
    order (the 550s in between never reach ten in a row), then the close.
    """
    rounds = 249
    commands = [b"EHLO burst.hostile.test"]
    expected = [b"250"]
    for n in range(rounds):
        commands += [b"MAIL FROM:<b@burst.hostile.test>", f"RCPT TO:<u{n}@example.test>".encode(),
                     b"RCPT TO:<x@elsewhere.test>", b"RSET"]
        expected += [b"250", b"250", b"550", b"250"]
    commands += [b"NOOP", b"NOOP", b"QUIT"]
    expected += [b"250", b"250", b"221"]
    assert len(commands) == 1000
    with RSSWatch(gw) as watch, _connect(gw.port) as sock:
        _greeted(sock)
        sock.sendall(b"".join(c + b"\r\n" for c in commands))
        data = _read_until(sock, lambda d: False)  # to the close after QUIT
    codes = [r[:3] for r in _replies(data)]
    assert codes == expected
    assert b"550 5.7.54 " in data
    watch.check()
    gw.others_served()


def test_pipelined_1000_bad_commands_closed_at_the_tenth(gw: Gateway) -> None:
    """1,000 unknown commands in one write: nine 500s, then 421 4.7.0 and the close."""
    with _connect(gw.port) as sock:
        _greeted(sock)
        sock.sendall(b"XYZZY\r\n" * 1000)
        data = _read_until(sock, lambda d: False)
    codes = [r[:4] for r in _replies(data)]
    assert codes == [b"500 "] * 9 + [b"421 "], data
    assert _replies(data)[-1].startswith(b"421 4.7.0 Too many errors")
    gw.others_served()


# -- one long line -----------------------------------------------------------------


@pytest.mark.parametrize("ending", [b"\r\n", b""], ids=["with-crlf", "no-line-end"])
def test_one_mib_command_line(gw: Gateway, ending: bytes) -> None:
    """
    1 MiB in one command line: 500 5.5.2 and the close as soon as the line
    is over 2,000 octets; the rest is never buffered (RSS bounded), and the
    gateway serves others.
    """
    line = b"MAIL FROM:<" + b"a" * (1024 * 1024) + b"@hostile.test>" + ending
    with RSSWatch(gw) as watch, _connect(gw.port) as sock:
        _greeted(sock)
        problem: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(line)
            except OSError as e:  # the gateway closed before taking it all
                problem.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        data = _read_until(sock, lambda d: False)
        sender.join(10)
    assert _replies(data) == [b"500 5.5.2 Command line too long"], data[:200]
    watch.check()
    gw.others_served()


# -- a 2 GiB message ---------------------------------------------------------------


def test_two_gib_announced_with_size_refused_at_mail(gw: Gateway) -> None:
    """MAIL ... SIZE=2 GiB: 552 5.3.4 at once; the session goes on."""
    with smtplib.SMTP(HOST, gw.port, timeout=30) as client:
        client.ehlo("big.hostile.test")
        code, text = client.mail("big@hostile.test", [f"SIZE={2 * 1024 ** 3}"])
        assert (code, text) == (552, b"5.3.4 Message size exceeds fixed maximum message size")
        assert client.mail("big@hostile.test", [f"SIZE={MAX_SIZE}"])[0] == 250
        assert client.rset()[0] == 250


def test_two_gib_not_announced_streamed_and_refused(gw: Gateway) -> None:
    """
    2 GiB of DATA without SIZE: the gateway reads it to its end without
    keeping it (RSS bounded, nothing in the spool once refused), answers
    552 5.3.4, and serves another client meanwhile.
    """
    total = 2 * 1024 ** 3
    chunk = (b"x" * 1022 + b"\r\n") * 1024  # 1 MiB of 1 KiB lines
    spool = gw.proc.workdir / "var" / "spool"
    with RSSWatch(gw) as watch, _connect(gw.port, timeout=60) as sock:
        _in_data(sock)
        sock.sendall(b"Subject: big\r\n\r\n")
        other: list[BaseException | None] = []

        def serve_other() -> None:
            try:
                gw.others_served()
                other.append(None)
            except BaseException as e:
                other.append(e)

        sent = 0
        meanwhile = threading.Thread(target=serve_other, daemon=True)
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
            if sent == 16 * len(chunk):  # well past the limit
                meanwhile.start()
        sock.sendall(b".\r\n")
        data = _read_until(sock, lambda d: d.endswith(b"\r\n"))
        meanwhile.join(30)
    assert data == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    assert other == [None], other
    watch.check()
    assert not spool_entries(spool)


# -- many idle connections ---------------------------------------------------------


def _fd_links(pid: int) -> dict[int, dict[str, str]]:
    """What each descriptor of each process of the tree of C{pid} refers to (readlink)."""
    links: dict[int, dict[str, str]] = {}
    for p in tree(pid):
        links[p] = {}
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                links[p][fd] = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                pass
    return links


def _fd_changes(before: dict[int, dict[str, str]], after: dict[int, dict[str, str]]) -> str:
    """Per process, the descriptors added and removed between two L{_fd_links}."""
    lines = []
    for p in sorted(before.keys() | after.keys()):
        if p not in after:
            lines.append(f"pid {p}: gone (had {len(before[p])})")
            continue
        if p not in before:
            lines.append(f"pid {p}: new, {sorted(after[p].items())}")
            continue
        old, new = before[p], after[p]
        added = {fd: t for fd, t in new.items() if old.get(fd) != t}
        removed = {fd: t for fd, t in old.items() if new.get(fd) != t}
        if added or removed:
            lines.append(f"pid {p}: + {sorted(added.items())} - {sorted(removed.items())}")
    return "\n".join(lines) or "no descriptor differs now"


def _sessions_held(port: int) -> list[str]:
    """
    The gateway's ends of connections to C{port} that a process still holds
    (a socket in TIME_WAIT has no descriptor: inode 0), as C{peer state}.
    """
    return [f"{t.remote[0]}:{t.remote[1]} {t.state}" for t in tcp4()
            if t.local[1] == port and t.state != "LISTEN" and t.inode != "0"]  # fmt: skip


def _greeted_by_each(port: int, receivers: list[int], timeout: float = 30) -> int:
    """
    Open sessions (greeting, QUIT) until each of the C{receivers} has greeted
    one: a receiving worker that greets has finished starting (its reactor
    runs; its stdin reader and SIGCHLD pipe are open), so descriptors counted
    afterwards are its steady ones.  The kernel hands each connection to
    whichever process accepts first, hence the loop (paced: a worker still
    starting accepts nothing meanwhile).

    @return: the sessions it took.
    """
    waiting = set(receivers)
    sessions = 0
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        with _connect(port) as sock:
            _greeted(sock)
            sessions += 1
            mine = sock.getsockname()
            inodes = {t.inode for t in tcp4() if t.local == (HOST, port) and t.remote == mine}
            waiting -= {pid for pid in receivers if socket_inodes(pid) & inodes}
            sock.sendall(b"QUIT\r\n")
            assert _read_until(sock, lambda d: False).startswith(b"221 ")
        time.sleep(0.02)
    assert not waiting, f"no session greeted by {sorted(waiting)} of {receivers} in {sessions}"
    return sessions


@pytest.fixture
def nofile() -> Iterator[int]:
    """RLIMIT_NOFILE raised for this process (and the gateway it starts) for IDLE sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = IDLE + 4096
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError) as e:
        pytest.skip(f"cannot raise RLIMIT_NOFILE to {want}: {e}")
    yield want
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_ten_thousand_idle_connections(
    nofile: int, launch: Launch, workdir: Path, downstream: ScriptedSMTP
) -> None:
    """
    10,000 connections that say nothing (20 from each of 500 source
    addresses: the per-IP limit) against a gateway whose connector takes
    10,050: every one is greeted, another client's transaction completes
    while they are open, the command timeout then closes every one with
    421 4.4.2, and the gateway's processes hold as many descriptors as
    before.
    """
    port, admin = free_ports(2)
    proc = launch(workdir / "gw", _config(port, admin, downstream.port, command=15,
                                          extra="max_connections = 10050"), [port])
    gw = Gateway(proc, port, downstream)
    gw.others_served()  # the delivery process has started: it delivered
    wait_until(lambda: len(tree_fds(proc.pid)) == 3, 20,
               what="the receiving worker and the delivery process")
    # The count before is that of started processes: the gateway is ready
    # (relaygw.service) before its receiving worker has finished starting,
    # which opens 3 more descriptors (its stdin reader's /dev/null, the
    # reactor's SIGCHLD pipe) once the gateway has already served a client.
    receivers = [proc.pid, *receiving_workers(proc.pid)]
    assert len(receivers) == 2, receivers
    warm = _greeted_by_each(port, receivers)
    wait_until(lambda: not _sessions_held(port), 20, what="the warm-up sessions closed")
    fds_before = tree_fds(proc.pid)
    links_before = _fd_links(proc.pid)
    rss_before = gw.rss_kib()

    poller = select.epoll()
    socks: dict[int, socket.socket] = {}
    got: dict[int, bytes] = {}
    open_: set[int] = set()
    greeted: set[int] = set()

    def pump(timeout: float) -> None:
        for fd, _ in poller.poll(timeout):
            try:
                chunk = socks[fd].recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            got[fd] += chunk
            if got[fd].startswith(b"220 ") and got[fd].endswith(b"\r\n"):
                greeted.add(fd)
            if not chunk:
                poller.unregister(fd)
                open_.discard(fd)

    try:
        # In waves of 100, each greeted before the next: a whole flood at
        # once overflows the listen backlog (128) and the kernel drops SYNs.
        deadline = time.monotonic() + 60
        for n in range(IDLE):
            source = f"127.42.{n % IDLE_SOURCES // 250}.{n % IDLE_SOURCES % 250 + 1}"
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.bind((source, 0))
            sock.connect_ex((HOST, port))
            socks[sock.fileno()] = sock
            got[sock.fileno()] = b""
            open_.add(sock.fileno())
            poller.register(sock.fileno(), select.EPOLLIN)
            if n % 100 == 99:
                while len(greeted) < n + 1 and time.monotonic() < deadline:
                    pump(0.2)
        assert len(greeted) == IDLE, f"{len(greeted)} of {IDLE} greeted"
        rss_open = gw.rss_kib()
        still_open = len(open_)
        gw.others_served()
        print(f"{IDLE} idle: RSS {rss_before} -> {rss_open} KiB "
              f"({(rss_open - rss_before) / IDLE:.1f} KiB per connection); "
              f"{still_open} open while the other client was served")
        assert still_open == IDLE
        deadline = time.monotonic() + 60
        while open_ and time.monotonic() < deadline:
            pump(0.5)
        assert not open_, f"{len(open_)} connections still open after the command timeout"
        timed_out = sum(1 for data in got.values()
                        if data.endswith(f"421 4.4.2 {FQDN} Timeout waiting for client input\r\n"
                                         .encode()))
        assert timed_out == IDLE
    finally:
        poller.close()
        for sock in socks.values():
            sock.close()
    # (An idle delivery connection may close meanwhile: at most as many.)
    try:
        wait_until(lambda: all(n <= fds_before.get(pid, -1)
                               for pid, n in tree_fds(proc.pid).items()),
                   30, what=f"the gateway's descriptors back to {fds_before}")
    except TimeoutError as e:
        raise AssertionError(f"{e}; now {tree_fds(proc.pid)}:\n"
                             f"{_fd_changes(links_before, _fd_links(proc.pid))}\n"
                             f"sessions still held: {_sessions_held(port)[:20]}") from None
    print(f"{warm} sessions until each receiving process greeted one; "
          f"descriptors per process before {fds_before}, after {tree_fds(proc.pid)}; "
          f"{_fd_changes(links_before, _fd_links(proc.pid))}")
