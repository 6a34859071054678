"""
Addresses as integers and a static interval tree over integer intervals.

Receive connectors are chosen by which of their address ranges hold the
client's address (SPEC section 2, "Choosing the receive connector").  Ranges
are already integers in L{relaygw.config.IPRange}; this module turns textual
addresses into the same integer keys (IPv4-mapped IPv6 folded into IPv4) and
answers "which intervals contain this point" without looking at every range.

Pure: no Twisted, no I/O.
"""

from __future__ import annotations

import socket
from bisect import bisect_right
from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = ["IntervalTree", "address_key"]

_V4_MAPPED_FIRST = 0xFFFF_0000_0000
_V4_MAPPED_LAST = 0xFFFF_FFFF_FFFF

_T = TypeVar("_T")


def address_key(ip: str) -> tuple[int, int]:
    """
    The lookup key of an address: its IP version and its value as an integer.

    IPv4-mapped IPv6 addresses (C{::ffff:a.b.c.d}) give the key of the IPv4
    address, so they match the same ranges as the plain IPv4 address.  An
    IPv6 zone (C{fe80::1%eth0}) is ignored.  Parsing uses C{inet_pton} (no
    I/O) because the pure-Python L{ipaddress} parser would cost more than
    the whole tree lookup.

    @param ip: an IPv4 or IPv6 address as text.
    @return: C{(version, integer)}.
    @raise ValueError: C{ip} is not an IP address.
    """
    try:
        if ":" in ip:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip.partition("%")[0]))
            if _V4_MAPPED_FIRST <= value <= _V4_MAPPED_LAST:
                return 4, value - _V4_MAPPED_FIRST
            return 6, value
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip))
    except (OSError, TypeError):
        raise ValueError(f"{ip!r} is not an IP address") from None


class _Node(Generic[_T]):
    """
    One node of a centered interval tree.

    Every interval stored here contains C{center}.  C{by_start} lists them by
    ascending start and C{by_end} by descending end, so a query point on one
    side of the center only reads the entries that contain it, plus one.
    """

    __slots__ = ("center", "by_start", "by_end", "left", "right")

    def __init__(
        self,
        center: int,
        by_start: list[tuple[int, int, _T]],
        by_end: list[tuple[int, int, _T]],
        left: _Node[_T] | None,
        right: _Node[_T] | None,
    ) -> None:
        self.center = center
        self.by_start = by_start
        self.by_end = by_end
        self.left = left
        self.right = right


def _first(interval: tuple[int, int, object]) -> int:
    return interval[0]


def _last(interval: tuple[int, int, object]) -> int:
    return interval[1]


def _build(intervals: list[tuple[int, int, _T]]) -> _Node[_T] | None:
    """
    Build the subtree for C{intervals}, which are sorted by start.

    The center is the start of the median interval: the intervals wholly
    after it are the tail of the list past the median and those wholly
    before it lie before the median, so each child holds at most half of
    them and the depth is at most M{log2(n) + 1}.
    """
    if not intervals:
        return None
    center = intervals[len(intervals) // 2][0]
    split = bisect_right(intervals, center, key=_first)
    left: list[tuple[int, int, _T]] = []
    here: list[tuple[int, int, _T]] = []
    for iv in intervals[:split]:
        (left if iv[1] < center else here).append(iv)
    by_end = here if len(here) == 1 else sorted(here, key=_last, reverse=True)
    return _Node(center, here, by_end, _build(left), _build(intervals[split:]))


class IntervalTree(Generic[_T]):
    """
    A centered interval tree, built once, over inclusive integer intervals.

    Construction sorts the intervals once and costs M{O(n log n)}; a stabbing
    query walks one root-to-leaf path and costs M{O(log n + k)} for C{k}
    intervals found.  The tree is immutable after construction.
    """

    def __init__(self, intervals: Iterable[tuple[int, int, _T]]) -> None:
        """
        @param intervals: C{(first, last, item)} triples with C{first <= last};
            C{item} is what L{stab} returns for a matching interval.
        @raise ValueError: an interval ends before it starts.
        """
        ordered = sorted(intervals, key=_first)
        for first, last, _ in ordered:
            if last < first:
                raise ValueError(f"interval {first}-{last} ends before it starts")
        self._size = len(ordered)
        self._root = _build(ordered)

    def __len__(self) -> int:
        return self._size

    def stab(self, point: int) -> list[_T]:
        """
        The items of every interval containing C{point}, in no particular order.
        """
        return self.stab_counted(point)[0]

    def stab_counted(self, point: int) -> tuple[list[_T], int]:
        """
        Like L{stab}, also giving the work done: the number of tree nodes
        visited plus the number of node entries read.  Deterministic, so tests
        can check the logarithmic bound without timing anything.

        @return: C{(items, steps)}.
        """
        found: list[_T] = []
        steps = 0
        node = self._root
        while node is not None:
            steps += 1
            if point < node.center:
                for first, _, item in node.by_start:
                    steps += 1
                    if first > point:
                        break
                    found.append(item)
                node = node.left
            elif point > node.center:
                for _, last, item in node.by_end:
                    steps += 1
                    if last < point:
                        break
                    found.append(item)
                node = node.right
            else:
                steps += len(node.by_start)
                found.extend(item for _, _, item in node.by_start)
                break
        return found, steps

    @property
    def depth(self) -> int:
        """The number of nodes on the longest root-to-leaf path (0 when empty)."""
        deepest = 0
        stack: list[tuple[_Node[_T] | None, int]] = [(self._root, 1)]
        while stack:
            node, level = stack.pop()
            if node is not None:
                deepest = max(deepest, level)
                stack.append((node.left, level + 1))
                stack.append((node.right, level + 1))
        return deepest
