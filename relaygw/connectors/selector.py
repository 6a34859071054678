"""
Choosing the receive connector for a connection (SPEC section 2).

For a connection at local address L, port P, from client C, the candidates
are the enabled connectors with a binding on P whose address is L or the
wildcard of L's family; among the candidates with a remote range holding C,
the smallest matching range wins, and on equal size a binding on L itself
beats a wildcard binding.

Dual stack: a C{[::]} socket takes IPv4 clients as IPv4-mapped addresses
(C{L = ::ffff:a.b.c.d}, C{C = ::ffff:w.x.y.z}) unless a C{0.0.0.0} binding
shares its port.  C is always matched as IPv4; L matches a binding on its
IPv4 form exactly, and the C{[::]} wildcard is a candidate for it.  For the
same reason C{[::]} is a candidate for a plain IPv4 L when no C{0.0.0.0}
binding shares the port (the answer then does not depend on how L is
written, e.g. by C{relaygw which-connector}).

Pure: no Twisted, no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from attrs import frozen
from zope.interface import implementer

from relaygw.config._model import Binding, Connector, IPRange
from relaygw.connectors.ranges import IntervalTree, address_key
from relaygw.interfaces import IConnectorSelector

__all__ = ["Candidate", "Conflict", "ConnectorSelector", "Selection", "find_conflicts"]

# (binding version, binding address, port, client version)
_TreeKey = tuple[int, int, int, int]
# (connector position, range index)
_Entry = tuple[int, int]


@frozen
class Candidate:
    """
    A connector whose range holds the client, with the range that matched.

    @ivar connector: the connector.
    @ivar range: its smallest range holding the client.
    @ivar exact_binding: C{True} when it is bound to the local address
        itself, C{False} when only through the wildcard of the family.
    """

    connector: Connector
    range: IPRange
    exact_binding: bool


@frozen
class Selection:
    """
    The connector chosen for a connection.

    @ivar connector: the winner.
    @ivar range: the winner's smallest range holding the client.
    @ivar beaten: the other candidates whose ranges hold the client, best first.
    """

    connector: Connector
    range: IPRange
    beaten: tuple[Candidate, ...]


@frozen
class Conflict:
    """
    Two connectors on one binding with overlapping ranges of one size.

    @ivar connector_index: position of the later of the two connectors.
    @ivar range_index: position of the offending range in its C{remote_ranges}.
    @ivar problem: the SPEC-style message naming the earlier connector's range.
    """

    connector_index: int
    range_index: int
    problem: str


def _binding_key(binding: Binding) -> tuple[int, int, int]:
    version, value = address_key(binding.host)
    return version, value, binding.port


@implementer(IConnectorSelector)
class ConnectorSelector:
    """
    Chooses the receive connector through one interval tree per binding and
    client IP version, built once at construction.

    A lookup costs M{O(log n + k)} for C{n} ranges on the bindings that are
    candidates and C{k} ranges holding the client.
    """

    def __init__(self, connectors: Sequence[Connector]) -> None:
        """
        @param connectors: the configured connectors in file order; disabled
            ones are ignored.
        """
        self._connectors = tuple(connectors)
        on_binding: dict[tuple[int, int, int], list[int]] = {}
        for position, connector in enumerate(self._connectors):
            if connector.enabled:
                for key in {_binding_key(b) for b in connector.bindings}:
                    on_binding.setdefault(key, []).append(position)
        self._bound = frozenset(on_binding)
        # Bindings served by the same connectors (typically 0.0.0.0:P and
        # [::]:P of one connector) share their trees.
        shared: dict[tuple[int, ...], dict[int, IntervalTree[_Entry]]] = {}
        self._trees: dict[_TreeKey, IntervalTree[_Entry]] = {}
        for (version, value, port), positions in on_binding.items():
            per_version = shared.get(tuple(positions))
            if per_version is None:
                per_version = shared[tuple(positions)] = self._build(positions)
            for client_version, tree in per_version.items():
                self._trees[version, value, port, client_version] = tree

    def _build(self, positions: list[int]) -> dict[int, IntervalTree[_Entry]]:
        intervals: dict[int, list[tuple[int, int, _Entry]]] = {}
        for position in positions:
            for index, r in enumerate(self._connectors[position].remote_ranges):
                intervals.setdefault(r.version, []).append((r.first, r.last, (position, index)))
        return {version: IntervalTree(ivs) for version, ivs in intervals.items()}

    def _binding_keys(self, local_host: str, port: int) -> list[tuple[tuple[int, int, int], bool]]:
        """
        The bindings that may have taken a connection at C{local_host}, each
        with whether it is bound to that address itself.
        """
        version, value = address_key(local_host)
        exact = (version, value, port)
        keys = [(exact, True)]
        if version == 6:
            keys.append(((6, 0, port), False))
        else:
            mapped = ":" in local_host
            if not mapped:
                keys.append(((4, 0, port), False))
            # An IPv4 client reaches a [::] socket only when it is dual-stack,
            # that is when no 0.0.0.0 binding shares the port (SPEC section 2).
            if mapped or (4, 0, port) not in self._bound:
                keys.append(((6, 0, port), False))
        return [(key, is_exact) for key, is_exact in keys if is_exact or key != exact]

    def select(self, local_host: str, local_port: int, remote_ip: str) -> Selection | None:
        """
        Choose the connector for a connection.

        @param local_host: the local address the connection arrived at
            (IPv4-mapped IPv6 allowed).
        @param local_port: the local port.
        @param remote_ip: the client's address (IPv4-mapped IPv6 allowed; it
            is matched as IPv4).
        @return: the winner with its matching range and the candidates it
            beat, or C{None} when no candidate's range holds the client.
        @raise ValueError: C{local_host} or C{remote_ip} is not an IP address.
        """
        client_version, client = address_key(remote_ip)
        best: dict[int, tuple[int, bool, Candidate]] = {}
        for (version, value, port), exact in self._binding_keys(local_host, local_port):
            tree = self._trees.get((version, value, port, client_version))
            if tree is None:
                continue
            for position, index in tree.stab(client):
                connector = self._connectors[position]
                r = connector.remote_ranges[index]
                current = best.get(position)
                if current is None or (r.size, not exact) < current[:2]:
                    best[position] = (r.size, not exact, Candidate(connector, r, exact))
        if not best:
            return None
        ranked = sorted(best.items(), key=lambda item: (item[1][0], item[1][1], item[0]))
        winner = ranked[0][1][2]
        return Selection(
            winner.connector, winner.range, tuple(entry[2] for _, entry in ranked[1:])
        )


def _same_binding(a: Connector, b: Connector) -> Binding | None:
    # Only an identical binding (address and port, or the same wildcard) makes
    # equal sizes ambiguous: a binding on L itself beats a wildcard one.
    theirs = {_binding_key(binding) for binding in b.bindings}
    for mine in a.bindings:
        if _binding_key(mine) in theirs:
            return mine
    return None


def _problem(connectors: Sequence[Connector], earlier: _Entry, binding: Binding) -> str:
    position, index = earlier
    connector = connectors[position]
    return (
        f"overlaps connectors[{position}] ('{connector.name}') remote_ranges[{index}] "
        f"'{connector.remote_ranges[index].text}' with a range of the same size on binding "
        f"{binding}"
    )


def find_conflicts(connectors: Sequence[Connector]) -> list[Conflict]:
    """
    Find the configuration error of SPEC section 2: two different connectors
    on the same binding (identical address and port) with overlapping remote
    ranges of the same size, which would make the choice ambiguous.  A
    specific binding beside the wildcard of its port is no conflict: a
    binding on the local address itself wins on equal size.

    Disabled connectors are checked too, so that enabling one cannot make a
    valid file ambiguous.  Ranges are grouped by version and size and swept
    in address order, so the cost is M{O(n log n)} plus the conflicts found.

    @param connectors: the connectors in file order.
    @return: one L{Conflict} per conflicting pair of ranges, reported on the
        later connector's range, ordered by connector and range position.
    """
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for position, connector in enumerate(connectors):
        for index, r in enumerate(connector.remote_ranges):
            groups.setdefault((r.version, r.size), []).append((r.first, r.last, position, index))

    shared: dict[tuple[int, int], Binding | None] = {}
    found: list[tuple[int, int, int, int, str]] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort()
        # Per connector, its ranges still reaching the sweep point.  All have
        # one size, so start order is also end order and expiry is a popleft.
        active: dict[int, deque[tuple[int, int]]] = {}
        for first, last, position, index in members:
            for other in list(active):
                reaching = active[other]
                while reaching and reaching[0][0] < first:
                    reaching.popleft()
                if not reaching:
                    del active[other]
                    continue
                if other == position:
                    continue
                later, earlier = max(position, other), min(position, other)
                if (earlier, later) not in shared:
                    shared[earlier, later] = _same_binding(connectors[later], connectors[earlier])
                binding = shared[earlier, later]
                if binding is None:
                    continue
                for _, other_index in reaching:
                    if position > other:
                        mine, theirs = (position, index), (other, other_index)
                    else:
                        mine, theirs = (other, other_index), (position, index)
                    found.append((*mine, *theirs, _problem(connectors, theirs, binding)))
            active.setdefault(position, deque()).append((last, index))
    found.sort()
    return [Conflict(position, index, problem) for position, index, _, _, problem in found]
