"""
The ESMTP receive session: relaygw's own state machine (DESIGN habit 14).

Input is split into command lines here (CRLF, bare LF tolerated), and each
line is dispatched to a C{do_<VERB>} method that returns the L{Reply}.  DATA
and BDAT switch to raw mode: chunks go to L{relaygw.accept.intake} as they
arrive.  Replies produced while handling one received chunk are written
together (PIPELINING).

Bad-command rule: every 4xx or 5xx reply to a command (the reply to a BDAT
chunk and to the end of DATA included) counts as an error, every other reply
resets the count; the reply that would be the tenth error in a row is
replaced by 421 4.7.0 and the connection closes.  Replies that close the
connection anyway (421s, 500 5.5.2 for a long line) are sent as they are.

Other decisions: STARTTLS needs a greeting first and resets HELO, envelope and
user; a refused BDAT chunk is still read (its size is known) and ends the
transaction (RFC 3030 section 4.2); BDAT data is checked for bare CR/LF
unless MAIL said C{BODY=BINARYMIME}; the message rate token is taken before
the MAIL policy check; MAIL's C{AUTH=} parameter is ignored (RFC 4954
section 5), other unknown parameters get 555.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Callable, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    ISystemHandle,
    IOpenSSLServerConnectionCreator,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from relaygw import replies
from relaygw.accept.intake import DataDecoder, MessageIntake, Transaction
from relaygw.auth import sasl
from relaygw.auth.user import AuthenticatedUser
from relaygw.config._model import Config, Connector
from relaygw.interfaces import IConnectorSelector
from relaygw.replies import Reply
from relaygw.session._auth import AuthCommands
from relaygw.session._data import DataCommands
from relaygw.session._envelope import EnvelopeCommands
from relaygw.session._state import seconds as _seconds
from relaygw.session.headers import banner_date
from relaygw.session.limits import ConnectionCounter
from relaygw.session.policy import Policy
from relaygw.session.rights import session_rights
from relaygw.spool.envelope import TLSInfo

if TYPE_CHECKING:
    from relaygw.connectors.selector import Selection
    from relaygw.session.factory import SessionFactory

__all__ = ["MAX_BAD_COMMANDS", "MAX_LINE", "Session"]

#: Longest command line in octets, CRLF excluded (SPEC section 3).
MAX_LINE = 2000
#: The bad command that closes the connection.
MAX_BAD_COMMANDS = 10
#: Input held while a command waits (AUTH check, recipient lookup) before
#: the transport is paused.
_MAX_PENDING = 256 * 1024


def plain_ip(host: str) -> str:
    """An address as shown to people: IPv4-mapped IPv6 as IPv4; other text unchanged."""
    if ":" not in host:  # IPv4 as transports give it is already canonical
        return host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@implementer(IHandshakeListener)
class Session(AuthCommands, EnvelopeCommands, DataCommands, Protocol, TimeoutMixin):
    """
    One ESMTP session on the connector chosen for it at connect time.

    This class has the connection, the input and output and the session
    commands; the mixins have AUTH (L{relaygw.session._auth}), MAIL and RCPT
    (L{relaygw.session._envelope}) and the message data
    (L{relaygw.session._data}).

    @ivar connector: the connector, once chosen.
    @ivar user: the authenticated user, C{None} before (or without) AUTH.
    @ivar helo: the HELO/EHLO argument, C{None} until greeted.
    @ivar tls: the negotiated TLS, once the handshake completed.
    @ivar session_id: the id used in logs.
    """

    _log = Logger()

    def __init__(
        self, factory: SessionFactory, config: Config, selector: IConnectorSelector
    ) -> None:
        self._factory = factory
        self._config = config
        self._selector = selector
        self._reactor = factory.reactor
        self.session_id = factory.session_id()
        self.connector: Connector | None = None
        self._policy: Policy | None = None
        self.user: AuthenticatedUser | None = None
        self.helo: str | None = None
        self.tls: TLSInfo | None = None
        self._esmtp = False
        self._tls_active = False
        self._txn: Transaction | None = None
        self._intake: MessageIntake | None = None
        self._decoder: DataDecoder | None = None
        self._mode = "command"
        self._buf = b""
        self._out: list[bytes] = []
        self._errors = 0
        self._closing = False
        self._lost = False
        self._discard_rest = False
        self._bdat_left = 0
        self._bdat_size = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None
        self._counter: ConnectionCounter | None = None
        self._client_ip = ""
        self._client_port = 0
        self._verbose = False
        self._sasl: sasl.Exchange | None = None
        self._waiting = False
        self._pending = b""
        self._paused = False
        self._dispatching = False
        self._messages = 0
        self._connected_at = 0.0
        self._local = ""

    # -- Twisted plumbing ---------------------------------------------------

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """TimeoutMixin's timer, on the injected reactor (DESIGN habit 1)."""
        return self._reactor.callLater(period, func)

    def _set_timeout(self, seconds: float | None) -> None:
        self.setTimeout(seconds)  # type: ignore[no-untyped-call]

    @property
    def _c(self) -> Connector:
        assert self.connector is not None
        return self.connector

    def _fields(self) -> dict[str, Any]:
        return {
            "connector": self.connector.name if self.connector else None,
            "session_id": self.session_id,
            "peer": f"{self._client_ip}:{self._client_port}",
        }

    def connectionMade(self) -> None:
        assert self.transport is not None
        host, peer = self.transport.getHost(), self.transport.getPeer()
        local_host, local_port = getattr(host, "host", ""), getattr(host, "port", 0)
        self._client_ip = plain_ip(getattr(peer, "host", ""))
        self._client_port = getattr(peer, "port", 0)
        try:
            selection = cast(
                "Selection | None",
                self._selector.select(local_host, local_port, getattr(peer, "host", "")),
            )
        except ValueError:  # not an IP transport
            selection = None
        if selection is None:
            self._log.warn(
                "connection from {peer} to {local} refused: no connector",
                event="receive.refused", reason="no-connector",
                local=f"{local_host}:{local_port}", **self._fields(),
            )
            self._mode = "closed"
            self.transport.loseConnection()
            return
        connector = self.connector = selection.connector
        self._policy = Policy(connector, self._config.accepted_domains)
        self._verbose = connector.protocol_logging == "verbose"
        if connector.tls == "implicit":
            options = self._factory.tls_options(connector)
            if options is None:
                self._log.error(
                    "connection from {peer} closed: connector {connector} has no usable "
                    "certificate for implicit TLS",
                    event="receive.refused", reason="no-certificate", **self._fields(),
                )
                self._mode = "closed"
                self.transport.loseConnection()
                return
            cast(ITLSTransport, self.transport).startTLS(
                cast(IOpenSSLServerConnectionCreator, options)
            )
            self._tls_active = True
        counter = self._factory.connection_counter(connector)
        if not counter.acquire(self._client_ip):
            self._log.warn(
                "connection from {peer} refused: connection limit of {connector}",
                event="receive.refused", reason="connection-limit",
                smtp_code=replies.CONNECTION_LIMIT.code, **self._fields(),
            )
            self._send(replies.CONNECTION_LIMIT)
            self._close()
            self._flush()
            return
        self._counter = counter
        self._connected_at = self._reactor.seconds()
        self._local = f"{local_host}:{local_port}"
        if self._verbose:
            # Otherwise the disconnect event summarises the session.
            self._log.info(
                "connection from {peer} accepted by connector {connector}",
                event="receive.connect", local=self._local, **self._fields(),
            )
        self._set_timeout(_seconds(connector.timeouts.command.total_seconds()))
        self._send(replies.greeting(self._banner(connector)))
        self._flush()

    def _banner(self, connector: Connector) -> str:
        try:
            return connector.banner.format(
                fqdn=connector.fqdn,
                connector=connector.name,
                date=banner_date(self._reactor.seconds()),
            )
        except (KeyError, IndexError, ValueError):
            return connector.banner

    def handshakeCompleted(self) -> None:
        """Record the negotiated TLS version and cipher (pyOpenSSL connection)."""
        try:
            handle = cast(ISystemHandle, self.transport).getHandle()
            self.tls = TLSInfo(
                str(handle.get_protocol_version_name()),  # type: ignore[attr-defined]
                str(handle.get_cipher_name()),  # type: ignore[attr-defined]
            )
        except Exception:
            self._log.failure("TLS details unavailable", **self._fields())
            return
        self._log.info(
            "TLS {tls_version} {tls_cipher} negotiated with {peer}",
            event="receive.tls", tls_version=self.tls.version, tls_cipher=self.tls.cipher,
            **self._fields(),
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        self._sasl, self._pending = None, b""
        self._set_timeout(None)
        self._abort_message()
        if self._counter is not None:
            self._counter.release(self._client_ip)
            self._counter = None
            self._log.info(
                "connection from {peer} closed after {messages} message(s), {duration:.3f} s",
                event="receive.disconnect", local=self._local, messages=self._messages,
                duration=self._reactor.seconds() - self._connected_at, **self._fields(),
            )
        self._mode = "closed"

    def timeoutConnection(self) -> None:
        if self._closing or self.connector is None:
            return
        self._log.info("session with {peer} timed out in {mode} mode",
                       event="receive.timeout", mode=self._mode, **self._fields())
        self._send(replies.timeout(self._c.fqdn))
        self._close()
        self._flush()

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._mode == "closed":
            return
        self.resetTimeout()  # type: ignore[no-untyped-call]
        if self._waiting:
            # PIPELINING order: later input waits for the pending answer.
            self._pending += data
            if len(self._pending) > _MAX_PENDING and not self._paused and self.transport:
                self._paused = True
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            return
        self._process(data)

    def _process(self, data: bytes) -> None:
        self._dispatching = True
        try:
            while data and not self._closing and not self._waiting:
                if self._mode == "data":
                    data = self._data_received(data)
                elif self._mode == "bdat":
                    data = self._bdat_received(data)
                else:
                    data = self._lines_received(data)
        except Exception:
            self._log.failure("unexpected error in session with {peer}", **self._fields())
            self._send(replies.INTERNAL_ERROR)
            self._close()
        finally:
            self._dispatching = False
            if data and self._waiting:
                # Input after the end of a message whose commit is pending.
                self._pending = data + self._pending
            self._flush()

    def _await(self, answer: Deferred[Reply]) -> None:
        """
        Answer when C{answer} fires; input that arrives meanwhile waits.  The
        idle timeout stops meanwhile: it measures the client's silence, and
        the client is waiting for us (a throttled AUTH, a commit).
        """
        self._waiting = True
        idle = self.timeOut
        self._set_timeout(None)

        def done(reply: Reply) -> None:
            self._waiting = False
            if self._closing or self._mode == "closed":
                return
            if self.timeOut is None:  # unless the answer set a new one (end of DATA)
                self._set_timeout(idle)
            self._answer(reply)
            if not self._dispatching:
                self._drain()

        def failed(failure: Failure) -> None:
            self._log.failure("unexpected error answering {peer}", failure, **self._fields())
            done(replies.INTERNAL_ERROR)

        answer.addCallbacks(done, failed)

    def _drain(self) -> None:
        """Go on with the input held while waiting."""
        data, self._pending = self._pending, b""
        if self._paused and not self._lost and self.transport:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        self._process(data)

    def _lines_received(self, data: bytes) -> bytes:
        """Handle complete command lines; return what follows a switch to raw mode."""
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                rest = buf[pos:]
                if len(rest) > MAX_LINE + 1 or (len(rest) == MAX_LINE + 1 and rest[-1:] != b"\r"):
                    self._line_too_long()
                else:
                    self._buf = rest
                return b""
            end = nl - 1 if nl > pos and buf[nl - 1] == 0x0D else nl
            if end - pos > MAX_LINE:
                self._line_too_long()
                return b""
            line = buf[pos:end]
            pos = nl + 1
            if self._sasl is not None:
                self._auth_line(line)
            else:
                self._command(line)
            if self._waiting:
                self._pending = buf[pos:]
                return b""
            if self._discard_rest:
                self._discard_rest = False
                return b""
            if self._closing:
                return b""
            if self._mode != "command":
                return buf[pos:]

    def _line_too_long(self) -> None:
        self._log.warn("command line over {limit} octets from {peer}", limit=MAX_LINE,
                       event="receive.protocol-error", **self._fields())
        self._send(replies.LINE_TOO_LONG)
        self._close()

    def _command(self, line: bytes) -> None:
        text = line.decode("utf-8", "surrogateescape")
        verb, _, args = text.partition(" ")
        verb = verb.upper()
        handler = None
        if verb.isascii() and verb.isalpha():
            handler = getattr(self, "do_" + verb, None)
        if self._verbose:
            # Never log AUTH payloads, nor unknown lines: a confused client's
            # next line may be its base64 password.
            if handler is None:
                shown = "(unrecognized command)"
            elif verb == "AUTH":
                shown = f"AUTH {args.split(' ', 1)[0]} ****"
            else:
                shown = text
            self._log.debug("< {data}", event="receive.command", data=shown, **self._fields())
        if handler is None:
            self._answer(replies.UNRECOGNIZED)
            return
        try:
            reply = handler(args.strip())
        except Exception:
            self._log.failure("unexpected error handling {verb} from {peer}", verb=verb,
                              **self._fields())
            reply = replies.INTERNAL_ERROR
        if isinstance(reply, Deferred):
            self._await(reply)
        elif reply is not None:
            self._answer(reply)

    # -- output -------------------------------------------------------------

    def _answer(self, reply: Reply, close: bool = False) -> None:
        """Send the reply to a command, applying the bad-command rule."""
        if reply.code >= 400 and not close:
            self._errors += 1
            if self._errors >= MAX_BAD_COMMANDS:
                self._log.warn("too many bad commands from {peer}",
                               event="receive.protocol-error", **self._fields())
                reply, close = replies.TOO_MANY_ERRORS, True
        elif reply.code < 400:
            self._errors = 0
        self._send(reply)
        if close:
            self._close()

    def _send(self, reply: Reply) -> None:
        self._out.append(bytes(reply))
        if self._verbose:
            self._log.debug("> {data}", event="receive.reply", data=str(reply),
                            smtp_code=reply.code, enhanced_code=reply.enhanced,
                            **self._fields())

    def _close(self) -> None:
        self._closing = True
        self._abort_message()
        self._set_timeout(None)

    def _flush(self) -> None:
        if self._out and not self._lost and self.transport is not None:
            self.transport.write(b"".join(self._out))
        self._out.clear()
        if self._closing and self._mode != "closed" and not self._lost and self.transport:
            self._mode = "closed"
            self.transport.loseConnection()

    # -- session state ------------------------------------------------------

    def _rights(self) -> frozenset[str]:
        return session_rights(self._c, self.user)

    def _abort_message(self) -> None:
        if self._intake is not None:
            self._intake.abort()
            self._intake = None
        self._decoder = None

    def _reset_transaction(self) -> None:
        self._abort_message()
        self._txn = None

    def _set_command_mode(self) -> None:
        self._mode = "command"
        self._set_timeout(_seconds(self._c.timeouts.command.total_seconds()))

    def _set_raw_mode(self, mode: str) -> None:
        self._mode = mode
        self._set_timeout(_seconds(self._c.timeouts.data.total_seconds()))

    def _auth_offered(self) -> bool:
        c = self._c
        return (
            self._factory.portal is not None
            and self.user is None
            and bool(c.auth_mechanisms)
            and (self._tls_active or c.allow_plaintext_auth)
        )

    # -- commands -----------------------------------------------------------

    def do_HELO(self, args: str) -> Reply:
        if not args:
            return replies.SYNTAX_ERROR
        self._reset_transaction()
        self.helo, self._esmtp = args, False
        return replies.helo(self._c.fqdn, self._client_ip)

    def do_EHLO(self, args: str) -> Reply:
        if not args:
            return replies.SYNTAX_ERROR
        self._reset_transaction()
        self.helo, self._esmtp = args, True
        c = self._c
        keywords = [f"SIZE {c.max_message_size}", "PIPELINING", "8BITMIME",
                    "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if (c.tls == "starttls" and not self._tls_active
                and self._factory.tls_options(c) is not None):
            keywords.append("STARTTLS")
        if self._auth_offered():
            keywords.append("AUTH " + " ".join(c.auth_mechanisms))
        keywords.append("CHUNKING")
        return replies.ehlo(c.fqdn, self._client_ip, keywords)

    def do_STARTTLS(self, args: str) -> Reply | None:
        c = self._c
        if self._tls_active:
            return replies.TLS_ALREADY
        if c.tls != "starttls":
            return replies.UNRECOGNIZED
        if args:
            return replies.SYNTAX_ERROR
        if self.helo is None:
            return replies.NEED_HELO
        options = self._factory.tls_options(c)
        if options is None:
            return replies.TLS_UNAVAILABLE
        self._answer(replies.TLS_READY)
        self._flush()
        # Plaintext pipelined after STARTTLS is discarded (command injection).
        self._discard_rest = True
        cast(ITLSTransport, self.transport).startTLS(
                cast(IOpenSSLServerConnectionCreator, options)
            )
        self._tls_active = True
        self._reset_transaction()
        self.helo, self._esmtp, self.user, self._sasl = None, False, None, None
        return None

    def do_RSET(self, args: str) -> Reply:
        self._reset_transaction()
        return replies.RESET_OK

    def do_NOOP(self, args: str) -> Reply:
        return replies.OK

    def do_QUIT(self, args: str) -> None:
        self._answer(replies.bye(self._c.fqdn), close=True)

    def do_VRFY(self, args: str) -> Reply:
        return replies.VRFY_REFUSED

    def do_HELP(self, args: str) -> Reply:
        return replies.HELP
