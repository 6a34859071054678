"""
Tests for L{relaygw.listen.proxy} (and its header parser): the PROXY
protocol in front of real sessions (L{tests.fakes.Harness}) over
L{StringTransport}, with time on a L{MemoryReactorClock}.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from relaygw.config._units import parse_binding, parse_range
from relaygw.connectors.selector import ConnectorSelector
from relaygw.listen.proxy import (
    HEADER_TIMEOUT,
    HeaderError,
    ProxiedConnection,
    ProxyFactory,
    ProxyHeader,
    ProxyRules,
    parse_header,
)
from relaygw.session.protocol import Session
from tests.fakes import Harness, TLSStringTransport, make_config, make_connector, reply_lines

PROXY_IP = "127.0.0.9"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int = 1, family: int = 0x11, addresses: bytes = b"", tlv: bytes = b"") -> bytes:
    """A PROXY v2 header: C{command} 1 = PROXY, 0 = LOCAL; C{family} 0x11 = TCP4, 0x21 = TCP6."""
    payload = addresses + tlv
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(payload)) + payload


def v2_tcp4(src: str, dst: str, sport: int, dport: int, tlv: bytes = b"") -> bytes:
    addresses = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return v2(1, 0x11, addresses, tlv)


def v2_tcp6(src: str, dst: str, sport: int, dport: int) -> bytes:
    addresses = (
        socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + struct.pack("!HH", sport, dport)
    )
    return v2(1, 0x21, addresses)


def proxied_connectors(**proxy: Any) -> tuple[Any, ...]:
    """
    Connectors on 127.0.0.1:2525 behind a proxy at 127.0.0.9, each with its
    own banner, plus one on 127.0.0.1:2526 without the PROXY protocol.
    """
    settings: dict[str, Any] = {
        "proxy_protocol": True,
        "trusted_proxies": (parse_range(PROXY_IP),),
    }
    settings.update(proxy)
    return (
        make_connector(
            name="Wide", banner="wide",
            remote_ranges=(parse_range("0.0.0.0/0"), parse_range("::/0")), **settings,
        ),
        make_connector(name="Client", banner="client", remote_ranges=(parse_range("192.0.2.10"),),
                       **settings),
        make_connector(name="Six", banner="six", remote_ranges=(parse_range("2001:db8::7"),),
                       **settings),
        make_connector(name="Proxy", banner="proxy itself",
                       remote_ranges=(parse_range(PROXY_IP),), **settings),
        make_connector(name="Direct", banner="direct", bindings=(parse_binding("127.0.0.1:2526"),)),
    )


class ProxyHarness:
    """A L{Harness} whose sessions are built through a L{ProxyFactory}."""

    def __init__(self, *connectors: Any) -> None:
        self.harness = Harness(*(connectors or proxied_connectors()))
        self.reactor = self.harness.reactor
        factory = self.harness.factory
        self.factory = ProxyFactory(factory, lambda: factory.config, self.reactor)

    def connect(
        self, peer: str = PROXY_IP, port: int = 2525, local: str = "127.0.0.1"
    ) -> tuple[Any, TLSStringTransport]:
        """A connection from C{peer} to C{local:port}: its protocol and transport."""
        family = IPv6Address if ":" in peer else IPv4Address
        local_family = IPv6Address if ":" in local else IPv4Address
        transport = TLSStringTransport(
            hostAddress=local_family("TCP", local, port), peerAddress=family("TCP", peer, 50000)
        )
        protocol = self.factory.buildProtocol(transport.getPeer())
        assert protocol is not None
        protocol.makeConnection(transport)
        return protocol, transport


class _TLSLayer:
    """What C{startTLS} puts between a TCP transport and its protocol: records what it gets."""

    def __init__(self, wrapped: object) -> None:
        self.wrappedProtocol = wrapped
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


class _LayeredTransport(TLSStringTransport):
    """A transport that, like TCP's, delivers to a TLS layer once C{startTLS} ran."""

    protocol: Any = None

    def startTLS(self, options: object) -> None:
        super().startTLS(options)
        self.protocol = _TLSLayer(self.protocol)


def session_of(protocol: Any) -> Session:
    assert isinstance(protocol, ProxiedConnection)
    session = protocol.wrapped
    assert isinstance(session, Session)
    return session


class ProxiedSessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = ProxyHarness()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def refusals(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "receive.refused"]

    def test_nothing_sent_before_the_header(self) -> None:
        """A trusted proxy's connection gets no banner until its header has arrived."""
        protocol, transport = self.proxy.connect()
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        self.assertIsNone(session_of(protocol).transport)

    def test_v1_tcp4_chooses_connector_by_header_source(self) -> None:
        """A v1 TCP4 header's source address is the client: its connector greets it."""
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n")
        self.assertEqual(reply_lines(transport.value()), ["220 client"])
        session = session_of(protocol)
        self.assertEqual((session.state.client_ip, session.state.client_port), ("192.0.2.10", 40000))
        self.assertEqual(protocol.getPeer(), IPv4Address("TCP", "192.0.2.10", 40000))
        self.assertEqual(protocol.getHost(), IPv4Address("TCP", "127.0.0.1", 2525))
        self.assertEqual(protocol.header.destination, IPv4Address("TCP", "198.51.100.1", 25))

    def test_v2_tcp4(self) -> None:
        """A v2 TCP4 header (with a TLV after the addresses) gives the client's connector."""
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(v2_tcp4("192.0.2.10", "198.51.100.1", 40001, 25, tlv=b"\x05\x00\x02ab"))
        self.assertEqual(reply_lines(transport.value()), ["220 client"])
        self.assertEqual(session_of(protocol).state.client_ip, "192.0.2.10")

    def test_v2_tcp6(self) -> None:
        """A v2 TCP6 header gives an IPv6 client (compressed form) and its connector."""
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(v2_tcp6("2001:db8::7", "2001:db8::1", 40002, 25))
        self.assertEqual(reply_lines(transport.value()), ["220 six"])
        self.assertEqual(session_of(protocol).state.client_ip, "2001:db8::7")
        self.assertEqual(protocol.getPeer(), IPv6Address("TCP", "2001:db8::7", 40002))

    def test_v2_local_is_the_proxy_itself(self) -> None:
        """A v2 LOCAL header (HAProxy's health check) is served as a connection from the proxy."""
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(v2(command=0, family=0))
        self.assertEqual(reply_lines(transport.value()), ["220 proxy itself"])
        self.assertEqual(session_of(protocol).state.client_ip, PROXY_IP)

    def test_v1_unknown_is_the_proxy_itself(self) -> None:
        """v1 PROXY UNKNOWN (anything after it ignored) is a connection from the proxy."""
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
        self.assertEqual(reply_lines(transport.value()), ["220 proxy itself"])

    def test_fragmented_v1(self) -> None:
        """A v1 header arriving byte by byte is buffered until its CRLF."""
        protocol, transport = self.proxy.connect()
        header = b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n"
        for i in range(len(header) - 1):
            protocol.dataReceived(header[i : i + 1])
            self.assertEqual(transport.value(), b"")
        protocol.dataReceived(header[-1:])
        self.assertEqual(reply_lines(transport.value()), ["220 client"])

    def test_fragmented_v2(self) -> None:
        """A v2 header arriving byte by byte (signature split too) is buffered until complete."""
        protocol, transport = self.proxy.connect()
        header = v2_tcp4("192.0.2.10", "198.51.100.1", 40001, 25)
        for i in range(len(header) - 1):
            protocol.dataReceived(header[i : i + 1])
            self.assertEqual(transport.value(), b"")
            self.assertFalse(transport.disconnecting)
        protocol.dataReceived(header[-1:])
        self.assertEqual(reply_lines(transport.value()), ["220 client"])

    def test_header_and_pipelined_smtp_in_one_chunk(self) -> None:
        """SMTP bytes after the header in the same read reach the session, after the banner."""
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\nHELO client.test\r\n")
        lines = reply_lines(transport.value())
        self.assertEqual(lines[0], "220 client")
        self.assertEqual(lines[1][:4], "250 ")
        self.assertEqual(len(lines), 2)

    def test_untrusted_peer_closed_without_a_byte(self) -> None:
        """A peer outside trusted_proxies is closed at once, nothing written, and logged."""
        protocol, transport = self.proxy.connect(peer="192.0.2.10")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\nHELO x\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertIsNone(session_of(protocol).transport)
        [event] = self.refusals()
        self.assertEqual(event["reason"], "proxy-untrusted")
        self.assertEqual(event["peer"], "192.0.2.10:50000")
        self.assertEqual(event["local"], "127.0.0.1:2525")

    def test_trusted_proxy_as_ipv4_mapped_peer(self) -> None:
        """On a dual-stack socket the proxy arrives IPv4-mapped, and is trusted as IPv4."""
        protocol, transport = self.proxy.connect(peer="::ffff:127.0.0.9", local="::ffff:127.0.0.1")
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n")
        self.assertEqual(reply_lines(transport.value()), ["220 client"])

    def test_timeout_closes_without_a_byte(self) -> None:
        """Without a complete header within 10 s the connection is closed, nothing written."""
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(b"PROXY TCP4 192.0")
        self.proxy.reactor.advance(HEADER_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnecting)
        self.proxy.reactor.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        [event] = self.refusals()
        self.assertEqual(event["reason"], "proxy-timeout")

    def test_timer_cancelled_by_the_header(self) -> None:
        """After the header the header timer is gone; only the session's own timeouts run."""
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(v2(command=0, family=0))
        self.proxy.reactor.advance(HEADER_TIMEOUT + 1)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.refusals(), [])

    def test_garbage_closes_without_a_byte(self) -> None:
        """SMTP where the header should be is refused at once, nothing written."""
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(b"EHLO client.test\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        [event] = self.refusals()
        self.assertEqual(event["reason"], "proxy-malformed")

    def test_overlong_v1_closes(self) -> None:
        """A v1 line without CRLF within 107 bytes is refused (bounded buffer)."""
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(b"PROXY TCP4 " + b"1" * 200)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_oversized_v2_closes_at_its_length_field(self) -> None:
        """A v2 header announcing more than the bound is refused before its body arrives."""
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(V2_SIGNATURE + b"\x21\x11\xff\xff")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_connection_lost_before_header(self) -> None:
        """A connection ending before its header never starts a session."""
        protocol, transport = self.proxy.connect()
        protocol.connectionLost()
        self.assertTrue(protocol.finished)
        self.assertIsNone(session_of(protocol).transport)
        self.proxy.reactor.advance(HEADER_TIMEOUT + 1)
        self.assertEqual(self.refusals(), [])

    def test_second_proxy_line_is_an_unknown_command(self) -> None:
        """A PROXY line inside the SMTP session is just an unknown command: the client stays."""
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n")
        transport.clear()
        protocol.dataReceived(b"PROXY TCP4 127.0.0.9 198.51.100.1 40000 25\r\n")
        self.assertEqual(reply_lines(transport.value()), ["500 5.3.3 Unrecognized command"])
        self.assertEqual(session_of(protocol).state.client_ip, "192.0.2.10")
        self.assertEqual(session_of(protocol).connector.name, "Client")  # type: ignore[union-attr]

    def test_second_v2_header_is_bad_lines_and_its_quit(self) -> None:
        """
        A v2 header inside the session is its signature's lines: two empty
        ones and a NUL (500 5.3.3 each), then "QUIT" ended by a bare LF (221),
        and nothing after it runs: never a new client address.
        """
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n")
        transport.clear()
        protocol.dataReceived(v2_tcp4(PROXY_IP, "198.51.100.1", 40000, 25)
                              + b"\r\nMAIL FROM:<>\r\nRCPT TO:<x@elsewhere.test>\r\n")
        lines = reply_lines(transport.value())
        self.assertEqual(lines[:3], ["500 5.3.3 Unrecognized command"] * 3)
        self.assertEqual([line[:4] for line in lines[3:]], ["221 "])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(session_of(protocol).state.client_ip, "192.0.2.10")

    def test_session_end_reaches_session(self) -> None:
        """After the header, the connection's end is the session's end."""
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\nQUIT\r\n")
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost()
        self.assertTrue(session_of(protocol).finished)
        self.assertTrue(protocol.finished)

    def test_binding_without_proxy_passes_through(self) -> None:
        """A binding without proxy_protocol is greeted at once, even beside PROXY bindings."""
        protocol, transport = self.proxy.connect(peer="192.0.2.10", port=2526)
        self.assertEqual(reply_lines(transport.value()), ["220 direct"])
        protocol.dataReceived(b"PROXY TCP4 127.0.0.9 198.51.100.1 40000 25\r\n")
        self.assertEqual(reply_lines(transport.value())[-1], "500 5.3.3 Unrecognized command")

    def test_implicit_tls_starts_after_the_header(self) -> None:
        """On an implicit-TLS PROXY binding TLS starts only after the header, nothing before it."""
        connectors = proxied_connectors(tls="implicit")
        proxy = ProxyHarness(*connectors)
        proxy.harness.factory._tls_options = lambda connector: "options"
        protocol, transport = proxy.connect()
        self.assertEqual(transport.tls_started, [])
        protocol.dataReceived(b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n")
        self.assertEqual(transport.tls_started, ["options"])
        self.assertEqual(transport.written_before_tls, b"")

    def test_bytes_after_header_go_to_the_tls_layer(self) -> None:
        """
        With implicit TLS, bytes that came with the header (the ClientHello)
        go to the TLS layer the transport delivers to from then on.
        """
        proxy = ProxyHarness(*proxied_connectors(tls="implicit"))
        proxy.harness.factory._tls_options = lambda connector: "options"
        transport = _LayeredTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 2525),
            peerAddress=IPv4Address("TCP", PROXY_IP, 50000),
        )
        protocol = proxy.factory.buildProtocol(transport.getPeer())
        transport.protocol = protocol
        protocol.makeConnection(transport)  # type: ignore[union-attr]
        protocol.dataReceived(  # type: ignore[union-attr]
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n\x16\x03\x01hello"
        )
        self.assertEqual(transport.protocol.received, [b"\x16\x03\x01hello"])
        self.assertEqual(session_of(protocol).state.client_ip, "192.0.2.10")

    def test_reload_changes_the_rules(self) -> None:
        """After a reconfigure without PROXY, new connections are greeted at once."""
        harness = self.proxy.harness
        plain = make_config(make_connector(banner="plain"))
        harness.factory.reconfigure(plain, ConnectorSelector(plain.connectors))
        protocol, transport = self.proxy.connect(peer="192.0.2.10")
        self.assertIsInstance(protocol, Session)
        self.assertEqual(reply_lines(transport.value()), ["220 plain"])

    def test_no_proxy_binding_no_wrapper(self) -> None:
        """Without any PROXY binding the factory hands out the session itself."""
        proxy = ProxyHarness(make_connector(banner="plain"))
        protocol, _ = proxy.connect()
        self.assertIsInstance(protocol, Session)


class ProxyRulesTests(SynchronousTestCase):
    def test_wildcard_binding(self) -> None:
        """A 0.0.0.0 PROXY binding covers every local IPv4 address on its port."""
        rules = ProxyRules([make_connector(bindings=(parse_binding("0.0.0.0:25"),),
                                           proxy_protocol=True,
                                           trusted_proxies=(parse_range("10.0.0.0/8"),))])
        rule = rules.rule_for(IPv4Address("TCP", "192.0.2.1", 25))
        assert rule is not None
        self.assertTrue(rule.trusts("10.1.2.3"))
        self.assertFalse(rule.trusts("192.0.2.9"))
        self.assertIsNone(rules.rule_for(IPv4Address("TCP", "192.0.2.1", 26)))

    def test_dual_stack_binding(self) -> None:
        """A [::] PROXY binding covers IPv4-mapped local addresses (dual-stack socket)."""
        rules = ProxyRules([make_connector(bindings=(parse_binding("[::]:25"),),
                                           proxy_protocol=True,
                                           trusted_proxies=(parse_range("127.0.0.1"),))])
        rule = rules.rule_for(IPv6Address("TCP", "::ffff:127.0.0.1", 25))
        assert rule is not None
        self.assertTrue(rule.trusts("::ffff:127.0.0.1"))

    def test_disabled_connector_ignored(self) -> None:
        """A disabled connector's proxy_protocol does not apply."""
        rules = ProxyRules([make_connector(enabled=False, proxy_protocol=True,
                                           trusted_proxies=(parse_range("127.0.0.1"),))])
        self.assertFalse(rules.any)


class ParseHeaderTests(SynchronousTestCase):
    def test_incomplete_is_none(self) -> None:
        """Every proper prefix of a valid header asks for more bytes."""
        for header in (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", v2_tcp4("1.2.3.4", "5.6.7.8", 1, 2)):
            for i in range(len(header)):
                self.assertIsNone(parse_header(header[:i]), header[:i])

    def test_rest_returned(self) -> None:
        """The bytes after the header are returned untouched."""
        header, rest = parse_header(b"PROXY TCP6 ::1 ::2 1 2\r\nEHLO x\r\n")  # type: ignore[misc]
        self.assertEqual(rest, b"EHLO x\r\n")
        self.assertEqual(header, ProxyHeader(1, "PROXY", IPv6Address("TCP", "::1", 1),
                                             IPv6Address("TCP", "::2", 2)))

    def test_malformed_v1(self) -> None:
        """v1 lines with bad fields are errors, not addresses."""
        for line in (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 x\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            b"PROXY TCP4 example.com 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 ::1 ::2 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        ):
            with self.assertRaises(HeaderError, msg=line):
                parse_header(line)

    def test_malformed_v2(self) -> None:
        """v2 headers of another version, command, family or a datagram are errors."""
        addresses = socket.inet_aton("1.2.3.4") * 2 + b"\x00\x01\x00\x02"
        for header in (
            b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c" + addresses,  # version 1
            v2(command=2, addresses=addresses),
            v2(family=0x51, addresses=addresses),
            v2(family=0x12, addresses=addresses),  # UDP over IPv4
            v2(family=0x11, addresses=addresses[:6]),  # addresses cut short
        ):
            with self.assertRaises(HeaderError, msg=repr(header)):
                parse_header(header)

    def test_v2_unspec_and_unix_are_the_proxy(self) -> None:
        """v2 PROXY with AF_UNSPEC or AF_UNIX addresses carries no client address."""
        unix = b"/run/a".ljust(108, b"\x00") + b"/run/b".ljust(108, b"\x00")
        for header in (v2(family=0x00), v2(family=0x31, addresses=unix)):
            parsed = parse_header(header)
            assert parsed is not None
            self.assertEqual(parsed, (ProxyHeader(2, "PROXY"), b""))

    def test_not_a_header(self) -> None:
        """Bytes that cannot begin a header are an error at once."""
        for data in (b"E", b"GET / HTTP/1.0\r\n", b"\r\n\r\n\x01", b"PROXYTCP4"):
            with self.assertRaises(HeaderError):
                parse_header(data)
