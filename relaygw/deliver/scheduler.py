"""
The queue manager (SPEC section 4): when each spooled message is tried, how
many are tried at once, and what becomes of each recipient.

An in-memory schedule of queue ids by next attempt time (a heap, and one
C{callLater} for the earliest entry) in front of the durable spool: the spool
is the truth, the schedule is rebuilt from it at start (L{Scheduler.start}).
At most C{max_active} messages are in flight, and at most
C{concurrency[route]} deliveries per route.

The schedule is a bounded window: it holds the C{window} earliest entries
(ids and times only; envelopes are read per attempt).  When the spool holds
more, the others wait on disk and a rescan every C{rescan_interval} seconds
(in a thread when the reactor has them) takes the earliest again, so an
entry outside the window is tried at most that much after its time.  New
entries due at once always get in.

An attempt loads the envelope, groups its queued recipients by route, calls
each route's target once with all of that route's recipients, records the
outcomes in the envelope, and then removes the entry (nothing queued) or
writes it back with its next attempt time.  A failure anywhere leaves the
entry in the spool and schedules it again: a message is never lost here.

The recipients that failed (5xx) or expired in one attempt get one bounce,
and a message still queued after C{[queue].delay_warning} gets one delay
warning (C{delay_warned} in its envelope), through an L{INotifier}.  Each
DSN is committed before the original's envelope changes, and is then
scheduled like any entry.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import re
from typing import Callable, Iterable, Mapping, cast

from attrs import evolve
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from relaygw.config._model import Queue
from relaygw.deliver import outcome as _o
from relaygw.deliver.bounce import INotifier
from relaygw.deliver.dsn import Report, report_of
from relaygw.events import MESSAGES
from relaygw.interfaces import IDeliveryTarget, IRouter, ISpool
from relaygw.spool.envelope import Envelope, Outcome, Recipient

__all__ = ["Scheduler"]

_CODES = re.compile(r"(\d{3})(?: ([245]\.\d{1,3}\.\d{1,3}))?")


def _codes(reply: str) -> tuple[str, str]:
    """The basic and enhanced code at the start of an outcome's reply."""
    m = _CODES.match(reply)
    if m is None:
        return "", ""
    return m.group(1), m.group(2) or ""


class Scheduler:
    """
    Delivers spooled messages on a retry schedule.

    @ivar _due: queue id -> the time of its next attempt, for every id waiting
        (heap entries that disagree with it are stale and skipped).
    """

    _log = Logger()
    _messages = Logger(observer=MESSAGES)

    def __init__(
        self,
        *,
        spool: ISpool,
        router: IRouter,
        targets: Mapping[str, IDeliveryTarget],
        concurrency: Mapping[str, int],
        queue: Queue,
        clock: IReactorTime,
        notifier: INotifier,
        max_active: int = 100,
        stop_timeout: float = 30.0,
        window: int = 10_000,
        rescan_interval: float = 60.0,
    ) -> None:
        """
        @param spool: the durable queue (load, open_data, update, remove).
        @param router: recipient -> route name.
        @param targets: route name -> its delivery target.
        @param concurrency: route name -> deliveries at once (1 if absent).
        @param queue: the retry schedule and expiry.
        @param clock: time and C{callLater}.
        @param notifier: spools the bounces and delay warnings.
        @param max_active: messages in flight at once.
        @param stop_timeout: seconds L{stop} waits for deliveries in flight.
        @param window: the most queue ids held in memory (see above).
        @param rescan_interval: seconds between rescans of the spool while
            it holds entries outside the window.
        """
        self._spool = spool
        self._clock = clock
        self._notifier = notifier
        self._max_active = max(1, max_active)
        self._stop_timeout = stop_timeout
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._due: dict[str, float] = {}
        self._active: set[str] = set()
        self._timer: IDelayedCall | None = None
        self._stopping = False
        self._idle: list[Deferred[None]] = []
        self._window = max(1, window)
        self._rescan_interval = rescan_interval
        #: Whether the spool may hold entries the window does not.
        self._overflow = False
        self._rescan_call: IDelayedCall | None = None
        self._scanning = False
        self.reconfigure(router, targets, concurrency, queue)

    # -- public API ---------------------------------------------------------

    def start(self, envelopes: Iterable[Envelope]) -> None:
        """
        Schedule the entries listed from the spool, each at its
        C{next_attempt}: the C{window} earliest, read one at a time.
        """
        self._merge(*_earliest_of(envelopes, self._window))
        self._arm()

    def enqueue(self, envelope: Envelope) -> None:
        """A newly committed entry: try it at once (on the next reactor turn)."""
        self.enqueue_id(envelope.id)

    def enqueue_id(self, queue_id: str) -> None:
        """
        Like L{enqueue}, by queue id: the attempt loads the envelope, so a
        caller that only has the id need not read it first.  An id that is
        not in the spool is logged and dropped by the attempt.  An id whose
        attempt is in flight is left to it: ids are never committed twice, so
        this is the same entry told twice (listed by a new delivery process,
        then read on its pipe), and a second attempt would only repeat it.
        """
        if queue_id in self._active:
            return
        self._schedule(queue_id, self._clock.seconds())
        self._arm()

    def stop(self) -> Deferred[None]:
        """
        Start no more attempts.

        @return: fires when the attempts in flight have finished, or after
            C{stop_timeout} seconds, whichever is first; never fails.  An
            attempt cut short leaves its entry in the spool for the next start.
        """
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._rescan_call is not None and self._rescan_call.active():
            self._rescan_call.cancel()
        self._rescan_call = None
        d: Deferred[None] = Deferred()
        if not self._active:
            d.callback(None)
            return d
        self._idle.append(d)
        timer = self._clock.callLater(self._stop_timeout, self._give_up, d)

        def cancel_timer(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        d.addCallback(cancel_timer)
        return d

    def reconfigure(
        self,
        router: IRouter,
        targets: Mapping[str, IDeliveryTarget],
        concurrency: Mapping[str, int],
        queue: Queue,
    ) -> None:
        """Use new routing, targets, limits and schedule for attempts that start from now."""
        self._router = router
        self._targets = dict(targets)
        self._queue = queue
        self._slots = {
            name: DeferredSemaphore(max(1, concurrency.get(name, 1))) for name in self._targets
        }

    @property
    def active(self) -> frozenset[str]:
        """The queue ids in flight."""
        return frozenset(self._active)

    @property
    def held(self) -> int:
        """How many queue ids the window holds."""
        return len(self._due)

    def next_attempt(self, queue_id: str) -> float | None:
        """When C{queue_id} is next tried; C{None} when it is not waiting."""
        return self._due.get(queue_id)

    def forget(self, queue_id: str) -> bool:
        """
        Stop waiting to try C{queue_id} (an operator deletes it); the spool
        is not touched.

        @return: whether an attempt on it is in flight: its outcome may
            schedule it again, so forget it once more after it ended.
        """
        self._due.pop(queue_id, None)  # its heap entries are now stale, skipped
        return queue_id in self._active

    # -- the schedule -------------------------------------------------------

    def _schedule(self, queue_id: str, when: float) -> None:
        current = self._due.get(queue_id)
        if current is not None and current <= when:
            return
        if current is None and len(self._due) >= self._window and when > self._clock.seconds():
            self._overflow = True  # it waits in the spool for a rescan
            return
        self._due[queue_id] = when
        if queue_id not in self._active:
            heapq.heappush(self._heap, (when, next(self._seq), queue_id))

    def _earliest(self) -> float | None:
        while self._heap:
            when, _, queue_id = self._heap[0]
            if self._due.get(queue_id) == when and queue_id not in self._active:
                return when
            heapq.heappop(self._heap)
        return None

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._overflow and self._rescan_call is None and not self._scanning:
            if not self._stopping:
                self._rescan_call = self._clock.callLater(self._rescan_interval, self._rescan)
        if self._stopping or len(self._active) >= self._max_active:
            return
        when = self._earliest()
        if when is not None:
            delay = max(0.0, when - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self._run_due)

    def _merge(self, earliest: list[tuple[float, str]], listed: int) -> None:
        """
        Add the C{earliest} of C{listed} spool entries to the window, then
        trim it to C{window} ids by dropping the latest (they stay on disk).
        """
        for when, queue_id in earliest:
            if queue_id not in self._active and queue_id not in self._due:
                self._due[queue_id] = when
        overflow = listed > len(earliest)
        if len(self._due) > self._window:
            kept = heapq.nsmallest(self._window, self._due.items(), key=lambda item: item[1])
            self._due = dict(kept)
            overflow = True
        self._overflow = overflow
        self._heap = [(when, next(self._seq), queue_id) for queue_id, when in self._due.items()]
        heapq.heapify(self._heap)

    def _rescan(self) -> None:
        self._rescan_call = None
        if self._stopping:
            return
        self._scanning = True
        self._overflow = False  # set again by the merge, or by _schedule meanwhile
        listing = functools.partial(_earliest_of, self._spool.iter_entries(), self._window)
        if IReactorThreads.providedBy(self._clock):
            # Reading 100,000 envelopes takes seconds: not on the reactor thread.
            reactor = cast(IReactorThreads, self._clock)
            d = deferToThreadPool(self._clock, reactor.getThreadPool(), listing)
        else:
            d = maybeDeferred(listing)

        def merge(found: tuple[list[tuple[float, str]], int]) -> None:
            overflow_meanwhile = self._overflow
            self._merge(*found)
            self._overflow = self._overflow or overflow_meanwhile

        def done(_: object) -> None:
            self._scanning = False
            self._arm()

        d.addCallback(merge)
        d.addErrback(lambda f: self._log.failure("Rescanning the spool failed", f))
        d.addBoth(done)

    def _run_due(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        while not self._stopping and len(self._active) < self._max_active:
            when = self._earliest()
            if when is None or when > now:
                break
            _, _, queue_id = heapq.heappop(self._heap)
            del self._due[queue_id]
            self._begin(queue_id)
        self._arm()

    def _begin(self, queue_id: str) -> None:
        self._active.add(queue_id)
        d = Deferred.fromCoroutine(self._attempt(queue_id))
        d.addErrback(
            lambda f: self._log.failure("Attempt on {queue_id} failed", f, queue_id=queue_id)
        )
        d.addBoth(lambda _: self._finish(queue_id))

    def _finish(self, queue_id: str) -> None:
        self._active.discard(queue_id)
        when = self._due.get(queue_id)
        if when is not None:
            heapq.heappush(self._heap, (when, next(self._seq), queue_id))
        if not self._active and self._idle:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
        self._arm()

    def _give_up(self, d: Deferred[None]) -> None:
        if d in self._idle:
            self._idle.remove(d)
            self._log.warn(
                "Stopped with {count} deliveries still in flight", count=len(self._active)
            )
            d.callback(None)

    # -- one attempt --------------------------------------------------------

    async def _attempt(self, queue_id: str) -> None:
        try:
            loaded = self._spool.load(queue_id)
        except KeyError:
            self._log.info("Entry {queue_id} left the spool", queue_id=queue_id)
            return
        try:
            if not isinstance(loaded, Envelope):
                raise TypeError(f"spool returned {type(loaded).__name__}")
            await self._deliver(loaded)
        except OSError as e:
            # The spool's file system (full, read-only): an operator's
            # matter, not a bug; one line, no traceback.
            self._log.error("Delivery of {queue_id} not recorded ({error}); keeping it",
                            queue_id=queue_id, error=str(e))
            retry = self._clock.seconds() + self._queue.retry_delay(1).total_seconds()
            self._schedule(queue_id, retry)
        except Exception:
            self._log.failure("Delivery of {queue_id} failed; keeping it", queue_id=queue_id)
            retry = self._clock.seconds() + self._queue.retry_delay(1).total_seconds()
            self._schedule(queue_id, retry)

    async def _deliver(self, envelope: Envelope) -> None:
        groups: dict[str, list[str]] = {}
        outcomes: dict[str, Outcome] = {}
        for rcpt in envelope.pending:
            try:
                route = self._router.route(rcpt.address)
            except LookupError:
                outcomes[rcpt.address] = _o.local_outcome(_o.NO_ROUTE)
                self._note(envelope, rcpt.address, "", outcomes[rcpt.address])
                continue
            groups.setdefault(route, []).append(rcpt.address)
        open_data = functools.partial(self._spool.open_data, envelope.id)
        routes = list(groups)
        results = await DeferredList(
            [
                Deferred.fromCoroutine(self._deliver_route(envelope, r, groups[r], open_data))
                for r in routes
            ],
            consumeErrors=True,
        )
        for route, (ok, result) in zip(routes, results):
            got: dict[str, Outcome] = result if ok else {}
            for address in groups[route]:
                outcome = got.get(address, _o.local_outcome(_o.TARGET_FAILED))
                outcomes[address] = outcome
                self._note(envelope, address, route, outcome)
        await self._finish_envelope(envelope, outcomes)

    async def _deliver_route(
        self,
        envelope: Envelope,
        route: str,
        addresses: list[str],
        open_data: Callable[[], object],
    ) -> dict[str, Outcome]:
        target = self._targets.get(route)
        if target is None:
            self._log.error(
                "No delivery target for route {route}", queue_id=envelope.id, route=route
            )
            return {}
        slots = self._slots[route]
        try:
            result = await slots.run(
                lambda: cast("Deferred[object]", target.deliver(envelope, addresses, open_data))
            )
        except Exception:
            self._log.failure(
                "Target for route {route} failed on {queue_id}", queue_id=envelope.id, route=route
            )
            return {}
        if not isinstance(result, dict):
            self._log.error(
                "Target for route {route} returned {kind}",
                queue_id=envelope.id,
                route=route,
                kind=type(result).__name__,
            )
            return {}
        return {a: o for a, o in result.items() if isinstance(o, Outcome) and a in addresses}

    async def _finish_envelope(self, envelope: Envelope, outcomes: dict[str, Outcome]) -> None:
        now = self._clock.seconds()
        expire_at = envelope.received_at + self._queue.expire.total_seconds()
        if now >= expire_at:
            for rcpt in envelope.with_outcomes(outcomes).pending:
                self._log.warn(
                    "EXPIRE {queue_id} {recipient}: last reply {last_reply}",
                    event_id="EXPIRE",
                    recipient=rcpt.address,
                    route=self._route_name(rcpt.address),
                    last_reply=rcpt.last_reply,
                    **_tracking(envelope),
                )
                outcomes[rcpt.address] = _expired(rcpt.last_reply)
        failed = [
            report_of(r.address, outcomes[r.address])
            for r in envelope.pending
            if r.address in outcomes and outcomes[r.address].kind == "bounce"
        ]
        if failed and not await self._report(envelope, failed):
            # Not recorded, so not lost: they stay queued, fail again, and
            # their DSN is tried again.
            for report in failed:
                del outcomes[report.recipient]
        envelope = envelope.with_outcomes(outcomes)
        warn_at = envelope.received_at + self._queue.delay_warning.total_seconds()
        # "0s" disables; never for <>, so a DSN is never warned about either.
        warn = bool(self._queue.delay_warning) and not envelope.delay_warned and envelope.sender
        if warn and envelope.pending and now >= warn_at:
            delayed = [
                report_of(r.address, outcomes.get(r.address) or _last(r), delayed=True)
                for r in envelope.pending
            ]
            if await self._report(envelope, delayed):
                envelope = evolve(envelope, delay_warned=True)
        if not envelope.pending:
            self._spool.remove(envelope.id)
            return
        attempts = max(r.attempts for r in envelope.pending)
        when = now + self._queue.retry_delay(attempts).total_seconds()
        # An upstream's Retry-After (Graph's 429) is a floor under the schedule.
        floor = max((o.retry_at for o in outcomes.values() if o.kind == "retry"), default=0.0)
        when = min(max(when, floor), expire_at)
        if warn and not envelope.delay_warned and warn_at > now:
            when = min(when, warn_at)
        if when <= now:  # expired, but its DSN could not be spooled
            when = now + self._queue.retry_delay(1).total_seconds()
        envelope = evolve(envelope, next_attempt=when)
        self._spool.update(envelope)
        self._schedule(envelope.id, when)

    def _route_name(self, address: str) -> str:
        """The route of C{address} for log events; C{""} when it has none."""
        try:
            return self._router.route(address)
        except LookupError:
            return ""

    async def _report(self, envelope: Envelope, reports: list[Report]) -> bool:
        """Spool one DSN and schedule it; whether that worked (C{False} is logged)."""
        try:
            notice = await self._notifier.notify(envelope, reports)
        except Exception:
            self._log.failure(
                "Could not spool the DSN for {queue_id}; trying again later", queue_id=envelope.id
            )
            return False
        if notice is not None:
            self.enqueue(notice)
        return True

    def _note(self, envelope: Envelope, address: str, route: str, outcome: Outcome) -> None:
        code, enhanced = _codes(outcome.reply)
        fields = dict(
            _tracking(envelope),
            route=route,
            recipient=address,
            smtp_code=code,
            enhanced_code=enhanced,
            remote_host=outcome.remote_host,
            reply=outcome.reply,
        )
        if outcome.kind == "delivered":
            self._messages.info(
                "DELIVER {queue_id} {recipient} via {route}: {reply}", event_id="DELIVER", **fields
            )
        elif outcome.kind == "retry":
            self._log.info(
                "DEFER {queue_id} {recipient} via {route}: {reply}", event_id="DEFER", **fields
            )
        else:
            self._log.warn(
                "FAIL {queue_id} {recipient} via {route}: {reply}", event_id="FAIL", **fields
            )


def _tracking(envelope: Envelope) -> dict[str, object]:
    """The fields of a message that every tracking row of it carries."""
    return dict(
        queue_id=envelope.id,
        message_id=envelope.message_id,
        sender=envelope.sender,
        connector=envelope.connector,
        client_ip=envelope.client_ip,
        auth_user=envelope.auth_user,
        size=envelope.size,
    )


def _earliest_of(envelopes: Iterable[object], count: int) -> tuple[list[tuple[float, str]], int]:
    """The C{count} earliest (next attempt, queue id) of C{envelopes}, and how many there were."""
    listed = 0

    def keys() -> Iterable[tuple[float, str]]:
        nonlocal listed
        for envelope in envelopes:
            listed += 1
            if isinstance(envelope, Envelope):
                yield envelope.next_attempt, envelope.id

    earliest = heapq.nsmallest(count, keys())
    return earliest, listed


def _last(rcpt: Recipient) -> Outcome:
    """The outcome a recipient's C{last_reply} stands for (it was not tried this time)."""
    return Outcome("retry", rcpt.last_reply or str(_o.TARGET_FAILED))


def _expired(last_reply: str) -> Outcome:
    """The outcome of an expired recipient: 5.4.7, with the reply that kept it queued."""
    text = str(_o.EXPIRED) + (f" (last reply: {last_reply})" if last_reply else "")
    return Outcome("bounce", text[: _o.MAX_REPLY_CHARS])
