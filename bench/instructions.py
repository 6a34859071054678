"""
Instructions per message, per process, counted by valgrind's callgrind: a
figure that does not move with the machine's other load (CPU seconds on
this shared 2-vCPU machine moved by +-30 % between identical runs while
other work ran), for comparing two versions of a hot path.

The gateway (twistd, its receiving workers, its delivery process) runs
under C{valgrind --tool=callgrind --instr-atstart=no}: uninstrumented
(about 5x slower) through start-up and a warm-up load, then instrumented
(C{callgrind_control -i on}) for exactly C{--messages} 1 KiB messages from
smtp-source into a smarthost route to smtp-sink, then dumped.  Printed: per
process, instructions (Ir) per relayed message.  Timing still shapes the
count a little (batch sizes of the group commit, how many events one poll
returns), so compare runs of the same C{--messages} and C{--sessions}.

    .venv/bin/python bench/instructions.py [--messages 300] [--workers 1]

Needs valgrind (Debian package valgrind) and postfix (smtp-source, smtp-sink).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_accept import SMTP_SOURCE, relaygw_config, tree_pids  # noqa: E402
from profile_load import _name  # noqa: E402
from tests.servers.ports import free_ports  # noqa: E402
from tests.servers.relaygw import RelaygwProcess  # noqa: E402
from tests.servers.sink import SmtpSink  # noqa: E402


def _load(port: int, messages: int, sessions: int, size: int) -> None:
    subprocess.run(
        [SMTP_SOURCE, "-4", "-s", str(sessions), "-m", str(messages), "-l", str(size),
         "-M", "client.bench.test", "-f", "sender@client.bench.test",
         "-t", "rcpt@dest.bench.test", f"127.0.0.1:{port}"],
        check=True, timeout=600, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


def _wait_sink(sink: SmtpSink, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sink.count() < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sink.count()} of {count} messages reached the sink")
        time.sleep(0.1)


def _instructions(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the callgrind files")
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"instructions: {tool} is missing (apt-get install valgrind)", file=sys.stderr)
            return 2
    root = Path(tempfile.mkdtemp(prefix="relaygw-instructions-", dir="/tmp"))
    root.chmod(0o755)
    port, admin, sink_port = free_ports(3)
    sink = SmtpSink(root / "sink", sink_port)
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes",
                "--dump-instr=no", "--compress-strings=no",
                f"--callgrind-out-file={root}/cg.%p", "--log-file=" + str(root / "vg.%p.log")]
    gateway = RelaygwProcess(root / "relaygw",
                             relaygw_config(port, admin, sink_port, workers=args.workers),
                             ports=[port], prefix=valgrind)
    try:
        sink.start()
        gateway.start(timeout=300)
        time.sleep(5.0 * args.workers)  # the workers start after the parent
        _load(port, args.warmup, args.sessions, args.size)
        _wait_sink(sink, args.warmup, 300)
        pids = [pid for pid in tree_pids(gateway.pid)
                if _name(pid) in ("twistd", "worker", "delivery")]
        for pid in pids:
            subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True,
                           stdout=subprocess.DEVNULL, timeout=120)
        _load(port, args.messages, args.sessions, args.size)
        _wait_sink(sink, args.warmup + args.messages, 600)
        print(f"instructions: {args.messages} messages of {args.size} octets, "
              f"{args.sessions} sessions, workers = {args.workers}")
        total = 0
        for pid in pids:
            subprocess.run(["callgrind_control", "-d", str(pid)], check=True,
                           stdout=subprocess.DEVNULL, timeout=120)
            dumps = sorted(root.glob(f"cg.{pid}.*"))
            count = sum(_instructions(d) for d in dumps)
            total += count
            print(f"  {_name(pid):9} (pid {pid}): {count / args.messages / 1e6:7.3f} M instructions per message")
        print(f"  all       : {total / args.messages / 1e6:7.3f} M instructions per message")
    finally:
        gateway.stop(timeout=60)
        sink.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"instructions: files in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
