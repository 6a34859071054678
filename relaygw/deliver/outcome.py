"""
The one classification of delivery results (SPEC section 4): 2xx delivered,
4xx retried, 5xx bounced; connection failures, timeouts and TLS failures are
retried.  Pure: it builds L{Outcome} values from reply codes, texts and
exceptions, and holds the texts of the outcomes relaygw decides itself.

Those local texts are L{Reply} values, so their basic and enhanced codes are
checked against each other like the wire replies of L{relaygw.replies}; they
never go on the wire, only into envelopes, logs and (later) DSNs.
"""

from __future__ import annotations

import builtins
from twisted.internet import error as _neterror
from twisted.python.failure import Failure

from relaygw.replies import Reply
from relaygw.spool.envelope import Outcome, OutcomeKind

__all__ = [
    "classify",
    "reply_outcome",
    "local_outcome",
    "failure_outcome",
    "MAX_REPLY_CHARS",
    "DELIVERED_MAILDIR",
    "NO_ROUTE",
    "EXPIRED",
    "CONNECTION_REFUSED",
    "CONNECTION_FAILED",
    "CONNECTION_LOST",
    "HOST_NOT_FOUND",
    "TIMED_OUT",
    "TLS_FAILED",
    "TLS_NOT_OFFERED",
    "TLS_VERIFY_FAILED",
    "AUTH_NEEDS_TLS",
    "AUTH_NOT_OFFERED",
    "AUTH_REFUSED",
    "XOAUTH2_NOT_OFFERED",
    "TOKEN_UNAVAILABLE",
    "ROUTE_FILE_UNREADABLE",
    "PROTOCOL_ERROR",
    "SMTPUTF8_NOT_OFFERED",
    "EIGHTBIT_NOT_OFFERED",
    "TOO_BIG_FOR_HOST",
    "LOCAL_ERROR",
    "MAILBOX_WRITE_FAILED",
    "BAD_MAILBOX",
    "NULL_MX",
    "NO_SUCH_DOMAIN",
    "DNS_TEMPFAIL",
    "NO_EXCHANGER",
    "NO_EXCHANGER_ADDRESS",
    "IP_LITERAL_REFUSED",
    "MTA_STS_NO_MATCH",
    "TARGET_FAILED",
]

#: Longest reply text kept in an outcome; the rest is cut (a DSN quotes it).
MAX_REPLY_CHARS = 512


def _local(code: int, enhanced: str, text: str) -> Reply:
    if int(enhanced.split(".")[0]) != code // 100:
        raise ValueError(f"class mismatch in {code} {enhanced}")
    return Reply(code, enhanced, text)


DELIVERED_MAILDIR = _local(250, "2.0.0", "Delivered to Maildir")
NO_ROUTE = _local(550, "5.4.4", "no route")
EXPIRED = _local(550, "5.4.7", "Delivery time expired")
CONNECTION_REFUSED = _local(451, "4.4.1", "Connection refused by the remote host")
CONNECTION_FAILED = _local(451, "4.4.1", "Connection to the remote host failed")
CONNECTION_LOST = _local(451, "4.4.2", "Connection to the remote host lost")
HOST_NOT_FOUND = _local(451, "4.4.3", "Remote host name lookup failed")
TIMED_OUT = _local(451, "4.4.2", "Timed out waiting for the remote host")
TLS_FAILED = _local(451, "4.7.5", "TLS negotiation with the remote host failed")
TLS_NOT_OFFERED = _local(
    451, "4.7.4", "The route requires TLS but the remote host does not offer STARTTLS"
)
# Verification and AUTH failures are retried, never bounced: they are a
# configuration problem on one side or the other, not the recipient's.
TLS_VERIFY_FAILED = _local(
    451, "4.7.5", "The remote host's TLS certificate could not be verified"
)
AUTH_NEEDS_TLS = _local(
    451, "4.7.10", "The route's credentials are only sent over TLS, which is not in use"
)
AUTH_NOT_OFFERED = _local(
    451, "4.7.0", "The route needs AUTH but the remote host offers neither PLAIN nor LOGIN"
)
AUTH_REFUSED = _local(451, "4.7.8", "The remote host refused the route's credentials")
XOAUTH2_NOT_OFFERED = _local(
    451, "4.7.0", "The route needs AUTH XOAUTH2 but the remote host does not offer it"
)
# The token endpoint down or refusing the app: the mail waits (issue 9).
TOKEN_UNAVAILABLE = _local(451, "4.7.0", "No OAuth access token for the route")
ROUTE_FILE_UNREADABLE = _local(
    451, "4.3.5", "A file the route needs cannot be read; see the log"
)
PROTOCOL_ERROR = _local(451, "4.5.0", "The remote host sent an invalid reply")
SMTPUTF8_NOT_OFFERED = _local(
    550, "5.6.7", "The message needs SMTPUTF8 but the remote host does not offer it"
)
EIGHTBIT_NOT_OFFERED = _local(
    554, "5.6.3", "The message has 8-bit content but the remote host does not offer 8BITMIME"
)
TOO_BIG_FOR_HOST = _local(552, "5.3.4", "The message is larger than the remote host accepts")
LOCAL_ERROR = _local(451, "4.3.0", "Local error in processing")
MAILBOX_WRITE_FAILED = _local(451, "4.3.0", "Could not write the message to the mailbox")
BAD_MAILBOX = _local(550, "5.1.3", "Bad destination mailbox address syntax")
NULL_MX = _local(556, "5.1.10", "Recipient domain does not accept mail (null MX)")
NO_SUCH_DOMAIN = _local(550, "5.1.2", "Recipient domain does not exist")
DNS_TEMPFAIL = _local(451, "4.4.3", "DNS lookup for the recipient domain failed")
NO_EXCHANGER = _local(550, "5.4.4", "Recipient domain has neither MX nor address records")
NO_EXCHANGER_ADDRESS = _local(451, "4.4.3", "No address found for any exchanger of the domain")
MTA_STS_NO_MATCH = _local(
    451, "4.7.5", "No exchanger of the recipient domain matches its enforced MTA-STS policy"
)
IP_LITERAL_REFUSED = _local(550, "5.4.4", "IP-literal recipients are not relayed by this route")
TARGET_FAILED = _local(451, "4.3.0", "Delivery attempt failed; see the log")


def classify(code: int) -> OutcomeKind:
    """
    The kind of a reply code: C{2xx} delivered, C{5xx} bounce, anything else
    (C{4xx}, and codes that make no sense at that point) retry, so a
    misunderstanding never loses or bounces a message.

    The basic code decides; an enhanced code of another class is ignored.
    """
    if 200 <= code < 300:
        return "delivered"
    if 500 <= code < 600:
        return "bounce"
    return "retry"


def _one_line(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    parts = (line.strip() for line in text.splitlines())
    joined = " ".join(p for p in parts if p)
    cleaned = "".join(c if c.isprintable() else "?" for c in joined)
    return cleaned[:MAX_REPLY_CHARS]


def reply_outcome(code: int, text: str | bytes, remote_host: str = "") -> Outcome:
    """
    The outcome of a remote reply.

    @param code: the basic reply code.
    @param text: the reply text after the code (enhanced code included, as
        the server sent it); the lines of a multi-line reply are joined with
        spaces, control characters replaced, and the whole cut to
        L{MAX_REPLY_CHARS}.
    @param remote_host: the host that replied.
    """
    line = _one_line(text)
    return Outcome(
        kind=classify(code),
        reply=f"{code} {line}" if line else str(code),
        remote_host=remote_host,
    )


def local_outcome(reply: Reply, remote_host: str = "") -> Outcome:
    """The outcome of one of relaygw's own decisions (the constants of this module)."""
    return Outcome(kind=classify(reply.code), reply=str(reply), remote_host=remote_host)


def _exception_reply(exc: BaseException) -> Reply:
    # Order matters: the twisted.internet.error classes subclass each other.
    if isinstance(exc, (_neterror.ConnectionRefusedError, builtins.ConnectionRefusedError)):
        return CONNECTION_REFUSED
    if isinstance(exc, (_neterror.DNSLookupError, _neterror.UnknownHostError)):
        return HOST_NOT_FOUND
    if isinstance(
        exc, (_neterror.TimeoutError, _neterror.TCPTimedOutError, builtins.TimeoutError)
    ):
        return TIMED_OUT
    if isinstance(exc, (_neterror.ConnectionLost, _neterror.ConnectionDone, ConnectionResetError)):
        return CONNECTION_LOST
    if isinstance(exc, (_neterror.ConnectError, ConnectionError)):
        return CONNECTION_FAILED
    if type(exc).__module__.startswith("OpenSSL") or isinstance(exc, _neterror.SSLError):
        return TLS_FAILED
    return LOCAL_ERROR


def failure_outcome(failure: Failure | BaseException, remote_host: str = "") -> Outcome:
    """
    The outcome of a failed attempt: always C{retry}.

    Only the exception's type decides the text; the exception's own message
    never reaches the outcome (twisted.mail's C{SMTPClientError} embeds the
    session transcript, which may hold credentials: DESIGN habit 7).

    @param failure: a L{Failure} or the exception itself.
    @param remote_host: the host concerned, C{""} when none.
    """
    # A Failure is itself a BaseException: unwrap it first.
    exc = failure.value if isinstance(failure, Failure) else failure
    reply = LOCAL_ERROR if exc is None else _exception_reply(exc)
    return Outcome(kind="retry", reply=str(reply), remote_host=remote_host)
