"""
Profile relaygw's processes under the accept/relay load (issue 10, "Must
show" 6): smtp-source drives 1 KiB messages into relaygw (smarthost route
to smtp-sink, as in bench_accept.py) while py-spy samples the twistd
process, its receiving workers and the delivery process; prints each
process's top frames by own time and by total time (py-spy's idle frames,
threads waiting, excluded).

    .venv/bin/python bench/profile_load.py [--workers 1] [--seconds 8] [--top 25]

Needs py-spy (``pip install py-spy``), root, the Debian package postfix
(smtp-source, smtp-sink).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_accept import SMTP_SOURCE, relaygw_config, tree_pids  # noqa: E402
from tests.servers.ports import free_ports  # noqa: E402
from tests.servers.relaygw import RelaygwProcess  # noqa: E402
from tests.servers.sink import SmtpSink  # noqa: E402


def _name(pid: int) -> str:
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    for key, label in (("relaygw.runner", "delivery"), ("relaygw.receiver", "worker"),
                       ("twistd", "twistd")):
        if key in cmd:
            return label
    return "other"


def _cpu(pid: int) -> float:
    """utime + stime of C{pid}, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _top(raw: Path, top: int) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        if frames[-1].startswith(("Condition.wait", "Queue.get", "_worker (concurrent")):
            continue  # a thread waiting for work
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    lines = [f"  {samples} samples"]
    lines += [f"  {100 * c / samples:5.1f}% own   {f[:120]}" for f, c in own.most_common(top)]
    lines += [f"  {100 * c / samples:5.1f}% total {f[:120]}" for f, c in total.most_common(top)
              if not f.startswith(("<module>", "run (twisted", "main (", "_bootstrap"))]
    return "\n".join(lines)


def _syscalls(summary: Path, messages: int, top: int) -> str:
    """strace -c's table as calls per message, most frequent first."""
    rows = []
    for line in summary.read_text().splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            rows.append((int(fields[3]), fields[-1]))
    rows.sort(reverse=True)
    total = sum(calls for calls, _ in rows)
    lines = [f"  {total / max(1, messages):.1f} system calls per message"]
    lines += [f"  {calls / max(1, messages):7.2f}  {name}" for calls, name in rows[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--syscalls", action="store_true",
                        help="count system calls per message per process (strace -c), no profile")
    parser.add_argument("--cpu-only", action="store_true",
                        help="no py-spy: only each process's CPU per message")
    parser.add_argument("--gil", action="store_true",
                        help="sample only the thread holding the GIL (Python CPU, not I/O waits)")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not args.cpu_only and not Path(spy).exists():
        print("profile_load: py-spy is missing (pip install py-spy)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="relaygw-profile-", dir="/tmp"))
    root.chmod(0o755)
    port, admin, sink_port = free_ports(3)
    sink = SmtpSink(root / "sink", sink_port)
    gateway = RelaygwProcess(root / "relaygw",
                             relaygw_config(port, admin, sink_port, workers=args.workers),
                             ports=[port])
    load = None
    try:
        sink.start()
        gateway.start()
        time.sleep(1.0 + 0.5 * args.workers)  # the workers start after the parent
        # Enough messages to outlast the sampling (bounded: it is killed after).
        load = subprocess.Popen(
            [SMTP_SOURCE, "-4", "-s", str(args.sessions), "-m", "200000", "-l", str(args.size),
             "-M", "client.bench.test", "-f", "sender@client.bench.test",
             "-t", "rcpt@dest.bench.test", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=open(root / "load.err", "w"))
        time.sleep(1.0)
        pids = sorted(tree_pids(gateway.pid))
        spies = {}
        before = sink.count()
        cpu0 = {pid: _cpu(pid) for pid in pids}
        for pid in [] if args.cpu_only else pids:
            out = root / f"{pid}.raw"
            if args.syscalls:
                # Every thread of the process; stopped with SIGINT after the period.
                tracer = [shutil.which("strace") or "strace", "-c", "-f", "-o", str(out),
                          "-p", str(pid)]
            else:
                tracer = [spy, "record", "-p", str(pid), "-d", str(int(args.seconds)), "-r", "250",
                          "-f", "raw", "-o", str(out), "--nonblocking",
                          *(["--gil"] if args.gil else [])]
            spies[pid] = (out, subprocess.Popen(
                tracer, stdout=subprocess.DEVNULL, stderr=open(root / f"{pid}.err", "w")))
        names = {pid: _name(pid) for pid in pids}
        if args.cpu_only or args.syscalls:
            time.sleep(args.seconds)
        if args.syscalls:
            for _, proc in spies.values():
                proc.send_signal(signal.SIGINT)
        for _, proc in spies.values():
            proc.wait(timeout=args.seconds + 30)
        delivered = sink.count() - before
        cpu = {pid: _cpu(pid) - cpu0[pid] for pid in pids}
        if load.poll() is not None:
            print(f"profile_load: smtp-source ended early: {(root / 'load.err').read_text()[-500:]}")
        print(f"profile_load: {args.sessions} sessions, {args.size} octets, workers = "
              f"{args.workers}; {delivered} messages reached the sink in about "
              f"{args.seconds:.0f} s of sampling")
        for pid in pids:
            per = 1000 * cpu[pid] / max(1, delivered)
            print(f"\n{names[pid]} (pid {pid}): {per:.2f} ms CPU per message")
            out = root / f"{pid}.raw"
            if out.exists() and args.syscalls:
                print(_syscalls(out, delivered, args.top))
            elif out.exists():
                print(_top(out, args.top))
            elif not args.cpu_only:
                print(f"  no profile: {(root / f'{pid}.err').read_text()[-300:]}")
    finally:
        if load is not None:
            load.kill()
            load.wait()
        gateway.stop()
        sink.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
