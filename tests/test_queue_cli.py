"""
Tests for C{relaygw queue} (L{relaygw.cli.queue}) and the delivery side of
its requests (L{relaygw.spool.control}), on a real spool with real
committed entries.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from attrs import evolve
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from relaygw._types import ISpoolReactor
from relaygw.cli.main import run
from relaygw.cli.queue import queue_delete, queue_list, queue_retry, queue_show
from relaygw.config._model import Queue
from relaygw.deliver.bounce import INotifier
from relaygw.deliver.scheduler import Scheduler
from relaygw.interfaces import IDeliveryTarget, IRouter
from relaygw.spool.control import (
    ControlPoller,
    Request,
    SpoolLock,
    lock_holder,
    pending_requests,
    queued_ids,
    write_request,
)
from relaygw.spool.envelope import Envelope, Outcome, Recipient, TLSInfo
from relaygw.spool.store import DirectorySpool

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
DATA = b"Subject: quarterly report\r\nFrom: Printer <scan@example.test>\r\n\r\nsecret body\r\n"

_CONFIG = """
[gateway]
hostname = "mx.example.test"
spool_dir = "spool"
log_dir = "log"

[[accepted_domains]]
domain = "example.test"
route = "local"

[[connectors]]
name = "Default"
bindings = ["127.0.0.1:2525"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"

[[routes]]
name = "local"
via = "maildir"
maildir = "mail"
"""


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "relaygw.toml"
    path.write_text(_CONFIG)
    return str(path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(T0)
    return clock


@pytest.fixture
def spool(root: Path, clock: Clock) -> Iterator[DirectorySpool]:
    """The spool a gateway would use (created here, like the receiving process does)."""
    spool = DirectorySpool(root, cast(ISpoolReactor, clock))
    yield spool
    spool.close()


def commit(spool: DirectorySpool, *rcpts: str, received_at: float = T0, **fields: object) -> Envelope:
    """Commit one message for C{rcpts} through the spool's writer, as intake does."""
    writer = spool.begin()
    writer.write(DATA)
    envelope = Envelope(
        id=writer.queue_id,
        sender="scan@example.test",
        recipients=tuple(Recipient(r) for r in rcpts),
        connector="Default",
        client_ip="127.0.0.5",
        received_at=received_at,
        size=len(DATA),
        message_id="<report@example.test>",
        client_port=40000,
        helo="printer.example.test",
        **fields,  # type: ignore[arg-type]
    )
    writer.commit_now(envelope)
    return envelope


def deferred(spool: DirectorySpool, envelope: Envelope, reply: str, when: float) -> Envelope:
    """Record a 4xx for every queued recipient, as an attempt would."""
    changed = evolve(
        envelope.with_outcomes({r.address: Outcome("retry", reply) for r in envelope.pending}),
        next_attempt=when,
    )
    spool.update(changed)
    return changed


@pytest.fixture
def delivery(root: Path) -> Iterator[SpoolLock]:
    """A running delivery process, as far as the command line can tell: the lock is held."""
    lock = SpoolLock.acquire(root, wait=False)
    assert lock is not None
    yield lock
    lock.release()


# -- list and show ----------------------------------------------------------------


def test_list_without_spool_is_empty(config: str, root: Path) -> None:
    """A spool never created is an empty queue, and list does not create it."""
    assert queue_list(config) == (0, "Mail queue is empty")
    assert not root.exists()


def test_list_shows_messages_and_pending_recipients(config: str, spool: DirectorySpool) -> None:
    """
    One line per message (id, UTC received time, age, size, sender), oldest
    first; then each pending recipient with attempts, next attempt and last
    reply; delivered recipients are not listed.
    """
    old = commit(spool, "a@example.test", "b@example.test", received_at=T0 - 7200)
    old = deferred(spool, old, "451 4.4.1 connection refused", T0 + 300)
    spool.update(old.with_outcomes({"b@example.test": Outcome("delivered", "250 ok")}))
    new = commit(spool, "c@example.test")
    status, text = queue_list(config, now=T0 + 90)
    assert status == 0
    assert text.splitlines() == [
        "QUEUE ID            RECEIVED (UTC)           AGE       SIZE  SENDER",
        f"{old.id}  2027-01-15T06:00:00Z   2h01m  {len(DATA):>9}  <scan@example.test>",
        "    a@example.test  (1 attempt, next 2027-01-15T08:05:00Z):"
        " 451 4.4.1 connection refused",
        f"{new.id}  2027-01-15T08:00:00Z      1m  {len(DATA):>9}  <scan@example.test>",
        "    c@example.test  (0 attempts, next at once)",
        f"-- 2 messages, {2 * len(DATA)} octets, 2 pending recipients",
    ]


def test_show_prints_envelope_and_headers(config: str, spool: DirectorySpool) -> None:
    """show prints the envelope's details and the message's headers, not its body."""
    envelope = commit(spool, "a@example.test", auth_user="scanner",
                      tls=TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"))
    deferred(spool, envelope, "451 4.4.1 later", T0 + 60)
    status, text = queue_show(config, envelope.id, now=T0 + 5)
    assert status == 0
    lines = text.splitlines()
    assert f"Queue ID:      {envelope.id}" in lines
    assert "Message-ID:    <report@example.test>" in lines
    assert "Received:      2027-01-15T08:00:00Z (5s ago)" in lines
    assert "Sender:        <scan@example.test>" in lines
    assert "Client:        127.0.0.5:40000, HELO printer.example.test" in lines
    assert "Auth user:     scanner" in lines
    assert "TLS:           TLSv1.3 TLS_AES_256_GCM_SHA384" in lines
    assert "Next attempt:  2027-01-15T08:01:00Z" in lines
    assert "  a@example.test  queued, 1 attempt: 451 4.4.1 later" in lines
    assert lines[-2:] == ["Subject: quarterly report", "From: Printer <scan@example.test>"]
    assert "secret body" not in text


@pytest.mark.parametrize("action", ["show", "retry", "delete"])
def test_unknown_id_is_status_1(config: str, spool: DirectorySpool, action: str) -> None:
    """An id not in the queue (or not an id at all) is exit status 1 with a clear message."""
    commit(spool, "a@example.test")
    for queue_id in ("0000000000000000ZZ", "../../etc/passwd"):
        out, err = io.StringIO(), io.StringIO()
        status = run(["queue", action, queue_id, "-c", config], stdout=out, stderr=err)
        assert (status, out.getvalue()) == (1, "")
        assert err.getvalue() == f"no message {queue_id} in the queue\n"


def test_run_accepts_config_before_or_after_the_action(config: str, spool: DirectorySpool) -> None:
    """`queue list -c PATH` and `queue -c PATH list` both read that configuration."""
    envelope = commit(spool, "a@example.test")
    for argv in (["queue", "list", "-c", config], ["queue", "-c", config, "list"]):
        out = io.StringIO()
        assert run(argv, stdout=out) == 0
        assert envelope.id in out.getvalue()


# -- changes without a delivery process: on the spool directly -----------------------


def test_retry_without_delivery_process_sets_next_attempt(
    config: str, root: Path, spool: DirectorySpool
) -> None:
    """Without a delivery process, retry records "at once" in the spool, for its next start."""
    envelope = deferred(spool, commit(spool, "a@example.test"), "451 later", T0 + 900)
    status, text = queue_retry(config, envelope.id)
    assert status == 0 and "1 message changed" in text
    assert spool.load(envelope.id) == evolve(envelope, next_attempt=0.0)
    assert pending_requests(root) == []
    lock = SpoolLock.acquire(root, wait=False)  # the command let the lock go
    assert lock is not None
    lock.release()


def test_retry_all_without_delivery_process(config: str, spool: DirectorySpool) -> None:
    """retry without an id sets every waiting message to be tried at once."""
    one = deferred(spool, commit(spool, "a@example.test"), "451 later", T0 + 900)
    two = deferred(spool, commit(spool, "b@example.test"), "451 later", T0 + 60)
    commit(spool, "c@example.test")  # already "at once": unchanged
    assert queue_retry(config, None)[0] == 0
    assert spool.load(one.id).next_attempt == spool.load(two.id).next_attempt == 0.0


def test_delete_without_delivery_process_removes_the_entry(
    config: str, root: Path, spool: DirectorySpool
) -> None:
    """Without a delivery process, delete removes the entry and its update."""
    envelope = deferred(spool, commit(spool, "a@example.test"), "451 later", T0 + 900)
    kept = commit(spool, "b@example.test")
    out = io.StringIO()
    assert run(["queue", "delete", envelope.id, "-c", config], stdout=out) == 0
    assert out.getvalue() == f"{envelope.id}: deleted\n"
    assert sorted(os.listdir(root / "queue")) == [kept.id + ".msg"]


# -- changes while a delivery process runs: requests ---------------------------------


def test_retry_with_delivery_process_sends_a_request(
    config: str, root: Path, spool: DirectorySpool, delivery: SpoolLock
) -> None:
    """While the lock is held, retry leaves the spool alone and drops a request file."""
    envelope = deferred(spool, commit(spool, "a@example.test"), "451 later", T0 + 900)
    status, text = queue_retry(config, envelope.id, wait=0)
    assert status == 0
    assert text == (f"{envelope.id}: retry requested; the delivery process (pid {os.getpid()})"
                    " has not taken it yet")
    assert spool.load(envelope.id) == envelope
    [request] = pending_requests(root)
    assert Request.from_json(request.read_bytes()) == Request("retry", envelope.id)
    assert json.loads(request.read_bytes())["version"] == 1
    assert [p.name for p in (root / "control").iterdir() if p.name.endswith(".tmp")] == []


def test_delete_with_delivery_process_sends_a_request(
    config: str, root: Path, spool: DirectorySpool, delivery: SpoolLock
) -> None:
    """While the lock is held, delete leaves the entry to the delivery process."""
    envelope = commit(spool, "a@example.test")
    err = io.StringIO()
    out = io.StringIO()
    status = run(["queue", "delete", envelope.id, "-c", config, "--wait", "0"],
                 stdout=out, stderr=err)
    assert (status, err.getvalue()) == (0, "")
    assert "delete requested" in out.getvalue()
    assert spool.load(envelope.id) == envelope
    [request] = pending_requests(root)
    assert Request.from_json(request.read_bytes()) == Request("delete", envelope.id)


def test_command_waits_for_the_delivery_process(
    config: str, root: Path, spool: DirectorySpool, delivery: SpoolLock, clock: Clock
) -> None:
    """delete waits for the request to be carried out, then says so."""
    envelope = commit(spool, "a@example.test")
    poller = ControlPoller(root, spool=spool, scheduler=FakeScheduling(), clock=clock)
    # The delivery process's turn, while the command waits.
    timer = threading.Timer(0.1, poller.poll)
    timer.start()
    try:
        status, text = queue_delete(config, envelope.id, wait=10)
    finally:
        timer.join()
    assert (status, text) == (0, f"{envelope.id}: deleted by the delivery process"
                                 f" (pid {os.getpid()})")
    assert os.listdir(root / "queue") == []


def test_lock_is_exclusive_and_names_its_holder(root: Path) -> None:
    """One holder at a time; its pid is in the lock file; releasing frees it."""
    first = SpoolLock.acquire(root, wait=False)
    assert first is not None
    assert SpoolLock.acquire(root, wait=False) is None
    assert lock_holder(root) == os.getpid()
    first.release()
    first.release()
    second = SpoolLock.acquire(root, wait=False)
    assert second is not None
    second.release()


# -- the delivery side ----------------------------------------------------------------


class FakeScheduling:
    """Records what the poller asks; C{active} ids are in flight."""

    def __init__(self) -> None:
        self.active: frozenset[str] = frozenset()
        self.enqueued: list[str] = []
        self.forgotten: list[str] = []

    def enqueue_id(self, queue_id: str) -> None:
        self.enqueued.append(queue_id)

    def forget(self, queue_id: str) -> bool:
        self.forgotten.append(queue_id)
        return queue_id in self.active


@implementer(IRouter)
class OneRoute:
    def route(self, address: str) -> str:
        return "local"


@implementer(IDeliveryTarget)
class HeldTarget:
    """Each delivery waits for the test to answer it."""

    def __init__(self) -> None:
        self.calls: list[Deferred[dict[str, Outcome]]] = []

    def deliver(self, envelope: object, recipients: object, open_data: object) -> object:
        d: Deferred[dict[str, Outcome]] = Deferred()
        self.calls.append(d)
        return d


@implementer(INotifier)
class NoDSN:
    def notify(self, envelope: Envelope, reports: object) -> Deferred[Envelope | None]:
        return succeed(None)


@pytest.fixture
def target() -> HeldTarget:
    return HeldTarget()


@pytest.fixture
def scheduler(spool: DirectorySpool, clock: Clock, target: HeldTarget) -> Iterator[Scheduler]:
    scheduler = Scheduler(spool=spool, router=OneRoute(), targets={"local": target},
                          concurrency={"local": 10}, queue=Queue(), clock=clock, notifier=NoDSN())
    yield scheduler
    scheduler.stop()


def test_poller_retries_a_waiting_message(
    root: Path, spool: DirectorySpool, clock: Clock, scheduler: Scheduler, target: HeldTarget
) -> None:
    """A retry request makes the scheduler try the message now; the request is then removed."""
    envelope = deferred(spool, commit(spool, "a@example.test"), "451 later", T0 + 900)
    scheduler.start(spool.entries())
    poller = ControlPoller(root, spool=spool, scheduler=scheduler, clock=clock)
    poller.start()
    write_request(root, Request("retry", envelope.id), T0)
    assert scheduler.next_attempt(envelope.id) == T0 + 900
    assert target.calls == []
    clock.advance(1)  # the poller's next look, and the attempt it scheduled
    assert pending_requests(root) == []
    assert scheduler.active == {envelope.id}
    assert len(target.calls) == 1
    poller.stop()


def test_poller_retry_all_skips_messages_in_flight(root: Path, spool: DirectorySpool,
                                                   clock: Clock) -> None:
    """retry of every message enqueues each entry except those being tried now."""
    one, two = commit(spool, "a@example.test"), commit(spool, "b@example.test")
    assert queued_ids(root) == sorted([one.id, two.id])
    fake = FakeScheduling()
    fake.active = frozenset([one.id])
    write_request(root, Request("retry"), T0)
    ControlPoller(root, spool=spool, scheduler=fake, clock=clock).poll()
    assert fake.enqueued == [two.id]


def test_poller_deletes_a_waiting_message(
    root: Path, spool: DirectorySpool, clock: Clock, scheduler: Scheduler, target: HeldTarget
) -> None:
    """A delete request removes the entry and its schedule: it is never tried again."""
    envelope = deferred(spool, commit(spool, "a@example.test"), "451 later", T0 + 60)
    scheduler.start(spool.entries())
    write_request(root, Request("delete", envelope.id), T0)
    ControlPoller(root, spool=spool, scheduler=scheduler, clock=clock).poll()
    assert os.listdir(root / "queue") == []
    assert pending_requests(root) == []
    assert scheduler.next_attempt(envelope.id) is None
    clock.advance(3600)
    assert target.calls == []


def test_poller_deletes_a_message_in_flight_after_its_attempt(
    root: Path, spool: DirectorySpool, clock: Clock, scheduler: Scheduler, target: HeldTarget
) -> None:
    """
    A delete of a message in flight waits for the attempt to end; the
    attempt's outcome (a retry, written to the spool) does not bring it back.
    """
    envelope = commit(spool, "a@example.test")
    scheduler.start([envelope])
    clock.advance(0)
    assert scheduler.active == {envelope.id}
    poller = ControlPoller(root, spool=spool, scheduler=scheduler, clock=clock)
    write_request(root, Request("delete", envelope.id), T0)
    poller.poll()
    assert len(pending_requests(root)) == 1  # kept until done, for a restarted process
    assert spool.load(envelope.id) == envelope
    target.calls[0].callback({"a@example.test": Outcome("retry", "451 4.3.0 later")})
    assert scheduler.next_attempt(envelope.id) is not None  # the outcome rescheduled it
    poller.poll()
    assert os.listdir(root / "queue") == []
    assert pending_requests(root) == []
    assert scheduler.next_attempt(envelope.id) is None
    clock.advance(86400)
    assert len(target.calls) == 1


def test_poller_drops_a_malformed_request(root: Path, spool: DirectorySpool, clock: Clock) -> None:
    """A request file that cannot be parsed is removed, and nothing is done."""
    envelope = commit(spool, "a@example.test")
    control = root / "control"
    control.mkdir()
    (control / "1-x.req").write_text('{"version": 1, "action": "burn", "queue_id": null}')
    (control / "2-x.req").write_text('{"version": 1, "action": "delete", "queue_id": "../x"}')
    (control / "3-x.req.tmp").write_text("half")
    fake = FakeScheduling()
    ControlPoller(root, spool=spool, scheduler=fake, clock=clock).poll()
    assert sorted(os.listdir(control)) == ["3-x.req.tmp"]
    assert (fake.enqueued, fake.forgotten) == ([], [])
    assert spool.load(envelope.id) == envelope
