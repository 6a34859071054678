"""Tests for L{relaygw.deliver.scheduler.Scheduler}, on a L{Clock} with scripted targets."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta

from attrs import evolve
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.fakes import all_events
from relaygw.config._model import Queue
from relaygw.deliver.bounce import INotifier
from relaygw.deliver.dsn import Report
from relaygw.deliver.scheduler import Scheduler
from relaygw.interfaces import IDeliveryTarget, IRouter, ISpool
from relaygw.spool.envelope import Envelope, Outcome, Recipient

T0 = 1_800_000_000.0
OK = Outcome("delivered", "250 2.0.0 ok", "h")
LATER = Outcome("retry", "451 4.3.0 later", "h")
NO = Outcome("bounce", "550 5.1.1 unknown", "h")


@implementer(ISpool)
class MemorySpool:
    """An in-memory ISpool holding committed envelopes; records updates and removals."""

    def __init__(self) -> None:
        self.entries: dict[str, Envelope] = {}
        self.updates: list[Envelope] = []
        self.removed: list[str] = []
        self.fail_updates = 0
        self.scans = 0

    def add(self, envelope: Envelope) -> Envelope:
        self.entries[envelope.id] = envelope
        return envelope

    def begin(self) -> object:
        raise NotImplementedError

    def recover(self) -> list[object]:
        return list(self.entries.values())

    def clean(self) -> int:
        return len(self.entries)

    def iter_entries(self) -> Iterator[Envelope]:
        self.scans += 1
        return iter(list(self.entries.values()))

    def load(self, queue_id: str) -> Envelope:
        return self.entries[queue_id]

    def open_data(self, queue_id: str) -> io.BytesIO:
        if queue_id not in self.entries:
            raise KeyError(queue_id)
        return io.BytesIO(f"data of {queue_id}".encode())

    def update(self, envelope: object) -> None:
        assert isinstance(envelope, Envelope)
        if self.fail_updates:
            self.fail_updates -= 1
            raise OSError("disk full")
        if envelope.id not in self.entries:
            raise KeyError(envelope.id)
        self.entries[envelope.id] = envelope
        self.updates.append(envelope)

    def remove(self, queue_id: str) -> None:
        self.entries.pop(queue_id, None)
        self.removed.append(queue_id)

    def subscribe(self, callback: object) -> None:
        pass


@implementer(INotifier)
class RecordingNotifier:
    """Records each DSN asked for; with C{error}, fails like a spool that cannot take it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Report]]] = []
        self.error: Exception | None = None

    def notify(self, envelope: Envelope, reports: object) -> Deferred[Envelope | None]:
        assert isinstance(reports, list)
        if self.error is not None:
            return fail(self.error)
        self.calls.append((envelope.id, reports))
        return succeed(None)


@implementer(IRouter)
class DomainRouter:
    """Routes by domain: C{local.test} -> local, C{other.test} -> other, else LookupError."""

    def route(self, address: str) -> str:
        domain = address.rpartition("@")[2]
        routes = {"local.test": "local", "other.test": "other"}
        if domain not in routes:
            raise LookupError(domain)
        return routes[domain]


@implementer(IDeliveryTarget)
class ScriptedTarget:
    """
    Answers each recipient with the next outcome scripted for it (default:
    delivered); with C{manual}, returns Deferreds the test fires.
    """

    def __init__(self, script: dict[str, list[Outcome]] | None = None, manual: bool = False):
        self.script = script or {}
        self.manual = manual
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.pending: list[tuple[Deferred[dict[str, Outcome]], dict[str, Outcome]]] = []
        self.error: Exception | None = None

    def deliver(self, envelope: object, recipients: object, open_data: object) -> object:
        assert isinstance(envelope, Envelope) and isinstance(recipients, list)
        assert callable(open_data)
        with open_data() as data:
            assert data.read() == f"data of {envelope.id}".encode()
        self.calls.append((envelope.id, tuple(recipients)))
        if self.error is not None:
            return fail(self.error)
        result = {r: (self.script.get(r) or [OK]).pop(0) for r in recipients}
        if self.manual:
            d: Deferred[dict[str, Outcome]] = Deferred()
            self.pending.append((d, result))
            return d
        return succeed(result)

    def release(self) -> None:
        d, result = self.pending.pop(0)
        d.callback(result)


def envelope(queue_id: str, *rcpts: str, received_at: float = T0, next_attempt: float = 0.0) -> Envelope:
    return Envelope(
        id=queue_id,
        sender="s@x.test",
        recipients=tuple(Recipient(r) for r in rcpts),
        connector="c",
        client_ip="127.0.0.1",
        received_at=received_at,
        size=10,
        message_id="<m@x>",
        next_attempt=next_attempt,
    )


class Harness(SynchronousTestCase):
    """A scheduler on a Clock over a MemorySpool, with scripted targets."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.spool = MemorySpool()
        self.local = ScriptedTarget()
        self.other = ScriptedTarget()
        self.notifier = RecordingNotifier()
        self.events = all_events(self)

    def scheduler(
        self, concurrency: dict[str, int] | None = None, max_active: int = 100, window: int = 10_000
    ) -> Scheduler:
        return Scheduler(
            window=window,
            rescan_interval=60.0,
            spool=self.spool,
            router=DomainRouter(),
            targets={"local": self.local, "other": self.other},
            concurrency=concurrency or {"local": 10, "other": 10},
            queue=Queue(),
            clock=self.clock,
            notifier=self.notifier,
            max_active=max_active,
        )

    def submit(self, s: Scheduler, env: Envelope) -> None:
        s.enqueue(self.spool.add(env))


class SchedulerTests(Harness):

    def test_enqueue_starts_on_next_turn(self) -> None:
        """An enqueued message is tried at once, on the next reactor turn (callLater(0))."""
        s = self.scheduler()
        self.submit(s, envelope("A", "a@local.test"))
        self.assertEqual(self.local.calls, [])
        self.clock.advance(0)
        self.assertEqual(self.local.calls, [("A", ("a@local.test",))])

    def test_enqueue_by_id_reads_the_spool_once(self) -> None:
        """
        By queue id (the delivery process's pipe), the attempt loads the
        envelope itself; an id no longer in the spool is dropped, not retried.
        """
        s = self.scheduler()
        self.spool.add(envelope("A", "a@local.test"))
        s.enqueue_id("A")
        s.enqueue_id("GONE")
        self.clock.advance(0)
        self.assertEqual(self.local.calls, [("A", ("a@local.test",))])
        self.assertIsNone(s.next_attempt("GONE"))

    def test_id_told_while_its_attempt_runs_is_not_tried_again(self) -> None:
        """
        An id told while its attempt is in flight (a new delivery process
        lists an entry, then reads its id on the pipe) is not tried again
        when that attempt ends: a committed id is never committed again, so
        a second attempt would only repeat the first (a deferred message
        retried at once instead of on its schedule).
        """
        self.local.manual = True
        self.local.script = {"a@local.test": [LATER]}
        s = self.scheduler()
        self.spool.add(envelope("A", "a@local.test"))
        s.start(self.spool.iter_entries())
        self.clock.advance(0)
        self.assertEqual(s.active, frozenset({"A"}))
        s.enqueue_id("A")
        self.local.release()
        self.clock.advance(0)
        self.assertEqual(len(self.local.calls), 1)
        self.assertEqual(s.next_attempt("A"), T0 + 60)

    def test_delivered_message_leaves_spool(self) -> None:
        """When every recipient is delivered, the entry is removed from the spool."""
        s = self.scheduler()
        self.submit(s, envelope("A", "a@local.test", "b@local.test"))
        self.clock.advance(0)
        self.assertEqual(self.local.calls, [("A", ("a@local.test", "b@local.test"))])
        self.assertEqual(self.spool.removed, ["A"])
        self.assertEqual(self.spool.updates, [])

    def test_retry_then_delivered_on_schedule(self) -> None:
        """A 4xx leaves the message queued until the first retry interval, then it is retried."""
        self.local.script = {"a@local.test": [LATER, OK]}
        s = self.scheduler()
        self.submit(s, envelope("A", "a@local.test"))
        self.clock.advance(0)
        [updated] = self.spool.updates
        self.assertEqual(updated.next_attempt, T0 + 60)
        self.assertEqual(updated.recipients[0], Recipient("a@local.test", "queued", 1, LATER.reply))
        self.clock.advance(59.9)
        self.assertEqual(len(self.local.calls), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.local.calls), 2)
        self.assertEqual(self.spool.removed, ["A"])

    def test_retry_intervals_grow(self) -> None:
        """The second failed attempt waits the second interval of queue.retry."""
        self.local.script = {"a@local.test": [LATER, LATER]}
        s = self.scheduler()
        self.submit(s, envelope("A", "a@local.test"))
        self.clock.advance(0)
        self.clock.advance(60)
        self.assertEqual(self.spool.updates[-1].next_attempt, T0 + 60 + 300)
        self.assertEqual(s.next_attempt("A"), T0 + 360)

    def test_bounce_fails_recipient(self) -> None:
        """A 5xx fails the recipient for good; with nothing queued the entry is removed."""
        self.local.script = {"a@local.test": [NO]}
        s = self.scheduler()
        self.submit(s, envelope("A", "a@local.test"))
        self.clock.advance(0)
        self.assertEqual(self.spool.removed, ["A"])
        fails = [e for e in self.events if e.get("event_id") == "FAIL"]
        self.assertEqual(len(fails), 1)
        self.assertEqual(fails[0]["smtp_code"], "550")
        self.assertEqual(fails[0]["enhanced_code"], "5.1.1")

    def test_mixed_outcomes_per_recipient(self) -> None:
        """Each recipient's fate is its own; only the queued ones are tried again."""
        self.local.script = {"b@local.test": [LATER, OK], "c@local.test": [NO]}
        s = self.scheduler()
        self.submit(s, envelope("A", "a@local.test", "b@local.test", "c@local.test"))
        self.clock.advance(0)
        states = [(r.address, r.state) for r in self.spool.updates[-1].recipients]
        self.assertEqual(
            states,
            [("a@local.test", "delivered"), ("b@local.test", "queued"), ("c@local.test", "failed")],
        )
        self.clock.advance(60)
        self.assertEqual(self.local.calls[-1], ("A", ("b@local.test",)))
        self.assertEqual(self.spool.removed, ["A"])

    def test_one_call_per_route(self) -> None:
        """Recipients are grouped by route: each route's target is called once with its share."""
        s = self.scheduler()
        self.submit(s, envelope("A", "a@local.test", "x@other.test", "b@local.test"))
        self.clock.advance(0)
        self.assertEqual(self.local.calls, [("A", ("a@local.test", "b@local.test"))])
        self.assertEqual(self.other.calls, [("A", ("x@other.test",))])

    def test_no_route_bounces(self) -> None:
        """A recipient the router has no route for gets 550 5.4.4 no route."""
        s = self.scheduler()
        self.submit(s, envelope("A", "a@local.test", "z@nowhere.test"))
        self.local.script = {"a@local.test": [LATER]}
        self.clock.advance(0)
        rcpt = self.spool.updates[-1].recipients[1]
        self.assertEqual((rcpt.state, rcpt.last_reply), ("failed", "550 5.4.4 no route"))

    def test_target_errback_is_retry(self) -> None:
        """A target whose Deferred fails leaves its recipients queued, and the failure is logged."""
        self.local.error = RuntimeError("target bug")
        s = self.scheduler()
        self.submit(s, envelope("A", "a@local.test", "x@other.test"))
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        recipients = self.spool.updates[-1].recipients
        self.assertEqual([r.state for r in recipients], ["queued", "delivered"])
        self.assertTrue(recipients[0].last_reply.startswith("451 "))
        self.assertEqual(s.next_attempt("A"), T0 + 60)

    def test_route_concurrency(self) -> None:
        """At most concurrency[route] deliveries run at once on a route."""
        self.local.manual = True
        s = self.scheduler(concurrency={"local": 1, "other": 1})
        self.submit(s, envelope("A", "a@local.test"))
        self.submit(s, envelope("B", "b@local.test"))
        self.clock.advance(0)
        self.assertEqual([c[0] for c in self.local.calls], ["A"])
        self.local.release()
        self.assertEqual([c[0] for c in self.local.calls], ["A", "B"])
        self.local.release()
        self.assertEqual(self.spool.removed, ["A", "B"])

    def test_max_active(self) -> None:
        """At most max_active messages are in flight; the next starts when one finishes."""
        self.local.manual = True
        self.other.manual = True
        s = self.scheduler(max_active=1)
        self.submit(s, envelope("A", "a@local.test"))
        self.submit(s, envelope("B", "x@other.test"))
        self.clock.advance(0)
        self.assertEqual((len(self.local.calls), len(self.other.calls)), (1, 0))
        self.assertEqual(s.active, frozenset({"A"}))
        self.local.release()
        self.clock.advance(0)
        self.assertEqual(len(self.other.calls), 1)

    def test_expiry_fails_queued_recipients(self) -> None:
        """After queue.expire, recipients still queued after an attempt fail with EXPIRE logged."""
        self.local.script = {"a@local.test": [LATER]}
        s = self.scheduler()
        old = T0 - timedelta(days=2, seconds=1).total_seconds()
        self.submit(s, envelope("A", "a@local.test", received_at=old))
        self.clock.advance(0)
        self.assertEqual(self.spool.removed, ["A"])
        expired = [e for e in self.events if e.get("event_id") == "EXPIRE"]
        self.assertEqual([e["recipient"] for e in expired], ["a@local.test"])
        self.assertEqual(expired[0]["last_reply"], LATER.reply)

    def test_next_attempt_capped_at_expiry(self) -> None:
        """A retry never waits past the expiry time of the message."""
        self.local.script = {"a@local.test": [LATER]}
        s = self.scheduler()
        received = T0 - timedelta(days=2).total_seconds() + 10
        self.submit(s, envelope("A", "a@local.test", received_at=received))
        self.clock.advance(0)
        self.assertEqual(self.spool.updates[-1].next_attempt, T0 + 10)

    def test_start_picks_up_recovered_entries(self) -> None:
        """Entries recovered at start are tried at their next_attempt time."""
        s = self.scheduler()
        self.spool.add(envelope("A", "a@local.test", next_attempt=T0 + 100))
        self.spool.add(envelope("B", "b@local.test", next_attempt=0.0))
        s.start(self.spool.load(i) for i in ("A", "B"))
        self.clock.advance(0)
        self.assertEqual([c[0] for c in self.local.calls], ["B"])
        self.clock.advance(99)
        self.assertEqual(len(self.local.calls), 1)
        self.clock.advance(1)
        self.assertEqual([c[0] for c in self.local.calls], ["B", "A"])

    def test_processing_error_keeps_message(self) -> None:
        """
        A spool that cannot record an attempt (OSError: a full disk) keeps
        the entry and schedules it again; one error line, no traceback.
        """
        self.local.script = {"a@local.test": [LATER, OK]}
        self.spool.fail_updates = 1
        s = self.scheduler()
        self.submit(s, envelope("A", "a@local.test"))
        self.clock.advance(0)
        self.assertEqual(self.flushLoggedErrors(OSError), [])
        [logged] = [e for e in self.events if "not recorded" in e.get("log_format", "")]
        self.assertEqual((logged["queue_id"], logged["log_level"].name), ("A", "error"))
        self.assertNotIn("log_failure", logged)
        self.assertIn("A", self.spool.entries)
        self.assertEqual(s.next_attempt("A"), T0 + 60)
        self.clock.advance(60)
        self.assertEqual(self.spool.removed, ["A"])

    def test_vanished_entry_is_dropped(self) -> None:
        """An id whose entry left the spool (deleted by an operator) is dropped quietly."""
        s = self.scheduler()
        s.enqueue(envelope("A", "a@local.test"))
        self.clock.advance(0)
        self.assertEqual(self.local.calls, [])
        self.assertIsNone(s.next_attempt("A"))

    def test_stop_waits_for_active(self) -> None:
        """stop() starts nothing new and fires when the deliveries in flight finish."""
        self.local.manual = True
        s = self.scheduler(max_active=1)
        self.submit(s, envelope("A", "a@local.test"))
        self.submit(s, envelope("B", "b@local.test"))
        self.clock.advance(0)
        d = s.stop()
        self.assertNoResult(d)
        self.local.release()
        self.successResultOf(d)
        self.clock.advance(1000)
        self.assertEqual([c[0] for c in self.local.calls], ["A"])
        self.assertIn("B", self.spool.entries)

    def test_stop_is_bounded(self) -> None:
        """stop() fires after its timeout even if a delivery never finishes."""
        self.local.manual = True
        s = self.scheduler()
        self.submit(s, envelope("A", "a@local.test"))
        self.clock.advance(0)
        d = s.stop()
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.successResultOf(d)

    def test_stop_when_idle(self) -> None:
        """stop() with nothing in flight fires at once."""
        self.successResultOf(self.scheduler().stop())

    def test_deliver_event_fields(self) -> None:
        """A delivery is logged as DELIVER with queue id, route, recipient and codes."""
        s = self.scheduler()
        self.submit(s, envelope("A", "a@local.test"))
        self.clock.advance(0)
        [event] = [e for e in self.events if e.get("event_id") == "DELIVER"]
        self.assertEqual(
            (event["queue_id"], event["route"], event["recipient"], event["smtp_code"]),
            ("A", "local", "a@local.test", "250"),
        )
        self.assertEqual(event["enhanced_code"], "2.0.0")

    def test_defer_event(self) -> None:
        """A retry is logged as DEFER."""
        self.local.script = {"a@local.test": [LATER]}
        s = self.scheduler()
        self.submit(s, envelope("A", "a@local.test"))
        self.clock.advance(0)
        self.assertEqual(
            [e["recipient"] for e in self.events if e.get("event_id") == "DEFER"],
            ["a@local.test"],
        )

    def test_reconfigure_changes_targets(self) -> None:
        """After reconfigure, new attempts use the new targets."""
        s = self.scheduler()
        replacement = ScriptedTarget()
        s.reconfigure(DomainRouter(), {"local": replacement, "other": self.other}, {}, Queue())
        self.submit(s, envelope("A", "a@local.test"))
        self.clock.advance(0)
        self.assertEqual((self.local.calls, len(replacement.calls)), ([], 1))

    def test_delivered_recipient_not_retried(self) -> None:
        """A recovered envelope whose recipients are partly delivered only retries the rest."""
        s = self.scheduler()
        env = envelope("A", "a@local.test", "b@local.test")
        env = evolve(env, recipients=(Recipient("a@local.test", "delivered", 1), env.recipients[1]))
        self.spool.add(env)
        s.start([env])
        self.clock.advance(0)
        self.assertEqual(self.local.calls, [("A", ("b@local.test",))])


class NotificationTests(SynchronousTestCase):
    """What the scheduler asks its notifier for, and what it records afterwards."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.spool = MemorySpool()
        self.local = ScriptedTarget()
        self.notifier = RecordingNotifier()

    def scheduler(self, queue: Queue | None = None) -> Scheduler:
        return Scheduler(
            spool=self.spool,
            router=DomainRouter(),
            targets={"local": self.local},
            concurrency={},
            queue=queue or Queue(),
            clock=self.clock,
            notifier=self.notifier,
        )

    def test_one_report_for_every_failed_recipient(self) -> None:
        """Two recipients failing in one attempt are one notification with both, in order."""
        other = Outcome("bounce", "554 5.7.1 refused", "h2")
        self.local.script = {"a@local.test": [NO], "c@local.test": [other]}
        s = self.scheduler()
        s.enqueue(self.spool.add(envelope("A", "a@local.test", "b@local.test", "c@local.test")))
        self.clock.advance(0)
        [(queue_id, reports)] = self.notifier.calls
        self.assertEqual(queue_id, "A")
        self.assertEqual(
            [(r.recipient, r.action, r.outcome) for r in reports],
            [("a@local.test", "failed", NO), ("c@local.test", "failed", other)],
        )
        self.assertEqual(self.spool.removed, ["A"])

    def test_no_notification_without_failure(self) -> None:
        """Delivered and deferred recipients alone ask for no DSN."""
        self.local.script = {"b@local.test": [LATER]}
        s = self.scheduler()
        s.enqueue(self.spool.add(envelope("A", "a@local.test", "b@local.test")))
        self.clock.advance(0)
        self.assertEqual(self.notifier.calls, [])

    def test_expiry_is_reported_with_last_reply(self) -> None:
        """Expired recipients are reported as failed, 5.4.7, quoting the reply that kept them."""
        self.local.script = {"a@local.test": [LATER]}
        s = self.scheduler()
        old = T0 - timedelta(days=2, seconds=1).total_seconds()
        s.enqueue(self.spool.add(envelope("A", "a@local.test", received_at=old)))
        self.clock.advance(0)
        [(_, [report])] = self.notifier.calls
        self.assertEqual((report.recipient, report.action), ("a@local.test", "failed"))
        self.assertEqual(
            report.outcome.reply, "550 5.4.7 Delivery time expired (last reply: 451 4.3.0 later)"
        )

    def test_unspooled_dsn_keeps_recipients_queued(self) -> None:
        """
        When the DSN cannot be spooled, its recipients are not recorded as
        failed: they stay queued and are tried again, so the bounce is not lost.
        """
        self.notifier.error = OSError("disk full")
        self.local.script = {"a@local.test": [NO, NO], "b@local.test": [OK]}
        s = self.scheduler()
        s.enqueue(self.spool.add(envelope("A", "a@local.test", "b@local.test")))
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        states = [(r.address, r.state) for r in self.spool.entries["A"].recipients]
        self.assertEqual(states, [("a@local.test", "queued"), ("b@local.test", "delivered")])
        self.notifier.error = None
        self.clock.advance(60)
        self.assertEqual(self.local.calls[-1], ("A", ("a@local.test",)))
        self.assertEqual([r.recipient for r in self.notifier.calls[0][1]], ["a@local.test"])
        self.assertEqual(self.spool.removed, ["A"])

    def test_unspooled_expiry_dsn_is_retried_later(self) -> None:
        """An expired message whose DSN failed is not retried in a loop, but after retry[0]."""
        self.notifier.error = OSError("disk full")
        self.local.script = {"a@local.test": [LATER, LATER]}
        s = self.scheduler()
        old = T0 - timedelta(days=3).total_seconds()
        s.enqueue(self.spool.add(envelope("A", "a@local.test", received_at=old)))
        self.clock.advance(0)
        self.flushLoggedErrors(OSError)
        self.assertEqual(s.next_attempt("A"), T0 + 60)
        self.notifier.error = None
        self.clock.advance(60)
        self.assertEqual(len(self.notifier.calls), 1)
        self.assertEqual(self.spool.removed, ["A"])

    def test_delay_warning_once(self) -> None:
        """Once queued for delay_warning, one delayed report; the envelope remembers it."""
        self.local.script = {"a@local.test": [LATER, LATER], "b@local.test": [OK]}
        s = self.scheduler()
        old = T0 - timedelta(hours=4).total_seconds()
        s.enqueue(self.spool.add(envelope("A", "a@local.test", "b@local.test", received_at=old)))
        self.clock.advance(0)
        [(_, [report])] = self.notifier.calls
        self.assertEqual((report.recipient, report.action, report.outcome), ("a@local.test", "delayed", LATER))
        self.assertTrue(self.spool.entries["A"].delay_warned)
        self.clock.advance(60)
        self.assertEqual(len(self.local.calls), 2)
        self.assertEqual(len(self.notifier.calls), 1)

    def test_delay_warning_not_yet(self) -> None:
        """Before delay_warning has passed, no warning; the next attempt is no later than it."""
        queue = Queue(retry=(timedelta(hours=10),))
        self.local.script = {"a@local.test": [LATER, LATER]}
        s = self.scheduler(queue)
        s.enqueue(self.spool.add(envelope("A", "a@local.test")))
        self.clock.advance(0)
        self.assertEqual(self.notifier.calls, [])
        self.assertEqual(s.next_attempt("A"), T0 + 4 * 3600)
        self.clock.advance(4 * 3600)
        self.assertEqual([r.action for r in self.notifier.calls[0][1]], ["delayed"])
        self.assertEqual(s.next_attempt("A"), T0 + 14 * 3600)

    def test_delay_warning_disabled(self) -> None:
        """delay_warning = "0s" sends none."""
        self.local.script = {"a@local.test": [LATER]}
        s = self.scheduler(Queue(delay_warning=timedelta(0)))
        old = T0 - timedelta(hours=5).total_seconds()
        s.enqueue(self.spool.add(envelope("A", "a@local.test", received_at=old)))
        self.clock.advance(0)
        self.assertEqual(self.notifier.calls, [])
        self.assertFalse(self.spool.entries["A"].delay_warned)

    def test_no_delay_warning_for_null_sender(self) -> None:
        """A message from <> (a DSN) is never warned about."""
        self.local.script = {"a@local.test": [LATER]}
        s = self.scheduler()
        old = T0 - timedelta(hours=5).total_seconds()
        s.enqueue(self.spool.add(evolve(envelope("A", "a@local.test", received_at=old), sender="")))
        self.clock.advance(0)
        self.assertEqual(self.notifier.calls, [])

    def test_unspooled_delay_warning_is_tried_again(self) -> None:
        """A warning that could not be spooled is not marked sent, and goes at the next attempt."""
        self.notifier.error = OSError("disk full")
        self.local.script = {"a@local.test": [LATER, LATER]}
        s = self.scheduler()
        old = T0 - timedelta(hours=5).total_seconds()
        s.enqueue(self.spool.add(envelope("A", "a@local.test", received_at=old)))
        self.clock.advance(0)
        self.flushLoggedErrors(OSError)
        self.assertFalse(self.spool.entries["A"].delay_warned)
        self.notifier.error = None
        self.clock.advance(60)
        self.assertEqual(len(self.notifier.calls), 1)
        self.assertTrue(self.spool.entries["A"].delay_warned)


class WindowTests(Harness):
    """The bounded window over the spool: more entries than it holds."""

    def test_window_bounds_the_ids_held_and_every_entry_is_delivered_once(self) -> None:
        """
        50 entries, all due, a window of 10 and 3 at a time: at most 10 ids
        are held at any moment; each rescan takes the earliest again; all 50
        are delivered, none twice, in due order within each window.
        """
        for n in range(50):
            self.spool.add(envelope(f"E{n:02d}", f"r{n}@local.test", next_attempt=T0 - 50 + n))
        s = self.scheduler(window=10, max_active=3)
        s.start(self.spool.iter_entries())
        self.assertEqual(s.held, 10)
        self.assertEqual(sorted(s.next_attempt(f"E{n:02d}") or 0 for n in range(10)),
                         [T0 - 50 + n for n in range(10)])
        held = []
        for _ in range(10):
            self.clock.advance(0)
            held.append(s.held)
            self.clock.advance(60)  # a rescan
        self.assertLessEqual(max(held), 10)
        delivered = [queue_id for queue_id, _ in self.local.calls]
        self.assertEqual(sorted(delivered), [f"E{n:02d}" for n in range(50)])
        self.assertEqual(len(set(delivered)), 50)
        self.assertEqual(delivered[:10], [f"E{n:02d}" for n in range(10)])
        self.assertEqual(self.spool.entries, {})

    def test_full_window_keeps_deferred_entries_on_disk(self) -> None:
        """
        A deferred entry that finds the window full waits in the spool; a
        new entry due at once is still tried at once.
        """
        for n in range(5):
            self.spool.add(envelope(f"L{n}", f"r{n}@local.test", next_attempt=T0 + 3600))
        s = self.scheduler(window=5)
        s.start(self.spool.iter_entries())
        self.local.script = {"late@local.test": [LATER, OK]}
        self.submit(s, envelope("NEW", "late@local.test"))
        self.clock.advance(0)
        self.assertEqual(self.local.calls, [("NEW", ("late@local.test",))])
        self.assertIsNone(s.next_attempt("NEW"))  # not held: the window is full
        self.assertEqual(s.held, 5)
        self.assertEqual(self.spool.entries["NEW"].next_attempt, T0 + 60)
        # The rescan 60 s later finds it due (in place of a later entry),
        # and it is tried at once.
        scans = self.spool.scans
        self.clock.advance(60)
        self.assertEqual(self.spool.scans, scans + 1)
        self.assertEqual(self.local.calls[-1], ("NEW", ("late@local.test",)))
        self.assertNotIn("NEW", self.spool.entries)
        self.assertEqual(s.held, 4)

    def test_no_rescans_while_everything_fits(self) -> None:
        for n in range(5):
            self.spool.add(envelope(f"L{n}", f"r{n}@local.test", next_attempt=T0 + 3600))
        s = self.scheduler(window=10)
        s.start(self.spool.iter_entries())
        scans = self.spool.scans
        self.clock.advance(600)
        self.assertEqual(self.spool.scans, scans)
