"""
The file format of one spool entry (SPEC section 4).

A committed entry is one file, C{queue/<id>.msg}::

    message data | envelope JSON | trailer

The trailer is L{TRAILER_SIZE} octets: C{"\\n"}, the envelope's length as
ten decimal digits, C{" RGWENV1\\n"}.  A reader finds it at the end of the
file, the envelope before it, and the data is everything before that.  The
envelope goes last because it is known only at commit, when a large
message's data is already written through to the file.

Blocking file code without Twisted; readers raise L{EntryError} for a file
that is not a complete entry.
"""

from __future__ import annotations

import errno
import io
import os
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["EntryError", "TRAILER_SIZE", "open_data", "read_envelope", "trailer"]

TRAILER_SIZE = 20
"""Octets of the trailer at the end of every entry file."""

_MAGIC = b" RGWENV1\n"
_DIGITS = 10
_TAIL_READ = 4096
_OPEN_READ = os.O_RDONLY | os.O_CLOEXEC


class EntryError(ValueError):
    """The file is not a complete spool entry (no trailer, or one that does not fit)."""


def trailer(envelope_length: int) -> bytes:
    """
    The trailer of an entry whose envelope JSON is C{envelope_length} octets.

    @raise ValueError: the length does not fit in ten digits.
    """
    if not 0 <= envelope_length < 10**_DIGITS:
        raise ValueError(f"envelope of {envelope_length} octets is too large")
    return b"\n%010d%s" % (envelope_length, _MAGIC)


def _layout(tail: bytes, file_size: int) -> tuple[int, int]:
    """(data length, envelope length) from the file's last octets C{tail}."""
    if file_size < TRAILER_SIZE:
        raise EntryError(f"{file_size} octets is too short for an entry")
    end = tail[-TRAILER_SIZE:]
    digits = end[1 : 1 + _DIGITS]
    if end[:1] != b"\n" or not end.endswith(_MAGIC) or not digits.isdigit():
        raise EntryError("no entry trailer at the end of the file")
    envelope_length = int(digits)
    data_length = file_size - TRAILER_SIZE - envelope_length
    if data_length < 0:
        raise EntryError(f"the trailer names {envelope_length} envelope octets; the file is shorter")
    return data_length, envelope_length


def _pread_exactly(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            raise EntryError("the file ended early (truncated while being read?)")
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _read_layout(fd: int, tail_read: int) -> tuple[int, int, bytes]:
    """
    (data length, envelope length, the last octets read) of the open entry
    C{fd}, reading up to C{tail_read} octets from its end.
    """
    size = os.fstat(fd).st_size
    tail = _pread_exactly(fd, min(size, tail_read), max(0, size - tail_read))
    data_length, envelope_length = _layout(tail, size)
    return data_length, envelope_length, tail


def read_envelope(path: str) -> bytes:
    """
    The envelope JSON of the entry file at C{path}.

    @raise FileNotFoundError: no such file.
    @raise EntryError: the file is not a complete entry.
    @raise OSError: it cannot be read.
    """
    fd = os.open(path, _OPEN_READ)
    try:
        data_length, envelope_length, tail = _read_layout(fd, _TAIL_READ)
        if envelope_length + TRAILER_SIZE <= len(tail):
            return tail[-TRAILER_SIZE - envelope_length : -TRAILER_SIZE]
        return _pread_exactly(fd, envelope_length, data_length)
    finally:
        os.close(fd)


class _DataFile(io.RawIOBase):
    """The first C{length} octets of an open file: reads end there, seeks are relative to 0."""

    def __init__(self, fd: int, length: int) -> None:
        super().__init__()
        self._fd = fd
        self._length = length
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._length - self._position)
        if want <= 0:
            return 0
        chunk = os.pread(self._fd, want, self._position)
        view[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            fd, self._fd = self._fd, -1
            super().close()
            os.close(fd)


def open_data(path: str) -> BinaryIO:
    """
    Open the message data of the entry file at C{path}.

    @return: a seekable binary file that reads the data and then ends
        (never the envelope or trailer); the caller closes it.
    @raise FileNotFoundError: no such file.
    @raise EntryError: the file is not a complete entry.
    @raise OSError: it cannot be read.
    """
    fd = os.open(path, _OPEN_READ)
    try:
        data_length, _, _ = _read_layout(fd, TRAILER_SIZE)
    except BaseException:
        os.close(fd)
        raise
    return io.BufferedReader(_DataFile(fd, data_length))
