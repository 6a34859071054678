"""
Tests for the message tracking log writer (SPEC section 5): the rows each
event stands for, the file format, rotation by UTC day and by size,
continuing after a restart, clean-up by age, the writer off the reactor, and
a slow disk that drops rows (counted) instead of growing without bound.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import LogPublisher

from relaygw.ops.tracking import (
    FIELDS,
    TrackingLog,
    read_rows,
    rows_of,
    tracking_dir,
    utc_stamp,
)

#: 2026-12-06 23:59:59 UTC.
LATE = datetime(2026, 12, 6, 23, 59, 59, tzinfo=timezone.utc).timestamp()


def _received(when: float, **extra: Any) -> dict[str, Any]:
    event = {"event": "receive.queued", "log_time": when, "queue_id": "Q1",
             "message_id": "<m1@corp.test>", "connector": "Default", "peer": "127.0.0.9:4000",
             "helo": "printer.corp.test", "auth_user": "scan", "sender": "a@corp.test",
             "recipients": ["b@corp.test", "c@corp.test"], "size": 1234, "smtp_code": 250,
             "session_id": "08DD"}
    event.update(extra)
    return event


def _inline(work: Callable[[], None]) -> Deferred[None]:
    return maybeDeferred(work)  # as deferToThreadPool: a failure, not a raise


def _log(tmp_path: Path, clock: Clock | None = None, **kwargs: Any) -> tuple[TrackingLog, Clock]:
    if clock is None:
        clock = Clock()
        clock.advance(LATE)
    return TrackingLog(tmp_path, clock, run=_inline, **kwargs), clock


def _lines(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8").split("\r\n")


def test_received_message_is_one_row_per_recipient() -> None:
    rows = rows_of(_received(LATE))
    assert [r["recipient-address"] for r in rows] == ["b@corp.test", "c@corp.test"]
    assert rows[0] == {
        "date-time": "2026-12-06T23:59:59.000Z", "event-id": "RECEIVE",
        "internal-message-id": "Q1", "message-id": "<m1@corp.test>", "connector-id": "Default",
        "client-ip": "127.0.0.9", "auth-user": "scan", "sender-address": "a@corp.test",
        "recipient-address": "b@corp.test", "recipient-status": "250", "total-bytes": "1234",
        "remote-host": "printer.corp.test",
    }


def test_ipv6_peer_keeps_its_address() -> None:
    [row, _] = rows_of(_received(LATE, peer="2001:db8::7:52000"))
    assert row["client-ip"] == "2001:db8::7"


def test_delivery_events() -> None:
    common = {"log_time": LATE, "queue_id": "Q1", "message_id": "<m1@corp.test>",
              "sender": "a@corp.test", "recipient": "b@remote.test", "connector": "Default",
              "client_ip": "127.0.0.9", "auth_user": None, "size": 10}
    [deliver] = rows_of(dict(common, event_id="DELIVER", reply="250 2.0.0 Ok",
                             remote_host="mx.remote.test"))
    assert (deliver["event-id"], deliver["recipient-status"], deliver["remote-host"]) == (
        "DELIVER", "250 2.0.0 Ok", "mx.remote.test")
    assert deliver["auth-user"] == ""
    [expire] = rows_of(dict(common, event_id="EXPIRE", last_reply="451 4.4.1 no answer"))
    assert expire["recipient-status"] == "451 4.4.1 no answer"
    [dsn] = rows_of(dict(common, event_id="DSN", action="failed", status="5.1.1"))
    assert (dsn["event-id"], dsn["recipient-status"]) == ("DSN", "failed 5.1.1")
    [notice] = rows_of(dict(common, event_id="RECEIVE", queue_id="D1", sender="",
                            recipient="a@corp.test", original_queue_id="Q1"))
    assert (notice["internal-message-id"], notice["recipient-status"]) == ("D1", "DSN of Q1")


def test_other_events_make_no_rows() -> None:
    assert rows_of({"event": "auth.failed", "user": "scan", "log_time": LATE}) == []
    assert rows_of({"log_format": "anything", "password": "hunter2"}) == []


def test_only_the_spec_fields_are_written(tmp_path: Path) -> None:
    """An event carrying a secret field cannot put it in the file."""
    log, clock = _log(tmp_path)
    log(_received(LATE, password="S3cret!", auth_payload="AHNjYW4AUzNjcmV0IQ=="))
    clock.advance(1)
    [path] = tracking_dir(tmp_path).iterdir()
    text = path.read_text()
    assert "S3cret" not in text and "AHNjYW4" not in text


def test_file_format(tmp_path: Path) -> None:
    log, clock = _log(tmp_path)
    log(_received(LATE, sender='odd,"name"@corp.test', helo="evil\r\nINJECTED"))
    clock.advance(0.5)
    [path] = tracking_dir(tmp_path).iterdir()
    assert path.name == "MSGTRK20261206-1.LOG"
    lines = _lines(path)
    assert lines[0] == "#Software: relaygw"
    assert lines[1].startswith("#Version: ")
    assert lines[2] == "#Log-type: Message Tracking Log"
    assert lines[3] == "#Date: " + utc_stamp(LATE + 0.5)  # when the file was started
    assert lines[4] == "#Fields: " + ",".join(FIELDS)
    assert lines[4] == (
        "#Fields: date-time,event-id,internal-message-id,message-id,connector-id,client-ip,"
        "auth-user,sender-address,recipient-address,recipient-status,total-bytes,remote-host")
    assert len(lines) == 5 + 2 + 1 and lines[-1] == ""  # two rows, CRLF-terminated
    [row, _] = list(csv.reader(lines[5:7]))
    assert row[7] == 'odd,"name"@corp.test'
    assert row[11] == "evil  INJECTED"
    assert [r["sender-address"] for r in read_rows(tmp_path)] == ['odd,"name"@corp.test'] * 2


def test_rows_wait_for_the_timer_then_one_write(tmp_path: Path) -> None:
    writes: list[int] = []

    def counting(work: Callable[[], None]) -> Deferred[None]:
        writes.append(1)
        return _inline(work)

    clock = Clock()
    clock.advance(LATE)
    log = TrackingLog(tmp_path, clock, run=counting)
    for _ in range(50):
        log(_received(LATE))
    assert writes == [] and not tracking_dir(tmp_path).exists()
    clock.advance(0.5)
    assert writes == [1]
    assert len(list(read_rows(tmp_path))) == 100


def test_later_flushes_continue_the_file(tmp_path: Path) -> None:
    log, clock = _log(tmp_path)
    for i in range(3):
        log(_received(LATE, queue_id=f"Q{i}"))
        clock.advance(0.5)
    [path] = tracking_dir(tmp_path).iterdir()
    assert path.name == "MSGTRK20261206-1.LOG"
    assert _lines(path)[0] == "#Software: relaygw" and sum(
        line.startswith("#Fields:") for line in _lines(path)) == 1
    assert len(list(read_rows(tmp_path))) == 6


def test_day_rotation_is_utc(tmp_path: Path) -> None:
    log, clock = _log(tmp_path)
    log(_received(LATE))
    log(_received(LATE + 2))  # 2026-12-07 00:00:01 UTC
    clock.advance(0.5)
    names = sorted(p.name for p in tracking_dir(tmp_path).iterdir())
    assert names == ["MSGTRK20261206-1.LOG", "MSGTRK20261207-1.LOG"]


def test_size_cap_starts_the_next_file(tmp_path: Path) -> None:
    log, clock = _log(tmp_path, max_bytes=2000)
    for i in range(20):
        log(_received(LATE, queue_id=f"Q{i}"))
    clock.advance(0.5)
    paths = sorted(tracking_dir(tmp_path).iterdir(), key=lambda p: int(p.stem.split("-")[1]))
    assert len(paths) > 1
    assert all(p.stat().st_size <= 2000 for p in paths)
    assert all(_lines(p)[4].startswith("#Fields:") for p in paths)
    assert [r["internal-message-id"] for r in read_rows(tmp_path)][::2] == [
        f"Q{i}" for i in range(20)]


def test_restart_continues_the_days_last_file(tmp_path: Path) -> None:
    log, clock = _log(tmp_path, max_bytes=2000)
    for i in range(20):
        log(_received(LATE, queue_id=f"Q{i}"))
    clock.advance(0.5)
    log.stop()
    before = sorted(p.name for p in tracking_dir(tmp_path).iterdir())
    again, clock2 = _log(tmp_path, max_bytes=2000)
    again(_received(LATE, queue_id="AFTER", recipients=["z@corp.test"]))
    clock2.advance(0.5)
    after = sorted(p.name for p in tracking_dir(tmp_path).iterdir())
    assert set(before) <= set(after) and len(after) - len(before) <= 1
    last = [r["internal-message-id"] for r in read_rows(tmp_path)][-1]
    assert last == "AFTER"


def test_old_files_are_removed_at_start(tmp_path: Path) -> None:
    directory = tracking_dir(tmp_path)
    directory.mkdir()
    for name in ("MSGTRK20261001-1.LOG", "MSGTRK20261105-1.LOG", "MSGTRK20261106-1.LOG",
                 "notes.txt"):
        (directory / name).write_text("#Software: relaygw\r\n")
    log, _ = _log(tmp_path, max_age=timedelta(days=30))
    log.start(LogPublisher())
    # 2026-11-05 ended 31 days before LATE's day ended; 11-06 is within 30 days.
    assert sorted(os.listdir(directory)) == [
        "MSGTRK20261106-1.LOG", "notes.txt"]


def test_a_new_day_cleans_up(tmp_path: Path) -> None:
    directory = tracking_dir(tmp_path)
    directory.mkdir()
    (directory / "MSGTRK20261106-1.LOG").write_text("#Software: relaygw\r\n")
    log, clock = _log(tmp_path, max_age=timedelta(days=30))
    clock.advance(86400)
    log(_received(LATE + 86400))
    clock.advance(0.5)
    assert sorted(os.listdir(directory)) == ["MSGTRK20261207-1.LOG"]


def test_observer_of_a_publisher(tmp_path: Path) -> None:
    publisher = LogPublisher()
    log, clock = _log(tmp_path)
    log.start(publisher)
    publisher(_received(LATE))
    publisher({"event": "something.else", "log_time": LATE})
    d = log.stop()
    assert d.called
    assert len(list(read_rows(tmp_path))) == 2
    publisher(_received(LATE))  # no longer observed
    assert clock.getDelayedCalls() == []
    assert len(list(read_rows(tmp_path))) == 2


def test_slow_disk_drops_beyond_the_bound_and_says_so(tmp_path: Path) -> None:
    """One write in flight at a time; rows beyond max_buffered are dropped and counted."""
    pending: list[tuple[Callable[[], None], Deferred[None]]] = []

    def slow(work: Callable[[], None]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        pending.append((work, d))
        return d

    clock = Clock()
    clock.advance(LATE)
    log = TrackingLog(tmp_path, clock, run=slow, max_buffered=10)
    log(_received(LATE))
    clock.advance(0.5)
    assert len(pending) == 1  # the first flush is in flight
    for i in range(10):
        log(_received(LATE, queue_id=f"W{i}"))  # 20 rows offered, 10 kept
    clock.advance(5)
    assert len(pending) == 1  # no second write while one is in flight
    work, d = pending.pop()
    work()
    d.callback(None)
    clock.advance(0.5)
    work, d = pending.pop()
    work()
    d.callback(None)
    assert len(list(read_rows(tmp_path))) == 2 + 10


def test_write_failure_is_logged_not_raised(tmp_path: Path) -> None:
    (tmp_path / "MessageTracking").write_text("a file where the directory should be")
    log, clock = _log(tmp_path)
    log(_received(LATE))
    clock.advance(0.5)  # must not raise
    log(_received(LATE))
    clock.advance(0.5)
    assert clock.getDelayedCalls() == []
