"""
One message being received into the directory spool (L{IMessageWriter}).

A writer keeps up to L{WRITE_BUFFER} octets in memory and creates its entry
file (C{queue/<id>.tmp}) only when a message outgrows that, so a small
message costs the reactor thread no file system call at all.  Its commit is
made durable by the spool's commit thread (L{relaygw.spool.commit}).
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from relaygw.interfaces import IMessageWriter
from relaygw.spool.commit import TEMPORARY, PendingCommit, commit_batch, write_all
from relaygw.spool.envelope import Envelope

if TYPE_CHECKING:
    from relaygw.spool.store import DirectorySpool

__all__ = ["SpoolWriter", "WRITE_BUFFER"]

WRITE_BUFFER = 64 * 1024
"""Octets a writer holds in memory before it creates its entry file and writes through."""

_FILE_MODE = 0o600
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

_OPEN, _COMMITTING, _CLOSED = "open", "committing", "closed"


@implementer(IMessageWriter)
class SpoolWriter:
    """
    One message being written: a bounded buffer, and a temporary entry file
    once the message outgrows it.

    @ivar queue_id: the reserved queue id.
    @ivar size: octets written so far.
    """

    def __init__(self, spool: DirectorySpool, queue_id: str) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._spool = spool
        self._temp_path = spool._prefix + queue_id + TEMPORARY
        self._fd = -1
        self._buffer = bytearray()
        self._state = _OPEN

    def write(self, data: bytes) -> None:
        """
        Append C{data}; at most L{WRITE_BUFFER} octets are held in memory.

        @raise OSError: the entry file cannot be created or take it.
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
            self._fd = os.open(self._temp_path, _OPEN_NEW, _FILE_MODE)
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
            (nothing committed, the entry's file removed).
        @raise ValueError: a closed writer, or an envelope for another id.
        """
        entry, checked = self._hand_over(envelope)
        spool = self._spool
        waiting: Deferred[None] = Deferred()
        spool._waiting[entry] = (waiting, checked)
        try:
            spool._commits.submit(entry)
        except RuntimeError as e:
            del spool._waiting[entry]
            entry.discard()
            self._state = _CLOSED
            return fail(OSError(errno.ESHUTDOWN, str(e)))
        return waiting

    def commit_now(self, envelope: object) -> None:
        """
        L{commit} on the calling thread, blocking until the entry is durable
        (for tools and tests; the receive path uses L{commit}).

        @raise OSError: nothing was committed; the entry's file is removed.
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
        Close and remove the entry file.  Idempotent; never raises.  Does
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
            try:
                os.unlink(self._temp_path)
            except OSError:
                pass

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
