"""
What one outbound SMTP transaction takes and gives: the message, the TLS
mode, the credentials, the timeouts and the per-recipient result.  Plain values, re-exported by
L{relaygw.deliver.smtpclient}, which runs the transaction.
"""

from __future__ import annotations

from typing import BinaryIO, Callable, Literal, Sequence

from attrs import field, frozen

from relaygw.config._model import RouteAuth, RouteTLS
from relaygw.spool.envelope import Envelope, Outcome

__all__ = [
    "ClientAuth",
    "ClientTLS",
    "ClientTimeouts",
    "DATA_ERRORS",
    "DataOpener",
    "OutboundMessage",
    "TLSOptionsFactory",
    "TransactionResult",
    "check_tls_mode",
]

ClientTLS = Literal["off", "opportunistic", "required", "verify"]
"""The outbound TLS modes L{relaygw.deliver.smtpclient} implements."""

TLSOptionsFactory = Callable[[str], object]
"""Server name -> the client context factory given to C{transport.startTLS}."""

DataOpener = Callable[[], BinaryIO]
"""Opens the spooled message data anew (see L{relaygw.interfaces.IDeliveryTarget.deliver})."""

DATA_ERRORS = (OSError, KeyError, ValueError)
"""What a L{DataOpener} raises when the data cannot be had (L{relaygw.interfaces.ISpool.open_data})."""


def check_tls_mode(mode: RouteTLS) -> ClientTLS:
    """
    The client TLS mode for a route's C{tls} setting: C{"mta-sts"} starts
    as C{"opportunistic"}, and a domain's enforced policy makes it
    C{"verify"} (L{relaygw.deliver.mx}).
    """
    return "opportunistic" if mode == "mta-sts" else mode


@frozen
class ClientAuth:
    """
    The credentials of a smarthost route (C{auth_user} and the content of
    C{auth_password_file}, or, with C{mechanism = "xoauth2"}, an OAuth
    access token as C{password}).  The password is left out of C{repr}, so
    a value logged or shown in a traceback never carries it.
    """

    user: str
    password: str = field(repr=False)
    mechanism: RouteAuth = field(default="password", repr=False)


@frozen
class ClientTimeouts:
    """
    How long the client waits, in seconds (RFC 5321 section 4.5.3.2 values).

    @ivar connect: for the TCP connection.
    @ivar reply: for each reply, and between data chunks being taken.
    @ivar data_done: for the reply to the final C{.}.
    @ivar idle: how long a reusable connection waits for its next message
        before QUIT (Postfix's C{smtp_connection_cache_time_limit} is 2 s;
        a little longer suits a gateway whose devices send in bursts).
    """

    connect: float = 30.0
    reply: float = 300.0
    data_done: float = 600.0
    idle: float = 5.0


@frozen
class OutboundMessage:
    """
    What one transaction sends.

    @ivar sender: the reverse path without brackets; C{""} for the null sender.
    @ivar recipients: the forward paths, in RCPT order.
    @ivar open_data: opens the spool's message data (CRLF lines, not
        dot-stuffed), once per transaction.
    @ivar eight_bit: send C{BODY=8BITMIME} when the host offers it.
    @ivar smtputf8: the message needs SMTPUTF8 (RFC 6531).
    @ivar size: the data's octets (for C{SIZE=}, RFC 1870); 0 when unknown.
    @ivar crlf_lines: the data was checked for bare CR and LF when received
        (all but BODY=BINARYMIME).
    """

    sender: str
    recipients: tuple[str, ...]
    open_data: DataOpener
    eight_bit: bool = False
    smtputf8: bool = False
    size: int = 0
    crlf_lines: bool = False

    @classmethod
    def of(
        cls, envelope: Envelope, recipients: Sequence[str], open_data: DataOpener
    ) -> OutboundMessage:
        """The message of C{envelope} for C{recipients}."""
        return cls(
            sender=envelope.sender,
            recipients=tuple(recipients),
            open_data=open_data,
            eight_bit=envelope.body != "7BIT",
            smtputf8=envelope.smtputf8,
            size=envelope.size,
            crlf_lines=envelope.body != "BINARYMIME",
        )


@frozen
class TransactionResult:
    """
    The result of one attempt at one host.

    @ivar host: the host as C{host:port}.
    @ivar outcomes: one outcome per recipient of the message.
    @ivar failover: C{True} when the host never took the transaction
        (connection failure, refused or broken before the reply to MAIL, a
        4xx to MAIL, TLS required but missing): another host may do better.
    @ivar auth_refused: the host answered AUTH with a 5xx (for XOAUTH2: the
        token may have expired or been revoked, so a fresh one may do).
    """

    host: str
    outcomes: dict[str, Outcome]
    failover: bool
    auth_refused: bool = False
