"""
Where mail for a domain goes (SPEC section 4, RFC 5321 section 5.1): MX
lookup through one twisted.names resolver, built from C{[dns].servers} and
injected.

Exchangers come in preference order, equal preferences shuffled; a domain
without MX records is its own exchanger (the A/AAAA fallback); a null MX
(RFC 7505: the single record C{0 .}) and NXDOMAIN are permanent (bounce at
once); a timeout, SERVFAIL or REFUSED is temporary (retried, never bounced).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import string
from collections.abc import Callable, Sequence
from typing import cast

import idna
from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import client, dns, error
from twisted.names.common import ResolverBase
from twisted.python.failure import Failure
from zope.interface import implementer

from relaygw._types import IServeReactor
from relaygw.config._model import DNS, HostPort, Route
from relaygw.deliver import outcome
from relaygw.deliver.connections import ConnectionCache, deliver_to_host
from relaygw.deliver.mtasts import PolicyFetcher
from relaygw.deliver.routefiles import RouteFiles
from relaygw.deliver.smtpclient import (
    ClientTimeouts,
    DataOpener,
    OutboundMessage,
    SendLog,
    TLSOptionsFactory,
    TransactionResult,
    check_tls_mode,
)
from relaygw.interfaces import IDeliveryTarget
from relaygw.route.router import split_address
from relaygw.spool.envelope import Envelope, Outcome

__all__ = [
    "Exchangers",
    "MXTarget",
    "ip_literal",
    "make_resolver",
    "lookup_exchangers",
    "lookup_addresses",
]

#: Seconds per try of one query (twisted.names re-sends after each).
QUERY_TIMEOUT = (1, 3, 5)
#: Exchanger addresses tried per attempt of one domain.
MAX_ADDRESSES = 5


@frozen
class Exchangers:
    """
    The hosts to try for a domain, in order.

    @ivar hosts: host names (the domain itself when it has no MX).
    @ivar implicit: C{True} for the A/AAAA fallback.
    """

    hosts: tuple[str, ...]
    implicit: bool = False


def make_resolver(
    settings: DNS, reactor: IReactorTime, timeout: Sequence[int] = QUERY_TIMEOUT
) -> ResolverBase:
    """
    The one resolver of the delivery process: C{settings.servers} only when
    set (never also the system's, so tests and split-horizon setups stay
    closed), else the system's resolv.conf.
    """
    if settings.servers:
        servers = [(s.host, s.port) for s in settings.servers]
        resolver = client.Resolver(  # type: ignore[no-untyped-call]
            servers=servers, reactor=reactor, timeout=tuple(timeout))
    else:
        resolver = client.Resolver(  # type: ignore[no-untyped-call]
            resolv="/etc/resolv.conf", reactor=reactor, timeout=tuple(timeout))
    return resolver


def _temporary(failure: BaseException) -> bool:
    return isinstance(failure, (error.DomainError, error.DNSServerError, TimeoutError))


async def _exchangers(
    resolver: ResolverBase, domain: str, shuffle: Callable[[list[str]], None]
) -> Exchangers | Outcome:
    try:
        answers, _, _ = await resolver.lookupMailExchange(domain)  # type: ignore[no-untyped-call]
    except error.DNSNameError:  # before DomainError, its base: only NXDOMAIN is permanent
        return outcome.local_outcome(outcome.NO_SUCH_DOMAIN)
    except Exception as e:
        if _temporary(e):
            return outcome.local_outcome(outcome.DNS_TEMPFAIL)
        raise
    records = [(a.payload.preference, str(a.payload.name).rstrip(".").lower())
               for a in answers if a.type == dns.MX]
    if not records:
        return Exchangers((domain,), implicit=True)
    if any(name == "" for _, name in records):
        real = [(p, n) for p, n in records if n]
        if not real:
            return outcome.local_outcome(outcome.NULL_MX)
        records = real  # a null MX beside real ones is a misconfiguration: use the real ones
    ordered: list[str] = []
    for preference in sorted({p for p, _ in records}):
        same = sorted({n for p, n in records if p == preference})
        shuffle(same)
        ordered.extend(n for n in same if n not in ordered)
    return Exchangers(tuple(ordered))


def lookup_exchangers(
    resolver: ResolverBase,
    domain: str,
    shuffle: Callable[[list[str]], None] = random.shuffle,
) -> Deferred[Exchangers | Outcome]:
    """
    The exchangers of C{domain}, or the outcome that decides its recipients
    (L{outcome.NULL_MX}, L{outcome.NO_SUCH_DOMAIN}: bounce;
    L{outcome.DNS_TEMPFAIL}: retry).

    @param shuffle: reorders hosts of equal preference in place (injected
        so that tests can fix the order).
    """
    return Deferred.fromCoroutine(_exchangers(resolver, domain, shuffle))


async def _addresses(resolver: ResolverBase, host: str) -> list[str]:
    found: list[str] = []
    temporary = False
    for lookup, kind in ((resolver.lookupAddress, dns.A), (resolver.lookupIPV6Address, dns.AAAA)):
        try:
            answers, _, _ = await lookup(host)  # type: ignore[no-untyped-call]
        except error.DNSNameError:
            return found
        except Exception as e:
            if not _temporary(e):
                raise
            temporary = True
            continue
        found.extend(a.payload.dottedQuad() if kind == dns.A
                     else socket.inet_ntop(socket.AF_INET6, a.payload.address)
                     for a in answers if a.type == kind)
    if not found and temporary:
        raise TimeoutError(f"address lookup of {host} failed")
    return found


def lookup_addresses(resolver: ResolverBase, host: str) -> Deferred[list[str]]:
    """
    The IPv4 then IPv6 addresses of C{host} (A before AAAA), C{[]} when it
    has none or does not exist.

    @raise TimeoutError: (through the Deferred) neither lookup got an answer.
    """
    return Deferred.fromCoroutine(_addresses(resolver, host))


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _ascii_domain(domain: str) -> str | None:
    """
    The DNS form of a recipient domain (IDNA 2008 for Unicode names, as
    the session checked them: C{straße.de} is C{xn--strae-oqa.de}, not
    IDNA 2003's C{strasse.de}), C{None} when it has none.
    """
    if domain.isascii():
        return domain.lower()
    try:
        return idna.encode(domain.translate(_ASCII_LOWER)).decode("ascii")
    except idna.IDNAError:
        return None


def ip_literal(domain: str) -> str | None:
    """The address of an RFC 5321 address literal (C{[192.0.2.1]}, C{[IPv6:2001:db8::1]}), else C{None}."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


@implementer(IDeliveryTarget)
class MXTarget:
    """
    Delivery by MX lookup (SPEC section 4): the recipients of one message
    are grouped by domain, and each domain's group goes in one transaction to
    the first exchanger that takes it.  An exchanger that cannot be reached,
    times out, or refuses before the transaction (4xx greeting, EHLO or
    MAIL) passes the message to the next address, then the next exchanger;
    the route's C{port} applies to every exchanger.  At most
    L{MAX_ADDRESSES} addresses are tried per attempt (Postfix's
    C{smtp_mx_address_limit}), so a domain with many dead exchangers does not
    hold a delivery slot for long.

    IP-literal recipients go to that address only when the route has
    C{ip_literals = true}; otherwise they are bounced.

    With C{tls = "mta-sts"} each domain's policy (RFC 8461,
    L{relaygw.deliver.mtasts}) decides: C{enforce} keeps only the exchangers
    that match it, and requires TLS verified against the exchanger's name
    (none matching: retried); C{testing} logs the exchangers it would refuse
    and delivers as without a policy; no policy, or C{none}: opportunistic
    TLS.
    """

    _log = Logger()

    def __init__(
        self,
        route: Route,
        *,
        reactor: IServeReactor,
        resolver: ResolverBase,
        helo: str,
        timeouts: ClientTimeouts = ClientTimeouts(),
        tls_options: TLSOptionsFactory | None = None,
        shuffle: Callable[[list[str]], None] = random.shuffle,
        sts: PolicyFetcher | None = None,
        send_log: SendLog | None = None,
    ) -> None:
        """
        @param route: a C{via = "mx"} route.
        @param reactor: TCP and time.
        @param resolver: for MX, A and AAAA lookups (L{make_resolver}).
        @param helo: the name to send in EHLO.
        @param tls_options: overrides what the route's C{tls} and C{ca_file}
            give (tests).
        @param shuffle: reorders exchangers of equal preference.
        @param sts: the MTA-STS policy source of a C{"mta-sts"} route (by
            default one over C{resolver}, trusting C{ca_file} or the system
            store).
        @param send_log: the route's protocol log, or C{None}.
        """
        self._route = route
        self._tls = check_tls_mode(route.tls)
        self._reactor = reactor
        self._resolver = resolver
        self._helo = helo
        self._timeouts = timeouts
        self._files = RouteFiles(route, self._tls, tls_options)
        self._cache = ConnectionCache(reactor)
        self._shuffle = shuffle
        self._sts = sts
        self._send_log = send_log

    def deliver(
        self, envelope: object, recipients: object, open_data: object
    ) -> Deferred[dict[str, Outcome]]:
        """See L{IDeliveryTarget.deliver}."""
        if not isinstance(envelope, Envelope) or not callable(open_data):
            raise TypeError("deliver(Envelope, recipients, open_data) expected")
        rcpts = tuple(str(r) for r in cast("Sequence[str]", recipients))
        if not self._files.ready():
            later = outcome.local_outcome(outcome.ROUTE_FILE_UNREADABLE)
            return succeed({r: later for r in rcpts})
        if self._route.tls == "mta-sts" and self._sts is None:
            self._sts = PolicyFetcher(self._reactor, self._resolver, trust=self._files.trust)
        return Deferred.fromCoroutine(self._deliver(envelope, rcpts, cast(DataOpener, open_data)))

    async def _deliver(
        self, envelope: Envelope, recipients: Sequence[str], open_data: DataOpener
    ) -> dict[str, Outcome]:
        groups: dict[str, list[str]] = {}
        for rcpt in recipients:
            groups.setdefault(split_address(rcpt)[1].lower(), []).append(rcpt)
        domains = list(groups)
        results = await DeferredList(
            [
                Deferred.fromCoroutine(self._deliver_domain(envelope, d, groups[d], open_data))
                for d in domains
            ],
            consumeErrors=True,
        )
        outcomes: dict[str, Outcome] = {}
        failed = outcome.local_outcome(outcome.TARGET_FAILED)
        for domain, (ok, result) in zip(domains, results):
            got: dict[str, Outcome] = result if ok else {}
            if not ok:
                self._log.failure("MX delivery to {domain} failed", cast(Failure, result),
                                  queue_id=envelope.id, domain=domain)
            outcomes.update({r: got.get(r, failed) for r in groups[domain]})
        return outcomes

    async def _hosts(self, domain: str) -> Exchangers | Outcome:
        literal = ip_literal(domain)
        if literal is not None:
            if not self._route.ip_literals:
                return outcome.local_outcome(outcome.IP_LITERAL_REFUSED)
            return Exchangers((literal,), implicit=True)
        name = _ascii_domain(domain)
        if name is None:
            return outcome.local_outcome(outcome.NO_SUCH_DOMAIN)
        return await lookup_exchangers(self._resolver, name, self._shuffle)

    async def _policy(
        self, envelope: Envelope, domain: str, found: Exchangers
    ) -> Exchangers | Outcome | None:
        """
        The exchangers an enforced MTA-STS policy allows (TLS must then be
        verified), the outcome when it allows none, C{None} without one.
        """
        assert self._sts is not None
        name = _ascii_domain(domain) or domain
        policy = await self._sts.lookup(name)
        if policy is None or policy.mode == "none":
            return None
        allowed = tuple(h for h in found.hosts if policy.matches(h))
        refused = [h for h in found.hosts if h not in allowed]
        if policy.mode == "testing":
            if refused:
                self._log.info(
                    "MTA-STS policy of {domain} (testing) would refuse {refused}",
                    queue_id=envelope.id, domain=domain, policy_id=policy.id,
                    refused=", ".join(refused),
                )
            return None
        if refused:
            self._log.warn(
                "MTA-STS policy of {domain} refuses exchangers {refused}",
                queue_id=envelope.id, domain=domain, policy_id=policy.id,
                refused=", ".join(refused),
            )
        if not allowed:
            return outcome.local_outcome(outcome.MTA_STS_NO_MATCH)
        return Exchangers(allowed, found.implicit)

    async def _addresses(self, host: str) -> list[str] | None:
        """The addresses of an exchanger; C{None} when its lookup failed temporarily."""
        try:
            return [str(ipaddress.ip_address(host))]  # an IP-literal recipient's "exchanger"
        except ValueError:
            pass
        try:
            return await lookup_addresses(self._resolver, host)
        except TimeoutError:
            return None

    async def _deliver_domain(
        self, envelope: Envelope, domain: str, recipients: list[str], open_data: DataOpener
    ) -> dict[str, Outcome]:
        found = await self._hosts(domain)
        if isinstance(found, Outcome):
            return {r: found for r in recipients}
        tls, tls_options = self._tls, self._files.tls_options
        if self._sts is not None and ip_literal(domain) is None:
            enforced = await self._policy(envelope, domain, found)
            if isinstance(enforced, Outcome):
                return {r: enforced for r in recipients}
            if enforced is not None:
                found, tls, tls_options = enforced, "verify", self._files.verified
        message = OutboundMessage.of(envelope, recipients, open_data)
        last: TransactionResult | None = None
        tried = 0
        lookup_failed = False
        for host in found.hosts:
            addresses = await self._addresses(host)
            if addresses is None:
                lookup_failed = True
                continue
            for address in addresses:
                if tried == MAX_ADDRESSES:
                    break
                tried += 1
                last = await deliver_to_host(
                    self._reactor,
                    HostPort(address, self._route.port),
                    message,
                    helo=self._helo,
                    tls=tls,
                    timeouts=self._timeouts,
                    tls_options=tls_options,
                    server_name=host,  # TLS names the exchanger, not its address
                    cache=self._cache,
                    send_log=self._send_log,
                )
                if not last.failover:
                    return last.outcomes
                self._log.info(
                    "Exchanger {host} ({address}) did not take {queue_id}",
                    queue_id=envelope.id, route=self._route.name, domain=domain, host=host,
                    address=last.host,
                )
        if last is not None:
            return last.outcomes
        if found.implicit and not lookup_failed:
            # The domain exists (no NXDOMAIN) but names no host at all.
            verdict = outcome.local_outcome(outcome.NO_EXCHANGER)
        else:
            verdict = outcome.local_outcome(outcome.NO_EXCHANGER_ADDRESS)
        return {r: verdict for r in recipients}
