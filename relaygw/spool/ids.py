"""
Internal queue ids: the C{InternalId} of the 250 reply and the spool's file names.

An id is L{ID_LENGTH} characters of C{[0-9A-Z]}: eleven base-36 digits of
microseconds since the epoch, then a seven-character node tag (four digits of
the process id, three random) that keeps processes, and restarts of one pid,
apart.  Within a process the time part strictly increases (a clock that stands
still or steps back is overtaken by one microsecond per id), so ids sort
lexicographically in creation order there and roughly in time across
processes.
"""

from __future__ import annotations

import os
import re
import secrets
import threading

__all__ = ["ID_LENGTH", "QueueIdGenerator", "is_queue_id", "new_queue_id", "pid_tag"]

_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TIME_WIDTH = 11
_NODE_WIDTH = 7
# Microseconds (past the year 4000), half the range so that overtaking a
# stalled clock always has room left.
_TIME_LIMIT = 36**_TIME_WIDTH // 2

ID_LENGTH = _TIME_WIDTH + _NODE_WIDTH

_ID_PATTERN = re.compile(f"[0-9A-Z]{{{ID_LENGTH}}}")


def _base36(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, digit = divmod(value, 36)
        digits.append(_DIGITS[digit])
    return "".join(reversed(digits))


def is_queue_id(text: str) -> bool:
    """
    @return: whether C{text} has the form of a queue id (so it is safe to use
        as a file name).
    """
    return _ID_PATTERN.fullmatch(text) is not None


def pid_tag(pid: int) -> str:
    """The four characters of a process's ids that come from its pid (after the time part)."""
    return _base36(pid % 36**4, 4)


class QueueIdGenerator:
    """
    Makes the ids of one process.

    @ivar node: the seven-character tag shared by this generator's ids.
    """

    def __init__(self, node: str) -> None:
        """
        @param node: seven characters of C{[0-9A-Z]}, unique among the
            processes that may share a spool.
        @raise ValueError: C{node} has the wrong form.
        """
        if len(node) != _NODE_WIDTH or not set(node) <= set(_DIGITS):
            raise ValueError(f"node tag must be {_NODE_WIDTH} characters of [0-9A-Z]")
        self.node = node
        self._last = -1
        self._lock = threading.Lock()

    @classmethod
    def for_process(cls, pid: int) -> QueueIdGenerator:
        """A generator whose node tag mixes C{pid} with fresh randomness."""
        return cls(pid_tag(pid) + _base36(secrets.randbelow(36**3), 3))

    def next(self, now: float) -> str:
        """
        @param now: POSIX seconds.
        @return: a new id, greater than every id this generator made before.
        """
        micros = min(max(int(now * 1_000_000), 0), _TIME_LIMIT)
        with self._lock:
            if micros <= self._last:
                micros = self._last + 1
            self._last = micros
        return _base36(micros, _TIME_WIDTH) + self.node


_generator: QueueIdGenerator | None = None
_generator_pid = -1


def new_queue_id(now: float) -> str:
    """
    A new queue id, unique across processes and restarts.

    @param now: POSIX seconds (the injected clock's C{seconds()}).
    @return: L{ID_LENGTH} characters of C{[0-9A-Z]}.
    """
    global _generator, _generator_pid
    pid = os.getpid()
    # A forked child must not continue its parent's sequence with the parent's tag.
    if _generator is None or _generator_pid != pid:
        _generator = QueueIdGenerator.for_process(pid)
        _generator_pid = pid
    return _generator.next(now)
