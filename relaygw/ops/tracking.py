"""
The message tracking log (SPEC section 5), Exchange's C{MSGTRK} files.

One log observer in the receiving process: the delivery process's events
are re-published there (L{relaygw.runner.DeliveryProcess}), so one writer
sees RECEIVE from the sessions and DELIVER, DEFER, FAIL, EXPIRE, DSN and the
DSNs' own RECEIVE from delivery.

Decisions:
  - The observer only formats rows into a buffer; a timer (C{flush_every},
    0.5 s) hands the buffer to one writer thread, at most one write in
    flight, so a slow disk never blocks the reactor and a burst costs one
    write.  More than C{max_buffered} rows waiting are dropped and counted
    (logged once the writer is back).  Nothing is fsynced: the spool, not
    this log, is the promise.
  - Files: C{<log_dir>/MessageTracking/MSGTRK<yyyymmdd>-<n>.LOG}; the day and
    every time are UTC, of the event (its C{log_time}, the delivery process's
    own clock for its events).  A file takes rows until C{max_bytes} (10 MB,
    Exchange's C{MessageTrackingLogMaxFileSize}), then C{-<n+1>} starts; after
    a restart the day's last file is continued.
  - Files whose day ended more than C{max_age} ago (30 days, Exchange's
    C{MessageTrackingLogMaxAge}) are removed at start and at each new day;
    the age is read from the name, not from mtimes.
  - Only the twelve SPEC fields of known events are written, never any other
    field of an event, so nothing secret can reach the file.  CR and LF in a
    value become spaces (one row is one line); commas and quotes are quoted
    by the C{csv} module.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relaygw import __version__

__all__ = ["FIELDS", "TrackingFiles", "TrackingLog", "read_rows", "rows_of", "tracking_dir"]

FIELDS = (
    "date-time", "event-id", "internal-message-id", "message-id", "connector-id", "client-ip",
    "auth-user", "sender-address", "recipient-address", "recipient-status", "total-bytes",
    "remote-host",
)
#: The header's C{#Fields:} line, exactly as SPEC section 5 gives it.
FIELDS_LINE = "#Fields: " + ",".join(FIELDS)
#: The scheduler's and the DSN spooler's C{event_id}s.
_DELIVERY_EVENTS = frozenset({"DELIVER", "DEFER", "FAIL", "EXPIRE", "DSN", "RECEIVE"})
_NAME = re.compile(r"^MSGTRK(\d{8})-(\d+)\.LOG$")
#: A value longer than this is cut (replies already are, addresses are bounded).
_MAX_VALUE = 2000

_log = Logger(namespace="relaygw.ops.tracking")

#: Runs one blocking call somewhere (a thread, or inline in tests).
Runner = Callable[[Callable[[], None]], "Deferred[None]"]


def tracking_dir(log_dir: Path) -> Path:
    """Where the tracking files of C{log_dir} are."""
    return log_dir / "MessageTracking"


def utc_stamp(seconds: float) -> str:
    """Exchange's time form, UTC: C{2026-12-06T19:00:00.123Z}."""
    when = datetime.fromtimestamp(seconds, timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y%m%d")


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
    row = {"date-time": utc_stamp(float(when)) if isinstance(when, (int, float)) else ""}
    for name in FIELDS[1:]:
        value = values.get(name)
        text = "" if value is None else str(value)
        row[name] = text.replace("\r", " ").replace("\n", " ")[:_MAX_VALUE]
    return row


def csv_line(row: Mapping[str, str]) -> str:
    """One row as a CSV line with its CRLF."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow([row[name] for name in FIELDS])
    return out.getvalue()


def header(now: float) -> str:
    """The header lines of a new file created at C{now}."""
    return (
        f"#Software: relaygw\r\n#Version: {__version__}\r\n"
        f"#Log-type: Message Tracking Log\r\n#Date: {utc_stamp(now)}\r\n{FIELDS_LINE}\r\n"
    )


class TrackingFiles:
    """
    The files, written by one thread at a time (L{TrackingLog} sees to it):
    rotation by day and size, clean-up by age.  Blocking.
    """

    def __init__(self, directory: Path, *, max_bytes: int, max_age: timedelta) -> None:
        self.directory = directory
        self._max_bytes = max_bytes
        self._max_age = max_age
        self._day = ""
        self._number = 0
        self._size = 0
        self._rows = 0

    def write(self, rows: list[tuple[float, str]], now: float) -> None:
        """
        Append C{rows} (the event's time, the CSV line) to the file of each
        row's day, starting the next file of that day when one is full.

        @raise OSError: the directory or a file cannot be written.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        out = None
        try:
            for when, line in rows:
                size = len(line.encode("utf-8"))
                day = _day(when)
                if out is None or day != self._day:
                    if out is not None:
                        out.close()
                    out = self._open(day, now, full=False)  # the day's last file
                elif self._size + size > self._max_bytes and self._rows > 0:
                    out.close()
                    out = self._open(day, now, full=True)
                out.write(line)
                self._size += size
                self._rows += 1
        finally:
            if out is not None:
                out.close()

    def _open(self, day: str, now: float, *, full: bool) -> io.TextIOWrapper:
        if full:
            self._number += 1
        else:
            if day > self._day:
                self.clean(now)
            self._day = day
            # After a restart (or a late row of another day), that day's last file.
            self._number = max((n for d, n, _ in _files(self.directory) if d == day), default=1)
        path = self.directory / f"MSGTRK{day}-{self._number}.LOG"
        out = open(path, "a", encoding="utf-8", newline="")
        self._size = out.tell()
        self._rows = 1 if self._size > 0 else 0  # a continued file holds rows (or only a header)
        if full is False and self._size >= self._max_bytes:
            out.close()
            return self._open(day, now, full=True)
        if self._size == 0:
            text = header(now)
            out.write(text)
            self._size = len(text.encode("utf-8"))
        return out

    def clean(self, now: float) -> list[Path]:
        """Remove the files whose day ended more than C{max_age} before C{now}."""
        removed = []
        for day, _, path in _files(self.directory):
            if _day_end(day) + self._max_age.total_seconds() < now:
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
        return removed


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
        self.files = TrackingFiles(tracking_dir(log_dir), max_bytes=max_bytes, max_age=max_age)
        self._clock = reactor
        self._flush_every = flush_every
        self._max_buffered = max_buffered
        self._pool: ThreadPool | None = None
        if run is None and IReactorFromThreads.providedBy(reactor):
            pool = ThreadPool(minthreads=0, maxthreads=1, name="relaygw-tracking")
            self._pool = pool
            threads = cast(IReactorFromThreads, reactor)

            def in_thread(work: Callable[[], None]) -> Deferred[None]:
                return deferToThreadPool(threads, pool, work)

            run = in_thread
        self._run: Runner = run if run is not None else maybeDeferred
        self._pending: list[tuple[float, str]] = []
        self._dropped = 0
        self._timer: IDelayedCall | None = None
        self._writing: Deferred[None] | None = None
        self._publisher: Any = None

    def start(self, publisher: Any) -> None:
        """Observe C{publisher}'s events; remove old files (in the writer)."""
        if self._pool is not None:
            self._pool.start()
        self._publisher = publisher
        publisher.addObserver(self)
        now = self._clock.seconds()

        def clean() -> None:
            self.files.clean(now)

        self._write(clean)

    def __call__(self, event: Mapping[str, Any]) -> None:
        try:
            rows = rows_of(event)
        except Exception:  # an observer never raises into the publisher
            return
        for row in rows:
            if len(self._pending) >= self._max_buffered:
                self._dropped += 1
                continue
            when = event.get("log_time")
            stamp = float(when) if isinstance(when, (int, float)) else self._clock.seconds()
            if not row["date-time"]:
                row["date-time"] = utc_stamp(stamp)
            self._pending.append((stamp, csv_line(row)))
        if self._pending and self._timer is None and self._writing is None:
            self._timer = self._clock.callLater(self._flush_every, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self._writing is not None or not self._pending:
            return
        rows, self._pending = self._pending, []
        now = self._clock.seconds()
        self._write(lambda: self.files.write(rows, now), count=len(rows))

    def _write(self, work: Callable[[], None], count: int = 0) -> None:
        def failed(failure: Any) -> None:
            # Not a tracking event, so no row (and no loop) comes of it.
            _log.error("cannot write the message tracking log ({count} rows lost): {problem}",
                       count=count, problem=str(failure.value))

        def done(_: object) -> None:
            self._writing = None
            if self._dropped:
                _log.error("message tracking log: {count} rows dropped, the disk is too slow",
                           count=self._dropped)
                self._dropped = 0
            if self._pending and self._timer is None:
                self._timer = self._clock.callLater(self._flush_every, self._flush)

        d = self._writing = self._run(work)
        d.addErrback(failed)
        d.addBoth(done)

    def stop(self) -> Deferred[None]:
        """Stop observing, write what is buffered, stop the writer thread."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._publisher is not None:
            self._publisher.removeObserver(self)
            self._publisher = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for _ in range(2):  # the write in flight, then the rest
            if self._writing is not None:
                await self._writing
            self._flush()
        if self._writing is not None:
            await self._writing
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._pool is not None:
            self._pool.stop()
            self._pool = None


def _day_end(day: str) -> float:
    """The end of a file name's C{yyyymmdd} day, UTC, in seconds."""
    return (datetime.strptime(day, "%Y%m%d").replace(tzinfo=timezone.utc)
            + timedelta(days=1)).timestamp()


def _files(directory: Path) -> list[tuple[str, int, Path]]:
    """The tracking files in C{directory}: (day, number, path), in order."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = _NAME.match(name)
        if m:
            found.append((m.group(1), int(m.group(2)), directory / name))
    return sorted(found)


def read_rows(log_dir: Path, since: float | None = None) -> Iterator[dict[str, str]]:
    """
    Every row of every tracking file under C{log_dir} (rotated ones
    included), oldest file first, keyed by the file's C{#Fields}.

    @param since: skip the files whose (UTC) day ended before this time.
    @raise OSError: a file cannot be read.
    """
    for day, _, path in _files(tracking_dir(log_dir)):
        if since is not None and _day_end(day) < since:
            continue
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            fields = list(FIELDS)
            for values in csv.reader(f):
                if not values:
                    continue
                if values[0].startswith("#"):
                    if values[0].startswith("#Fields:"):
                        fields = [values[0][len("#Fields:"):].strip(), *values[1:]]
                    continue
                yield dict(zip(fields, values))
