"""
Tests for L{relaygw.config._units}: the value notations of the configuration file.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from relaygw.config import Binding, HostPort, IPRange, Rate
from relaygw.config._units import (
    parse_binding,
    parse_domain,
    parse_duration,
    parse_hostname,
    parse_hostport,
    parse_ldap_url,
    parse_range,
    parse_rate,
    parse_size,
)


def _problem(parser: object, *args: object) -> str:
    assert callable(parser)
    with pytest.raises(ValueError) as info:
        parser(*args)
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1024, 1024),
        (0, 0),
        ("1024", 1024),
        ("36MiB", 36 * 1024 * 1024),
        ("10MB", 10_000_000),
        ("512KiB", 512 * 1024),
        ("512KB", 512_000),
        ("1GiB", 1024**3),
        ("2GB", 2_000_000_000),
        ("10 mib", 10 * 1024 * 1024),
        ("100B", 100),
    ],
)
def test_size(text: int | str, size: int) -> None:
    """Sizes are bytes; KB/MB/GB are powers of 1000 and KiB/MiB/GiB of 1024."""
    assert parse_size(text) == size


def test_size_bad_unit() -> None:
    """A size with an unknown unit is refused, quoting the text."""
    assert _problem(parse_size, "10XB") == (
        "'10XB' is not a size (bytes, or a number with KB, MB, GB, KiB, MiB or GiB)"
    )


def test_size_fraction() -> None:
    """Fractional sizes are refused: a size is a whole number of units."""
    assert _problem(parse_size, "1.5MiB").startswith("'1.5MiB' is not a size")


def test_size_negative() -> None:
    """A negative integer size is refused."""
    assert _problem(parse_size, -1) == "-1 is negative; a size is 0 or more bytes"


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("2h", timedelta(hours=2)),
        ("2d", timedelta(days=2)),
        ("0s", timedelta(0)),
    ],
)
def test_duration(text: str, span: timedelta) -> None:
    """Durations are a whole number followed by s, m, h or d."""
    assert parse_duration(text) == span


@pytest.mark.parametrize("text", ["30", "5 min", "1.5h", "-5m", "m", "5M"])
def test_duration_bad(text: str) -> None:
    """Anything but a number and one of s, m, h, d is refused."""
    assert _problem(parse_duration, text) == (
        f"{text!r} is not a duration (a whole number followed by s, m, h or d,"
        ' such as "30s" or "5m")'
    )


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("600/m", Rate(600, timedelta(minutes=1))),
        ("10/s", Rate(10, timedelta(seconds=1))),
        ("100/h", Rate(100, timedelta(hours=1))),
    ],
)
def test_rate(text: str, rate: Rate) -> None:
    """Rates are N per second, minute or hour."""
    assert parse_rate(text) == rate


def test_rate_bad() -> None:
    """A rate without a period is refused."""
    assert _problem(parse_rate, "600") == (
        "'600' is not a rate (a whole number per second, minute or hour, such as \"600/m\")"
    )


def test_rate_zero() -> None:
    """A rate of 0 would refuse every message and is refused."""
    assert _problem(parse_rate, "0/m") == "'0/m' would refuse every message; a rate is at least 1"


def test_range_single_ipv4() -> None:
    """A single address is a range of size 1."""
    r = parse_range("192.0.2.7")
    assert (r.version, r.first, r.last, r.size) == (4, 0xC0000207, 0xC0000207, 1)


def test_range_cidr() -> None:
    """A CIDR network covers its network through its broadcast address."""
    assert parse_range("192.0.2.0/24") == IPRange(4, 0xC0000200, 0xC00002FF, "")


def test_range_cidr_host_bits() -> None:
    """A network written with host bits set is the whole network, as in Exchange."""
    r = parse_range("192.0.2.7/24")
    assert r == parse_range("192.0.2.0/24")
    assert r.text == "192.0.2.7/24"


def test_range_dash() -> None:
    """C{a-b} is the inclusive range from a to b."""
    r = parse_range("10.0.0.1 - 10.0.0.9")
    assert (r.version, r.first, r.last, r.size) == (4, 0x0A000001, 0x0A000009, 9)


def test_range_ipv6() -> None:
    """IPv6 networks and ranges are ranges of version 6."""
    r = parse_range("2001:db8::/32")
    assert (r.version, r.size) == (6, 2**96)
    assert parse_range("2001:db8::1-2001:db8::ff").size == 255


def test_range_ipv4_mapped_folded() -> None:
    """IPv4-mapped IPv6 addresses, networks and ranges are folded into IPv4."""
    assert parse_range("::ffff:192.0.2.7") == parse_range("192.0.2.7")
    assert parse_range("::ffff:192.0.2.0/120") == parse_range("192.0.2.0/24")
    assert parse_range("::ffff:10.0.0.1-10.0.0.9") == parse_range("10.0.0.1-10.0.0.9")


def test_range_keeps_text() -> None:
    """The range keeps the text as written, for messages."""
    assert parse_range("10.0.0.0/8").text == "10.0.0.0/8"


@pytest.mark.parametrize(
    "text", ["192.168.0.300", "mail.example.com", "10.0.0.0/33", "10.0.0.1-", "fe80::1%eth0", ""]
)
def test_range_bad(text: str) -> None:
    """Text that is no address, network or range is refused in SPEC's words."""
    assert _problem(parse_range, text) == f"{text!r} is not an IP address, network or range"


def test_range_reversed() -> None:
    """A range must start at its lower address."""
    assert _problem(parse_range, "10.0.0.9-10.0.0.1") == (
        "'10.0.0.9-10.0.0.1' starts after it ends; write the lower address first"
    )


def test_range_mixed_families() -> None:
    """A range cannot run from an IPv4 to an IPv6 address."""
    assert _problem(parse_range, "10.0.0.1-2001:db8::1") == (
        "'10.0.0.1-2001:db8::1' mixes an IPv4 and an IPv6 address"
    )


@pytest.mark.parametrize(
    ("text", "binding"),
    [
        ("0.0.0.0:25", Binding("0.0.0.0", 25)),
        ("127.0.0.1:2525", Binding("127.0.0.1", 2525)),
        ("[::]:25", Binding("::", 25)),
        ("[0:0::0]:587", Binding("::", 587)),
        ("[2001:DB8::1]:65535", Binding("2001:db8::1", 65535)),
    ],
)
def test_binding(text: str, binding: Binding) -> None:
    """Bindings are an IP address and a port; IPv6 in brackets, normalised."""
    assert parse_binding(text) == binding


@pytest.mark.parametrize(
    "text", ["mail.example.com:25", "0.0.0.0", "[127.0.0.1]:25", "localhost:25", ""]
)
def test_binding_not_address_port(text: str) -> None:
    """Host names, missing ports and bracketed IPv4 are refused."""
    assert _problem(parse_binding, text) == (
        f"{text!r} is not a binding; write an IP address and a port,"
        ' such as "0.0.0.0:25" or "[::]:25"'
    )


def test_binding_ipv6_without_brackets() -> None:
    """A bare IPv6 address is ambiguous about its port and is refused."""
    assert _problem(parse_binding, "::1:25") == "'::1:25' needs brackets and a port, such as \"[::]:25\""


@pytest.mark.parametrize("port", ["0", "65536", "smtp", "-1"])
def test_binding_bad_port(port: str) -> None:
    """Ports are numbers from 1 to 65535."""
    text = f"0.0.0.0:{port}"
    assert _problem(parse_binding, text) == (
        f"{text!r} has port {port!r}; a port is a number from 1 to 65535"
    )


@pytest.mark.parametrize(
    ("text", "hostport"),
    [
        ("exch01.example.com:2525", HostPort("exch01.example.com", 2525)),
        ("exch01.example.com", HostPort("exch01.example.com", 25)),
        ("192.0.2.1:53", HostPort("192.0.2.1", 53)),
        ("[2001:db8::1]:587", HostPort("2001:db8::1", 587)),
        ("2001:db8::1", HostPort("2001:db8::1", 25)),
    ],
)
def test_hostport(text: str, hostport: HostPort) -> None:
    """Hosts are names or addresses with an optional port."""
    assert parse_hostport(text, 25) == hostport


def test_hostport_bad_host() -> None:
    """A host with characters no host name has is refused."""
    assert _problem(parse_hostport, "exch_01 .example.com", 25) == (
        "'exch_01 .example.com' is not a host name or IP address with an optional port,"
        ' such as "smtp.example.com:25" or "[2001:db8::1]:25"'
    )


def test_hostport_bracketed_name() -> None:
    """Only IPv6 addresses go in brackets."""
    assert _problem(parse_hostport, "[exch01]:25", 25) == (
        "'[exch01]:25': only an IPv6 address goes in brackets"
    )


def test_hostname() -> None:
    """Host names lose a trailing dot and keep their case."""
    assert parse_hostname("Mail.Example.com.") == "Mail.Example.com"
    assert parse_hostname("localhost") == "localhost"


@pytest.mark.parametrize("text", ["", "-mail.example.com", "mail..example.com", "m\u00e4il.de", "a" * 64])
def test_hostname_bad(text: str) -> None:
    """Empty labels, leading hyphens, non-ASCII and overlong labels are refused."""
    assert _problem(parse_hostname, text).startswith(f"{text!r} is not a host name")


def test_domain() -> None:
    """Accepted domains are lower-cased without a trailing dot; C{*.} is kept."""
    assert parse_domain("Example.COM.") == "example.com"
    assert parse_domain("*.Example.com") == "*.example.com"


@pytest.mark.parametrize("text", ["*", "*example.com", "a.*.example.com", "exa mple.com"])
def test_domain_bad(text: str) -> None:
    """Wildcards other than a leading C{*.} are refused."""
    assert _problem(parse_domain, text) == (
        f'{text!r} is not a domain name (such as "example.com" or "*.example.com")'
    )


@pytest.mark.parametrize("text", ["ldap://dc1.example.com", "ldaps://dc1.example.com:636", "ldap://[::1]:389/"])
def test_ldap_url(text: str) -> None:
    """ldap:// and ldaps:// URLs with an optional port are accepted as written."""
    assert parse_ldap_url(text) == text


@pytest.mark.parametrize(
    "text", ["dc1.example.com", "http://dc1.example.com", "ldap://", "ldap://dc1:99999", "ldap://dc1/dc=x"]
)
def test_ldap_url_bad(text: str) -> None:
    """Other schemes, missing hosts, bad ports and paths are refused."""
    assert _problem(parse_ldap_url, text) == (
        f"{text!r} is not an LDAP server URL (ldap://host[:port] or ldaps://host[:port])"
    )
