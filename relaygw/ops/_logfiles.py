"""
What the Exchange-style log files share (SPEC section 5): UTC time stamps,
CSV quoting, files rotated by period and size with a header per file,
clean-up by age, and a writer that queues on the reactor thread and writes
in one thread of its own.

Decisions:
  - A file is C{<prefix><period>-<n>.LOG}, the period C{yyyymmdd} (daily)
    or C{yyyymmddhh} (hourly), UTC, of each row's own time.  It takes rows
    until C{max_bytes}, then C{-<n+1>} starts; after a restart the period's
    last file is continued.  Files whose period ended more than C{max_age}
    ago are removed at start and at each new period; the age is read from
    the name, not from mtimes (a copied or touched file keeps its age).
  - L{BufferedWriter}: the reactor thread only appends to a list; a timer
    (C{flush_every}) hands the list to one writer thread, at most one write
    in flight, so a slow disk never blocks the reactor and a burst costs one
    write.  Items beyond C{max_buffered} waiting are dropped and counted
    (logged once the writer is back), so memory stays bounded.  Nothing is
    fsynced: the spool, not a log, is the promise.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, Generic, TypeVar, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

__all__ = ["BufferedWriter", "RotatingFiles", "Runner", "Stamps", "csv_field", "utc_stamp"]

_T = TypeVar("_T")
_log = Logger(namespace="relaygw.ops.logfiles")

#: Runs one blocking call somewhere (a thread, or inline in tests).
Runner = Callable[[Callable[[], None]], "Deferred[None]"]


def utc_stamp(seconds: float) -> str:
    """Exchange's time form, UTC: C{2026-12-06T19:00:00.123Z}."""
    when = datetime.fromtimestamp(seconds, timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


class Stamps:
    """L{utc_stamp}, with the whole second's text kept (rows come in bursts)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, seconds: float) -> str:
        whole = int(seconds)
        # Rounded to microseconds first, as datetime.fromtimestamp does.
        micros = round((seconds - whole) * 1_000_000)
        if micros >= 1_000_000:
            whole, micros = whole + 1, 0
        if whole != self._second:
            self._second = whole
            when = datetime.fromtimestamp(whole, timezone.utc)
            self._prefix = when.strftime("%Y-%m-%dT%H:%M:%S.")
        return f"{self._prefix}{micros // 1000:03d}Z"


_SPECIAL = re.compile(r'[,"\r\n]')


def csv_field(text: str) -> str:
    """
    One CSV field as Exchange writes it: quoted when it holds a comma or a
    quote, quotes doubled; CR and LF become spaces (a row is one line).
    """
    if _SPECIAL.search(text) is None:  # nearly every field: one scan
        return text
    if "\r" in text or "\n" in text:
        text = text.replace("\r", " ").replace("\n", " ")
    if "," in text or '"' in text:
        return '"' + text.replace('"', '""') + '"'
    return text


class RotatingFiles:
    """
    The files of one log, written by one thread at a time (a
    L{BufferedWriter} sees to it): rotation by period and size, a header
    in each new file, clean-up by age.  Blocking.
    """

    def __init__(
        self,
        directory: Path,
        prefix: str,
        *,
        hourly: bool,
        header: Callable[[float], str],
        max_bytes: int,
        max_age: timedelta,
        exclusive: bool = False,
    ) -> None:
        """
        @param prefix: the letters before the period in file names (C{RECV}).
        @param hourly: C{yyyymmddhh} periods, else C{yyyymmdd}.
        @param header: the header text of a file created at the given time.
        @param exclusive: write only files this object created (C{O_EXCL}),
            taking the next free C{-<n>}: several processes (receiving
            workers) may then write one log's directory, each its own files,
            and no line is ever interleaved with another's.  Otherwise the
            period's last file is continued, after a restart too.
        """
        self.directory = directory
        self._prefix = prefix
        self._hourly = hourly
        self._format = "%Y%m%d%H" if hourly else "%Y%m%d"
        self._span = 3600 if hourly else 86400
        self._name = re.compile(rf"^{re.escape(prefix)}(\d{{{10 if hourly else 8}}})-(\d+)\.LOG$")
        self._header = header
        self._max_bytes = max_bytes
        self._max_age = max_age
        self._exclusive = exclusive
        #: exclusive: the file number this object created, per period.
        self._mine: dict[str, int] = {}
        self._period = ""
        self._number = 0
        self._size = 0
        self._rows = 0
        self._cached = (-1, "")

    def period(self, when: float) -> str:
        """The period (UTC) of a time, as file names spell it."""
        index = int(when // self._span)
        if index != self._cached[0]:
            text = datetime.fromtimestamp(index * self._span, timezone.utc).strftime(self._format)
            self._cached = (index, text)
        return self._cached[1]

    def write(self, rows: Iterable[tuple[float, str]], now: float) -> None:
        """
        Append C{rows} (the row's time, its line with CRLF) to the file of
        each row's period, starting the next file of that period when one
        is full.

        @raise OSError: the directory or a file cannot be written.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        out: IO[str] | None = None
        chunk: list[str] = []  # lines for C{out}, written at once
        try:
            for when, line in rows:
                size = len(line) if line.isascii() else len(line.encode("utf-8"))
                period = self.period(when)
                if out is None or period != self._period:
                    if out is not None:
                        out.write("".join(chunk))
                        chunk.clear()
                        out.close()
                        out = None
                    out = self._open(period, now, full=False)  # the period's last file
                elif self._size + size > self._max_bytes and self._rows > 0:
                    out.write("".join(chunk))
                    chunk.clear()
                    out.close()
                    out = None
                    out = self._open(period, now, full=True)
                chunk.append(line)
                self._size += size
                self._rows += 1
            if out is not None:
                out.write("".join(chunk))
        finally:
            if out is not None:
                out.close()

    def _open(self, period: str, now: float, *, full: bool) -> IO[str]:
        if self._exclusive:
            return self._open_own(period, now, full=full)
        if full:
            self._number += 1
        elif period != self._period:
            if period > self._period:
                self.clean(now)
            self._period = period
            # After a restart (or a late row of another period), its last file.
            self._number = max((n for p, n, _ in self.files() if p == period), default=1)
        path = self.directory / f"{self._prefix}{period}-{self._number}.LOG"
        out = open(path, "a", encoding="utf-8", newline="")
        self._size = out.tell()
        self._rows = 1 if self._size > 0 else 0  # a continued file holds rows (or only a header)
        if not full and self._size >= self._max_bytes:
            out.close()
            return self._open(period, now, full=True)
        if self._size == 0:
            text = self._header(now)
            out.write(text)
            self._size = len(text.encode("utf-8"))
        return out

    def _open_own(self, period: str, now: float, *, full: bool) -> IO[str]:
        if period > self._period:
            self.clean(now)
        self._period = period
        number = None if full else self._mine.get(period)
        if number is not None:
            out = open(self.directory / f"{self._prefix}{period}-{number}.LOG", "a",
                       encoding="utf-8", newline="")
            self._number, self._size = number, out.tell()
            self._rows = 1
            if self._size < self._max_bytes:
                return out
            out.close()
        number = max((n for p, n, _ in self.files() if p == period), default=0) + 1
        for _ in range(10_000):  # bounded: another process may claim numbers meanwhile
            path = self.directory / f"{self._prefix}{period}-{number}.LOG"
            try:
                out = open(path, "x", encoding="utf-8", newline="")
            except FileExistsError:
                number += 1
                continue
            self._mine[period] = self._number = number
            text = self._header(now)
            out.write(text)
            self._size, self._rows = len(text.encode("utf-8")), 0
            return out
        raise OSError(f"no free file name for {self._prefix}{period} in {self.directory}")

    def period_end(self, period: str) -> float:
        """The end of a file name's period, UTC, in seconds."""
        start = datetime.strptime(period, self._format).replace(tzinfo=timezone.utc)
        return start.timestamp() + self._span

    def clean(self, now: float) -> list[Path]:
        """Remove the files whose period ended more than C{max_age} before C{now}."""
        removed = []
        for period in [p for p in self._mine if p < self._period]:
            del self._mine[period]  # not written again (rows come in time order)
        for period, _, path in self.files():
            if self.period_end(period) + self._max_age.total_seconds() < now:
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
        return removed

    def files(self) -> list[tuple[str, int, Path]]:
        """This log's files: (period, number, path), oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            m = self._name.match(name)
            if m:
                found.append((m.group(1), int(m.group(2)), self.directory / name))
        return sorted(found)


class BufferedWriter(Generic[_T]):
    """
    Items queued on the reactor thread (L{add}), handed in batches to
    C{write(items, now)} in a thread of their own (see the module's
    decisions).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        write: Callable[[list[_T], float], None],
        *,
        what: str,
        flush_every: float = 0.5,
        max_buffered: int = 100_000,
        run: Runner | None = None,
    ) -> None:
        """
        @param reactor: the clock of the flush timer; with
            L{IReactorFromThreads}, writes go to a thread of their own.
        @param write: the blocking write of one batch (in the writer).
        @param what: the log's name in the gateway's own log messages.
        @param run: where the blocking writes run instead (tests: inline).
        """
        self._clock = reactor
        self._write_batch = write
        self._what = what
        self._flush_every = flush_every
        self._max_buffered = max_buffered
        self._pool: ThreadPool | None = None
        if run is None and IReactorFromThreads.providedBy(reactor):
            pool = ThreadPool(minthreads=0, maxthreads=1, name=f"relaygw-{what}")
            self._pool = pool
            threads = cast(IReactorFromThreads, reactor)

            def in_thread(work: Callable[[], None]) -> Deferred[None]:
                return deferToThreadPool(threads, pool, work)

            run = in_thread
        self._run: Runner = run if run is not None else maybeDeferred
        self._pending: list[_T] = []
        self.dropped = 0
        self._timer: IDelayedCall | None = None
        self._writing: Deferred[None] | None = None

    @property
    def pending(self) -> int:
        """Items waiting for the writer."""
        return len(self._pending)

    def start(self) -> None:
        """Start the writer thread (if any)."""
        if self._pool is not None:
            self._pool.start()

    def add(self, item: _T) -> None:
        """Queue C{item} (reactor thread; cheap, never raises)."""
        if len(self._pending) >= self._max_buffered:
            self.dropped += 1
            return
        self._pending.append(item)
        if self._timer is None and self._writing is None:
            self._timer = self._clock.callLater(self._flush_every, self._flush)

    def run(self, work: Callable[[], None], count: int = 0) -> None:
        """Run blocking C{work} in the writer (after the write in flight)."""
        def failed(failure: Any) -> None:
            # Not a row of any log, so no loop comes of it.
            _log.error("cannot write the {what} ({count} rows lost): {problem}",
                       what=self._what, count=count, problem=str(failure.value))

        def done(_: object) -> None:
            if self._writing is d:
                self._writing = None
            if self.dropped:
                _log.warn("{what}: {count} rows dropped, the disk is too slow",
                          what=self._what, count=self.dropped)
                self.dropped = 0
            if self._pending and self._timer is None:
                self._timer = self._clock.callLater(self._flush_every, self._flush)

        previous = self._writing
        if previous is not None:
            # One write at a time: chain after the one in flight.
            d: Deferred[None] = Deferred()
            previous.addBoth(lambda _: self._run(work).chainDeferred(d))
        else:
            d = self._run(work)
        self._writing = d
        d.addErrback(failed)
        d.addBoth(done)

    def _flush(self) -> None:
        self._timer = None
        if self._writing is not None or not self._pending:
            return
        items, self._pending = self._pending, []
        now = self._clock.seconds()
        self.run(lambda: self._write_batch(items, now), count=len(items))

    def stop(self) -> Deferred[None]:
        """Write what is queued, then stop the writer thread."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for _ in range(3):  # the write in flight, then the rest
            while self._writing is not None:
                await self._writing
            self._flush()
        while self._writing is not None:
            await self._writing
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._pool is not None:
            self._pool.stop()
            self._pool = None


def read_csv_rows(paths: Sequence[Path], fields: Sequence[str]) -> Iterable[dict[str, str]]:
    """Every row of C{paths}, keyed by each file's C{#Fields} (else C{fields})."""
    import csv

    for path in paths:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            names = list(fields)
            for values in csv.reader(f):
                if not values:
                    continue
                if values[0].startswith("#"):
                    if values[0].startswith("#Fields:"):
                        names = [values[0][len("#Fields:"):].strip(), *values[1:]]
                    continue
                yield dict(zip(names, values))
