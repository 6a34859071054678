"""
Delivery status notifications (RFC 3464, SPEC section 4): the bounce and
the delay warning a message's return path receives.

A DSN is C{multipart/report; report-type=delivery-status} with three parts:
a human-readable explanation, the C{message/delivery-status} fields
(Reporting-MTA, Arrival-Date, then per recipient Final-Recipient, Action,
Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date) and the original
message's header block as C{text/rfc822-headers} (RFC 6522; the headers and
not the whole message, so a DSN stays small whatever the original's size
and is built without reading the body).  A message with non-ASCII addresses
gets C{message/global-delivery-status} and C{utf-8} address types (RFC 6533).

It comes from the null sender, to the original's return path, and is never
made for a message from C{<>}: that is how a DSN can never loop.  One DSN
covers one event (the recipients that failed, or were delayed, in one
attempt).

Pure: the caller passes the clock's time and the boundary token, and spools
the result like any other message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from email.utils import formatdate

from attrs import frozen

from relaygw.spool.envelope import Envelope, Outcome

__all__ = ["DSN", "Report", "build_dsn", "header_block", "report_of", "MAX_HEADER_BLOCK"]

#: Longest original header block quoted in a DSN; the rest is cut at a line end.
MAX_HEADER_BLOCK = 64 * 1024

_HOST_PORT = re.compile(r"^(?:\[([^\]]+)\]|([^:\[\]]+)):\d+$")
_REPLY = re.compile(r"^([245])(\d\d)(?:\s+([245])\.(\d{1,3})\.(\d{1,3})\b)?")


@frozen
class Report:
    """
    One recipient's lines in a DSN.

    @ivar recipient: the address as given at RCPT.
    @ivar action: C{failed} for a bounce, C{delayed} for a delay warning.
    @ivar outcome: the attempt's outcome; its reply is the diagnostic.
    """

    recipient: str
    action: str
    outcome: Outcome


@frozen
class DSN:
    """
    A DSN ready to spool.

    @ivar sender: always C{""} (the null reverse path).
    @ivar recipient: the original message's return path.
    @ivar data: the message, CRLF line ends.
    @ivar eight_bit: whether C{data} holds 8-bit octets (it then goes as 8BITMIME).
    @ivar smtputf8: whether an address in it needs SMTPUTF8.
    @ivar message_id: its Message-ID header value, angle brackets included.
    """

    sender: str
    recipient: str
    data: bytes
    eight_bit: bool
    smtputf8: bool
    message_id: str


def report_of(recipient: str, outcome: Outcome, delayed: bool = False) -> Report:
    """The report of C{recipient}: C{delayed} for a warning, else C{failed}."""
    return Report(recipient, "delayed" if delayed else "failed", outcome)


def status_of(reply: str) -> str:
    """
    The RFC 3463 status of an outcome's reply: its enhanced code when it has
    one of the same class as the basic code, else C{X.0.0} of that class.
    """
    match = _REPLY.match(reply)
    if match is None:
        return "4.0.0"
    cls, enhanced = match.group(1), match.group(3)
    if enhanced == cls:
        return f"{enhanced}.{int(match.group(4))}.{int(match.group(5))}"
    return f"{cls}.0.0"


def header_block(lines: Iterable[bytes], limit: int = MAX_HEADER_BLOCK) -> bytes:
    """
    The header block of a message given line by line (up to the first empty
    line), with CRLF line ends, cut at a line end after C{limit} octets.
    """
    out: list[bytes] = []
    size = 0
    for line in lines:
        line = line.rstrip(b"\r\n")
        if not line:
            break
        size += len(line) + 2
        if size > limit:
            break
        out.append(line + b"\r\n")
    return b"".join(out)


def _address_type(address: str) -> str:
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"


def _one_line(text: str) -> str:
    # Field values from remote replies: no line breaks can end the field early.
    return " ".join(text.split())


def _mta_name(remote_host: str) -> str:
    """C{host:port} or C{[v6]:port} -> the host: Remote-MTA names a host, not a port."""
    m = _HOST_PORT.match(remote_host)
    return (m.group(1) or m.group(2)) if m else remote_host


def _per_recipient(report: Report, when: str) -> list[str]:
    outcome = report.outcome
    lines = [
        f"Final-Recipient: {_address_type(report.recipient)}",
        f"Action: {report.action}",
        f"Status: {status_of(outcome.reply)}",
    ]
    if outcome.remote_host:
        lines.append(f"Remote-MTA: dns; {_one_line(_mta_name(outcome.remote_host))}")
        lines.append(f"Diagnostic-Code: smtp; {_one_line(outcome.reply)}")
    else:
        # relaygw's own decision (null MX, expiry, a mailbox it could not write).
        lines.append(f"Diagnostic-Code: X-relaygw; {_one_line(outcome.reply)}")
    lines.append(f"Last-Attempt-Date: {when}")
    return lines


def _explanation(hostname: str, delayed: bool, reports: Sequence[Report]) -> list[str]:
    if delayed:
        lead = [
            f"This is the mail system at host {hostname}.",
            "",
            "Your message could not be delivered yet to the recipients below.",
            "It is still being retried; you need not resend it.",
        ]
    else:
        lead = [
            f"This is the mail system at host {hostname}.",
            "",
            "Your message could not be delivered to the recipients below.",
            "This is a permanent error; it has not been retried further.",
        ]
    lead.append("")
    for report in reports:
        where = f" (from {report.outcome.remote_host})" if report.outcome.remote_host else ""
        lead.append(f"<{report.recipient}>{where}: {_one_line(report.outcome.reply)}")
    return lead


def build_dsn(
    envelope: Envelope,
    reports: Sequence[Report],
    original_headers: bytes,
    *,
    hostname: str,
    now: float,
    token: str,
) -> DSN:
    """
    The DSN of one event of C{envelope}.

    @param reports: the recipients concerned, all C{failed} or all C{delayed}.
    @param original_headers: the original's header block (L{header_block}).
    @param hostname: the gateway's host name (Reporting-MTA, From, Message-ID).
    @param now: POSIX seconds of the event.
    @param token: a unique token for the boundary and the Message-ID.
    @raise ValueError: the message is from C{<>}, C{reports} is empty, or
        it mixes actions.
    """
    if envelope.sender == "":
        raise ValueError(f"no DSN for {envelope.id}: it is from the null sender")
    actions = {r.action for r in reports}
    if not reports or len(actions) != 1 or not actions <= {"failed", "delayed"}:
        raise ValueError(f"a DSN reports one event: failed or delayed, got {sorted(actions)}")
    delayed = actions == {"delayed"}
    addresses = [envelope.sender, *(r.recipient for r in reports)]
    smtputf8 = not all(a.isascii() for a in addresses)
    when = formatdate(now, usegmt=True)
    boundary = f"{token}/{hostname}"
    subject = (
        "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    )
    status_type = "message/global-delivery-status" if smtputf8 else "message/delivery-status"
    message_id = f"<{token}@{hostname}>"
    status = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Relaygw-Queue-ID: {envelope.id}",
        f"Arrival-Date: {formatdate(envelope.received_at, usegmt=True)}",
    ]
    for report in reports:
        status += ["", *_per_recipient(report, when)]
    head = [
        f"Date: {when}",
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{envelope.sender}>",
        f"Subject: {subject}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        *_explanation(hostname, delayed, reports),
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        f"Content-Type: {status_type}",
        "",
        *status,
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers" if not delayed
        else "Content-Description: Delayed Message Headers",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    text = "\r\n".join(head).encode("utf-8") + b"\r\n"
    data = text + original_headers + f"\r\n--{boundary}--\r\n".encode("ascii")
    return DSN(
        sender="",
        recipient=envelope.sender,
        data=data,
        eight_bit=not data.isascii(),
        smtputf8=smtputf8,
        message_id=message_id,
    )
