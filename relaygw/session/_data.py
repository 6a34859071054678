"""
Message data: DATA and BDAT, the spool entry and intake of one message, and
the reply once its commit is durable (or refused).
"""

from __future__ import annotations

from datetime import datetime, timezone

from twisted.logger import Logger
from twisted.python.failure import Failure

from relaygw import replies
from relaygw.events import MESSAGES
from relaygw.accept.intake import DataDecoder, MessageIntake
from relaygw.errors import DeferReply, RejectReply
from relaygw.replies import Reply
from relaygw.session.headers import message_id, received_header, with_keyword
from relaygw.session.state import Conversation, SessionState
from relaygw.spool.envelope import Envelope

__all__ = ["DataCommands"]

_log = Logger(namespace="relaygw.session")
#: The per-message events (L{relaygw.events}).
_messages = Logger(namespace="relaygw.session", observer=MESSAGES)


class DataCommands:
    """DATA and BDAT and the message they carry."""

    def __init__(self, state: SessionState, io: Conversation) -> None:
        self._s = state
        self._io = io
        self._bdat_left = 0
        self._bdat_size = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None

    def do_DATA(self, args: str) -> Reply:
        if args:
            return replies.SYNTAX_ERROR
        refusal = self._data_refusal()
        if refusal is not None:
            return refusal
        s = self._s
        assert s.txn is not None
        if s.txn.mode == "BDAT":
            return replies.BDAT_MIXED
        if not self._start_message(check_line_ends=True):
            return replies.SPOOL_FAILED
        s.txn.mode = "DATA"
        s.decoder = DataDecoder()
        self._io.raw_mode("data")
        return replies.START_DATA

    def do_BDAT(self, args: str) -> Reply | None:
        parts = args.split()
        if (not 1 <= len(parts) <= 2 or not parts[0].isdigit() or len(parts[0]) > 18
                or (len(parts) == 2 and parts[1].upper() != "LAST")):
            return replies.SYNTAX_ERROR
        s = self._s
        self._bdat_size = self._bdat_left = int(parts[0])
        self._bdat_last = len(parts) == 2
        self._bdat_refusal = self._data_refusal()
        if self._bdat_refusal is None and s.intake is None:
            assert s.txn is not None
            if not self._start_message(check_line_ends=s.txn.body != "BINARYMIME"):
                self._bdat_refusal = replies.SPOOL_FAILED
            else:
                s.txn.mode = "BDAT"
        self._io.raw_mode("bdat")
        if self._bdat_left == 0:
            self._end_chunk()
        return None

    # -- raw input ------------------------------------------------------------

    def data_received(self, data: bytes) -> bytes:
        """DATA input; what follows the final dot is returned."""
        s = self._s
        assert s.decoder is not None and s.intake is not None
        content, leftover = s.decoder.feed(data)
        s.intake.feed(content)
        if leftover is None:
            return b""
        self._end_message()
        return leftover

    def bdat_received(self, data: bytes) -> bytes:
        """BDAT chunk input; what follows the chunk is returned."""
        take = data[: self._bdat_left]
        self._bdat_left -= len(take)
        intake = self._s.intake
        if intake is not None and self._bdat_refusal is None:
            intake.feed(take)
        if self._bdat_left:
            return b""
        rest = data[len(take):]
        self._end_chunk()
        return rest

    # -- the message ------------------------------------------------------------

    def _data_refusal(self) -> Reply | None:
        s = self._s
        if s.helo is None:
            return replies.NEED_HELO
        if s.txn is None:
            return replies.NEED_MAIL
        if not s.txn.recipients:
            return replies.NEED_RCPT
        return None

    def _start_message(self, *, check_line_ends: bool) -> bool:
        """Open a spool entry for the transaction; C{False} when the spool fails."""
        s = self._s
        txn, c = s.txn, s.c
        assert txn is not None and s.helo is not None
        try:
            writer = s.services.spool.begin()
        except OSError as e:
            _log.error("spool unavailable: {error}", error=str(e),
                       event="receive.spool-error", **s.fields())
            return False
        try:
            received = received_header(
                helo=s.helo,
                client_ip=s.client_ip,
                by_fqdn=c.fqdn,
                with_=with_keyword(esmtp=s.esmtp, tls=s.tls_active,
                                   auth=s.user is not None, smtputf8=txn.smtputf8),
                queue_id=writer.queue_id,
                recipient=str(txn.recipients[0]) if len(txn.recipients) == 1 else None,
                tls=s.tls if s.tls_active else None,
                when=datetime.fromtimestamp(s.reactor.seconds(), timezone.utc),
            )
            s.intake = MessageIntake(
                writer,
                received=received,
                new_message_id=message_id(writer.queue_id, c.fqdn),
                max_size=c.max_message_size,
                check_line_ends=check_line_ends,
            )
        except BaseException:
            writer.abort()
            raise
        return True

    def _end_chunk(self) -> None:
        s = self._s
        self._io.command_mode()
        if self._bdat_refusal is not None:
            # RFC 3030 section 4.2: a refused chunk ends the transaction.
            refusal, self._bdat_refusal = self._bdat_refusal, None
            s.reset_transaction()
            self._io.answer(refusal)
            return
        if self._bdat_last:
            self._end_message()
            return
        assert s.intake is not None
        problem = s.intake.problem
        if problem is not None:
            self._io.answer(self._refusal(problem))
            s.reset_transaction()
            return
        self._io.answer(replies.bdat_ok(self._bdat_size))

    def _end_message(self) -> None:
        """
        Commit the message; answer when the commit is durable.  Meanwhile
        further input waits (PIPELINING order) and no timeout runs; if the
        client leaves, the commit still completes and is logged.
        """
        s = self._s
        intake, txn = s.intake, s.txn
        assert intake is not None and txn is not None
        s.intake, s.decoder, s.txn = None, None, None
        self._io.command_mode()
        try:
            committing = intake.finish(
                lambda message_id, size: txn.envelope(
                    queue_id=intake.queue_id,
                    message_id=message_id,
                    size=size,
                    connector=s.c.name,
                    client_ip=s.client_ip,
                    client_port=s.client_port,
                    helo=s.helo or "",
                    auth_user=s.user.name if s.user else None,
                    tls=s.tls if s.tls_active else None,
                    received_at=s.reactor.seconds(),
                )
            )
        except (RejectReply, DeferReply) as e:
            self._io.answer(self._refusal(e))
            return
        except Exception:
            intake.abort()
            _log.failure("unexpected error ending message {queue_id} from {peer}",
                         queue_id=intake.queue_id, **s.fields())
            self._io.answer(replies.INTERNAL_ERROR)
            return
        self._io.stop_idle_timeout()
        self._io.wait_for(committing.addCallbacks(self._queued, self._not_queued,
                                                  errbackArgs=(intake.queue_id,)))

    def _queued(self, envelope: Envelope) -> Reply:
        """The commit is durable: log it (one event with all fields) and say 250."""
        s = self._s
        s.messages += 1
        _messages.info(
            "message {queue_id} {message_id} from <{sender}> queued for {count} recipient(s)",
            event="receive.queued", queue_id=envelope.id, message_id=envelope.message_id,
            sender=envelope.sender, recipients=[r.address for r in envelope.recipients],
            count=len(envelope.recipients), size=envelope.size, helo=envelope.helo,
            auth_user=envelope.auth_user, smtp_code=250, **s.fields(),
        )
        self._io.restart_idle_timeout()
        return replies.queued(envelope.message_id, envelope.id, s.c.fqdn)

    def _not_queued(self, failure: Failure, queue_id: str) -> Reply:
        self._io.restart_idle_timeout()
        if isinstance(failure.value, DeferReply):
            return self._refusal(failure.value)
        _log.failure("unexpected error committing message {queue_id} from {peer}",
                     failure, queue_id=queue_id, **self._s.fields())
        return replies.INTERNAL_ERROR

    def _refusal(self, error: RejectReply | DeferReply) -> Reply:
        _log.info(
            "message refused: {reason}", event="receive.message-refused", reason=error.reason,
            smtp_code=error.reply.code, enhanced_code=error.reply.enhanced, **self._s.fields(),
        )
        return error.reply
