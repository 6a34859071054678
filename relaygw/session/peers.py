"""
Limits shared by the receiving processes (L{relaygw.workers}), as Postfix's
anvil shares them among its smtpd processes: connections per connector and
per client IP, message rate tokens, and AUTH failures per IP, per user
name and per directory account count the same whichever process a client
lands in.

Each process tells the others of every change it makes (one short JSON line
per change: origin pid, connector, operation, arguments) and applies theirs;
the gateway process relays between its workers.  The other processes see a
change a pipe hop later, so two processes may both admit the last
connection a limit allows at the same instant: connections and rate tokens
hold to within one per process, never the N-fold of unshared counters.  A
worker that ends takes its connections with it (L{PeerLimits.forget}); a
restarted worker starts with empty rate and AUTH counters, as a restarted
gateway does.

AUTH checks are strict instead (a guess that slips through may lock an
Active Directory account): the gateway process's throttle decides every
admission.  A worker asks it (C{a}: kind, request id, keys) and waits for
the answer addressed to it (C{g}: worker, request id, verdict); it tells
the end of each check (C{e}, or C{u} when the directory did not answer)
after the check's failure or success, through the same pipe, so the
gateway applies each worker's changes in their order and all of them in
the one order it reads them.  These lines are for the gateway only; a
worker's checks in flight and its waits end with it.  An ask for a
connector the gateway does not have (a reload in progress) is answered
454, and so are a worker's asks once the gateway process is gone
(L{PeerLimits.close}).

User names cross the pipes (never a password, never a log line).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaygw.auth.throttle import Throttle, Verdict
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

    def __init__(
        self, origin: int, send: Callable[[bytes], None], lookup: Lookup, *, decides: bool = False
    ) -> None:
        """
        @param origin: this process's id, carried in every change it sends.
        @param send: writes one change (a line, without its end) to the others.
        @param lookup: the session factory's counters, by kind and connector
            name (a change may come before this process made them).
        @param decides: this is the gateway process: its throttles admit the
            AUTH checks of every process; else they ask it.
        """
        self.origin = origin
        self.decides = decides
        self._send = send
        self._lookup = lookup
        self._counters: dict[str, ConnectionCounter] = {}
        self._throttles: dict[str, Throttle] = {}
        #: A worker's asks awaiting the gateway's answer: id -> (answer, connector, kind, keys).
        self._asks: dict[str, tuple[Deferred[Verdict], str, str, tuple[str, ...]]] = {}
        self._closed = False
        self._ids = itertools.count(1)

    def attach(self, connector: str, item: Shared) -> None:
        """Tell the others of C{item}'s changes."""
        if isinstance(item, ConnectionCounter):
            self._counters[connector] = item  # for forget
            item.on_change = lambda op, ip: self._tell(connector, "c" + op, ip)
        elif isinstance(item, RateLimiter):
            item.on_take = lambda key: self._tell(connector, "r", key)
        else:
            self._throttles[connector] = item  # for forget
            # f(ailure)/s(uccess) ip user [account]; e(nd)/u(navailable) of a check: its keys
            item.on_change = lambda op, *args: self._tell(
                connector, "u" if op == "end-unavailable" else op[0],
                *(args[:-1] if args and not args[-1] else args))
            if not self.decides:
                item.ask = lambda kind, keys: self._ask(connector, kind, keys)

    def _ask(self, connector: str, kind: str, keys: tuple[str, ...]) -> Deferred[Verdict]:
        request = str(next(self._ids))
        answer: Deferred[Verdict] = Deferred()
        if self._closed:
            answer.callback(_NO_ANSWER[kind])
            return answer
        self._asks[request] = (answer, connector, kind, keys)
        self._tell(connector, "a", kind, request, *keys)
        return answer

    def _tell(self, connector: str, op: str, *args: str) -> None:
        self._send(json.dumps([self.origin, connector, op, *args]).encode())

    def apply(self, line: bytes) -> bool:
        """
        One change from another process (malformed lines are logged and dropped).

        @return: whether the gateway relays it to the other workers (not
            the lines for the gateway only, nor malformed ones).
        """
        try:
            origin, connector, op, *args = json.loads(line)
            return self._apply(int(origin), str(connector), str(op), [str(a) for a in args])
        except (ValueError, TypeError, KeyError, IndexError):
            _log.warn("receiving processes: an unreadable limits change was dropped")
            return False

    def _apply(self, origin: int, connector: str, op: str, args: list[str]) -> bool:
        if origin == self.origin:
            return False
        if op == "forget":
            for counter in self._counters.values():
                counter.forget(origin)
            for throttle in self._throttles.values():
                throttle.forget(origin)
            return True
        if op in ("a", "e", "u"):
            if self.decides:
                self._decide(origin, connector, op, args)
            return False
        if op == "g":
            if int(args[0]) == self.origin:
                self._answered(args[1], args[2])
            return False
        kinds = {"r": "limiter", "f": "throttle", "s": "throttle"}
        item = self._lookup(kinds.get(op, "counter"), connector)
        if isinstance(item, ConnectionCounter) and op in ("c+", "c-"):
            item.remote(origin, args[0], 1 if op == "c+" else -1)
        elif isinstance(item, RateLimiter) and op == "r":
            item.consume(args[0])
        elif isinstance(item, Throttle) and op in ("f", "s"):
            item.record("failure" if op == "f" else "success", *args[:3])
        return True

    def _decide(self, origin: int, connector: str, op: str, args: list[str]) -> None:
        """In the gateway process: a worker's ask, or the end of its check."""
        item = self._lookup("throttle", connector)
        throttle = item if isinstance(item, Throttle) else None
        if op != "a":
            if throttle is not None:
                throttle.remote_end(origin, args, unavailable=op == "u")
            return
        kind, request, keys = args[0], args[1], tuple(args[2:])
        if kind == "check" and len(keys) == 2:
            verdict = throttle.decide(keys, origin) if throttle else succeed(_NO_ANSWER[kind])
        elif kind == "account" and len(keys) == 1:
            verdict = succeed(throttle.decide_account(keys[0], origin) if throttle
                              else _NO_ANSWER[kind])  # fmt: skip
        else:
            raise ValueError(kind)
        verdict.addCallback(lambda v: self._tell(connector, "g", str(origin), request, v))
        verdict.addErrback(_ended)

    def _answered(self, request: str, verdict: str) -> None:
        """In a worker: the gateway's verdict on one of its asks."""
        entry = self._asks.pop(request, None)
        if entry is None:
            return
        answer, connector, _, keys = entry
        if not answer.called:
            answer.callback(verdict)
        elif verdict == "go":  # the login gave up meanwhile: the check ends unbegun
            self._tell(connector, "e", *keys)

    def close(self) -> None:
        """
        In a worker: the gateway process is gone; its answers will not
        come.  Waiting logins get 454, an account gate's directory thread
        is let go (it would hold the worker's exit), and later asks too.
        """
        self._closed = True
        asks, self._asks = self._asks, {}
        for answer, _, kind, _ in asks.values():
            if not answer.called:
                answer.callback(_NO_ANSWER[kind])

    @staticmethod
    def forget_message(origin: int) -> bytes:
        """The change saying that process C{origin} ended."""
        return json.dumps([origin, "", "forget"]).encode()


#: The verdict when the gateway process cannot answer: 454 either way.
_NO_ANSWER = {"check": "unavailable", "account": "busy"}


def _ended(failure: Failure) -> Failure | None:
    """A worker's wait cancelled: it ended meanwhile (L{Throttle.forget})."""
    return None if failure.check(CancelledError) else failure  # type: ignore[no-untyped-call]
