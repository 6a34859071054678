"""
One message being received into the directory spool (L{IMessageWriter}).

A writer keeps up to L{WRITE_BUFFER} octets in memory and creates its entry
file (C{queue/<id>.tmp}) only when a message outgrows that, so a small
message costs the reactor thread no file system call at all.  Its commit is
made durable by the spool's commit thread (L{relaygw.spool.commit}).
"""

from __future__ import annotations

import os
from typing import Protocol

from twisted.internet.defer import Deferred
from zope.interface import implementer

from relaygw.interfaces import IMessageWriter
from relaygw.spool.commit import TEMPORARY, PendingCommit, write_all
from relaygw.spool.envelope import Envelope

__all__ = ["Committer", "SpoolWriter", "WRITE_BUFFER"]

WRITE_BUFFER = 64 * 1024
"""Octets a writer holds in memory before it creates its entry file and writes through."""

_FILE_MODE = 0o600
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

_OPEN, _CLOSED = "open", "closed"


class Committer(Protocol):
    """
    What a writer hands its entry to (the spool): the writer knows the
    queue directory and how to commit, never the spool itself.
    """

    #: the queue directory followed by the path separator.
    prefix: str

    def submit(self, entry: PendingCommit, envelope: Envelope) -> Deferred[None]:
        """Commit on the commit thread; fires once durable and announced."""

    def commit_now(self, entry: PendingCommit, envelope: Envelope) -> None:
        """Commit on the calling thread; raises the L{OSError} of a failure."""


@implementer(IMessageWriter)
class SpoolWriter:
    """
    One message being written: a bounded buffer, and a temporary entry file
    once the message outgrows it.

    @ivar queue_id: the reserved queue id.
    @ivar size: octets written so far.
    """

    def __init__(self, spool: Committer, queue_id: str) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._spool = spool
        self._temp_path = spool.prefix + queue_id + TEMPORARY
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
        return self._spool.submit(entry, checked)

    def commit_now(self, envelope: object) -> None:
        """
        L{commit} on the calling thread, blocking until the entry is durable
        (for tools and tests; the receive path uses L{commit}).

        @raise OSError: nothing was committed; the entry's file is removed.
        @raise ValueError: as for L{commit}.
        """
        entry, checked = self._hand_over(envelope)
        self._spool.commit_now(entry, checked)

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
        self._state = _CLOSED
        entry = PendingCommit(
            self.queue_id, self._spool.prefix, self._fd, self._buffer, envelope.to_json()
        )
        self._fd = -1
        self._buffer = bytearray()
        return entry, envelope
