"""
Message data for L{relaygw.session.protocol.Session}: DATA and BDAT, the
spool entry and intake of one message, and the reply once its commit is
durable (or refused).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from twisted.python.failure import Failure

from relaygw import replies
from relaygw.accept.intake import DataDecoder, MessageIntake
from relaygw.errors import DeferReply, RejectReply
from relaygw.replies import Reply
from relaygw.session._state import seconds as _seconds
from relaygw.session.headers import message_id, received_header, with_keyword
from relaygw.spool.envelope import Envelope

if TYPE_CHECKING:
    from relaygw.session._state import SessionState as _Base
else:
    _Base = object

__all__ = ["DataCommands"]


class DataCommands(_Base):
    """DATA and BDAT and the message they carry; a mixin of L{Session}."""

    def do_DATA(self, args: str) -> Reply:
        if args:
            return replies.SYNTAX_ERROR
        refusal = self._data_refusal()
        if refusal is not None:
            return refusal
        if self._txn is not None and self._txn.mode == "BDAT":
            return replies.BDAT_MIXED
        if not self._start_message(check_line_ends=True):
            return replies.SPOOL_FAILED
        assert self._txn is not None
        self._txn.mode = "DATA"
        self._decoder = DataDecoder()
        self._set_raw_mode("data")
        return replies.START_DATA

    def do_BDAT(self, args: str) -> Reply | None:
        parts = args.split()
        if (not 1 <= len(parts) <= 2 or not parts[0].isdigit() or len(parts[0]) > 18
                or (len(parts) == 2 and parts[1].upper() != "LAST")):
            return replies.SYNTAX_ERROR
        self._bdat_size = self._bdat_left = int(parts[0])
        self._bdat_last = len(parts) == 2
        self._bdat_refusal = self._data_refusal()
        if self._bdat_refusal is None and self._intake is None:
            assert self._txn is not None
            if not self._start_message(check_line_ends=self._txn.body != "BINARYMIME"):
                self._bdat_refusal = replies.SPOOL_FAILED
            else:
                self._txn.mode = "BDAT"
        self._set_raw_mode("bdat")
        if self._bdat_left == 0:
            self._end_chunk()
        return None

    # -- message data -------------------------------------------------------

    def _data_refusal(self) -> Reply | None:
        if self.helo is None:
            return replies.NEED_HELO
        if self._txn is None:
            return replies.NEED_MAIL
        if not self._txn.recipients:
            return replies.NEED_RCPT
        return None

    def _start_message(self, *, check_line_ends: bool) -> bool:
        """Open a spool entry for the transaction; C{False} when the spool fails."""
        txn, c = self._txn, self._c
        assert txn is not None and self.helo is not None
        try:
            writer = self._factory.spool.begin()
        except OSError as e:
            self._log.error("spool unavailable: {error}", error=str(e),
                            event="receive.spool-error", **self._fields())
            return False
        try:
            received = received_header(
                helo=self.helo,
                client_ip=self._client_ip,
                by_fqdn=c.fqdn,
                with_=with_keyword(esmtp=self._esmtp, tls=self._tls_active,
                                   auth=self.user is not None, smtputf8=txn.smtputf8),
                queue_id=writer.queue_id,
                recipient=str(txn.recipients[0]) if len(txn.recipients) == 1 else None,
                tls=self.tls if self._tls_active else None,
                when=datetime.fromtimestamp(self._reactor.seconds(), timezone.utc),
            )
            self._intake = MessageIntake(
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

    def _data_received(self, data: bytes) -> bytes:
        assert self._decoder is not None and self._intake is not None
        content, leftover = self._decoder.feed(data)
        self._intake.feed(content)
        if leftover is None:
            return b""
        self._end_message()
        return leftover

    def _bdat_received(self, data: bytes) -> bytes:
        take = data[: self._bdat_left]
        self._bdat_left -= len(take)
        if self._intake is not None and self._bdat_refusal is None:
            self._intake.feed(take)
        if self._bdat_left:
            return b""
        rest = data[len(take):]
        self._end_chunk()
        return rest

    def _end_chunk(self) -> None:
        self._set_command_mode()
        if self._bdat_refusal is not None:
            # RFC 3030 section 4.2: a refused chunk ends the transaction.
            refusal, self._bdat_refusal = self._bdat_refusal, None
            self._reset_transaction()
            self._answer(refusal)
            return
        if self._bdat_last:
            self._end_message()
            return
        assert self._intake is not None
        problem = self._intake.problem
        if problem is not None:
            self._refused(problem)
            self._reset_transaction()
            return
        self._answer(replies.bdat_ok(self._bdat_size))

    def _end_message(self) -> None:
        """
        Commit the message; answer when the commit is durable.  Meanwhile
        further input waits (PIPELINING order) and no timeout runs; if the
        client leaves, the commit still completes and is logged.
        """
        intake, txn = self._intake, self._txn
        assert intake is not None and txn is not None
        self._intake, self._decoder, self._txn = None, None, None
        self._set_command_mode()
        try:
            committing = intake.finish(
                lambda message_id, size: txn.envelope(
                    queue_id=intake.queue_id,
                    message_id=message_id,
                    size=size,
                    connector=self._c.name,
                    client_ip=self._client_ip,
                    client_port=self._client_port,
                    helo=self.helo or "",
                    auth_user=self.user.name if self.user else None,
                    tls=self.tls if self._tls_active else None,
                    received_at=self._reactor.seconds(),
                )
            )
        except (RejectReply, DeferReply) as e:
            self._refused(e)
            return
        except Exception:
            intake.abort()
            self._log.failure("unexpected error ending message {queue_id} from {peer}",
                              queue_id=intake.queue_id, **self._fields())
            self._answer(replies.INTERNAL_ERROR)
            return
        self._set_timeout(None)
        self._await(committing.addCallbacks(self._queued, self._not_queued,
                                            errbackArgs=(intake.queue_id,)))

    def _queued(self, envelope: Envelope) -> Reply:
        """The commit is durable: log it (one event with all fields) and say 250."""
        self._messages += 1
        self._log.info(
            "message {queue_id} {message_id} from <{sender}> queued for {count} recipient(s)",
            event="receive.queued", queue_id=envelope.id, message_id=envelope.message_id,
            sender=envelope.sender, recipients=[r.address for r in envelope.recipients],
            count=len(envelope.recipients), size=envelope.size, helo=envelope.helo,
            auth_user=envelope.auth_user, smtp_code=250, **self._fields(),
        )
        self._resume_timeout()
        return replies.queued(envelope.message_id, envelope.id, self._c.fqdn)

    def _not_queued(self, failure: Failure, queue_id: str) -> Reply:
        self._resume_timeout()
        if isinstance(failure.value, DeferReply):
            return self._refusal(failure.value)
        self._log.failure("unexpected error committing message {queue_id} from {peer}",
                          failure, queue_id=queue_id, **self._fields())
        return replies.INTERNAL_ERROR

    def _resume_timeout(self) -> None:
        if not self._lost and not self._closing:
            self._set_timeout(_seconds(self._c.timeouts.command.total_seconds()))

    def _refused(self, error: RejectReply | DeferReply) -> None:
        self._answer(self._refusal(error))

    def _refusal(self, error: RejectReply | DeferReply) -> Reply:
        self._log.info(
            "message refused: {reason}", event="receive.message-refused", reason=error.reason,
            smtp_code=error.reply.code, enhanced_code=error.reply.enhanced, **self._fields(),
        )
        return error.reply
