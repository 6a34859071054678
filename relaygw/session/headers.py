"""
The trace headers relaygw adds to every accepted message: C{Received:}
(RFC 5321 section 4.4 with the RFC 3848 / RFC 6531 C{with} keywords) and a
C{Message-ID:} for messages that had none.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import secrets
import unicodedata
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime, formatdate

from relaygw.spool.envelope import TLSInfo

__all__ = ["banner_date", "message_id", "received_header", "rfc5322_date", "with_keyword"]

#: Longest HELO name copied into a Received header; a DNS name is at most 253 octets.
HELO_MAX = 253

# Characters that would end the From-domain token or open/close a comment.
_UNSAFE = frozenset("();\\\"<>")
# Text made only of these needs no cleaning (the common case, checked in C).
_CLEAN = re.compile(
    "[" + re.escape("".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in _UNSAFE)) + "]*"
)
_ZERO = timedelta(0)


class _PerSecond:
    """A text that depends only on the whole second: made once per second, not per use."""

    def __init__(self, render: Callable[[int], str]) -> None:
        self._render = render
        self._second: int | None = None
        self._text = ""

    def __call__(self, seconds: float) -> str:
        second = int(seconds // 1)
        if second != self._second:
            self._text = self._render(second)
            self._second = second
        return self._text


rfc5322_date = _PerSecond(lambda s: format_datetime(datetime.fromtimestamp(s, timezone.utc)))
"""C{rfc5322_date(seconds)}: the RFC 5322 date of a POSIX time, in UTC (C{+0000})."""

banner_date = _PerSecond(lambda s: formatdate(s, usegmt=True))
"""C{banner_date(seconds)}: the date for a greeting's C{{date}} (C{GMT} form)."""


def with_keyword(*, esmtp: bool, tls: bool, auth: bool, smtputf8: bool = False) -> str:
    """
    The C{with} protocol keyword of the Received header.

    RFC 3848 defines C{SMTP}, C{ESMTP}, C{ESMTPA}, C{ESMTPS}, C{ESMTPSA};
    RFC 6531 section 3.7.3 adds C{UTF8SMTP}, C{UTF8SMTPA}, C{UTF8SMTPS},
    C{UTF8SMTPSA} for transactions that used SMTPUTF8.  A session greeted with
    HELO is C{SMTP} whatever else happened: the registry has no C{SMTPS} or
    C{SMTPA}, and SMTPUTF8 needs EHLO.

    @param esmtp: the client greeted with EHLO.
    @param tls: the transaction ran over TLS (STARTTLS or implicit).
    @param auth: the client authenticated.
    @param smtputf8: the MAIL command carried C{SMTPUTF8}.
    """
    if not esmtp:
        return "SMTP"
    suffix = ("S" if tls else "") + ("A" if auth else "")
    return ("UTF8SMTP" if smtputf8 else "ESMTP") + suffix


def received_header(
    *,
    helo: str,
    client_ip: str,
    by_fqdn: str,
    with_: str,
    queue_id: str,
    recipient: str | None,
    tls: TLSInfo | None,
    when: datetime,
) -> bytes:
    """
    A folded C{Received:} header, ending in CRLF.

    Example::

        Received: from helo.name ([192.0.2.1])
        \tby mail.example.com (relaygw) with ESMTPS id 0123ABC
        \t(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384)
        \tfor <a@b>; Fri, 27 Nov 2026 23:05:49 +0000

    @param helo: the HELO/EHLO argument as the client sent it; control
        characters, blanks, non-ASCII and comment delimiters become C{?}
        (the message may not be SMTPUTF8), and it is cut
        at L{HELO_MAX} characters.  An empty one is written C{unknown}.
    @param client_ip: the client address; IPv6 is written C{[IPv6:...]}, an
        IPv4-mapped address as IPv4.
    @param by_fqdn: the receiving host name (the connector's fqdn).
    @param with_: the protocol keyword, from L{with_keyword}.
    @param queue_id: the internal queue id.
    @param recipient: the single recipient for the C{for} clause, or C{None}
        (messages with several recipients do not disclose them); non-ASCII is
        kept, as only an SMTPUTF8 transaction can carry it.
    @param tls: the session's TLS, or C{None}.
    @param when: the time of receipt; a naive datetime is taken as UTC.
    """
    lines = [
        f"Received: from {_clean(helo, HELO_MAX) or 'unknown'} ({_ip_literal(client_ip)})",
        f"\tby {_clean(by_fqdn, HELO_MAX)} (relaygw) with {_clean(with_, 20)}"
        f" id {_clean(queue_id, 64)}",
    ]
    if tls is not None:
        lines.append(
            f"\t(version={_clean(tls.version, 32)} cipher={_clean(tls.cipher, 128)})"
        )
    if recipient is not None:
        lines.append(f"\tfor <{_clean(recipient, 256, ascii_only=False)}>")
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    offset = when.utcoffset()
    date = rfc5322_date(when.timestamp()) if offset == _ZERO else format_datetime(when)
    lines[-1] += f"; {date}"
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


def message_id(queue_id: str, fqdn: str, token: str | None = None) -> str:
    """
    A new Message-ID: C{<QUEUEID.random@fqdn>}.

    @param queue_id: the internal queue id (unique per gateway).
    @param fqdn: the gateway's host name.
    @param token: the random part; by default 64 bits from L{secrets}, so
        gateways sharing a host name and clock still differ.
    @return: the header value with its angle brackets.
    """
    if token is None:
        token = secrets.token_hex(8).upper()
    return f"<{_clean(queue_id, 64)}.{token}@{_clean(fqdn, HELO_MAX)}>"


def _clean(text: str, limit: int, *, ascii_only: bool = True) -> str:
    """
    C{text} cut at C{limit} characters, with control characters, blanks,
    comment and quoting delimiters (and non-ASCII unless allowed) as C{?}.
    """
    text = text[:limit]
    if _CLEAN.fullmatch(text):
        return text
    out = []
    for c in text:
        if (
            c in _UNSAFE
            or c.isspace()
            or (ascii_only and not c.isascii())
            or unicodedata.category(c) in ("Cc", "Cs", "Cf")
        ):
            out.append("?")
        else:
            out.append(c)
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def _ip_literal(client_ip: str) -> str:
    try:
        address = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return f"[{_clean(client_ip, 64)}]"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"[{address.ipv4_mapped}]"
        return f"[IPv6:{address}]"
    return f"[{address}]"
