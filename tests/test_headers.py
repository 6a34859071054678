"""
Tests for L{relaygw.session.headers}: Received and Message-ID.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

import pytest

from relaygw.session.headers import HELO_MAX, message_id, received_header, with_keyword
from relaygw.spool.envelope import TLSInfo

WHEN = datetime(2026, 11, 27, 23, 5, 49, tzinfo=timezone.utc)
TLS13 = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384")


def _received(**overrides: object) -> bytes:
    args: dict[str, object] = dict(
        helo="helo.name",
        client_ip="192.0.2.1",
        by_fqdn="mail.example.com",
        with_="ESMTPS",
        queue_id="0123ABC",
        recipient="a@b",
        tls=TLS13,
        when=WHEN,
    )
    args.update(overrides)
    return received_header(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("esmtp", "tls", "auth", "utf8", "keyword"),
    [
        (False, False, False, False, "SMTP"),
        (False, True, True, True, "SMTP"),
        (True, False, False, False, "ESMTP"),
        (True, True, False, False, "ESMTPS"),
        (True, False, True, False, "ESMTPA"),
        (True, True, True, False, "ESMTPSA"),
        (True, False, False, True, "UTF8SMTP"),
        (True, True, False, True, "UTF8SMTPS"),
        (True, False, True, True, "UTF8SMTPA"),
        (True, True, True, True, "UTF8SMTPSA"),
    ],
)
def test_with_keyword(esmtp: bool, tls: bool, auth: bool, utf8: bool, keyword: str) -> None:
    """with keywords follow RFC 3848 and RFC 6531; a HELO session is always SMTP."""
    assert with_keyword(esmtp=esmtp, tls=tls, auth=auth, smtputf8=utf8) == keyword


def test_received_example() -> None:
    """The Received header has the documented folded layout, ending in CRLF."""
    assert _received() == (
        b"Received: from helo.name ([192.0.2.1])\r\n"
        b"\tby mail.example.com (relaygw) with ESMTPS id 0123ABC\r\n"
        b"\t(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384)\r\n"
        b"\tfor <a@b>; Fri, 27 Nov 2026 23:05:49 +0000\r\n"
    )


def test_received_without_tls_and_recipient() -> None:
    """Without TLS and without a single recipient, the date follows the id."""
    assert _received(tls=None, recipient=None, with_="ESMTP") == (
        b"Received: from helo.name ([192.0.2.1])\r\n"
        b"\tby mail.example.com (relaygw) with ESMTP id 0123ABC;"
        b" Fri, 27 Nov 2026 23:05:49 +0000\r\n"
    )


def test_received_tls_without_recipient() -> None:
    """With TLS and no recipient, the date follows the TLS comment."""
    assert _received(recipient=None).endswith(
        b"\t(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384);"
        b" Fri, 27 Nov 2026 23:05:49 +0000\r\n"
    )


def test_received_ipv6_literal() -> None:
    """An IPv6 client is written [IPv6:...]; an IPv4-mapped one as IPv4."""
    assert _received(client_ip="2001:db8::1").startswith(
        b"Received: from helo.name ([IPv6:2001:db8::1])\r\n"
    )
    assert _received(client_ip="::ffff:192.0.2.7").startswith(
        b"Received: from helo.name ([192.0.2.7])\r\n"
    )


def test_received_helo_sanitised() -> None:
    """CR, LF, controls, blanks, non-ASCII and comment characters in HELO never reach the header."""
    header = _received(helo="evil\r\nX-Injected: yes (x) é\x00")
    first = header.split(b"\r\n")[0]
    assert first == b"Received: from evil??X-Injected:?yes??x???? ([192.0.2.1])"
    assert header.count(b"\r\n") == 4


def test_received_helo_capped() -> None:
    """A long HELO is cut at HELO_MAX characters."""
    first = _received(helo="h" * 5000).split(b"\r\n")[0]
    assert first == b"Received: from " + b"h" * HELO_MAX + b" ([192.0.2.1])"


def test_received_empty_helo() -> None:
    """An empty HELO is written as unknown."""
    assert _received(helo="").startswith(b"Received: from unknown ([192.0.2.1])")


def test_received_utf8_recipient_kept() -> None:
    """A non-ASCII recipient (SMTPUTF8) is kept, encoded as UTF-8."""
    assert "\tfor <jörg@bücher.example>;".encode() in _received(recipient="jörg@bücher.example")


def test_received_date_is_rfc5322() -> None:
    """The date is RFC 5322 and keeps the given offset; naive times are taken as UTC."""
    east = WHEN.astimezone(timezone(timedelta(hours=2)))
    assert _received(when=east).endswith(b"; Sat, 28 Nov 2026 01:05:49 +0200\r\n")
    naive = _received(when=WHEN.replace(tzinfo=None))
    date = naive.rsplit(b"; ", 1)[1].strip().decode()
    assert parsedate_to_datetime(date) == WHEN
    assert date.endswith("+0000")


def test_message_id_form() -> None:
    """Message-IDs are <QUEUEID.random@fqdn>."""
    assert message_id("0123ABC", "mail.example.com", token="R") == "<0123ABC.R@mail.example.com>"
    generated = message_id("0123ABC", "mail.example.com")
    assert re.fullmatch(r"<0123ABC\.[0-9A-F]{16}@mail\.example\.com>", generated)


def test_message_id_random_part_differs() -> None:
    """Two Message-IDs for the same queue id and host still differ."""
    ids = {message_id("Q", "h.example") for _ in range(50)}
    assert len(ids) == 50


def test_cached_dates_follow_the_second() -> None:
    """
    The per-second date caches give exactly the uncached text for every
    second, also when time moves backwards or within a second.
    """
    from email.utils import format_datetime, formatdate

    from relaygw.session.headers import banner_date, rfc5322_date

    base = WHEN.timestamp()
    for offset in (0.0, 0.2, 0.999, 1.0, 61.5, -3600.25, 0.5):
        t = base + offset
        whole = datetime.fromtimestamp(int(t // 1), timezone.utc)
        assert rfc5322_date(t) == format_datetime(whole)
        assert banner_date(t) == formatdate(int(t // 1), usegmt=True)
        stamp = _received(when=datetime.fromtimestamp(t, timezone.utc))
        assert stamp.endswith(f"; {format_datetime(whole)}\r\n".encode())


@pytest.mark.parametrize(
    "text",
    ["plain.host-name_1", "a b", "x(y)", 'q"uote', "a\\b", "<>", ";", "\x00\x7f", "ü", "tab\t",
     "zero\u200bwidth", "".join(chr(c) for c in range(0x20, 0x80))],
)
def test_helo_cleaning_fast_path_matches_the_rule(text: str) -> None:
    """Cleaning a HELO name gives the same text whether or not it takes the all-safe shortcut."""
    import unicodedata

    expected = "".join(
        "?" if (c in "();\\\"<>" or c.isspace() or not c.isascii()
                or unicodedata.category(c) in ("Cc", "Cs", "Cf")) else c
        for c in text
    )
    assert _received(helo=text).startswith(f"Received: from {expected} (".encode())
