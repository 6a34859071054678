"""
Every reply the SPEC section 3 table words exactly is worded exactly so in
L{relaygw.replies}.

The table below is copied from SPEC section 3 (the product contract, kept
outside this repository); a change there must be copied here and will then
fail until C{replies.py} follows.
"""

from __future__ import annotations

import pytest

from relaygw import replies
from relaygw.replies import Reply

FQDN = "mail.example.com"

# (situation, the SPEC's text with <fqdn> filled in, the Reply relaygw sends)
SPEC_TABLE: list[tuple[str, str, Reply]] = [
    ("MAIL accepted", "250 2.1.0 Sender OK", replies.MAIL_OK),
    ("RCPT accepted", "250 2.1.5 Recipient OK", replies.RCPT_OK),
    (
        "RCPT outside accepted domains without relay",
        "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain",
        replies.UNABLE_TO_RELAY,
    ),
    (
        "MAIL without submit before AUTH",
        "530 5.7.57 SMTP; Client was not authenticated to send anonymous mail during MAIL FROM",
        replies.NOT_AUTHENTICATED,
    ),
    (
        "MAIL FROM the user may not send as",
        "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        replies.SEND_AS_DENIED,
    ),
    (
        "MAIL before STARTTLS when require_tls",
        "530 5.7.10 Must issue a STARTTLS command first",
        replies.MUST_STARTTLS,
    ),
    (
        "unknown recipient (validate_recipients)",
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        replies.RECIPIENT_NOT_FOUND,
    ),
    ("DATA", "354 Start mail input; end with <CRLF>.<CRLF>", replies.START_DATA),
    (
        "message queued",
        "250 2.6.0 <mid@x> [InternalId=Q1, Hostname=mail.example.com] Queued mail for delivery",
        replies.queued("<mid@x>", "Q1", FQDN),
    ),
    ("AUTH ok", "235 2.7.0 Authentication successful", replies.AUTH_OK),
    ("wrong credentials", "535 5.7.3 Authentication unsuccessful", replies.AUTH_FAILED),
    (
        "AUTH mechanism not offered now",
        "504 5.7.4 Unrecognized authentication type",
        replies.AUTH_MECHANISM,
    ),
    (
        "directory unreachable during AUTH",
        "454 4.7.0 Temporary authentication failure",
        replies.AUTH_TEMPFAIL,
    ),
    (
        "message too large",
        "552 5.3.4 Message size exceeds fixed maximum message size",
        replies.TOO_BIG,
    ),
    ("too many recipients", "452 4.5.3 Too many recipients", replies.TOO_MANY_RECIPIENTS),
    (
        "bare LF or bare CR in DATA",
        "550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal",
        replies.BARE_LF,
    ),
    (
        "spool full / unwritable",
        "452 4.3.1 Insufficient system resources",
        replies.SPOOL_FAILED,
    ),
    (
        "message rate limit",
        "421 4.4.2 mail.example.com Message submission rate for this client has exceeded"
        " the configured limit",
        replies.rate_limited(FQDN),
    ),
    ("connection limit", "421 4.3.2 Service not available", replies.CONNECTION_LIMIT),
    ("command line over 2,000 octets", "500 5.5.2 Command line too long", replies.LINE_TOO_LONG),
    (
        "the 10th bad command in a row",
        "421 4.7.0 Too many errors on this connection, closing transmission channel",
        replies.TOO_MANY_ERRORS,
    ),
    (
        "recipient without a domain",
        "501 5.1.3 Bad recipient address syntax",
        replies.BAD_RECIPIENT_SYNTAX,
    ),
    (
        "command or data timeout",
        "421 4.4.2 mail.example.com Timeout waiting for client input",
        replies.timeout(FQDN),
    ),
    ("greeting", "220 mail.example.com relaygw ESMTP ready", replies.greeting(
        "mail.example.com relaygw ESMTP ready"
    )),
]


@pytest.mark.parametrize(
    ("situation", "spec_text", "reply"), SPEC_TABLE, ids=[row[0] for row in SPEC_TABLE]
)
def test_reply_matches_spec_table(situation: str, spec_text: str, reply: Reply) -> None:
    """Each reply of the SPEC section 3 table goes on the wire exactly as the table words it."""
    assert bytes(reply) == spec_text.encode("utf-8") + b"\r\n"


def test_ehlo_first_line_matches_spec() -> None:
    """The EHLO reply starts 250-<fqdn> Hello [<client ip>] and lists keywords one per line."""
    reply = replies.ehlo(FQDN, "192.0.2.1", ["SIZE 37748736", "PIPELINING"])
    assert reply.lines() == [
        b"250-mail.example.com Hello [192.0.2.1]",
        b"250-SIZE 37748736",
        b"250 PIPELINING",
    ]


def test_basic_and_enhanced_class_agree() -> None:
    """Every Reply constant's enhanced code has the class of its basic code."""
    constants = [v for v in vars(replies).values() if isinstance(v, Reply)]
    assert len(constants) > 30
    for reply in constants:
        if reply.enhanced:
            assert int(reply.enhanced[0]) == reply.code // 100, reply
