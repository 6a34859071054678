"""
The long run of the fuzzers that tests/test_fuzz.py runs bounded in CI
(issue 11, "Must show" 3): the ESMTP session, the configuration loader and
the DATA end-of-data look-alikes, for a number of examples or minutes.

    .venv/bin/python bench/fuzz.py --minutes 10
    .venv/bin/python bench/fuzz.py --examples 100000 --only session

Each target runs in batches of fresh random examples (a new seed per batch;
the seed is printed with a failure, so it can be replayed with --seed); a
failing batch prints hypothesis's shrunk example and the run goes on.  At
the end: examples run and failures per target; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests import fuzzing  # noqa: E402

TARGETS: dict[str, tuple[Callable[[], st.SearchStrategy[Any]], Callable[[Any], None]]] = {
    "session": (fuzzing.sessions, fuzzing.check_session),
    "config": (fuzzing.config_texts, fuzzing.check_config),
    "smuggling": (fuzzing.smuggling_cases, fuzzing.check_smuggling),
}


def _batch(name: str, examples: int, batch_seed: int) -> str | None:
    """Run one batch; the failure report, or C{None}."""
    strategy, check = TARGETS[name]

    @seed(batch_seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(strategy())
    def run(case: Any) -> None:
        check(case)

    try:
        run()
    except Exception:
        return traceback.format_exc(limit=8)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=0,
                        help="examples per target (default: run for --minutes)")
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="wall-clock budget shared by the targets (default 5)")
    parser.add_argument("--only", choices=sorted(TARGETS), action="append",
                        help="run only this target (repeatable)")
    parser.add_argument("--batch", type=int, default=2000, help="examples per batch")
    parser.add_argument("--seed", type=int, default=None, help="first batch seed")
    args = parser.parse_args(argv)
    names = args.only or sorted(TARGETS)
    rng = random.Random(args.seed)
    failures: dict[str, int] = {n: 0 for n in names}
    started = time.monotonic()
    budget = args.minutes * 60 / len(names)
    for name in names:
        t0 = time.monotonic()
        first = fuzzing.COUNTS[name]
        while True:
            done = fuzzing.COUNTS[name] - first
            if args.examples and done >= args.examples:
                break
            if not args.examples and time.monotonic() - t0 >= budget:
                break
            size = min(args.batch, args.examples - done) if args.examples else args.batch
            batch_seed = args.seed if args.seed is not None and done == 0 else rng.getrandbits(32)
            report = _batch(name, size, batch_seed)
            if report is not None:
                failures[name] += 1
                print(f"--- {name}: failure in the batch with seed {batch_seed} ---\n{report}",
                      flush=True)
        ran = fuzzing.COUNTS[name] - first
        print(f"{name}: {ran} examples in {time.monotonic() - t0:.0f} s, "
              f"{failures[name]} failing batch(es)", flush=True)
    total = sum(failures.values())
    print(f"total: {sum(fuzzing.COUNTS[n] for n in names)} examples in "
          f"{time.monotonic() - started:.0f} s, {total} failure(s)")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
