"""
Benchmark: relaygw's accept rate against a private Postfix, in one run
(issue 2, "Performance"; method of the project notes' benchmarks.md).

Postfix's C{smtp-source} drives 1 KiB messages at 10 concurrent sessions (one
message per session) into

 1. relaygw: the real C{twistd -n relaygw} process of this interpreter's
    environment, one connector that accepts C{dest.bench.test} (an
    internal-relay domain) and routes it via smarthost to an C{smtp-sink};
    every message fsynced before its 250, as always;
 2. a private Postfix instance relaying everything to another C{smtp-sink}.

The two are interleaved for several rounds (the order alternates), after a
small warm-up run each.  Per run: accept rate = N / time until smtp-source
exits 0 (every message got its 250); end-to-end = time until the sink has
counted the N messages; CPU = utime + stime of the server's process tree
from the run's start until its sink has them all (so relaying is included).
The verdict is the median over the rounds of the per-round ratio
relaygw / Postfix accept rate (ratios from one round are stable on a shared
machine, absolute rates are not).

Run as root (the private Postfix needs it), with relaygw pip-installed in the
interpreter's environment (scripts/test does that into .venv)::

    .venv/bin/python bench/bench_accept.py [--rounds 3] [--messages 2000] [--check]

Exit status 1 with C{--check} when the median ratio is below C{--min-ratio}
(0.7); 2 when the setup fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers.ports import free_ports  # noqa: E402
from tests.servers.postfix import PostfixInstance, postfix_available  # noqa: E402
from tests.servers.relaygw import RelaygwProcess, installed_problem  # noqa: E402
from tests.servers.sink import SmtpSink  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"


def relaygw_config(
    port: int, admin: int, sink: int, protocol_logging: str = "none", workers: int = 0
) -> str:
    """
    The relaygw side: one relaying connector, the test domain routed to the
    sink; C{protocol_logging} for both (the SmtpReceive and SmtpSend logs);
    C{workers} receiving processes (0: one per core).
    """
    return f"""
[gateway]
workers = {workers}
hostname = "gw.bench.test"
spool_dir = "var/spool"
log_dir = "var/log"
admin_listen = "127.0.0.1:{admin}"

[[accepted_domains]]
domain = "dest.bench.test"
type = "internal-relay"
route = "sink"

[[routes]]
name = "sink"
via = "smarthost"
smarthosts = ["127.0.0.1:{sink}"]
tls = "off"
max_concurrency = 20
protocol_logging = "{protocol_logging}"

[[connectors]]
name = "Bench"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit"]
protocol_logging = "{protocol_logging}"
message_rate_limit = "10000000/m"
max_connections_per_ip = 1000
"""


def _proc_stats() -> dict[int, list[str]]:
    """/proc/PID/stat fields after the command name (fields[0] is stat field 3), per PID."""
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stats[int(entry)] = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
    return stats


def tree_pids(leader: int, stats: dict[int, list[str]] | None = None) -> list[int]:
    """
    C{leader}, every process in the session or process group it leads, and
    all their descendants: relaygw's delivery process shares the bench's
    process group (Twisted's spawnProcess makes no session), Postfix's
    daemons share master's session.
    """
    stats = _proc_stats() if stats is None else stats
    # fields[1] is ppid (stat field 4), [2] pgrp, [3] session.
    found = {pid for pid, f in stats.items()
             if pid == leader or int(f[2]) == leader or int(f[3]) == leader}
    children: dict[int, list[int]] = {}
    for pid, f in stats.items():
        children.setdefault(int(f[1]), []).append(pid)
    todo = list(found)
    while todo:
        for kid in children.get(todo.pop(), ()):
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return sorted(found)


def tree_cpu_seconds(leader: int) -> float:
    """
    utime + stime (reaped children included) of C{leader}'s tree (L{tree_pids}).
    """
    stats = _proc_stats()
    # utime, stime, cutime, cstime are stat fields 14..17.
    total = sum(sum(int(stats[pid][i]) for i in (11, 12, 13, 14))
                for pid in tree_pids(leader, stats))
    return total / os.sysconf("SC_CLK_TCK")


class Target:
    """One server under load: its port, its sink and how to read its CPU time."""

    def __init__(self, name: str, port: int, sink: SmtpSink, cpu: Callable[[], float]) -> None:
        self.name = name
        self.port = port
        self.sink = sink
        self.cpu = cpu
        self.runs: list[dict[str, float]] = []


def run_load(target: Target, messages: int, args: argparse.Namespace, deadline: float) -> dict[str, float]:
    """One smtp-source run against C{target}; returns rates and CPU per message."""
    before_sink = target.sink.count()
    cpu0 = target.cpu()
    cmd = [
        SMTP_SOURCE, "-4", "-s", str(args.sessions), "-m", str(messages), "-l", str(args.size),
        "-M", "client.bench.test", "-f", "sender@client.bench.test",
        "-t", "rcpt@dest.bench.test", f"127.0.0.1:{target.port}",
    ]
    budget = max(5.0, min(args.run_timeout, deadline - time.monotonic()))
    t0 = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=budget,
                            stdin=subprocess.DEVNULL, check=False)
    accepted = time.monotonic() - t0
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source against {target.name} failed ({result.returncode}): "
                           f"{result.stdout[-500:]}{result.stderr[-500:]}")
    cpu_accept = target.cpu() - cpu0
    drain_deadline = time.monotonic() + max(5.0, min(args.run_timeout, deadline - time.monotonic()))
    while target.sink.count() < before_sink + messages:
        if time.monotonic() > drain_deadline:
            raise RuntimeError(f"{target.name}: only {target.sink.count() - before_sink} of "
                               f"{messages} messages reached the sink in time")
        time.sleep(0.02)
    end_to_end = time.monotonic() - t0
    cpu_total = target.cpu() - cpu0
    return {
        "accept_rate": messages / accepted,
        "e2e_rate": messages / end_to_end,
        "cpu_ms_accept": 1000 * cpu_accept / messages,
        "cpu_ms": 1000 * cpu_total / messages,
    }


class BenchFailed(Exception):
    """A run failed; the message holds the gateway's last output."""


@contextlib.contextmanager
def side_by_side(
    protocol_logging: str = "none", workers: int = 0
) -> Iterator[tuple[list[Target], RelaygwProcess]]:
    """
    relaygw and a private Postfix, each relaying to its own smtp-sink, in a
    fresh directory under /tmp; everything stopped (by PID) and removed after.

    @raise BenchFailed: a run inside failed (load, drain or start).
    """
    root = Path(tempfile.mkdtemp(prefix="relaygw-bench-", dir="/tmp"))
    os.chmod(root, 0o755)
    gw_port, admin, pf_port, gw_sink_port, pf_sink_port = free_ports(5)
    gw_sink = SmtpSink(root / "gw-sink", gw_sink_port)
    pf_sink = SmtpSink(root / "pf-sink", pf_sink_port)
    gateway = RelaygwProcess(root / "relaygw", relaygw_config(gw_port, admin, gw_sink_port, protocol_logging,
                                                        workers),
                             ports=[gw_port])
    postfix = PostfixInstance(root / "postfix", pf_port, pf_sink_port, smtpd_limit=200)
    try:
        gw_sink.start()
        pf_sink.start()
        gateway.start()
        postfix.start()
        assert postfix.pid is not None
        pf_pid = postfix.pid
        yield [
            Target("relaygw", gw_port, gw_sink, lambda: tree_cpu_seconds(gateway.pid)),
            Target("postfix", pf_port, pf_sink, lambda: tree_cpu_seconds(pf_pid)),
        ], gateway
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as e:
        raise BenchFailed(f"{e}\n{gateway.output()[-3000:]}") from e
    finally:
        gateway.stop()
        postfix.stop()
        gw_sink.stop()
        pf_sink.stop()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=2000, help="messages per run (-m)")
    parser.add_argument("--sessions", type=int, default=10, help="concurrent sessions (-s)")
    parser.add_argument("--size", type=int, default=1024, help="body octets (-l)")
    parser.add_argument("--warmup", type=int, default=200, help="messages of the warm-up run")
    parser.add_argument("--run-timeout", type=float, default=120.0, help="seconds per run")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="whole benchmark")
    parser.add_argument("--check", action="store_true", help="exit 1 below --min-ratio")
    parser.add_argument("--min-ratio", type=float, default=0.7)
    parser.add_argument("--protocol-logging", choices=("none", "verbose"), default="none",
                        help="the connector's and the route's protocol_logging")
    parser.add_argument("--workers", type=int, default=0,
                        help="relaygw's gateway.workers (0: one receiving process per core)")
    args = parser.parse_args(argv)

    problems = [p for p in (installed_problem(), postfix_available()) if p]
    if not os.path.exists(SMTP_SOURCE):
        problems.append("smtp-source is missing (Debian package postfix)")
    if problems:
        print("bench_accept: cannot run: " + "; ".join(problems), file=sys.stderr)
        return 2

    deadline = time.monotonic() + args.max_seconds
    ratios = []
    try:
        with side_by_side(args.protocol_logging, args.workers) as (targets, gateway):
            print(f"bench_accept: smtp-source -s {args.sessions} -l {args.size}, "
                  f"{args.rounds} rounds x {args.messages} messages, warm-up {args.warmup}, "
                  f"protocol_logging = {args.protocol_logging}, workers = {args.workers}; "
                  f"{os.cpu_count()} CPUs", flush=True)
            for t in targets:
                run_load(t, args.warmup, args, deadline)
            for r in range(args.rounds):
                order = targets if r % 2 == 0 else targets[::-1]
                for t in order:
                    t.runs.append(run_load(t, args.messages, args, deadline))
                gw, pf = targets[0].runs[-1], targets[1].runs[-1]
                ratios.append(gw["accept_rate"] / pf["accept_rate"])
                print(
                    f"round {r + 1}: relaygw {gw['accept_rate']:7.0f} msg/s accept "
                    f"({gw['e2e_rate']:5.0f} end-to-end, {gw['cpu_ms']:.2f} ms CPU/msg) | "
                    f"postfix {pf['accept_rate']:7.0f} msg/s accept "
                    f"({pf['e2e_rate']:5.0f} end-to-end, {pf['cpu_ms']:.2f} ms CPU/msg) | "
                    f"ratio {ratios[-1]:.2f}",
                    flush=True,
                )
    except BenchFailed as e:
        print(f"bench_accept: failed: {e}", file=sys.stderr)
        return 2

    def med(t: Target, key: str) -> float:
        return statistics.median(run[key] for run in t.runs)

    gw_t, pf_t = targets
    ratio = statistics.median(ratios)
    print(
        f"median: relaygw {med(gw_t, 'accept_rate'):.0f} msg/s accept, "
        f"{med(gw_t, 'cpu_ms'):.2f} ms CPU/msg ({med(gw_t, 'cpu_ms_accept'):.2f} until the last 250); "
        f"postfix {med(pf_t, 'accept_rate'):.0f} msg/s accept, {med(pf_t, 'cpu_ms'):.2f} ms CPU/msg; "
        f"ratio relaygw/postfix {ratio:.2f} (per round: {', '.join(f'{x:.2f}' for x in ratios)})"
    )
    if args.check and ratio < args.min_ratio:
        print(f"bench_accept: ratio {ratio:.2f} is below {args.min_ratio}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
