"""
One SMTP transaction to one host (SPEC section 4), over twisted.mail's
C{ESMTPClient} (DESIGN habit 14: the client side is sound to subclass).

This is the only send-side importer of C{twisted.mail.smtp}, and a typed
adapter: what leaves it is a L{TransactionResult} of L{Outcome} values.
Every failure becomes an outcome; the L{Deferred} never errbacks.

The transcript is off (C{debug = False}): twisted.mail records every line it
sends, AUTH included, and puts that record into C{SMTPClientError}; nothing
here ever renders such an error (DESIGN habit 7).

Outbound TLS (C{route.tls}): C{"off"} never sends STARTTLS;
C{"opportunistic"} sends it when offered and does not verify the
certificate; C{"required"} fails the attempt (retry) when the host does not
offer it.  C{"verify"} and C{"mta-sts"} are the next issue:
L{check_tls_mode} raises L{NotImplementedError} for them.

The values a transaction takes and gives (L{OutboundMessage},
L{TransactionResult}, ...) live in L{relaygw.deliver._transaction} and are
re-exported here.

SMTP AUTH towards a smarthost (C{route.auth_user}) is the next issue too; the
seam is L{_RelayClient.__init__}'s C{secret} and C{registerAuthenticator}.
"""

from __future__ import annotations

import ipaddress
from typing import BinaryIO, Literal

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from relaygw._types import IServeReactor
from relaygw.config._model import HostPort
from relaygw.deliver import outcome as _o
from relaygw.deliver._transaction import (
    DATA_ERRORS,
    ClientTimeouts,
    ClientTLS,
    DataOpener,
    OutboundMessage,
    TLSOptionsFactory,
    TransactionResult,
    check_tls_mode,
)
from relaygw.replies import Reply
from relaygw.spool.envelope import Outcome

__all__ = [
    "ClientTLS",
    "ClientTimeouts",
    "DATA_ERRORS",
    "DataOpener",
    "OutboundMessage",
    "TransactionResult",
    "TLSOptionsFactory",
    "check_tls_mode",
    "unverified_tls_options",
    "make_client",
    "deliver_to_host",
]

_Stage = Literal["connect", "greeting", "ehlo", "tls", "mail", "rcpt", "data", "done"]
_BEFORE_TRANSACTION = frozenset({"connect", "greeting", "ehlo", "tls", "mail"})

_log = Logger()


def unverified_tls_options(host: str) -> object:
    """Client TLS for opportunistic and required modes: encryption, no verification."""
    return ssl.CertificateOptions()


class _RelayClient(smtp.ESMTPClient):  # type: ignore[misc]
    """
    One transaction, then QUIT.  The result fires once: after the final
    reply of the transaction, or when the connection ends before it.
    """

    debug = False
    lastAddress: str | None

    def __init__(
        self,
        message: OutboundMessage,
        data: BinaryIO,
        *,
        host: str,
        helo: str,
        tls: ClientTLS,
        tls_options: TLSOptionsFactory,
        clock: IReactorTime,
        timeouts: ClientTimeouts,
        result: Deferred[TransactionResult],
    ) -> None:
        context = None if tls == "off" else tls_options(host.rsplit(":", 1)[0])
        # The next issue passes the smarthost secret here and registers
        # authenticators; until then no AUTH is attempted.
        super().__init__(None, context, helo.encode("ascii", "ignore") or b"localhost")
        self.requireTransportSecurity = tls == "required"
        self.timeout = timeouts.reply
        self.callLater = clock.callLater
        self._message = message
        self._data = data
        self._host = host
        self._timeouts = timeouts
        self._result = result
        self._stage: _Stage = "connect"
        self._extensions: frozenset[bytes] = frozenset()
        self._mail_sent = False
        self._error: Outcome | None = None
        self._line_start = True
        self._pending_cr = False

    # -- results ------------------------------------------------------------

    def _fire(self, outcomes: dict[str, Outcome], failover: bool) -> None:
        if self._stage == "done":
            return
        self._stage = "done"
        self._result.callback(TransactionResult(self._host, outcomes, failover))

    def _fire_error(self, error: Outcome) -> None:
        failover = self._stage in _BEFORE_TRANSACTION
        outcomes: dict[str, Outcome] = {}
        refused = {a: (c, t) for a, c, t in self.toAddressesResult if c not in smtp.SUCCESS}
        for rcpt in self._message.recipients:
            if rcpt in refused:
                outcomes[rcpt] = _o.reply_outcome(*refused[rcpt], remote_host=self._host)
            else:
                outcomes[rcpt] = error
        self._fire(outcomes, failover)

    def _record(self, reply: Reply) -> None:
        if self._error is None:
            self._error = _o.local_outcome(reply, self._host)

    def _error_outcome(self, exc: object) -> Outcome:
        if isinstance(exc, smtp.SMTPTimeoutError):
            return _o.local_outcome(_o.TIMED_OUT, self._host)
        if isinstance(exc, (smtp.TLSRequiredError, smtp.EHLORequiredError)):
            return _o.local_outcome(_o.TLS_NOT_OFFERED, self._host)
        if isinstance(exc, smtp.TLSError):
            return _o.local_outcome(_o.TLS_FAILED, self._host)
        if isinstance(exc, smtp.SMTPProtocolError):
            return _o.local_outcome(_o.PROTOCOL_ERROR, self._host)
        code = getattr(exc, "code", -1)
        if isinstance(exc, smtp.SMTPClientError) and isinstance(code, int) and 400 <= code < 600:
            # A refusal before the transaction: another host (or a later
            # attempt) may take it, so it is retried whatever its class.
            seen = _o.reply_outcome(code, getattr(exc, "resp", b"") or b"", self._host)
            return Outcome("retry", seen.reply, self._host)
        if isinstance(exc, BaseException):
            return _o.failure_outcome(exc, self._host)
        return _o.local_outcome(_o.LOCAL_ERROR, self._host)

    # -- twisted.mail hooks ---------------------------------------------------

    def connectionMade(self) -> None:
        self._stage = "greeting"
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._data.close()
        if self._stage == "done":
            return
        if self._error is not None:
            error = self._error
        elif isinstance(reason.value, SSL.Error):
            error = _o.local_outcome(_o.TLS_FAILED, self._host)
        elif isinstance(reason.value, ConnectionDone):
            error = _o.local_outcome(_o.CONNECTION_LOST, self._host)
        else:
            error = _o.failure_outcome(reason, self._host)
        self._fire_error(error)

    def timeoutConnection(self) -> None:
        self._record(_o.TIMED_OUT)
        self.transport.abortConnection()

    def sendError(self, exc: object) -> None:
        if self._error is None:
            self._error = self._error_outcome(exc)
        super().sendError(exc)

    def esmtpState_ehlo(self, code: int, resp: bytes) -> None:
        self._stage = "ehlo"
        super().esmtpState_ehlo(code, resp)

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        self._extensions = frozenset(
            line.split(None, 1)[0].upper() for line in resp.splitlines()[1:] if line.strip()
        )
        super().esmtpState_serverConfig(code, resp)

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        self._stage = "tls"
        super().esmtpState_starttls(code, resp)

    def smtpState_helo(self, code: int, resp: bytes) -> None:
        super().smtpState_helo(code, resp)
        # twisted.mail would answer a refused HELO with HELO again, forever.
        self._failresponse = self._refused_before_mail

    def _refused_before_mail(self, code: int, resp: bytes) -> None:
        seen = _o.reply_outcome(code, resp, self._host)
        if self._error is None:
            self._error = Outcome("retry", seen.reply, self._host)
        self._disconnectFromServer()

    def smtpState_from(self, code: int, resp: bytes) -> None:
        if self._mail_sent:
            self._from = None
            self._disconnectFromServer()
            return
        self._mail_sent = True
        self._stage = "mail"
        if self._message.smtputf8 and b"SMTPUTF8" not in self._extensions:
            bounce = _o.local_outcome(_o.SMTPUTF8_NOT_OFFERED, self._host)
            self._fire({r: bounce for r in self._message.recipients}, failover=False)
            self._disconnectFromServer()
            return
        line = b"MAIL FROM:<" + self._message.sender.encode("utf-8") + b">"
        if self._message.eight_bit and b"8BITMIME" in self._extensions:
            line += b" BODY=8BITMIME"
        if self._message.smtputf8:
            line += b" SMTPUTF8"
        self._from = self._message.sender
        self._failresponse = self.smtpTransferFailed
        self._expected = [250]
        self._okresponse = self.smtpState_to
        self.sendLine(line)

    def smtpState_to(self, code: int, resp: bytes) -> None:
        self._stage = "rcpt"
        super().smtpState_to(code, resp)

    def smtpState_toOrData(self, code: int, resp: bytes) -> None:
        if self.lastAddress is not None:
            self.toAddressesResult.append((self.lastAddress, code, resp))
            if code in smtp.SUCCESS:
                self.successAddresses.append(self.lastAddress)
        try:
            self.lastAddress = next(self.toAddresses)
        except StopIteration:
            if self.successAddresses:
                self.sendLine(b"DATA")
                self._expected = [354]
                self._okresponse = self.smtpState_data
            else:
                self.smtpState_msgSent(-1, b"")
        else:
            self.sendLine(b"RCPT TO:<" + self.lastAddress.encode("utf-8") + b">")

    def smtpState_data(self, code: int, resp: bytes) -> None:
        self._stage = "data"
        super().smtpState_data(code, resp)

    def smtpState_msgSent(self, code: int, resp: bytes) -> None:
        if self._from is not None:
            self._transaction_done(code, resp)
        self._from = None
        # One transaction per connection: QUIT rather than twisted.mail's RSET loop.
        self._disconnectFromServer()

    def _transaction_done(self, code: int, resp: bytes) -> None:
        if self._stage == "mail":
            refusal = _o.reply_outcome(code, resp, self._host)
            self._fire(
                {r: refusal for r in self._message.recipients},
                failover=refusal.kind == "retry",
            )
            return
        accepted = set(self.successAddresses)
        rcpt = {a: (c, t) for a, c, t in self.toAddressesResult}
        final = _o.reply_outcome(code, resp, self._host)
        outcomes: dict[str, Outcome] = {}
        for r in self._message.recipients:
            if r in accepted:
                outcomes[r] = final
            elif r in rcpt:
                outcomes[r] = _o.reply_outcome(*rcpt[r], remote_host=self._host)
            else:
                outcomes[r] = _o.local_outcome(_o.LOCAL_ERROR, self._host)
        self._fire(outcomes, failover=False)

    def getMailFrom(self) -> str | None:
        return None if self._mail_sent else self._message.sender

    def getMailTo(self) -> list[str]:
        return list(self._message.recipients)

    def getMailData(self) -> BinaryIO:
        self._data.seek(0)
        return self._data

    def sentMail(self, *args: object) -> None:
        """Unused: L{smtpState_msgSent} reports the transaction."""

    def transformChunk(self, chunk: bytes) -> bytes:
        """CRLF line ends and dot-stuffing (RFC 5321 4.5.2), across chunk edges."""
        self.resetTimeout()
        data = (b"\r" + chunk) if self._pending_cr else chunk
        self._pending_cr = data.endswith(b"\r")
        if self._pending_cr:
            data = data[:-1]
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._line_start and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\n.", b"\n..")
        if data:
            self._line_start = data.endswith(b"\n")
        return data

    def finishedFileTransfer(self, lastsent: bytes) -> None:
        ending = b"" if self._line_start and not self._pending_cr else b"\r\n"
        self.sendLine(ending + b".")
        self.setTimeout(self._timeouts.data_done)


def make_client(
    message: OutboundMessage,
    data: BinaryIO,
    *,
    host: str,
    helo: str,
    tls: ClientTLS,
    clock: IReactorTime,
    timeouts: ClientTimeouts = ClientTimeouts(),
    tls_options: TLSOptionsFactory = unverified_tls_options,
) -> tuple[Protocol, Deferred[TransactionResult]]:
    """
    A client protocol for one transaction, not yet connected.

    @param message: what to send.
    @param data: the open message data; the protocol closes it when its
        connection ends.
    @param host: the peer as C{host:port}, for outcomes and the TLS context.
    @param helo: the name sent with EHLO / HELO.
    @param tls: the outbound TLS mode (see L{check_tls_mode}).
    @param clock: drives the reply timeouts.
    @return: the protocol and a Deferred firing with the L{TransactionResult}
        (never failing).
    """
    result: Deferred[TransactionResult] = Deferred()
    client = _RelayClient(
        message,
        data,
        host=host,
        helo=helo,
        tls=tls,
        tls_options=tls_options,
        clock=clock,
        timeouts=timeouts,
        result=result,
    )
    proto: Protocol = client
    return proto, result


class _OneShot(Factory):
    """
    Hands out one prepared protocol.  Unlike C{connectProtocol}'s factory it
    is built once per connection without defining a class, and it is quiet:
    no "Starting factory" event per delivery.
    """

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        return self._protocol


def _endpoint(reactor: IServeReactor, host: HostPort, timeout: float) -> IStreamClientEndpoint:
    # An IP literal needs no name resolution: HostnameEndpoint would still go
    # through its resolver machinery per connection.
    try:
        version = ipaddress.ip_address(host.host).version
    except ValueError:
        return HostnameEndpoint(reactor, host.host, host.port, timeout=timeout)
    kind = TCP4ClientEndpoint if version == 4 else TCP6ClientEndpoint
    return kind(reactor, host.host, host.port, timeout=timeout)


def deliver_to_host(
    reactor: IServeReactor,
    host: HostPort,
    message: OutboundMessage,
    *,
    helo: str,
    tls: ClientTLS,
    timeouts: ClientTimeouts = ClientTimeouts(),
    tls_options: TLSOptionsFactory = unverified_tls_options,
) -> Deferred[TransactionResult]:
    """
    Connect to C{host} and run one transaction for C{message}.

    @param reactor: TCP and time (and name resolution, for host names).
    @return: a Deferred firing with the L{TransactionResult}; it never fails.
    """
    return Deferred.fromCoroutine(
        _deliver_to_host(reactor, host, message, helo, tls, timeouts, tls_options)
    )


async def _deliver_to_host(
    reactor: IServeReactor,
    host: HostPort,
    message: OutboundMessage,
    helo: str,
    tls: ClientTLS,
    timeouts: ClientTimeouts,
    tls_options: TLSOptionsFactory,
) -> TransactionResult:
    name = str(host)
    try:
        data = message.open_data()
    except DATA_ERRORS as e:
        _log.error("Cannot open the message data: {error}", error=repr(e))
        failed = _o.local_outcome(_o.LOCAL_ERROR)
        return TransactionResult(name, {r: failed for r in message.recipients}, False)
    client, result = make_client(
        message,
        data,
        host=name,
        helo=helo,
        tls=tls,
        clock=reactor,
        timeouts=timeouts,
        tls_options=tls_options,
    )
    try:
        await _endpoint(reactor, host, timeouts.connect).connect(_OneShot(client))
    except Exception as e:
        data.close()
        failed = _o.failure_outcome(e, name)
        return TransactionResult(name, {r: failed for r in message.recipients}, True)
    return await result
