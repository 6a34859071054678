"""
MTA-STS policy discovery (RFC 8461; route C{tls = "mta-sts"}): the
C{_mta-sts} TXT record through the delivery resolver, the policy file
fetched with treq over verified HTTPS, and a bounded in-memory cache keyed
by domain.

The MX target asks L{PolicyFetcher.lookup} once per domain and attempt,
then L{allowed_exchangers} (C{enforce}: only matching exchangers, and each
over TLS verified against the exchanger's name; C{testing}: every exchanger
as usual, logging what enforcing would have refused; C{none} or no policy:
as without MTA-STS).

This is treq's one home in relaygw (DESIGN section 1).
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from typing import cast

from attrs import frozen
from OpenSSL import SSL
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.names import dns, error
from twisted.names.common import ResolverBase
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from relaygw._types import IServeReactor
from relaygw.deliver._stspolicy import (
    Policy,
    allowed_exchangers,
    parse_policy,
    parse_txt_record,
    select_txt_id,
)

__all__ = [
    "Policy",
    "PolicyCache",
    "PolicyFetcher",
    "allowed_exchangers",
    "parse_policy",
    "parse_txt_record",
    "select_txt_id",
]

#: Largest policy body read (section 3.3 suggests a limit; 64 KiB is ample).
MAX_BODY = 64 * 1024
#: Seconds for the whole fetch: resolving, connecting, TLS and the body.
FETCH_TIMEOUT = 10.0
#: Domains kept in the cache.
CACHE_SIZE = 10_000
#: Seconds before a failed fetch of the same id is tried again.
RETRY_INTERVAL = 60.0


class _FetchError(Exception):
    """The policy file could not be fetched or parsed; the message is the log's reason."""


@frozen
class _Entry:
    policy: Policy | None
    expires: float
    failed_id: str | None = None
    retry_at: float = 0.0


class PolicyCache:
    """
    Policies by domain, least recently used dropped beyond C{size}.  A
    separate object so that it can outlive a fetcher (a resolver or trust
    change on reload keeps what was learnt).
    """

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, domain: str) -> _Entry | None:
        entry = self._entries.get(domain)
        if entry is not None:
            self._entries.move_to_end(domain)
        return entry

    def put(self, domain: str, entry: _Entry) -> None:
        self._entries[domain] = entry
        self._entries.move_to_end(domain)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


async def _addresses(resolver: ResolverBase, host: str) -> list[str]:
    # mx.lookup_addresses does the same, but mx.py imports this module.
    found: list[str] = []
    for lookup, kind in ((resolver.lookupAddress, dns.A), (resolver.lookupIPV6Address, dns.AAAA)):
        try:
            answers, _, _ = await lookup(host)  # type: ignore[no-untyped-call]
        except (error.DomainError, error.DNSServerError, TimeoutError):
            continue
        found.extend(a.payload.dottedQuad() if kind == dns.A
                     else socket.inet_ntop(socket.AF_INET6, a.payload.address)
                     for a in answers if a.type == kind)
    return found


@implementer(IStreamClientEndpoint)
class _ResolvingTLSEndpoint:
    """TLS to C{host}, its addresses found with the delivery resolver, never the system's."""

    def __init__(
        self, reactor: IServeReactor, resolver: ResolverBase, host: str, port: int,
        options: object, timeout: float,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._host = host
        self._port = port
        self._options = options
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        addresses = await _addresses(self._resolver, self._host)
        if not addresses:
            raise DNSLookupError(f"{self._host} has no address")
        failure: Exception = ConnectError()  # type: ignore[no-untyped-call]
        for address in addresses:
            tcp = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = wrapClientTLS(
                self._options,  # type: ignore[arg-type]
                tcp(self._reactor, address, self._port, timeout=self._timeout),
                self._reactor,
            )
            try:
                return await endpoint.connect(factory)
            except ConnectError as e:
                failure = e
        raise failure


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    Endpoints for the policy host: name resolution through the injected
    resolver, TLS verified against the URL's host name (and sent as SNI).
    """

    def __init__(
        self, reactor: IServeReactor, resolver: ResolverBase,
        trust: IOpenSSLTrustRoot | None, timeout: float,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._trust = trust
        self._timeout = timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"https":
            raise SchemeNotSupported(f"{uri.scheme!r} is not https")
        host = uri.host.decode("ascii")
        options = ssl.optionsForClientTLS(host, trustRoot=self._trust)  # None: the system store
        return _ResolvingTLSEndpoint(
            self._reactor, self._resolver, host, uri.port, options, self._timeout)


class _LimitedBody(Protocol):
    """Collects a response body, giving up beyond C{limit} bytes."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(lambda d: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.done.errback(_FetchError(f"policy larger than {self._limit} bytes"))
            self._stop()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):  # type: ignore[no-untyped-call]
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


class PolicyFetcher:
    """
    MTA-STS policies of recipient domains (RFC 8461 sections 3 and 5.1).

    Each lookup queries the TXT record.  A cached policy is used while it is
    younger than its C{max_age} and the record's id is unchanged; otherwise
    the policy is fetched anew.  When the record is missing, the DNS fails,
    or the fetch fails, an unexpired cached policy is still used (section
    3.1's note and 5.1); without one the domain has no policy.  A failed
    fetch of one id is not retried for L{RETRY_INTERVAL} seconds, so a dead
    policy host does not cost every delivery a timeout.

    Concurrent lookups of one domain share one query and fetch.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IServeReactor,
        resolver: ResolverBase,
        *,
        clock: IReactorTime | None = None,
        trust: IOpenSSLTrustRoot | None = None,
        agent: IAgent | None = None,
        cache: PolicyCache | None = None,
        https_port: int = 443,
        timeout: float = FETCH_TIMEOUT,
        max_body: int = MAX_BODY,
        retry_interval: float = RETRY_INTERVAL,
    ) -> None:
        """
        @param reactor: TCP, TLS and the fetch timeout.
        @param resolver: for the TXT record and the policy host's A/AAAA
            (the delivery resolver, L{relaygw.deliver.mx.make_resolver}).
        @param clock: ages the cache; the reactor by default.
        @param trust: CAs for the policy host's certificate; C{None} for the
            system store.
        @param agent: replaces the HTTPS agent built from C{resolver} and
            C{trust} (tests).
        @param cache: shared cache; a new one of L{CACHE_SIZE} by default.
        @param https_port: the policy host's port (443 by RFC; tests).
        @param timeout: seconds for one whole fetch.
        @param max_body: the largest policy file accepted, in bytes.
        @param retry_interval: seconds before a failed fetch is repeated.
        """
        self._reactor = reactor
        self._resolver = resolver
        self._clock: IReactorTime = reactor if clock is None else clock
        if agent is None:
            agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
                reactor, _Endpoints(reactor, resolver, trust, timeout))
        self._agent = cast(IAgent, agent)
        self._cache = PolicyCache() if cache is None else cache
        self._port = https_port
        self._timeout = timeout
        self._max_body = max_body
        self._retry_interval = retry_interval
        self._waiting: dict[str, list[Deferred[Policy | None]]] = {}

    def lookup(self, domain: str) -> Deferred[Policy | None]:
        """
        The policy of C{domain} (ASCII, as in DNS), C{None} when it has
        none that can be used.  Never fails: problems are logged with the
        domain and reason.
        """
        domain = domain.rstrip(".").lower()
        result: Deferred[Policy | None] = Deferred()
        waiting = self._waiting.get(domain)
        if waiting is not None:
            waiting.append(result)
            return result
        self._waiting[domain] = [result]

        def fire(outcome: Policy | None | Failure) -> None:
            if isinstance(outcome, Failure):
                self._log.failure("MTA-STS lookup of {domain} failed", outcome, domain=domain)
                outcome = None
            for waiter in self._waiting.pop(domain):
                waiter.callback(outcome)

        Deferred.fromCoroutine(self._lookup(domain)).addBoth(fire)
        return result

    async def _lookup(self, domain: str) -> Policy | None:
        now = self._clock.seconds()
        entry = self._cache.get(domain)
        fresh = entry.policy if entry is not None and entry.expires > now else None
        try:
            policy_id = await self._txt(domain)
        except Exception as e:
            self._log.warn("MTA-STS record of {domain} could not be looked up: {reason}",
                           domain=domain, reason=_reason(e))
            return fresh
        if policy_id is None or (fresh is not None and fresh.id == policy_id):
            return fresh
        if entry is not None and entry.failed_id == policy_id and entry.retry_at > now:
            return fresh
        try:
            policy = await self._fetch(domain, policy_id)
        except Exception as e:
            self._log.warn("MTA-STS policy of {domain} (id {policy_id}) not fetched: {reason}",
                           domain=domain, policy_id=policy_id, reason=_reason(e),
                           cached=fresh is not None)
            self._cache.put(domain, _Entry(
                fresh, entry.expires if fresh is not None and entry is not None else 0.0,
                failed_id=policy_id, retry_at=now + self._retry_interval))
            return fresh
        self._log.info("MTA-STS policy of {domain} (id {policy_id}): {mode}",
                       domain=domain, policy_id=policy_id, mode=policy.mode, max_age=policy.max_age)
        self._cache.put(domain, _Entry(policy, now + policy.max_age))
        return policy

    async def _txt(self, domain: str) -> str | None:
        try:
            answers, _, _ = await self._resolver.lookupText(  # type: ignore[no-untyped-call]
                f"_mta-sts.{domain}")
        except error.DNSNameError:
            return None
        records = [b"".join(a.payload.data).decode("latin-1")
                   for a in answers if a.type == dns.TXT]
        return select_txt_id(records)

    def _url(self, domain: str) -> str:
        port = "" if self._port == 443 else f":{self._port}"
        return f"https://mta-sts.{domain}{port}/.well-known/mta-sts.txt"

    async def _fetch(self, domain: str, policy_id: str) -> Policy:
        fetching = Deferred.fromCoroutine(self._get(domain))
        body = await fetching.addTimeout(self._timeout, self._reactor)
        policy = parse_policy(body, policy_id)
        if policy is None:
            raise _FetchError("the policy file is not valid")
        return policy

    async def _get(self, domain: str) -> bytes:
        # A client per fetch: no cookie jar outlives it (the RFC's "no HTTP caching" spirit).
        # Redirects are never followed (section 3.3): treq follows them unless told.
        response = await HTTPClient(self._agent).get(
            self._url(domain), allow_redirects=False, unbuffered=True,
            # treq only times out with it; passed so that it does not import the global reactor.
            reactor=self._reactor,  # type: ignore[arg-type]
        )
        body = _LimitedBody(self._max_body)
        response.deliverBody(body)
        if response.code != 200:  # 3xx included: redirects are not followed
            body.done.addErrback(lambda _: None)  # read to the end and dropped
            raise _FetchError(f"HTTP status {response.code}")
        media = (response.headers.getRawHeaders("content-type") or [""])[-1]
        if media.split(";")[0].strip().lower() != "text/plain":
            body.done.addErrback(lambda _: None)
            raise _FetchError(f"media type {media!r}, not text/plain")
        return await body.done


def _reason(exc: BaseException) -> str:
    """A short log reason: the exception's own text, or what it wraps (Twisted's web errors)."""
    inner = getattr(exc, "reasons", None)
    if inner:
        return "; ".join(_reason(f.value) for f in inner
                         if isinstance(f, Failure) and f.value is not None)
    if isinstance(exc, (TimeoutError, CancelledError)):
        return "timed out"  # the fetch timeout is the only canceller
    if isinstance(exc, _FetchError):
        return str(exc)
    if isinstance(exc, VerificationError):
        return "the certificate does not name the policy host"
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        return "TLS: " + "; ".join(str(e[-1]) for e in exc.args[0] if isinstance(e, tuple) and e)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
