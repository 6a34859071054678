"""
PROXY protocol v1 and v2 (HAProxy) in front of the SMTP session (SPEC
section 2, "Choosing the receive connector").

On a binding whose connectors set C{proxy_protocol}, L{ProxiedConnection}
sits between the TCP transport and the session and:

  1. closes, without a byte sent, a connection whose real peer is outside
     the connectors' C{trusted_proxies};
  2. reads the header (fragments are buffered, bounded by the header's own
     limits) before the session starts, so the banner, the connector choice
     and the implicit-TLS handshake all come after it;
  3. closes, without a byte sent, a connection whose header is malformed or
     incomplete after L{HEADER_TIMEOUT} seconds;
  4. then starts the session, which sees the header's source address as
     C{getPeer()}.  A v2 C{LOCAL} header (HAProxy's own health check), v1
     C{PROXY UNKNOWN} and address families other than TCP over IPv4/IPv6
     are served as connections from the proxy itself.

C{getHost()} stays the real local address: SPEC section 2 chooses among the
connectors bound where the connection arrived (L, P), and takes only the
client address C from the header; the header's destination (the proxy's
frontend) is kept in L{ProxiedConnection.header} for logs.

Twisted's own L{twisted.protocols.haproxy} wrapper is not used: it connects
the session before the header is read (the banner would go out first and the
connector would be chosen by the proxy's address), trusts every peer, has no
header timeout, and drops a header split over several reads.  Its v2 parser
is reused; v1 is parsed here, strictly (numeric ports, real IP addresses).

After the header, a session that starts TLS at once (implicit TLS) makes the
TCP transport deliver to a TLS layer wrapped around this object; the bytes
that came with the header belong to that layer, and are handed to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, cast

from attrs import frozen
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from relaygw.config._model import Config, Connector, IPRange
from relaygw.connectors.ranges import address_key
from relaygw.listen._proxyheader import HeaderError, ProxyHeader, parse_header

if TYPE_CHECKING:
    from twisted.internet.protocol import _ProtoWithFactory

__all__ = [
    "HEADER_TIMEOUT",
    "HeaderError",
    "ProxiedConnection",
    "ProxyFactory",
    "ProxyHeader",
    "ProxyRule",
    "ProxyRules",
    "parse_header",
]

#: Seconds a trusted peer has to send a complete header (SPEC section 2).
HEADER_TIMEOUT = 10.0

_log = Logger(namespace="relaygw.listen.proxy")


@frozen
class ProxyRule:
    """
    What a binding with C{proxy_protocol} asks of a connection.

    @ivar trusted: the ranges the real peer must be in (the connectors'
        C{trusted_proxies}).
    """

    trusted: tuple[IPRange, ...]

    def trusts(self, host: str) -> bool:
        """Whether the real peer C{host} (IPv4-mapped allowed) may send a header."""
        try:
            version, value = address_key(host)
        except ValueError:
            return False
        return any(r.version == version and r.first <= value <= r.last for r in self.trusted)


class ProxyRules:
    """
    The PROXY rule of each local address and port of a configuration; built
    once per configuration, looked up per connection.
    """

    def __init__(self, connectors: Iterable[Connector]) -> None:
        per_key: dict[tuple[int, int, int], list[Connector]] = {}
        for connector in connectors:
            if connector.enabled:
                for binding in set(connector.bindings):
                    version, value = address_key(binding.host)
                    per_key.setdefault((version, value, binding.port), []).append(connector)
        self._bound = frozenset(per_key)
        self._rules: dict[tuple[int, int, int], list[Connector]] = {
            key: [c for c in found if c.proxy_protocol]
            for key, found in per_key.items()
            if any(c.proxy_protocol for c in found)
        }

    @property
    def any(self) -> bool:
        """Whether some binding uses the PROXY protocol at all."""
        return bool(self._rules)

    def rule_for(self, host: IAddress) -> ProxyRule | None:
        """
        The rule for a connection that arrived at C{host}, or C{None} when
        none of the connectors that may serve it (SPEC section 2's
        candidates: bound to the address itself or to its family's
        wildcard, C{[::]} for IPv4 on a dual-stack port) uses the PROXY
        protocol.
        """
        if not self._rules:
            return None
        local = getattr(host, "host", None)
        port = getattr(host, "port", None)
        if not isinstance(local, str) or not isinstance(port, int):
            return None
        try:
            version, value = address_key(local)
        except ValueError:
            return None
        keys = [(version, value, port), (version, 0, port)]
        if version == 4 and (":" in local or (4, 0, port) not in self._bound):
            keys.append((6, 0, port))
        found = [c for key in keys for c in self._rules.get(key, ())]
        if not found:
            return None
        # Connectors sharing a binding agree on trusted_proxies (the loader
        # checks); a dual-stack [::] socket may mix bindings, so take them all.
        trusted: dict[IPRange, None] = {}
        for connector in found:
            trusted.update(dict.fromkeys(connector.trusted_proxies))
        return ProxyRule(tuple(trusted))


def _show(address: IAddress) -> str:
    host, port = getattr(address, "host", "?"), getattr(address, "port", 0)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


@implementer(IHandshakeListener)
class ProxiedConnection(Protocol):
    """
    The PROXY protocol between a TCP transport and the protocol it wraps,
    which it also serves as transport (like
    L{twisted.protocols.policies.ProtocolWrapper}).

    @ivar wrapped: the protocol started once the header is read.
    @ivar header: the header, once read; C{None} before, and on a binding
        without the PROXY protocol.
    @ivar finished: whether the connection has ended.
    """

    def __init__(
        self,
        wrapped: IProtocol,
        rule_for: Callable[[IAddress], ProxyRule | None],
        clock: IReactorTime,
        timeout: float = HEADER_TIMEOUT,
    ) -> None:
        self.wrapped = wrapped
        self.header: ProxyHeader | None = None
        self.finished = False
        self._rule_for = rule_for
        self._clock = clock
        self._timeout = timeout
        self._timer: IDelayedCall | None = None
        self._buffer = b""
        self._state: Literal["header", "open", "refused"] = "header"

    # -- the TCP side ---------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        # Whatever the real transport provides (ITLSTransport for STARTTLS,
        # ITCPTransport...), this object provides to the wrapped protocol.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)  # type: ignore[no-untyped-call]

    def connectionMade(self) -> None:
        assert self.transport is not None
        rule = self._rule_for(self.transport.getHost())
        if rule is None:
            self._start(b"")
            return
        peer = self.transport.getPeer()
        if not rule.trusts(getattr(peer, "host", "")):
            self._refuse("untrusted", "the peer is not in trusted_proxies")
            return
        self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._state == "open":
            self.wrapped.dataReceived(data)
            return
        if self._state == "refused":
            return
        self._buffer += data
        try:
            parsed = parse_header(self._buffer)
        except HeaderError as error:
            self._refuse("malformed", str(error))
            return
        if parsed is None:
            return
        self.header, rest = parsed
        self._buffer = b""
        self._cancel_timer()
        # Not logged: HAProxy's checks would write a line each; the session
        # logs the client; the header stays in self.header for later use.
        self._start(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.finished = True
        self._cancel_timer()
        if self._state == "open":
            self.wrapped.connectionLost(reason)
        self._state = "refused"

    def handshakeCompleted(self) -> None:
        if IHandshakeListener.providedBy(self.wrapped):
            self.wrapped.handshakeCompleted()  # type: ignore[attr-defined]

    def _start(self, rest: bytes) -> None:
        self._state = "open"
        assert self.transport is not None
        self.wrapped.makeConnection(cast(ITransport, self))
        if not rest or self._state != "open":
            return
        layer: Any = getattr(self.transport, "protocol", None)
        if layer is not self and getattr(layer, "wrappedProtocol", None) is self:
            # The session started TLS at once: what followed the header is TLS.
            layer.dataReceived(rest)
        else:
            self.wrapped.dataReceived(rest)

    def _refuse(self, reason: str, problem: str) -> None:
        self._state = "refused"
        self._buffer = b""
        self._cancel_timer()
        _log.warn(
            "connection from {peer} to {local} closed without a reply: {problem}",
            event="receive.refused", reason=f"proxy-{reason}", problem=problem,
            peer=_show(self._real_peer()), local=_show(self.getHost()),
        )
        assert self.transport is not None
        self.transport.loseConnection()

    def _timed_out(self) -> None:
        self._timer = None
        if self._state == "header":
            self._refuse("timeout", f"no complete PROXY header within {self._timeout:g} s")

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _real_peer(self) -> IAddress:
        assert self.transport is not None
        peer: IAddress = self.transport.getPeer()
        return peer

    # -- the transport the wrapped protocol sees ------------------------------

    def getPeer(self) -> IAddress:
        """The header's client address; the real peer when it has none."""
        if self.header is not None and self.header.source is not None:
            return self.header.source
        return self._real_peer()

    def getHost(self) -> IAddress:
        """The real local address (SPEC section 2 chooses connectors by it)."""
        assert self.transport is not None
        host: IAddress = self.transport.getHost()
        return host

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        assert self.transport is not None
        self.transport.writeSequence(data)

    def loseConnection(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def __getattr__(self, name: str) -> Any:
        # startTLS, abortConnection, pauseProducing, getHandle...: the real transport's.
        if name.startswith("__") or "transport" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["transport"], name)


class ProxyFactory(ServerFactory):
    """
    Wraps the connections of C{wrapped} in L{ProxiedConnection} when the
    configuration has a binding with C{proxy_protocol}; otherwise hands the
    wrapped factory's protocol over as it is (no cost without PROXY).

    @param config: gives the configuration in force (read per connection,
        so a reload applies to the next connection).
    """

    noisy = False

    def __init__(
        self,
        wrapped: ServerFactory,
        config: Callable[[], Config],
        clock: IReactorTime,
        *,
        timeout: float = HEADER_TIMEOUT,
    ) -> None:
        self.wrapped = wrapped
        self._config = config
        self._clock = clock
        self._timeout = timeout
        self._rules: tuple[Config, ProxyRules] | None = None

    def rules(self) -> ProxyRules:
        """The rules of the configuration in force (rebuilt when it changes)."""
        config = self._config()
        if self._rules is None or self._rules[0] is not config:
            self._rules = (config, ProxyRules(config.connectors))
        return self._rules[1]

    def buildProtocol(self, addr: IAddress | None) -> _ProtoWithFactory | None:
        protocol = self.wrapped.buildProtocol(addr)
        rules = self.rules()
        if protocol is None or not rules.any:
            return protocol
        wrapper = ProxiedConnection(protocol, rules.rule_for, self._clock, self._timeout)
        return cast("_ProtoWithFactory", wrapper)
