"""
The performance benchmark of issue 10: relaygw beside a private Postfix, in
one run, with ratios, and a verdict per goal.

Parts (C{--only}, comma-separated; all by default):

 - C{accept}, C{e2e}: Postfix's smtp-source -> server -> smtp-sink (smarthost
   route / relayhost), 1 KiB and 100 KiB bodies, 10 and 50 sessions, paired
   rounds with the order alternating (L{bench.bench_relay}'s cells, on
   L{bench.bench_accept.side_by_side}).  One run gives the accept rate
   (every message got its 250, fsynced), the end-to-end rate (the sink has
   counted every message) and CPU per relayed message (utime + stime of all
   of the server's processes from the run's start until the sink has them
   all, divided by the messages).
 - C{latency}: the same load again, with a probe client beside it: one
   message at a time every C{--probe-interval} seconds on its own session,
   timed from sending C{"\\r\\n.\\r\\n"} to reading the 250 line; p50 / p99
   per round.
 - C{memory}: resident memory, the sum of VmRSS over all of the server's
   processes: one 50 MiB message, sent and relayed to the sink, sampled every
   20 ms, peak minus idle; and N idle sessions (banner + EHLO done, then
   left open), (RSS with them - idle) / N.  Each measurement on freshly
   started servers (Postfix keeps idle smtpd processes for reuse, which
   would hide the next round's cost).  Postfix runs a process per session,
   so it is measured with fewer sessions (C{--postfix-idle-sessions}).
 - C{queue}: L{bench.bench_queue_memory} (N queued messages, smarthost
   down): the sum of the processes' peaks; Postfix "n/a".

The machine is shared: absolute figures move between passes; ratios within
a round are what the goals are judged on (median over the rounds, with the
range).  Run as root (the private Postfix needs it)::

    .venv/bin/python bench/bench_perf.py [--scale 0.5] [--only accept,e2e] [--check]

Exit status: 0; 1 with C{--check} when a goal is missed (or not measured);
2 when a part could not run (setup failure, a run that failed).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_accept import (  # noqa: E402
    SMTP_SOURCE,
    BenchFailed,
    Target,
    relaygw_config,
    run_load,
    side_by_side,
    tree_pids,
)
from bench.bench_queue_memory import measure as measure_queue  # noqa: E402
from bench.bench_queue_memory import status  # noqa: E402
from bench.bench_relay import CELLS, _cell  # noqa: E402
from tests.servers.ports import free_ports  # noqa: E402
from tests.servers.postfix import PostfixInstance, postfix_available  # noqa: E402
from tests.servers.relaygw import RelaygwProcess, installed_problem  # noqa: E402
from tests.servers.sink import SmtpSink  # noqa: E402

PARTS = ("accept", "e2e", "latency", "memory", "queue")
MIB = 1024 * 1024
#: The big message's size: 50 MiB less room for the envelope and Received
#: headers, because Postfix's message_size_limit (tests/servers/postfix.py)
#: is exactly 50 MiB including them.
BIG_MESSAGE = 50 * MIB - 16 * 1024
LINE = b"x" * 76 + b"\r\n"
EHLO = b"EHLO probe.bench.test"
MAIL = b"MAIL FROM:<sender@client.bench.test>"
RCPT = b"RCPT TO:<rcpt@dest.bench.test>"
PROBE_BODY = b"Subject: probe\r\n\r\n" + LINE * 13  # about 1 KiB


# -- SMTP client bits (probe, big message, idle sessions) ----------------------------------------


class Smtp:
    """A minimal blocking SMTP client: one command, one reply."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        # Without it the final dot, a small write after the body, waits for the server's
        # delayed ACK (40 ms): Nagle's algorithm.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    def reply(self) -> int:
        """Read up to and including the final line of a reply; its code."""
        while True:
            while b"\r\n" in self._buf:
                line, self._buf = self._buf.split(b"\r\n", 1)
                if len(line) == 3 or line[3:4] == b" ":
                    return int(line[:3])
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed by the server")
            self._buf += data

    def expect(self, code: int, line: bytes | None = None) -> None:
        """Send C{line} (if any) and check the reply's code."""
        if line is not None:
            self.sock.sendall(line + b"\r\n")
        got = self.reply()
        if got != code:
            raise RuntimeError(f"{(line or b'(greeting)').decode()}: {got}, expected {code}")

    def greet(self) -> None:
        """Banner and EHLO."""
        self.expect(220)
        self.expect(250, EHLO)

    def close(self) -> None:
        """Close without QUIT (an idle session's end, or after an error)."""
        try:
            self.sock.close()
        except OSError:
            pass


def send_message(port: int, body: bytes | Callable[[socket.socket], None]) -> None:
    """One message on its own session (C{body} bytes end without the final CRLF, or a writer)."""
    c = Smtp(port, timeout=120.0)
    try:
        c.greet()
        c.expect(250, MAIL)
        c.expect(250, RCPT)
        c.expect(354, b"DATA")
        if callable(body):
            body(c.sock)
        else:
            c.sock.sendall(body)
        c.expect(250, b"\r\n.")
        c.expect(221, b"QUIT")
    finally:
        c.close()


class Probe(threading.Thread):
    """
    One message at a time on one session, every C{interval} seconds, until
    stopped: seconds from sending the final C{"\\r\\n.\\r\\n"} to the 250 line.
    """

    def __init__(self, port: int, interval: float, limit: int = 100_000) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval = interval
        self.limit = limit
        self.samples: list[float] = []
        self.errors = 0
        self._stop_event = threading.Event()

    def stop(self) -> None:
        """Stop and wait (bounded) for the thread."""
        self._stop_event.set()
        self.join(timeout=30)

    def run(self) -> None:
        conn: Smtp | None = None
        while not self._stop_event.is_set() and len(self.samples) < self.limit:
            try:
                if conn is None:
                    conn = Smtp(self.port, timeout=30.0)
                    conn.greet()
                conn.expect(250, MAIL)
                conn.expect(250, RCPT)
                conn.expect(354, b"DATA")
                conn.sock.sendall(PROBE_BODY)
                t0 = time.perf_counter()
                conn.sock.sendall(b"\r\n.\r\n")
                code = conn.reply()
                took = time.perf_counter() - t0
                if code != 250:
                    raise RuntimeError(f"final dot: {code}")
                self.samples.append(took)
            except (OSError, RuntimeError, ValueError):
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
            self._stop_event.wait(self.interval)
        if conn is not None:
            try:
                conn.expect(221, b"QUIT")
            except (OSError, RuntimeError, ValueError):
                pass
            conn.close()


# -- memory ----------------------------------------------------------------------------------------


def rss_kib(leader: int, pids: Sequence[int] | None = None) -> int:
    """The sum of VmRSS over C{pids}, by default C{leader}'s tree (L{tree_pids}), KiB."""
    total = 0
    for pid in tree_pids(leader) if pids is None else pids:
        try:
            total += status(pid)["VmRSS"]
        except (OSError, KeyError):  # gone, or a zombie
            pass
    return total


def pss_kib(leader: int) -> int:
    """The sum of Pss (shared pages split between their users) over the tree, KiB."""
    total = 0
    for pid in tree_pids(leader):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError):
            pass
    return total


def steady_kib(leader: int, timeout: float = 10.0) -> int:
    """RSS sum once two samples 0.25 s apart agree within 0.2 % (bounded)."""
    deadline = time.monotonic() + timeout
    last = rss_kib(leader)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = rss_kib(leader)
        if abs(now - last) <= max(64, last // 500):
            return now
        last = now
    return last


class PeakSampler(threading.Thread):
    """The highest RSS sum of a process tree, sampled every C{interval} seconds."""

    def __init__(self, leader: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.leader = leader
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.seconds = 0.0
        self._stop_event = threading.Event()

    def stop(self) -> None:
        """Stop and wait (bounded) for the thread."""
        self._stop_event.set()
        self.join(timeout=10)

    def run(self) -> None:
        t0 = time.monotonic()
        pids: list[int] = []
        while not self._stop_event.is_set():
            # Finding the tree reads all of /proc; do it every 10th sample only.
            if self.samples % 10 == 0:
                pids = tree_pids(self.leader)
            self.peak = max(self.peak, rss_kib(self.leader, pids))
            self.samples += 1
            # A fixed schedule, so that the sampling's own cost does not stretch the interval.
            self._stop_event.wait(max(0.0, t0 + self.samples * self.interval - time.monotonic()))
        self.seconds = time.monotonic() - t0


def wait_sink(sink: SmtpSink, count: int, timeout: float, what: str) -> None:
    """Wait (bounded) until C{sink} has counted C{count} messages."""
    deadline = time.monotonic() + timeout
    while sink.count() < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: the sink counted {sink.count()} of {count} in time")
        time.sleep(0.02)


def _write_big(sock: socket.socket) -> None:
    head = b"Subject: big\r\n\r\n"
    chunk = LINE * (65536 // len(LINE))
    sock.sendall(head)
    left = BIG_MESSAGE - len(head) - 2  # the body's last CRLF is the terminator's
    while left > 0:
        piece = chunk[:left]
        sock.sendall(piece)
        left -= len(piece)


def big_message_mib(port: int, sink: SmtpSink, leader: int,
                    timeout: float) -> tuple[float, PeakSampler]:
    """
    One 50 MiB message in and out (to the sink): peak RSS sum minus idle, MiB
    (0 when it never rose), and the sampler (for its count of samples).
    """
    before = sink.count()
    send_message(port, PROBE_BODY)  # warm-up: every process of the path has run once
    wait_sink(sink, before + 1, timeout, "warm-up message")
    idle = steady_kib(leader)
    sampler = PeakSampler(leader)
    sampler.start()
    try:
        send_message(port, _write_big)
        wait_sink(sink, before + 2, timeout, "50 MiB message")
    finally:
        sampler.stop()
    return (max(sampler.peak, idle) - idle) / 1024, sampler


def idle_sessions_kib(port: int, leader: int, count: int, deadline: float) -> tuple[float, float]:
    """
    C{count} sessions left idle after banner + EHLO: (RSS sum delta / count,
    Pss sum delta / count), KiB per session.
    """
    send_message(port, PROBE_BODY)  # warm-up, as for the big message
    idle, idle_pss = steady_kib(leader), pss_kib(leader)
    # Spread over source addresses so that no single one runs short of ports.
    sources = [f"127.0.0.{2 + i}" for i in range(max(1, math.ceil(count / 2000)))]
    conns: list[Smtp] = []
    try:
        for n in range(count):
            if time.monotonic() > deadline:
                raise RuntimeError(f"--max-seconds reached after {n} of {count} idle sessions")
            c = Smtp(port, source=sources[n % len(sources)], timeout=30.0)
            conns.append(c)
            c.greet()
        loaded, loaded_pss = steady_kib(leader), pss_kib(leader)
    finally:
        for c in conns:
            c.close()
    return (loaded - idle) / count, (loaded_pss - idle_pss) / count


def open_files_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of C{pid} (from /proc/PID/limits)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return resource.RLIM_INFINITY if soft == "unlimited" else int(soft)
    raise RuntimeError(f"no open files limit for {pid}")


def memory_config(port: int, admin: int, sink: int) -> str:
    """bench_accept's configuration, allowing 50 MiB messages and 10,000+ sessions."""
    base = relaygw_config(port, admin, sink)
    limits = "max_connections_per_ip = 1000"
    assert limits in base, "bench_accept.relaygw_config changed"
    return base.replace(limits, 'max_connections_per_ip = 30000\nmax_connections = 30000\n'
                                'max_message_size = "60MiB"')


@contextmanager
def memory_servers(postfix_sessions: int) -> Iterator[tuple[RelaygwProcess, SmtpSink,
                                                            PostfixInstance, SmtpSink, int]]:
    """A gateway (memory_config) and a Postfix, each with its own sink; stopped by PID after."""
    root = Path(tempfile.mkdtemp(prefix="relaygw-perf-mem-", dir="/tmp"))
    os.chmod(root, 0o755)
    gw_port, admin, pf_port, gw_sink_port, pf_sink_port = free_ports(5)
    gw_sink = SmtpSink(root / "gw-sink", gw_sink_port)
    pf_sink = SmtpSink(root / "pf-sink", pf_sink_port)
    gateway = RelaygwProcess(root / "relaygw", memory_config(gw_port, admin, gw_sink_port),
                             ports=[gw_port])
    postfix = PostfixInstance(root / "postfix", pf_port, pf_sink_port,
                              smtpd_limit=postfix_sessions + 20)
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        stack.callback(pf_sink.stop)
        stack.callback(gw_sink.stop)
        stack.callback(postfix.stop)
        stack.callback(gateway.stop)
        gw_sink.start()
        pf_sink.start()
        yield gateway, gw_sink, postfix, pf_sink, pf_port


# -- results ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of a table: per-round values of each server and their per-round ratios."""

    case: str
    gw: list[float]
    pf: list[float] | None  # None: not measured for Postfix ("n/a")
    digits: int = 0
    goal: str = ""
    #: Decides the goal from (relaygw median, median ratio); None: no goal (information).
    judge: Callable[[float, float | None], bool] | None = None
    #: The goal is on relaygw's own figure, not on the ratio.
    absolute: bool = False

    @property
    def ratios(self) -> list[float]:
        if self.pf is None:
            return []
        return [g / p if p else math.inf for g, p in zip(self.gw, self.pf)]

    def met(self) -> bool | None:
        if self.judge is None:
            return None
        ratio = statistics.median(self.ratios) if self.ratios else None
        return self.judge(statistics.median(self.gw), ratio)


@dataclass
class Table:
    """One item of issue 10."""

    item: str
    title: str
    unit: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: str = ""


def spread(values: Sequence[float], digits: int) -> str:
    """C{median [min-max]} (just the value for one round)."""
    if not values:
        return "n/a"
    med = f"{statistics.median(values):,.{digits}f}"
    if len(values) == 1:
        return med
    return f"{med} [{min(values):,.{digits}f}–{max(values):,.{digits}f}]"


def spread_ratio(values: Sequence[float]) -> str:
    """L{spread} for ratios: two decimals, or two significant digits below 0.1."""
    if not values or statistics.median(values) >= 0.1:
        return spread(values, 2)
    med = f"{statistics.median(values):.2g}"
    return med if len(values) == 1 else f"{med} [{min(values):.2g}–{max(values):.2g}]"


def render(table: Table) -> str:
    """A Markdown table (relaygw, Postfix, ratio, goal) with its notes."""
    out = [f"### {table.item}. {table.title} ({table.unit})", ""]
    if table.failed:
        out.append(f"not measured: {table.failed}")
    if table.rows:
        out += ["| case | relaygw | Postfix | ratio relaygw/Postfix | goal | |",
                "|---|---|---|---|---|---|"]
        for row in table.rows:
            met = row.met()
            mark = "" if met is None else ("met" if met else "NOT MET")
            out.append(f"| {row.case} | {spread(row.gw, row.digits)} | "
                       f"{spread(row.pf or [], row.digits)} | {spread_ratio(row.ratios)} | "
                       f"{row.goal} | {mark} |")
    out += [f"- {n}" for n in table.notes]
    return "\n".join(out) + "\n"


def at_least(x: float) -> Callable[[float, float | None], bool]:
    return lambda _gw, ratio: ratio is not None and ratio >= x


def below_ratio(x: float) -> Callable[[float, float | None], bool]:
    return lambda _gw, ratio: ratio is not None and ratio < x


def below_value(x: float) -> Callable[[float, float | None], bool]:
    return lambda gw, _ratio: gw < x


def _percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _cell_name(size: int, sessions: int) -> str:
    return f"{size // 1024} KiB x {sessions} sessions"


# -- parts -----------------------------------------------------------------------------------------


def load_parts(args: argparse.Namespace, deadline: float, tables: dict[str, Table]) -> None:
    """accept / e2e (with CPU) and latency, on one side_by_side pair of servers."""
    want_cells = "accept" in args.only or "e2e" in args.only
    want_latency = "latency" in args.only
    accept = Table("1", "Accept rate, smtp-source -> server, fsync before every 250", "msg/s")
    e2e = Table("2", "End to end, smtp-source -> server -> smtp-sink (smarthost / relayhost)",
                "msg/s")
    cpu = Table("3", "CPU per relayed message, user+sys of all the server's processes", "ms")
    latency = Table("5", "Latency, final '.' to 250, probe beside the end-to-end load", "ms")
    # One set of runs gives all three; the tables shown are the ones asked for.
    if "accept" in args.only:
        tables["accept"] = accept
    if "e2e" in args.only:
        tables["e2e"] = e2e
        tables["cpu"] = cpu
    done: list[str] = []
    if want_latency:
        tables["latency"] = latency
    with side_by_side() as (targets, _gateway):
        print(f"bench_perf: load parts, {args.rounds} paired rounds per cell, "
              f"{os.cpu_count()} CPUs", flush=True)
        for size, sessions, messages in CELLS if want_cells else ():
            n = max(50, int(messages * args.scale))
            name = _cell_name(size, sessions)
            if deadline - time.monotonic() < 30:
                for t in (accept, e2e, cpu):
                    t.notes.append(f"{name}: skipped, --max-seconds reached")
                continue
            pairs = _cell(targets, size, sessions, n, args, deadline)
            done.append(f"{name} {n}")
            goal = 1.5 if size <= 1024 else 1.2
            accept.rows.append(Row(name, [g["accept_rate"] for g, _ in pairs],
                                   [p["accept_rate"] for _, p in pairs], 0,
                                   f">= {goal}x", at_least(goal)))
            e2e.rows.append(Row(name, [g["e2e_rate"] for g, _ in pairs],
                                [p["e2e_rate"] for _, p in pairs], 0, ">= 1.2x", at_least(1.2)))
            cpu.rows.append(Row(name, [g["cpu_ms"] for g, _ in pairs],
                                [p["cpu_ms"] for _, p in pairs], 2, "< 1x", below_ratio(1.0)))
            print(f"  {name}: {n} messages per run; accept "
                  f"{spread(accept.rows[-1].ratios, 2)}x, end to end "
                  f"{spread(e2e.rows[-1].ratios, 2)}x, CPU {spread(cpu.rows[-1].ratios, 2)}x",
                  flush=True)
        if want_cells:
            note = ("every run waited until the sink had counted all of its messages "
                    "(a run that missed one would have failed the benchmark)")
            for t in (accept, e2e):
                t.notes.append(f"messages per run: {', '.join(done)}")
            e2e.notes.append(note)
            cpu.notes.append("from the end-to-end runs: CPU from the run's start until the sink "
                             "had every message, divided by the messages; relaygw: the "
                             "receiving and the delivery process; Postfix: master and every "
                             "daemon of its session (reaped ones included)")
        for size, sessions, messages in CELLS if want_latency else ():
            n = max(50, int(messages * args.scale))
            name = _cell_name(size, sessions)
            if deadline - time.monotonic() < 30:
                latency.notes.append(f"{name}: skipped, --max-seconds reached")
                continue
            probes = _latency_cell(targets, size, sessions, n, args, deadline)
            for label, q in (("p50", 0.5), ("p99", 0.99)):
                latency.rows.append(Row(
                    f"{name}, {label}",
                    [1000 * _percentile(r["relaygw"].samples, q) for r in probes],
                    [1000 * _percentile(r["postfix"].samples, q) for r in probes], 1,
                    "(information)"))
            per_round = {k: [len(r[k].samples) for r in probes] for k in ("relaygw", "postfix")}
            errors = {k: sum(r[k].errors for r in probes) for k in ("relaygw", "postfix")}
            latency.notes.append(
                f"{name}: probe messages per round relaygw {per_round['relaygw']}, "
                f"Postfix {per_round['postfix']}; probe errors {errors}")
            print(f"  latency {name}: p50 {spread(latency.rows[-2].ratios, 2)}x, "
                  f"p99 {spread(latency.rows[-1].ratios, 2)}x", flush=True)
        if want_latency:
            latency.notes.append(
                f"probe: one ~1 KiB message at a time on one session, every "
                f"{args.probe_interval * 1000:.0f} ms, while smtp-source runs; its messages "
                "are relayed and counted at the sink too")


def _latency_cell(targets: list[Target], size: int, sessions: int, n: int,
                  args: argparse.Namespace, deadline: float) -> list[dict[str, Probe]]:
    load = argparse.Namespace(sessions=sessions, size=size, run_timeout=args.run_timeout)
    for t in targets:
        run_load(t, max(50, n // 10), load, deadline)  # warm-up
    rounds = []
    for r in range(args.rounds):
        probes: dict[str, Probe] = {}
        for t in targets if r % 2 == 0 else targets[::-1]:
            before = t.sink.count()
            probe = Probe(t.port, args.probe_interval)
            probe.start()
            try:
                run_load(t, n, load, deadline)
            finally:
                probe.stop()
            wait_sink(t.sink, before + n + len(probe.samples), args.run_timeout,
                      f"{t.name} with the probe")
            if not probe.samples:
                raise RuntimeError(f"{t.name}: the probe got no 250 ({probe.errors} errors)")
            probes[t.name] = probe
        rounds.append(probes)
    return rounds


def memory_part(args: argparse.Namespace, deadline: float, tables: dict[str, Table]) -> None:
    """The 50 MiB message and idle sessions, each on freshly started servers."""
    table = tables["memory"] = Table("4", "Memory, sum of VmRSS over all the server's processes",
                                     "see each case")
    big: dict[str, list[float]] = {"relaygw": [], "postfix": []}
    idle: dict[str, list[float]] = {"relaygw": [], "postfix": []}
    idle_pss: dict[str, list[float]] = {"relaygw": [], "postfix": []}
    sampling: dict[str, list[float]] = {"relaygw": [], "postfix": []}
    gw_sessions = args.idle_sessions
    pf_sessions = args.postfix_idle_sessions
    with memory_servers(pf_sessions) as (gateway, gw_sink, postfix, pf_sink, pf_port):
        gw_port = gateway.ports[0]
        print(f"bench_perf: memory, {args.rounds} rounds", flush=True)
        for r in range(args.rounds):
            if deadline - time.monotonic() < 60:
                table.notes.append(f"stopped after {r} rounds: --max-seconds reached")
                break
            order = ("relaygw", "postfix") if r % 2 == 0 else ("postfix", "relaygw")
            for name in order:
                for what in ("big", "idle"):
                    # Fresh servers each time: Postfix reuses idle smtpd processes, and
                    # Python keeps freed memory, either would hide the next measurement.
                    if name == "relaygw":
                        gateway.stop()
                        gateway.start()
                        limit = open_files_limit(gateway.pid)
                        if limit < gw_sessions + 200:
                            gw_sessions = max(100, limit - 200)
                            table.notes.append(f"relaygw's open files limit is {limit}: "
                                               f"{gw_sessions} idle sessions")
                        port, sink, leader = gw_port, gw_sink, gateway.pid
                    else:
                        postfix.start()  # stops the earlier instance first
                        assert postfix.pid is not None
                        port, sink, leader = pf_port, pf_sink, postfix.pid
                    if what == "big":
                        grew, sampler = big_message_mib(port, sink, leader, args.run_timeout)
                        big[name].append(grew)
                        sampling[name].append(sampler.seconds / max(1, sampler.samples))
                    else:
                        per, per_pss = idle_sessions_kib(
                            port, leader, gw_sessions if name == "relaygw" else pf_sessions,
                            deadline)
                        idle[name].append(per)
                        idle_pss[name].append(per_pss)
            print(f"  round {r + 1}: 50 MiB message relaygw +{big['relaygw'][-1]:.2f} MiB, "
                  f"Postfix +{big['postfix'][-1]:.2f} MiB; idle session relaygw "
                  f"{idle['relaygw'][-1]:.2f} KiB, Postfix {idle['postfix'][-1]:.0f} KiB",
                  flush=True)
        gateway.stop()
        postfix.stop()
    if not big["relaygw"]:
        table.failed = "no round finished within --max-seconds"
        return
    table.rows.append(Row("one 50 MiB message: peak - idle (MiB)", big["relaygw"],
                          big["postfix"], 2, "relaygw < 2 MiB", below_value(2.0), True))
    table.rows.append(Row(f"idle sessions: (RSS - idle) / N (KiB per session), relaygw N = "
                          f"{gw_sessions:,}, Postfix N = {pf_sessions}",
                          idle["relaygw"], idle["postfix"], 2, "relaygw < 10 KiB",
                          below_value(10.0), True))
    table.rows.append(Row("idle sessions, Pss instead of RSS (KiB per session)",
                          idle_pss["relaygw"], idle_pss["postfix"], 2, "(information)"))
    table.notes += [
        f"50 MiB message: {BIG_MESSAGE:,} bytes (Postfix's message_size_limit is 50 MiB "
        "including its envelope), sent by a Python client and relayed to the sink; RSS sum "
        f"sampled every 20 ms (in fact every {1000 * statistics.mean(sampling['relaygw']):.0f} / "
        f"{1000 * statistics.mean(sampling['postfix']):.0f} ms, relaygw / Postfix) from before "
        "the MAIL command until the sink had it; idle = steady RSS after one small warm-up "
        "message; 0 = it never rose above idle",
        "idle sessions: banner + EHLO, then left open; RSS sum once steady; Postfix runs one "
        f"smtpd per session (its smtpd process limit is {pf_sessions + 20} here), so RSS counts "
        "its shared pages once per process — the Pss row splits them",
    ]


def queue_part(args: argparse.Namespace, deadline: float, tables: dict[str, Table]) -> None:
    """bench_queue_memory's measurement, once."""
    table = tables["queue"] = Table("4", "Memory with a queue (smarthost down), sum of the "
                                         "relaygw processes' peaks (VmHWM)", "MiB")
    queued = max(1000, int(args.queued * args.scale))
    budget = max(60.0, deadline - time.monotonic())
    print(f"bench_perf: queue, {queued:,} queued messages", flush=True)
    sums = measure_queue(queued, min(300.0, budget))
    table.rows.append(Row(f"{queued:,} queued messages", [sums["VmHWM"] / 1024], None, 1,
                          "< 300 MiB", below_value(300.0), True))
    table.notes.append("one run; Postfix: not measured (filling its queue means "
                       f"{queued:,} SMTP transactions)")
    if queued < 100_000:
        table.notes.append(f"measured with {queued:,} messages (--queued x --scale); the goal "
                           "is stated for 100,000")


# -- main ------------------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Unwind through the finally blocks, which stop every process by PID.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts: {','.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds (at least 1)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies the message counts: per load run (bench_relay's "
                             "cells) and --queued")
    parser.add_argument("--idle-sessions", type=int, default=10_000)
    parser.add_argument("--postfix-idle-sessions", type=int, default=200)
    parser.add_argument("--queued", type=int, default=100_000,
                        help="messages queued for the queue part (times --scale)")
    parser.add_argument("--probe-interval", type=float, default=0.01)
    parser.add_argument("--run-timeout", type=float, default=180.0, help="seconds per load run")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="the whole run")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.only) - set(PARTS)
    if unknown or args.rounds < 1:
        parser.error(f"unknown parts {sorted(unknown)}" if unknown else "--rounds must be >= 1")

    problems = [p for p in (installed_problem(), postfix_available()) if p]
    if not os.path.exists(SMTP_SOURCE):
        problems.append("smtp-source is missing (Debian package postfix)")
    if problems:
        print("bench_perf: cannot run: " + "; ".join(problems), file=sys.stderr)
        return 2
    # Every idle session is a descriptor here and in the gateway (which inherits this).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.idle_sessions + 1000
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    started = time.monotonic()
    deadline = started + args.max_seconds
    tables: dict[str, Table] = {}
    failed = False
    steps: list[tuple[str, Callable[[argparse.Namespace, float, dict[str, Table]], None]]] = []
    if {"accept", "e2e", "latency"} & set(args.only):
        steps.append(("load", load_parts))
    if "memory" in args.only:
        steps.append(("memory", memory_part))
    if "queue" in args.only:
        steps.append(("queue", queue_part))
    for name, step in steps:
        try:
            step(args, deadline, tables)
        except KeyboardInterrupt as e:  # after the with blocks stopped everything they started
            print(f"bench_perf: interrupted ({e}) in the {name} part", file=sys.stderr)
            return 130
        except (BenchFailed, RuntimeError, OSError, subprocess.SubprocessError) as e:
            failed = True
            print(f"bench_perf: the {name} part failed: {e}", file=sys.stderr, flush=True)
            for t in tables.values():
                if not t.rows and not t.failed:
                    t.failed = f"the {name} part failed ({str(e).splitlines()[0][:200]})"

    print(f"\n## bench_perf: relaygw beside Postfix ({os.cpu_count()} CPUs, {args.rounds} "
          f"rounds, scale {args.scale}, {time.monotonic() - started:.0f} s)\n")
    print("Values: median [min–max] over the rounds; ratio: median [min–max] of the per-round "
          "ratios relaygw / Postfix.\n")
    order = ("accept", "e2e", "cpu", "memory", "queue", "latency")
    for key in order:
        if key in tables:
            print(render(tables[key]))
    missed = False
    print("### Verdict\n")
    for key in order:
        if key not in tables:
            continue
        t = tables[key]
        if t.failed and not t.rows:
            print(f"- NOT MEASURED: {t.item}. {t.title}: {t.failed}")
            missed = True
        for row in t.rows:
            met = row.met()
            if met is None:
                if row.goal == "(information)" and row is t.rows[0]:
                    print(f"- no goal: {t.item}. {t.title.split(',')[0]}: reported beside "
                          "Postfix (table above)")
                continue
            missed = missed or not met
            value = (f"relaygw {spread(row.gw, row.digits)}, Postfix "
                     f"{spread(row.pf or [], row.digits)}" if row.absolute
                     else f"{spread_ratio(row.ratios)}x Postfix")
            print(f"- {'met' if met else 'NOT MET'}: {t.item}. {t.title.split(',')[0]}, "
                  f"{row.case}: {row.goal} (measured {value})")
        for note in t.notes:
            if "skipped" in note or "stopped after" in note:
                print(f"- NOT MEASURED: {t.item}. {note}")
                missed = True
    if failed:
        return 2
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
