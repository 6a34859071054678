"""
L{DirectorySpool.remove_partial_updates}: the C{<id>.upd.tmp} files that a
delivery process killed mid-update leaves (the respawned delivery process
removes them at its start), and what such a leftover does to the entry's
later updates.
"""

from __future__ import annotations

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher

from relaygw.spool.envelope import Outcome
from relaygw.spool.ids import new_queue_id
from tests.test_spool_store import _NOW, SpoolTestCase


class RemovePartialUpdatesTests(SpoolTestCase):

    def test_removes_only_partial_updates(self) -> None:
        """
        Every C{<id>.upd.tmp} goes, with one warning giving the count; the
        entries, their updates, a receiving process's partial entry
        (C{<id>.tmp}) and files of other names stay.
        """
        first, second = self.store(b"one"), self.store(b"two")
        self.spool.update(first)
        for envelope in (first, second):
            (self.queue / (envelope.id + ".upd.tmp")).write_bytes(b'{"version": 1, "id"')
        gone = new_queue_id(_NOW)  # an entry delivered since its update was torn
        (self.queue / (gone + ".upd.tmp")).write_bytes(b"")
        receiving = self.spool.begin()
        receiving.write(b"x" * (1 << 17))  # over the write buffer: its .tmp exists
        (self.queue / "notes.upd.tmp").write_bytes(b"an operator's")
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(self.spool.remove_partial_updates(), 3)
        self.assertEqual(self.names(), sorted([
            first.id + ".msg", first.id + ".upd", second.id + ".msg",
            receiving.queue_id + ".tmp", "notes.upd.tmp",
        ]))
        [event] = [e for e in observer if e.get("count") is not None]
        self.assertEqual((event["log_level"], event["count"]), (LogLevel.warn, 3))
        self.assertIn("partial updates", event["log_format"])
        self.assertEqual(self.spool.load(first.id), first)
        self.assertEqual(self.spool.load(second.id), second)
        self.assertEqual(self.data(second.id), b"two")
        receiving.abort()

    def test_nothing_to_remove_logs_nothing(self) -> None:
        """A spool without partial updates is left as it is, silently."""
        envelope = self.store(b"data")
        self.spool.update(envelope)
        before = self.names()
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(self.spool.remove_partial_updates(), 0)
        self.assertEqual(self.names(), before)
        self.assertEqual(len(observer), 0)

    def test_stale_partial_update_does_not_confuse_later_updates(self) -> None:
        """
        A torn C{<id>.upd.tmp} next to an entry is never read: load and the
        listing give the last complete envelope; the next update replaces
        the leftover (truncated, then renamed) and load returns it.
        """
        envelope = self.store(b"data")
        first = envelope.with_outcomes({"rcpt@example.test": Outcome("retry", "451 4.4.1 one")})
        self.spool.update(first)
        torn = (self.queue / (envelope.id + ".upd")).read_bytes()
        leftover = self.queue / (envelope.id + ".upd.tmp")
        leftover.write_bytes(torn + b"x" * 4096)  # longer than the next update: O_TRUNC matters
        fresh = self.open_spool()  # the respawned delivery process's view
        self.assertEqual(fresh.load(envelope.id), first)
        self.assertEqual(list(fresh.iter_entries()), [first])
        second = first.with_outcomes({"rcpt@example.test": Outcome("retry", "451 4.4.1 two")})
        fresh.update(second)
        self.assertFalse(leftover.exists())
        self.assertEqual(fresh.load(envelope.id), second)
        self.assertEqual(self.open_spool().load(envelope.id), second)
        self.assertEqual(self.names(), [envelope.id + ".msg", envelope.id + ".upd"])

    def test_partial_update_survives_remove_of_its_entry(self) -> None:
        """
        remove() deletes an entry and its update but not a partial update,
        so a running delivery process would keep it for ever: only
        L{remove_partial_updates} (or the gateway's recovery) takes it.
        """
        envelope = self.store(b"data")
        leftover = self.queue / (envelope.id + ".upd.tmp")
        leftover.write_bytes(b"{")
        self.spool.remove(envelope.id)
        self.assertEqual(self.names(), [leftover.name])
        self.assertEqual(self.spool.remove_partial_updates(), 1)
        self.assertEqual(self.names(), [])
