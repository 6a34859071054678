"""
A receiving worker (L{relaygw.workers}): C{python -m relaygw.receiver --fd N
... [--config PATH]}, started by the gateway, not by hand.  It serves the
inherited listening sockets with a L{RelayGatewayService} that neither
recovers the spool nor delivers, and logs JSON to its stdout for the parent.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TextIO, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger, globalLogBeginner
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from relaygw._types import IServeReactor
from relaygw.events import child_log_observer, forward_to_parent
from relaygw.polling import make_lean
from relaygw.runner import PEER_MARK, BatchedOutput

__all__ = ["main"]

_log = Logger()


def main(argv: Sequence[str] | None = None) -> None:
    """
    C{python -m relaygw.receiver --fd N ... [--config PATH]}: one receiving
    worker.  Started by the gateway, not by hand.
    """
    # Until the service installs its handler, a reload must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="python -m relaygw.receiver")
    parser.add_argument("--config", "-c", default=None)
    parser.add_argument("--fd", type=int, action="append", default=[])
    args = parser.parse_args(argv)
    out = BatchedOutput(sys.stdout)
    globalLogBeginner.beginLoggingTo([child_log_observer(cast(TextIO, out))],
                                     redirectStandardIO=False)
    forward_to_parent()

    from twisted.internet import task

    def start(reactor: IServeReactor) -> Deferred[None]:
        make_lean(reactor)
        out.attach(cast(IReactorFromThreads, reactor))
        return Deferred.fromCoroutine(_serve(reactor, args.config, tuple(args.fd), out))

    task.react(start)


class _Parent(LineOnlyReceiver):
    """
    The worker's stdin: the other processes' shared-limits changes, one per
    line; its end means the gateway is gone (killed).
    """

    delimiter = b"\n"

    def __init__(self, apply: Callable[[bytes], object], gone: Deferred[None]) -> None:
        self._apply = apply
        self._gone = gone

    def lineReceived(self, line: bytes) -> None:
        self._apply(line)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self._gone.called:
            self._gone.callback(None)




async def _serve(
    reactor: IServeReactor, config_path: str | None, fds: tuple[int, ...], out: BatchedOutput
) -> None:
    from twisted.internet import stdio

    from relaygw.config._load import load, load_default
    from relaygw.service import RelayGatewayService

    config = load(config_path) if config_path else load_default()
    service = RelayGatewayService(
        config, reactor, delivery="none", config_path=config_path, signals=True,
        admin=False, tracking=False, adopt=fds,
    )
    # The parent stops its workers (SIGTERM); a terminal's Ctrl-C is its to handle.
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)  # type: ignore[attr-defined]
    service.startService()
    # SIGTERM stops the reactor (relaygw.reload): the service drains first.
    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", lambda: service.stopService() if service.running else None)
    gone: Deferred[None] = Deferred()
    # Only stdin is read; the log owns stdout (StandardIO would make it non-blocking).
    def tell_parent(line: bytes) -> None:
        # Beside the log records, in the same turn's write (whole lines).
        out.write_now(PEER_MARK.decode() + line.decode() + "\n")

    peers = service.share_limits(tell_parent)
    stdio.StandardIO(_Parent(peers.apply, gone), stdout=os.open(os.devnull, os.O_WRONLY),  # type: ignore[call-arg,no-untyped-call]
                     reactor=reactor)
    await gone
    peers.close()  # the AUTHs waiting for the gateway's answer get 454
    if service.running:  # not already stopping on SIGTERM
        _log.info("receiving worker: the gateway is gone, stopping")


if __name__ == "__main__":
    main()
