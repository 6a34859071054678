"""
The SASL PLAIN (RFC 4616) and LOGIN exchanges of SMTP AUTH (RFC 4954),
as pure state machines: base64 lines in, L{Step} values out.  No I/O.

The decoded payloads leave this module only inside L{Credentials}, whose
C{repr} never shows the password (DESIGN habit 7).

Device quirks tolerated: an initial response on the AUTH line for LOGIN
(C{AUTH LOGIN <base64 user>}, then only the password is asked for) as well
as for PLAIN; C{=} as an empty initial response (RFC 4954 section 4).
"""

from __future__ import annotations

import binascii
import hmac
from base64 import b64decode, b64encode

from attrs import field, frozen
from twisted.cred.credentials import IUsernamePassword
from zope.interface import implementer

from relaygw import replies
from relaygw.replies import Reply

__all__ = [
    "Challenge",
    "Credentials",
    "Exchange",
    "MECHANISMS",
    "Refused",
    "Response",
    "Step",
    "start",
]

#: The mechanisms this module implements, upper-case.
MECHANISMS = frozenset({"PLAIN", "LOGIN"})

_USERNAME_PROMPT = b64encode(b"Username:").decode("ascii")
_PASSWORD_PROMPT = b64encode(b"Password:").decode("ascii")


@implementer(IUsernamePassword)
@frozen
class Credentials:
    """
    What a client proved it knows, for the portal.

    @ivar username: the authentication identity, as sent (UTF-8 octets).
    @ivar password: the password octets; never shown by C{repr}.
    @ivar client_ip: the client's address (for throttling and logs).
    @ivar connector: the name of the session's connector.
    @ivar gate: the L{relaygw.interfaces.IAccountGate} of this login (its
        throttle attempt), passed on to the directory; C{None} outside a session.
    """

    username: bytes
    password: bytes = field(repr=False)
    client_ip: str = ""
    connector: str = ""
    gate: object | None = field(default=None, repr=False, eq=False)

    def checkPassword(self, password: bytes) -> bool:
        """Constant-time comparison with C{password}."""
        return hmac.compare_digest(self.password, password)


@frozen
class Challenge:
    """Send C{334 <prompt>} and feed the client's next line to L{Exchange.respond}."""

    prompt: str


@frozen
class Response:
    """The exchange is complete: check these identities."""

    username: bytes
    password: bytes = field(repr=False)


@frozen
class Refused:
    """
    The exchange ended without credentials: answer C{reply}.

    @ivar reason: for the log only; never holds payload data.
    """

    reply: Reply
    reason: str


Step = Challenge | Response | Refused


def _decode(line: str) -> bytes | Refused:
    if line.strip() == "*":
        return Refused(replies.AUTH_CANCELLED, "cancelled by the client")
    text = line.strip()
    if text == "=":
        return b""
    try:
        return b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return Refused(replies.AUTH_BAD_BASE64, "response is not base64")


class Exchange:
    """
    One SASL exchange.  Call L{respond} with each client line after a
    L{Challenge}; the exchange ends with a L{Response} or a L{Refused}.
    """

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self._username: bytes | None = None

    def first(self, initial: str | None) -> Step:
        """
        The step after the AUTH command.

        @param initial: the initial response on the AUTH line, or C{None}.
        """
        if initial is None:
            if self.mechanism == "PLAIN":
                return Challenge("")
            return Challenge(_USERNAME_PROMPT)
        return self.respond(initial)

    def respond(self, line: str) -> Step:
        """The step after the client's line C{line} (base64 or C{*})."""
        data = _decode(line)
        if isinstance(data, Refused):
            return data
        if self.mechanism == "PLAIN":
            return _plain(data)
        if self._username is None:
            self._username = data
            return Challenge(_PASSWORD_PROMPT)
        return Response(self._username, data)


def _plain(data: bytes) -> Step:
    # RFC 4616: [authzid] NUL authcid NUL passwd
    parts = data.split(b"\x00")
    if len(parts) != 3:
        return Refused(replies.SYNTAX_ERROR, "malformed PLAIN message")
    authzid, authcid, password = parts
    if authzid and authzid != authcid:
        # Acting for another identity is not supported.
        return Refused(replies.AUTH_FAILED, "authorization identity differs from login")
    return Response(authcid, password)


def start(mechanism: str, initial: str | None) -> tuple[Exchange, Step] | None:
    """
    Begin an exchange.

    @param mechanism: the mechanism named on the AUTH line (any case).
    @param initial: the initial response, or C{None}.
    @return: the exchange and its first step, or C{None} for a mechanism
        this module does not implement.
    """
    name = mechanism.upper()
    if name not in MECHANISMS:
        return None
    exchange = Exchange(name)
    return exchange, exchange.first(initial)
