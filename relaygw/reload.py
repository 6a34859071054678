"""
Reload and graceful stop (SPEC section 7), the parts that need no service.

SIGHUP: L{read_config} reads the file again (an invalid one is logged in
SPEC section 2's form and the running configuration stays);
L{socket_changes} says which listening sockets to close and which to open;
the service swaps the rest (selector, TLS options, directory) for new
sessions only.  L{restart_only} names what a reload cannot change.

SIGTERM: L{Sessions.drain} waits, bounded, for the sessions in progress, then cuts
the rest (a message whose 250 was not sent is not acknowledged, so nothing
is lost).
"""

from __future__ import annotations

import signal
import weakref
from collections.abc import Callable, Sequence

from typing import cast

from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from relaygw.config._model import Config
from relaygw.errors import ConfigError
from relaygw.listen.bindings import ListenSocket

__all__ = ["Sessions", "install_signals", "read_config", "restart_only", "socket_changes"]

_log = Logger(namespace="relaygw.reload")

#: How often L{Sessions.drain} looks whether the sessions have ended.
_POLL = 0.1


def read_config(path: str | None) -> Config | None:
    """The configuration at C{path} (C{None}: the embedded default), or C{None}, logged."""
    from relaygw.config._load import load, load_default

    try:
        return load(path) if path else load_default()
    except ConfigError as error:
        _log.error(
            "reload refused, the running configuration stays: {problem}",
            event="reload.refused", problem=str(error),
        )
        return None


def restart_only(old: Config, new: Config) -> list[str]:
    """The changed keys that take effect only after a restart (logged, not refused)."""
    changed = []
    for key in ("spool_dir", "log_dir", "admin_listen", "admin_token_file", "workers"):
        if getattr(old.gateway, key) != getattr(new.gateway, key):
            changed.append(f"gateway.{key}")
    return changed


def socket_changes(
    running: Sequence[ListenSocket], planned: Sequence[ListenSocket]
) -> tuple[list[int], list[ListenSocket]]:
    """
    @return: the indexes in C{running} of the sockets to close (no longer
        planned, or planned differently), and the planned sockets to open.
    """
    close = [i for i, plan in enumerate(running) if plan not in planned]
    open_ = [plan for plan in planned if plan not in running]
    return close, open_


def install_signals(reactor: IReactorCore, reload: Callable[[], object]) -> None:
    """
    Once the reactor runs (after it installed its own handlers): SIGHUP
    calls C{reload}; SIGTERM stops the reactor like Twisted's handler, but
    the stop is the planned, graceful one, so twistd exits 0 rather than
    re-raising the signal (systemd and operators read 0 as a clean stop).
    """

    def stop() -> None:
        _log.info("Received SIGTERM, stopping gracefully", event="stop.sigterm")
        reactor.stop()

    def install() -> None:
        from_thread = cast(IReactorFromThreads, reactor).callFromThread
        signal.signal(signal.SIGHUP, lambda *_: from_thread(reload))
        signal.signal(signal.SIGTERM, lambda *_: from_thread(stop))

    reactor.callWhenRunning(install)


class Sessions:
    """
    The sessions in progress, as seen by the factory every socket uses: a
    weak set, so that a session forgotten by its transport is not held.
    """

    def __init__(self) -> None:
        self._live: weakref.WeakSet[object] = weakref.WeakSet()

    def add(self, protocol: object) -> None:
        self._live.add(protocol)

    def live(self) -> list[object]:
        """The sessions whose connection is still open."""
        return [p for p in list(self._live) if not getattr(p, "finished", True)]

    async def drain(self, clock: IReactorTime, grace: float) -> int:
        """
        Wait up to C{grace} seconds for the live sessions to end, then abort
        the others.

        @return: how many were aborted.
        """
        waited = 0.0
        while self.live() and waited < grace:
            await deferLater(clock, _POLL, lambda: None)
            waited += _POLL
        left = self.live()
        for protocol in left:
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
        if left:
            _log.warn(
                "{count} session(s) still open after {grace} s; closed",
                event="stop.sessions-aborted", count=len(left), grace=grace,
            )
        return len(left)
