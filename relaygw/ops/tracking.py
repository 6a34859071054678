"""
The message tracking log (SPEC section 5), Exchange's C{MSGTRK} files.

One log observer in the receiving process: the delivery process's events
are re-published there (L{relaygw.runner.DeliveryProcess}), so one writer
sees RECEIVE from the sessions and DELIVER, DEFER, FAIL, EXPIRE, DSN and the
DSNs' own RECEIVE from delivery.

Decisions (the writer thread, rotation and clean-up are
L{relaygw.ops._logfiles}'s, shared with the protocol logs):
  - Files: C{<log_dir>/MessageTracking/MSGTRK<yyyymmdd>-<n>.LOG}; the day and
    every time are UTC, of the event (its C{log_time}, the delivery process's
    own clock for its events).  A file takes rows until C{max_bytes} (10 MB,
    Exchange's C{MessageTrackingLogMaxFileSize}); one writer, so a restart
    continues the day's last file.  Files whose day ended more than
    C{max_age} ago (30 days, C{MessageTrackingLogMaxAge}) are removed.
  - Only the twelve SPEC fields of known events are written, never any other
    field of an event, so nothing secret can reach the file.  CR and LF in a
    value become spaces (one row is one line); commas and quotes are quoted.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver
from zope.interface import implementer

from relaygw import __version__
from relaygw.events import MESSAGES, is_copy
from relaygw.ops._logfiles import (
    BufferedWriter,
    RotatingFiles,
    Runner,
    Stamps,
    csv_field,
    read_csv_rows,
    utc_stamp,
)

__all__ = ["FIELDS", "TrackingLog", "read_rows", "rows_of", "tracking_dir", "utc_stamp"]

FIELDS = (
    "date-time", "event-id", "internal-message-id", "message-id", "connector-id", "client-ip",
    "auth-user", "sender-address", "recipient-address", "recipient-status", "total-bytes",
    "remote-host",
)
#: Row times, formatted on the reactor thread only (rows of one second share the work).
_stamp = Stamps()
#: The header's C{#Fields:} line, exactly as SPEC section 5 gives it.
FIELDS_LINE = "#Fields: " + ",".join(FIELDS)
#: The scheduler's and the DSN spooler's C{event_id}s.
_DELIVERY_EVENTS = frozenset({"DELIVER", "DEFER", "FAIL", "EXPIRE", "DSN", "RECEIVE"})
#: A value longer than this is cut (replies already are, addresses are bounded).
_MAX_VALUE = 2000


def tracking_dir(log_dir: Path) -> Path:
    """Where the tracking files of C{log_dir} are."""
    return log_dir / "MessageTracking"


def _client_ip(peer: object) -> str:
    # Sessions log "ip:port" (IPv6 unbracketed): the port is the last field.
    text = str(peer or "")
    return text.rpartition(":")[0] if ":" in text else text


def rows_of(event: Mapping[str, Any]) -> list[dict[str, str]]:
    """
    The tracking rows an event stands for: one per recipient of a received
    message, one for each scheduler or DSN event, none for any other event.
    """
    if event.get("event") == "receive.queued":
        common: dict[str, object] = {
            "event-id": "RECEIVE",
            "client-ip": _client_ip(event.get("peer")),
            "recipient-status": event.get("smtp_code") or 250,
            # The client's own name for itself, as Exchange's client-hostname.
            "remote-host": event.get("helo"),
        }
        recipients = list(event.get("recipients") or ())
    elif event.get("event_id") in _DELIVERY_EVENTS:
        kind = event["event_id"]
        common = {
            "event-id": kind,
            "client-ip": event.get("client_ip"),
            "recipient-status": _status(kind, event),
            "remote-host": event.get("remote_host"),
        }
        recipients = [event.get("recipient")]
    else:
        return []
    common.update({
        "internal-message-id": event.get("queue_id"),
        "message-id": event.get("message_id"),
        "connector-id": event.get("connector"),
        "auth-user": event.get("auth_user"),
        "sender-address": event.get("sender"),
        "total-bytes": event.get("size"),
    })
    return [_row(event, common, r) for r in recipients]


def _status(kind: str, event: Mapping[str, Any]) -> object:
    if kind == "RECEIVE":  # a DSN spooled by the gateway itself
        return f"DSN of {event.get('original_queue_id') or ''}".strip()
    if kind == "DSN":
        return f"{event.get('action') or ''} {event.get('status') or ''}".strip()
    if kind == "EXPIRE":
        return event.get("last_reply")
    return event.get("reply")


def _row(event: Mapping[str, Any], common: Mapping[str, object], rcpt: object) -> dict[str, str]:
    when = event.get("log_time")
    values = dict(common, **{"recipient-address": rcpt})
    row = {"date-time": _stamp(float(when)) if isinstance(when, (int, float)) else ""}
    for name in FIELDS[1:]:
        value = values.get(name)
        text = "" if value is None else str(value)
        row[name] = text.replace("\r", " ").replace("\n", " ")[:_MAX_VALUE]
    return row


def csv_line(row: Mapping[str, str]) -> str:
    """One row as a CSV line with its CRLF."""
    return ",".join(csv_field(row[name]) for name in FIELDS) + "\r\n"


def header(now: float) -> str:
    """The header lines of a new file created at C{now}."""
    return (
        f"#Software: relaygw\r\n#Version: {__version__}\r\n"
        f"#Log-type: Message Tracking Log\r\n#Date: {utc_stamp(now)}\r\n{FIELDS_LINE}\r\n"
    )


def _files(log_dir: Path, *, max_bytes: int = 10 * 1024 * 1024,
           max_age: timedelta = timedelta(days=30)) -> RotatingFiles:
    # One writer (this process) continues each day's last file.
    return RotatingFiles(tracking_dir(log_dir), "MSGTRK", hourly=False, header=header,
                         max_bytes=max_bytes, max_age=max_age)


@implementer(ILogObserver)
class TrackingLog:
    """
    The observer: add it with L{start}, remove and flush with L{stop}.
    """

    def __init__(
        self,
        log_dir: Path,
        reactor: IReactorTime,
        *,
        max_bytes: int = 10 * 1024 * 1024,
        max_age: timedelta = timedelta(days=30),
        flush_every: float = 0.5,
        max_buffered: int = 100_000,
        run: Runner | None = None,
    ) -> None:
        """
        @param log_dir: C{gateway.log_dir}; the files go in its C{MessageTracking}.
        @param reactor: the clock of the flush timer and of clean-up; with
            L{IReactorFromThreads}, writes go to a thread of their own.
        @param run: where the blocking writes run instead (tests: inline).
        """
        self.files = _files(log_dir, max_bytes=max_bytes, max_age=max_age)
        self._clock = reactor
        self._writer: BufferedWriter[tuple[float, str]] = BufferedWriter(
            reactor, self.files.write, what="message tracking log", flush_every=flush_every,
            max_buffered=max_buffered, run=run,
        )
        self._publisher: Any = None

    def start(self, publisher: Any) -> None:
        """Observe C{publisher}'s events; remove old files (in the writer)."""
        self._writer.start()
        self._publisher = publisher
        publisher.addObserver(self)
        MESSAGES.addObserver(self)
        now = self._clock.seconds()

        def clean() -> None:
            self.files.clean(now)

        self._writer.run(clean)

    def __call__(self, event: Mapping[str, Any]) -> None:
        if is_copy(event):  # seen already, on the per-message stream
            return
        try:
            rows = rows_of(event)
        except Exception:  # an observer never raises into the publisher
            return
        for row in rows:
            when = event.get("log_time")
            stamp = float(when) if isinstance(when, (int, float)) else self._clock.seconds()
            if not row["date-time"]:
                row["date-time"] = _stamp(stamp)
            self._writer.add((stamp, csv_line(row)))

    def stop(self) -> Deferred[None]:
        """Stop observing, write what is buffered, stop the writer thread."""
        if self._publisher is not None:
            self._publisher.removeObserver(self)
            MESSAGES.removeObserver(self)
            self._publisher = None
        return self._writer.stop()


def read_rows(log_dir: Path, since: float | None = None) -> Iterator[dict[str, str]]:
    """
    Every row of every tracking file under C{log_dir} (rotated ones
    included), oldest file first, keyed by the file's C{#Fields}.

    @param since: skip the files whose (UTC) day ended before this time.
    @raise OSError: a file cannot be read.
    """
    files = _files(log_dir)
    paths = [path for day, _, path in files.files()
             if since is None or files.period_end(day) >= since]
    yield from read_csv_rows(paths, FIELDS)
