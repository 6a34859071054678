"""
Tests for the per-message events' own stream (L{relaygw.events}): they
reach the tracking log once whether or not twistd's log gets a copy
(C{gateway.log_messages}), and a child's marked events go back onto the
stream in the gateway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogPublisher, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from relaygw.config._load import load_text
from relaygw.events import MESSAGES, TwistdCopy, forward_to_parent, is_copy, republish
from relaygw.ops.tracking import TrackingLog, read_rows

_EVENT = {"event": "receive.queued", "log_time": 1_800_000_000.0, "queue_id": "Q1",
          "recipients": ["a@corp.test"], "sender": "s@corp.test", "peer": "127.0.0.1:1"}


class StreamTests(SynchronousTestCase):
    def _tracking(self, tmp: Path) -> TrackingLog:
        clock = Clock()
        log = TrackingLog(tmp, clock, run=maybeDeferred, flush_every=0.0)
        log.start(globalLogPublisher)
        self.addCleanup(log.stop)
        self._clock = clock
        return log

    def _rows(self, tmp: Path) -> list[dict[str, str]]:
        self._clock.advance(1)
        return list(read_rows(tmp))

    def test_not_in_twistds_log_by_default(self) -> None:
        tmp = Path(self.mktemp())
        self._tracking(tmp)
        seen = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        MESSAGES(dict(_EVENT))
        self.assertEqual([e for e in seen if e.get("event") == "receive.queued"], [])
        self.assertEqual([r["internal-message-id"] for r in self._rows(tmp)], ["Q1"])

    def test_copy_for_twistds_log_counted_once(self) -> None:
        tmp = Path(self.mktemp())
        self._tracking(tmp)
        seen = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        copy = TwistdCopy()
        MESSAGES.addObserver(copy)
        self.addCleanup(MESSAGES.removeObserver, copy)
        MESSAGES(dict(_EVENT))
        [logged] = [e for e in seen if e.get("event") == "receive.queued"]
        self.assertTrue(is_copy(logged))
        self.assertEqual([r["internal-message-id"] for r in self._rows(tmp)], ["Q1"])

    def test_child_events_come_back_to_the_stream(self) -> None:
        child_global = LogPublisher()
        sent: list[dict[str, Any]] = []
        child_global.addObserver(sent.append)
        # The child's log stream: a publisher of the test's own.
        import relaygw.events as events

        self.patch(events, "globalLogPublisher", child_global)
        forwarder = forward_to_parent()
        MESSAGES(dict(_EVENT))
        MESSAGES.removeObserver(forwarder)
        [marked] = sent
        on_stream: list[dict[str, Any]] = []
        other: list[dict[str, Any]] = []
        MESSAGES.addObserver(on_stream.append)
        self.addCleanup(MESSAGES.removeObserver, on_stream.append)
        republish(dict(marked), other.append)
        republish({"event": "auth.result"}, other.append)
        self.assertEqual([e["queue_id"] for e in on_stream], ["Q1"])
        self.assertEqual([e["event"] for e in other], ["auth.result"])


def test_log_messages_key() -> None:
    base = '[[connectors]]\nname = "C"\nbindings = ["127.0.0.1:2525"]\n[gateway]\nhostname = "gw.test"\n'
    assert load_text(base, "t.toml", Path(".")).gateway.log_messages is False
    on = load_text(base + "log_messages = true\n", "t.toml", Path("."))
    assert on.gateway.log_messages is True


def _plain_event() -> dict[str, object]:
    from twisted.logger import LogLevel, Logger

    return {
        "log_format": "message {queue_id} queued from {peer}", "log_level": LogLevel.info,
        "log_namespace": "relaygw.session", "log_time": 1700000000.5, "log_logger": Logger(),
        "log_source": object(), "queue_id": "q1", "peer": "127.0.0.1", "recipients": 2,
        "event": "receive.queued", "message_event": True, "tags": ["a", "b"],
    }


def test_child_json_reads_back_as_twisteds() -> None:
    """A child's record reads back, with eventFromJSON, as Twisted's own does."""
    from twisted.logger import eventAsJSON, eventFromJSON, formatEvent

    from relaygw.events import _as_json, event_from_child

    ours = event_from_child(_as_json(_plain_event()).encode())
    theirs = eventFromJSON(eventAsJSON(_plain_event()))
    assert ours["log_level"] is theirs["log_level"]
    assert formatEvent(ours) == formatEvent(theirs) == "message q1 queued from 127.0.0.1"
    for key in ("queue_id", "peer", "recipients", "event", "message_event", "tags", "log_time",
                "log_namespace"):
        assert ours[key] == theirs[key]


def test_child_json_falls_back_to_twisteds() -> None:
    """Bytes, objects and failures take eventAsJSON's own way (nothing raises, nothing is lost)."""
    from twisted.python.failure import Failure

    from relaygw.events import _as_json, event_from_child

    event = dict(_plain_event(), data=b"\xff", when=object())
    assert event_from_child(_as_json(event).encode())["data"] == "\xff"
    try:
        1 / 0
    except ZeroDivisionError:
        failed = dict(_plain_event(), log_failure=Failure())
    restored = event_from_child(_as_json(failed).encode())
    assert restored["log_failure"].check(ZeroDivisionError)
    assert restored["log_level"] is failed["log_level"]


def test_event_from_child_refuses_what_is_not_an_event() -> None:
    import pytest

    from relaygw.events import event_from_child

    for record in (b"not json", b"[1, 2]", b"\xff\xfe"):
        with pytest.raises(ValueError):
            event_from_child(record)
