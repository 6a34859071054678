"""
The configuration as frozen attrs value objects (SPEC section 2).

Only L{relaygw.config._load} builds these from TOML; everything else receives
them already validated.  Durations are L{timedelta}, sizes are integers
(bytes), paths are absolute L{Path}s, address ranges are L{IPRange}s.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path
from typing import Literal

from attrs import field, frozen

TLSMode = Literal["starttls", "implicit", "off"]
RouteVia = Literal["mx", "smarthost", "maildir", "graph"]
RouteTLS = Literal["off", "opportunistic", "required", "verify", "mta-sts"]
DomainType = Literal["authoritative", "internal-relay"]
DirectoryKind = Literal["active-directory", "ldap"]
RouteAuth = Literal["password", "xoauth2"]

#: The rights of SPEC's rights table, by their plain names.
RIGHTS = frozenset({"submit", "relay", "accept-any-sender", "accept-authoritative-sender"})

_V4_MAPPED_FIRST = 0xFFFF_0000_0000
_V4_MAPPED_LAST = 0xFFFF_FFFF_FFFF


@frozen(order=True)
class IPRange:
    """
    An inclusive range of addresses of one family, as integers.

    IPv4-mapped IPv6 ranges (C{::ffff:a.b.c.d}) are normalised to IPv4 by
    L{IPRange.of}, so an IPv4 client matches them whichever way it arrives.

    @ivar version: 4 or 6.
    @ivar first: the first address as an integer.
    @ivar last: the last address as an integer (C{>= first}).
    @ivar text: the range as the administrator wrote it, for messages.
    """

    version: int
    first: int
    last: int
    text: str = field(eq=False, order=False)

    @property
    def size(self) -> int:
        """The number of addresses in the range; smaller is more specific."""
        return self.last - self.first + 1

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return False
        address = normalise_address(address)
        return address.version == self.version and self.first <= int(address) <= self.last

    @classmethod
    def of(cls, version: int, first: int, last: int, text: str) -> IPRange:
        """
        Build a range, folding IPv4-mapped IPv6 ranges into IPv4.
        """
        if version == 6 and _V4_MAPPED_FIRST <= first and last <= _V4_MAPPED_LAST:
            return cls(4, first - _V4_MAPPED_FIRST, last - _V4_MAPPED_FIRST, text)
        return cls(version, first, last, text)


def normalise_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """IPv4-mapped IPv6 addresses become IPv4; anything else is returned as is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@frozen
class Binding:
    """
    One listening address and port of a connector.

    @ivar host: the IP address as text, normalised (C{"0.0.0.0"}, C{"::"}, C{"127.0.0.1"}).
    @ivar port: the TCP port.
    """

    host: str
    port: int

    @property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.host)

    @property
    def version(self) -> int:
        return self.address.version

    @property
    def is_wildcard(self) -> bool:
        return self.address.is_unspecified

    def shares_with(self, other: Binding) -> bool:
        """
        SPEC: two bindings are shared when their ports are equal and their
        addresses are equal or one is the wildcard of the other's family.
        """
        if self.port != other.port:
            return False
        if self.host == other.host:
            return True
        if self.version != other.version:
            return False
        return self.is_wildcard or other.is_wildcard

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.version == 6 else f"{self.host}:{self.port}"


@frozen
class HostPort:
    """A host name or IP address and a port (smarthosts, DNS servers, admin_listen)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@frozen
class Rate:
    """A token bucket: C{count} tokens refilled evenly over C{per}."""

    count: int
    per: timedelta


@frozen
class Grant:
    """Rights given to members of a group (a DN or a CN; compared case-insensitively)."""

    group: str
    rights: frozenset[str]


@frozen
class Timeouts:
    """How long a session waits for a command and for the next DATA bytes."""

    command: timedelta = timedelta(minutes=5)
    data: timedelta = timedelta(minutes=10)


@frozen
class AuthThrottle:
    """
    Failed-AUTH throttling per connector (issue 3).  After C{max_failures}
    failures within C{window} from one IP or for one user, AUTH is answered
    535 without asking the directory, after a delay of C{delay} doubled per
    further failure, capped at C{max_delay} (Exchange's 5 s tarpit by
    default: scan-to-mail devices give up after about 10 s, and a client
    that retries keeps its address throttled).
    """

    max_failures: int = 5
    window: timedelta = timedelta(minutes=15)
    delay: timedelta = timedelta(seconds=1)
    max_delay: timedelta = timedelta(seconds=5)


@frozen
class Connector:
    """One receive connector (SPEC section 2, C{[[connectors]]})."""

    name: str
    bindings: tuple[Binding, ...]
    remote_ranges: tuple[IPRange, ...]
    fqdn: str
    banner: str = "{fqdn} relaygw ESMTP ready"
    enabled: bool = True
    tls: TLSMode = "starttls"
    certificate: Path | None = None
    min_tls_version: str = "1.2"
    require_tls: bool = False
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    allow_plaintext_auth: bool = False
    permissions_anonymous: frozenset[str] = frozenset({"submit", "accept-authoritative-sender"})
    permissions_authenticated: frozenset[str] = frozenset({"submit", "relay"})
    grants: tuple[Grant, ...] = ()
    protocol_logging: Literal["none", "verbose"] = "none"
    max_message_size: int = 36 * 1024 * 1024
    max_recipients: int = 200
    max_connections: int = 5000
    max_connections_per_ip: int = 20
    message_rate_limit: Rate | None = Rate(600, timedelta(minutes=1))
    proxy_protocol: bool = False
    trusted_proxies: tuple[IPRange, ...] = ()
    timeouts: Timeouts = Timeouts()
    auth_throttle: AuthThrottle = AuthThrottle()
    #: 0-based position in the file, for key paths in later messages.
    index: int = 0


@frozen
class AcceptedDomain:
    """
    One accepted domain.

    @ivar domain: lower-case, without a trailing dot; C{"*.example.com"} matches subdomains only.
    """

    domain: str
    type: DomainType = "authoritative"
    route: str | None = None
    validate_recipients: bool = False

    def matches(self, domain: str) -> bool:
        """Whether C{domain} (any case, trailing dot allowed) is this accepted domain."""
        d = domain.lower().rstrip(".")
        if self.domain.startswith("*."):
            return d.endswith(self.domain[1:])
        return d == self.domain


@frozen
class OAuth:
    """
    C{[routes.oauth]}: the Entra ID application whose access tokens a route
    uses (OAuth 2.0 client credentials grant, issue 9).

    @ivar token_endpoint: the full URL, the tenant's v2.0 endpoint unless
        overridden.
    @ivar scope: the override, else by route kind (Exchange Online for
        SMTP, Microsoft Graph for C{via = "graph"}).
    @ivar client_secret_file: the secret's file; else C{certificate_file}
        and C{private_key_file} sign a client assertion.
    @ivar ca_file: the PEM certificates trusted for the token endpoint;
        C{None} for the system store.
    @ivar timeout: for one whole token request.
    """

    tenant_id: str
    client_id: str
    token_endpoint: str
    scope: str
    client_secret_file: Path | None = None
    certificate_file: Path | None = None
    private_key_file: Path | None = None
    ca_file: Path | None = None
    timeout: timedelta = timedelta(seconds=10)


@frozen
class Route:
    """
    One route (SPEC section 2, C{[[routes]]}).

    @ivar ca_file: the PEM certificates C{tls = "verify"} trusts; C{None}
        for the system store.
    """

    name: str
    via: RouteVia = "mx"
    smarthosts: tuple[HostPort, ...] = ()
    maildir: Path | None = None
    port: int = 25
    tls: RouteTLS = "opportunistic"
    ca_file: Path | None = None
    auth_user: str = ""
    auth_password_file: Path | None = None
    max_concurrency: int = 20
    #: Deliver C{user@[192.0.2.1]} to that address (C{via = "mx"} only).
    ip_literals: bool = False
    #: C{"verbose"}: write this route's sessions to the SmtpSend protocol
    #: log (Exchange's per-Send-connector ProtocolLoggingLevel).
    protocol_logging: Literal["none", "verbose"] = "none"
    #: C{"xoauth2"}: SMTP AUTH XOAUTH2 as C{auth_user} with a token of C{oauth}.
    auth: RouteAuth = "password"
    oauth: OAuth | None = None
    #: C{via = "graph"}: the Microsoft Graph base URL (no trailing C{/}).
    graph_endpoint: str = "https://graph.microsoft.com"
    #: C{via = "graph"}: the mailbox every message is sent as; C{None}:
    #: the envelope sender's own mailbox.
    mailbox: str | None = None


@frozen
class Gateway:
    """C{[gateway]}."""

    hostname: str
    spool_dir: Path
    log_dir: Path
    admin_listen: HostPort | None = HostPort("127.0.0.1", 8025)
    default_route: str | None = None
    #: The bearer token of the admin HTTP endpoint (required when
    #: C{admin_listen} is not a loopback address).
    admin_token_file: Path | None = None
    #: Free bytes the spool's file system needs for C{/health}; C{None}:
    #: twice the largest C{max_message_size}, at least 64 MiB.
    health_min_free: int | None = None
    #: C{/health} fails when the oldest queued message is older; C{None}:
    #: half of C{[queue].expire}; zero: the queue check never fails it.
    health_queue_age: timedelta | None = None
    #: Receiving processes (L{relaygw.workers}); 0: one fewer than the cores, at least one.
    workers: int = 0
    #: Also write a line per message, session and delivery to twistd's log
    #: (the tracking log has them anyway; L{relaygw.events}).
    log_messages: bool = False


@frozen
class DNS:
    """C{[dns]}: an empty C{servers} means the system resolver configuration."""

    servers: tuple[HostPort, ...] = ()


@frozen
class Directory:
    """C{[directory]} (issue 3 puts it to work)."""

    kind: DirectoryKind
    servers: tuple[str, ...]
    base_dn: str
    start_tls: bool = True
    ca_file: Path | None = None
    bind_dn: str = ""
    bind_password_file: Path | None = None
    user_filter: str = ""
    address_attributes: tuple[str, ...] = ()
    timeout: timedelta = timedelta(seconds=5)
    cache_ttl: timedelta = timedelta(minutes=5)


@frozen
class Users:
    """C{[users]}: the local credential store."""

    file: Path


@frozen
class Queue:
    """C{[queue]}."""

    retry: tuple[timedelta, ...] = tuple(
        timedelta(seconds=s) for s in (60, 300, 900, 1800, 3600, 7200)
    )
    expire: timedelta = timedelta(days=2)
    delay_warning: timedelta = timedelta(hours=4)

    def retry_delay(self, attempts: int) -> timedelta:
        """The wait after the C{attempts}-th failed attempt (1-based); then every last interval."""
        return self.retry[min(max(attempts, 1), len(self.retry)) - 1]


@frozen
class Config:
    """
    The whole configuration.

    @ivar source: the file name for messages (C{"<embedded default>"} for the default).
    """

    source: str
    gateway: Gateway
    connectors: tuple[Connector, ...]
    routes: tuple[Route, ...]
    accepted_domains: tuple[AcceptedDomain, ...] = ()
    dns: DNS = DNS()
    directory: Directory | None = None
    users: Users | None = None
    queue: Queue = Queue()

    def route(self, name: str) -> Route:
        """The route called C{name} (the loader guarantees it exists)."""
        for r in self.routes:
            if r.name == name:
                return r
        raise KeyError(name)

    def accepted_domain(self, domain: str) -> AcceptedDomain | None:
        """
        The accepted domain entry for C{domain}: an exact entry beats a
        wildcard one; among wildcards the longest wins.
        """
        best: AcceptedDomain | None = None
        for entry in self.accepted_domains:
            if entry.matches(domain):
                if not entry.domain.startswith("*."):
                    return entry
                if best is None or len(entry.domain) > len(best.domain):
                    best = entry
        return best
