"""
The C{[[connectors]]} entries of the configuration (SPEC section 2): one
receive connector each, with its bindings, remote ranges, TLS, AUTH, rights
and limits.  See L{relaygw.config._load} for the defaults in words.
"""

from __future__ import annotations

import string

from relaygw.config._model import (
    RIGHTS,
    AuthThrottle,
    Connector,
    Grant,
    Rate,
    Timeouts,
    TLSMode,
)
from relaygw.config._table import Table
from relaygw.config._units import (
    parse_binding,
    parse_hostname,
    parse_range,
    parse_rate,
)

#: Every key a C{[[connectors]]} table may hold.
CONNECTOR_KEYS = (
    "name", "bindings", "remote_ranges", "enabled", "fqdn", "banner", "tls", "certificate",
    "min_tls_version", "require_tls", "auth_mechanisms", "allow_plaintext_auth", "permissions",
    "grants", "protocol_logging", "max_message_size", "max_recipients", "max_connections",
    "max_connections_per_ip", "message_rate_limit", "proxy_protocol", "trusted_proxies",
    "timeouts", "auth_throttle",
)  # fmt: skip
_ALL_ADDRESSES = ("0.0.0.0-255.255.255.255", "::/0")
_BANNER_FIELDS = frozenset({"fqdn", "connector", "date"})


def _banner(text: str) -> str:
    if "\r" in text or "\n" in text:
        raise ValueError("a banner is one line")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}; write {{{{ and }}}} for literal braces") from None
    for name in fields:
        if name not in _BANNER_FIELDS:
            raise ValueError(
                f"{text!r} uses {{{name}}};"
                " the placeholders are {fqdn}, {connector} and {date}"
            )
    return text


def _right(text: str) -> str:
    if text not in RIGHTS:
        raise ValueError(f"{text!r} is not a right (one of {', '.join(sorted(RIGHTS))})")
    return text


def _mechanism(text: str) -> str:
    if text.upper() not in ("PLAIN", "LOGIN"):
        raise ValueError(f"{text!r} is not a supported mechanism (PLAIN, LOGIN)")
    return text.upper()


def _rate(text: str) -> Rate | None:
    return None if text.strip().lower() == "unlimited" else parse_rate(text)


def connector(t: Table, index: int, hostname: str) -> Connector:
    """
    Build one connector.

    @param t: the C{connectors[index]} table.
    @param index: its 0-based position in the file.
    @param hostname: C{gateway.hostname}, the default C{fqdn}.
    @raise ConfigError: the first problem in the table.
    """
    name = t.required_string("name")
    bindings = t.parsed_list("bindings", parse_binding, None)
    if not bindings:
        raise t.error("bindings", "must list at least one binding")
    for k, binding in enumerate(bindings):
        if binding in bindings[:k]:
            raise t.error(f"bindings[{k}]", f"{str(binding)!r} is listed twice")
    remote_ranges = t.parsed_list("remote_ranges", parse_range, _ALL_ADDRESSES)
    if not remote_ranges:
        raise t.error(
            "remote_ranges", "must list at least one range (omit it for every address)"
        )
    tls: TLSMode = t.choice("tls", "starttls", ("starttls", "implicit", "off"))
    certificate = t.path("certificate", None)
    if certificate is None and tls != "off":
        certificate = t.source.resolve("tls/relaygw.pem")
    require_tls = t.boolean("require_tls", False)
    if require_tls and tls == "off":
        raise t.error("require_tls", 'cannot be met with tls = "off"')
    proxy_protocol = t.boolean("proxy_protocol", False)
    trusted_proxies = t.parsed_list("trusted_proxies", parse_range, ())
    if proxy_protocol and not trusted_proxies:
        raise t.error(
            "trusted_proxies", "proxy_protocol is on, so the proxies' addresses are needed"
        )
    permissions = t.sub("permissions", ("anonymous", "authenticated"))
    defaults = Connector("", (), (), "")
    return Connector(
        name=name,
        bindings=bindings,
        remote_ranges=remote_ranges,
        fqdn=t.parsed("fqdn", parse_hostname, hostname),
        banner=t.parsed("banner", _banner, defaults.banner),
        enabled=t.boolean("enabled", True),
        tls=tls,
        certificate=certificate,
        min_tls_version=t.choice("min_tls_version", "1.2", ("1.0", "1.1", "1.2", "1.3")),
        require_tls=require_tls,
        auth_mechanisms=t.parsed_list("auth_mechanisms", _mechanism, defaults.auth_mechanisms),
        allow_plaintext_auth=t.boolean("allow_plaintext_auth", False),
        permissions_anonymous=frozenset(
            permissions.parsed_list("anonymous", _right, sorted(defaults.permissions_anonymous))
        ),
        permissions_authenticated=frozenset(
            permissions.parsed_list(
                "authenticated", _right, sorted(defaults.permissions_authenticated)
            )
        ),
        grants=tuple(
            Grant(g.required_string("group"), frozenset(g.parsed_list("rights", _right, None)))
            for g in t.tables("grants", ("group", "rights"))
        ),
        protocol_logging=t.choice("protocol_logging", "none", ("none", "verbose")),
        max_message_size=t.size("max_message_size", defaults.max_message_size),
        max_recipients=t.integer("max_recipients", defaults.max_recipients),
        max_connections=t.integer("max_connections", defaults.max_connections),
        max_connections_per_ip=t.integer(
            "max_connections_per_ip", defaults.max_connections_per_ip
        ),
        message_rate_limit=t.parsed("message_rate_limit", _rate, defaults.message_rate_limit),
        proxy_protocol=proxy_protocol,
        trusted_proxies=trusted_proxies,
        timeouts=_timeouts(t.sub("timeouts", ("command", "data"))),
        auth_throttle=_throttle(
            t.sub("auth_throttle", ("max_failures", "window", "delay", "max_delay"))
        ),
        index=index,
    )


def _timeouts(t: Table) -> Timeouts:
    defaults = Timeouts()
    return Timeouts(
        command=t.duration("command", defaults.command),
        data=t.duration("data", defaults.data),
    )


def _throttle(t: Table) -> AuthThrottle:
    defaults = AuthThrottle()
    throttle = AuthThrottle(
        max_failures=t.integer("max_failures", defaults.max_failures),
        window=t.duration("window", defaults.window),
        delay=t.duration("delay", defaults.delay, zero=True),
        max_delay=t.duration("max_delay", defaults.max_delay, zero=True),
    )
    if throttle.max_delay < throttle.delay:
        raise t.error("max_delay", "must not be shorter than delay")
    return throttle
