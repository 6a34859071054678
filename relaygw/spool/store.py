"""
The durable directory spool (SPEC section 4; DESIGN habit 13: 250 means fsynced).

Layout under the spool root (directories mode 0700, files 0600)::

    queue/<id>.msg       message data
    queue/<id>.env       the envelope (versioned JSON); written last, so it is the commit marker
    queue/<id>.env.tmp   an envelope being written
    corrupt/             envelopes recovery could not use, with their data, for an operator

Both names of an entry live in one directory, so one directory fsync makes a
commit durable.  A commit costs one open, buffered writes, an fsync of the data,
an fsync of the envelope and an fsync of the directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relaygw.interfaces import IMessageWriter, ISpool
from relaygw.spool.envelope import Envelope
from relaygw.spool.ids import is_queue_id, new_queue_id

__all__ = ["DirectorySpool", "WRITE_BUFFER"]

WRITE_BUFFER = 64 * 1024
"""Octets a writer holds before it writes them to its data file."""

_DIR_MODE = 0o700
_FILE_MODE = 0o600
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

_MSG = ".msg"
_ENV = ".env"
_TMP = ".tmp"


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _make_dir(path: Path) -> bool:
    """Create C{path} (mode 0700) if missing; return whether it was created."""
    try:
        path.mkdir(mode=_DIR_MODE)
    except FileExistsError:
        return False
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=_DIR_MODE)
    return True


@implementer(IMessageWriter)
class _Writer:
    """
    One message being written: an open data file and a bounded buffer.

    @ivar queue_id: the reserved queue id.
    @ivar size: octets written so far.
    """

    def __init__(self, spool: DirectorySpool, queue_id: str, fd: int) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._spool = spool
        self._fd = fd
        self._buffer = bytearray()
        self._done = False

    def write(self, data: bytes) -> None:
        """
        Append C{data}; at most L{WRITE_BUFFER} octets are held in memory.

        @raise OSError: the data file cannot take it.
        @raise ValueError: the writer was already committed or aborted.
        """
        if self._done:
            raise ValueError(f"spool entry {self.queue_id} is closed")
        if len(self._buffer) + len(data) > WRITE_BUFFER:
            self._flush()
            if len(data) >= WRITE_BUFFER:
                _write_all(self._fd, data)
                self.size += len(data)
                return
        self._buffer += data
        self.size += len(data)

    def commit(self, envelope: object) -> None:
        """
        Make the entry durable, then tell the spool's subscribers.

        @param envelope: the L{Envelope}; its C{id} must be L{queue_id}.
        @raise OSError: nothing was committed; the entry's files are removed.
        @raise ValueError: a closed writer, or an envelope for another id.
        """
        if self._done:
            raise ValueError(f"spool entry {self.queue_id} is closed")
        if not isinstance(envelope, Envelope) or envelope.id != self.queue_id:
            raise ValueError(f"commit of spool entry {self.queue_id} needs its own Envelope")
        try:
            self._flush()
            os.fsync(self._fd)
            fd, self._fd = self._fd, -1
            os.close(fd)
            self._spool._write_envelope(envelope)
        except OSError:
            self._discard(envelope_too=True)
            raise
        self._done = True
        self._spool._committed(envelope)

    def abort(self) -> None:
        """Close and remove the data file.  Idempotent; never raises."""
        if not self._done:
            self._discard(envelope_too=False)

    def _flush(self) -> None:
        if self._buffer:
            _write_all(self._fd, self._buffer)
            self._buffer = bytearray()

    def _discard(self, envelope_too: bool) -> None:
        self._done = True
        self._buffer = bytearray()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError:
                pass
        self._spool._discard(self.queue_id, envelope_too)


@implementer(ISpool)
class DirectorySpool:
    """
    A spool in a directory; see the module docstring for the layout.

    Not thread-safe: use it from the reactor thread.
    """

    _log = Logger()

    def __init__(self, root: Path, clock: IReactorTime) -> None:
        """
        Create C{root} and C{root/queue} when missing.

        @param root: the spool directory.
        @param clock: gives the time for new queue ids.
        @raise OSError: the directories cannot be created.
        """
        self._root = Path(root)
        self._queue = self._root / "queue"
        # str paths on the hot path: pathlib costs about 30 us a commit.
        self._queue_dir = str(self._queue)
        self._prefix = self._queue_dir + os.sep
        self._corrupt = self._root / "corrupt"
        self._clock = clock
        self._subscribers: list[Callable[[Envelope], object]] = []
        _make_dir(self._root)
        if _make_dir(self._queue):
            _fsync_dir(self._root)

    @property
    def root(self) -> Path:
        """The spool directory."""
        return self._root

    def begin(self) -> IMessageWriter:
        """
        Reserve a queue id and open its data file.

        @raise OSError: the spool is not writable.
        """
        while True:
            queue_id = new_queue_id(self._clock.seconds())
            try:
                fd = os.open(self._prefix + queue_id + _MSG, _OPEN_NEW, _FILE_MODE)
            except FileExistsError:  # an id from before a clock step back; take the next
                continue
            return _Writer(self, queue_id, fd)

    def subscribe(self, callback: object) -> None:
        """
        Call C{callback(envelope)} after every commit.  An exception it raises
        is logged and goes no further.
        """
        if not callable(callback):
            raise TypeError("spool subscriber must be callable")
        self._subscribers.append(callback)

    def load(self, queue_id: str) -> Envelope:
        """
        @return: the envelope of a committed entry.
        @raise KeyError: no such entry.
        @raise ValueError: its envelope cannot be parsed.
        """
        try:
            with open(self._file(queue_id, _ENV), "rb") as f:
                return Envelope.from_json(f.read())
        except FileNotFoundError:
            raise KeyError(queue_id) from None

    def data_path(self, queue_id: str) -> Path:
        """
        @return: the path of the entry's message data (read-only use).
        @raise KeyError: C{queue_id} is not a queue id.
        """
        return Path(self._file(queue_id, _MSG))

    def update(self, envelope: object) -> None:
        """
        Atomically replace an entry's envelope (temp file, fsync, rename, fsync
        of the directory).

        @raise KeyError: no such entry.
        @raise OSError: the envelope could not be written, or its rename may not
            be durable; the entry keeps the old or the new envelope, never a
            partial one.
        """
        if not isinstance(envelope, Envelope):
            raise TypeError("spool update needs an Envelope")
        if not os.path.exists(self._file(envelope.id, _ENV)):
            raise KeyError(envelope.id)
        self._write_envelope(envelope)

    def remove(self, queue_id: str) -> None:
        """
        Delete an entry, envelope first, then data.  Idempotent.  Not fsynced:
        an entry that a crash brings back is delivered again (at least once).
        """
        for suffix in (_ENV, _ENV + _TMP, _MSG):
            try:
                os.unlink(self._file(queue_id, suffix))
            except FileNotFoundError:
                pass

    # ISpool says list[object]; list is invariant, and callers want Envelopes.
    def recover(self) -> list[Envelope]:  # type: ignore[override]
        """
        Clean up after a crash: delete temporary files and data without an
        envelope (partial entries); move envelopes without data, or that cannot
        be read, with any data, into C{corrupt/}.

        @return: the envelopes of the committed entries, oldest first
            (C{received_at}, then id).
        """
        names = {entry.name for entry in os.scandir(self._queue)}
        envelopes: list[Envelope] = []
        changed = False
        for name in sorted(names):
            path = self._queue / name
            if name.endswith(_TMP):
                self._log.info("Spool: removing temporary file {name}", name=name)
                _unlink_quietly(path)
                changed = True
            elif name.endswith(_MSG):
                if name[: -len(_MSG)] + _ENV not in names:
                    self._log.warn(
                        "Spool: removing partial entry {queue_id} (no envelope)",
                        queue_id=name[: -len(_MSG)],
                    )
                    _unlink_quietly(path)
                    changed = True
            elif name.endswith(_ENV):
                queue_id = name[: -len(_ENV)]
                problem = self._check(queue_id, path, names)
                if isinstance(problem, Envelope):
                    envelopes.append(problem)
                else:
                    self._quarantine(queue_id, problem)
                    changed = True
            else:
                self._log.warn("Spool: ignoring unknown file {name}", name=name)
        if changed:
            _fsync_dir(self._queue)
        envelopes.sort(key=lambda e: (e.received_at, e.id))
        return envelopes

    def entries(self) -> list[Envelope]:  # type: ignore[override]
        """
        The envelopes of the committed entries, oldest first, changing
        nothing: for the delivery process, which shares the spool with a
        receiving process that may be writing entries right now.  Entries
        that cannot be read are logged and left for L{recover}.
        """
        names = {entry.name for entry in os.scandir(self._queue)}
        envelopes: list[Envelope] = []
        for name in names:
            if name.endswith(_ENV):
                queue_id = name[: -len(_ENV)]
                found = self._check(queue_id, self._queue / name, names)
                if isinstance(found, Envelope):
                    envelopes.append(found)
                else:
                    self._log.warn(
                        "Spool: skipping entry {queue_id}: {problem}",
                        queue_id=queue_id,
                        problem=found,
                    )
        envelopes.sort(key=lambda e: (e.received_at, e.id))
        return envelopes

    def _check(self, queue_id: str, path: Path, names: set[str]) -> Envelope | str:
        if not is_queue_id(queue_id):
            return "the file name is not a queue id"
        if queue_id + _MSG not in names:
            return "its data file is missing"
        try:
            envelope = Envelope.from_json(path.read_bytes())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            return f"its envelope cannot be read: {e}"
        if envelope.id != queue_id:
            return f"its envelope names another id {envelope.id!r}"
        return envelope

    def _quarantine(self, queue_id: str, problem: str) -> None:
        self._log.error(
            "Spool: entry {queue_id} is unusable ({problem}); moving it to {corrupt_dir}",
            queue_id=queue_id,
            problem=problem,
            corrupt_dir=str(self._corrupt),
        )
        _make_dir(self._corrupt)
        for suffix in (_ENV, _MSG):
            try:
                os.replace(self._queue / (queue_id + suffix), self._corrupt / (queue_id + suffix))
            except FileNotFoundError:
                pass
        _fsync_dir(self._corrupt)

    def _file(self, queue_id: str, suffix: str) -> str:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        return self._prefix + queue_id + suffix

    def _write_envelope(self, envelope: Envelope) -> None:
        final = self._file(envelope.id, _ENV)
        temp = final + _TMP
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, _FILE_MODE)
            try:
                _write_all(fd, envelope.to_json())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        except OSError:
            _unlink_quietly(temp)
            raise
        _fsync_dir(self._queue_dir)

    def _discard(self, queue_id: str, envelope_too: bool) -> None:
        # After a failed directory fsync the envelope may already be in place:
        # remove it first so a crash never leaves data behind a marker.
        suffixes = (_ENV, _ENV + _TMP, _MSG) if envelope_too else (_MSG,)
        for suffix in suffixes:
            _unlink_quietly(self._file(queue_id, suffix))

    def _committed(self, envelope: Envelope) -> None:
        for callback in list(self._subscribers):
            try:
                callback(envelope)
            except Exception:
                self._log.failure(
                    "Spool: commit subscriber failed for {queue_id}", queue_id=envelope.id
                )
