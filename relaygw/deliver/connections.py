"""
Outbound connections (SPEC section 4): connecting to a host, the
opportunistic-TLS retry in clear, and reuse of connections.

A L{ConnectionCache} (one per delivery target) keeps connections that have
finished a transaction and been RSET, for L{ClientTimeouts.idle} seconds
each; the next message for the same host, server name and TLS mode takes
one instead of a new TCP (and TLS, and AUTH) handshake, as Postfix's
connection cache does.  A connection carries messages for at most
L{REUSE_SECONDS}, so that a long burst still reaches DNS changes and
rebalanced server pools.  A reused connection that fails before its server
took the transaction (it may have closed the connection while idle) is
retried once on a new connection to the same host.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from relaygw._types import IServeReactor
from relaygw.config._model import HostPort
from relaygw.deliver import outcome as _o
from relaygw.deliver._transaction import (
    DATA_ERRORS,
    ClientAuth,
    ClientTimeouts,
    ClientTLS,
    OutboundMessage,
    TLSOptionsFactory,
    TransactionResult,
)
from relaygw.deliver.smtpclient import RelayClient, SendLog, new_client

__all__ = ["ConnectionCache", "REUSE_SECONDS", "MAX_IDLE_PER_HOST", "deliver_to_host"]

#: How long one connection carries messages (Postfix's smtp_connection_reuse_time_limit).
REUSE_SECONDS = 300.0
#: Idle connections kept per destination; more are closed at once.
MAX_IDLE_PER_HOST = 32

_log = Logger()

_Key = tuple[str, str, ClientTLS]


class ConnectionCache:
    """
    Idle connections by destination (address and port, server name, TLS
    mode).  A target's route fixes the rest (HELO name, trust, credentials),
    so each target has its own cache.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._idle: dict[_Key, list[RelayClient]] = {}

    def __len__(self) -> int:
        return sum(len(clients) for clients in self._idle.values())

    def take(self, key: _Key) -> RelayClient | None:
        """An idle connection to C{key}, now no longer idle-listed; C{None} when none."""
        clients = self._idle.get(key)
        while clients:
            client = clients.pop()
            if client.idle:
                if not clients:
                    del self._idle[key]
                return client
        self._idle.pop(key, None)
        return None

    def watch(self, key: _Key, client: RelayClient) -> None:
        """List C{client} whenever it becomes idle, and forget it when it is gone."""
        client.on_idle = lambda c: self._put(key, c)
        client.on_gone = lambda c: self._drop(key, c)

    def close(self) -> None:
        """QUIT every idle connection (at stop or reconfiguration)."""
        idle, self._idle = self._idle, {}
        for clients in idle.values():
            for client in clients:
                client.on_idle = None
                client.close_idle()

    def _put(self, key: _Key, client: RelayClient) -> None:
        clients = self._idle.setdefault(key, [])
        expired = self._clock.seconds() - client.connected_at >= REUSE_SECONDS
        if expired or len(clients) >= MAX_IDLE_PER_HOST:
            client.on_idle = None
            client.close_idle()
            return
        clients.append(client)

    def _drop(self, key: _Key, client: RelayClient) -> None:
        clients = self._idle.get(key)
        if clients and client in clients:
            clients.remove(client)
            if not clients:
                del self._idle[key]


class _OneShot(Factory):
    """
    Hands out one prepared protocol.  Unlike C{connectProtocol}'s factory it
    is built once per connection without defining a class, and it is quiet:
    no "Starting factory" event per delivery.
    """

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        return self._protocol


def _endpoint(reactor: IServeReactor, host: HostPort, timeout: float) -> IStreamClientEndpoint:
    # An IP literal needs no name resolution: HostnameEndpoint would still go
    # through its resolver machinery per connection.
    try:
        version = ipaddress.ip_address(host.host).version
    except ValueError:
        return HostnameEndpoint(reactor, host.host, host.port, timeout=timeout)
    kind = TCP4ClientEndpoint if version == 4 else TCP6ClientEndpoint
    return kind(reactor, host.host, host.port, timeout=timeout)


def deliver_to_host(
    reactor: IServeReactor,
    host: HostPort,
    message: OutboundMessage,
    *,
    helo: str,
    tls: ClientTLS,
    timeouts: ClientTimeouts = ClientTimeouts(),
    tls_options: TLSOptionsFactory | None = None,
    server_name: str | None = None,
    auth: ClientAuth | None = None,
    cache: ConnectionCache | None = None,
    send_log: SendLog | None = None,
) -> Deferred[TransactionResult]:
    """
    Run one transaction for C{message} at C{host}, on an idle connection
    from C{cache} or a new one.

    With C{tls = "opportunistic"} and no C{auth}, a failed STARTTLS is
    followed by one more connection to the same host in clear.

    @param reactor: TCP and time (and name resolution, for host names).
    @param tls_options: server name -> TLS options (L{tls_options_for});
        C{None} picks by mode, the system store for C{"verify"}.
    @param server_name: the name for SNI and certificate verification
        (an MX host name when C{host} is its resolved address); C{None} for
        C{host.host}.
    @param auth: the smarthost credentials, sent over TLS only.
    @param cache: where connections are reused from and kept for reuse;
        C{None}: one transaction, then QUIT.
    @param send_log: the route's protocol log, or C{None}.
    @return: a Deferred firing with the L{TransactionResult}; it never fails.
    """
    return Deferred.fromCoroutine(
        _deliver_to_host(
            reactor, host, message, helo, tls, timeouts, tls_options, server_name, auth, cache,
            send_log,
        )
    )


async def _deliver_to_host(
    reactor: IServeReactor,
    host: HostPort,
    message: OutboundMessage,
    helo: str,
    tls: ClientTLS,
    timeouts: ClientTimeouts,
    tls_options: TLSOptionsFactory | None,
    server_name: str | None,
    auth: ClientAuth | None,
    cache: ConnectionCache | None,
    send_log: SendLog | None = None,
) -> TransactionResult:
    name = str(host)
    sni = server_name or host.host
    key: _Key = (name, sni, tls)
    reused = cache.take(key) if cache is not None else None
    while True:
        try:
            data = message.open_data()
        except DATA_ERRORS as e:
            _log.error("Cannot open the message data: {error}", error=repr(e))
            failed = _o.local_outcome(_o.LOCAL_ERROR)
            return TransactionResult(name, {r: failed for r in message.recipients}, False)
        if reused is not None:
            idle, reused = reused, None
            result = await idle.offer(message, data)
            if not result.failover:
                return result
            _log.debug("Reused connection to {host} failed; connecting anew", host=name)
            continue
        client = new_client(
            message, data, name, helo, tls, reactor, timeouts, tls_options, sni, auth, send_log
        )
        if cache is not None:
            cache.watch((name, sni, tls), client)
        try:
            await _endpoint(reactor, host, timeouts.connect).connect(_OneShot(client))
        except Exception as e:
            data.close()
            failed = _o.failure_outcome(e, name)
            return TransactionResult(name, {r: failed for r in message.recipients}, True)
        result = await client.result
        # Credentials never go in clear, so with auth a retry in clear is moot.
        if not (client.tls_failed and tls == "opportunistic" and auth is None):
            return result
        _log.warn("Retrying {host} in clear after TLS failed", host=name, server_name=sni)
        tls = "off"
