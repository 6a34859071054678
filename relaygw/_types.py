"""
Composite reactor interfaces for typing, in the manner of treq's
C{_ITreqReactor}: each names exactly the reactor features a consumer needs,
so mypy checks the injected reactor against what is used.

A concrete reactor (the global one, or L{twisted.internet.testing.MemoryReactorClock})
provides the parts separately; callers that hold one pass it with
C{typing.cast} to the composite they need.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorFromThreads,
    IReactorSSL,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)

__all__ = ["IServeReactor", "IServeThreadsReactor", "ISpoolReactor"]


class ISpoolReactor(IReactorTime, IReactorFromThreads):
    """
    What the directory spool needs: time for queue ids, and C{callFromThread}
    for the results of its commit thread.
    """


class IServeReactor(IReactorTCP, IReactorSSL, ISpoolReactor):
    """
    What the gateway service needs: TCP listening and connecting, time, TLS,
    and results from the spool's commit thread.
    """


class IServeThreadsReactor(IServeReactor, IReactorThreads):
    """
    L{IServeReactor} plus a thread pool, for the blocking directory adapter
    (issue 3).
    """
