"""
Tests for L{relaygw.session.limits}: token buckets, per-key rate limits and
connection counting, on a L{Clock}.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from twisted.internet.task import Clock

from relaygw.config._model import Rate
from relaygw.session.limits import ConnectionCounter, RateLimiter, TokenBucket

PER_MINUTE_6 = Rate(6, timedelta(minutes=1))


def _drain(take: Callable[[], bool], limit: int = 1000) -> int:
    """Count successful takes until the first refusal (bounded)."""
    n = 0
    while n < limit and take():
        n += 1
    return n


def test_bucket_starts_full() -> None:
    """A new bucket allows N takes at once, then refuses."""
    bucket = TokenBucket(PER_MINUTE_6, Clock())
    assert _drain(bucket.take) == 6


def test_bucket_refills_evenly() -> None:
    """N/m refills one token every 60/N seconds, not all N at the minute."""
    clock = Clock()
    bucket = TokenBucket(PER_MINUTE_6, clock)
    _drain(bucket.take)
    clock.advance(9.9)
    assert not bucket.take()
    clock.advance(0.1)
    assert bucket.take()
    assert not bucket.take()


def test_bucket_refill_in_small_steps() -> None:
    """Refills accumulated from many small clock steps add up to whole tokens."""
    clock = Clock()
    bucket = TokenBucket(PER_MINUTE_6, clock)
    _drain(bucket.take)
    for _ in range(100):
        clock.advance(0.1)
    assert bucket.take()
    assert not bucket.take()


def test_bucket_caps_at_capacity() -> None:
    """Idle time never stores more than N tokens."""
    clock = Clock()
    bucket = TokenBucket(PER_MINUTE_6, clock)
    _drain(bucket.take)
    clock.advance(3600)
    assert bucket.full
    assert _drain(bucket.take) == 6


def test_bucket_clock_backwards() -> None:
    """A clock that goes backwards neither refills nor drains the bucket."""
    clock = Clock()
    clock.advance(100)
    bucket = TokenBucket(PER_MINUTE_6, clock)
    bucket.take()
    clock.rightNow = 50.0
    assert bucket.tokens == pytest.approx(5)


def test_bucket_rejects_zero_period() -> None:
    """A zero period is refused at construction."""
    with pytest.raises(ValueError):
        TokenBucket(Rate(1, timedelta(0)), Clock())


def test_rate_limiter_none_always_allows() -> None:
    """A connector without message_rate_limit never limits and keeps no state."""
    limiter = RateLimiter(None, Clock())
    assert all(limiter.allow("192.0.2.1") for _ in range(10_000))
    assert len(limiter) == 0


def test_rate_limiter_per_key() -> None:
    """Each key has its own bucket: one client's burst does not limit another."""
    clock = Clock()
    limiter = RateLimiter(PER_MINUTE_6, clock)
    assert _drain(lambda: limiter.allow("192.0.2.1")) == 6
    assert limiter.allow("192.0.2.2")
    clock.advance(10)
    assert limiter.allow("192.0.2.1")
    assert not limiter.allow("192.0.2.1")


def test_rate_limiter_drops_full_buckets_first() -> None:
    """Over max_keys, full (idle) buckets are dropped and drained ones kept."""
    clock = Clock()
    limiter = RateLimiter(PER_MINUTE_6, clock, max_keys=10)
    _drain(lambda: limiter.allow("drained"))
    for i in range(9):
        limiter.allow(f"idle{i}")
    clock.advance(30)  # idle ones refill to full; "drained" gets 3 of 6 back
    limiter.allow("new")
    assert len(limiter) == 2
    assert _drain(lambda: limiter.allow("drained")) == 3


def test_rate_limiter_memory_bounded_under_flood() -> None:
    """A flood of distinct keys, all drained, never holds more than max_keys buckets."""
    limiter = RateLimiter(Rate(1, timedelta(hours=1)), Clock(), max_keys=100)
    for i in range(5000):
        assert limiter.allow(f"10.0.{i // 256}.{i % 256}")
        assert len(limiter) <= 100


def test_rate_limiter_flood_keeps_recent_key() -> None:
    """When buckets must be forgiven, the least recently used go first."""
    limiter = RateLimiter(Rate(1, timedelta(hours=1)), Clock(), max_keys=10)
    limiter.allow("busy")
    for i in range(30):
        limiter.allow(f"k{i}")
        assert not limiter.allow("busy")


def test_connections_per_ip() -> None:
    """max_connections_per_ip refuses the next connection from that IP only."""
    counter = ConnectionCounter(max_total=100, max_per_ip=2)
    assert counter.acquire("192.0.2.1")
    assert counter.acquire("192.0.2.1")
    assert not counter.acquire("192.0.2.1")
    assert counter.acquire("192.0.2.2")
    assert (counter.total, counter.count("192.0.2.1")) == (3, 2)


def test_connections_total() -> None:
    """max_connections refuses any IP once reached; a release makes room."""
    counter = ConnectionCounter(max_total=2, max_per_ip=20)
    assert counter.acquire("192.0.2.1")
    assert counter.acquire("192.0.2.2")
    assert not counter.acquire("192.0.2.3")
    counter.release("192.0.2.1")
    assert counter.acquire("192.0.2.3")


def test_connection_release_unknown_ignored() -> None:
    """Releasing more than was acquired does not go negative or free others' slots."""
    counter = ConnectionCounter(max_total=1, max_per_ip=1)
    assert counter.acquire("192.0.2.1")
    counter.release("192.0.2.9")
    counter.release("192.0.2.1")
    counter.release("192.0.2.1")
    assert (counter.total, counter.count("192.0.2.1")) == (0, 0)
    assert counter.acquire("192.0.2.2")
    assert not counter.acquire("192.0.2.3")
