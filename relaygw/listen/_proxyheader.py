"""
Parsing a PROXY protocol header, v1 (text) or v2 (binary), at the start of a
connection's bytes; pure, for L{relaygw.listen.proxy}.

Twisted's v2 parser is reused; v1 is parsed here, strictly (exactly the
spec's fields, numeric ports, real IP addresses of the named family), since
Twisted's accepts any text as an address and lets a bad port through as a
L{ValueError}.  Sizes are bounded by the spec's own limits, so a peer that
never ends its header cannot grow the buffer.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal

from attrs import frozen
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v2parser import V2Parser

__all__ = ["HeaderError", "ProxyHeader", "V1_MAX", "V2_MAX_PAYLOAD", "parse_header"]

#: v1: the whole line with its CRLF is at most 107 bytes (PROXY protocol spec 2.1).
V1_MAX = 107
#: v2: the most TLV and address bytes accepted after the 16-byte preamble;
#: HAProxy's own TLVs (ALPN, authority, unique id, SSL) stay well below it.
V2_MAX_PAYLOAD = 4096

_V1_SIGNATURE = b"PROXY "
_V2_SIGNATURE = V2Parser.PREFIX
_IPAddress = IPv4Address | IPv6Address


class HeaderError(Exception):
    """A PROXY header is malformed; the message says how (for the log only)."""


@frozen
class ProxyHeader:
    """
    A parsed PROXY header.

    @ivar version: 1 or 2.
    @ivar command: C{"PROXY"} (a relayed client), C{"LOCAL"} (v2: the proxy
        itself) or C{"UNKNOWN"} (v1).
    @ivar source: the client's address, or C{None} when the connection is to
        be served as coming from the proxy itself (LOCAL, UNKNOWN, an address
        family other than TCP over IPv4 or IPv6).
    @ivar destination: the address the client connected to at the proxy,
        or C{None} likewise.
    """

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL", "UNKNOWN"]
    source: _IPAddress | None = None
    destination: _IPAddress | None = None


def parse_header(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    """
    Parse a PROXY header at the start of C{data}.

    @return: the header and the bytes after it, or C{None} while C{data} is
        a valid but incomplete beginning of a header.
    @raise HeaderError: C{data} cannot begin a valid header, or is longer
        than a header may be without being one.
    """
    if data[:12] == _V2_SIGNATURE[: len(data)]:
        return _parse_v2(data)
    if data[:6] == _V1_SIGNATURE[: len(data)]:
        return _parse_v1(data)
    raise HeaderError("no PROXY protocol signature")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise HeaderError(f"v1 header longer than {V1_MAX} bytes")
        if b"\n" in data:
            raise HeaderError("v1 header not ended by CRLF")
        return None
    parts = data[:end].split(b" ")
    if parts[1:2] == [b"UNKNOWN"]:
        # The rest of an UNKNOWN line is to be ignored (spec 2.1).
        return ProxyHeader(1, "UNKNOWN"), data[end + 2 :]
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise HeaderError("v1 header is not PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    version = 4 if parts[1] == b"TCP4" else 6
    source = _v1_address(version, parts[2], parts[4])
    destination = _v1_address(version, parts[3], parts[5])
    return ProxyHeader(1, "PROXY", source, destination), data[end + 2 :]


def _v1_address(version: int, host: bytes, port: bytes) -> _IPAddress:
    try:
        address = ipaddress.ip_address(host.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise HeaderError(f"v1 header address {host!r} is not an IP address") from None
    if address.version != version:
        raise HeaderError(f"v1 header address {host!r} is not IPv{version}")
    if not port.isdigit() or len(port) > 5 or int(port) > 65535:
        raise HeaderError(f"v1 header port {port!r} is not a port number")
    return _address(str(address), int(port))


def _parse_v2(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    if len(data) < 16:
        return None
    if data[12] >> 4 != 2:
        raise HeaderError(f"v2 header of version {data[12] >> 4}")
    (length,) = struct.unpack("!H", data[14:16])
    if length > V2_MAX_PAYLOAD:
        raise HeaderError(f"v2 header of {length} bytes, more than {V2_MAX_PAYLOAD}")
    if len(data) < 16 + length:
        return None
    header, rest = data[: 16 + length], data[16 + length :]
    try:
        info = V2Parser.parse(header)
    except (InvalidProxyHeader, KeyError, ValueError, struct.error):
        raise HeaderError("v2 header with an unknown command, family or protocol") from None
    if header[12] & 0x0F == 0:
        return ProxyHeader(2, "LOCAL"), rest
    if header[13] & 0x0F == 2:  # a datagram source cannot have opened this stream
        raise HeaderError("v2 header for a datagram connection")
    source, destination = info.source, info.destination
    if isinstance(source, (IPv4Address, IPv6Address)) and isinstance(
        destination, (IPv4Address, IPv6Address)
    ):
        # The parser writes IPv6 uncompressed (0:0:0:...); transports give it compressed.
        return (
            ProxyHeader(
                2,
                "PROXY",
                _address(str(ipaddress.ip_address(source.host)), source.port),
                _address(str(ipaddress.ip_address(destination.host)), destination.port),
            ),
            rest,
        )
    # AF_UNSPEC or AF_UNIX: the addresses say nothing usable here (spec 2.2).
    return ProxyHeader(2, "PROXY"), rest


def _address(host: str, port: int) -> _IPAddress:
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)
