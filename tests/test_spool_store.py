"""Tests for L{relaygw.spool.store.DirectorySpool} in one process."""

from __future__ import annotations

import errno
import os
import queue
import shutil
import stat
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any, BinaryIO, Callable, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relaygw._types import ISpoolReactor
from relaygw.interfaces import IMessageWriter, ISpool
from relaygw.spool.envelope import Envelope, Outcome, Recipient
from relaygw.spool.ids import new_queue_id
from relaygw.spool.store import WRITE_BUFFER, DirectorySpool, SpoolWriter

_NOW = 1_767_225_600.0
_T = TypeVar("_T")


@implementer(IReactorTime, IReactorFromThreads)
class ThreadReactor(Clock):
    """
    A L{Clock} that also takes C{callFromThread} calls into a queue, run only
    when the test drains it on its own thread with L{settle}.

    @ivar reactor_thread: the thread that made it (the test's thread).
    """

    def __init__(self) -> None:
        super().__init__()
        self.reactor_thread = threading.get_ident()
        self._calls: queue.Queue[Callable[[], object]] = queue.Queue()

    def callFromThread(self, f: Callable[..., object], *args: object, **kw: object) -> None:
        self._calls.put(lambda: f(*args, **kw))

    def settle(self, *waiting: Deferred[Any], timeout: float = 30) -> None:
        """Run calls from threads until every one of C{waiting} has fired."""
        deadline = time.monotonic() + timeout
        while not all(d.called for d in waiting):
            remaining = deadline - time.monotonic()
            assert remaining > 0, "spool commit did not finish in time"
            self._calls.get(timeout=remaining)()

    def pending_calls(self) -> int:
        """Calls from threads not run yet."""
        return self._calls.qsize()


def write_entry(queue: Path, queue_id: str, data: bytes, envelope_json: bytes) -> None:
    """Write a committed entry file by hand, in the documented format."""
    trailer = b"\n%010d RGWENV1\n" % len(envelope_json)
    (queue / (queue_id + ".msg")).write_bytes(data + envelope_json + trailer)


def make_envelope(queue_id: str, *, received_at: float = _NOW, size: int = 0) -> Envelope:
    """An envelope for C{queue_id} with one recipient."""
    return Envelope(
        id=queue_id,
        sender="sender@example.test",
        recipients=(Recipient("rcpt@example.test"),),
        connector="Default",
        client_ip="127.0.0.1",
        received_at=received_at,
        size=size,
        message_id="<m@example.test>",
    )


class SpoolTestCase(SynchronousTestCase):
    """Gives each test a fresh directory and a spool in it."""

    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="relaygw-spool-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        self.clock = ThreadReactor()
        self.clock.advance(_NOW)
        self.root = self.base / "spool"
        self.spool = self.open_spool()
        self.queue = self.root / "queue"

    def open_spool(self) -> DirectorySpool:
        """A spool on C{self.root}, closed (and its thread stopped) at cleanup."""
        spool = DirectorySpool(self.root, cast(ISpoolReactor, self.clock))

        def close() -> None:
            self.clock.settle(spool.close())

        self.addCleanup(close)
        return spool

    def commit(self, writer: IMessageWriter, envelope: Envelope) -> None:
        """Commit through the Deferred API and wait until it succeeded."""
        done = writer.commit(envelope)
        self.clock.settle(done)
        self.assertIsNone(self.successResultOf(done))

    def commit_fails(self, writer: IMessageWriter, envelope: Envelope) -> OSError:
        """Commit through the Deferred API; return the OSError it failed with."""
        done = writer.commit(envelope)
        self.clock.settle(done)
        return cast(OSError, self.failureResultOf(done, OSError).value)

    def store(self, data: bytes, *, received_at: float = _NOW) -> Envelope:
        """Commit C{data} as one message and return its envelope."""
        writer = self.spool.begin()
        writer.write(data)
        envelope = make_envelope(writer.queue_id, received_at=received_at, size=len(data))
        self.commit(writer, envelope)
        return envelope

    def names(self) -> list[str]:
        """The file names in the queue directory."""
        return sorted(os.listdir(self.queue))

    def data(self, queue_id: str) -> bytes:
        """The message data of a committed entry, read through open_data."""
        with cast(BinaryIO, self.spool.open_data(queue_id)) as f:
            return f.read()


class ContractTests(SpoolTestCase):
    """The spool and its writers provide relaygw's interfaces."""

    def test_spool_provides_ispool(self) -> None:
        """DirectorySpool provides ISpool."""
        self.assertTrue(verifyObject(ISpool, self.spool))

    def test_writer_provides_imessagewriter(self) -> None:
        """begin() returns an IMessageWriter."""
        writer = self.spool.begin()
        self.addCleanup(writer.abort)
        self.assertTrue(verifyObject(IMessageWriter, writer))


class CommitTests(SpoolTestCase):
    """begin, write and commit make a durable entry."""

    def test_round_trip(self) -> None:
        """A committed message's data and envelope are read back unchanged."""
        writer = self.spool.begin()
        chunks = [b"Subject: hi\r\n", b"\r\n", b"x" * 100_000, b"end\r\n"]
        for chunk in chunks:
            writer.write(chunk)
        self.assertEqual(writer.size, sum(map(len, chunks)))
        envelope = make_envelope(writer.queue_id, size=writer.size)
        self.commit(writer, envelope)
        self.assertEqual(self.spool.load(writer.queue_id), envelope)
        self.assertEqual(self.data(writer.queue_id), b"".join(chunks))

    def test_small_message_round_trip(self) -> None:
        """A message that never left the buffer is written whole by the commit."""
        writer = self.spool.begin()
        writer.write(b"Subject: small\r\n\r\n")
        writer.write(b"body\r\n")
        self.commit(writer, make_envelope(writer.queue_id, size=writer.size))
        self.assertEqual(self.data(writer.queue_id), b"Subject: small\r\n\r\nbody\r\n")

    def test_layout(self) -> None:
        """A committed entry is exactly one file <id>.msg in queue/, nothing temporary."""
        envelope = self.store(b"data")
        self.assertEqual(self.names(), [envelope.id + ".msg"])

    def test_entry_file_format(self) -> None:
        """
        The entry file is the data, the envelope JSON, then the 20-octet
        trailer "\\n" + ten-digit envelope length + " RGWENV1\\n".
        """
        for data in (b"Subject: x\r\n\r\nbody\r\n", b"y" * (WRITE_BUFFER + 5)):
            envelope = self.store(data)
            raw = (self.queue / (envelope.id + ".msg")).read_bytes()
            doc = envelope.to_json()
            self.assertEqual(raw, data + doc + b"\n%010d RGWENV1\n" % len(doc))

    def test_permissions(self) -> None:
        """Spool directories are mode 0700 and spool files 0600, both for buffered and large data."""
        small = self.store(b"data")
        large = self.store(b"x" * (2 * WRITE_BUFFER))
        for directory in (self.root, self.queue):
            self.assertEqual(stat.S_IMODE(directory.stat().st_mode), 0o700)
        self.spool.update(small)
        for name in (small.id + ".msg", small.id + ".upd", large.id + ".msg"):
            mode = (self.queue / name).stat().st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o600)

    def test_existing_root_is_reused(self) -> None:
        """A second spool on the same root sees the first one's entries."""
        envelope = self.store(b"data")
        again = self.open_spool()
        self.assertEqual(again.load(envelope.id), envelope)

    def test_ids_distinct_and_ordered(self) -> None:
        """Writers begun one after another get distinct ids in creation order, even at one instant."""
        writers = [self.spool.begin() for _ in range(50)]
        for writer in writers:
            self.addCleanup(writer.abort)
        ids = [w.queue_id for w in writers]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 50)

    def test_commit_never_overwrites_a_file_on_disk(self) -> None:
        """
        An id whose data file already exists (a clock step back across a
        restart) fails its commit with EEXIST; the old file is untouched and
        nothing of the new message is left.
        """
        writer = self.spool.begin()
        (self.queue / (writer.queue_id + ".msg")).write_bytes(b"old")
        writer.write(b"new")
        error = self.commit_fails(writer, make_envelope(writer.queue_id))
        self.assertEqual(error.errno, errno.EEXIST)
        self.assertEqual((self.queue / (writer.queue_id + ".msg")).read_bytes(), b"old")
        self.assertEqual(self.names(), [writer.queue_id + ".msg"])

    def test_small_messages_touch_no_file_until_commit(self) -> None:
        """Up to WRITE_BUFFER octets a writer creates no file: begin, write and abort leave nothing."""
        writer = self.spool.begin()
        writer.write(b"a" * (WRITE_BUFFER - 10))
        writer.write(b"b" * 10)
        self.assertEqual(self.names(), [])
        writer.abort()
        self.assertEqual(self.names(), [])

    def test_writes_go_through_past_the_buffer(self) -> None:
        """Past WRITE_BUFFER octets the data file is created and holds all but a bounded rest."""
        writer = self.spool.begin()
        self.addCleanup(writer.abort)
        writer.write(b"a" * 1000)
        writer.write(b"b" * WRITE_BUFFER)
        path = self.queue / (writer.queue_id + ".tmp")
        self.assertEqual(path.stat().st_size, 1000 + WRITE_BUFFER)
        writer.write(b"c" * 1000)
        self.assertEqual(path.stat().st_size, 1000 + WRITE_BUFFER)
        self.assertEqual(writer.size, 2000 + WRITE_BUFFER)

    def test_memory_flat_for_50_mib(self) -> None:
        """Writing and committing 50 MiB allocates no more than a few buffers' worth."""
        chunk = b"x" * 16384 + b"\r\n"
        count = 50 * 1024 * 1024 // len(chunk)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        writer = self.spool.begin()
        for _ in range(count):
            writer.write(chunk)
        self.commit(writer, make_envelope(writer.queue_id, size=writer.size))
        _, peak = tracemalloc.get_traced_memory()
        self.assertLess(peak, 4 * WRITE_BUFFER)
        with cast(BinaryIO, self.spool.open_data(writer.queue_id)) as f:
            self.assertEqual(f.seek(0, os.SEEK_END), count * len(chunk))

    def test_commit_needs_its_own_envelope(self) -> None:
        """Committing an envelope with another id is refused at once and commits nothing."""
        writer = self.spool.begin()
        self.addCleanup(writer.abort)
        writer.write(b"x" * (WRITE_BUFFER + 1))
        self.assertRaises(ValueError, writer.commit, make_envelope(new_queue_id(_NOW)))
        self.assertEqual(self.names(), [writer.queue_id + ".tmp"])

    def test_closed_writer_refuses_more(self) -> None:
        """After commit, write and commit raise ValueError and abort leaves the entry alone."""
        writer = self.spool.begin()
        envelope = make_envelope(writer.queue_id)
        self.commit(writer, envelope)
        self.assertRaises(ValueError, writer.write, b"more")
        self.assertRaises(ValueError, writer.commit, envelope)
        writer.abort()
        self.assertEqual(self.spool.load(writer.queue_id), envelope)

    def test_abort_while_committing_does_not_undo(self) -> None:
        """
        abort() after commit() (the client went away meanwhile) changes
        nothing: the commit completes and its Deferred fires.
        """
        writer = self.spool.begin()
        writer.write(b"data")
        envelope = make_envelope(writer.queue_id)
        done = writer.commit(envelope)
        writer.abort()
        self.clock.settle(done)
        self.successResultOf(done)
        self.assertEqual(self.spool.load(writer.queue_id), envelope)

    def test_commit_now(self) -> None:
        """The synchronous variant makes the entry durable before it returns and tells subscribers."""
        seen: list[Envelope] = []
        self.spool.subscribe(seen.append)
        writer = cast(SpoolWriter, self.spool.begin())
        writer.write(b"data")
        envelope = make_envelope(writer.queue_id)
        writer.commit_now(envelope)
        self.assertEqual(self.spool.load(writer.queue_id), envelope)
        self.assertEqual(seen, [envelope])
        self.assertEqual(self.clock.pending_calls(), 0)


class AbortTests(SpoolTestCase):
    """abort() removes what was written."""

    def test_abort_removes_data(self) -> None:
        """After abort of a message past the buffer the queue directory is empty."""
        writer = self.spool.begin()
        writer.write(b"x" * (3 * WRITE_BUFFER))
        writer.abort()
        self.assertEqual(self.names(), [])

    def test_abort_is_idempotent(self) -> None:
        """A second abort does nothing and raises nothing, even if the file is already gone."""
        writer = self.spool.begin()
        writer.write(b"x" * (WRITE_BUFFER + 1))
        os.unlink(self.queue / (writer.queue_id + ".tmp"))
        writer.abort()
        writer.abort()
        self.assertEqual(self.names(), [])


class SubscriberTests(SpoolTestCase):
    """Subscribers hear of commits after they are durable."""

    def test_subscriber_sees_committed_entry(self) -> None:
        """A subscriber is called once with the envelope, when the entry can already be loaded."""
        seen: list[tuple[Envelope, Envelope]] = []
        self.spool.subscribe(lambda e: seen.append((e, self.spool.load(e.id))))
        envelope = self.store(b"data")
        self.assertEqual(seen, [(envelope, envelope)])

    def test_subscriber_runs_on_reactor_thread_before_the_deferred(self) -> None:
        """
        Subscribers run on the reactor thread (not the commit thread), and
        before the commit's Deferred fires.
        """
        order: list[tuple[str, int]] = []
        self.spool.subscribe(lambda e: order.append(("subscriber", threading.get_ident())))
        writer = self.spool.begin()
        writer.write(b"data")
        done = writer.commit(make_envelope(writer.queue_id))
        done.addCallback(lambda _: order.append(("deferred", threading.get_ident())))
        self.clock.settle(done)
        here = self.clock.reactor_thread
        self.assertEqual(order, [("subscriber", here), ("deferred", here)])

    def test_subscriber_not_called_on_failure(self) -> None:
        """A commit that fails reaches no subscriber."""
        seen: list[Envelope] = []
        self.spool.subscribe(seen.append)
        writer = self.spool.begin()
        (self.queue / (writer.queue_id + ".msg")).write_bytes(b"clash")
        self.commit_fails(writer, make_envelope(writer.queue_id))
        self.assertEqual(seen, [])

    def test_subscriber_not_called_on_abort(self) -> None:
        """An aborted message reaches no subscriber."""
        seen: list[Envelope] = []
        self.spool.subscribe(seen.append)
        self.spool.begin().abort()
        self.assertEqual(seen, [])

    def test_failing_subscriber_is_logged_not_raised(self) -> None:
        """A subscriber's exception is logged as a failure; commit succeeds and later subscribers run."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        seen: list[Envelope] = []

        def broken(envelope: Envelope) -> None:
            raise ZeroDivisionError("subscriber bug")

        self.spool.subscribe(broken)
        self.spool.subscribe(seen.append)
        envelope = self.store(b"data")
        self.assertEqual(seen, [envelope])
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["queue_id"], envelope.id)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_subscribe_refuses_non_callable(self) -> None:
        """Subscribing something that cannot be called fails at once, not at the next commit."""
        self.assertRaises(TypeError, self.spool.subscribe, "not callable")


class GroupCommitTests(SpoolTestCase):
    """Commits pending together become one batch with one directory fsync."""

    def test_commits_wait_for_the_reactor_thread(self) -> None:
        """A commit's Deferred fires only when the reactor thread runs the commit thread's result."""
        writer = self.spool.begin()
        writer.write(b"data")
        done = writer.commit(make_envelope(writer.queue_id))
        deadline = time.monotonic() + 30
        while not (self.queue / (writer.queue_id + ".msg")).exists():
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.001)
        self.assertNoResult(done)
        self.clock.settle(done)
        self.successResultOf(done)

    def test_pending_commits_form_one_batch(self) -> None:
        """
        Commits submitted while the thread is busy are taken together as
        one batch once it is free, and all of them are durable.
        """
        from relaygw.spool import commit as commit_module

        real = commit_module.commit_batch
        sizes: list[int] = []
        first_started, release = threading.Event(), threading.Event()

        def gated(batch: Any, directory_fd: int) -> list[OSError | None]:
            sizes.append(len(batch))
            if len(sizes) == 1:
                first_started.set()
                release.wait(30)
            return real(batch, directory_fd)

        self.patch(commit_module, "commit_batch", gated)
        writers = [self.spool.begin() for _ in range(6)]
        envelopes = [make_envelope(w.queue_id) for w in writers]
        for w in writers:
            w.write(b"data " + w.queue_id.encode())
        waiting = [writers[0].commit(envelopes[0])]
        self.assertTrue(first_started.wait(30))
        waiting += [w.commit(e) for w, e in zip(writers[1:], envelopes[1:])]
        release.set()
        self.clock.settle(*waiting)
        self.assertEqual(sizes, [1, 5])
        for done, envelope in zip(waiting, envelopes):
            self.successResultOf(done)
            self.assertEqual(self.spool.load(envelope.id), envelope)

    def batch(self, count: int) -> tuple[list[Any], list[Envelope]]:
        """C{count} pending commits, as the commit thread gets them."""
        from relaygw.spool.commit import PendingCommit

        entries, envelopes = [], []
        for i in range(count):
            queue_id = new_queue_id(_NOW)
            envelope = make_envelope(queue_id)
            entries.append(
                PendingCommit(queue_id, str(self.queue) + os.sep, -1, b"m%d" % i, envelope.to_json())
            )
            envelopes.append(envelope)
        return entries, envelopes

    def test_batch_order_and_one_directory_fsync(self) -> None:
        """
        A batch writes every file (data, envelope and trailer of a small
        message in one write), then fsyncs them all, then renames them all,
        then fsyncs the directory exactly once.
        """
        from relaygw.spool import commit as commit_module

        calls: list[str] = []
        directory_fd = os.open(self.queue, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, directory_fd)

        class Recording:
            def __getattr__(self, name: str) -> Any:
                return getattr(os, name)

            def fsync(self, fd: int) -> None:
                calls.append("dirsync" if fd == directory_fd else "fsync")
                os.fsync(fd)

            def replace(self, a: str, b: str) -> None:
                calls.append("rename")
                os.replace(a, b)

            def write(self, fd: int, data: Any) -> int:
                calls.append("write")
                return os.write(fd, data)

        self.patch(commit_module, "os", Recording())
        entries, envelopes = self.batch(3)
        self.assertEqual(commit_module.commit_batch(entries, directory_fd), [None] * 3)
        self.assertEqual(calls, ["write"] * 3 + ["fsync"] * 3 + ["rename"] * 3 + ["dirsync"])
        for envelope in envelopes:
            self.assertEqual(self.spool.load(envelope.id), envelope)

    def test_one_failed_entry_fails_alone(self) -> None:
        """An entry that cannot be written fails with its error; the rest of the batch commits."""
        from relaygw.spool.commit import commit_batch

        entries, envelopes = self.batch(3)
        clash = self.queue / (envelopes[1].id + ".msg")
        clash.write_bytes(b"someone else's")
        errors = commit_batch(entries, self.spool._directory_fd())
        self.assertIsNone(errors[0])
        self.assertIsInstance(errors[1], FileExistsError)
        self.assertIsNone(errors[2])
        self.assertEqual(clash.read_bytes(), b"someone else's")
        self.assertEqual(
            self.names(),
            sorted([envelopes[0].id + ".msg", clash.name, envelopes[2].id + ".msg"]),
        )

    def test_failed_directory_fsync_fails_the_batch(self) -> None:
        """
        When the directory fsync fails every entry of the batch fails with
        that error and its file is removed.
        """
        from relaygw.spool import commit as commit_module

        entries, _ = self.batch(3)
        directory_fd = os.open(self.queue, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, directory_fd)

        class FailingDirectorySync:
            def __getattr__(self, name: str) -> Any:
                return getattr(os, name)

            def fsync(self, fd: int) -> None:
                if fd == directory_fd:
                    raise OSError(errno.EIO, "Input/output error (injected)")
                os.fsync(fd)

        self.patch(commit_module, "os", FailingDirectorySync())
        errors = commit_module.commit_batch(entries, directory_fd)
        self.assertEqual([e.errno if e else None for e in errors], [errno.EIO] * 3)
        self.assertEqual(self.names(), [])


class CloseTests(SpoolTestCase):
    """close() finishes pending commits and stops the commit thread."""

    def test_close_finishes_pending_commits_first(self) -> None:
        """Commits pending at close() fire before close's Deferred, and the thread ends."""
        writers = [self.spool.begin() for _ in range(5)]
        waiting = []
        for w in writers:
            w.write(b"data")
            waiting.append(w.commit(make_envelope(w.queue_id)))
        fired: list[str] = []
        for done in waiting:
            done.addCallback(lambda _: fired.append("commit"))
        closed = self.spool.close()
        closed.addCallback(lambda _: fired.append("close"))
        self.clock.settle(closed)
        self.assertEqual(fired, ["commit"] * 5 + ["close"])
        thread = self.spool._commits._thread
        assert thread is not None
        thread.join(30)
        self.assertFalse(thread.is_alive())
        self.assertEqual(len(self.spool.entries()), 5)

    def test_closed_spool_takes_no_commits(self) -> None:
        """After close(), begin() raises OSError and a writer begun before fails its commit."""
        writer = self.spool.begin()
        writer.write(b"data")
        self.clock.settle(self.spool.close())
        self.assertRaises(OSError, self.spool.begin)
        error = self.commit_fails(writer, make_envelope(writer.queue_id))
        self.assertEqual(error.errno, errno.ESHUTDOWN)
        self.assertEqual(self.names(), [])

    def test_synchronous_methods_work_after_close(self) -> None:
        """update, load, remove and recover keep working after close() (the delivery side)."""
        envelope = self.store(b"data")
        self.clock.settle(self.spool.close())
        later = envelope.with_outcomes({"rcpt@example.test": Outcome("retry", "451 4.4.1 later")})
        self.spool.update(later)
        self.assertEqual(self.spool.recover(), [later])
        self.spool.remove(envelope.id)
        self.assertEqual(self.names(), [])

    def test_close_without_commits(self) -> None:
        """close() of a spool that never committed fires at once and starts no thread."""
        closed = self.spool.close()
        self.successResultOf(closed)
        self.assertIsNone(self.spool._commits._thread)


class EntryTests(SpoolTestCase):
    """load, open_data, update and remove of committed entries."""

    def test_update_replaces_envelope(self) -> None:
        """
        update() writes <id>.upd, which load() returns from then on (also
        in another spool object); the entry file is untouched and no
        temporary file is left.
        """
        envelope = self.store(b"data")
        before = (self.queue / (envelope.id + ".msg")).read_bytes()
        later = envelope.with_outcomes({"rcpt@example.test": Outcome("retry", "451 4.4.1 later")})
        self.spool.update(later)
        self.assertEqual(self.spool.load(envelope.id), later)
        self.assertEqual(self.open_spool().load(envelope.id), later)
        self.assertEqual(self.names(), [envelope.id + ".msg", envelope.id + ".upd"])
        self.assertEqual((self.queue / (envelope.id + ".msg")).read_bytes(), before)
        self.assertEqual(self.data(envelope.id), b"data")

    def test_update_unknown_entry(self) -> None:
        """update() of an entry that does not exist raises KeyError and creates nothing."""
        self.assertRaises(KeyError, self.spool.update, make_envelope(new_queue_id(_NOW)))
        self.assertEqual(self.names(), [])

    def test_remove(self) -> None:
        """remove() deletes both files; load then raises KeyError; removing again is harmless."""
        envelope = self.store(b"data")
        self.spool.remove(envelope.id)
        self.assertEqual(self.names(), [])
        self.assertRaises(KeyError, self.spool.load, envelope.id)
        self.spool.remove(envelope.id)

    def test_remove_deletes_the_update(self) -> None:
        """remove() of an updated entry deletes its update too, also from a spool that never loaded it."""
        for spool in (self.spool, self.open_spool()):
            envelope = self.store(b"data")
            self.spool.update(envelope)
            spool.remove(envelope.id)
            self.assertEqual(self.names(), [])

    def test_remove_of_a_loaded_entry_skips_the_update(self) -> None:
        """
        remove() of an entry this spool loaded without an update unlinks
        only the entry file (no needless unlink of a missing .upd).
        """
        from relaygw.spool import store as store_module

        envelope = self.store(b"data")
        self.spool.load(envelope.id)
        unlinked: list[str] = []

        class Recording:
            def __getattr__(self, name: str) -> Any:
                return getattr(os, name)

            def unlink(self, path: str) -> None:
                unlinked.append(os.path.basename(path))
                os.unlink(path)

        self.patch(store_module, "os", Recording())
        self.spool.remove(envelope.id)
        self.assertEqual(unlinked, [envelope.id + ".msg"])
        self.assertEqual(self.names(), [])

    def test_load_update_without_entry(self) -> None:
        """An update left without its entry file is no entry: load() raises KeyError."""
        envelope = self.store(b"data")
        self.spool.update(envelope)
        os.unlink(self.queue / (envelope.id + ".msg"))
        self.assertRaises(KeyError, self.spool.load, envelope.id)
        self.assertRaises(KeyError, self.spool.update, envelope)

    def test_open_data_reads_only_the_data(self) -> None:
        """
        open_data() reads the message data and then ends (never the envelope
        or trailer), read(n) by read(n); seek(0) starts it over.
        """
        data = b"Subject: x\r\n\r\n" + b"z" * 40_000
        envelope = self.store(data)
        with cast(BinaryIO, self.spool.open_data(envelope.id)) as f:
            chunks = []
            for _ in range(100):
                chunk = f.read(16384)
                if not chunk:
                    break
                chunks.append(chunk)
            self.assertEqual(b"".join(chunks), data)
            self.assertEqual(f.read(), b"")
            self.assertEqual(f.seek(0), 0)
            self.assertEqual(f.read(), data)

    def test_open_data_unknown(self) -> None:
        """open_data() of an unknown id raises KeyError."""
        self.assertRaises(KeyError, self.spool.open_data, new_queue_id(_NOW))

    def test_load_unknown(self) -> None:
        """load() of an unknown id raises KeyError."""
        self.assertRaises(KeyError, self.spool.load, new_queue_id(_NOW))

    def test_foreign_names_are_refused(self) -> None:
        """Text that is not a queue id never becomes a path (no escape from the spool)."""
        (self.base / "secret.env").write_bytes(b"{}")
        for bad in ("../../secret", "../secret", "", "a" * 18):
            self.assertRaises(KeyError, self.spool.load, bad)
            self.assertRaises(KeyError, self.spool.open_data, bad)
        self.assertRaises(KeyError, self.spool.remove, "../../secret")
        self.assertTrue((self.base / "secret.env").exists())


class RecoverTests(SpoolTestCase):
    """recover() cleans up after a crash and returns the committed entries."""

    def setUp(self) -> None:
        super().setUp()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def logged(self, level: LogLevel) -> list[str]:
        """The queue_id or name fields of events logged at C{level}."""
        return [
            str(e.get("queue_id", e.get("name")))
            for e in self.events
            if e["log_level"] == level and "log_failure" not in e
        ]

    def test_oldest_first(self) -> None:
        """Entries come back ordered by received_at, then by id."""
        late = self.store(b"1", received_at=_NOW + 10)
        early = self.store(b"2", received_at=_NOW - 10)
        tie_a = self.store(b"3", received_at=_NOW)
        tie_b = self.store(b"4", received_at=_NOW)
        self.assertEqual(self.spool.recover(), [early, tie_a, tie_b, late])

    def test_empty(self) -> None:
        """An empty spool recovers to nothing."""
        self.assertEqual(self.spool.recover(), [])

    def test_removes_temporary_files(self) -> None:
        """Temporary files (an entry, an update or an old envelope being written) are deleted."""
        queue_id = new_queue_id(_NOW)
        committed = self.store(b"keep")
        for name in (queue_id + ".tmp", committed.id + ".upd.tmp", queue_id + ".env.tmp"):
            (self.queue / name).write_bytes(b"partial")
        self.assertEqual(self.spool.recover(), [committed])
        self.assertEqual(self.names(), [committed.id + ".msg"])

    def test_removes_partial_entries(self) -> None:
        """An entry whose commit never finished (<id>.tmp) is deleted and logged as a warning."""
        committed = self.store(b"keep")
        partial = self.spool.begin()
        partial.write(b"x" * (2 * WRITE_BUFFER))
        self.assertEqual(self.spool.recover(), [committed])
        self.assertEqual(self.names(), [committed.id + ".msg"])
        self.assertEqual(self.logged(LogLevel.warn), [partial.queue_id])

    def test_returns_updated_envelopes(self) -> None:
        """An entry with an update comes back with the updated envelope."""
        envelope = self.store(b"data")
        later = envelope.with_outcomes({"rcpt@example.test": Outcome("retry", "451 4.4.1 later")})
        self.spool.update(later)
        self.assertEqual(self.open_spool().recover(), [later])
        self.assertEqual(self.names(), [envelope.id + ".msg", envelope.id + ".upd"])

    def quarantined(self, queue_id: str, *files: str) -> None:
        """Assert C{queue_id} was moved to corrupt/ (exactly C{files}) and logged as an error."""
        self.assertEqual(self.names(), [])
        self.assertEqual(sorted(os.listdir(self.root / "corrupt")), sorted(files))
        self.assertEqual(set(self.logged(LogLevel.error)), {queue_id})

    def test_update_without_entry(self) -> None:
        """An update whose entry is gone (a crash inside remove()) is deleted; nothing is recovered."""
        envelope = self.store(b"data")
        self.spool.update(envelope)
        os.unlink(self.queue / (envelope.id + ".msg"))
        self.assertEqual(self.spool.recover(), [])
        self.assertEqual(self.names(), [])
        self.assertFalse((self.root / "corrupt").exists())

    def test_unparseable_envelope(self) -> None:
        """An entry whose envelope is not valid JSON goes to corrupt/."""
        queue_id = new_queue_id(_NOW)
        write_entry(self.queue, queue_id, b"data", b'{"version": 1, "id": "trunc')
        self.assertEqual(self.spool.recover(), [])
        self.quarantined(queue_id, queue_id + ".msg")

    def test_unknown_schema_version(self) -> None:
        """An envelope of an unknown schema version is not guessed at: it goes to corrupt/."""
        queue_id = new_queue_id(_NOW)
        write_entry(self.queue, queue_id, b"data", b'{"version": 99}')
        self.assertEqual(self.spool.recover(), [])
        self.quarantined(queue_id, queue_id + ".msg")

    def test_envelope_naming_another_id(self) -> None:
        """An envelope whose id differs from its file name goes to corrupt/."""
        queue_id = new_queue_id(_NOW)
        write_entry(self.queue, queue_id, b"data", make_envelope(new_queue_id(_NOW)).to_json())
        self.assertEqual(self.spool.recover(), [])
        self.quarantined(queue_id, queue_id + ".msg")

    def test_damaged_trailers(self) -> None:
        """
        Entry files without a complete trailer (truncated, too short, or
        naming more envelope octets than the file holds) go to corrupt/.
        """
        doc = make_envelope("X").to_json()
        bad = {
            "truncated": b"data" + doc + b"\n%010d RGWENV" % len(doc),
            "short": b" RGWENV1\n",
            "too long": b"data" + doc + b"\n%010d RGWENV1\n" % (len(doc) + 100),
            "not digits": b"data" + doc + b"\n00000000x1 RGWENV1\n",
        }
        ids = []
        for content in bad.values():
            queue_id = new_queue_id(_NOW)
            (self.queue / (queue_id + ".msg")).write_bytes(content)
            ids.append(queue_id)
        self.assertEqual(self.spool.recover(), [])
        self.assertEqual(self.names(), [])
        self.assertEqual(sorted(os.listdir(self.root / "corrupt")), sorted(i + ".msg" for i in ids))
        self.assertEqual(sorted(self.logged(LogLevel.error)), sorted(ids))

    def test_unparseable_update(self) -> None:
        """An entry whose update cannot be parsed goes to corrupt/ with the update."""
        envelope = self.store(b"data")
        (self.queue / (envelope.id + ".upd")).write_bytes(b'{"version": 1')
        self.assertEqual(self.spool.recover(), [])
        self.quarantined(envelope.id, envelope.id + ".msg", envelope.id + ".upd")

    def test_entry_of_the_two_file_layout(self) -> None:
        """
        An entry of the older two-file layout (<id>.msg of bare data and
        <id>.env) is not guessed at: both files go to corrupt/, logged; the
        next recover() finds nothing to do.
        """
        queue_id = new_queue_id(_NOW)
        (self.queue / (queue_id + ".msg")).write_bytes(b"Subject: old\r\n\r\nbody\r\n")
        (self.queue / (queue_id + ".env")).write_bytes(make_envelope(queue_id).to_json())
        self.assertEqual(self.spool.recover(), [])
        self.quarantined(queue_id, queue_id + ".env", queue_id + ".msg")
        self.assertEqual(self.spool.recover(), [])

    def test_stray_envelope_file(self) -> None:
        """A stray .env file goes to corrupt/ alone; a good entry of the same id stays."""
        envelope = self.store(b"data")
        (self.queue / (envelope.id + ".env")).write_bytes(b"{}")
        self.assertEqual(self.spool.recover(), [envelope])
        self.assertEqual(self.names(), [envelope.id + ".msg"])
        self.assertEqual(os.listdir(self.root / "corrupt"), [envelope.id + ".env"])
        self.assertEqual(self.logged(LogLevel.error), [envelope.id])

    def test_unknown_files_left_alone(self) -> None:
        """A file the spool did not write is kept and only warned about."""
        (self.queue / "README").write_bytes(b"operator notes")
        self.assertEqual(self.spool.recover(), [])
        self.assertEqual(self.names(), ["README"])
        self.assertEqual(self.logged(LogLevel.warn), ["README"])


class EntriesTests(SynchronousTestCase):
    """L{DirectorySpool.entries} lists committed entries and changes nothing."""

    def test_entries_leave_partial_files_alone(self) -> None:
        """
        Committed entries are listed oldest first; a message still being
        written (data, no envelope) is neither listed nor removed, because the
        receiving process may be writing it right now.
        """
        root = Path(tempfile.mkdtemp(prefix="relaygw-entries-"))
        self.addCleanup(shutil.rmtree, root, True)
        clock = ThreadReactor()
        clock.advance(1_800_000_000)
        spool = DirectorySpool(root, cast(ISpoolReactor, clock))
        self.addCleanup(lambda: clock.settle(spool.close()))
        first = spool.begin()
        first.write(b"Subject: one\r\n\r\n")
        clock.settle(first.commit(_envelope_for(first.queue_id, 1.0)))
        second = spool.begin()
        second.write(b"Subject: two\r\n\r\n")
        clock.settle(second.commit(_envelope_for(second.queue_id, 2.0)))
        partial = spool.begin()
        partial.write(b"Subject: in progress\r\n" + b"x" * WRITE_BUFFER)
        listed = [e.id for e in spool.entries()]
        self.assertEqual(listed, [first.queue_id, second.queue_id])
        self.assertTrue(
            any(name.startswith(partial.queue_id) for name in os.listdir(root / "queue"))
        )
        partial.abort()


    def test_entries_use_updates_and_leave_strays_alone(self) -> None:
        """
        entries() lists an updated entry with its update, and leaves stray
        files (an update without entry, an old .env, temporary files) where
        they are.
        """
        root = Path(tempfile.mkdtemp(prefix="relaygw-entries-"))
        self.addCleanup(shutil.rmtree, root, True)
        clock = ThreadReactor()
        clock.advance(1_800_000_000)
        spool = DirectorySpool(root, cast(ISpoolReactor, clock))
        self.addCleanup(lambda: clock.settle(spool.close()))
        writer = spool.begin()
        writer.write(b"Subject: one\r\n\r\n")
        committed = _envelope_for(writer.queue_id, 1.0)
        clock.settle(writer.commit(committed))
        later = committed.with_outcomes({"r@example.test": Outcome("retry", "451 4.4.1 later")})
        spool.update(later)
        strays = ["0STRAY00000000000A.upd", "0STRAY00000000000B.env", "0STRAY00000000000C.tmp"]
        for name in strays:
            (root / "queue" / name).write_bytes(b"{}")
        self.assertEqual(spool.entries(), [later])
        self.assertEqual(
            sorted(os.listdir(root / "queue")),
            sorted(strays + [committed.id + ".msg", committed.id + ".upd"]),
        )


def _envelope_for(queue_id: str, received_at: float) -> Envelope:
    return Envelope(
        id=queue_id,
        sender="s@example.test",
        recipients=(Recipient("r@example.test"),),
        connector="c",
        client_ip="127.0.0.1",
        received_at=received_at,
        size=1,
        message_id="<m@x>",
    )
