"""
The delivery lock on a full spool (issue 11, "Faults"): writing the pid into
the lock file is for messages only, so ENOSPC there must not stop the
delivery process, which is what frees the space.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from relaygw.spool import control
from relaygw.spool.control import SpoolLock, lock_holder


def _full(fd: int, data: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_lock_taken_when_pid_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "write_all", _full)
    lock = SpoolLock.acquire(tmp_path, wait=False)
    assert lock is not None
    try:
        assert SpoolLock.acquire(tmp_path, wait=False) is None  # still exclusive
        assert lock_holder(tmp_path) is None  # no pid: messages say "unknown"
    finally:
        lock.release()
    again = SpoolLock.acquire(tmp_path, wait=False)
    assert again is not None
    again.release()
