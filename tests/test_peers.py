"""
Tests for the limits the receiving processes share (L{relaygw.session.peers}):
two session factories joined by in-memory pipes behave as one for
connections per IP and in total, message rate tokens and AUTH failures; a
process that ends takes its connections with it; bad lines are dropped.
"""

from __future__ import annotations

from datetime import timedelta

from twisted.internet.task import Clock

from relaygw.config._model import AuthThrottle, Rate
from relaygw.session.limits import ConnectionCounter, RateLimiter
from relaygw.auth.throttle import Throttle
from relaygw.session.peers import PeerLimits, Shared


class _Process:
    """One process's counters for connector "C", and its PeerLimits."""

    def __init__(self, pid: int, clock: Clock, outbox: list[tuple[int, bytes]]) -> None:
        self.counter = ConnectionCounter(max_total=3, max_per_ip=2)
        self.limiter = RateLimiter(Rate(2, timedelta(minutes=1)), clock)
        self.throttle = Throttle(AuthThrottle(max_failures=3), clock)
        items: dict[str, Shared] = {
            "counter": self.counter, "limiter": self.limiter, "throttle": self.throttle}
        self.peers = PeerLimits(pid, lambda line: outbox.append((pid, line)),
                                lambda kind, name: items[kind] if name == "C" else None)
        for item in items.values():
            self.peers.attach("C", item)


def _pair() -> tuple[_Process, _Process, list[tuple[int, bytes]], Clock]:
    clock = Clock()
    outbox: list[tuple[int, bytes]] = []
    return _Process(1, clock, outbox), _Process(2, clock, outbox), outbox, clock


def _deliver(outbox: list[tuple[int, bytes]], *processes: _Process) -> None:
    """The parent's relay: every line to every other process."""
    while outbox:
        origin, line = outbox.pop(0)
        for p in processes:
            if p.peers.origin != origin:
                p.peers.apply(line)


def test_connections_per_ip_and_in_total_are_shared() -> None:
    a, b, outbox, _ = _pair()
    assert a.counter.acquire("10.0.0.1")
    assert b.counter.acquire("10.0.0.1")
    _deliver(outbox, a, b)
    assert a.counter.count("10.0.0.1") == b.counter.count("10.0.0.1") == 2
    assert not a.counter.acquire("10.0.0.1")  # per IP: 2 in all
    assert not b.counter.acquire("10.0.0.1")
    assert a.counter.acquire("10.0.0.2")
    _deliver(outbox, a, b)
    assert not b.counter.acquire("10.0.0.3")  # in total: 3 in all
    b.counter.release("10.0.0.1")
    _deliver(outbox, a, b)
    assert a.counter.total == 2 and a.counter.acquire("10.0.0.1")


def test_an_ended_process_takes_its_connections() -> None:
    a, b, outbox, _ = _pair()
    assert b.counter.acquire("10.0.0.1") and b.counter.acquire("10.0.0.1")
    _deliver(outbox, a, b)
    assert not a.counter.acquire("10.0.0.1")
    a.peers.apply(PeerLimits.forget_message(2))
    assert a.counter.count("10.0.0.1") == 0 and a.counter.acquire("10.0.0.1")


def test_rate_tokens_are_shared() -> None:
    a, b, outbox, clock = _pair()
    assert a.limiter.allow("10.0.0.1")
    _deliver(outbox, a, b)
    assert b.limiter.allow("10.0.0.1")
    _deliver(outbox, a, b)
    assert not a.limiter.allow("10.0.0.1") and not b.limiter.allow("10.0.0.1")
    clock.advance(30)  # one token back, everywhere
    assert b.limiter.allow("10.0.0.1")
    _deliver(outbox, a, b)
    assert not a.limiter.allow("10.0.0.1")


def test_auth_failures_are_shared_and_a_success_clears_them() -> None:
    a, b, outbox, _ = _pair()
    a.throttle.failure("10.0.0.1", "scan")
    b.throttle.failure("10.0.0.2", "scan")  # the same user from elsewhere
    a.throttle.failure("10.0.0.1", "scan")
    _deliver(outbox, a, b)
    assert a.throttle.blocked("10.0.0.9", "SCAN") and b.throttle.blocked("10.0.0.9", "scan")
    assert b.throttle.failures("10.0.0.1", "other") == 2
    b.throttle.success("10.0.0.1", "scan")
    _deliver(outbox, a, b)
    assert a.throttle.failures("10.0.0.1", "scan") == 0


def test_own_and_malformed_lines_change_nothing() -> None:
    a, b, outbox, _ = _pair()
    assert a.counter.acquire("10.0.0.1")
    own = outbox.pop()[1]
    a.peers.apply(own)  # its own change, echoed back
    assert a.counter.count("10.0.0.1") == 1
    for line in (b"", b"not json", b"[1]", b'[3, "C", "c+"]', b'[3, "Nope", "c+", "1.2.3.4"]',
                 b'{"a": 1}'):
        b.peers.apply(line)
    assert b.counter.total == 0


def test_a_change_before_the_counter_exists_is_kept() -> None:
    """The lookup makes the connector's counter on the first remote change."""
    made: list[ConnectionCounter] = []

    def lookup(kind: str, name: str) -> Shared | None:
        if not made:
            made.append(ConnectionCounter(10, 1))
        return made[0]

    peers = PeerLimits(1, lambda line: None, lookup)
    peers.apply(b'[2, "C", "c+", "10.0.0.1"]')
    assert made[0].count("10.0.0.1") == 1 and not made[0].acquire("10.0.0.1")
