"""
Group commit for the directory spool (SPEC section 4; DESIGN habit 13).

A commit is a handful of blocking file system calls (maybe a create, the
writes, an fsync, a rename, a directory fsync): milliseconds of waiting on
this kind of disk, which must not happen on the reactor thread.  One
L{CommitThread} per spool takes every commit pending when it becomes free
and makes the whole batch durable together (L{commit_batch}): files of all
entries first, then their fsyncs, then their renames, then one directory
fsync.  On ext4 the first fsync's journal commit carries most of the others,
so a batch of ten costs little more than a batch of one.

An entry is written as C{<id>.tmp} (data, envelope, trailer: see
L{relaygw.spool.entry}) and renamed to C{<id>.msg} once fsynced: that
rename is the commit marker.

L{commit_batch} is plain blocking code, also used synchronously by
L{relaygw.spool.writer.SpoolWriter.commit_now}.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads

from relaygw.spool.entry import trailer

__all__ = ["CommitThread", "PendingCommit", "commit_batch", "write_all"]

_FILE_MODE = 0o600
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
ENTRY = ".msg"
"""The suffix of a committed entry file."""
TEMPORARY = ".tmp"
"""The suffix of an entry file being written."""


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of C{data} to C{fd} (os.write may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def replace_durably(path: str, data: bytes, mode: int = _FILE_MODE) -> None:
    """
    Replace C{path} with C{data} atomically: write C{path + TEMPORARY},
    fsync it, rename it over C{path}.  Fsyncing the directory is the
    caller's (it may batch several).

    @raise OSError: nothing was replaced; the temporary file is removed.
    """
    temp = path + TEMPORARY
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError:
        _unlink_quietly(temp)
        raise


class PendingCommit:
    """
    One entry on its way to durability: its file (open, or still to be
    created), buffered data still to be written, and its serialised envelope.

    @ivar queue_id: the entry's id.
    """

    __slots__ = ("queue_id", "_temp_path", "_path", "_fd", "_created", "_rest", "_published")

    def __init__(
        self,
        queue_id: str,
        prefix: str,
        data_fd: int,
        buffer: bytes | bytearray,
        envelope: bytes,
    ) -> None:
        """
        @param prefix: the queue directory and a separator; the file is
            C{prefix + queue_id + ".tmp"}, renamed to C{".msg"} at publish.
        @param data_fd: the open temporary file holding the data written so
            far, or -1 when it is still to be created (then C{buffer} is the
            whole message).
        @param buffer: data still to be written.
        @param envelope: the envelope's JSON.
        """
        self.queue_id = queue_id
        self._temp_path = prefix + queue_id + TEMPORARY
        self._path = prefix + queue_id + ENTRY
        self._fd = data_fd
        self._created = data_fd >= 0
        # One write for a small message: data, envelope and trailer together.
        self._rest = b"".join((buffer, envelope, trailer(len(envelope))))
        self._published = False

    def write_files(self) -> None:
        """Create the temporary file if needed; write the rest of the data, the envelope and the trailer."""
        if self._fd < 0:
            self._fd = os.open(self._temp_path, _OPEN_NEW, _FILE_MODE)
            self._created = True
        write_all(self._fd, self._rest)
        self._rest = b""

    def sync(self) -> None:
        """fsync the file, then close it."""
        try:
            os.fsync(self._fd)
        finally:
            self._close()

    def publish(self) -> None:
        """
        Rename the file to its entry name: the commit marker.

        @raise FileExistsError: an entry of that name exists (an id clash);
            it is left alone.
        """
        try:
            os.stat(self._path)
        except FileNotFoundError:
            pass
        else:
            raise FileExistsError(errno.EEXIST, "spool entry exists", self._path)
        os.replace(self._temp_path, self._path)
        self._published = True

    def discard(self) -> None:
        """
        Close and remove what this commit wrote.  A file this commit did not
        create (another entry's, after an id clash) is left alone.  Never
        raises.
        """
        self._close()
        self._rest = b""
        if self._published:
            _unlink_quietly(self._path)
        elif self._created:
            _unlink_quietly(self._temp_path)

    def _close(self) -> None:
        if self._fd >= 0:
            _close_quietly(self._fd)
        self._fd = -1


def commit_batch(batch: Sequence[PendingCommit], directory_fd: int) -> list[OSError | None]:
    """
    Make every entry of C{batch} durable, blocking: write all, fsync all,
    rename all, then fsync the directory once.

    @param directory_fd: an open descriptor of the queue directory.
    @return: per entry, C{None} when it is durable, else the L{OSError}
        that stopped it (its file is removed).  A failed directory fsync
        fails every entry still live (their files are removed).
    """
    errors: list[OSError | None] = [None] * len(batch)
    for step in (PendingCommit.write_files, PendingCommit.sync, PendingCommit.publish):
        for i, entry in enumerate(batch):
            if errors[i] is None:
                try:
                    step(entry)
                except OSError as e:
                    errors[i] = e
                    entry.discard()
    live = [i for i, error in enumerate(errors) if error is None]
    if live:
        try:
            os.fsync(directory_fd)
        except OSError as e:
            for i in live:
                batch[i].discard()
                errors[i] = e
    return errors


Deliver = Callable[[list[PendingCommit], list[OSError | None]], None]


class CommitThread:
    """
    The spool's one committing thread, started at the first commit.

    Results go back to the reactor thread with
    L{IReactorFromThreads.callFromThread}, one call per batch.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        directory_fd: Callable[[], int],
        deliver: Deliver,
    ) -> None:
        """
        @param directory_fd: gives the queue directory's open descriptor.
        @param deliver: called on the reactor thread with each batch and its
            results (as L{commit_batch} returns them).
        """
        self._reactor = reactor
        self._directory_fd = directory_fd
        self._deliver = deliver
        self._lock = threading.Condition(threading.Lock())
        self._pending: list[PendingCommit] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped: Deferred[None] = Deferred()

    @property
    def stopping(self) -> bool:
        """Whether L{stop} was called."""
        return self._stopping

    def submit(self, entry: PendingCommit) -> None:
        """
        Queue C{entry} for the next batch.

        @raise RuntimeError: the thread was stopped.
        """
        with self._lock:
            if self._stopping:
                raise RuntimeError("the spool is closed")
            self._pending.append(entry)
            if self._thread is None:
                # A daemon: a process that never calls stop() must still exit;
                # whatever was pending then was never acknowledged.
                self._thread = threading.Thread(
                    target=self._run, name="relaygw-spool-commit", daemon=True
                )
                self._thread.start()
            else:
                self._lock.notify()

    def stop(self) -> Deferred[None]:
        """
        Take no more commits; finish the pending ones.

        @return: fires once every pending commit's result was delivered.
        """
        with self._lock:
            already, self._stopping = self._stopping, True
            running = self._thread is not None
            self._lock.notify()
        if not running and not already:
            self._stopped.callback(None)
        stopped: Deferred[None] = Deferred()

        def tell(result: object) -> object:
            stopped.callback(None)
            return result

        self._stopped.addBoth(tell)
        return stopped

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stopping:
                    self._lock.wait()
                batch, self._pending = self._pending, []
            if not batch:
                self._reactor.callFromThread(self._stopped.callback, None)
                return
            try:
                errors = commit_batch(batch, self._directory_fd())
            except BaseException as e:  # a bug: still answer every waiting client
                failure = OSError(f"spool commit failed unexpectedly: {e!r}")
                for entry in batch:
                    entry.discard()
                errors = [failure] * len(batch)
            self._reactor.callFromThread(self._deliver, batch, errors)
