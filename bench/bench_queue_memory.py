"""
Resident memory with a large queue (issue 7, "Performance"; issue 10, "Memory"):
N messages (default 100,000) committed into a spool with relaygw's own spool
writer, for a route whose smarthost is down, then the real `twistd -n relaygw`
started on that spool.  Once the receiving process has recovered the spool
and the delivery process has scheduled every entry (their resident sizes
steady), it prints VmRSS and VmHWM (peak) of both and their sum.

    .venv/bin/python bench/bench_queue_memory.py [--messages N] [--check]

--check exits 1 when the sum of the peaks is over --max-mib (300).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor  # noqa: E402

from bench.bench_accept import relaygw_config  # noqa: E402
from relaygw.spool.envelope import Envelope, Recipient  # noqa: E402
from relaygw.spool.store import DirectorySpool  # noqa: E402
from tests.servers.ports import free_ports  # noqa: E402
from tests.servers.procs import child_pids  # noqa: E402
from tests.servers.relaygw import RelaygwProcess, installed_problem  # noqa: E402

BODY = b"Subject: queued\r\nMessage-ID: <%d@bench.test>\r\n\r\n" + b"x" * 1000 + b"\r\n"


def config(port: int, admin: int, closed: int) -> str:
    """bench_accept's configuration, its smarthost down, retried hourly."""
    return relaygw_config(port, admin, closed) + '\n[queue]\nretry = ["1h"]\n'


def fill(spool_dir: Path, count: int) -> float:
    """Commit C{count} messages; the seconds it took."""
    spool = DirectorySpool(spool_dir, reactor)  # type: ignore[arg-type]
    t0 = time.monotonic()
    now = time.time()
    for n in range(count):
        writer = spool.begin()
        data = BODY % n
        writer.write(data)
        writer.commit_now(Envelope(
            id=writer.queue_id, sender="s@client.bench.test",
            recipients=(Recipient("r@dest.bench.test"),), connector="Bench",
            client_ip="127.0.0.1", received_at=now, size=len(data),
            message_id=f"<{n}@bench.test>",
        ))
    return time.monotonic() - t0


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of C{pid}, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _role(pid: int) -> str:
    """A child's part, from its command line (C{python -m relaygw.runner}: delivery)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "child"
    module = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == b"-m"), b"")
    return {b"relaygw.runner": "delivery"}.get(module, module.decode(errors="replace")
                                                    .rpartition(".")[2] or "child")


def measure(messages: int, settle_timeout: float = 300.0) -> dict[str, int]:
    """
    Spool C{messages}, start the gateway on them, wait until steady, print
    the per-process figures; returns the sums of VmRSS and VmHWM in KiB.
    Everything it started is stopped (by PID) and removed before it returns.
    """
    root = Path(tempfile.mkdtemp(prefix="relaygw-qmem-", dir="/tmp"))
    os.chmod(root, 0o755)
    port, admin, closed = free_ports(3)
    gateway = RelaygwProcess(root / "gw", config(port, admin, closed), ports=[port])
    try:
        (root / "gw").mkdir(parents=True, exist_ok=True)
        took = fill(root / "gw" / "var" / "spool", messages)
        print(f"bench_queue_memory: {messages} messages spooled in {took:.1f} s", flush=True)
        t0 = time.monotonic()
        gateway.start(timeout=settle_timeout)
        print(f"gateway ready after {time.monotonic() - t0:.1f} s (spool recovered)", flush=True)
        deadline = time.monotonic() + settle_timeout
        last, steady = -1, 0
        while time.monotonic() < deadline and steady < 6:
            time.sleep(0.5)
            kids = child_pids(gateway.pid)
            total = sum(status(p)["VmRSS"] for p in [gateway.pid, *kids]) if kids else -1
            steady = steady + 1 if kids and abs(total - last) < max(1024, last // 100) else 0
            last = total
        kids = child_pids(gateway.pid)
        rows = [("twistd", gateway.pid)] + [(_role(p), p) for p in kids]
        sums = {"VmRSS": 0, "VmHWM": 0}
        for name, pid in rows:
            st = status(pid)
            sums = {k: sums[k] + st[k] for k in sums}
            print(f"  {name:9s} pid {pid}: RSS {st['VmRSS'] / 1024:7.1f} MiB, "
                  f"peak {st['VmHWM'] / 1024:7.1f} MiB")
        print(f"all relaygw processes: RSS {sums['VmRSS'] / 1024:.1f} MiB, "
              f"sum of peaks {sums['VmHWM'] / 1024:.1f} MiB "
              f"({sums['VmHWM'] * 1024 / messages:.0f} bytes per queued message)")
    finally:
        gateway.stop(timeout=60)
        shutil.rmtree(root, ignore_errors=True)
    return sums


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--max-mib", type=float, default=300.0)
    parser.add_argument("--settle-timeout", type=float, default=300.0)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    problem = installed_problem()
    if problem:
        print(f"bench_queue_memory: cannot run: {problem}", file=sys.stderr)
        return 2
    sums = measure(args.messages, args.settle_timeout)
    if args.check and sums["VmHWM"] / 1024 > args.max_mib:
        print(f"bench_queue_memory: over {args.max_mib} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
