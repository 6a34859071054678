"""
Tests for L{relaygw.connectors.selector}: SPEC section 2, "Choosing the
receive connector", and the overlapping-connector configuration error.
"""

from __future__ import annotations

import ipaddress
import random
import time

import pytest
from zope.interface.verify import verifyObject

from relaygw.config._model import Binding, Connector, IPRange
from relaygw.connectors.selector import (
    Candidate,
    Conflict,
    ConnectorSelector,
    Selection,
    find_conflicts,
)
from relaygw.interfaces import IConnectorSelector


def _range(text: str) -> IPRange:
    """An IPRange from a single address, a CIDR network or an C{a-b} range."""
    if "-" in text:
        low, high = (ipaddress.ip_address(part) for part in text.split("-"))
        return IPRange.of(low.version, int(low), int(high), text)
    network = ipaddress.ip_network(text)
    return IPRange.of(network.version, int(network[0]), int(network[-1]), text)


def _binding(text: str) -> Binding:
    host, _, port = text.rpartition(":")
    return Binding(host.strip("[]"), int(port))


def _connector(
    name: str, bindings: list[str], ranges: list[str], *, enabled: bool = True
) -> Connector:
    return Connector(
        name=name,
        bindings=tuple(_binding(b) for b in bindings),
        remote_ranges=tuple(_range(r) for r in ranges),
        fqdn="mail.example.test",
        enabled=enabled,
    )


def _name(selection: Selection | None) -> str | None:
    return None if selection is None else selection.connector.name


# -- selection ---------------------------------------------------------------


def test_provides_interface() -> None:
    """ConnectorSelector provides IConnectorSelector."""
    assert verifyObject(IConnectorSelector, ConnectorSelector([]))


def test_smallest_range_wins() -> None:
    """Among candidates holding the client, the smallest matching range wins."""
    selector = ConnectorSelector(
        [
            _connector("wide", ["0.0.0.0:25"], ["10.0.0.0/8"]),
            _connector("narrow", ["0.0.0.0:25"], ["10.1.0.0/16"]),
        ]
    )
    selection = selector.select("127.0.0.1", 25, "10.1.2.3")
    assert selection is not None
    assert (selection.connector.name, selection.range.text) == ("narrow", "10.1.0.0/16")


def test_exact_binding_beats_wildcard_on_equal_size() -> None:
    """On equal range size, a binding on the local address beats a wildcard binding."""
    connectors = [
        _connector("wildcard", ["0.0.0.0:25"], ["10.0.0.0/8"]),
        _connector("exact", ["127.0.0.2:25"], ["10.0.0.0/8"]),
    ]
    assert _name(ConnectorSelector(connectors).select("127.0.0.2", 25, "10.9.9.9")) == "exact"


def test_exact_binding_wins_whatever_the_order() -> None:
    """The exact binding wins the tie when it is listed first, too."""
    connectors = [
        _connector("exact", ["127.0.0.2:25"], ["10.0.0.0/8"]),
        _connector("wildcard", ["0.0.0.0:25"], ["10.0.0.0/8"]),
    ]
    assert _name(ConnectorSelector(connectors).select("127.0.0.2", 25, "10.9.9.9")) == "exact"


def test_smaller_range_beats_exact_binding() -> None:
    """Range size decides before binding exactness: a smaller wildcard range wins."""
    connectors = [
        _connector("exact", ["127.0.0.2:25"], ["10.0.0.0/8"]),
        _connector("wildcard", ["0.0.0.0:25"], ["10.1.0.0/16"]),
    ]
    assert _name(ConnectorSelector(connectors).select("127.0.0.2", 25, "10.1.0.1")) == "wildcard"


def test_range_bounds_are_inclusive() -> None:
    """An a-b range holds both its first and its last address, nothing beyond."""
    selector = ConnectorSelector([_connector("r", ["0.0.0.0:25"], ["127.0.0.10-127.0.0.20"])])
    clients = ("127.0.0.9", "127.0.0.10", "127.0.0.20", "127.0.0.21")
    assert [_name(selector.select("127.0.0.1", 25, ip)) for ip in clients] == [
        None,
        "r",
        "r",
        None,
    ]


def test_ipv6_client_on_ipv6_wildcard() -> None:
    """An IPv6 client on a [::] binding is matched against IPv6 ranges, smallest first."""
    selector = ConnectorSelector(
        [
            _connector("all", ["[::]:25"], ["::/0", "0.0.0.0/0"]),
            _connector("doc", ["[::]:25"], ["2001:db8::/32"]),
        ]
    )
    assert _name(selector.select("::1", 25, "2001:db8::5")) == "doc"
    assert _name(selector.select("::1", 25, "2001:db9::5")) == "all"


def test_ipv6_exact_binding_beats_wildcard() -> None:
    """An IPv6 binding on the local address beats the [::] wildcard on equal size."""
    connectors = [
        _connector("wildcard", ["[::]:25"], ["::/0"]),
        _connector("exact", ["[::1]:25"], ["::/0"]),
    ]
    assert _name(ConnectorSelector(connectors).select("::1", 25, "::1")) == "exact"


def test_ipv4_mapped_client_matches_ipv4_ranges() -> None:
    """A client arriving as ::ffff:a.b.c.d on a [::] socket is matched as IPv4."""
    selector = ConnectorSelector(
        [
            _connector("v6", ["[::]:25"], ["::/0"]),
            _connector("v4", ["[::]:25"], ["127.0.0.0/8"]),
        ]
    )
    assert _name(selector.select("::ffff:127.0.0.1", 25, "::ffff:127.0.0.5")) == "v4"


def test_ipv4_mapped_range_matches_ipv4_client() -> None:
    """A range written as IPv4-mapped IPv6 holds the plain IPv4 client too."""
    selector = ConnectorSelector([_connector("m", ["0.0.0.0:25"], ["::ffff:10.0.0.0/104"])])
    assert _name(selector.select("127.0.0.1", 25, "10.2.3.4")) == "m"


def test_ipv4_mapped_local_address_matches_ipv4_binding_exactly() -> None:
    """
    A connection at ::ffff:127.0.0.2 (dual-stack [::] socket) is on a
    127.0.0.2 binding exactly, so that binding beats the [::] wildcard.
    """
    connectors = [
        _connector("wildcard", ["[::]:25"], ["127.0.0.0/8"]),
        _connector("exact", ["127.0.0.2:25"], ["127.0.0.0/8"]),
    ]
    selection = ConnectorSelector(connectors).select("::ffff:127.0.0.2", 25, "::ffff:127.0.0.9")
    assert selection is not None
    assert selection.connector.name == "exact"
    assert [(c.connector.name, c.exact_binding) for c in selection.beaten] == [("wildcard", False)]


def test_ipv4_local_address_uses_dual_stack_wildcard() -> None:
    """
    Without a 0.0.0.0 binding on the port, [::] is dual-stack, so it is a
    candidate for a connection reported at a plain IPv4 local address.
    """
    selector = ConnectorSelector([_connector("dual", ["[::]:25"], ["127.0.0.0/8"])])
    assert _name(selector.select("127.0.0.1", 25, "127.0.0.1")) == "dual"


def test_ipv6_wildcard_is_ipv6_only_beside_ipv4_wildcard() -> None:
    """
    With a 0.0.0.0 binding on the port, [::] is IPv6-only: for an IPv4 local
    address only the 0.0.0.0 binding is a wildcard candidate.
    """
    selector = ConnectorSelector(
        [
            _connector("v4", ["0.0.0.0:25"], ["0.0.0.0/0"]),
            _connector("v6", ["[::]:25"], ["127.0.0.0/8"]),
        ]
    )
    selection = selector.select("127.0.0.1", 25, "127.0.0.1")
    assert selection is not None
    assert (selection.connector.name, selection.beaten) == ("v4", ())


def test_ipv4_wildcard_is_no_candidate_for_ipv6_local_address() -> None:
    """A 0.0.0.0 binding does not take a connection at an IPv6 local address."""
    selector = ConnectorSelector([_connector("v4", ["0.0.0.0:25"], ["::/0", "0.0.0.0/0"])])
    assert selector.select("::1", 25, "::1") is None


def test_dual_bindings_serve_both_families_separately() -> None:
    """
    A connector on 0.0.0.0:25 and [::]:25 takes IPv4 and IPv6 clients, and a
    connector only on [::]:25 is no candidate for the IPv4 socket.
    """
    selector = ConnectorSelector(
        [
            _connector("both", ["0.0.0.0:25", "[::]:25"], ["0.0.0.0/0", "::/0"]),
            _connector("v6only", ["[::]:25"], ["127.0.0.0/8", "::1"]),
        ]
    )
    assert [
        _name(selector.select("127.0.0.1", 25, "127.0.0.1")),
        _name(selector.select("::1", 25, "::1")),
        _name(selector.select("::1", 25, "2001:db8::1")),
    ] == ["both", "v6only", "both"]


def test_disabled_connector_ignored() -> None:
    """A disabled connector is never a candidate, however small its range."""
    selector = ConnectorSelector(
        [
            _connector("on", ["0.0.0.0:25"], ["0.0.0.0/0"]),
            _connector("off", ["0.0.0.0:25"], ["127.0.0.1"], enabled=False),
        ]
    )
    selection = selector.select("127.0.0.1", 25, "127.0.0.1")
    assert selection is not None
    assert (selection.connector.name, selection.beaten) == ("on", ())


def test_other_port_ignored() -> None:
    """A connector bound to another port is not a candidate."""
    selector = ConnectorSelector(
        [
            _connector("smtp", ["0.0.0.0:25"], ["0.0.0.0/0"]),
            _connector("submission", ["0.0.0.0:587"], ["127.0.0.1"]),
        ]
    )
    assert _name(selector.select("127.0.0.1", 25, "127.0.0.1")) == "smtp"
    assert _name(selector.select("127.0.0.1", 2525, "127.0.0.1")) is None


def test_other_specific_address_ignored() -> None:
    """A connector bound to another specific address on the port is not a candidate."""
    selector = ConnectorSelector([_connector("other", ["127.0.0.3:25"], ["0.0.0.0/0"])])
    assert selector.select("127.0.0.2", 25, "127.0.0.1") is None


def test_no_candidate_range_holds_client() -> None:
    """When no candidate's range holds the client, there is no selection."""
    selector = ConnectorSelector([_connector("lan", ["0.0.0.0:25"], ["10.0.0.0/8"])])
    assert selector.select("127.0.0.1", 25, "192.0.2.1") is None


def test_no_connectors() -> None:
    """With no connectors at all there is no selection."""
    assert ConnectorSelector([]).select("127.0.0.1", 25, "127.0.0.1") is None


def test_beaten_lists_each_loser_with_its_smallest_range() -> None:
    """
    The selection lists every other candidate holding the client once, best
    first, with its smallest matching range and whether its binding was exact;
    a candidate whose ranges miss the client is not listed.
    """
    connectors = [
        _connector("default", ["0.0.0.0:25"], ["0.0.0.0/0", "127.0.0.0/8"]),
        _connector("relay", ["127.0.0.1:25"], ["127.0.0.0/16"]),
        _connector("device", ["0.0.0.0:25"], ["127.0.0.7"]),
        _connector("elsewhere", ["0.0.0.0:25"], ["10.0.0.0/8"]),
    ]
    selection = ConnectorSelector(connectors).select("127.0.0.1", 25, "127.0.0.7")
    assert selection is not None
    assert (selection.connector.name, selection.range.text) == ("device", "127.0.0.7")
    assert selection.beaten == (
        Candidate(connectors[1], connectors[1].remote_ranges[0], True),
        Candidate(connectors[0], connectors[0].remote_ranges[1], False),
    )


def test_connector_bound_exactly_and_by_wildcard_counts_as_exact() -> None:
    """A connector with both the local address and the wildcard as bindings is exact."""
    connectors = [
        _connector("both", ["0.0.0.0:25", "127.0.0.1:25"], ["0.0.0.0/0"]),
        _connector("wild", ["0.0.0.0:25"], ["0.0.0.0/0"]),
    ]
    selection = ConnectorSelector(connectors).select("127.0.0.1", 25, "127.0.0.9")
    assert selection is not None
    assert (selection.connector.name, [c.connector.name for c in selection.beaten]) == (
        "both",
        ["wild"],
    )


def test_invalid_remote_address_raises() -> None:
    """A remote address that is not an IP address raises ValueError."""
    selector = ConnectorSelector([_connector("all", ["0.0.0.0:25"], ["0.0.0.0/0"])])
    with pytest.raises(ValueError):
        selector.select("127.0.0.1", 25, "not-an-ip")


def _many_connectors(n: int, rng: random.Random) -> list[Connector]:
    """Three connectors on 0.0.0.0:25 sharing n distinct /28 networks of 10.0.0.0/8."""
    blocks = rng.sample(range(1 << 20), n)
    ranges: list[list[IPRange]] = [[], [], []]
    for i, block in enumerate(blocks):
        first = (10 << 24) + (block << 4)
        ranges[i % 3].append(IPRange(4, first, first + 15, f"block{i}"))
    return [
        Connector(f"c{i}", (Binding("0.0.0.0", 25),), tuple(rs), "mail.example.test")
        for i, rs in enumerate(ranges)
    ]


def test_hundred_thousand_ranges_build_and_select() -> None:
    """
    A selector over 100,000 ranges is built in well under 20 seconds and
    chooses the connector owning the range that holds the client.
    """
    connectors = _many_connectors(100_000, random.Random(4))
    started = time.perf_counter()
    selector = ConnectorSelector(connectors)
    assert time.perf_counter() - started < 20
    owner = connectors[1]
    target = owner.remote_ranges[1234]
    client = str(ipaddress.IPv4Address(target.first + 3))
    selection = selector.select("127.0.0.1", 25, client)
    assert selection is not None
    assert (selection.connector, selection.range) == (owner, target)


# -- conflicts ---------------------------------------------------------------


def test_conflict_same_size_overlap_on_same_binding() -> None:
    """Same-size overlapping ranges of two connectors on one binding are a conflict."""
    connectors = [
        _connector("Default Frontend", ["0.0.0.0:25"], ["0.0.0.0/0", "10.0.0.0/8"]),
        _connector("Relay", ["0.0.0.0:25"], ["192.168.0.0/16", "10.0.0.0/8"]),
    ]
    assert find_conflicts(connectors) == [
        Conflict(
            1,
            1,
            "overlaps connectors[0] ('Default Frontend') remote_ranges[1] '10.0.0.0/8' "
            "with a range of the same size on binding 0.0.0.0:25",
        )
    ]


def test_conflict_partial_overlap_of_a_b_ranges() -> None:
    """Same-size a-b ranges that only partly overlap are a conflict too."""
    connectors = [
        _connector("a", ["0.0.0.0:25"], ["10.0.0.0-10.0.0.9"]),
        _connector("b", ["0.0.0.0:25"], ["10.0.0.9-10.0.0.18"]),
    ]
    assert [(c.connector_index, c.range_index) for c in find_conflicts(connectors)] == [(1, 0)]


def test_no_conflict_specific_binding_beside_wildcard() -> None:
    """
    Issue 6: equal ranges on 0.0.0.0:P and 127.0.0.2:P are valid; the
    binding on the local address itself wins, the wildcard serves the rest.
    """
    connectors = [
        _connector("Any", ["0.0.0.0:25"], ["127.0.0.0/8"]),
        _connector("Lo2", ["127.0.0.2:25"], ["127.0.0.0/8"]),
    ]
    assert find_conflicts(connectors) == []
    selector = ConnectorSelector(connectors)
    assert _name(selector.select("127.0.0.2", 25, "127.0.0.9")) == "Lo2"
    assert _name(selector.select("127.0.0.1", 25, "127.0.0.9")) == "Any"


def test_no_conflict_specific_binding_beside_dual_stack_wildcard() -> None:
    """A dual-stack [::]:P beside 127.0.0.2:P with equal ranges is valid too."""
    connectors = [
        _connector("Any", ["[::]:25"], ["127.0.0.0/8"]),
        _connector("Lo2", ["127.0.0.2:25"], ["127.0.0.0/8"]),
    ]
    assert find_conflicts(connectors) == []
    selector = ConnectorSelector(connectors)
    assert _name(selector.select("::ffff:127.0.0.2", 25, "::ffff:127.0.0.9")) == "Lo2"
    assert _name(selector.select("::ffff:127.0.0.1", 25, "::ffff:127.0.0.9")) == "Any"


def test_conflict_on_identical_specific_binding() -> None:
    """Two connectors on the same specific address and port conflict; the message names it."""
    connectors = [
        _connector("front", ["0.0.0.0:25", "127.0.0.1:25"], ["10.0.0.0/8"]),
        _connector("local", ["127.0.0.1:25"], ["10.0.0.0/8"]),
    ]
    assert [c.problem for c in find_conflicts(connectors)] == [
        "overlaps connectors[0] ('front') remote_ranges[0] '10.0.0.0/8' with a range of "
        "the same size on binding 127.0.0.1:25"
    ]


def test_conflict_points_at_later_connector() -> None:
    """The conflict is reported once, on the later connector, even when its range sorts first."""
    connectors = [
        _connector("first", ["0.0.0.0:25"], ["10.0.0.5-10.0.0.14"]),
        _connector("second", ["0.0.0.0:25"], ["10.0.0.0-10.0.0.9"]),
    ]
    conflicts = find_conflicts(connectors)
    assert [(c.connector_index, c.range_index) for c in conflicts] == [(1, 0)]
    assert "connectors[0] ('first') remote_ranges[0]" in conflicts[0].problem


def test_conflict_ipv6() -> None:
    """Same-size overlapping IPv6 ranges on a shared [::] binding are a conflict."""
    connectors = [
        _connector("a", ["[::]:25"], ["2001:db8::/32"]),
        _connector("b", ["[::]:25"], ["2001:db8::/32"]),
    ]
    assert [c.problem for c in find_conflicts(connectors)] == [
        "overlaps connectors[0] ('a') remote_ranges[0] '2001:db8::/32' with a range of "
        "the same size on binding [::]:25"
    ]


def test_no_conflict_different_sizes() -> None:
    """Overlapping ranges of different sizes are the normal specific-beats-general case."""
    connectors = [
        _connector("a", ["0.0.0.0:25"], ["10.0.0.0/8"]),
        _connector("b", ["0.0.0.0:25"], ["10.0.0.0/9"]),
    ]
    assert find_conflicts(connectors) == []


def test_no_conflict_adjacent_same_size() -> None:
    """Same-size ranges that touch but do not overlap are no conflict."""
    connectors = [
        _connector("a", ["0.0.0.0:25"], ["10.0.0.0/24"]),
        _connector("b", ["0.0.0.0:25"], ["10.0.1.0/24"]),
    ]
    assert find_conflicts(connectors) == []


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:25", "127.0.0.2:25"),
        ("0.0.0.0:25", "0.0.0.0:587"),
        ("0.0.0.0:25", "[::]:25"),
    ],
)
def test_no_conflict_without_shared_binding(first: str, second: str) -> None:
    """Same ranges on bindings that are not shared are no conflict."""
    connectors = [
        _connector("a", [first], ["10.0.0.0/8"]),
        _connector("b", [second], ["10.0.0.0/8"]),
    ]
    assert find_conflicts(connectors) == []


def test_no_conflict_within_one_connector() -> None:
    """One connector's own overlapping ranges are no conflict."""
    connectors = [_connector("a", ["0.0.0.0:25"], ["10.0.0.0/8", "10.0.0.0/8"])]
    assert find_conflicts(connectors) == []


def test_conflict_with_disabled_connector() -> None:
    """A disabled connector is checked too, so enabling it cannot make the file ambiguous."""
    connectors = [
        _connector("a", ["0.0.0.0:25"], ["10.0.0.0/8"]),
        _connector("b", ["0.0.0.0:25"], ["10.0.0.0/8"], enabled=False),
    ]
    assert [c.connector_index for c in find_conflicts(connectors)] == [1]


def test_each_conflicting_pair_reported_once() -> None:
    """Every conflicting pair of ranges gives exactly one Conflict."""
    connectors = [
        _connector("a", ["0.0.0.0:25"], ["10.0.0.0/24", "10.0.1.0/24"]),
        _connector("b", ["0.0.0.0:25"], ["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24"]),
        _connector("c", ["0.0.0.0:25"], ["10.0.1.0/24"]),
    ]
    assert [(c.connector_index, c.range_index) for c in find_conflicts(connectors)] == [
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 0),
    ]


def test_conflicts_among_hundred_thousand_ranges() -> None:
    """
    Checking 100,000 ranges takes well under 20 seconds (no pairwise
    comparison) and finds exactly the one conflict planted among them.
    """
    connectors = _many_connectors(100_000, random.Random(5))
    planted = connectors[0].remote_ranges[500]
    connectors[2] = Connector(
        "c2",
        connectors[2].bindings,
        connectors[2].remote_ranges + (IPRange(4, planted.first, planted.last, "copy"),),
        "mail.example.test",
    )
    started = time.perf_counter()
    conflicts = find_conflicts(connectors)
    assert time.perf_counter() - started < 20
    assert [(c.connector_index, c.range_index) for c in conflicts] == [
        (2, len(connectors[2].remote_ranges) - 1)
    ]
