"""Tests for L{relaygw.spool.store.DirectorySpool} in one process."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import tracemalloc
from pathlib import Path

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from relaygw.interfaces import IMessageWriter, ISpool
from relaygw.spool.envelope import Envelope, Outcome, Recipient
from relaygw.spool.ids import new_queue_id
from relaygw.spool.store import WRITE_BUFFER, DirectorySpool

_NOW = 1_767_225_600.0


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
        self.clock = Clock()
        self.clock.advance(_NOW)
        self.root = self.base / "spool"
        self.spool = DirectorySpool(self.root, self.clock)
        self.queue = self.root / "queue"

    def store(self, data: bytes, *, received_at: float = _NOW) -> Envelope:
        """Commit C{data} as one message and return its envelope."""
        writer = self.spool.begin()
        writer.write(data)
        envelope = make_envelope(writer.queue_id, received_at=received_at, size=len(data))
        writer.commit(envelope)
        return envelope

    def names(self) -> list[str]:
        """The file names in the queue directory."""
        return sorted(os.listdir(self.queue))


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
        writer.commit(envelope)
        self.assertEqual(self.spool.load(writer.queue_id), envelope)
        self.assertEqual(self.spool.data_path(writer.queue_id).read_bytes(), b"".join(chunks))

    def test_layout(self) -> None:
        """A committed entry is exactly <id>.msg and <id>.env in queue/, nothing temporary."""
        envelope = self.store(b"data")
        self.assertEqual(self.names(), [envelope.id + ".env", envelope.id + ".msg"])

    def test_permissions(self) -> None:
        """Spool directories are mode 0700 and spool files 0600."""
        envelope = self.store(b"data")
        for directory in (self.root, self.queue):
            self.assertEqual(stat.S_IMODE(directory.stat().st_mode), 0o700)
        for suffix in (".msg", ".env"):
            mode = (self.queue / (envelope.id + suffix)).stat().st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o600)

    def test_existing_root_is_reused(self) -> None:
        """A second spool on the same root sees the first one's entries."""
        envelope = self.store(b"data")
        again = DirectorySpool(self.root, self.clock)
        self.assertEqual(again.load(envelope.id), envelope)

    def test_ids_distinct_and_ordered(self) -> None:
        """Writers begun one after another get distinct ids in creation order, even at one instant."""
        writers = [self.spool.begin() for _ in range(50)]
        for writer in writers:
            self.addCleanup(writer.abort)
        ids = [w.queue_id for w in writers]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 50)

    def test_begin_skips_an_id_already_on_disk(self) -> None:
        """An id whose data file already exists is never reused; the old file is untouched."""
        taken = new_queue_id(self.clock.seconds() + 1)
        (self.queue / (taken + ".msg")).write_bytes(b"old")
        self.clock.advance(1)
        writer = self.spool.begin()
        self.addCleanup(writer.abort)
        self.assertGreater(writer.queue_id, taken)
        self.assertEqual((self.queue / (taken + ".msg")).read_bytes(), b"old")

    def test_writes_are_buffered_and_bounded(self) -> None:
        """Small writes stay in the buffer; past WRITE_BUFFER octets they reach the file."""
        writer = self.spool.begin()
        self.addCleanup(writer.abort)
        path = self.spool.data_path(writer.queue_id)
        writer.write(b"a" * 1000)
        self.assertEqual(path.stat().st_size, 0)
        writer.write(b"b" * WRITE_BUFFER)
        self.assertEqual(path.stat().st_size, 1000 + WRITE_BUFFER)

    def test_memory_flat_for_50_mib(self) -> None:
        """Writing and committing 50 MiB allocates no more than a few buffers' worth."""
        chunk = b"x" * 16384 + b"\r\n"
        count = 50 * 1024 * 1024 // len(chunk)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        writer = self.spool.begin()
        for _ in range(count):
            writer.write(chunk)
        writer.commit(make_envelope(writer.queue_id, size=writer.size))
        _, peak = tracemalloc.get_traced_memory()
        self.assertLess(peak, 4 * WRITE_BUFFER)
        self.assertEqual(self.spool.data_path(writer.queue_id).stat().st_size, count * len(chunk))

    def test_commit_needs_its_own_envelope(self) -> None:
        """Committing an envelope with another id is refused and commits nothing."""
        writer = self.spool.begin()
        self.addCleanup(writer.abort)
        self.assertRaises(ValueError, writer.commit, make_envelope(new_queue_id(_NOW)))
        self.assertEqual(self.names(), [writer.queue_id + ".msg"])

    def test_closed_writer_refuses_more(self) -> None:
        """After commit, write and commit raise ValueError and abort leaves the entry alone."""
        writer = self.spool.begin()
        envelope = make_envelope(writer.queue_id)
        writer.commit(envelope)
        self.assertRaises(ValueError, writer.write, b"more")
        self.assertRaises(ValueError, writer.commit, envelope)
        writer.abort()
        self.assertEqual(self.spool.load(writer.queue_id), envelope)


class AbortTests(SpoolTestCase):
    """abort() removes what was written."""

    def test_abort_removes_data(self) -> None:
        """After abort the queue directory is empty."""
        writer = self.spool.begin()
        writer.write(b"x" * (3 * WRITE_BUFFER))
        writer.abort()
        self.assertEqual(self.names(), [])

    def test_abort_is_idempotent(self) -> None:
        """A second abort does nothing and raises nothing, even if the file is already gone."""
        writer = self.spool.begin()
        os.unlink(self.spool.data_path(writer.queue_id))
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


class EntryTests(SpoolTestCase):
    """load, update, remove and data_path of committed entries."""

    def test_update_replaces_envelope(self) -> None:
        """update() replaces the envelope atomically and leaves no temporary file."""
        envelope = self.store(b"data")
        later = envelope.with_outcomes({"rcpt@example.test": Outcome("retry", "451 4.4.1 later")})
        self.spool.update(later)
        self.assertEqual(self.spool.load(envelope.id), later)
        self.assertEqual(self.names(), [envelope.id + ".env", envelope.id + ".msg"])

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

    def test_load_unknown(self) -> None:
        """load() of an unknown id raises KeyError."""
        self.assertRaises(KeyError, self.spool.load, new_queue_id(_NOW))

    def test_foreign_names_are_refused(self) -> None:
        """Text that is not a queue id never becomes a path (no escape from the spool)."""
        (self.base / "secret.env").write_bytes(b"{}")
        for bad in ("../../secret", "../secret", "", "a" * 18):
            self.assertRaises(KeyError, self.spool.load, bad)
            self.assertRaises(KeyError, self.spool.data_path, bad)
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
        """An envelope temp file (crash before the rename) is deleted, with its data."""
        queue_id = new_queue_id(_NOW)
        (self.queue / (queue_id + ".msg")).write_bytes(b"data")
        (self.queue / (queue_id + ".env.tmp")).write_bytes(make_envelope(queue_id).to_json())
        self.assertEqual(self.spool.recover(), [])
        self.assertEqual(self.names(), [])

    def test_removes_partial_entries(self) -> None:
        """Data without an envelope is a partial entry: deleted and logged as a warning."""
        committed = self.store(b"keep")
        partial = self.spool.begin()
        partial.write(b"x" * (2 * WRITE_BUFFER))
        self.assertEqual(self.spool.recover(), [committed])
        self.assertEqual(self.names(), [committed.id + ".env", committed.id + ".msg"])
        self.assertEqual(self.logged(LogLevel.warn), [partial.queue_id])

    def quarantined(self, queue_id: str, *files: str) -> None:
        """Assert C{queue_id} was moved to corrupt/ (exactly C{files}) and logged as an error."""
        self.assertEqual(self.names(), [])
        self.assertEqual(sorted(os.listdir(self.root / "corrupt")), sorted(files))
        self.assertEqual(self.logged(LogLevel.error), [queue_id])

    def test_envelope_without_data(self) -> None:
        """An envelope whose data is missing goes to corrupt/ and is logged as an error."""
        envelope = self.store(b"data")
        os.unlink(self.spool.data_path(envelope.id))
        self.assertEqual(self.spool.recover(), [])
        self.quarantined(envelope.id, envelope.id + ".env")

    def test_unparseable_envelope(self) -> None:
        """An envelope that is not valid JSON goes to corrupt/ with its data."""
        queue_id = new_queue_id(_NOW)
        (self.queue / (queue_id + ".msg")).write_bytes(b"data")
        (self.queue / (queue_id + ".env")).write_bytes(b'{"version": 1, "id": "trunc')
        self.assertEqual(self.spool.recover(), [])
        self.quarantined(queue_id, queue_id + ".env", queue_id + ".msg")

    def test_unknown_schema_version(self) -> None:
        """An envelope of an unknown schema version is not guessed at: it goes to corrupt/."""
        queue_id = new_queue_id(_NOW)
        (self.queue / (queue_id + ".msg")).write_bytes(b"data")
        (self.queue / (queue_id + ".env")).write_bytes(b'{"version": 99}')
        self.assertEqual(self.spool.recover(), [])
        self.quarantined(queue_id, queue_id + ".env", queue_id + ".msg")

    def test_envelope_naming_another_id(self) -> None:
        """An envelope whose id differs from its file name goes to corrupt/."""
        queue_id = new_queue_id(_NOW)
        (self.queue / (queue_id + ".msg")).write_bytes(b"data")
        (self.queue / (queue_id + ".env")).write_bytes(make_envelope(new_queue_id(_NOW)).to_json())
        self.assertEqual(self.spool.recover(), [])
        self.quarantined(queue_id, queue_id + ".env", queue_id + ".msg")

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
        clock = Clock()
        clock.advance(1_800_000_000)
        spool = DirectorySpool(root, clock)
        first = spool.begin()
        first.write(b"Subject: one\r\n\r\n")
        first.commit(_envelope_for(first.queue_id, 1.0))
        second = spool.begin()
        second.write(b"Subject: two\r\n\r\n")
        second.commit(_envelope_for(second.queue_id, 2.0))
        partial = spool.begin()
        partial.write(b"Subject: in progress\r\n")
        listed = [e.id for e in spool.entries()]
        self.assertEqual(listed, [first.queue_id, second.queue_id])
        self.assertTrue(
            any(name.startswith(partial.queue_id) for name in os.listdir(root / "queue"))
        )
        partial.abort()


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
