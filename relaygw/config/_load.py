"""
Read the TOML configuration (SPEC section 2) into the frozen model.

The file is parsed with the standard library's C{tomllib} (this is its only
importer), every section is built into L{relaygw.config._model} objects, and
then the cross-checks run (L{relaygw.config._checks}).  The first problem
found raises L{ConfigError} naming the file, the 0-based key path and the
problem; nothing is half-loaded.  The loader does not touch the files a
configuration names (certificates, secrets, spool): they may not exist yet on
the machine that checks the file, and certificates are generated when missing.

Defaults that an Exchange or Postfix administrator may look for:

  - C{gateway.hostname}: the machine's FQDN (C{socket.getfqdn()}, Postfix's
    C{myhostname}); C{"localhost"} if that is not a valid host name.
  - C{gateway.spool_dir} and C{log_dir}: C{/var/spool/relaygw} and
    C{/var/log/relaygw} (FHS, like Postfix's queue directory).
  - C{gateway.admin_listen}: C{127.0.0.1:8025}; C{""} disables it.  On a
    non-loopback address C{gateway.admin_token_file} is required (the
    endpoint shows the queue: senders and recipients).
  - C{gateway.health_min_free}: twice the largest C{max_message_size}, at
    least 64 MiB; C{gateway.health_queue_age}: half of C{[queue].expire}
    (C{"0s"}: an old message never fails C{/health}).
  - a connector's C{fqdn}: C{gateway.hostname}; its C{remote_ranges}: every
    IPv4 and IPv6 address (Exchange's default RemoteIPRanges); its
    C{certificate}: C{tls/relaygw.pem} next to the file unless C{tls = "off"};
    C{message_rate_limit = "unlimited"} turns the limit off (Exchange's word).
  - an accepted domain's C{route}: C{gateway.default_route}.
  - C{[users]}: C{file = "users"} next to the configuration file, also when
    the section is absent, unless a C{[directory]} is configured.
  - C{[directory]}: C{kind = "active-directory"}; C{user_filter} and
    C{address_attributes} by kind (SPEC "Directory defaults").
  - a smarthost without a port uses the route's C{port}.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from importlib.resources import files
from pathlib import Path

from relaygw.config._checks import check
from relaygw.config._connector import CONNECTOR_KEYS, connector
from relaygw.config._model import (
    DNS,
    AcceptedDomain,
    Config,
    Directory,
    DirectoryKind,
    Gateway,
    HostPort,
    Queue,
    Route,
    RouteTLS,
    RouteVia,
    Users,
)
from relaygw.config._graph import GRAPH_KEYS, graph_route
from relaygw.config._oauth import route_auth
from relaygw.config._table import Source, Table
from relaygw.config._units import (
    parse_binding,
    parse_domain,
    parse_duration,
    parse_hostname,
    parse_hostport,
    parse_ldap_url,
    parse_range,
)
from relaygw.errors import ConfigError

__all__ = ["load", "load_text", "load_default", "DEFAULT_SOURCE"]

#: The source name of the embedded default configuration in messages.
DEFAULT_SOURCE = "<embedded default>"

_ROOT = (
    "gateway", "dns", "accepted_domains", "directory", "users", "connectors", "routes", "queue",
)  # fmt: skip
_GATEWAY = (
    "hostname", "spool_dir", "log_dir", "admin_listen", "admin_token_file", "default_route",
    "health_min_free", "health_queue_age", "workers", "log_messages",
)  # fmt: skip
_DOMAIN = ("domain", "type", "route", "validate_recipients")
_DIRECTORY = (
    "kind", "servers", "start_tls", "ca_file", "bind_dn", "bind_password_file", "base_dn",
    "user_filter", "address_attributes", "timeout", "cache_ttl",
)  # fmt: skip
_ROUTE = (
    "name", "via", "smarthosts", "maildir", "port", "tls", "ca_file", "auth_user",
    "auth_password_file", "max_concurrency", "ip_literals", "protocol_logging", "auth", "oauth",
    *GRAPH_KEYS,
)  # fmt: skip

_ROUTE_TLS: tuple[RouteTLS, ...] = ("off", "opportunistic", "required", "verify", "mta-sts")
_ADMIN_LISTEN: HostPort | None = HostPort("127.0.0.1", 8025)
_AD_FILTER = (
    "(&(objectCategory=person)(objectClass=user)"
    "(|(sAMAccountName={user})(userPrincipalName={user})(mail={user})))"
)
_LDAP_FILTER = "(&(objectClass=inetOrgPerson)(|(uid={user})(mail={user})))"
_DIRECTORY_DEFAULTS = {
    "active-directory": (_AD_FILTER, ("mail", "proxyAddresses")),
    "ldap": (_LDAP_FILTER, ("mail",)),
}


def load(path: str | os.PathLike[str]) -> Config:
    """
    Load and validate the configuration file at C{path}.

    Relative paths inside it resolve against the directory holding it.

    @return: the validated configuration, C{source} being C{str(path)}.
    @raise ConfigError: the file cannot be read, is not TOML, or is not a
        valid configuration; C{file} is C{str(path)}.
    """
    name = os.fspath(path)
    try:
        data = Path(name).read_bytes()
    except OSError as e:
        raise ConfigError(name, "", f"cannot read the file: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(name, "", f"not UTF-8 text (byte {e.start})") from None
    return load_text(text, name, Path(name).absolute().parent)


def load_default() -> Config:
    """
    Load the embedded default configuration (C{relaygw/config/default.toml}),
    its relative paths resolved against the current working directory.
    """
    text = files("relaygw.config").joinpath("default.toml").read_text(encoding="utf-8")
    return load_text(text, DEFAULT_SOURCE, Path.cwd())


def load_text(text: str, source: str, base_dir: Path) -> Config:
    """
    Validate configuration text.

    @param source: the name used in messages and stored as L{Config.source}.
    @param base_dir: what relative paths resolve against (made absolute).
    @raise ConfigError: the first problem found.
    """
    src = Source(source, base_dir.absolute())
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise src.error("", _syntax_problem(str(e), text)) from None
    return _config(src, data)


def _syntax_problem(message: str, text: str) -> str:
    detail, sep, where = message.rpartition(" (at ")
    if not sep:
        return f"TOML syntax error: {message}"
    where = where.rstrip(")")
    if where == "end of document":
        where = f"line {len(text.splitlines()) or 1}, the end of the file"
    return f"TOML syntax error at {where}: {detail}"


def _config(src: Source, data: Mapping[str, object]) -> Config:
    root = Table(src, "", data, _ROOT)
    gateway = _gateway(root.sub("gateway", _GATEWAY))
    dns = DNS(root.sub("dns", ("servers",)).parsed_list("servers", _dns_server, ()))
    directory_table = root.table("directory", _DIRECTORY)
    directory = _directory(directory_table) if directory_table else None
    users_table = root.table("users", ("file",))
    users = None
    if users_table is not None or directory is None:
        users_table = users_table or root.sub("users", ("file",))
        users = Users(_path(users_table, "file", "users"))
    domains = tuple(
        _accepted_domain(t, gateway.default_route)
        for t in root.tables("accepted_domains", _DOMAIN)
    )
    connector_tables = root.tables("connectors", CONNECTOR_KEYS)
    if not connector_tables:
        raise src.error("connectors", "at least one [[connectors]] table is required")
    connectors = tuple(
        connector(t, i, gateway.hostname) for i, t in enumerate(connector_tables)
    )
    routes = tuple(_route(t) for t in root.tables("routes", _ROUTE))
    config = Config(
        source=src.name,
        gateway=gateway,
        connectors=connectors,
        routes=routes,
        accepted_domains=domains,
        dns=dns,
        directory=directory,
        users=users,
        queue=_queue(root.sub("queue", ("retry", "expire", "delay_warning"))),
    )
    check(config, src)
    return config


def _default_hostname() -> str:
    name = socket.getfqdn()
    try:
        return parse_hostname(name)
    except ValueError:
        return "localhost"


def _path(t: Table, key: str, default: str) -> Path:
    path = t.path(key, default)
    if path is None:
        raise t.error(key, "must not be empty")
    return path


def _admin_listen(text: str) -> HostPort | None:
    if not text.strip():
        return None
    binding = parse_binding(text)
    return HostPort(binding.host, binding.port)


def _gateway(t: Table) -> Gateway:
    admin = t.parsed("admin_listen", _admin_listen, _ADMIN_LISTEN)
    token = t.path("admin_token_file", None)
    if admin is not None and token is None and not ipaddress.ip_address(admin.host).is_loopback:
        raise t.error(
            "admin_token_file",
            f"required when admin_listen ({admin}) is not a loopback address",
        )
    return Gateway(
        hostname=t.parsed("hostname", parse_hostname, "") or _default_hostname(),
        spool_dir=_path(t, "spool_dir", "/var/spool/relaygw"),
        log_dir=_path(t, "log_dir", "/var/log/relaygw"),
        admin_listen=admin,
        default_route=t.string("default_route", "") or None,
        admin_token_file=token,
        health_min_free=t.size("health_min_free", 0) or None,
        health_queue_age=t.parsed("health_queue_age", parse_duration, None),
        workers=t.integer("workers", 0, minimum=0, maximum=64),
        log_messages=t.boolean("log_messages", False),
    )


def _dns_server(text: str) -> HostPort:
    server = parse_hostport(text, 53)
    try:
        parse_range(server.host)
    except ValueError:
        raise ValueError(f"{text!r}: a DNS server is given by its IP address") from None
    return server


def _accepted_domain(t: Table, default_route: str | None) -> AcceptedDomain:
    t.required_string("domain")
    return AcceptedDomain(
        domain=t.parsed("domain", parse_domain, ""),
        type=t.choice("type", "authoritative", ("authoritative", "internal-relay")),
        route=t.string("route", "") or default_route,
        validate_recipients=t.boolean("validate_recipients", False),
    )


def _directory(t: Table) -> Directory:
    kind: DirectoryKind = t.choice("kind", "active-directory", ("active-directory", "ldap"))
    default_filter, default_attributes = _DIRECTORY_DEFAULTS[kind]
    servers = t.parsed_list("servers", parse_ldap_url, None)
    if not servers:
        raise t.error("servers", "must list at least one ldap:// or ldaps:// server")
    base_dn = t.required_string("base_dn")
    user_filter = t.parsed("user_filter", _user_filter, default_filter)
    attributes = t.strings("address_attributes", default_attributes)
    if not attributes:
        raise t.error("address_attributes", "must list at least one attribute")
    bind_dn = t.string("bind_dn", "")
    bind_password_file = t.path("bind_password_file", None)
    if bind_dn and bind_password_file is None:
        # A DN with no password is an "unauthenticated bind" (RFC 4513 5.1.2).
        raise t.error("bind_password_file", "bind_dn is set, so a password file is needed")
    if bind_password_file is not None and not bind_dn:
        raise t.error("bind_dn", "bind_password_file is set, so a bind DN is needed")
    return Directory(
        kind=kind,
        servers=servers,
        base_dn=base_dn,
        start_tls=t.boolean("start_tls", True),
        ca_file=t.path("ca_file", None),
        bind_dn=bind_dn,
        bind_password_file=bind_password_file,
        user_filter=user_filter,
        address_attributes=attributes,
        timeout=t.duration("timeout", timedelta(seconds=5)),
        cache_ttl=t.duration("cache_ttl", timedelta(minutes=5), zero=True),
    )


def _user_filter(text: str) -> str:
    if "{user}" not in text:
        raise ValueError(f"{text!r} does not contain {{user}}, the login name")
    if not text.startswith("(") or text.count("(") != text.count(")"):
        raise ValueError(f"{text!r} is not an LDAP filter in balanced parentheses")
    return text


def _route(t: Table) -> Route:
    name = t.required_string("name")
    via: RouteVia = t.choice("via", "mx", ("mx", "smarthost", "maildir", "graph"))
    port = t.integer("port", 25, maximum=65535)
    smarthosts = t.parsed_list("smarthosts", lambda s: parse_hostport(s, port), ())
    maildir = t.path("maildir", None)
    if via == "smarthost" and not smarthosts:
        raise t.error("smarthosts", 'via = "smarthost" needs at least one smarthost')
    if via == "maildir" and maildir is None:
        raise t.error("maildir", 'via = "maildir" needs the Maildir directory')
    for key, present, wanted in (
        ("smarthosts", smarthosts, "smarthost"),
        ("maildir", maildir, "maildir"),
    ):
        if present and via != wanted:
            raise t.error(
                key, f'is only used with via = "{wanted}" (this route has via = "{via}")'
            )
    tls = t.choice("tls", "opportunistic", _ROUTE_TLS)
    ca_file = t.path("ca_file", None)
    if ca_file is not None and tls not in ("verify", "mta-sts") and via != "graph":
        raise t.error(
            "ca_file", f'is only used with tls = "verify" or "mta-sts" (this route has tls = "{tls}")'
        )
    if tls == "mta-sts" and via != "mx":
        raise t.error("tls", f'"mta-sts" is only used with via = "mx" (this route has via = "{via}")')
    auth_user = t.string("auth_user", "")
    auth_password_file = t.path("auth_password_file", None)
    if auth_user and via != "smarthost":
        raise t.error("auth_user", 'is only used with via = "smarthost"')
    auth, oauth = route_auth(
        t, via=via, tls=tls, auth_user=auth_user, auth_password_file=auth_password_file
    )
    if auth_user and auth_password_file is None and auth == "password":
        raise t.error("auth_password_file", "auth_user is set, so a password file is needed")
    if auth_password_file is not None and not auth_user:
        raise t.error("auth_user", "auth_password_file is set, so a user name is needed")
    graph_endpoint, mailbox = graph_route(t, via)
    return Route(
        name=name,
        via=via,
        smarthosts=smarthosts,
        maildir=maildir,
        port=port,
        tls=tls,
        ca_file=ca_file,
        auth_user=auth_user,
        auth_password_file=auth_password_file,
        max_concurrency=t.integer("max_concurrency", 20),
        ip_literals=_ip_literals(t, via),
        protocol_logging=t.choice("protocol_logging", "none", ("none", "verbose")),
        auth=auth,
        oauth=oauth,
        graph_endpoint=graph_endpoint,
        mailbox=mailbox,
    )


def _ip_literals(t: Table, via: RouteVia) -> bool:
    allowed = t.boolean("ip_literals", False)
    if allowed and via != "mx":
        raise t.error("ip_literals", 'is only used with via = "mx"')
    return allowed


def _positive_duration(text: str) -> timedelta:
    span = parse_duration(text)
    if span == timedelta(0):
        raise ValueError("must be longer than 0s")
    return span


def _queue(t: Table) -> Queue:
    defaults = Queue()
    retry_texts = [f"{int(d.total_seconds())}s" for d in defaults.retry]
    retry = t.parsed_list("retry", _positive_duration, retry_texts)
    if not retry:
        raise t.error("retry", "must list at least one interval")
    return Queue(
        retry=retry,
        expire=t.duration("expire", defaults.expire),
        delay_warning=t.duration("delay_warning", defaults.delay_warning, zero=True),
    )
