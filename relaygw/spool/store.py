"""
The durable directory spool (SPEC section 4; DESIGN habit 13: 250 means fsynced).

Layout under the spool root (directories mode 0700, files 0600)::

    queue/<id>.msg       message data
    queue/<id>.env       the envelope (versioned JSON); written last, so it is the commit marker
    queue/<id>.env.tmp   an envelope being written
    corrupt/             envelopes recovery could not use, with their data, for an operator

Both names of an entry live in one directory, so one directory fsync makes a
commit durable.

A writer keeps up to L{WRITE_BUFFER} octets in memory and creates its data
file only when a message outgrows that, so a small message costs the reactor
thread no file system call at all.  Commits are made durable in batches by
the spool's commit thread (L{relaygw.spool.commit}); the commit's Deferred
fires, and subscribers are told, on the reactor thread afterwards.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from relaygw._types import ISpoolReactor
from relaygw.interfaces import IMessageWriter, ISpool
from relaygw.spool.commit import CommitThread, PendingCommit, commit_batch, write_all
from relaygw.spool.envelope import Envelope
from relaygw.spool.ids import is_queue_id, new_queue_id

__all__ = ["DirectorySpool", "SpoolWriter", "WRITE_BUFFER"]

WRITE_BUFFER = 64 * 1024
"""Octets a writer holds in memory before it creates its data file and writes through."""

_DIR_MODE = 0o700
_FILE_MODE = 0o600
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

_MSG = ".msg"
_ENV = ".env"
_TMP = ".tmp"

_OPEN, _COMMITTING, _CLOSED = "open", "committing", "closed"


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, _OPEN_DIR)
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
class SpoolWriter:
    """
    One message being written: a bounded buffer, and a data file once the
    message outgrows it.

    @ivar queue_id: the reserved queue id.
    @ivar size: octets written so far.
    """

    def __init__(self, spool: DirectorySpool, queue_id: str) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._spool = spool
        self._fd = -1
        self._buffer = bytearray()
        self._state = _OPEN

    def write(self, data: bytes) -> None:
        """
        Append C{data}; at most L{WRITE_BUFFER} octets are held in memory.

        @raise OSError: the data file cannot be created or take it.
        @raise ValueError: the writer was already committed or aborted.
        """
        if self._state is not _OPEN:
            raise ValueError(f"spool entry {self.queue_id} is closed")
        n = len(data)
        if len(self._buffer) + n <= WRITE_BUFFER:
            self._buffer += data
            self.size += n
            return
        if self._fd < 0:
            self._fd = os.open(self._spool._file(self.queue_id, _MSG), _OPEN_NEW, _FILE_MODE)
        if self._buffer:
            write_all(self._fd, self._buffer)
            self._buffer = bytearray()
        if n >= WRITE_BUFFER:
            write_all(self._fd, data)
        else:
            self._buffer += data
        self.size += n

    def commit(self, envelope: object) -> Deferred[None]:
        """
        Hand the entry to the commit thread.

        @param envelope: the L{Envelope}; its C{id} must be L{queue_id}.
        @return: fires with C{None} once the entry is durable and the
            subscribers were told; fails with the L{OSError} otherwise
            (nothing committed, the entry's files removed).
        @raise ValueError: a closed writer, or an envelope for another id.
        """
        entry, checked = self._hand_over(envelope)
        waiting: Deferred[None] = Deferred()
        self._spool._waiting[entry] = (waiting, checked)
        try:
            self._spool._commits.submit(entry)
        except RuntimeError as e:
            del self._spool._waiting[entry]
            entry.discard()
            self._state = _CLOSED
            return fail(OSError(errno.ESHUTDOWN, str(e)))
        return waiting

    def commit_now(self, envelope: object) -> None:
        """
        L{commit} on the calling thread, blocking until the entry is durable
        (for tools and tests; the receive path uses L{commit}).

        @raise OSError: nothing was committed; the entry's files are removed.
        @raise ValueError: as for L{commit}.
        """
        entry, checked = self._hand_over(envelope)
        [error] = commit_batch([entry], self._spool._directory_fd())
        self._state = _CLOSED
        if error is not None:
            raise error
        self._spool._committed(checked)

    def abort(self) -> None:
        """
        Close and remove the data file.  Idempotent; never raises.  Does
        nothing once L{commit} was called: that entry is committed or
        removed by the commit itself.
        """
        if self._state is not _OPEN:
            return
        self._state = _CLOSED
        self._buffer = bytearray()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError:
                pass
            _unlink_quietly(self._spool._file(self.queue_id, _MSG))

    def _hand_over(self, envelope: object) -> tuple[PendingCommit, Envelope]:
        if self._state is not _OPEN:
            raise ValueError(f"spool entry {self.queue_id} is closed")
        if not isinstance(envelope, Envelope) or envelope.id != self.queue_id:
            raise ValueError(f"commit of spool entry {self.queue_id} needs its own Envelope")
        self._state = _COMMITTING
        entry = PendingCommit(
            self.queue_id, self._spool._prefix, self._fd, self._buffer, envelope.to_json()
        )
        self._fd = -1
        self._buffer = bytearray()
        return entry, envelope


@implementer(ISpool)
class DirectorySpool:
    """
    A spool in a directory; see the module docstring for the layout.

    Use it from the reactor thread.  Commits run on the spool's own thread;
    L{close} stops it.
    """

    _log = Logger()

    def __init__(self, root: Path, reactor: ISpoolReactor) -> None:
        """
        Create C{root} and C{root/queue} when missing.

        @param root: the spool directory.
        @param reactor: gives the time for new queue ids, and takes commit
            results from the commit thread (C{callFromThread}).
        @raise OSError: the directories cannot be created.
        """
        self._root = Path(root)
        self._queue = self._root / "queue"
        # str paths on the hot path: pathlib costs about 30 us a commit.
        self._queue_dir = str(self._queue)
        self._prefix = self._queue_dir + os.sep
        self._corrupt = self._root / "corrupt"
        self._reactor = reactor
        self._subscribers: list[Callable[[Envelope], object]] = []
        _make_dir(self._root)
        if _make_dir(self._queue):
            _fsync_dir(self._root)
        self._dir_fd = os.open(self._queue_dir, _OPEN_DIR)
        self._commits = CommitThread(reactor, self._directory_fd, self._deliver)
        self._waiting: dict[PendingCommit, tuple[Deferred[None], Envelope]] = {}

    def close(self) -> Deferred[None]:
        """
        Take no more commits, finish the pending ones (their Deferreds fire
        first), stop the commit thread and close the queue directory.
        Idempotent.  L{update}, L{remove}, L{load} and the other
        synchronous methods keep working afterwards.

        @return: fires when all of that is done.
        """
        done = self._commits.stop()

        def close_dir(result: None) -> None:
            fd, self._dir_fd = self._dir_fd, -1
            if fd >= 0:
                os.close(fd)

        return done.addCallback(close_dir)

    @property
    def root(self) -> Path:
        """The spool directory."""
        return self._root

    def begin(self) -> IMessageWriter:
        """
        Reserve a queue id.  No file is created until the message outgrows
        L{WRITE_BUFFER} or is committed; an id clash with a file already on
        disk (possible only after the clock stepped back across a restart
        with the same process tag) fails that write or commit with
        C{EEXIST} and never touches the old file.

        @raise OSError: the spool is closed.
        """
        if self._commits.stopping:
            raise OSError(errno.ESHUTDOWN, "the spool is closed")
        return SpoolWriter(self, new_queue_id(self._reactor.seconds()))

    def subscribe(self, callback: object) -> None:
        """
        Call C{callback(envelope)} on the reactor thread after every commit
        is durable, before its Deferred fires.  An exception it raises is
        logged and goes no further.
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
            os.fsync(self._directory_fd())
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
                write_all(fd, envelope.to_json())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        except OSError:
            _unlink_quietly(temp)
            raise
        os.fsync(self._directory_fd())

    def _directory_fd(self) -> int:
        if self._dir_fd < 0:  # closed: reopen for the synchronous methods
            self._dir_fd = os.open(self._queue_dir, _OPEN_DIR)
        return self._dir_fd

    def _deliver(self, batch: list[PendingCommit], errors: list[OSError | None]) -> None:
        for entry, error in zip(batch, errors):
            waiting, envelope = self._waiting.pop(entry)
            if error is None:
                self._committed(envelope)
                waiting.callback(None)
            else:
                waiting.errback(error)

    def _committed(self, envelope: Envelope) -> None:
        for callback in list(self._subscribers):
            try:
                callback(envelope)
            except Exception:
                self._log.failure(
                    "Spool: commit subscriber failed for {queue_id}", queue_id=envelope.id
                )
