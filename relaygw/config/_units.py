"""
Parsers for the value notations of the configuration file (SPEC section 2).

Each parser takes the text as the administrator wrote it and returns a typed
value, or raises L{ValueError} whose message is the problem in words, quoting
the offending text (for instance C{"'192.168.0.300' is not an IP address,
network or range"}).  The loader adds the file name and key path.  Pure: no
I/O, no Twisted.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from urllib.parse import urlsplit

from relaygw.config._model import Binding, HostPort, IPRange, Rate, normalise_address

_SIZE = re.compile(r"(\d+)\s*([kmgt]i?b|b)?", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_DURATION = re.compile(r"(\d+)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE = re.compile(r"(\d+)\s*/\s*([smh])")
_RATE_UNITS = {"s": timedelta(seconds=1), "m": timedelta(minutes=1), "h": timedelta(hours=1)}
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PORT = re.compile(r"\d{1,5}")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_size(value: int | str) -> int:
    """
    Parse a size in bytes.

    @param value: a non-negative integer (bytes) or a string such as
        C{"36MiB"}, C{"10MB"}, C{"512KiB"}, C{"1GiB"} or C{"1024"}.  KB, MB,
        GB are powers of 1000; KiB, MiB, GiB powers of 1024 (IEC), units in
        any case.
    @return: the size in bytes.
    @raise ValueError: the text is not a size, or the integer is negative.
    """
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative; a size is 0 or more bytes")
        return value
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(
            f"{value!r} is not a size (bytes, or a number with KB, MB, GB, KiB, MiB or GiB)"
        )
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]


def parse_duration(value: str) -> timedelta:
    """
    Parse a duration: a whole number followed by C{s}, C{m}, C{h} or C{d}.

    @param value: for instance C{"30s"}, C{"5m"}, C{"2h"}, C{"2d"} or C{"0s"}.
        Whether zero is allowed is the caller's decision (it disables some
        features and is meaningless for others).
    @raise ValueError: the text is not a duration.
    """
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise ValueError(
            f"{value!r} is not a duration (a whole number followed by s, m, h or d,"
            ' such as "30s" or "5m")'
        )
    return timedelta(seconds=int(match.group(1)) * _DURATION_UNITS[match.group(2)])


def parse_rate(value: str) -> Rate:
    """
    Parse a rate C{"N/s"}, C{"N/m"} or C{"N/h"}: a token bucket of N refilled
    evenly over a second, a minute or an hour.

    @raise ValueError: the text is not a rate, or N is 0.
    """
    match = _RATE.fullmatch(value.strip())
    if match is None:
        raise ValueError(
            f"{value!r} is not a rate (a whole number per second, minute or hour,"
            ' such as "600/m")'
        )
    count = int(match.group(1))
    if count == 0:
        raise ValueError(f"{value!r} would refuse every message; a rate is at least 1")
    return Rate(count, _RATE_UNITS[match.group(2)])


def _address(text: str) -> Address | None:
    if "%" in text:  # a scope id names an interface, not a range of clients
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_range(text: str) -> IPRange:
    """
    Parse an address range of C{remote_ranges} or C{trusted_proxies}.

    Three forms, as Exchange's RemoteIPRanges accepts them: a single address
    (C{"192.0.2.7"}, C{"2001:db8::7"}), a network in CIDR notation
    (C{"192.0.2.0/24"}) and an inclusive range C{"first-last"} of one family
    with C{first <= last}.  A network written with host bits set, such as
    C{"192.0.2.7/24"}, is taken as the whole network C{192.0.2.0/24}, as
    Exchange does; the text is kept as written for messages.  IPv4-mapped IPv6
    addresses and ranges (C{::ffff:192.0.2.7}) are folded into IPv4.

    @raise ValueError: C{"'192.168.0.300' is not an IP address, network or
        range"}, or a more specific problem for a range whose ends disagree.
    """
    stripped = text.strip()
    not_a_range = f"{text!r} is not an IP address, network or range"
    if "/" in stripped:
        try:
            net = ipaddress.ip_network(stripped, strict=False)
        except ValueError:
            raise ValueError(not_a_range) from None
        return IPRange.of(
            net.version, int(net.network_address), int(net.broadcast_address), text
        )
    if "-" in stripped:
        first_text, _, last_text = stripped.partition("-")
        first, last = _address(first_text.strip()), _address(last_text.strip())
        if first is None or last is None:
            raise ValueError(not_a_range)
        if first.version != last.version:
            first, last = normalise_address(first), normalise_address(last)
        if first.version != last.version:
            raise ValueError(f"{text!r} mixes an IPv4 and an IPv6 address")
        if int(first) > int(last):
            raise ValueError(f"{text!r} starts after it ends; write the lower address first")
        return IPRange.of(first.version, int(first), int(last), text)
    address = _address(stripped)
    if address is None:
        raise ValueError(not_a_range)
    return IPRange.of(address.version, int(address), int(address), text)


def _split_port(text: str) -> tuple[str, str | None, bool]:
    """
    Split C{host:port}, C{[v6]:port}, C{[v6]}, C{host} into host, port text
    and whether the host was bracketed.  A bare IPv6 address has no port.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r} has an unclosed '['")
        if rest == "":
            return host, None, True
        if not rest.startswith(":"):
            raise ValueError(f"{text!r} has text after ']' that is not ':port'")
        return host, rest[1:], True
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, port, False
    return text, None, False


def _port(text: str, port: str) -> int:
    if _PORT.fullmatch(port) is None or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} has port {port!r}; a port is a number from 1 to 65535")
    return int(port)


def parse_binding(text: str) -> Binding:
    """
    Parse a listening address C{"IP:port"} or C{"[IPv6]:port"}, such as
    C{"0.0.0.0:25"}, C{"[::]:25"} or C{"127.0.0.1:2525"}.  Host names are
    refused: a listener binds an address, and a name could resolve to another
    one after a DNS change.  The address is normalised (C{"[0:0::0]:25"}
    becomes host C{"::"}).

    @raise ValueError: not an address and port.
    """
    usage = (
        f"{text!r} is not a binding; write an IP address and a port,"
        ' such as "0.0.0.0:25" or "[::]:25"'
    )
    stripped = text.strip()
    host, port, bracketed = _split_port(stripped)
    if port is None:
        if _address(stripped) is not None and ":" in stripped:
            raise ValueError(f'{text!r} needs brackets and a port, such as "[::]:25"')
        raise ValueError(usage)
    address = _address(host)
    if address is None:
        raise ValueError(usage)
    if bracketed != (address.version == 6):
        raise ValueError(usage)
    return Binding(str(address), _port(text, port))


def parse_hostname(text: str) -> str:
    """
    Check a host name (a connector's FQDN, C{gateway.hostname}, a smarthost):
    ASCII letters, digits and hyphens in dot-separated labels of at most 63
    characters, 253 in all.  A trailing dot is dropped; case is kept.
    Internationalised names must be written in their C{xn--} form.

    @return: the name without a trailing dot.
    @raise ValueError: not a host name.
    """
    name = text[:-1] if text.endswith(".") else text
    if (
        not name
        or len(name) > 253
        or not all(_LABEL.fullmatch(label) for label in name.split("."))
    ):
        raise ValueError(
            f"{text!r} is not a host name (letters, digits and hyphens between dots;"
            " internationalised names in their xn-- form)"
        )
    return name


def parse_domain(text: str) -> str:
    """
    Parse an accepted domain: a domain name, or C{"*.domain"} for its
    subdomains.

    @return: the domain in lower case, without a trailing dot.
    @raise ValueError: not a domain.
    """
    wildcard = text.startswith("*.")
    try:
        name = parse_hostname(text[2:] if wildcard else text)
    except ValueError:
        raise ValueError(
            f'{text!r} is not a domain name (such as "example.com" or "*.example.com")'
        ) from None
    return ("*." if wildcard else "") + name.lower()


def parse_hostport(text: str, default_port: int) -> HostPort:
    """
    Parse a host with an optional port: C{"exch01.example.com:25"},
    C{"exch01.example.com"}, C{"192.0.2.1:25"}, C{"[2001:db8::1]:25"} or a bare
    IPv6 address.  An IPv6 host is stored without brackets.

    @param default_port: the port when none is written.
    @raise ValueError: not a host name or address, or a bad port.
    """
    stripped = text.strip()
    host, port, bracketed = _split_port(stripped)
    address = _address(host)
    if bracketed and (address is None or address.version != 6):
        raise ValueError(f"{text!r}: only an IPv6 address goes in brackets")
    if address is not None:
        host = str(address)
    else:
        try:
            host = parse_hostname(host)
        except ValueError:
            raise ValueError(
                f"{text!r} is not a host name or IP address with an optional port,"
                ' such as "smtp.example.com:25" or "[2001:db8::1]:25"'
            ) from None
    return HostPort(host, default_port if port is None else _port(text, port))


def parse_ldap_url(text: str) -> str:
    """
    Check a directory server URL: C{ldap://host[:port]} or
    C{ldaps://host[:port]}, with nothing after the host and port.

    @return: the URL as written.
    @raise ValueError: another scheme, no host, a bad port, or a path.
    """
    problem = (
        f"{text!r} is not an LDAP server URL (ldap://host[:port] or ldaps://host[:port])"
    )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(problem) from None
    if (
        parts.scheme.lower() not in ("ldap", "ldaps")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
        or port == 0
    ):
        raise ValueError(problem)
    return text
