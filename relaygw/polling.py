"""
The reactor relaygw's processes run on (Twisted's epoll reactor without its
per-event logging context), and writing to its TCP connections at once.

For every ready descriptor, Twisted's reactors call
C{twisted.python.log.callWithLogger}: it asks the selectable for its log
prefix and copies a context dictionary so that legacy C{log.msg} calls made
meanwhile carry C{system="<prefix>"}.  relaygw logs with
C{twisted.logger}, whose events never read that context, and under load the
context cost about 9 % of all the instructions the gateway's processes ran
per relayed message (bench/instructions.py: 3.97 -> 3.69 M).
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

Replies are written with L{write_now}: Twisted's TCP transport keeps every
write for the reactor's next round, registering the socket for writability
and unregistering it once sent (two C{epoll_ctl} calls and a poll round per
reply); when nothing is waiting in its buffer, the socket takes a reply at
once (about 10 % of the receiving process's instructions per message).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import ITransport
from twisted.internet.tcp import Connection
from twisted.logger import Logger

__all__ = ["LeanEPollReactor", "make_lean", "write_now"]

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


def write_now(transport: ITransport, data: bytes) -> None:
    """
    C{transport.write(data)}, sending at once what the socket takes when
    C{transport} is a plain TCP connection with nothing buffered (order is
    kept); any other transport (TLS, a PROXY wrapper), or what the socket
    does not take, goes the usual way.
    """
    t: Any = transport
    if (
        isinstance(t, Connection)
        and not t.TLS  # after STARTTLS, writes must go through the TLS layer
        and t.connected
        and not t.disconnecting
        and not t.dataBuffer
        and not getattr(t, "_tempDataBuffer", True)
    ):
        try:
            sent = t.socket.send(data)
        except OSError:  # EAGAIN, or a peer gone: the usual path finds out
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
