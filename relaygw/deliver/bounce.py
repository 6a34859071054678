"""
Spooling the DSNs the scheduler owes (SPEC section 4): a bounce for the
recipients that failed or expired in one attempt, a delay warning for those
still queued after C{[queue].delay_warning}.

A DSN is committed into the same spool as any received message (fsynced and
renamed into place by the spool's commit thread), before the scheduler
records the event in the original's envelope: a crash in between sends the
DSN twice, never not at all.  A message from C{<>} (a DSN itself) gets none:
its failed recipients are dropped with a log line, so DSNs never loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO, Iterator, Sequence, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from relaygw.deliver.dsn import MAX_HEADER_BLOCK, Report, build_dsn, header_block, status_of
from relaygw.interfaces import ISpool
from relaygw.spool.envelope import Envelope, Recipient

__all__ = ["INotifier", "SpoolNotifier"]

if TYPE_CHECKING:
    from relaygw.interfaces import IMessageWriter


class INotifier(Interface):
    """
    Makes the DSN of one delivery event durable.  The scheduler's only
    dependency on bounces.
    """

    def notify(envelope: Envelope, reports: Sequence[Report]) -> Deferred[Envelope | None]:
        """
        @param envelope: the original message's envelope.
        @param reports: the recipients concerned, all C{failed} or all
            C{delayed} (L{relaygw.deliver.dsn.report_of}).
        @return: fires with the DSN's own envelope once it is committed (the
            caller schedules it), or with C{None} when the message is from
            C{<>} and gets no DSN; fails with the L{OSError} of a spool that
            could not take it, and then nothing was committed.
        """


@implementer(INotifier)
class SpoolNotifier:
    """Builds DSNs with L{relaygw.deliver.dsn} and commits them into the spool."""

    _log = Logger()

    def __init__(self, spool: ISpool, *, hostname: str, clock: IReactorTime) -> None:
        """
        @param spool: where the original is, and where the DSN goes.
        @param hostname: the gateway's name (Reporting-MTA, From, Message-ID).
        @param clock: the time of the event.
        """
        self._spool = spool
        self._hostname = hostname
        self._clock = clock

    def notify(self, envelope: Envelope, reports: Sequence[Report]) -> Deferred[Envelope | None]:
        """See L{INotifier.notify}."""
        return Deferred.fromCoroutine(self._notify(envelope, list(reports)))

    async def _notify(self, envelope: Envelope, reports: list[Report]) -> Envelope | None:
        if envelope.sender == "":
            for report in reports:
                if report.action == "failed":
                    self._log.warn(
                        "Dropping {queue_id} to {recipient}: a DSN is never bounced ({reply})",
                        queue_id=envelope.id,
                        recipient=report.recipient,
                        reply=report.outcome.reply,
                    )
            return None
        original_headers = self._original_headers(envelope.id)
        now = self._clock.seconds()
        writer: IMessageWriter = self._spool.begin()
        queue_id = cast(str, writer.queue_id)
        try:
            dsn = build_dsn(
                envelope, reports, original_headers,
                hostname=self._hostname, now=now, token=queue_id,
            )
            writer.write(dsn.data)
        except BaseException:
            writer.abort()
            raise
        notice = Envelope(
            id=queue_id,
            sender="",
            recipients=(Recipient(dsn.recipient),),
            connector="",
            client_ip="",
            received_at=now,
            size=len(dsn.data),
            message_id=dsn.message_id,
            helo=self._hostname,
            body="8BITMIME" if dsn.eight_bit else "7BIT",
            smtputf8=dsn.smtputf8,
        )
        await writer.commit(notice)
        self._logged(envelope, reports, notice)
        return notice

    def _original_headers(self, queue_id: str) -> bytes:
        # A DSN without the quoted headers beats no DSN at all.
        try:
            with cast(BinaryIO, self._spool.open_data(queue_id)) as data:
                return header_block(_bounded_lines(data))
        except (KeyError, ValueError, OSError):
            self._log.failure(
                "Cannot read the headers of {queue_id}; its DSN goes without them",
                queue_id=queue_id,
            )
            return b""

    def _logged(self, envelope: Envelope, reports: list[Report], notice: Envelope) -> None:
        self._log.info(
            "RECEIVE {queue_id} from <> to <{recipient}>: DSN of {original_queue_id}",
            event_id="RECEIVE",
            queue_id=notice.id,
            message_id=notice.message_id,
            sender="",
            recipient=envelope.sender,
            size=notice.size,
            original_queue_id=envelope.id,
        )
        for report in reports:
            self._log.info(
                "DSN {queue_id} {recipient}: {action} ({status}), notice {dsn_queue_id}",
                event_id="DSN",
                queue_id=envelope.id,
                message_id=envelope.message_id,
                sender=envelope.sender,
                connector=envelope.connector,
                client_ip=envelope.client_ip,
                auth_user=envelope.auth_user,
                size=envelope.size,
                recipient=report.recipient,
                action=report.action,
                status=status_of(report.outcome.reply),
                reply=report.outcome.reply,
                remote_host=report.outcome.remote_host,
                dsn_queue_id=notice.id,
            )


def _bounded_lines(data: BinaryIO) -> Iterator[bytes]:
    # readline with a limit: a header "line" without a line end must not be
    # read whole into memory.
    while line := data.readline(MAX_HEADER_BLOCK + 1):
        yield line
