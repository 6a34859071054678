"""
Tests for L{relaygw.auth.throttle.Throttle}: failure counting per IP and
per user, the growing delay, the reset on success, bounded memory.
"""

from __future__ import annotations

from datetime import timedelta

from twisted.internet.task import Clock

from relaygw.auth.throttle import Throttle
from relaygw.config._model import AuthThrottle

SETTINGS = AuthThrottle(max_failures=3, window=timedelta(minutes=10),
                        delay=timedelta(seconds=1), max_delay=timedelta(seconds=5))


def make() -> tuple[Throttle, Clock]:
    clock = Clock()
    return Throttle(SETTINGS, clock), clock


def test_blocked_at_max_failures_per_ip() -> None:
    """max_failures failures from one IP block that IP, whatever the user name."""
    throttle, _ = make()
    for name in ("a", "b", "c"):
        assert not throttle.blocked("192.0.2.1", "z")
        throttle.failure("192.0.2.1", name)
    assert throttle.blocked("192.0.2.1", "z")
    assert not throttle.blocked("192.0.2.2", "z")


def test_blocked_per_user_case_insensitive() -> None:
    """Failures for one user from many IPs block that user (lower-cased)."""
    throttle, _ = make()
    for i in range(3):
        throttle.failure(f"192.0.2.{i}", "Printer")
    assert throttle.blocked("198.51.100.1", "PRINTER")


def test_user_names_the_users_file_folds_together_share_a_count() -> None:
    """
    The users file finds a name by its case fold, so the throttle counts by
    it too: C{\u017fcan} (long s) logs in as C{scan} and must not get
    a count of its own.
    """
    throttle, _ = make()
    for i, name in enumerate(("\u017fcan", "SCAN", "scan")):
        throttle.failure(f"192.0.2.{i}", name)
    assert throttle.blocked("198.51.100.1", "scan")
    assert throttle.blocked("198.51.100.1", "\u017fcan")


def test_delay_doubles_and_is_capped() -> None:
    """The delay is delay * 2**(failures-1), capped at max_delay."""
    throttle, _ = make()
    delays = [throttle.failure("192.0.2.1", "u") for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert throttle.delay(0) == 0.0
    assert throttle.delay(10_000) == 5.0


def test_window_expiry_clears() -> None:
    """Failures older than the window (from the first failure) no longer count."""
    throttle, clock = make()
    for _ in range(3):
        throttle.failure("192.0.2.1", "u")
    clock.advance(600)
    assert not throttle.blocked("192.0.2.1", "u")
    assert throttle.failure("192.0.2.1", "u") == 1.0


def test_success_clears_ip_and_user() -> None:
    """A success clears the IP's and the user's counts."""
    throttle, _ = make()
    for _ in range(2):
        throttle.failure("192.0.2.1", "u")
    throttle.success("192.0.2.1", "U")
    assert throttle.failures("192.0.2.1", "u") == 0


def test_memory_bounded() -> None:
    """At most max_keys counters are kept."""
    throttle = Throttle(SETTINGS, Clock(), max_keys=10)
    for i in range(1000):
        throttle.failure(f"10.0.{i // 256}.{i % 256}", f"user{i}")
    assert len(throttle._counts) <= 10


def test_the_deciding_throttle_keeps_each_workers_share() -> None:
    """
    In the gateway process: a worker's admitted checks are its own (an end
    from another origin, or after a reload, releases nothing); a worker
    that ends releases them and its waits are never admitted.
    """
    throttle, _ = make()
    keys = ("ip:10.0.0.1", "user:x")
    assert [throttle.decide(keys, 7).result for _ in range(3)] == ["go"] * 3
    waiting = throttle.decide(keys, 7)
    mine = throttle.decide(keys)
    assert not waiting.called and not mine.called
    throttle.remote_end(8, list(keys))  # not 8's
    assert throttle.in_flight("user:x") == 3
    throttle.remote_end(7, list(keys))
    assert waiting.result == "go"  # first in line
    throttle.forget(7)
    assert throttle.in_flight("user:x") == 1 and mine.result == "go"
    throttle.remote_end(7, list(keys))  # forgotten already
    assert throttle.in_flight("user:x") == 1
    assert throttle.decide_account("account:cn=x", 7) == "go"
    throttle.forget(7)
    assert throttle.in_flight("account:cn=x") == 0
