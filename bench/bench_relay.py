"""
End-to-end relaying against Postfix: smtp-source -> relaygw -> smtp-sink beside
smtp-source -> Postfix -> smtp-sink, in one run, for 1 KiB and 100 KiB
messages and 10 and 50 sessions (issue 7, "Performance").

Each cell runs --rounds paired runs (order alternating); a run's end-to-end
rate is N / the time until the sink has counted all N messages (every
message counted), its CPU the utime + stime of the whole process tree over
that time.  The table gives medians and the per-round range, and the ratio
relaygw / Postfix of the median rates.  The machinery (configuration, load,
CPU accounting) is bench_accept's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_accept import (  # noqa: E402
    SMTP_SOURCE,
    BenchFailed,
    Target,
    run_load,
    side_by_side,
)
from tests.servers.postfix import postfix_available  # noqa: E402
from tests.servers.relaygw import installed_problem  # noqa: E402

#: (body octets, sessions, messages per run)
CELLS = ((1024, 10, 3000), (1024, 50, 3000), (100 * 1024, 10, 600), (100 * 1024, 50, 600))


def _cell(
    targets: list[Target], size: int, sessions: int, messages: int, args: argparse.Namespace,
    deadline: float,
) -> list[tuple[dict[str, float], dict[str, float]]]:
    load = argparse.Namespace(sessions=sessions, size=size, run_timeout=args.run_timeout)
    for t in targets:
        run_load(t, max(50, messages // 10), load, deadline)  # warm-up
    pairs = []
    for r in range(args.rounds):
        runs = {}
        for t in targets if r % 2 == 0 else targets[::-1]:
            runs[t.name] = run_load(t, messages, load, deadline)
        pairs.append((runs["relaygw"], runs["postfix"]))
    return pairs


def _fmt(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies messages per run")
    parser.add_argument("--run-timeout", type=float, default=180.0, help="seconds per run")
    parser.add_argument("--max-seconds", type=float, default=1500.0, help="whole benchmark")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when the 1 KiB / 10 sessions ratio is below --min-ratio")
    parser.add_argument("--min-ratio", type=float, default=1.0)
    args = parser.parse_args(argv)

    problems = [p for p in (installed_problem(), postfix_available()) if p]
    if not os.path.exists(SMTP_SOURCE):
        problems.append("smtp-source is missing (Debian package postfix)")
    if problems:
        print("bench_relay: cannot run: " + "; ".join(problems), file=sys.stderr)
        return 2

    deadline = time.monotonic() + args.max_seconds
    results = []
    try:
        with side_by_side() as (targets, _):
            print(f"bench_relay: {args.rounds} paired rounds per cell; {os.cpu_count()} CPUs",
                  flush=True)
            for size, sessions, messages in CELLS:
                n = max(50, int(messages * args.scale))
                pairs = _cell(targets, size, sessions, n, args, deadline)
                results.append((size, sessions, n, pairs))
                gw = [g["e2e_rate"] for g, _ in pairs]
                pf = [p["e2e_rate"] for _, p in pairs]
                print(
                    f"{size // 1024:4d} KiB {sessions:3d} sessions x {n}: "
                    f"relaygw {_fmt(gw)} msg/s, {_fmt([g['cpu_ms'] for g, _ in pairs], 2)} ms CPU | "
                    f"postfix {_fmt(pf)} msg/s, {_fmt([p['cpu_ms'] for _, p in pairs], 2)} ms CPU | "
                    f"ratio {statistics.median(gw) / statistics.median(pf):.2f}",
                    flush=True,
                )
    except BenchFailed as e:
        print(f"bench_relay: failed: {e}", file=sys.stderr)
        return 2
    size, sessions, _, pairs = results[0]
    ratio = statistics.median(g["e2e_rate"] for g, _ in pairs) / statistics.median(
        p["e2e_rate"] for _, p in pairs
    )
    if args.check and ratio < args.min_ratio:
        print(f"bench_relay: 1 KiB / 10 sessions ratio {ratio:.2f} is below {args.min_ratio}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
