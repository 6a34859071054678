"""
The kill -9 soak of tests/e2e/test_kill_random_e2e.py for longer: RUNS
kills at random points (whole gateway, a receiving worker, the delivery
process) while clients send, then the same checks (every 250 delivered at
least once, nothing cut before its final dot delivered, no orphan file).

    .venv/bin/python bench/kill9_soak.py --runs 200 [--seed N]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

from tests.e2e.test_kill_random_e2e import config, soak
from tests.servers.ports import free_port, free_ports
from tests.servers.relaygw import RelaygwProcess
from tests.servers.sink import SmtpSink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="relaygw-kill9-", dir="/tmp"))
    work.chmod(0o755)
    sink = SmtpSink(work / "sink", free_port(), dump=True).start()
    port, admin = free_ports(2)
    gw = RelaygwProcess(work / "gw", config(port, admin, sink.port), ports=[port]).start()
    try:
        print(f"seed {args.seed}")
        print(soak(gw, port, sink, args.runs, args.seed))
    finally:
        gw.stop()
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
