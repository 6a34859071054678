"""
The server factory of the receive side: one per listening binding.

It holds what sessions share: the configuration and the connector selector
(swapped by L{SessionFactory.reconfigure}, for new sessions only), the
spool, the reactor, the TLS options per connector, the AUTH portal, and the
per-connector connection counters and message rate limiters.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from relaygw.auth.checker import AddressLookup
from relaygw.auth.throttle import Throttle
from relaygw.config._model import AuthThrottle, Config, Connector
from relaygw.interfaces import IConnectorSelector, IDirectory, IProtocolLog, ISpool
from relaygw.session.limits import ConnectionCounter, RateLimiter
from relaygw.session.peers import PeerLimits
from relaygw.session.protocol import Session

__all__ = ["SessionFactory"]

TLSOptionsMaker = Callable[[Connector], "object | None"]


class SessionFactory(ServerFactory):
    """
    Builds a L{Session} per connection.

    @ivar config: the configuration new sessions get.
    @ivar selector: the connector selector new sessions ask.
    @ivar spool: where accepted messages go.
    @ivar portal: the twisted.cred portal for AUTH, or C{None} (no AUTH).
    @ivar addresses: recipient lookups for C{validate_recipients}, or
        C{None} when no directory was given (nothing is validated).
    """

    _log = Logger()

    def __init__(
        self,
        *,
        selector: IConnectorSelector,
        config: Config,
        spool: ISpool,
        reactor: IReactorTime,
        tls_options: TLSOptionsMaker | None = None,
        portal: object | None = None,
        directory: IDirectory | None = None,
        protocol_log: IProtocolLog | None = None,
    ) -> None:
        """
        @param tls_options: C{tls_options(connector)} gives the server TLS
            options for C{transport.startTLS}, or C{None} when the connector
            has no usable certificate.  C{None} here: no TLS at all.
        @param portal: a L{twisted.cred.portal.Portal} whose realm serves
            L{relaygw.auth.realm.IAuthenticatedUser}.
        @param directory: the store C{validate_recipients} asks.
        @param protocol_log: the SmtpReceive protocol log, written for the
            sessions of C{protocol_logging = "verbose"} connectors.
        """
        self.selector = selector
        self.config = config
        self.spool = spool
        self.portal = portal
        self.protocol_log = protocol_log
        self._reactor = reactor
        self._tls_options = tls_options
        self._tls_cache: dict[Connector, object | None] = {}
        self._counters: dict[str, tuple[tuple[int, int], ConnectionCounter]] = {}
        self._limiters: dict[str, tuple[object, RateLimiter]] = {}
        self._throttles: dict[str, tuple[AuthThrottle, Throttle]] = {}
        #: With receiving workers: the limits shared with the other processes.
        self.peers: PeerLimits | None = None
        self.addresses = AddressLookup(directory, reactor) if directory is not None else None
        self._serial = itertools.count(1)
        self._boot = int(reactor.seconds())
        self._pid = os.getpid() & 0xFFFF

    @property
    def reactor(self) -> IReactorTime:
        """The injected reactor (time, and C{callLater} for timeouts)."""
        return self._reactor

    def buildProtocol(self, addr: IAddress | None) -> Session:
        return Session(self, self.config, self.selector)

    def reconfigure(
        self,
        config: Config,
        selector: IConnectorSelector,
        *,
        portal: object | None = None,
        directory: IDirectory | None = None,
    ) -> None:
        """
        Use C{config} and C{selector} for sessions that start from now on;
        sessions in progress keep their connector.  TLS options are rebuilt
        on next use (certificates may have changed).  A new C{portal} and
        C{directory} (a reload) serve the next AUTH and recipient lookups.
        """
        self.config = config
        self.selector = selector
        self._tls_cache.clear()
        if portal is not None:
            self.portal = portal
        if directory is not None:
            self.addresses = AddressLookup(directory, self._reactor)

    def session_id(self) -> str:
        """
        A new session id, unique among the receiving processes (hex): the
        start second, the process id (workers started in the same second
        differ by it) and a counter.
        """
        return f"{self._boot:08X}{self._pid:04X}{next(self._serial):04X}"

    def tls_options(self, connector: Connector) -> object | None:
        """
        The server TLS options for C{connector} (cached), or C{None} when it
        has no usable certificate; a failure to build them is logged once
        per configuration and treated as no certificate.
        """
        if self._tls_options is None:
            return None
        if connector not in self._tls_cache:
            try:
                options = self._tls_options(connector)
            except Exception:
                self._log.failure(
                    "TLS options for connector {connector} cannot be built",
                    connector=connector.name,
                )
                options = None
            self._tls_cache[connector] = options
        return self._tls_cache[connector]

    def share_limits(
        self, origin: int, send: Callable[[bytes], None], *, decides: bool = False
    ) -> PeerLimits:
        """
        Share this factory's limits with the other receiving processes
        (L{relaygw.session.peers}): changes go out through C{send}; feed
        theirs to the returned object's C{apply}.  C{decides}: this is the
        gateway process, whose throttles admit every process's AUTH checks.
        """
        self.peers = PeerLimits(origin, send, self._shared, decides=decides)
        for name, (_, counter) in self._counters.items():
            self.peers.attach(name, counter)
        for name, (_, limiter) in self._limiters.items():
            self.peers.attach(name, limiter)
        for name, (_, throttle) in self._throttles.items():
            self.peers.attach(name, throttle)
        return self.peers

    def _shared(self, kind: str, name: str) -> ConnectionCounter | RateLimiter | Throttle | None:
        connector = next((c for c in self.config.connectors if c.name == name), None)
        if connector is None:
            return None
        if kind == "counter":
            return self.connection_counter(connector)
        if kind == "limiter":
            return self.rate_limiter(connector)
        return self.auth_throttle(connector)

    def connection_counter(self, connector: Connector) -> ConnectionCounter:
        """The connection counter of C{connector}, kept across reconfigures while its limits stay."""
        limits = (connector.max_connections, connector.max_connections_per_ip)
        held = self._counters.get(connector.name)
        if held is None or held[0] != limits:
            held = (limits, ConnectionCounter(*limits))
            self._counters[connector.name] = held
            if self.peers is not None:
                self.peers.attach(connector.name, held[1])
        return held[1]

    def rate_limiter(self, connector: Connector) -> RateLimiter:
        """The message rate limiter of C{connector}, kept across reconfigures while its rate stays."""
        rate = connector.message_rate_limit
        held = self._limiters.get(connector.name)
        if held is None or held[0] != rate:
            held = (rate, RateLimiter(rate, self._reactor))
            self._limiters[connector.name] = held
            if self.peers is not None:
                self.peers.attach(connector.name, held[1])
        return held[1]

    def auth_throttle(self, connector: Connector) -> Throttle:
        """The AUTH failure throttle of C{connector}, kept across reconfigures while its settings stay."""
        settings = connector.auth_throttle
        held = self._throttles.get(connector.name)
        if held is None or held[0] != settings:
            held = (settings, Throttle(settings, self._reactor))
            self._throttles[connector.name] = held
            if self.peers is not None:
                self.peers.attach(connector.name, held[1])
        return held[1]
