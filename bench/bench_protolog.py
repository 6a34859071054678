"""
Benchmark: what the SmtpReceive protocol log costs a receive session, in
CPU per session, in one process (issue 8, "Protocol logs").

C{bench_accept.py --protocol-logging verbose} measures the whole gateway,
but on a shared machine its rates move more than the few percent at stake;
this one runs the real L{relaygw.session.protocol.Session} over
StringTransport (the unit tests' harness: a recording spool, no disk for
the message) and counts process CPU time, which other load moves less.
Three cases, interleaved for several rounds:

  1. C{none}: the connector's C{protocol_logging = "none"};
  2. C{verbose-events}: C{"verbose"} without a protocol log: only the
     C{receive.command} / C{receive.reply} debug events, which twistd's text
     log writes (here: to /dev/null);
  3. C{verbose-protolog}: C{"verbose"} with the protocol log, its writer run
     inline so that formatting and writing the rows are counted too.

Each session: banner, EHLO, MAIL, RCPT, DATA, a 1 KiB message, QUIT.

    .venv/bin/python bench/bench_protolog.py [--sessions 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.defer import maybeDeferred  # noqa: E402
from twisted.logger import globalLogBeginner, textFileLogObserver  # noqa: E402

from relaygw.ops.protolog import ProtocolLog  # noqa: E402
from tests.fakes import Harness, make_connector  # noqa: E402

BODY = b"Subject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * 12 + b".\r\n"
#: No limit of the harness's connector gets in the way of thousands of sessions.
_UNLIMITED = {"message_rate_limit": None, "max_connections_per_ip": 1_000_000,
              "max_connections": 1_000_000}
SESSION = [
    b"EHLO client.bench.test\r\n",
    b"MAIL FROM:<sender@client.bench.test>\r\n",
    b"RCPT TO:<rcpt@example.test>\r\n",
    b"DATA\r\n",
    BODY,
    b"QUIT\r\n",
]


def run(case: str, sessions: int, log_dir: Path) -> float:
    """CPU milliseconds per session for one case."""
    verbose = case != "none"
    harness = Harness(make_connector(protocol_logging="verbose" if verbose else "none",
                                     **_UNLIMITED))
    log = None
    if case == "verbose-protolog":
        log = ProtocolLog(log_dir, "receive", harness.reactor, run=maybeDeferred)
        log.start()
        harness.factory.protocol_log = log
    start = time.process_time()
    for _ in range(sessions):
        session, transport = harness.connect()
        for chunk in SESSION:
            session.dataReceived(chunk)
        session.connectionLost()
        transport.clear()
        harness.reactor.advance(0.001)
    harness.reactor.advance(1)  # the last flush
    spent = time.process_time() - start
    if log is not None:
        log.stop()
    return 1000 * spent / sessions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    # As twistd does: every event goes to a text log (here /dev/null).
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(open("/dev/null", "w"))], redirectStandardIO=False
    )
    cases = ("none", "verbose-events", "verbose-protolog")
    results: dict[str, list[float]] = {c: [] for c in cases}
    root = Path(tempfile.mkdtemp(prefix="relaygw-bench-protolog-"))
    try:
        run("none", 200, root / "warm")
        for r in range(args.rounds):
            order = cases if r % 2 == 0 else cases[::-1]
            for case in order:
                results[case].append(run(case, args.sessions, root / f"r{r}"))
            print("round %d: " % (r + 1) + ", ".join(
                f"{c} {results[c][-1]:.3f} ms" for c in cases), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(results["none"])
    for case in cases:
        m = statistics.median(results[case])
        print(f"{case:18s} {m:.3f} ms CPU/session (median), {100 * (m / base - 1):+.1f} % vs none")
    events, plog = statistics.median(results["verbose-events"]), statistics.median(
        results["verbose-protolog"])
    print(f"protocol log on top of the verbose events: {100 * (plog / events - 1):+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
