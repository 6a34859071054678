"""
Tests for L{relaygw.config._load}: TOML to the frozen model, every error
naming file, 0-based key path and problem.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest

from relaygw.config import (
    AuthThrottle,
    Binding,
    Config,
    HostPort,
    Rate,
    Timeouts,
    load,
    load_default,
)
from relaygw.config import _checks
from relaygw.config._load import load_text
from relaygw.config._units import parse_range
from relaygw.connectors.selector import Conflict
from relaygw.errors import ConfigError

BASE_DIR = Path("/srv/relaygw")

CONNECTOR = """
[[connectors]]
name = "Default Frontend"
bindings = ["127.0.0.1:2525"]
"""


def _load(text: str) -> Config:
    return load_text(text, "relaygw.toml", BASE_DIR)


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(text)
    return str(info.value)


def _connector(extra: str, name: str = "C") -> str:
    return f'[[connectors]]\nname = "{name}"\nbindings = ["127.0.0.1:2525"]\n{extra}\n'


# --- whole-file problems -------------------------------------------------


def test_syntax_error_names_line_and_column() -> None:
    """A TOML syntax error names the line and column."""
    assert _error(CONNECTOR + "[gateway]\nhostname = mail\n") == (
        "relaygw.toml: TOML syntax error at line 6, column 12: Invalid value"
    )


def test_syntax_error_at_end_names_last_line() -> None:
    """A syntax error at the end of the document names the last line."""
    assert _error("a = 1\nb =") == (
        "relaygw.toml: TOML syntax error at line 2, the end of the file: Invalid value"
    )


def test_missing_file(tmp_path: Path) -> None:
    """A file that cannot be read is an error naming the file as given."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: cannot read the file: No such file or directory"


def test_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is refused before TOML parsing."""
    path = tmp_path / "relaygw.toml"
    path.write_bytes(b"# \xff\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: not UTF-8 text (byte 2)"


def test_error_names_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file in a message is the path exactly as the user gave it."""
    monkeypatch.chdir(tmp_path)
    Path("relaygw.toml").write_text("colour = 1\n" + CONNECTOR)
    with pytest.raises(ConfigError) as info:
        load("relaygw.toml")
    assert (info.value.file, info.value.key_path, info.value.problem) == (
        "relaygw.toml",
        "colour",
        "unknown key",
    )


def test_no_connectors() -> None:
    """A configuration without connectors would never listen: an error."""
    assert _error("[gateway]\n") == (
        "relaygw.toml: connectors: at least one [[connectors]] table is required"
    )


# --- unknown keys and types ----------------------------------------------


def test_unknown_key_at_top() -> None:
    """An unknown top-level key is an error, with a suggestion when one is close."""
    assert _error(CONNECTOR + "[gatway]\n") == (
        "relaygw.toml: gatway: unknown key (did you mean 'gateway'?)"
    )


def test_unknown_key_in_section() -> None:
    """An unknown key in a section is an error at its key path."""
    assert _error(CONNECTOR + "[gateway]\nspool = 'x'\n") == (
        "relaygw.toml: gateway.spool: unknown key (did you mean 'spool_dir'?)"
    )


def test_unknown_key_reported_before_missing_key() -> None:
    """A misspelt required key is reported as unknown, not as missing."""
    assert _error('[[connectors]]\nname = "A"\nbindigs = ["127.0.0.1:25"]\n') == (
        "relaygw.toml: connectors[0].bindigs: unknown key (did you mean 'bindings'?)"
    )


def test_unknown_key_in_inline_table() -> None:
    """Unknown keys inside inline tables name the full path."""
    assert _error(_connector('timeouts = { command = "5m", idle = "1m" }')) == (
        "relaygw.toml: connectors[0].timeouts.idle: unknown key"
    )


def test_unknown_key_in_dotted_table() -> None:
    """Dotted keys build tables whose unknown keys are errors too."""
    assert _error(_connector('permissions.everyone = ["submit"]')) == (
        "relaygw.toml: connectors[0].permissions.everyone: unknown key"
    )


def test_unknown_key_in_array_of_inline_tables() -> None:
    """Unknown keys inside an element of an array of tables name its index."""
    text = _connector('grants = [ { group = "G", rights = ["relay"], right = [] } ]')
    assert _error(text) == (
        "relaygw.toml: connectors[0].grants[0].right: unknown key (did you mean 'rights'?)"
    )


def test_wrong_type_integer() -> None:
    """A string where an integer belongs is an error naming both."""
    assert _error(_connector('max_recipients = "200"')) == (
        "relaygw.toml: connectors[0].max_recipients: expected an integer, got the string '200'"
    )


def test_wrong_type_boolean_for_integer() -> None:
    """Booleans are not integers, although Python thinks so."""
    assert _error(_connector("max_recipients = true")) == (
        "relaygw.toml: connectors[0].max_recipients: expected an integer, got the boolean true"
    )


def test_wrong_type_string() -> None:
    """An integer where a string belongs is an error."""
    assert _error(CONNECTOR + "[gateway]\nhostname = 42\n") == (
        "relaygw.toml: gateway.hostname: expected a string, got the integer 42"
    )


def test_wrong_type_boolean() -> None:
    """A string where a boolean belongs is an error."""
    assert _error(_connector('enabled = "yes"')) == (
        "relaygw.toml: connectors[0].enabled: expected true or false, got the string 'yes'"
    )


def test_wrong_type_array_element() -> None:
    """A non-string element of a string array is an error at its index."""
    assert _error('[[connectors]]\nname = "A"\nbindings = ["127.0.0.1:25", 26]\n') == (
        "relaygw.toml: connectors[0].bindings[1]: expected a string, got the integer 26"
    )


def test_wrong_type_section() -> None:
    """A value where a section belongs is an error."""
    assert _error("queue = 5\n" + CONNECTOR) == (
        "relaygw.toml: queue: expected a table, got the integer 5"
    )


def test_single_table_for_array_of_tables() -> None:
    """[connectors] written for [[connectors]] is an error that says so."""
    assert _error('[connectors]\nname = "A"\n') == (
        "relaygw.toml: connectors: expected an array of tables ([[connectors]]), got a table"
    )


def test_out_of_range_integer() -> None:
    """Integers below their minimum are errors."""
    assert _error(_connector("max_connections = 0")) == (
        "relaygw.toml: connectors[0].max_connections: 0 is out of range; it must be 1 or more"
    )


def test_bad_choice() -> None:
    """Enumerated values list the choices."""
    assert _error(_connector('tls = "on"')) == (
        'relaygw.toml: connectors[0].tls: \'on\' is not one of "starttls", "implicit", "off"'
    )


def test_missing_required_key() -> None:
    """A missing required key is named."""
    assert _error('[[connectors]]\nbindings = ["127.0.0.1:25"]\n') == (
        "relaygw.toml: connectors[0].name: required, but missing"
    )


# --- value notations -----------------------------------------------------


def test_bad_range_spec_example() -> None:
    """SPEC's example message: a bad range, 0-based connector and range index."""
    text = (
        _connector("", "A")
        + _connector("", "B")
        + _connector('remote_ranges = ["192.168.0.300"]', "C")
    )
    assert _error(text) == (
        "relaygw.toml: connectors[2].remote_ranges[0]: '192.168.0.300'"
        " is not an IP address, network or range"
    )


def test_bad_size() -> None:
    """A bad size names the key."""
    assert _error(_connector('max_message_size = "36 megs"')) == (
        "relaygw.toml: connectors[0].max_message_size: '36 megs' is not a size"
        " (bytes, or a number with KB, MB, GB, KiB, MiB or GiB)"
    )


def test_zero_size() -> None:
    """A message size limit of zero bytes is refused."""
    assert _error(_connector("max_message_size = 0")) == (
        "relaygw.toml: connectors[0].max_message_size: 0 is zero;"
        " a size here must be at least 1 byte"
    )


def test_size_forms() -> None:
    """Sizes may be integers or unit strings."""
    assert _load(_connector('max_message_size = "10MB"')).connectors[0].max_message_size == 10**7
    assert _load(_connector("max_message_size = 1000")).connectors[0].max_message_size == 1000


def test_bad_duration() -> None:
    """A bad duration names the key inside an inline table."""
    assert _error(_connector('timeouts = { command = "5 minutes" }')) == (
        "relaygw.toml: connectors[0].timeouts.command: '5 minutes' is not a duration"
        ' (a whole number followed by s, m, h or d, such as "30s" or "5m")'
    )


def test_zero_duration_refused_where_meaningless() -> None:
    """C{"0s"} is refused where it does not mean "disabled"."""
    assert _error(_connector('timeouts = { data = "0s" }')) == (
        "relaygw.toml: connectors[0].timeouts.data: must be longer than 0s"
    )


def test_zero_duration_disables() -> None:
    """C{"0s"} is allowed for delay_warning and cache_ttl, where it disables."""
    config = _load(
        CONNECTOR
        + '[queue]\ndelay_warning = "0s"\n'
        + '[directory]\nservers = ["ldap://dc1"]\nbase_dn = "DC=x"\ncache_ttl = "0s"\n'
    )
    assert config.queue.delay_warning == timedelta(0)
    assert config.directory is not None and config.directory.cache_ttl == timedelta(0)


def test_bad_rate() -> None:
    """A bad rate names the key."""
    assert _error(_connector('message_rate_limit = "600/min"')) == (
        "relaygw.toml: connectors[0].message_rate_limit: '600/min' is not a rate"
        ' (a whole number per second, minute or hour, such as "600/m")'
    )


def test_unlimited_rate() -> None:
    """C{"unlimited"} turns the message rate limit off."""
    config = _load(_connector('message_rate_limit = "unlimited"'))
    assert config.connectors[0].message_rate_limit is None


def test_bad_binding() -> None:
    """A host name in a binding is refused at the binding's index."""
    assert _error('[[connectors]]\nname = "A"\nbindings = ["[::]:25", "mail:25"]\n') == (
        "relaygw.toml: connectors[0].bindings[1]: 'mail:25' is not a binding; write an IP"
        ' address and a port, such as "0.0.0.0:25" or "[::]:25"'
    )


def test_duplicate_binding() -> None:
    """One connector listing a binding twice is an error."""
    text = '[[connectors]]\nname = "A"\nbindings = ["0.0.0.0:25", "0.0.0.0:25"]\n'
    assert _error(text) == "relaygw.toml: connectors[0].bindings[1]: '0.0.0.0:25' is listed twice"


def test_empty_bindings() -> None:
    """A connector must have a binding."""
    assert _error('[[connectors]]\nname = "A"\nbindings = []\n') == (
        "relaygw.toml: connectors[0].bindings: must list at least one binding"
    )


def test_empty_remote_ranges() -> None:
    """An empty remote_ranges list would never match and is refused."""
    assert _error(_connector("remote_ranges = []")) == (
        "relaygw.toml: connectors[0].remote_ranges: must list at least one range"
        " (omit it for every address)"
    )


def test_bad_right() -> None:
    """Rights must be the plain names of SPEC's rights table."""
    assert _error(_connector('permissions.anonymous = ["ms-Exch-SMTP-Submit"]')) == (
        "relaygw.toml: connectors[0].permissions.anonymous[0]: 'ms-Exch-SMTP-Submit' is not a"
        " right (one of accept-any-sender, accept-authoritative-sender, relay, submit)"
    )


def test_bad_banner_placeholder() -> None:
    """Banners may only use {fqdn}, {connector} and {date}."""
    assert _error(_connector('banner = "{host} ready"')) == (
        "relaygw.toml: connectors[0].banner: '{host} ready' uses {host};"
        " the placeholders are {fqdn}, {connector} and {date}"
    )


def test_bad_mechanism() -> None:
    """Only PLAIN and LOGIN are supported."""
    assert _error(_connector('auth_mechanisms = ["PLAIN", "CRAM-MD5"]')) == (
        "relaygw.toml: connectors[0].auth_mechanisms[1]: 'CRAM-MD5' is not a supported"
        " mechanism (PLAIN, LOGIN)"
    )


def test_require_tls_without_tls() -> None:
    """require_tls cannot be met on a connector without TLS."""
    assert _error(_connector('tls = "off"\nrequire_tls = true')) == (
        'relaygw.toml: connectors[0].require_tls: cannot be met with tls = "off"'
    )


def test_proxy_protocol_needs_trusted_proxies() -> None:
    """proxy_protocol without trusted proxies would refuse every connection."""
    assert _error(_connector("proxy_protocol = true")) == (
        "relaygw.toml: connectors[0].trusted_proxies: proxy_protocol is on,"
        " so the proxies' addresses are needed"
    )


def test_auth_throttle_max_delay_below_delay() -> None:
    """The throttle's cap must not be below its first delay."""
    assert _error(_connector('auth_throttle = { delay = "1m", max_delay = "30s" }')) == (
        "relaygw.toml: connectors[0].auth_throttle.max_delay: must not be shorter than delay"
    )


def test_admin_listen_needs_address() -> None:
    """admin_listen is an address and port, not a host name."""
    assert _error(CONNECTOR + '[gateway]\nadmin_listen = "localhost:8025"\n') == (
        "relaygw.toml: gateway.admin_listen: 'localhost:8025' is not a binding; write an IP"
        ' address and a port, such as "0.0.0.0:25" or "[::]:25"'
    )


def test_dns_server_by_name() -> None:
    """DNS servers are given by address."""
    assert _error(CONNECTOR + '[dns]\nservers = ["ns1.example.com"]\n') == (
        "relaygw.toml: dns.servers[0]: 'ns1.example.com': a DNS server is given by its IP address"
    )


def test_empty_retry() -> None:
    """The retry schedule needs an interval."""
    assert _error(CONNECTOR + "[queue]\nretry = []\n") == (
        "relaygw.toml: queue.retry: must list at least one interval"
    )


def test_bad_accepted_domain() -> None:
    """Accepted domains must be domain names."""
    text = CONNECTOR + '[[accepted_domains]]\ndomain = "*"\nroute = "r"\n'
    assert _error(text) == (
        "relaygw.toml: accepted_domains[0].domain: '*' is not a domain name"
        ' (such as "example.com" or "*.example.com")'
    )


def test_empty_spool_dir() -> None:
    """An empty spool_dir is refused rather than taken as the current directory."""
    assert _error(CONNECTOR + '[gateway]\nspool_dir = ""\n') == (
        "relaygw.toml: gateway.spool_dir: must not be empty"
    )


# --- directory -----------------------------------------------------------


def test_directory_needs_servers() -> None:
    """A directory without servers is an error."""
    assert _error(CONNECTOR + '[directory]\nbase_dn = "DC=x"\n') == (
        "relaygw.toml: directory.servers: required, but missing"
    )


def test_directory_empty_servers() -> None:
    """A directory with an empty server list is an error."""
    assert _error(CONNECTOR + '[directory]\nservers = []\nbase_dn = "DC=x"\n') == (
        "relaygw.toml: directory.servers: must list at least one ldap:// or ldaps:// server"
    )


def test_directory_bad_url() -> None:
    """Directory servers are ldap:// or ldaps:// URLs."""
    assert _error(CONNECTOR + '[directory]\nservers = ["dc1.example.com"]\nbase_dn = "DC=x"\n') == (
        "relaygw.toml: directory.servers[0]: 'dc1.example.com' is not an LDAP server URL"
        " (ldap://host[:port] or ldaps://host[:port])"
    )


def test_directory_needs_base_dn() -> None:
    """A directory without base_dn is an error."""
    assert _error(CONNECTOR + '[directory]\nservers = ["ldap://dc1"]\n') == (
        "relaygw.toml: directory.base_dn: required, but missing"
    )


def test_directory_bind_dn_needs_password_file() -> None:
    """A bind DN without a password would be an unauthenticated bind."""
    text = CONNECTOR + '[directory]\nservers = ["ldap://dc1"]\nbase_dn = "DC=x"\nbind_dn = "CN=s"\n'
    assert _error(text) == (
        "relaygw.toml: directory.bind_password_file: bind_dn is set, so a password file is needed"
    )


def test_directory_user_filter_needs_placeholder() -> None:
    """A user filter without {user} could not find the user."""
    text = (
        CONNECTOR
        + '[directory]\nservers = ["ldap://dc1"]\nbase_dn = "DC=x"\nuser_filter = "(uid=bob)"\n'
    )
    assert _error(text) == (
        "relaygw.toml: directory.user_filter: '(uid=bob)' does not contain {user}, the login name"
    )


def test_directory_defaults_active_directory() -> None:
    """AD defaults: SPEC's AD user filter and mail plus proxyAddresses."""
    config = _load(CONNECTOR + '[directory]\nservers = ["ldaps://dc1"]\nbase_dn = "DC=x"\n')
    d = config.directory
    assert d is not None
    assert (d.kind, d.address_attributes) == ("active-directory", ("mail", "proxyAddresses"))
    assert d.user_filter == (
        "(&(objectCategory=person)(objectClass=user)"
        "(|(sAMAccountName={user})(userPrincipalName={user})(mail={user})))"
    )
    assert (d.start_tls, d.timeout, d.cache_ttl) == (True, timedelta(seconds=5), timedelta(minutes=5))


def test_directory_defaults_ldap() -> None:
    """LDAP defaults: SPEC's inetOrgPerson filter and mail."""
    text = CONNECTOR + '[directory]\nkind = "ldap"\nservers = ["ldap://x"]\nbase_dn = "dc=x"\n'
    d = _load(text).directory
    assert d is not None
    assert d.user_filter == "(&(objectClass=inetOrgPerson)(|(uid={user})(mail={user})))"
    assert d.address_attributes == ("mail",)


# --- routes and domains --------------------------------------------------


def test_smarthost_route_needs_hosts() -> None:
    """via = "smarthost" without smarthosts is an error."""
    assert _error(CONNECTOR + '[[routes]]\nname = "x"\nvia = "smarthost"\n') == (
        'relaygw.toml: routes[0].smarthosts: via = "smarthost" needs at least one smarthost'
    )


def test_maildir_route_needs_maildir() -> None:
    """via = "maildir" without maildir is an error."""
    assert _error(CONNECTOR + '[[routes]]\nname = "x"\nvia = "maildir"\n') == (
        'relaygw.toml: routes[0].maildir: via = "maildir" needs the Maildir directory'
    )


def test_smarthosts_on_mx_route() -> None:
    """smarthosts on a route that does not use them is an error, not ignored."""
    assert _error(CONNECTOR + '[[routes]]\nname = "x"\nsmarthosts = ["a.example.com"]\n') == (
        'relaygw.toml: routes[0].smarthosts: is only used with via = "smarthost"'
        ' (this route has via = "mx")'
    )


def test_mta_sts_only_on_mx_routes() -> None:
    """tls = "mta-sts" follows a recipient domain's policy: meaningless for a smarthost."""
    text = CONNECTOR + '[[routes]]\nname = "x"\nvia = "smarthost"\nsmarthosts = ["a"]\ntls = "mta-sts"\n'
    assert _error(text) == (
        'relaygw.toml: routes[0].tls: "mta-sts" is only used with via = "mx"'
        ' (this route has via = "smarthost")'
    )


def test_ip_literals_only_on_mx_routes() -> None:
    """ip_literals = true on a smarthost route is an error; on an mx route it is kept."""
    text = CONNECTOR + '[[routes]]\nname = "x"\nvia = "smarthost"\nsmarthosts = ["a"]\nip_literals = true\n'
    assert _error(text) == 'relaygw.toml: routes[0].ip_literals: is only used with via = "mx"'
    config = _load(CONNECTOR + '[[routes]]\nname = "x"\nip_literals = true\n')
    assert config.routes[0].ip_literals is True


def test_route_auth_user_needs_password_file() -> None:
    """Outbound AUTH needs a password file."""
    text = CONNECTOR + '[[routes]]\nname = "x"\nvia = "smarthost"\nsmarthosts = ["a"]\nauth_user = "u"\n'
    assert _error(text) == (
        "relaygw.toml: routes[0].auth_password_file: auth_user is set, so a password file is needed"
    )


def test_route_ca_file_resolved() -> None:
    """A route's ca_file (tls = "verify") is a path relative to the configuration file."""
    text = CONNECTOR + '[[routes]]\nname = "x"\ntls = "verify"\nca_file = "tls/ca.pem"\n'
    route = _load(text).routes[0]
    assert route.ca_file == BASE_DIR / "tls" / "ca.pem"
    assert _load(CONNECTOR + '[[routes]]\nname = "x"\ntls = "verify"\n').routes[0].ca_file is None


def test_route_ca_file_needs_verify() -> None:
    """ca_file on a route that does not verify certificates is an error, not ignored."""
    text = CONNECTOR + '[[routes]]\nname = "x"\nca_file = "ca.pem"\n'
    assert _error(text) == (
        'relaygw.toml: routes[0].ca_file: is only used with tls = "verify" or "mta-sts"'
        ' (this route has tls = "opportunistic")'
    )


def test_smarthost_default_port_is_route_port() -> None:
    """A smarthost without a port uses the route's port."""
    text = CONNECTOR + '[[routes]]\nname = "x"\nvia = "smarthost"\nport = 587\nsmarthosts = ["a", "b:25"]\n'
    assert _load(text).routes[0].smarthosts == (HostPort("a", 587), HostPort("b", 25))


def test_duplicate_route_name() -> None:
    """Route names are unique."""
    text = CONNECTOR + '[[routes]]\nname = "x"\n[[routes]]\nname = "x"\n'
    assert _error(text) == "relaygw.toml: routes[1].name: 'x' is already the name of routes[0]"


def test_undefined_route_of_domain() -> None:
    """An accepted domain naming an undefined route is an error listing the routes."""
    text = CONNECTOR + '[[accepted_domains]]\ndomain = "a.test"\nroute = "exchange"\n'
    text += '[[routes]]\nname = "internet"\n'
    assert _error(text) == (
        "relaygw.toml: accepted_domains[0].route: no route is named 'exchange'"
        " (the [[routes]] are: 'internet')"
    )


def test_undefined_default_route() -> None:
    """gateway.default_route must name a route."""
    assert _error(CONNECTOR + '[gateway]\ndefault_route = "internet"\n') == (
        "relaygw.toml: gateway.default_route: no route is named 'internet'"
        " (the [[routes]] are: none)"
    )


def test_domain_without_any_route() -> None:
    """An accepted domain needs a route or a default route."""
    assert _error(CONNECTOR + '[[accepted_domains]]\ndomain = "a.test"\n') == (
        "relaygw.toml: accepted_domains[0].route: required,"
        " as there is no gateway.default_route to fall back on"
    )


def test_domain_route_defaults_to_default_route() -> None:
    """An accepted domain without a route uses gateway.default_route."""
    text = CONNECTOR + '[gateway]\ndefault_route = "internet"\n[[routes]]\nname = "internet"\n'
    text += '[[accepted_domains]]\ndomain = "A.Test."\n'
    domain = _load(text).accepted_domains[0]
    assert (domain.domain, domain.route, domain.type) == ("a.test", "internet", "authoritative")


def test_duplicate_accepted_domain() -> None:
    """An accepted domain listed twice (in any case) is an error."""
    text = CONNECTOR + '[gateway]\ndefault_route = "r"\n[[routes]]\nname = "r"\n'
    text += '[[accepted_domains]]\ndomain = "a.test"\n[[accepted_domains]]\ndomain = "A.test"\n'
    assert _error(text) == (
        "relaygw.toml: accepted_domains[1].domain: 'a.test' is already listed at accepted_domains[0]"
    )


# --- connectors cross-checks ---------------------------------------------


def test_duplicate_connector_name() -> None:
    """Connector names are unique, compared case-insensitively as in Exchange."""
    text = _connector("", "Client") + _connector('bindings = ["127.0.0.1:587"]', "client")
    text = text.replace('bindings = ["127.0.0.1:2525"]\nbindings', "bindings")
    assert _error(text) == (
        "relaygw.toml: connectors[1].name: 'client' is already the name of connectors[0]"
    )


def _two(first: str, second: str) -> str:
    return (
        f'[[connectors]]\nname = "A"\nbindings = ["0.0.0.0:25"]\n{first}\n'
        f'[[connectors]]\nname = "B"\nbindings = ["[::]:25", "127.0.0.1:25"]\n'
        f'remote_ranges = ["10.0.0.0/8"]\n{second}\n'
    )


def test_shared_binding_disagrees_on_implicit_tls() -> None:
    """Connectors on one binding (wildcard and specific) must agree on implicit TLS."""
    assert _error(_two("", 'tls = "implicit"')) == (
        "relaygw.toml: connectors[1].bindings[1]: '127.0.0.1:25' is shared with connector 'A'"
        " (connectors[0], '0.0.0.0:25'), which has tls = \"starttls\", and this one has"
        ' tls = "implicit"; they must agree on implicit TLS'
    )


def test_shared_binding_starttls_and_off_agree() -> None:
    """tls = "off" and "starttls" both start in plain text and may share a binding."""
    config = _load(_two("", 'tls = "off"'))
    assert [c.tls for c in config.connectors] == ["starttls", "off"]


def test_shared_binding_disagrees_on_proxy_protocol() -> None:
    """Connectors on one binding must agree on proxy_protocol."""
    text = _two('proxy_protocol = true\ntrusted_proxies = ["192.0.2.1"]', "")
    assert _error(text) == (
        "relaygw.toml: connectors[1].bindings[1]: '127.0.0.1:25' is shared with connector 'A'"
        " (connectors[0], '0.0.0.0:25'), which has proxy_protocol = true, and this one has"
        " false; they must agree on proxy_protocol"
    )


def test_shared_binding_disagrees_on_trusted_proxies() -> None:
    """Connectors on one binding must trust the same proxies."""
    text = _two(
        'proxy_protocol = true\ntrusted_proxies = ["192.0.2.1"]',
        'proxy_protocol = true\ntrusted_proxies = ["192.0.2.2"]',
    )
    assert _error(text) == (
        "relaygw.toml: connectors[1].bindings[1]: '127.0.0.1:25' is shared with connector 'A'"
        " (connectors[0], '0.0.0.0:25'), which has other trusted_proxies;"
        " they must agree on trusted_proxies"
    )


def test_shared_binding_same_proxies_other_spelling() -> None:
    """The same trusted proxies written differently agree."""
    text = _two(
        'proxy_protocol = true\ntrusted_proxies = ["192.0.2.0/31"]',
        'proxy_protocol = true\ntrusted_proxies = ["192.0.2.0-192.0.2.1"]',
    )
    assert len(_load(text).connectors) == 2


def test_other_family_wildcard_not_shared() -> None:
    """[::]:25 and 127.0.0.1:25 are not shared, so they may disagree."""
    text = (
        '[[connectors]]\nname = "A"\nbindings = ["[::]:25"]\ntls = "implicit"\n'
        '[[connectors]]\nname = "B"\nbindings = ["127.0.0.1:25"]\n'
    )
    assert len(_load(text).connectors) == 2


def test_overlapping_ranges_on_shared_binding() -> None:
    """Same-size overlapping ranges of two connectors on one binding are an error
    at the later connector's range (reported by the selector's find_conflicts)."""
    text = (
        '[[connectors]]\nname = "A"\nbindings = ["0.0.0.0:25"]\nremote_ranges = ["10.0.0.0/8"]\n'
        '[[connectors]]\nname = "B"\nbindings = ["0.0.0.0:25"]\n'
        'remote_ranges = ["192.0.2.1", "10.0.0.0-10.255.255.255"]\n'
    )
    with pytest.raises(ConfigError) as info:
        _load(text)
    assert str(info.value) == (
        "relaygw.toml: connectors[1].remote_ranges[1]: overlaps connectors[0] ('A')"
        " remote_ranges[0] '10.0.0.0/8' with a range of the same size on binding"
        " 0.0.0.0:25"
    )


def test_equal_ranges_on_specific_binding_beside_wildcard() -> None:
    """Issue 6: equal ranges on 0.0.0.0:P and 127.0.0.2:P load (the specific binding wins)."""
    text = (
        '[[connectors]]\nname = "Any"\nbindings = ["0.0.0.0:25"]\nremote_ranges = ["127.0.0.0/8"]\n'
        '[[connectors]]\nname = "Lo2"\nbindings = ["127.0.0.2:25"]\nremote_ranges = ["127.0.0.0/8"]\n'
    )
    assert [c.name for c in _load(text).connectors] == ["Any", "Lo2"]


def test_conflict_mapped_to_key_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A conflict from find_conflicts becomes a ConfigError at its connector and range."""
    calls = []

    def fake(connectors: object) -> list[Conflict]:
        calls.append(connectors)
        return [Conflict(0, 1, "first"), Conflict(0, 2, "second")]

    monkeypatch.setattr(_checks, "find_conflicts", fake)
    assert _error(_connector("")) == "relaygw.toml: connectors[0].remote_ranges[1]: first"
    assert len(calls) == 1


# --- defaults and values -------------------------------------------------


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """A minimal file gets the documented defaults."""
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "relay.example.org")
    config = _load(CONNECTOR)
    gateway = config.gateway
    assert gateway.hostname == "relay.example.org"
    assert (gateway.spool_dir, gateway.log_dir) == (Path("/var/spool/relaygw"), Path("/var/log/relaygw"))
    assert gateway.admin_listen == HostPort("127.0.0.1", 8025)
    assert gateway.default_route is None
    assert config.users is not None and config.users.file == BASE_DIR / "users"
    assert (config.directory, config.routes, config.accepted_domains) == (None, (), ())
    c = config.connectors[0]
    assert c.fqdn == "relay.example.org"
    assert [r.text for r in c.remote_ranges] == ["0.0.0.0-255.255.255.255", "::/0"]
    assert c.remote_ranges == (parse_range("0.0.0.0/0"), parse_range("::/0"))
    assert c.certificate == BASE_DIR / "tls" / "relaygw.pem"
    assert c.permissions_anonymous == {"submit", "accept-authoritative-sender"}
    assert c.permissions_authenticated == {"submit", "relay"}
    assert c.message_rate_limit == Rate(600, timedelta(minutes=1))
    assert (c.timeouts, c.auth_throttle) == (Timeouts(), AuthThrottle())
    assert (c.index, c.tls, c.enabled, c.max_message_size) == (0, "starttls", True, 36 * 2**20)


def test_unusable_fqdn_falls_back_to_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the machine's name is not a valid host name, "localhost" is used."""
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "bad_name")
    assert _load(CONNECTOR).gateway.hostname == "localhost"


def test_connector_fqdn_defaults_to_hostname() -> None:
    """A connector's fqdn defaults to gateway.hostname."""
    config = _load(CONNECTOR + '[gateway]\nhostname = "mail.example.com."\n')
    assert config.connectors[0].fqdn == "mail.example.com"


def test_no_certificate_without_tls() -> None:
    """A connector with tls = "off" has no certificate unless one is given."""
    assert _load(_connector('tls = "off"')).connectors[0].certificate is None


def test_admin_listen_empty_disables() -> None:
    """admin_listen = "" turns the admin HTTP listener off."""
    assert _load(CONNECTOR + '[gateway]\nadmin_listen = ""\n').gateway.admin_listen is None


def test_admin_listen_ipv6() -> None:
    """admin_listen takes bracketed IPv6."""
    config = _load(CONNECTOR + '[gateway]\nadmin_listen = "[::1]:9025"\n')
    assert config.gateway.admin_listen == HostPort("::1", 9025)


def test_no_users_file_with_directory() -> None:
    """With a [directory] and no [users], there is no users file."""
    config = _load(CONNECTOR + '[directory]\nservers = ["ldap://dc1"]\nbase_dn = "DC=x"\n')
    assert config.users is None


def test_connector_values() -> None:
    """Every connector key reaches the model."""
    config = _load(
        '[[connectors]]\nname = "Relay"\nbindings = ["0.0.0.0:25", "[::]:25"]\n'
        'remote_ranges = ["::ffff:192.0.2.0/120", "2001:db8::/32"]\nenabled = false\n'
        'fqdn = "relay.example.com"\nbanner = "{fqdn} {connector} at {date}"\ntls = "implicit"\n'
        'certificate = "/etc/ssl/r.pem"\nmin_tls_version = "1.0"\nrequire_tls = true\n'
        'auth_mechanisms = ["login"]\nallow_plaintext_auth = true\n'
        'permissions = { anonymous = [], authenticated = ["submit"] }\n'
        'grants = [ { group = "CN=Relay,DC=x", rights = ["relay", "accept-any-sender"] } ]\n'
        'protocol_logging = "verbose"\nmax_message_size = "512KiB"\nmax_recipients = 5\n'
        "max_connections = 7\nmax_connections_per_ip = 3\nmessage_rate_limit = \"10/s\"\n"
        'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1"]\n'
        'timeouts = { command = "30s", data = "2m" }\n'
        'auth_throttle = { max_failures = 3, window = "1h", delay = "0s", max_delay = "1m" }\n'
    )
    c = config.connectors[0]
    assert c.bindings == (Binding("0.0.0.0", 25), Binding("::", 25))
    assert c.remote_ranges == (parse_range("192.0.2.0/24"), parse_range("2001:db8::/32"))
    assert (c.enabled, c.fqdn, c.banner) == (False, "relay.example.com", "{fqdn} {connector} at {date}")
    assert (c.tls, c.certificate, c.min_tls_version, c.require_tls) == (
        "implicit", Path("/etc/ssl/r.pem"), "1.0", True
    )
    assert (c.auth_mechanisms, c.allow_plaintext_auth) == (("LOGIN",), True)
    assert c.permissions_anonymous == frozenset()
    assert c.permissions_authenticated == frozenset({"submit"})
    assert [(g.group, g.rights) for g in c.grants] == [
        ("CN=Relay,DC=x", frozenset({"relay", "accept-any-sender"}))
    ]
    assert (c.protocol_logging, c.max_message_size, c.max_recipients) == ("verbose", 512 * 1024, 5)
    assert (c.max_connections, c.max_connections_per_ip) == (7, 3)
    assert c.message_rate_limit == Rate(10, timedelta(seconds=1))
    assert (c.proxy_protocol, c.trusted_proxies) == (True, (parse_range("127.0.0.1"),))
    assert c.timeouts == Timeouts(timedelta(seconds=30), timedelta(minutes=2))
    assert c.auth_throttle == AuthThrottle(3, timedelta(hours=1), timedelta(0), timedelta(minutes=1))


def test_queue_values() -> None:
    """[queue] durations reach the model."""
    config = _load(CONNECTOR + '[queue]\nretry = ["30s", "1h"]\nexpire = "5d"\n')
    assert config.queue.retry == (timedelta(seconds=30), timedelta(hours=1))
    assert config.queue.expire == timedelta(days=5)


def test_dns_servers() -> None:
    """DNS servers default to port 53."""
    config = _load(CONNECTOR + '[dns]\nservers = ["127.0.0.1:5353", "::1"]\n')
    assert config.dns.servers == (HostPort("127.0.0.1", 5353), HostPort("::1", 53))


# --- paths ---------------------------------------------------------------


def test_relative_paths_resolve_against_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths resolve against the directory holding the file, not the CWD."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "relaygw.toml").write_text(
        CONNECTOR
        + '[gateway]\nspool_dir = "spool"\nlog_dir = "../log"\n'
        + '[users]\nfile = "/abs/users"\n'
        + '[[routes]]\nname = "m"\nvia = "maildir"\nmaildir = "mail"\n'
    )
    monkeypatch.chdir(tmp_path)
    config = load(os.path.join("etc", "relaygw.toml"))
    assert config.source == os.path.join("etc", "relaygw.toml")
    assert config.gateway.spool_dir == tmp_path / "etc" / "spool"
    assert config.gateway.log_dir == tmp_path / "etc" / ".." / "log"
    assert config.gateway.spool_dir.is_absolute()
    assert config.users is not None and config.users.file == Path("/abs/users")
    assert config.routes[0].maildir == tmp_path / "etc" / "mail"
    assert config.connectors[0].certificate == tmp_path / "etc" / "tls" / "relaygw.pem"


def test_default_paths_resolve_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded default's relative paths resolve against the working directory."""
    monkeypatch.chdir(tmp_path)
    config = load_default()
    assert config.source == "<embedded default>"
    assert config.gateway.spool_dir == tmp_path / "var" / "spool"
    assert config.route("local").maildir == tmp_path / "var" / "mail"


def test_route_empty_auth_strings_mean_none() -> None:
    """SPEC's route sample, auth_user = "" and auth_password_file = "", means no AUTH."""
    text = CONNECTOR + (
        '[[routes]]\nname = "internet"\nvia = "mx"\nport = 25\ntls = "opportunistic"\n'
        'auth_user = ""\nauth_password_file = ""\nmax_concurrency = 20\n'
    )
    route = _load(text).routes[0]
    assert (route.auth_user, route.auth_password_file) == ("", None)


def test_grants_as_array_of_tables() -> None:
    """[[connectors.grants]] is the same as an inline array of grants."""
    text = CONNECTOR + '[[connectors.grants]]\ngroup = "Relay"\nrights = ["relay"]\n'
    grants = _load(text).connectors[0].grants
    assert [(g.group, g.rights) for g in grants] == [("Relay", frozenset({"relay"}))]
