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


def test_auth_asks_and_ends_are_for_the_gateway_only() -> None:
    """
    A worker's throttle asks the gateway (decides=True) to admit each check
    and tells it the end: those lines are not relayed to other workers
    (apply says False); the answer is addressed to the asking worker only;
    failures are relayed to everybody as before.
    """
    clock = Clock()
    settings = AuthThrottle(max_failures=1)
    gateway_out: list[bytes] = []
    worker_out: list[bytes] = []
    decider = Throttle(settings, clock)
    gateway = PeerLimits(1, gateway_out.append, lambda kind, name: decider, decides=True)
    gateway.attach("C", decider)
    asking = Throttle(settings, clock)
    worker = PeerLimits(2, worker_out.append, lambda kind, name: asking)
    worker.attach("C", asking)
    other_throttle = Throttle(settings, clock)
    other = PeerLimits(3, lambda line: None, lambda kind, name: other_throttle)
    other.attach("C", other_throttle)

    first = asking.admit("10.0.0.1", "x")
    second = asking.admit("10.0.0.2", "x")
    assert not first.called and len(worker_out) == 2
    assert [gateway.apply(line) for line in worker_out] == [False, False]
    assert decider.in_flight("user:x") == 1  # the second waits at the gateway
    assert len(gateway_out) == 1
    other.apply(gateway_out[0])  # addressed to process 2: nothing here
    worker.apply(gateway_out.pop())
    attempt = first.result
    worker_out.clear()
    attempt.failure()
    assert len(worker_out) == 2  # the failure, then the end
    assert [gateway.apply(line) for line in worker_out] == [True, False]
    other.apply(worker_out[0])
    assert other_throttle.blocked("10.9.9.9", "x")
    assert decider.in_flight("user:x") == 0
    worker.apply(gateway_out.pop())  # the waiting one: blocked by the failure
    assert second.result is None
    assert gateway.apply(b'[2, "C", "a", "nonsense", "9"]') is False
    assert gateway_out == []
