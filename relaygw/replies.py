"""
Every wire reply of SPEC section 3 as a named L{Reply} value.

This is the only module that holds reply text.  Replies that carry run-time
values (the FQDN, the client address, a queue id) are built by the small
functions at the bottom, still from text kept here.
"""

from __future__ import annotations

from functools import lru_cache

from attrs import frozen


@frozen
class Reply:
    """
    One SMTP reply.

    @ivar code: the basic three-digit code.
    @ivar enhanced: the RFC 3463 enhanced status code, or C{""} when none is sent.
    @ivar text: the text after the codes; may hold several lines separated by C{"\\n"}.
    """

    code: int
    enhanced: str
    text: str

    @property
    def permanent(self) -> bool:
        """C{True} for 5xx; the enhanced code's class always agrees (see L{_check})."""
        return self.code >= 500

    @property
    def transient(self) -> bool:
        """C{True} for 4xx."""
        return 400 <= self.code < 500

    def lines(self) -> list[bytes]:
        """
        The reply as wire lines without CRLF: C{"250-..."} for all but the last line.
        """
        texts = self.text.split("\n")
        out = []
        for i, t in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            body = f"{self.enhanced} {t}" if self.enhanced else t
            out.append(f"{self.code}{sep}{body}".encode("utf-8"))
        return out

    def __bytes__(self) -> bytes:
        return _wire(self)

    def __str__(self) -> str:
        return bytes(self).decode("utf-8").rstrip("\r\n")


@lru_cache(maxsize=1024)
def _wire(reply: Reply) -> bytes:
    # The constant replies (and a connector's banner and EHLO) go out once
    # per session or command: built once.
    return b"".join(line + b"\r\n" for line in reply.lines())


def _check(reply: Reply) -> Reply:
    # The basic and the enhanced code come from one classification (maddy's
    # SMTPEnchCode shows how they drift apart otherwise).
    if reply.enhanced:
        cls = int(reply.enhanced.split(".")[0])
        if cls != reply.code // 100:
            raise ValueError(f"class mismatch in {reply!r}")
    return reply


def _r(code: int, enhanced: str, text: str) -> Reply:
    return _check(Reply(code, enhanced, text))


MAIL_OK = _r(250, "2.1.0", "Sender OK")
RCPT_OK = _r(250, "2.1.5", "Recipient OK")
UNABLE_TO_RELAY = _r(550, "5.7.54", "SMTP; Unable to relay recipient in non-accepted domain")
NOT_AUTHENTICATED = _r(
    530,
    "5.7.57",
    "SMTP; Client was not authenticated to send anonymous mail during MAIL FROM",
)
SEND_AS_DENIED = _r(550, "5.7.60", "SMTP; Client does not have permissions to send as this sender")
MUST_STARTTLS = _r(530, "5.7.10", "Must issue a STARTTLS command first")
RECIPIENT_NOT_FOUND = _r(
    550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
)
START_DATA = _r(354, "", "Start mail input; end with <CRLF>.<CRLF>")
AUTH_OK = _r(235, "2.7.0", "Authentication successful")
AUTH_FAILED = _r(535, "5.7.3", "Authentication unsuccessful")
AUTH_MECHANISM = _r(504, "5.7.4", "Unrecognized authentication type")
AUTH_TEMPFAIL = _r(454, "4.7.0", "Temporary authentication failure")
TOO_BIG = _r(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_RECIPIENTS = _r(452, "4.5.3", "Too many recipients")
BARE_LF = _r(550, "5.6.11", "SMTPSEND.BareLinefeedsAreIllegal")
SPOOL_FAILED = _r(452, "4.3.1", "Insufficient system resources")
CONNECTION_LIMIT = _r(421, "4.3.2", "Service not available")
LINE_TOO_LONG = _r(500, "5.5.2", "Command line too long")
TOO_MANY_ERRORS = _r(
    421, "4.7.0", "Too many errors on this connection, closing transmission channel"
)
BAD_RECIPIENT_SYNTAX = _r(501, "5.1.3", "Bad recipient address syntax")

# Replies the SPEC table leaves to us; worded as Exchange words them.
OK = _r(250, "2.0.0", "OK")
RESET_OK = _r(250, "2.0.0", "Resetting")
BYE_TEXT = "Service closing transmission channel"
VRFY_REFUSED = _r(252, "2.1.5", "Cannot VRFY user, but will accept message for delivery")
UNRECOGNIZED = _r(500, "5.3.3", "Unrecognized command")
SYNTAX_ERROR = _r(501, "5.5.4", "Invalid arguments")
BAD_SENDER_SYNTAX = _r(501, "5.1.7", "Invalid address")
NEED_HELO = _r(503, "5.5.2", "Send hello first")
NEED_MAIL = _r(503, "5.5.1", "Sender not yet given")
NEED_RCPT = _r(503, "5.5.1", "Need RCPT command")
DUPLICATE_MAIL = _r(503, "5.5.2", "Sender already specified")
BDAT_MIXED = _r(503, "5.5.1", "Invalid command sequence: DATA and BDAT cannot be mixed")
TLS_READY = _r(220, "2.0.0", "SMTP server ready")
TLS_UNAVAILABLE = _r(454, "4.7.0", "TLS not available due to temporary reason")
TLS_ALREADY = _r(503, "5.5.1", "TLS already active")
BAD_SIZE_PARAM = _r(501, "5.5.4", "Invalid SIZE parameter")
BAD_PARAMETER = _r(555, "5.5.4", "Unsupported parameter")
BAD_SEQUENCE = _r(503, "5.5.1", "Bad sequence of commands")
HELP = _r(
    214,
    "",
    "This server supports the following commands:\n"
    "HELO EHLO STARTTLS RCPT DATA RSET MAIL QUIT HELP AUTH BDAT",
)
# AUTH (RFC 4954 section 6) and recipient validation (issue 3).
AUTH_CANCELLED = _r(501, "5.7.0", "Authentication cancelled by the client")
AUTH_BAD_BASE64 = _r(501, "5.5.2", "Cannot Base64-decode client response")
AUTH_ALREADY = _r(503, "5.5.1", "Already authenticated")
#: A recipient could not be looked up because the directory did not answer.
RECIPIENT_LOOKUP_FAILED = _r(451, "4.4.0", "Recipient lookup failed, try again later")
#: An unexpected fault while handling a command; the session stays usable.
INTERNAL_ERROR = _r(451, "4.3.0", "Temporary server error, please try again later")


def bye(fqdn: str) -> Reply:
    """C{221 2.0.0 <fqdn> Service closing transmission channel}."""
    return _r(221, "2.0.0", f"{fqdn} {BYE_TEXT}")


def greeting(banner: str) -> Reply:
    """C{220 <banner>}."""
    return _r(220, "", banner)


def helo(fqdn: str, client_ip: str) -> Reply:
    """The single-line HELO reply."""
    return _r(250, "", f"{fqdn} Hello [{client_ip}]")


def ehlo(fqdn: str, client_ip: str, keywords: list[str]) -> Reply:
    """The multi-line EHLO reply: greeting line, then one keyword per line."""
    return _r(250, "", "\n".join([f"{fqdn} Hello [{client_ip}]", *keywords]))


def queued(message_id: str, internal_id: str, fqdn: str) -> Reply:
    """C{250 2.6.0 <message-id> [InternalId=..., Hostname=...] Queued mail for delivery}."""
    return _r(
        250,
        "2.6.0",
        f"{message_id} [InternalId={internal_id}, Hostname={fqdn}] Queued mail for delivery",
    )


def rate_limited(fqdn: str) -> Reply:
    """The message rate limit reply; the connection closes after it."""
    return _r(
        421,
        "4.4.2",
        f"{fqdn} Message submission rate for this client has exceeded the configured limit",
    )


def timeout(fqdn: str) -> Reply:
    """The command or data timeout reply; the connection closes after it."""
    return _r(421, "4.4.2", f"{fqdn} Timeout waiting for client input")


def auth_challenge(challenge: str) -> Reply:
    """C{334 <base64 challenge>} (RFC 4954); C{challenge} may be empty."""
    return _r(334, "", challenge)


def bdat_ok(octets: int) -> Reply:
    """Reply to a non-final BDAT chunk."""
    return _r(250, "2.0.0", f"{octets} octets received")
