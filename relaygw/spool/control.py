"""
Operator requests to the running delivery process (C{relaygw queue retry}
and C{delete}, SPEC section 6), and the lock that says one is running.

While a delivery process runs, it alone changes queued entries: a second
writer could tear the C{.upd} bookkeeping or remove an entry in the middle of
an attempt.  So the command line never touches the queue then; it drops a
request file into C{<spool>/control/} and the delivery process, which polls
that directory (L{ControlPoller}), carries it out::

    control/delivery.lock      held (flock) by the delivery process while it
                               runs; the kernel drops it when the process
                               dies, kill -9 included; holds its pid as text
    control/<name>.req         one request (JSON); removed once carried out
    control/<name>.req.tmp     a request being written

A request is written, fsynced and renamed, so the poller never reads half of
one; it is removed only once it is done, so a delivery process that dies
first leaves it for the next one.  When no delivery process runs, the command
line takes the lock itself, which keeps one from starting while it changes
the spool directly.

Blocking file code; the poller runs on the delivery process's reactor.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import Literal, Protocol

from attrs import frozen
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relaygw.interfaces import ISpool
from relaygw.spool.commit import ENTRY, replace_durably, write_all
from relaygw.spool.ids import is_queue_id

__all__ = [
    "CONTROL",
    "ControlPoller",
    "Request",
    "Scheduling",
    "SpoolLock",
    "lock_holder",
    "pending_requests",
    "queued_ids",
    "write_request",
]

CONTROL = "control"
"""The control directory's name under the spool root."""
_LOCK = "delivery.lock"
_REQUEST = ".req"
_DIR_MODE = 0o700
# Readable by the delivery process's user when root runs the command.
_REQUEST_MODE = 0o644

Action = Literal["retry", "delete"]


@frozen
class Request:
    """
    One operator request.

    @ivar action: C{retry} (try at once) or C{delete} (remove from the queue).
    @ivar queue_id: the entry; C{None} for a retry of every entry.
    """

    action: Action
    queue_id: str | None = None

    def to_json(self) -> bytes:
        """The request file's content."""
        return json.dumps(
            {"version": 1, "action": self.action, "queue_id": self.queue_id}
        ).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes) -> Request:
        """
        @raise ValueError: not a request this version understands.
        """
        try:
            doc = json.loads(data)
            action, queue_id = doc["action"], doc["queue_id"]
            if doc.get("version") != 1 or action not in ("retry", "delete"):
                raise ValueError(f"unsupported request {doc!r}")
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed request: {e!r}") from e
        if queue_id is None and action == "retry":
            return cls("retry")
        if not isinstance(queue_id, str) or not is_queue_id(queue_id):
            raise ValueError(f"request names no valid queue id: {queue_id!r}")
        return cls(action, queue_id)


def _control_dir(root: Path) -> Path:
    path = Path(root) / CONTROL
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolLock:
    """
    The delivery lock of a spool: an exclusive C{flock} on
    C{control/delivery.lock}.  flock (not POSIX record locks) because closing
    some other descriptor of the file does not drop it, and the kernel drops
    it with the process.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def acquire(cls, root: Path, *, wait: bool) -> SpoolLock | None:
        """
        Take the lock of the spool at C{root} and write this process's pid
        into the file.

        @param wait: block until it is free; else give up at once.
        @return: the held lock; C{None} when C{wait} is false and another
            process holds it.
        @raise OSError: the control directory or lock file cannot be made
            (writing the pid is best effort).
        """
        path = _control_dir(root) / _LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            write_all(fd, b"%d\n" % os.getpid())
        except OSError:
            # The pid is for messages only (lock_holder): a full spool must
            # not stop the delivery process, the one that frees space.
            pass
        return cls(fd)

    def release(self) -> None:
        """Drop the lock.  Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def lock_holder(root: Path) -> int | None:
    """The pid last written into the lock file (for messages only); C{None} when unknown."""
    try:
        text = (Path(root) / CONTROL / _LOCK).read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def write_request(root: Path, request: Request, now: float) -> Path:
    """
    Drop C{request} into the control directory: write a temporary file,
    fsync it, rename it, fsync the directory.

    @param now: POSIX seconds; names sort in the order requests were made.
    @return: the request file's path (it disappears once carried out).
    @raise OSError: it could not be written; nothing was requested.
    """
    control = _control_dir(root)
    name = f"{int(now * 1_000_000):020d}-{secrets.token_hex(4)}{_REQUEST}"
    final = control / name
    replace_durably(str(final), request.to_json(), _REQUEST_MODE)
    _fsync_dir(control)
    return final


def pending_requests(root: Path) -> list[Path]:
    """The request files not carried out yet, oldest first."""
    try:
        names = os.listdir(Path(root) / CONTROL)
    except FileNotFoundError:
        return []
    return [Path(root) / CONTROL / n for n in sorted(names) if n.endswith(_REQUEST)]


def queued_ids(root: Path) -> list[str]:
    """The ids of the committed entries, from their file names alone (no file is read)."""
    try:
        names = os.listdir(Path(root) / "queue")
    except FileNotFoundError:
        return []
    return sorted(
        n[: -len(ENTRY)] for n in names if n.endswith(ENTRY) and is_queue_id(n[: -len(ENTRY)])
    )


class Scheduling(Protocol):
    """What the poller asks of the scheduler."""

    @property
    def active(self) -> frozenset[str]:
        """The queue ids in flight."""

    def enqueue_id(self, queue_id: str) -> None:
        """Try C{queue_id} at once."""

    def forget(self, queue_id: str) -> bool:
        """Stop scheduling C{queue_id}; whether an attempt on it is in flight."""


class ControlPoller:
    """
    The delivery process's side: carries out the request files, every
    C{interval} seconds.
    """

    _log = Logger()

    def __init__(
        self,
        root: Path,
        *,
        spool: ISpool,
        scheduler: Scheduling,
        clock: IReactorTime,
        interval: float = 1.0,
    ) -> None:
        """
        @param root: the spool directory (requests are in its C{control/}).
        @param spool: the delivery process's spool, which removes entries.
        @param scheduler: retries and forgets queue ids.
        @param clock: drives the polling.
        @param interval: seconds between looks at the control directory.
        """
        self._root = Path(root)
        self._spool = spool
        self._scheduler = scheduler
        self._interval = interval
        self._loop = LoopingCall(self.poll)
        self._loop.clock = clock
        # Deletes waiting for an attempt in flight, so each is logged once.
        self._waiting: set[str] = set()

    def start(self) -> None:
        """Carry out the pending requests now, then poll.  Call after the scheduler started."""
        _control_dir(self._root)
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: self._log.failure("Queue control poller stopped", f)
        )

    def stop(self) -> None:
        """Stop polling.  Idempotent."""
        if self._loop.running:
            self._loop.stop()

    def poll(self) -> None:
        """Carry out every pending request that can be; never raises."""
        for path in pending_requests(self._root):
            try:
                done = self._carry_out(path)
            except Exception:
                self._log.failure("Queue request {request} failed", request=path.name)
                done = True
            if done:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def _carry_out(self, path: Path) -> bool:
        """Whether C{path}'s request is finished (its file may go)."""
        try:
            request = Request.from_json(path.read_bytes())
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as e:
            self._log.warn(
                "Ignoring queue request {request}: {problem}", request=path.name, problem=str(e)
            )
            return True
        if request.action == "retry":
            active = self._scheduler.active
            ids = queued_ids(self._root) if request.queue_id is None else [request.queue_id]
            retried = [i for i in ids if i not in active]  # in flight: being tried now
            for queue_id in retried:
                self._scheduler.enqueue_id(queue_id)
            self._log.info(
                "Queue retry of {what} requested by an operator: {count} message(s)",
                what=request.queue_id or "every message",
                queue_id=request.queue_id,
                count=len(retried),
            )
            return True
        assert request.queue_id is not None
        return self._delete(request.queue_id)

    def _delete(self, queue_id: str) -> bool:
        # Forgotten again once the attempt ended: its outcome may have
        # scheduled it anew.
        if self._scheduler.forget(queue_id):
            if queue_id not in self._waiting:
                self._waiting.add(queue_id)
                self._log.info(
                    "Queue delete of {queue_id}: waiting for its attempt in flight",
                    queue_id=queue_id,
                )
            return False
        self._waiting.discard(queue_id)
        self._spool.remove(queue_id)
        self._log.info("Queue delete of {queue_id} requested by an operator", queue_id=queue_id)
        return True
