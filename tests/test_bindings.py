"""
Tests for L{relaygw.listen.bindings}: which sockets a configuration listens on.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from relaygw.config._model import Binding, Connector, IPRange
from relaygw.listen.bindings import ListenError, ListenSocket, listen_on, plan_sockets

_ALL_V4 = IPRange(4, 0, 2**32 - 1, "0.0.0.0/0")


def _connector(name: str, *bindings: str, enabled: bool = True) -> Connector:
    parsed = []
    for text in bindings:
        host, _, port = text.rpartition(":")
        parsed.append(Binding(host.strip("[]"), int(port)))
    return Connector(
        name=name,
        bindings=tuple(parsed),
        remote_ranges=(_ALL_V4,),
        fqdn="mx.example.test",
        enabled=enabled,
    )


def _bound(plans: tuple[ListenSocket, ...]) -> list[str]:
    return [str(p.binding) for p in plans]


class PlanTests(SynchronousTestCase):
    def test_one_socket_per_distinct_binding(self) -> None:
        """
        Distinct specific bindings each get a socket; a binding named by two
        connectors gets one socket serving both.
        """
        plans = plan_sockets(
            [
                _connector("A", "127.0.0.1:2525", "127.0.0.2:2525"),
                _connector("B", "127.0.0.1:2525", "127.0.0.1:5870"),
            ]
        )
        self.assertEqual(_bound(plans), ["127.0.0.1:2525", "127.0.0.2:2525", "127.0.0.1:5870"])
        self.assertEqual(plans[0].connectors, ("A", "B"))

    def test_wildcard_covers_specific_of_same_family(self) -> None:
        """
        A 0.0.0.0 binding on a port covers 127.0.0.1 on that port (one
        socket) but not 127.0.0.1 on another port.
        """
        plans = plan_sockets(
            [
                _connector("Default", "0.0.0.0:25"),
                _connector("Printers", "127.0.0.1:25", "127.0.0.1:26"),
            ]
        )
        self.assertEqual(_bound(plans), ["0.0.0.0:25", "127.0.0.1:26"])
        self.assertEqual(
            plans[0].covers, (Binding("0.0.0.0", 25), Binding("127.0.0.1", 25))
        )
        self.assertEqual(plans[0].connectors, ("Default", "Printers"))

    def test_v4_wildcard_does_not_cover_v6_specific(self) -> None:
        """A 0.0.0.0 binding does not cover [::1] on the same port."""
        plans = plan_sockets([_connector("A", "0.0.0.0:25", "[::1]:25")])
        self.assertEqual(_bound(plans), ["0.0.0.0:25", "[::1]:25"])
        self.assertTrue(plans[1].v6only)

    def test_v6_wildcard_alone_is_dual_stack(self) -> None:
        """
        [::] without 0.0.0.0 on its port is dual-stack, and covers the IPv4
        specific bindings of that port too (the kernel would refuse them
        next to a dual-stack wildcard).
        """
        plans = plan_sockets([_connector("A", "[::]:25", "127.0.0.1:25", "[::1]:25")])
        self.assertEqual(_bound(plans), ["[::]:25"])
        self.assertFalse(plans[0].v6only)
        self.assertEqual(
            set(plans[0].covers),
            {Binding("::", 25), Binding("127.0.0.1", 25), Binding("::1", 25)},
        )

    def test_v6_wildcard_with_v4_wildcard_is_v6only(self) -> None:
        """
        [::] is IPv6-only when 0.0.0.0 shares its port, and then IPv4
        bindings belong to the 0.0.0.0 socket.
        """
        plans = plan_sockets(
            [_connector("A", "0.0.0.0:25", "[::]:25"), _connector("B", "127.0.0.1:25")]
        )
        self.assertEqual(_bound(plans), ["0.0.0.0:25", "[::]:25"])
        v4, v6 = plans
        self.assertTrue(v6.v6only)
        self.assertEqual(v4.connectors, ("A", "B"))
        self.assertEqual(v6.connectors, ("A",))

    def test_v6only_decided_per_port(self) -> None:
        """0.0.0.0 on port 25 does not make [::] on port 587 IPv6-only."""
        plans = plan_sockets([_connector("A", "0.0.0.0:25", "[::]:587")])
        self.assertEqual(_bound(plans), ["0.0.0.0:25", "[::]:587"])
        self.assertFalse(plans[1].v6only)

    def test_disabled_connectors_are_not_listened_for(self) -> None:
        """A binding only a disabled connector names gets no socket."""
        plans = plan_sockets(
            [_connector("On", "127.0.0.1:25"), _connector("Off", "127.0.0.1:26", enabled=False)]
        )
        self.assertEqual(_bound(plans), ["127.0.0.1:25"])


class ListenTests(SynchronousTestCase):
    def test_ipv4_goes_through_listen_tcp(self) -> None:
        """An IPv4 socket is opened with the reactor's listenTCP on its address."""
        reactor = MemoryReactor()
        plan = plan_sockets([_connector("A", "127.0.0.1:2525")])[0]
        listen_on(reactor, plan, ServerFactory.forProtocol(Protocol))
        port, _, _, interface = reactor.tcpServers[0]
        self.assertEqual((port, interface), (2525, "127.0.0.1"))


def _free_port(family: socket.AddressFamily, host: str) -> int:
    with socket.socket(family) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _has_ipv6_loopback() -> bool:
    try:
        _free_port(socket.AF_INET6, "::1")
    except OSError:
        return False
    return True


def test_listen_failure_names_the_binding() -> None:
    """
    When the port is taken, listen_on raises ListenError whose message names
    the binding and its connectors.
    """
    from twisted.internet import reactor

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        plan = plan_sockets([_connector("Busy", f"127.0.0.1:{port}")])[0]
        with pytest.raises(ListenError) as caught:
            listen_on(reactor, plan, ServerFactory.forProtocol(Protocol))  # type: ignore[arg-type]
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "Busy" in message


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")
@pytest.mark.parametrize("v6only", [True, False])
def test_ipv6_socket_sets_v6only_as_planned(v6only: bool) -> None:
    """
    An IPv6 socket carries IPV6_V6ONLY exactly as planned, whatever the
    host's default.
    """
    from relaygw.listen.bindings import _IPv6Port

    port = _IPv6Port(0, ServerFactory.forProtocol(Protocol), 5, "::", MemoryReactor(), v6only)
    with port.createInternetSocket() as sock:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == int(v6only)
