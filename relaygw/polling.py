"""
The reactor relaygw's processes run on: Twisted's epoll reactor without its
per-event logging context.

For every ready descriptor, Twisted's reactors call
C{twisted.python.log.callWithLogger}: it asks the selectable for its log
prefix and copies a context dictionary so that legacy C{log.msg} calls made
meanwhile carry C{system="<prefix>"}.  relaygw logs with
C{twisted.logger}, whose events never read that context, and under load the
context cost about 9 % of all the instructions the gateway's processes ran
per relayed message (bench/instructions.py: 3.97 -> 3.60 M).
L{LeanEPollReactor} dispatches directly; what Twisted's own legacy messages
lose is the connection's prefix in their C{[system]} column.  Errors are
still caught and logged: inside C{_doReadOrWrite} as before, and around it
here (a connection's C{connectionLost} that raises).

L{make_lean} is applied to the global reactor by twistd's plugin
(L{relaygw.tap}) and by the child processes.  The reactor is already
installed by then (C{twisted.mail.smtp}, which L{relaygw.errors} builds on,
imports it when imported), so the epoll reactor is turned into its lean
subclass in place (no state is added); any other reactor (C{twistd
--reactor=...}) is left as it is.
"""

from __future__ import annotations

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

__all__ = ["LeanEPollReactor", "make_lean"]

_log = Logger()


class LeanEPollReactor(EPollReactor):
    """L{EPollReactor} whose C{doPoll} calls C{_doReadOrWrite} directly."""

    def doPoll(self, timeout: float | None) -> None:
        """Wait up to C{timeout} seconds (C{None}: no limit), then handle each ready descriptor."""
        try:
            ready = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except InterruptedError:
            return
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)  # type: ignore[no-untyped-call]
            except Exception:
                _log.failure("Unhandled error handling {selectable!r}", selectable=selectable)

    doIteration = doPoll  # the base class binds its own doPoll under this name


def make_lean(reactor: object) -> bool:
    """
    Make C{reactor} a L{LeanEPollReactor} when it is Twisted's epoll reactor.

    @return: whether it is one now.
    """
    if type(reactor) is EPollReactor:
        reactor.__class__ = LeanEPollReactor
    return isinstance(reactor, LeanEPollReactor)
