"""
Connection and message-rate limits of a connector (SPEC section 2).

Time comes from an injected L{IReactorTime}'s C{seconds()}, so tests drive
it with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

from relaygw.config._model import Rate

__all__ = ["ConnectionCounter", "RateLimiter", "TokenBucket"]

# Float refills (0.1 s steps) land a hair below a whole token.
_EPSILON = 1e-9


class TokenBucket:
    """
    A bucket of C{rate.count} tokens, full at first, refilled evenly over
    C{rate.per} (SPEC: "a rate N/m is a token bucket of N refilled evenly
    over a minute").
    """

    def __init__(self, rate: Rate, clock: IReactorTime) -> None:
        """
        @raise ValueError: C{rate.per} is not positive (the loader refuses it).
        """
        per = rate.per.total_seconds()
        if per <= 0:
            raise ValueError("rate period must be positive")
        self._capacity = float(rate.count)
        self._refill = rate.count / per
        self._clock = clock
        self._tokens = self._capacity
        self._stamp = clock.seconds()

    def _update(self) -> None:
        now = self._clock.seconds()
        # A clock stepped backwards refills nothing rather than draining.
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        self._tokens = min(self._capacity, self._tokens + elapsed * self._refill)

    @property
    def tokens(self) -> float:
        """The tokens available now."""
        self._update()
        return self._tokens

    @property
    def full(self) -> bool:
        """Whether the bucket is back at capacity (it then equals a new bucket)."""
        return self.tokens >= self._capacity - _EPSILON

    def take(self) -> bool:
        """
        Take one token.

        @return: C{True} when one was available (and is now used).
        """
        self._update()
        if self._tokens >= 1 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1)
            return True
        return False


class RateLimiter:
    """
    One L{TokenBucket} per key (a client IP for anonymous sessions, a user
    name for authenticated ones), with bounded memory.

    When more than C{max_keys} keys are held, full buckets are dropped (a
    full bucket is what a new key gets, so nothing is forgiven); if that is
    not enough, the least recently used buckets are dropped down to nine
    tenths of C{max_keys}, which forgives those keys their debt: the price of
    bounded memory under a flood of distinct keys.  Sweeps are thus at least
    C{max_keys / 10} new keys apart.
    """

    def __init__(self, rate: Rate | None, clock: IReactorTime, max_keys: int = 100_000) -> None:
        """
        @param rate: the per-key rate; C{None} means no limit.
        @param clock: the time source.
        @param max_keys: the most buckets kept.
        """
        self._rate = rate
        self._clock = clock
        self._max_keys = max(1, max_keys)
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        #: Told of each token taken here (L{relaygw.session.peers}).
        self.on_take: Callable[[str], None] | None = None

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str) -> bool:
        """
        Take one token (one message) for C{key}.

        @return: C{True} when the message is within the rate.
        """
        if self._rate is None:
            return True
        taken = self._bucket(key).take()
        if taken and self.on_take is not None:
            self.on_take(key)
        return taken

    def consume(self, key: str) -> None:
        """A token taken for C{key} by another receiving process."""
        if self._rate is not None:
            self._bucket(key).take()

    def _bucket(self, key: str) -> TokenBucket:
        assert self._rate is not None
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._rate, self._clock)
            if len(self._buckets) > self._max_keys:
                self._sweep(keep=key)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def _sweep(self, keep: str) -> None:
        for k in [k for k, b in self._buckets.items() if k != keep and b.full]:
            del self._buckets[k]
        target = self._max_keys * 9 // 10
        while len(self._buckets) > max(target, 1):
            oldest = next(iter(self._buckets))
            if oldest == keep:
                break
            del self._buckets[oldest]


class ConnectionCounter:
    """
    Open connections in total and per client IP, for C{max_connections} and
    C{max_connections_per_ip}.  The session factory acquires on connect and
    releases exactly once on disconnect.  The other receiving processes'
    connections (L{remote}) count against the same limits.
    """

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self._max_total = max_total
        self._max_per_ip = max_per_ip
        self._total = 0
        self._per_ip: dict[str, int] = {}
        #: Another process's connections: origin -> per IP, and their sums.
        self._remote: dict[int, dict[str, int]] = {}
        self._remote_total = 0
        self._remote_per_ip: dict[str, int] = {}
        #: Told C{("+" | "-", ip)} of each change here (L{relaygw.session.peers}).
        self.on_change: Callable[[str, str], None] | None = None

    @property
    def total(self) -> int:
        """Connections held now, by every process."""
        return self._total + self._remote_total

    def count(self, ip: str) -> int:
        """Connections held now by C{ip}, in every process."""
        return self._per_ip.get(ip, 0) + self._remote_per_ip.get(ip, 0)

    def remote(self, origin: int, ip: str, delta: int) -> None:
        """Another process (C{origin}) took (+1) or ended (-1) a connection from C{ip}."""
        held = self._remote.setdefault(origin, {})
        new = held.get(ip, 0) + delta
        if new < 0:
            return
        _adjust(held, ip, delta)
        _adjust(self._remote_per_ip, ip, delta)
        self._remote_total += delta

    def forget(self, origin: int) -> None:
        """Another process ended: its connections went with it."""
        for ip, count in self._remote.pop(origin, {}).items():
            _adjust(self._remote_per_ip, ip, -count)
            self._remote_total -= count

    def acquire(self, ip: str) -> bool:
        """
        Count a new connection from C{ip} if both limits allow it.

        @return: C{False} (and nothing counted) when a limit is reached; the
            caller then answers 421 4.3.2 instead of the banner.
        """
        held = self._per_ip.get(ip, 0)
        if (self._total + self._remote_total >= self._max_total
                or held + self._remote_per_ip.get(ip, 0) >= self._max_per_ip):
            return False
        self._total += 1
        self._per_ip[ip] = held + 1
        if self.on_change is not None:
            self.on_change("+", ip)
        return True

    def release(self, ip: str) -> None:
        """Forget one connection from C{ip}; releasing one never acquired does nothing."""
        held = self._per_ip.get(ip, 0)
        if held <= 0:
            return
        self._total -= 1
        _adjust(self._per_ip, ip, -1)
        if self.on_change is not None:
            self.on_change("-", ip)


def _adjust(counts: dict[str, int], key: str, delta: int) -> None:
    """Add C{delta} to C{counts[key]}, dropping keys that reach zero."""
    value = counts.get(key, 0) + delta
    if value > 0:
        counts[key] = value
    else:
        counts.pop(key, None)
