"""
The protocol logs (SPEC section 5), Exchange's C{SmtpReceive} and
C{SmtpSend} files.

Sessions write through a handle (L{relaygw.interfaces.IProtocolLogSession})
rather than through twisted.logger events: a row costs the session one
tuple append, where an event costs a dict, every observer and, for the
delivery process, a JSON round trip to the gateway.  The session asks for a
handle only for a C{protocol_logging = "verbose"} connector (receive) or
route (send), so without it the cost is one C{is None} test per line.

Decisions:
  - Files: C{<log_dir>/ProtocolLog/SmtpReceive/RECV<yyyymmddhh>-<n>.LOG} and
    C{.../SmtpSend/SEND<yyyymmddhh>-<n>.LOG}, hourly, UTC, of each row's
    time; C{max_bytes} (10 MB, Exchange's C{ReceiveProtocolLogMaxFileSize})
    per file, then the next C{-<n>}; files whose hour ended more than
    C{max_age} (30 days, Exchange's C{ReceiveProtocolLogMaxAge}) ago are
    removed at start and each hour (L{relaygw.ops._logfiles}).  Each process
    writes the log of what it does: the gateway (and each receiving worker)
    SmtpReceive, the delivery process SmtpSend (both, with inline delivery).
    A process writes only files it created: a writer takes the hour's next
    free C{-<n>} (C{O_EXCL}) at its first row of the hour, at the size cap
    and after a restart, so several processes never share a file.
  - Rows: C{date-time,connector-id,session-id,sequence-number,local-endpoint,
    remote-endpoint,event,data,context}.  The connector-id is the receive
    connector's or the route's name; sequence numbers count a session's
    rows from 0; a multi-line reply is one row per line, as Exchange writes
    it; IPv6 endpoints are bracketed.  Formatting, numbering and quoting all
    happen in the writer thread, which alone touches a handle's counters.
  - Secrets: the callers mask AUTH (C{AUTH PLAIN ****}, each client
    response C{****}) and never pass message data; nothing else of a
    session reaches this module.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Literal

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from relaygw import __version__
from relaygw.interfaces import IProtocolLog, IProtocolLogSession
from relaygw.ops._logfiles import (
    BufferedWriter,
    RotatingFiles,
    Runner,
    Stamps,
    csv_field,
    read_csv_rows,
    utc_stamp,
)

__all__ = ["FIELDS", "Kind", "ProtocolLog", "RECEIVE", "SEND", "protocol_dir", "read_rows"]

FIELDS = (
    "date-time", "connector-id", "session-id", "sequence-number", "local-endpoint",
    "remote-endpoint", "event", "data", "context",
)  # fmt: skip
FIELDS_LINE = "#Fields: " + ",".join(FIELDS)
#: Exchange 2013+'s log format version, which log readers check.
LOG_VERSION = "15.0.0.0"
#: A value longer than this is cut (command lines are at most 2,000 octets).
_MAX_VALUE = 4000


@frozen
class Kind:
    """One of the two logs: its directory, file prefix and C{#Log-type}."""

    directory: str
    prefix: str
    log_type: str


RECEIVE = Kind("SmtpReceive", "RECV", "SMTP Receive Protocol Log")
SEND = Kind("SmtpSend", "SEND", "SMTP Send Protocol Log")
_KINDS = {"receive": RECEIVE, "send": SEND}


def protocol_dir(log_dir: Path, kind: Kind) -> Path:
    """Where the files of C{kind} under C{log_dir} are."""
    return log_dir / "ProtocolLog" / kind.directory


def header(kind: Kind, now: float) -> str:
    """The header lines of a new file created at C{now}."""
    return (
        f"#Software: relaygw {__version__}\r\n#Version: {LOG_VERSION}\r\n"
        f"#Log-type: {kind.log_type}\r\n#Date: {utc_stamp(now)}\r\n{FIELDS_LINE}\r\n"
    )


def endpoint(host: str, port: int) -> str:
    """C{host:port}, IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: A queued row: time, handle, event, data, context.
_Row = tuple[float, "_Session", str, "bytes | str", str]


@implementer(IProtocolLogSession)
class _Session:
    """One session's handle; L{row} runs on the reactor thread."""

    __slots__ = ("session_id", "_head", "_tail", "_add", "_clock", "_next")

    def __init__(
        self, writer: BufferedWriter[_Row], clock: IReactorTime, connector: str,
        session_id: str, local: str, remote: str,
    ) -> None:
        self.session_id = session_id
        self._add = writer.add
        self._clock = clock
        # Only the writer thread reads these and counts.
        self._head = f"{csv_field(connector)},{csv_field(session_id)},"
        self._tail = f",{csv_field(local)},{csv_field(remote)},"
        self._next = 0

    def row(self, event: str, data: bytes | str = b"", context: str = "") -> None:
        self._add((self._clock.seconds(), self, event, data, context))

    def lines(self, stamp: str, event: str, data: bytes | str, context: str,
              out: list[str]) -> None:
        """Append the CSV lines of one queued row to C{out} (writer thread)."""
        text = data.decode("utf-8", "replace") if type(data) is bytes else str(data)
        ctx = csv_field(context) if context else ""
        if "\n" in text:
            parts = [p[:-1] if p.endswith("\r") else p for p in text.rstrip("\r\n").split("\n")]
        else:
            parts = [text]
        for part in parts:
            number = self._next
            self._next = number + 1
            out.append(f"{stamp},{self._head}{number}{self._tail}{event},"
                       f"{csv_field(part[:_MAX_VALUE])},{ctx}\r\n")


@implementer(IProtocolLog)
class ProtocolLog:
    """
    One protocol log: L{start} it, hand L{session} handles to sessions,
    L{stop} it (which writes what is queued).

    @ivar files: the files (rotation, clean-up).
    """

    def __init__(
        self,
        log_dir: Path,
        kind: Literal["receive", "send"],
        reactor: IReactorTime,
        *,
        max_bytes: int = 10 * 1024 * 1024,
        max_age: timedelta = timedelta(days=30),
        flush_every: float = 0.5,
        max_buffered: int = 100_000,
        run: Runner | None = None,
    ) -> None:
        """
        @param log_dir: C{gateway.log_dir}; the files go in its
            C{ProtocolLog/SmtpReceive} or C{ProtocolLog/SmtpSend}.
        @param reactor: the clock of rows, the flush timer and clean-up;
            with L{twisted.internet.interfaces.IReactorFromThreads}, writes
            go to a thread of their own.
        @param max_buffered: rows waiting for the writer beyond which new
            rows are dropped (and counted in a warning).
        @param run: where the blocking writes run instead (tests: inline).
        """
        self.kind = kind_ = _KINDS[kind]
        self.files = RotatingFiles(
            protocol_dir(log_dir, kind_), kind_.prefix, hourly=True,
            header=lambda now: header(kind_, now), max_bytes=max_bytes, max_age=max_age,
            exclusive=True,
        )
        self._clock = reactor
        self._writer: BufferedWriter[_Row] = BufferedWriter(
            reactor, self._write, what=f"protocol log {kind_.directory}",
            flush_every=flush_every, max_buffered=max_buffered, run=run,
        )
        self._stamps = Stamps()
        self._serial = itertools.count(1)
        self._boot = int(reactor.seconds())

    @property
    def writer(self) -> BufferedWriter[_Row]:
        """The queue and its writer (tests look at its counters)."""
        return self._writer

    def start(self) -> None:
        """Start the writer; remove old files (in the writer)."""
        self._writer.start()
        now = self._clock.seconds()

        def clean() -> None:
            self.files.clean(now)

        self._writer.run(clean)

    def stop(self) -> Deferred[None]:
        """Write what is queued and stop the writer."""
        return self._writer.stop()

    def session(
        self,
        connector: str,
        session_id: str | None,
        local: tuple[str, int],
        remote: tuple[str, int],
    ) -> IProtocolLogSession:
        """See L{IProtocolLog.session}."""
        if session_id is None:
            session_id = f"{self._boot:08X}{next(self._serial):08X}"
        return _Session(self._writer, self._clock, connector, session_id,
                        endpoint(*local), endpoint(*remote))

    def _write(self, rows: list[_Row], now: float) -> None:
        """Format and write one batch (writer thread)."""
        stamps = self._stamps
        out: list[tuple[float, str]] = []
        lines: list[str] = []
        for when, handle, event, data, context in rows:
            handle.lines(stamps(when), event, data, context, lines)
            if len(lines) == 1:
                out.append((when, lines[0]))
            else:
                out.extend([(when, line) for line in lines])
            lines.clear()
        self.files.write(out, now)


def read_rows(log_dir: Path, kind: Literal["receive", "send"]) -> Iterator[dict[str, str]]:
    """
    Every row of every file of one protocol log under C{log_dir}, oldest
    file first, keyed by the file's C{#Fields}.

    @raise OSError: a file cannot be read.
    """
    files = RotatingFiles(
        protocol_dir(log_dir, _KINDS[kind]), _KINDS[kind].prefix, hourly=True,
        header=lambda now: "", max_bytes=0, max_age=timedelta(0),
    )
    yield from read_csv_rows([path for _, _, path in files.files()], FIELDS)
