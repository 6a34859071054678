"""
The soak (issue 11): a real gateway under mixed anonymous and authenticated
load with random client disconnects, relaying to a downstream that drops
connections and answers 4xx at random, for C{--minutes} (default 30); then
the books are balanced (every acknowledged message delivered exactly once
or bounced, nothing unfinished delivered, "maybe" messages at most once)
and the gateway's memory and descriptors compared with their level after
the warm-up.  See L{tests.servers.soak} for the method.

    .venv/bin/python bench/soak.py [--minutes 30] [--clients 3] [--seed 1]
                                   [--tls] [--directory slapd]

C{--tls} runs part of the sessions over STARTTLS (connectors with a
certificate and C{require_tls}) and implicit TLS; C{--directory slapd}
authenticates against a real OpenLDAP slapd (no login cache) instead of
the users file.  Both are off by default, as in the CI soak.

Exit status 0 when everything balanced, 1 when not, 2 when the setup fails.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers.relaygw import installed_problem  # noqa: E402
from tests.servers.slapd import slapd_unavailable  # noqa: E402
from tests.servers.soak import DIRECTORIES, run_soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=3,
                        help="concurrent client threads (3 keep delivery up with intake on 2 cores)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--tls", action="store_true",
                        help="part of the sessions over STARTTLS and implicit TLS")
    parser.add_argument("--directory", choices=DIRECTORIES,
                        help="AUTH against this real directory instead of the users file")
    args = parser.parse_args()
    problem = installed_problem() or (slapd_unavailable() if args.directory == "slapd" else None)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the gateway and the downstream are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    workdir = Path(tempfile.mkdtemp(prefix="relaygw-soak-"))
    try:
        result = run_soak(workdir, args.minutes * 60, clients=args.clients, seed=args.seed,
                          drain_timeout=max(300.0, args.minutes * 60),
                          log=lambda line: print(line, flush=True), tls=args.tls,
                          directory=args.directory)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(result.report())
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
