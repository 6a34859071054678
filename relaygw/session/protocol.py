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

Timeouts bound a stalling client, not only a silent one: the command
timeout restarts only when a whole command line arrives, the data timeout
with every 1 KiB of message data, so a client trickling a byte a second
(slowloris) is cut with 421 4.4.2 like a silent one.  A TLS handshake runs
under the command timeout and is aborted without a reply when it expires.

Other decisions: STARTTLS needs a greeting first and resets HELO, envelope and
user; a refused BDAT chunk is still read (its size is known) and ends the
transaction (RFC 3030 section 4.2); BDAT data is checked for bare CR/LF
unless MAIL said C{BODY=BINARYMIME}; the message rate token is taken before
the MAIL policy check; MAIL's C{AUTH=} parameter is ignored (RFC 4954
section 5), other unknown parameters get 555.
"""

from __future__ import annotations

from typing import Callable, cast

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
from relaygw.events import MESSAGES
from relaygw.auth.user import AuthenticatedUser
from relaygw.config._model import Config, Connector
from relaygw.interfaces import IConnectorSelector, IProtocolLogSession
from relaygw.polling import write_now
from relaygw.replies import Reply
from relaygw.session._auth import AuthCommands
from relaygw.session._commands import SessionCommands
from relaygw.session._connect import Admission, admit, banner, chosen_because
from relaygw.session._data import DataCommands
from relaygw.session._envelope import EnvelopeCommands
from relaygw.session.limits import ConnectionCounter
from relaygw.session.state import SessionServices, SessionState, seconds
from relaygw.spool.envelope import TLSInfo

__all__ = ["MAX_BAD_COMMANDS", "MAX_LINE", "Session"]

#: Longest command line in octets, CRLF excluded (SPEC section 3).
MAX_LINE = 2000
#: The bad command that closes the connection.
MAX_BAD_COMMANDS = 10
#: Input held while a command waits (AUTH check, recipient lookup) before
#: the transport is paused.
_MAX_PENDING = 256 * 1024
#: Message octets that restart the data timeout: a client trickling less
#: than this per timeout (slowloris) is cut; any real client sends more.
_DATA_PROGRESS = 1024

Handler = Callable[[str], "Reply | Deferred[Reply] | None"]


#: The C{do_<VERB>} methods of each handler class, found once (C{dir} is
#: too slow to run per session).
_VERBS: dict[type, tuple[str, ...]] = {
    cls: tuple(name for name in dir(cls) if name.startswith("do_"))
    for cls in (SessionCommands, AuthCommands, EnvelopeCommands, DataCommands)
}


@implementer(IHandshakeListener)
class Session(Protocol, TimeoutMixin):
    """
    One ESMTP session on the connector chosen for it at connect time.

    This class has the connection, the input and output (it is the
    handlers' L{relaygw.session.state.Conversation}); the command handlers
    (L{relaygw.session._commands}, L{relaygw.session._auth},
    L{relaygw.session._envelope}, L{relaygw.session._data}) work on the
    session's L{SessionState}.

    @ivar state: the session's state (its connector, user, HELO, TLS...).
    @ivar verbs: the handler of each command verb.
    """

    _log = Logger(namespace="relaygw.session")
    _messages = Logger(namespace="relaygw.session", observer=MESSAGES)

    def __init__(
        self, services: SessionServices, config: Config, selector: IConnectorSelector
    ) -> None:
        self._services = services
        self._selector = selector
        self._reactor = services.reactor
        self.state = state = SessionState(services, config, services.session_id())
        self._auth = AuthCommands(state, self)
        self._data = DataCommands(state, self)
        self.verbs: dict[str, Handler] = {}
        for handler in (SessionCommands(state, self), self._auth,
                        EnvelopeCommands(state, self), self._data):
            for name in _VERBS[type(handler)]:
                self.verbs[name[3:]] = getattr(handler, name)
        self._mode = "command"
        self._buf = b""
        self._out: list[bytes] = []
        self._errors = 0
        self._closing = False
        self._lost = False
        self._discard_rest = False
        self._raw_octets = 0
        self._counter: ConnectionCounter | None = None
        self._waiting = False
        self._pending = b""
        self._paused = False
        self._dispatching = False
        self._connected_at = 0.0
        self._local = ""
        #: A TLS handshake (implicit or after STARTTLS) has begun, not ended.
        self._handshaking = False
        #: The protocol log handle, only for a verbose connector: without
        #: one, logging costs each line a single test.
        self._plog: IProtocolLogSession | None = None

    @property
    def session_id(self) -> str:
        return self.state.session_id

    @property
    def connector(self) -> Connector | None:
        return self.state.connector

    @property
    def finished(self) -> bool:
        """Whether the connection has ended (a graceful stop waits for that)."""
        return self._lost

    @property
    def tls(self) -> TLSInfo | None:
        return self.state.tls

    @property
    def user(self) -> AuthenticatedUser | None:
        """The authenticated user, C{None} before (or without) AUTH."""
        return self.state.user

    @user.setter
    def user(self, user: AuthenticatedUser | None) -> None:
        self.state.user = user

    # -- Twisted plumbing ---------------------------------------------------

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """TimeoutMixin's timer, on the injected reactor (DESIGN habit 1)."""
        return self._reactor.callLater(period, func)

    def _set_timeout(self, seconds: float | None) -> None:
        self.setTimeout(seconds)  # type: ignore[no-untyped-call]

    def connectionMade(self) -> None:
        assert self.transport is not None
        admission = admit(self.state, self._services, self._selector, self.transport)
        if self.state.verbose:
            self._open_protocol_log(admission)
        if admission.counter is None:
            if admission.refusal is not None:
                self._send(admission.refusal)
            self._close()
            self._flush()
            return
        self._counter, self._local = admission.counter, admission.local
        self._handshaking = self.state.tls_active  # implicit TLS
        self._connected_at = now = self._reactor.seconds()
        connector = self.state.c
        self._set_timeout(seconds(connector.timeouts.command.total_seconds()))
        self._send(replies.greeting(banner(connector, now)))
        self._flush()

    def _open_protocol_log(self, admission: Admission) -> None:
        log = self._services.protocol_log
        if log is None or self.transport is None:
            return
        host = self.transport.getHost()
        state = self.state
        self._plog = state.plog = plog = log.session(
            state.c.name, state.session_id,
            (str(getattr(host, "host", "")), int(getattr(host, "port", 0))),
            (state.client_ip, state.client_port),
        )
        plog.row("+")
        plog.row("*", state.c.name, chosen_because(admission))

    def handshakeCompleted(self) -> None:
        """Record the negotiated TLS version and cipher (pyOpenSSL connection)."""
        self._handshaking = False
        try:
            handle = cast(ISystemHandle, self.transport).getHandle()
            self.state.tls = TLSInfo(
                str(handle.get_protocol_version_name()),  # type: ignore[attr-defined]
                str(handle.get_cipher_name()),  # type: ignore[attr-defined]
            )
        except Exception:
            self._log.failure("TLS details unavailable", **self.state.fields())
            return
        if self._plog is not None:
            self._plog.row("*", f"{self.state.tls.version} {self.state.tls.cipher}",
                           "TLS negotiated")
        self._log.info(
            "TLS {tls_version} {tls_cipher} negotiated with {peer}",
            event="receive.tls", tls_version=self.state.tls.version, tls_cipher=self.state.tls.cipher,
            **self.state.fields(),
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        self.state.sasl, self._pending = None, b""
        if self._plog is not None:
            self._plog.row("-", "", "Local" if self._closing else "Remote")
            self._plog = self.state.plog = None
        self._set_timeout(None)
        self.state.abort_message()
        if self._counter is not None:
            self._counter.release(self.state.client_ip)
            self._counter = None
            self._messages.info(
                "connection from {peer} closed after {messages} message(s), {duration:.3f} s",
                event="receive.disconnect", local=self._local, messages=self.state.messages,
                duration=self._reactor.seconds() - self._connected_at, **self.state.fields(),
            )
        self._mode = "closed"

    def timeoutConnection(self) -> None:
        if self._closing or self.state.connector is None:
            return
        if self._handshaking:
            # Handshake bytes never reach dataReceived, so a ClientHello
            # trickled or never sent meets the command timeout.  No reply can
            # be written, and Twisted's TLS close would wait, with the reply
            # (or an implicit-TLS greeting) buffered, for a handshake that
            # never ends: abort.
            self._log.info("TLS handshake with {peer} timed out",
                           event="receive.timeout", mode="tls-handshake", **self.state.fields())
            self._close()
            self._mode = "closed"
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self._log.info("session with {peer} timed out in {mode} mode",
                       event="receive.timeout", mode=self._mode, **self.state.fields())
        self._send(replies.timeout(self.state.c.fqdn))
        self._close()
        self._flush()

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._mode == "closed":
            return
        # No timer restart per chunk (slowloris): a whole command line, or
        # each _DATA_PROGRESS octets of a message, restarts it.
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
                if self._mode != "command":
                    self._raw_octets += len(data)
                    if self._raw_octets >= _DATA_PROGRESS:
                        self._raw_octets = 0
                        self.resetTimeout()  # type: ignore[no-untyped-call]
                if self._mode == "data":
                    data = self._data.data_received(data)
                elif self._mode == "bdat":
                    data = self._data.bdat_received(data)
                else:
                    data = self._lines_received(data)
        except Exception:
            self._log.failure("unexpected error in session with {peer}", **self.state.fields())
            self._send(replies.INTERNAL_ERROR)
            self._close()
        finally:
            self._dispatching = False
            if data and self._waiting:
                # Input after the end of a message whose commit is pending.
                self._pending = data + self._pending
            self._flush()

    def wait_for(self, answer: Deferred[Reply]) -> None:
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
            self.answer(reply)
            if not self._dispatching:
                self._drain()

        def failed(failure: Failure) -> None:
            self._log.failure("unexpected error answering {peer}", failure, **self.state.fields())
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
        whole = False
        while True:
            nl = buf.find(b"\n", pos)
            if nl >= 0 and not whole:
                # A whole line (once per chunk): the client is not stalling.
                whole = True
                self.resetTimeout()  # type: ignore[no-untyped-call]
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
            if self.state.sasl is not None:
                self._auth.line(line)
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
                       event="receive.protocol-error", **self.state.fields())
        self._send(replies.LINE_TOO_LONG)
        self._close()

    def _command(self, line: bytes) -> None:
        text = line.decode("utf-8", "surrogateescape")
        verb, _, args = text.partition(" ")
        verb = verb.upper()
        handler = self.verbs.get(verb)
        if self.state.verbose:
            # Never log AUTH payloads, nor unknown lines: a confused client's
            # next line may be its base64 password.
            if handler is None:
                shown = "(unrecognized command)"
            elif verb == "AUTH":
                # The mechanism stays; an initial response is masked.
                mechanism, _, response = args.strip().partition(" ")
                shown = f"AUTH {mechanism} ****" if response.strip() else f"AUTH {mechanism}"
            else:
                shown = text
            if self._plog is not None:
                self._plog.row("<", line if shown is text else shown)
            else:  # no protocol log (tests, embedding): the gateway's own log has them
                self._log.debug("< {data}", event="receive.command", data=shown,
                                **self.state.fields())
        if handler is None:
            self.answer(replies.UNRECOGNIZED)
            return
        try:
            reply = handler(args.strip())
        except Exception:
            self._log.failure("unexpected error handling {verb} from {peer}", verb=verb,
                              **self.state.fields())
            reply = replies.INTERNAL_ERROR
        if isinstance(reply, Deferred):
            self.wait_for(reply)
        elif reply is not None:
            self.answer(reply)

    # -- output -------------------------------------------------------------

    def answer(self, reply: Reply, close: bool = False) -> None:
        """Send the reply to a command, applying the bad-command rule."""
        if reply.code >= 400 and not close:
            self._errors += 1
            if self._errors >= MAX_BAD_COMMANDS:
                self._log.warn("too many bad commands from {peer}",
                               event="receive.protocol-error", **self.state.fields())
                reply, close = replies.TOO_MANY_ERRORS, True
        elif reply.code < 400:
            self._errors = 0
        self._send(reply)
        if close:
            self._close()

    def _send(self, reply: Reply) -> None:
        data = bytes(reply)
        self._out.append(data)
        if self.state.verbose:  # the one test a reply costs without protocol logging
            if self._plog is not None:
                self._plog.row(">", data)
            else:  # no protocol log (tests, embedding): the gateway's own log has them
                self._log.debug("> {data}", event="receive.reply", data=str(reply),
                                smtp_code=reply.code, enhanced_code=reply.enhanced,
                                **self.state.fields())

    def _close(self) -> None:
        self._closing = True
        self.state.abort_message()
        self._set_timeout(None)

    def _flush(self) -> None:
        if self._out and not self._lost and self.transport is not None:
            write_now(self.transport, b"".join(self._out))
        self._out.clear()
        if self._closing and self._mode != "closed" and not self._lost and self.transport:
            self._mode = "closed"
            self.transport.loseConnection()

    # -- the conversation the handlers answer through ------------------------

    def command_mode(self) -> None:
        self._mode = "command"
        self._set_timeout(seconds(self.state.c.timeouts.command.total_seconds()))

    def raw_mode(self, mode: str) -> None:
        self._mode = mode
        self._raw_octets = 0
        self._set_timeout(seconds(self.state.c.timeouts.data.total_seconds()))

    def stop_idle_timeout(self) -> None:
        self._set_timeout(None)

    def restart_idle_timeout(self) -> None:
        if not self._lost and not self._closing:
            self._set_timeout(seconds(self.state.c.timeouts.command.total_seconds()))

    def start_tls(self, options: object) -> None:
        self.answer(replies.TLS_READY)
        self._flush()
        # Plaintext pipelined after STARTTLS is discarded (command injection).
        self._discard_rest = True
        self._handshaking = True
        cast(ITLSTransport, self.transport).startTLS(
            cast(IOpenSSLServerConnectionCreator, options)
        )
