"""
One run at a time of some slow work, shared by every caller meanwhile.

The admin endpoint's checks and counts run in threads that may hang (an
NFS spool, a directory behind a dead route).  A probe every second must not
start a new thread every second behind the hung one, so callers wait for
the run in progress, each with its own timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

__all__ = ["Once"]

_T = TypeVar("_T")


class Once(Generic[_T]):
    """
    Runs C{work} when no run is in progress; every L{get} meanwhile waits
    for that same run.

    @ivar started: C{clock.seconds()} when the run in progress started
        (C{None} when none is).
    """

    def __init__(self, work: Callable[[], Deferred[_T]], clock: IReactorTime) -> None:
        self._work = work
        self._clock = clock
        self._waiters: list[Deferred[_T]] = []
        self.started: float | None = None

    def get(self) -> Deferred[_T]:
        """
        @return: a new Deferred with the result of the run in progress (or
            of one started now); cancelling it leaves the run alone.
        """
        waiter: Deferred[_T] = Deferred()
        self._waiters.append(waiter)
        if self.started is None:
            self.started = self._clock.seconds()
            try:
                running = self._work()
            except Exception:
                running = fail()
            running.addBoth(self._done)
        return waiter

    def _done(self, result: _T | Failure) -> None:
        self.started = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if waiter.called:  # cancelled: timed out
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
