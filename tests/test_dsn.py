"""
Tests for L{relaygw.deliver.dsn}: RFC 3464 DSNs, parsed back with Python's
C{email} package and checked field by field.
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message

import pytest

from relaygw.deliver.dsn import Report, build_dsn, header_block, report_of, status_of
from relaygw.spool.envelope import Envelope, Outcome, Recipient

HEADERS = (
    b"Received: from printer (127.0.0.9) by gw.example.test\r\n"
    b"From: <scan@example.test>\r\n"
    b"Subject: Scan 42\r\n"
    b"Message-ID: <scan42@example.test>\r\n"
)
BODY = b"\r\nthe scanned page\r\n"


def _envelope(sender: str = "scan@example.test") -> Envelope:
    return Envelope(
        id="20261206T043000-0001",
        sender=sender,
        recipients=(Recipient("bob@remote.test"), Recipient("carol@remote.test")),
        connector="Default",
        client_ip="127.0.0.9",
        received_at=1796531400.0,
        size=len(HEADERS + BODY),
        message_id="<scan42@example.test>",
    )


def _parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message.defects == []
    return message


def _bounce(reports: list[Report], sender: str = "scan@example.test") -> EmailMessage:
    dsn = build_dsn(_envelope(sender), reports, header_block((HEADERS + BODY).splitlines(True)),
                    hostname="gw.example.test", now=1796535000.0, token="dsn-token-1")
    assert dsn.sender == "" and dsn.recipient == sender
    return _parse(dsn.data)


def _status_groups(message: EmailMessage) -> list[Message]:
    report = message.get_payload()[1]
    assert report.get_content_type() == "message/delivery-status"
    groups = report.get_payload()
    assert isinstance(groups, list)
    return groups


REMOTE_550 = Outcome("bounce", "550 5.1.1 <carol@remote.test>: user unknown", "mx1.remote.test")


def test_bounce_structure_and_headers() -> None:
    """A bounce is multipart/report; report-type=delivery-status, from the mail system to the sender."""
    message = _bounce([report_of("carol@remote.test", REMOTE_550)])
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in message.get_payload()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"
    ]
    assert message["To"].addresses[0].addr_spec == "scan@example.test"
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@gw.example.test>"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Message-ID"] == "<dsn-token-1@gw.example.test>"


def test_delivery_status_fields() -> None:
    """Per-message and per-recipient fields: Reporting-MTA, Final-Recipient, Action, Status, ..."""
    message = _bounce([report_of("carol@remote.test", REMOTE_550)])
    per_message, carol = _status_groups(message)
    assert per_message["Reporting-MTA"] == "dns; gw.example.test"
    assert per_message["X-Relaygw-Queue-ID"] == "20261206T043000-0001"
    assert per_message["Arrival-Date"] == "Sun, 06 Dec 2026 04:30:00 GMT"
    assert carol["Final-Recipient"] == "rfc822; carol@remote.test"
    assert carol["Action"] == "failed"
    assert carol["Status"] == "5.1.1"
    assert carol["Remote-MTA"] == "dns; mx1.remote.test"
    assert carol["Diagnostic-Code"] == "smtp; 550 5.1.1 <carol@remote.test>: user unknown"
    assert carol["Last-Attempt-Date"] == "Sun, 06 Dec 2026 05:30:00 GMT"


def test_one_dsn_lists_every_recipient_of_the_event() -> None:
    """Two failed recipients of one attempt are two groups in one DSN, in order."""
    message = _bounce([
        report_of("bob@remote.test", Outcome("bounce", "554 5.7.1 refused", "mx2.remote.test")),
        report_of("carol@remote.test", REMOTE_550),
    ])
    groups = _status_groups(message)[1:]
    assert [g["Final-Recipient"] for g in groups] == ["rfc822; bob@remote.test",
                                                      "rfc822; carol@remote.test"]
    assert [g["Status"] for g in groups] == ["5.7.1", "5.1.1"]
    text = message.get_payload()[0].get_content()
    assert "<bob@remote.test> (from mx2.remote.test): 554 5.7.1 refused" in text
    assert "<carol@remote.test> (from mx1.remote.test): 550 5.1.1" in text


def test_local_decision_has_no_remote_mta() -> None:
    """relaygw's own decision (a null MX) names no Remote-MTA; its diagnostic type is X-relaygw."""
    null_mx = Outcome("bounce", "556 5.1.10 Recipient domain does not accept mail (null MX)")
    (carol,) = _status_groups(_bounce([report_of("carol@remote.test", null_mx)]))[1:]
    assert carol["Status"] == "5.1.10"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] == (
        "X-relaygw; 556 5.1.10 Recipient domain does not accept mail (null MX)"
    )


def test_delay_warning() -> None:
    """A delay warning says Action: delayed with the 4xx status, and a subject saying so."""
    deferred = Outcome("retry", "451 4.4.1 Connection refused by the remote host", "mx1.remote.test")
    message = _bounce([report_of("bob@remote.test", deferred, delayed=True)])
    assert message["Subject"] == "Delayed Mail (still being retried)"
    (bob,) = _status_groups(message)[1:]
    assert (bob["Action"], bob["Status"]) == ("delayed", "4.4.1")
    assert "still being retried" in message.get_payload()[0].get_content()


def test_original_headers_without_body() -> None:
    """The third part is the original's header block, not its body."""
    third = _bounce([report_of("carol@remote.test", REMOTE_550)]).get_payload()[2]
    quoted = third.get_payload()
    assert "Subject: Scan 42" in quoted
    assert "Message-ID: <scan42@example.test>" in quoted
    assert "the scanned page" not in quoted


def test_never_for_the_null_sender() -> None:
    """A message from <> gets no DSN (that is how DSNs never loop)."""
    with pytest.raises(ValueError, match="null sender"):
        build_dsn(_envelope(""), [report_of("carol@remote.test", REMOTE_550)], HEADERS,
                  hostname="gw.example.test", now=0.0, token="t")


@pytest.mark.parametrize("reports", [
    [],
    [report_of("a@x.test", REMOTE_550), report_of("b@x.test", REMOTE_550, delayed=True)],
])
def test_one_event_per_dsn(reports: list[Report]) -> None:
    """A DSN reports one event: no recipients, or failed and delayed mixed, is refused."""
    with pytest.raises(ValueError, match="one event"):
        build_dsn(_envelope(), reports, HEADERS, hostname="gw.example.test", now=0.0, token="t")


def test_reply_text_cannot_inject_fields() -> None:
    """A reply with line breaks stays one Diagnostic-Code field."""
    evil = Outcome("bounce", "550 5.1.1 no\r\nAction: delivered", "mx.remote.test")
    (carol,) = _status_groups(_bounce([report_of("carol@remote.test", evil)]))[1:]
    assert carol["Action"] == "failed"
    assert carol["Diagnostic-Code"] == "smtp; 550 5.1.1 no Action: delivered"


def test_utf8_addresses_use_global_delivery_status() -> None:
    """Non-ASCII addresses: message/global-delivery-status, utf-8 address type, SMTPUTF8 (RFC 6533)."""
    dsn = build_dsn(_envelope("jörg@example.test"), [report_of("zoë@remote.test", REMOTE_550)],
                    HEADERS, hostname="gw.example.test", now=0.0, token="t")
    assert (dsn.smtputf8, dsn.eight_bit) == (True, True)
    assert b"Content-Type: message/global-delivery-status\r\n" in dsn.data
    assert "Final-Recipient: utf-8; zoë@remote.test\r\n".encode() in dsn.data


@pytest.mark.parametrize(("reply", "status"), [
    ("550 5.1.1 user unknown", "5.1.1"),
    ("550 user unknown", "5.0.0"),
    ("451 5.1.1 mismatched class", "4.0.0"),
    ("421 4.4.2 closing", "4.4.2"),
    ("", "4.0.0"),
])
def test_status_of(reply: str, status: str) -> None:
    """The status is the reply's enhanced code when its class agrees, else X.0.0."""
    assert status_of(reply) == status


def test_header_block_cut_at_a_line_end() -> None:
    """The header block stops at the empty line, and at a line end past the limit."""
    lines = (HEADERS + BODY).splitlines(True)
    assert header_block(lines) == HEADERS
    assert header_block([b"A: 1\n", b"B: 2\n"], limit=8) == b"A: 1\r\n"


@pytest.mark.parametrize(
    "remote_host, named",
    [("mx1.remote.test:25", "mx1.remote.test"), ("192.0.2.7:2525", "192.0.2.7"),
     ("[2001:db8::7]:25", "2001:db8::7"), ("mx1.remote.test", "mx1.remote.test")],
)
def test_remote_mta_names_the_host_without_its_port(remote_host: str, named: str) -> None:
    """Remote-MTA is a host name (RFC 3464 2.3.5); the port the attempt used is not part of it."""
    refused = Outcome("bounce", "550 5.1.1 no such user", remote_host=remote_host)
    (carol,) = _status_groups(_bounce([report_of("carol@remote.test", refused)]))[1:]
    assert carol["Remote-MTA"] == f"dns; {named}"
