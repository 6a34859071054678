"""
Tests for L{relaygw.connectors.ranges}: address keys and the interval tree.
"""

from __future__ import annotations

import ipaddress
import math
import random

import pytest

from relaygw.config._model import normalise_address
from relaygw.connectors.ranges import IntervalTree, address_key


def test_address_key_ipv4() -> None:
    """An IPv4 address keys as version 4 and its integer value."""
    assert address_key("10.0.0.1") == (4, 0x0A000001)


def test_address_key_ipv6() -> None:
    """An IPv6 address keys as version 6 and its integer value."""
    assert address_key("2001:db8::1") == (6, 0x20010DB8 << 96 | 1)


def test_address_key_ipv4_mapped_is_ipv4() -> None:
    """An IPv4-mapped IPv6 address keys as the IPv4 address it carries."""
    assert address_key("::ffff:192.0.2.7") == address_key("192.0.2.7")


def test_address_key_ignores_zone() -> None:
    """An IPv6 zone does not change the key."""
    assert address_key("fe80::1%eth0") == address_key("fe80::1")


def test_address_key_rejects_non_address() -> None:
    """Text that is not an IP address raises ValueError."""
    with pytest.raises(ValueError):
        address_key("192.168.0.300")


@pytest.mark.parametrize(
    "text",
    [
        "1.2.3",
        "01.2.3.4",
        " 1.2.3.4",
        "1.2.3.4%x",
        "0x1.2.3.4",
        "::ffff:01.2.3.4",
        "1.2.3.4\x00",
        "",
    ],
)
def test_address_key_rejects_what_ipaddress_rejects(text: str) -> None:
    """Forms the ipaddress module refuses (short, octal, padded, zoned IPv4) are refused too."""
    with pytest.raises(ValueError):
        ipaddress.ip_address(text)
    with pytest.raises(ValueError):
        address_key(text)


def test_address_key_agrees_with_ipaddress() -> None:
    """For random IPv4, IPv6 and IPv4-mapped addresses the key is ipaddress's normalised value."""
    rng = random.Random(0)
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for _ in range(300):
        addresses.append(ipaddress.IPv4Address(rng.randrange(1 << 32)))
        addresses.append(ipaddress.IPv6Address(rng.randrange(1 << 128)))
        addresses.append(ipaddress.IPv6Address(0xFFFF_0000_0000 + rng.randrange(1 << 32)))
    for address in addresses:
        expected = normalise_address(address)
        assert address_key(str(address)) == (expected.version, int(expected))
        assert address_key(address.exploded) == (expected.version, int(expected))


def _brute(intervals: list[tuple[int, int, int]], point: int) -> list[int]:
    return sorted(item for first, last, item in intervals if first <= point <= last)


def test_stab_matches_brute_force() -> None:
    """A stabbing query returns exactly the intervals holding the point, endpoints included."""
    rng = random.Random(1)
    intervals = []
    for item in range(500):
        first = rng.randrange(0, 10_000)
        intervals.append((first, first + rng.randrange(0, 400), item))
    tree = IntervalTree(intervals)
    points = [rng.randrange(-5, 10_500) for _ in range(2000)]
    points += [iv[0] for iv in intervals] + [iv[1] for iv in intervals]
    for point in points:
        assert sorted(tree.stab(point)) == _brute(intervals, point)


def test_stab_counted_gives_same_items() -> None:
    """The counting query finds the same items as the plain one."""
    tree = IntervalTree([(0, 10, "a"), (5, 15, "b"), (20, 30, "c")])
    assert sorted(tree.stab_counted(7)[0]) == sorted(tree.stab(7)) == ["a", "b"]


def test_empty_tree_finds_nothing() -> None:
    """An empty tree answers every query with nothing."""
    tree: IntervalTree[str] = IntervalTree([])
    assert (tree.stab(3), len(tree), tree.depth) == ([], 0, 0)


def test_rejects_reversed_interval() -> None:
    """An interval that ends before it starts is refused."""
    with pytest.raises(ValueError):
        IntervalTree([(5, 4, "x")])


def test_depth_is_logarithmic() -> None:
    """The tree over n intervals is at most floor(log2 n) + 1 nodes deep."""
    rng = random.Random(2)
    n = 10_000
    intervals = []
    for item in range(n):
        first = rng.randrange(0, 1 << 32)
        intervals.append((first, first + rng.randrange(0, 1 << 16), item))
    assert IntervalTree(intervals).depth <= math.floor(math.log2(n)) + 1


def _disjoint(n: int, rng: random.Random) -> list[tuple[int, int, int]]:
    starts = sorted(rng.sample(range(0, 1 << 32, 256), n))
    return [(s, s + rng.randrange(0, 256), i) for i, s in enumerate(starts)]


def test_query_work_grows_logarithmically() -> None:
    """
    For 10, 1,000 and 100,000 ranges, the nodes visited plus entries read by
    a query stay within 2 (floor(log2 n) + 1) beyond the matches found, so
    the work grows with log n and not with n.
    """
    rng = random.Random(3)
    worst: dict[int, int] = {}
    for n in (10, 1_000, 100_000):
        tree = IntervalTree(_disjoint(n, rng))
        bound = 2 * (math.floor(math.log2(n)) + 1)
        worst[n] = 0
        for _ in range(2_000):
            found, steps = tree.stab_counted(rng.randrange(0, 1 << 32))
            assert steps - len(found) <= bound
            worst[n] = max(worst[n], steps)
    assert worst[100_000] / worst[10] <= 2 * math.log2(100_000) / math.log2(10)
