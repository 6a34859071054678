"""
The durable directory spool (SPEC section 4; DESIGN habit 13: 250 means fsynced).

Layout under the spool root (directories mode 0700, files 0600)::

    queue/<id>.msg       a committed entry: message data, envelope (versioned
                         JSON), trailer (L{relaygw.spool.entry})
    queue/<id>.tmp       an entry being written; renamed to <id>.msg once
                         fsynced, so that rename is the commit marker
    queue/<id>.upd       the envelope as the delivery side last updated it;
                         it supersedes the one inside <id>.msg
    queue/<id>.upd.tmp   an update being written
    corrupt/             entries recovery could not use, for an operator

All names of an entry live in one directory, so one directory fsync makes a
commit durable.  Writers (L{relaygw.spool.writer}) buffer small messages in
memory; commits are made durable in batches by the spool's commit thread
(L{relaygw.spool.commit}); the commit's Deferred fires, and subscribers are
told, on the reactor thread afterwards.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from relaygw._types import ISpoolReactor
from relaygw.interfaces import IMessageWriter, ISpool
from relaygw.spool.commit import (
    ENTRY,
    TEMPORARY,
    CommitThread,
    PendingCommit,
    commit_batch,
    replace_durably,
)
from relaygw.spool.entry import open_data, read_envelope
from relaygw.spool.envelope import Envelope
from relaygw.spool.ids import ID_LENGTH, is_queue_id, new_queue_id, pid_tag
from relaygw.spool.writer import WRITE_BUFFER, SpoolWriter

__all__ = ["DirectorySpool", "SpoolWriter", "WRITE_BUFFER"]

_DIR_MODE = 0o700
_FILE_MODE = 0o600
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

_UPDATE = ".upd"
_OLD_ENVELOPE = ".env"


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


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
        self.prefix = self._queue_dir + os.sep
        self._corrupt = self._root / "corrupt"
        self._reactor = reactor
        self._subscribers: list[Callable[[Envelope], object]] = []
        _make_dir(self._root)
        if _make_dir(self._queue):
            _fsync_dir(self._root)
        self._dir_fd = os.open(self._queue_dir, _OPEN_DIR)
        self._commits = CommitThread(reactor, self._directory_fd, self._deliver)
        self._waiting: dict[PendingCommit, tuple[Deferred[None], Envelope]] = {}
        # queue id -> whether it has an update file, for entries this spool
        # loaded or updated: only the one delivering process writes updates.
        self._updated: dict[str, bool] = {}

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
        @return: the envelope of a committed entry: its last L{update}, else
            the one it was committed with.
        @raise KeyError: no such entry.
        @raise ValueError: its envelope cannot be parsed, or its file is not
            a complete entry.
        """
        entry = self._file(queue_id, ENTRY)
        update = self._read_update(queue_id)
        self._updated[queue_id] = update is not None
        try:
            if update is None:
                return Envelope.from_json(read_envelope(entry))
            os.stat(entry)
        except FileNotFoundError:
            self._updated.pop(queue_id, None)
            raise KeyError(queue_id) from None
        return Envelope.from_json(update)

    def open_data(self, queue_id: str) -> BinaryIO:
        """
        @return: a new seekable binary file reading exactly the message data
            of a committed entry (it ends where the data ends); the caller
            closes it.
        @raise KeyError: no such entry.
        @raise ValueError: its file is not a complete entry.
        @raise OSError: it cannot be read.
        """
        try:
            return open_data(self._file(queue_id, ENTRY))
        except FileNotFoundError:
            raise KeyError(queue_id) from None

    def update(self, envelope: object) -> None:
        """
        Atomically replace an entry's envelope: write C{<id>.upd} (temp
        file, fsync, rename, fsync of the directory), which supersedes the
        envelope inside the entry file.

        @raise KeyError: no such entry.
        @raise OSError: the envelope could not be written, or its rename may not
            be durable; the entry keeps the old or the new envelope, never a
            partial one.
        """
        if not isinstance(envelope, Envelope):
            raise TypeError("spool update needs an Envelope")
        if not os.path.exists(self._file(envelope.id, ENTRY)):
            raise KeyError(envelope.id)
        self._updated[envelope.id] = True
        replace_durably(self._file(envelope.id, _UPDATE), envelope.to_json(), _FILE_MODE)
        os.fsync(self._directory_fd())

    def remove(self, queue_id: str) -> None:
        """
        Delete an entry: its file, then its update if it may have one (one
        this spool loaded or wrote, or any it knows nothing about).
        Idempotent.  Not fsynced: an entry that a crash brings back is
        delivered again (at least once); an update left without its entry is
        removed by L{recover}.
        """
        entry = self._file(queue_id, ENTRY)
        updated = self._updated.pop(queue_id, None)
        try:
            os.unlink(entry)
        except FileNotFoundError:
            pass
        if updated is not False:
            try:
                os.unlink(self._file(queue_id, _UPDATE))
            except FileNotFoundError:
                pass

    # ISpool says list[object]; list is invariant, and callers want Envelopes.
    def recover(self) -> list[Envelope]:  # type: ignore[override]
        """
        Clean up after a crash (L{clean}) and list the committed entries.

        @return: their envelopes, oldest first (C{received_at}, then id).
        """
        envelopes = list(self._scan(clean=True))
        envelopes.sort(key=lambda e: (e.received_at, e.id))
        return envelopes

    def remove_partials_of(self, pid: int, live: set[int]) -> int:
        """
        Remove the partial entries (C{<id>.tmp}) of a receiving process that
        died (kill -9 mid-DATA): their ids carry its L{pid_tag}.  Nothing is
        removed if a process in C{live}, or a new process with C{pid}, could
        own ids with that tag: never a file of a live process.

        @return: the number of files removed.
        """
        tag = pid_tag(pid)
        if any(pid_tag(p) == tag for p in live if p != pid) or _alive(pid):
            return 0
        removed = 0
        for entry in os.scandir(self._queue):
            queue_id = entry.name[: -len(TEMPORARY)]
            if (entry.name.endswith(TEMPORARY) and is_queue_id(queue_id)
                    and queue_id[ID_LENGTH - 7: ID_LENGTH - 3] == tag):
                _unlink_quietly(entry.path)
                removed += 1
        if removed:
            self._log.warn("Spool: removed {count} partial entries of ended process {pid}",
                           count=removed, pid=pid)
        return removed

    def remove_partial_updates(self) -> int:
        """
        Remove the updates being written (C{<id>.upd.tmp}) that a delivery
        process killed mid-update left.  Their names say nothing of their
        writer, so call this only holding the delivery lock
        (L{relaygw.spool.control.SpoolLock}) and before any L{update}: the
        lock's holder is the one process that writes updates, so none of
        them is live then.

        @return: the number of files removed.
        """
        suffix = _UPDATE + TEMPORARY
        removed = 0
        for entry in os.scandir(self._queue):
            if entry.name.endswith(suffix) and is_queue_id(entry.name[: -len(suffix)]):
                _unlink_quietly(entry.path)
                removed += 1
        if removed:
            self._log.warn("Spool: removed {count} partial updates of an ended delivery process",
                           count=removed)
        return removed

    def clean(self) -> int:
        """
        Clean up after a crash: delete temporary files (entries and updates
        being written) and updates whose entry is gone; move entries that
        cannot be read, with their updates, and envelope files of the older
        two-file layout into C{corrupt/}.  Streams: no envelope is kept, so
        a spool of any size recovers in constant memory.

        @return: the number of committed entries.
        """
        return sum(1 for _ in self._scan(clean=True))

    def entries(self) -> list[Envelope]:  # type: ignore[override]
        """
        The envelopes of the committed entries, oldest first, changing
        nothing (L{iter_entries}, sorted).
        """
        envelopes = list(self.iter_entries())
        envelopes.sort(key=lambda e: (e.received_at, e.id))
        return envelopes

    def iter_entries(self) -> Iterator[Envelope]:
        """
        The envelopes of the committed entries, one at a time, in no order,
        changing nothing: for the delivery process, which shares the spool
        with a receiving process that may be writing entries right now.
        Entries that cannot be read are logged and left for L{clean}.
        """
        return self._scan(clean=False)

    def _scan(self, *, clean: bool) -> Iterator[Envelope]:
        # The names only (about 100 bytes each): the envelopes are read and
        # handed on one at a time.
        names = {entry.name for entry in os.scandir(self._queue)}
        changed = False
        for name in sorted(names) if clean else names:
            queue_id = name.partition(".")[0]
            if name.endswith(ENTRY):
                found = self._check(queue_id, names)
                if isinstance(found, Envelope):
                    yield found
                elif clean:
                    self._quarantine(queue_id, found, (ENTRY, _UPDATE))
                    changed = True
                else:
                    self._log.warn(
                        "Spool: skipping entry {queue_id}: {problem}",
                        queue_id=queue_id,
                        problem=found,
                    )
            elif not clean:
                continue
            elif name == queue_id + TEMPORARY:
                self._log.warn(
                    "Spool: removing partial entry {queue_id} (its commit never finished)",
                    queue_id=queue_id,
                )
                _unlink_quietly(self._queue / name)
                changed = True
            elif name.endswith(TEMPORARY):
                self._log.info("Spool: removing temporary file {name}", name=name)
                _unlink_quietly(self._queue / name)
                changed = True
            elif name.endswith(_UPDATE):
                if queue_id + ENTRY not in names:
                    self._log.info("Spool: removing update {name} of a removed entry", name=name)
                    _unlink_quietly(self._queue / name)
                    changed = True
            elif name.endswith(_OLD_ENVELOPE):
                problem = "an envelope file of the older two-file spool layout"
                self._quarantine(queue_id, problem, (_OLD_ENVELOPE,))
                changed = True
            else:
                self._log.warn("Spool: ignoring unknown file {name}", name=name)
        if changed:
            os.fsync(self._directory_fd())

    def _read_update(self, queue_id: str) -> bytes | None:
        """The entry's update file's content; C{None} when it has none."""
        try:
            with open(self._file(queue_id, _UPDATE), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _check(self, queue_id: str, names: set[str]) -> Envelope | str:
        if not is_queue_id(queue_id):
            return "the file name is not a queue id"
        try:
            raw = read_envelope(self._file(queue_id, ENTRY))
            update = self._read_update(queue_id) if queue_id + _UPDATE in names else None
            envelope = Envelope.from_json(raw if update is None else update)
        except FileNotFoundError:
            return "its file is gone"
        except (OSError, ValueError, UnicodeDecodeError) as e:
            return f"its envelope cannot be read: {e}"
        if envelope.id != queue_id:
            return f"its envelope names another id {envelope.id!r}"
        return envelope

    def _quarantine(self, queue_id: str, problem: str, suffixes: tuple[str, ...]) -> None:
        self._log.error(
            "Spool: entry {queue_id} is unusable ({problem}); moving it to {corrupt_dir}",
            queue_id=queue_id,
            problem=problem,
            corrupt_dir=str(self._corrupt),
        )
        _make_dir(self._corrupt)
        for suffix in suffixes:
            try:
                os.replace(self._queue / (queue_id + suffix), self._corrupt / (queue_id + suffix))
            except FileNotFoundError:
                pass
        _fsync_dir(self._corrupt)

    def _file(self, queue_id: str, suffix: str) -> str:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        return self.prefix + queue_id + suffix

    def _directory_fd(self) -> int:
        if self._dir_fd < 0:  # closed: reopen for the synchronous methods
            self._dir_fd = os.open(self._queue_dir, _OPEN_DIR)
        return self._dir_fd

    def submit(self, entry: PendingCommit, envelope: Envelope) -> Deferred[None]:
        """L{Committer.submit}: queue C{entry} on the commit thread."""
        waiting: Deferred[None] = Deferred()
        self._waiting[entry] = (waiting, envelope)
        try:
            self._commits.submit(entry)
        except RuntimeError as e:
            del self._waiting[entry]
            entry.discard()
            return fail(OSError(errno.ESHUTDOWN, str(e)))
        return waiting

    def commit_now(self, entry: PendingCommit, envelope: Envelope) -> None:
        """L{Committer.commit_now}: commit C{entry} on this thread."""
        [error] = commit_batch([entry], self._directory_fd())
        if error is not None:
            raise error
        self._committed(envelope)

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
