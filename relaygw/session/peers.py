"""
Limits shared by the receiving processes (L{relaygw.workers}), as Postfix's
anvil shares them among its smtpd processes: connections per connector and
per client IP, message rate tokens, and AUTH failures per IP and per user
name count the same whichever process a client lands in, and so do AUTH
checks in flight (each begin and end is told) and failures per directory
account.

Each process tells the others of every change it makes (one short JSON line
per change: origin pid, connector, operation, arguments) and applies theirs;
the gateway process relays between its workers.  The other processes see a
change a pipe hop later, so two processes may both admit the last
connection a limit allows at the same instant: the limits hold to within
one connection (or token, or failure) per process, never the N-fold of
unshared counters.  A worker that ends takes its connections with it
(L{PeerLimits.forget}), and its AUTH checks in flight; a restarted worker starts with empty rate and AUTH
counters, as a restarted gateway does.

User names cross the pipes (never a password, never a log line).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from twisted.logger import Logger

from relaygw.auth.throttle import Throttle
from relaygw.session.limits import ConnectionCounter, RateLimiter

__all__ = ["PeerLimits"]

_log = Logger(namespace="relaygw.session.peers")


Shared = ConnectionCounter | RateLimiter | Throttle
#: The connector's counter (C{"counter"}), rate limiter (C{"limiter"}) or
#: throttle (C{"throttle"}), made if need be; C{None} for an unknown connector.
Lookup = Callable[[str, str], "Shared | None"]


class PeerLimits:
    """
    One process's end: L{attach} the counters of each connector as the
    session factory creates them; L{apply} what the other processes send.
    """

    def __init__(self, origin: int, send: Callable[[bytes], None], lookup: Lookup) -> None:
        """
        @param origin: this process's id, carried in every change it sends.
        @param send: writes one change (a line, without its end) to the others.
        @param lookup: the session factory's counters, by kind and connector
            name (a change may come before this process made them).
        """
        self.origin = origin
        self._send = send
        self._lookup = lookup
        self._counters: dict[str, ConnectionCounter] = {}
        self._throttles: dict[str, Throttle] = {}

    def attach(self, connector: str, item: Shared) -> None:
        """Tell the others of C{item}'s changes."""
        if isinstance(item, ConnectionCounter):
            self._counters[connector] = item  # for forget
            item.on_change = lambda op, ip: self._tell(connector, "c" + op, ip)
        elif isinstance(item, RateLimiter):
            item.on_take = lambda key: self._tell(connector, "r", key)
        else:
            self._throttles[connector] = item  # for forget
            # f(ailure)/s(uccess) ip user [account]; b(egin)/e(nd) of a check: its keys
            item.on_change = lambda op, *args: self._tell(
                connector, op[0], *(args[:-1] if args and not args[-1] else args))

    def _tell(self, connector: str, op: str, *args: str) -> None:
        self._send(json.dumps([self.origin, connector, op, *args]).encode())

    def apply(self, line: bytes) -> None:
        """One change from another process (malformed lines are logged and dropped)."""
        try:
            origin, connector, op, *args = json.loads(line)
            self._apply(int(origin), str(connector), str(op), [str(a) for a in args])
        except (ValueError, TypeError, KeyError, IndexError):
            _log.warn("receiving processes: an unreadable limits change was dropped")

    def _apply(self, origin: int, connector: str, op: str, args: list[str]) -> None:
        if origin == self.origin:
            return
        if op == "forget":
            for counter in self._counters.values():
                counter.forget(origin)
            for throttle in self._throttles.values():
                throttle.forget(origin)
            return
        kinds = {"r": "limiter", "f": "throttle", "s": "throttle", "b": "throttle", "e": "throttle"}
        item = self._lookup(kinds.get(op, "counter"), connector)
        if isinstance(item, ConnectionCounter) and op in ("c+", "c-"):
            item.remote(origin, args[0], 1 if op == "c+" else -1)
        elif isinstance(item, RateLimiter) and op == "r":
            item.consume(args[0])
        elif isinstance(item, Throttle) and op in ("f", "s"):
            item.record("failure" if op == "f" else "success", *args[:3])
        elif isinstance(item, Throttle) and op in ("b", "e"):
            item.remote(origin, 1 if op == "b" else -1, args)

    @staticmethod
    def forget_message(origin: int) -> bytes:
        """The change saying that process C{origin} ended."""
        return json.dumps([origin, "", "forget"]).encode()
