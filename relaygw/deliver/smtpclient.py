"""
The SMTP client protocol (SPEC section 4), over twisted.mail's
C{ESMTPClient} (DESIGN habit 14: the client side is sound to subclass):
transactions on one connection, in turn.  Connecting, and reusing
connections, is L{relaygw.deliver.connections}; TLS trust is
L{relaygw.deliver.tlspolicy}.

This is the only send-side importer of C{twisted.mail.smtp}, and a typed
adapter: what leaves it is a L{TransactionResult} of L{Outcome} values.
Every failure becomes an outcome; the L{Deferred} never errbacks.

The transcript is off (C{debug = False}): twisted.mail records every line it
sends, AUTH included, and puts that record into C{SMTPClientError}; nothing
here ever renders such an error (DESIGN habit 7).

Outbound TLS (C{route.tls}): C{"off"} never sends STARTTLS;
C{"opportunistic"} sends it when offered and does not verify the
certificate, and when the handshake fails (or STARTTLS is refused) it tries
the same host once more in clear, as Postfix does; C{"required"} fails the
attempt (retry) when the host does not offer STARTTLS; C{"verify"} also
checks the certificate with service-identity against the server name
(L{verified_tls_options}), and a certificate that does not verify is a
retry.  C{"mta-sts"} is C{"opportunistic"} or, for a domain with an
enforced policy, C{"verify"} (L{relaygw.deliver.mx}).

SMTP AUTH (a L{ClientAuth}, from a smarthost route's C{auth_user}): PLAIN
when offered, else LOGIN, and only over TLS; without TLS, or when the host
offers neither, the credentials are not sent and the attempt is retried.
A refusal of the credentials is retried too, whatever its class (a bad
password must not bounce mail), and logged as an error.  With
C{mechanism = "xoauth2"} (issue 9) the password is an OAuth access token
sent as C{AUTH XOAUTH2} (C{user=...^Aauth=Bearer ...^A^A}, base64); a 334
error challenge is answered with an empty line, and a 5xx sets
L{TransactionResult.auth_refused} so the target can try a fresh token.

Protocol log (a L{SendLog}, for a route with C{protocol_logging =
"verbose"}): every line sent and received, as Exchange's SmtpSend log, with
AUTH masked (C{AUTH PLAIN ****}, C{AUTH XOAUTH2 ****}, each LOGIN response
C{****}) and no message data (the final C{.} only, after a C{*} row with
the size).

The values a transaction takes and gives (L{OutboundMessage},
L{TransactionResult}, ...) live in L{relaygw.deliver._transaction} and are
re-exported here.
"""

from __future__ import annotations

import base64
import functools
from typing import BinaryIO, Callable, Literal

from attrs import evolve, frozen
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from relaygw.deliver import outcome as _o
from relaygw.deliver._transaction import (
    DATA_ERRORS,
    ClientAuth,
    ClientTimeouts,
    ClientTLS,
    DataOpener,
    OutboundMessage,
    TLSOptionsFactory,
    TransactionResult,
    check_tls_mode,
)
from relaygw.deliver._stuffing import DataEncoder
from relaygw.deliver.tlspolicy import (
    SYSTEM_TRUST,
    load_ca_file,
    tls_failure_reason,
    tls_options_for,
    unverified_tls_options,
    verified_tls_options,
)
from relaygw.interfaces import IProtocolLog, IProtocolLogSession
from relaygw.polling import write_now
from relaygw.replies import Reply
from relaygw.spool.envelope import Outcome

__all__ = [
    "ClientAuth",
    "ClientTLS",
    "ClientTimeouts",
    "DATA_ERRORS",
    "DataOpener",
    "OutboundMessage",
    "TransactionResult",
    "TLSOptionsFactory",
    "check_tls_mode",
    "unverified_tls_options",
    "verified_tls_options",
    "load_ca_file",
    "tls_options_for",
    "RelayClient",
    "SendLog",
    "make_client",
    "new_client",
]

_Stage = Literal["connect", "greeting", "ehlo", "tls", "auth", "mail", "rcpt", "data", "done"]
_BEFORE_TRANSACTION = frozenset({"connect", "greeting", "ehlo", "tls", "auth", "mail"})
_log = Logger()
#: Every reply code: the pipelined replies are told apart by their order.
_ANY_REPLY = list(range(1000))


@frozen
class SendLog:
    """
    Where a route's connections are logged: the SmtpSend protocol log,
    under the route's name as its connector-id.
    """

    log: IProtocolLog
    route: str


def _is_ascii(data: BinaryIO, chunk: int = 64 * 1024) -> bool:
    """Whether the message data is 7-bit (many clients declare 8BITMIME for ASCII mail)."""
    try:
        data.seek(0)
        while block := data.read(chunk):
            if not block.isascii():
                return False
        return True
    finally:
        data.seek(0)


class RelayClient(smtp.ESMTPClient):  # type: ignore[misc]
    """
    One connection: a transaction, then QUIT, or, when C{on_idle} is set,
    RSET and a wait for the next message (L{offer}) for up to
    C{timeouts.idle} seconds.  Each transaction's result fires once: after its final
    reply, or when the connection ends before it.

    @ivar tls_failed: the STARTTLS handshake failed or STARTTLS was refused
        (L{deliver_to_host} may then try again in clear).
    @ivar on_idle: called when the connection is ready for another message;
        C{None}: QUIT after the first.
    @ivar on_gone: called when the connection has ended.
    @ivar transactions: transactions begun on this connection.
    """

    debug = False
    lastAddress: str | None
    # ESMTPClient sends every attribute write through a Python __setattr__
    # (a shim for its deprecated tlsMode, which relaygw never sets): 4 % of
    # the delivery process's time under load.
    __setattr__ = object.__setattr__

    def __init__(
        self,
        message: OutboundMessage,
        data: BinaryIO,
        *,
        host: str,
        server_name: str,
        helo: str,
        tls: ClientTLS,
        tls_options: TLSOptionsFactory,
        auth: ClientAuth | None,
        clock: IReactorTime,
        timeouts: ClientTimeouts,
        send_log: SendLog | None = None,
    ) -> None:
        context = None if tls == "off" else tls_options(server_name)
        if tls == "verify" and isinstance(context, ssl.CertificateOptions) and not context.verify:
            # A caller passing on its unverified default must not turn
            # verify into encryption without authentication.
            context = SYSTEM_TRUST(server_name)
        # No secret for twisted.mail: L{authenticate} runs the exchange itself.
        super().__init__(None, context, helo.encode("ascii", "ignore") or b"localhost")
        self.requireTransportSecurity = tls in ("required", "verify")
        # Without EHLO there is no AUTH: no HELO fallback then.
        self.requireAuthentication = auth is not None
        self.timeout = timeouts.reply
        self.callLater = clock.callLater
        self.tls_failed = False
        self.on_idle: Callable[[RelayClient], None] | None = None
        self.on_gone: Callable[[RelayClient], None] | None = None
        self.transactions = 0
        self.connected_at = clock.seconds()
        self._clock = clock
        self._idle = False
        self._resetting = False
        self._queued = False
        self._host = host
        self._server_name = server_name
        self._tls = tls
        self._auth = auth
        self._auth_rejected = False
        self._timeouts = timeouts
        self._extensions: frozenset[bytes] = frozenset()
        self._auth_offered: frozenset[bytes] = frozenset()
        self._tls_pending = False
        self._size_limit = 0
        self._stage: _Stage = "connect"
        self._send_log = send_log
        self._plog: IProtocolLogSession | None = None
        self._quit_sent = False
        self._begin(message, data)
        self._stage = "connect"

    def _begin(self, message: OutboundMessage, data: BinaryIO) -> None:
        """The state of one transaction, fresh."""
        self.result: Deferred[TransactionResult] = Deferred()
        self.transactions += 1
        self._message = message
        self._data = data
        self._stage = "mail"
        self._mail_sent = False
        self._error: Outcome | None = None
        self._encoder = DataEncoder(message.crlf_lines)
        self.toAddressesResult: list[tuple[str, int, bytes]] = []
        self.successAddresses: list[str] = []
        self.lastAddress = None

    @property
    def idle(self) -> bool:
        """Free for a message: waiting on an open connection, or resetting for one."""
        return self._idle or (self._resetting and not self._queued)

    def offer(self, message: OutboundMessage, data: BinaryIO) -> Deferred[TransactionResult]:
        """Run a transaction for C{message} on this connection, once free (L{idle})."""
        if not self.idle:
            raise RuntimeError("the connection is not free")
        self._begin(message, data)
        if self._resetting:
            self._queued = True  # MAIL follows the reply to RSET
        else:
            self._next()
        return self.result

    def _next(self) -> None:
        self._idle = False
        self.setTimeout(self._timeouts.reply)
        self.smtpState_from(250, b"")

    # -- results ------------------------------------------------------------

    def _fire(self, outcomes: dict[str, Outcome], failover: bool) -> None:
        if self._stage == "done":
            return
        self._stage = "done"
        self._data.close()
        if self._auth is not None:
            outcomes = {r: evolve(o, reply=self._scrub(o.reply)) for r, o in outcomes.items()}
        self.result.callback(
            TransactionResult(self._host, outcomes, failover, auth_refused=self._auth_rejected)
        )

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

    def _give_up(self, error: Outcome) -> None:
        """End the attempt before the transaction with C{error}: record it, QUIT."""
        if self._error is None:
            self._error = error
        self._disconnectFromServer()

    def _error_outcome(self, exc: object) -> Outcome:
        if isinstance(exc, smtp.SMTPTimeoutError):
            return _o.local_outcome(_o.TIMED_OUT, self._host)
        if isinstance(exc, smtp.EHLORequiredError) and self._auth is not None:
            return _o.local_outcome(_o.AUTH_NOT_OFFERED, self._host)
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

    def _handshake_failed(self, exc: object) -> Outcome:
        self.tls_failed = True
        reason = tls_failure_reason(exc, self._server_name)
        unverified = isinstance(exc, VerificationError) or (
            isinstance(exc, SSL.Error) and "certificate" in reason
        )
        if self._tls == "verify" and unverified:
            _log.warn(
                "TLS certificate of {host} not verified for {server_name}: {reason}",
                host=self._host,
                server_name=self._server_name,
                reason=reason,
            )
            return _o.local_outcome(_o.TLS_VERIFY_FAILED, self._host)
        _log.warn(
            "TLS handshake with {host} failed: {reason}",
            host=self._host,
            server_name=self._server_name,
            reason=reason,
        )
        return _o.local_outcome(_o.TLS_FAILED, self._host)

    # -- twisted.mail hooks ---------------------------------------------------

    def connectionMade(self) -> None:
        self._stage = "greeting"
        # The final "." follows the last data chunk at once: with Nagle's
        # algorithm it would wait for the server's delayed ACK (40 ms).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        if self._send_log is not None:
            self._open_protocol_log(self._send_log)
        super().connectionMade()

    def _open_protocol_log(self, send_log: SendLog) -> None:
        local, peer = self.transport.getHost(), self.transport.getPeer()
        self._plog = plog = send_log.log.session(
            send_log.route, None,
            (str(getattr(local, "host", "")), int(getattr(local, "port", 0))),
            (str(getattr(peer, "host", "")), int(getattr(peer, "port", 0))),
        )
        plog.row("+")
        plog.row("*", self._server_name, "connected")

    def _log_tls(self, plog: IProtocolLogSession) -> None:
        try:
            handle = self.transport.getHandle()
            shown = f"{handle.get_protocol_version_name()} {handle.get_cipher_name()}"
        except Exception:
            shown = "(details unavailable)"
        plog.row("*", shown, "TLS negotiated")

    def sendLine(self, line: bytes) -> None:
        if self._plog is not None:
            self._plog.row(">", self._shown(line))
        write_now(self.transport, line + self.delimiter)

    def _shown(self, line: bytes) -> bytes | str:
        """A line sent, as the protocol log shows it: no secret, no data."""
        if line == b"QUIT":
            self._quit_sent = True
            return line
        if self._stage == "auth":
            if line[:5].upper() == b"AUTH ":
                mechanism, _, response = line[5:].partition(b" ")
                return b"AUTH " + mechanism + (b" ****" if response.strip() else b"")
            return "****"  # a LOGIN response (or a cancel): the user name and password
        if line.endswith(b"\r\n."):
            return "."  # the end of data after a last line without CRLF
        return line

    def lineReceived(self, line: bytes) -> object:
        plog = self._plog
        if plog is not None:
            if self._tls_pending:
                self._log_tls(plog)
            if self._stage == "auth" and self._auth is not None:
                # A server might echo what it was sent (an error about bad base64).
                plog.row("<", self._scrub(line.decode("utf-8", "replace")))
            else:
                plog.row("<", line)
        # TLS hands over no line before its handshake is complete.
        self._tls_pending = False
        return super().lineReceived(line)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._plog is not None:
            self._plog.row("-", "", "Local" if self._quit_sent else "Remote")
            self._plog = None
        super().connectionLost(reason)
        self._idle = self._resetting = False
        if self.on_gone is not None:
            self.on_gone(self)
        self._data.close()
        if self._stage == "done":
            return
        if self._error is not None:
            error = self._error
        elif self._tls_pending:
            error = self._handshake_failed(reason.value)
        elif isinstance(reason.value, SSL.Error):
            error = _o.local_outcome(_o.TLS_FAILED, self._host)
        elif isinstance(reason.value, ConnectionDone):
            error = _o.local_outcome(_o.CONNECTION_LOST, self._host)
        else:
            error = _o.failure_outcome(reason, self._host)
        self._fire_error(error)

    def timeoutConnection(self) -> None:
        if self._idle:
            self.close_idle()
            return
        self._record(_o.TIMED_OUT)
        self.transport.abortConnection()

    def close_idle(self) -> None:
        """QUIT an idle connection (one resetting QUITs after its RSET, see L{on_idle})."""
        if self._idle:
            self._idle = False
            self.setTimeout(self._timeouts.reply)
            self._disconnectFromServer()

    def sendError(self, exc: object) -> None:
        if self._error is None:
            self._error = self._error_outcome(exc)
        super().sendError(exc)

    def esmtpState_ehlo(self, code: int, resp: bytes) -> None:
        self._stage = "ehlo"
        super().esmtpState_ehlo(code, resp)

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        keywords = [line.split(None, 1) for line in resp.splitlines()[1:] if line.strip()]
        self._extensions = frozenset(k[0].upper() for k in keywords)
        offered: set[bytes] = set()
        for k in keywords:
            word = k[0].upper()
            # "AUTH=PLAIN LOGIN" is the pre-RFC 2554 spelling some servers add.
            if word == b"AUTH" or word.startswith(b"AUTH="):
                offered.update(word[5:].split(), *(rest.upper().split() for rest in k[1:]))
        self._auth_offered = frozenset(offered)
        self._size_limit = 0
        for k in keywords:
            if k[0].upper() == b"SIZE" and len(k) > 1 and k[1].strip().isdigit():
                self._size_limit = int(k[1].strip())  # 0: no fixed limit (RFC 1870)
        super().esmtpState_serverConfig(code, resp)

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        self._stage = "tls"
        # Bytes after the 220 arrived in clear: a man in the middle's
        # injection (CVE-2011-0411), never the server's reply.
        self.clearLineBuffer()
        self._tls_pending = True
        super().esmtpState_starttls(code, resp)

    def esmtpTLSFailed(self, code: int = -1, resp: bytes | None = None) -> None:
        self.tls_failed = True
        _log.warn(
            "STARTTLS with {host} failed: {smtp_code}",
            host=self._host,
            server_name=self._server_name,
            smtp_code=code,
        )
        super().esmtpTLSFailed(code, resp)

    def authenticate(self, code: int, resp: bytes, items: object) -> None:
        """Replaces twisted.mail's AUTH: PLAIN before LOGIN, only over TLS."""
        if self._auth is None:
            self.smtpState_from(code, resp)
            return
        self._stage = "auth"
        if not self._tlsMode:
            _log.error(
                "Not sending the route's credentials to {host} without TLS",
                host=self._host,
            )
            self._give_up(_o.local_outcome(_o.AUTH_NEEDS_TLS, self._host))
            return
        self._failresponse = self._auth_refused
        if self._auth.mechanism == "xoauth2":
            self._xoauth2()
        elif b"PLAIN" in self._auth_offered:
            # RFC 4616: empty authorization identity, then user and password.
            self._expected = [235]
            self._okresponse = self._authenticated
            self.sendLine(b"AUTH PLAIN " + self._b64(b"\0%s\0%s" % self._credentials()))
        elif b"LOGIN" in self._auth_offered:
            self._expected = [334]
            self._okresponse = self._login_user
            self.sendLine(b"AUTH LOGIN")
        else:
            _log.error(
                "{host} offers neither AUTH PLAIN nor LOGIN; the route needs AUTH",
                host=self._host,
            )
            self._give_up(_o.local_outcome(_o.AUTH_NOT_OFFERED, self._host))

    def _xoauth2(self) -> None:
        if b"XOAUTH2" not in self._auth_offered:
            _log.error(
                "{host} does not offer AUTH XOAUTH2; the route needs it", host=self._host
            )
            self._give_up(_o.local_outcome(_o.XOAUTH2_NOT_OFFERED, self._host))
            return
        self._expected = [235]
        self._okresponse = self._authenticated
        self._failresponse = self._xoauth2_challenge
        self.sendLine(b"AUTH XOAUTH2 " + self._b64(self._xoauth2_sasl()))

    def _xoauth2_sasl(self) -> bytes:
        # Microsoft's and Google's documented SASL XOAUTH2 initial response.
        user, token = self._credentials()
        return b"user=%s\x01auth=Bearer %s\x01\x01" % (user, token)

    def _xoauth2_challenge(self, code: int, resp: bytes) -> None:
        if code != 334:
            self._auth_refused(code, resp)
            return
        # A 334 here carries the server's error (base64 JSON); the client
        # answers with an empty line and gets the final 5xx.
        self._failresponse = self._auth_refused
        self.sendLine(b"")

    def _credentials(self) -> tuple[bytes, bytes]:
        assert self._auth is not None
        return self._auth.user.encode("utf-8"), self._auth.password.encode("utf-8")

    @staticmethod
    def _b64(data: bytes) -> bytes:
        return base64.b64encode(data)

    def _login_user(self, code: int, resp: bytes) -> None:
        self._okresponse = self._login_password
        self.sendLine(self._b64(self._credentials()[0]))

    def _login_password(self, code: int, resp: bytes) -> None:
        self._expected = [235]
        self._okresponse = self._authenticated
        self.sendLine(self._b64(self._credentials()[1]))

    def _authenticated(self, code: int, resp: bytes) -> None:
        if self._plog is not None and self._auth is not None:
            self._plog.row("*", self._auth.user, "authenticated")
        self.smtpState_from(code, resp)

    def _auth_refused(self, code: int, resp: bytes) -> None:
        seen = _o.reply_outcome(code, resp, self._host)
        reply = self._scrub(seen.reply)
        if 500 <= code < 600:
            # A 5xx here is the route's configuration, not the message's:
            # retried so that a bad password bounces nothing.
            self._auth_rejected = True
            _log.error(
                "{host} refused the route's credentials: {reply}",
                host=self._host,
                smtp_code=code,
                reply=reply,
            )
            self._give_up(Outcome("retry", f"{_o.AUTH_REFUSED} ({reply})", self._host))
            return
        _log.warn("{host} deferred AUTH: {reply}", host=self._host, smtp_code=code, reply=reply)
        self._give_up(Outcome("retry", reply, self._host))

    def _scrub(self, text: str) -> str:
        """C{text} without the password, plain or in its base64 wire forms."""
        if self._auth is None or not self._auth.password:
            return text
        user, password = self._credentials()
        for secret in (
            password,
            self._b64(password),
            self._b64(b"\0%s\0%s" % (user, password)),
            self._b64(self._xoauth2_sasl()),
        ):
            text = text.replace(secret.decode("utf-8", "replace"), "***")
        return text

    def smtpState_helo(self, code: int, resp: bytes) -> None:
        super().smtpState_helo(code, resp)
        # twisted.mail would answer a refused HELO with HELO again, forever.
        self._failresponse = self._refused_before_mail

    def _refused_before_mail(self, code: int, resp: bytes) -> None:
        seen = _o.reply_outcome(code, resp, self._host)
        self._give_up(Outcome("retry", seen.reply, self._host))

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
        eight_bit = self._message.eight_bit
        if eight_bit and b"8BITMIME" not in self._extensions and not _is_ascii(self._data):
            # RFC 6152 section 3: no 8-bit data to a server without 8BITMIME;
            # relaygw bounces rather than rewriting MIME parts it relays.
            self._refuse(_o.EIGHTBIT_NOT_OFFERED)
            return
        size = self._message.size
        if self._size_limit and size > self._size_limit:
            self._refuse(_o.TOO_BIG_FOR_HOST)
            return
        line = b"MAIL FROM:<" + self._message.sender.encode("utf-8") + b">"
        if size and b"SIZE" in self._extensions:
            line += b" SIZE=%d" % size
        if eight_bit and b"8BITMIME" in self._extensions:
            line += b" BODY=8BITMIME"
        if self._message.smtputf8:
            line += b" SMTPUTF8"
        self._from = self._message.sender
        self._failresponse = self.smtpTransferFailed
        if b"PIPELINING" in self._extensions:
            self._pipeline(line)
            return
        self._expected = [250]
        self._okresponse = self.smtpState_to
        self.sendLine(line)

    def _refuse(self, reason: Reply) -> None:
        """Bounce every recipient before MAIL: this host can never take the message."""
        bounce = _o.local_outcome(reason, self._host)
        self._fire({r: bounce for r in self._message.recipients}, failover=False)
        self._disconnectFromServer()

    # -- PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write -------

    def _pipeline(self, mail: bytes) -> None:
        recipients = self._message.recipients
        self._awaiting: list[str | None] = [None, *recipients, None]  # MAIL, RCPTs, DATA
        self._mail_reply = (0, b"")
        self._expected = _ANY_REPLY
        self._okresponse = self._pipelined_reply
        self.sendLine(mail)
        for rcpt in recipients:
            self.sendLine(b"RCPT TO:<" + rcpt.encode("utf-8") + b">")
        self.sendLine(b"DATA")

    def _pipelined_reply(self, code: int, resp: bytes) -> None:
        awaiting = self._awaiting.pop(0)
        if not self._mail_reply[0]:
            self._mail_reply = (code, resp)
            if code in smtp.SUCCESS:
                self._stage = "rcpt"
        elif self._awaiting:
            assert awaiting is not None
            self.toAddressesResult.append((awaiting, code, resp))
            if code in smtp.SUCCESS:
                self.successAddresses.append(awaiting)
        else:
            self._pipelined_data(code, resp)

    def _pipelined_data(self, code: int, resp: bytes) -> None:
        mail_code, mail_resp = self._mail_reply
        if code == 354 and mail_code in smtp.SUCCESS and self.successAddresses:
            self._stage = "data"
            self._expected = smtp.SUCCESS
            self._failresponse = self.smtpTransferFailed
            self.smtpState_data(code, resp)
            return
        if mail_code not in smtp.SUCCESS:
            # The RCPT and DATA replies only echo the refused MAIL.
            finish = functools.partial(self.smtpState_msgSent, mail_code, mail_resp)
        elif self.successAddresses:
            self._stage = "data"  # DATA refused: its reply is the accepted recipients'
            finish = functools.partial(self.smtpState_msgSent, code, resp)
        else:
            finish = functools.partial(self.smtpState_msgSent, -1, b"")  # RCPT replies decide
        if code != 354:
            finish()
            return
        # A server in DATA mode without a valid recipient: an empty message ends it.
        self.sendLine(b".")
        self._okresponse = self._failresponse = lambda code, resp: finish()

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
        done = self._from is not None
        self._from = None
        if self.on_idle is None:
            if done:
                self._transaction_done(code, resp)
            self._disconnectFromServer()
            return
        # RSET before the next message (RFC 5321 4.1.1.5): the server's state
        # is clean whatever this transaction left.
        self.sendLine(b"RSET")
        self._expected = [250]
        self._okresponse = self._reset_done
        self._failresponse = self._reset_failed
        # Listed before the result fires: the next message, often handed
        # over by the result's own callbacks, saves a wait and a connection.
        self._resetting = True
        self.on_idle(self)
        if done:
            self._transaction_done(code, resp)

    def _reset_done(self, code: int, resp: bytes) -> None:
        self._resetting = False
        if self._queued:
            self._queued = False
            self._next()
            return
        if self.on_idle is None:  # the cache let go of it meanwhile
            self._disconnectFromServer()
            return
        self._idle = True
        self.setTimeout(self._timeouts.idle)

    def _reset_failed(self, code: int, resp: bytes) -> None:
        self._resetting = False
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
        """CRLF line ends and dot-stuffing that no receiver misreads (L{DataEncoder})."""
        self.resetTimeout()
        return self._encoder.feed(chunk)

    def finishedFileTransfer(self, lastsent: bytes) -> None:
        if self._plog is not None:
            self._plog.row("*", f"{self._message.size} octets", "message data sent")
        ending = self._encoder.close()
        self.sendLine(ending + b".")
        self.setTimeout(self._timeouts.data_done)


def _name_of(host: str) -> str:
    """The host part of C{host:port} or C{[v6]:port}."""
    return host.rsplit(":", 1)[0].strip("[]")


def make_client(
    message: OutboundMessage,
    data: BinaryIO,
    *,
    host: str,
    helo: str,
    tls: ClientTLS,
    clock: IReactorTime,
    timeouts: ClientTimeouts = ClientTimeouts(),
    tls_options: TLSOptionsFactory | None = None,
    server_name: str | None = None,
    auth: ClientAuth | None = None,
    send_log: SendLog | None = None,
) -> tuple[Protocol, Deferred[TransactionResult]]:
    """
    A client protocol for one transaction, not yet connected.

    @param message: what to send.
    @param data: the open message data; the protocol closes it when its
        connection ends.
    @param host: the peer as C{host:port}, for outcomes.
    @param helo: the name sent with EHLO / HELO.
    @param tls: the outbound TLS mode (see L{check_tls_mode}).
    @param clock: drives the reply timeouts.
    @param tls_options: server name -> TLS options; C{None} picks by mode
        (L{unverified_tls_options}, or for C{"verify"} the system store).
    @param server_name: the name for SNI and certificate verification;
        C{None} for the host part of C{host}.
    @param auth: credentials to send (over TLS only), or C{None}.
    @param send_log: where to write the protocol log, or C{None}.
    @return: the protocol and a Deferred firing with the L{TransactionResult}
        (never failing).
    """
    client = new_client(
        message, data, host, helo, tls, clock, timeouts, tls_options, server_name, auth,
        send_log,
    )
    proto: Protocol = client
    return proto, client.result


def new_client(
    message: OutboundMessage,
    data: BinaryIO,
    host: str,
    helo: str,
    tls: ClientTLS,
    clock: IReactorTime,
    timeouts: ClientTimeouts,
    tls_options: TLSOptionsFactory | None,
    server_name: str | None,
    auth: ClientAuth | None,
    send_log: SendLog | None = None,
) -> RelayClient:
    if tls_options is None:
        tls_options = SYSTEM_TRUST if tls == "verify" else unverified_tls_options
    return RelayClient(
        message,
        data,
        host=host,
        server_name=server_name or _name_of(host),
        helo=helo,
        tls=tls,
        tls_options=tls_options,
        auth=auth,
        clock=clock,
        timeouts=timeouts,
        send_log=send_log,
    )
