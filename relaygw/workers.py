"""
Receiving worker processes: one Twisted process answers clients on one
core, so the gateway runs several (C{gateway.workers}, default one fewer
than the cores: L{default_workers}), sharing the listening sockets, as Postfix runs several smtpd.

The twistd process binds every socket (with its privileges), recovers the
spool, runs the delivery process, the admin endpoint and the tracking log,
and answers clients itself.  L{ReceiveWorkers} spawns the other receivers:
C{python -m relaygw.receiver --fd N ... [--config PATH]}, each inheriting the
listening sockets as file descriptors in plan order and adopting them
(C{adoptStreamPort}); the kernel hands each new connection to whichever
process accepts first.  A worker is a L{RelayGatewayService} without spool
recovery, delivery, admin or tracking: it commits into the same spool
(queue ids carry the process id, so they never collide) and writes its log
events as JSON to its stdout; the parent re-publishes them, so one tracking
log and one C{/metrics} cover every process, and each C{receive.queued}
event tells the delivery process about the new entry.

Signals reach every worker: the parent forwards SIGHUP (the worker reloads
configuration, certificates and users file; a change of sockets restarts
the workers instead, since their sockets are inherited) and stops them with
SIGTERM (each drains its sessions like the parent).  A worker that dies is
restarted with backoff; the end of its stdin (the parent killed) stops it.

Connection counts, rate limits and AUTH throttling are shared by the
receiving processes through these pipes (L{relaygw.session.peers}): each
process's changes reach the parent, which applies them and relays them to
the other workers; the parent's throttle admits every process's AUTH
checks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.failure import Failure

from relaygw._types import IServeReactor
from relaygw.events import event_from_child, republish
from relaygw.runner import ChildProtocol, child_environment
from relaygw.session.peers import PeerLimits

__all__ = ["ReceiveWorkers", "default_workers"]

_log = Logger()

_RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
#: A worker that ran this long is healthy: its next crash restarts it at once.
_HEALTHY_AFTER = 60.0
#: The first inherited descriptor (0-2 are the log and control pipes).
_FIRST_FD = 3


def default_workers(cores: int | None = None) -> int:
    """
    The receiving processes when C{workers} is not set: one fewer than the
    cores this process may use, at least one.  The delivery process needs a
    core of its own under load (it ran 46 % of the instructions per relayed
    message, bench/instructions.py), and a receiving process more than the
    cores left costs more than it gives: on 2 cores, two receiving
    processes ran 3.80 M instructions per message against 3.25 M for one,
    and accepted 666 against 947 messages/s (bench_accept.py, same run).

    @param cores: the cores to plan for; by default those this process may use.
    """
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
    return max(1, cores - 1)


class _Worker:
    """One worker slot: its current child, restarts, the way it is stopped."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.child: ChildProtocol | None = None
        self.transport: IProcessTransport | None = None
        self.started_at = 0.0
        self.failures = 0
        self.restart: IDelayedCall | None = None


class ReceiveWorkers(Service):
    """
    Keeps C{count} receiving workers running on the parent's sockets.
    """

    _log = _log

    def __init__(
        self,
        *,
        reactor: IServeReactor,
        config_path: str | None,
        count: int,
        fds: Callable[[], Sequence[int]],
        on_queued: Callable[[str], None],
        on_peer: Callable[[bytes], object] = lambda line: True,
        on_dead: Callable[[int, set[int]], None] = lambda pid, live: None,
        publisher: ILogObserver = globalLogPublisher,
        python: str = sys.executable,
        stop_grace: float = 35.0,
    ) -> None:
        """
        @param count: how many workers (besides the parent's own sessions).
        @param fds: the listening sockets' descriptors, in plan order, now.
        @param on_queued: called with the queue id of each message a worker
            committed (the delivery process is told).
        @param on_peer: takes a worker's shared-limits change
            (L{relaygw.session.peers}); unless it returns C{False} (a change
            for this process only), it is also relayed to the other workers.
        @param publisher: where the workers' log events are re-published.
        @param stop_grace: seconds a stopping worker gets before it is killed
            (its own session drain is bounded a little below).
        """
        self._reactor = reactor
        self._config_path = None if config_path is None else os.path.abspath(config_path)
        self._fds = fds
        self._on_queued = on_queued
        self._on_peer = on_peer
        self._on_dead = on_dead
        self._publisher = publisher
        self._python = python
        self._stop_grace = stop_grace
        self._workers = [_Worker(i) for i in range(count)]
        self._retiring: dict[ChildProtocol, Deferred[None]] = {}
        self._pids: dict[ChildProtocol, int] = {}
        self._stopping = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        for worker in self._workers:
            self._spawn(worker)

    def broadcast(self, line: bytes, *, besides: _Worker | None = None) -> None:
        """Send a shared-limits change to every worker (but C{besides})."""
        for worker in self._workers:
            if worker is not besides and worker.transport is not None:
                worker.transport.write(line + b"\n")

    def _peer(self, worker: _Worker, line: bytes) -> None:
        if self._on_peer(line) is not False:
            self.broadcast(line, besides=worker)

    def reload(self) -> None:
        """SIGHUP each worker: it loads the configuration again."""
        for worker in self._workers:
            _signal(worker.transport, "HUP")

    def restart(self) -> Deferred[None]:
        """
        Replace every worker by a new one on the sockets C{fds} gives now
        (after a reload changed them): each old worker drains its sessions
        while its successor already takes connections.
        """
        ends = [self._retire(w) for w in self._workers if w.transport is not None]
        for worker in self._workers:
            _cancel(worker)
            self._spawn(worker)
        return _all(ends)

    def stopService(self) -> Deferred[None]:
        """SIGTERM every worker; each drains its sessions; killed after the grace."""
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        for worker in self._workers:
            _cancel(worker)
        return _all([self._retire(w) for w in self._workers if w.transport is not None])

    def _retire(self, worker: _Worker) -> Deferred[None]:
        """
        Stop the worker's current child: SIGTERM, then KILL after the grace.

        @return: fires when it has ended.
        """
        child, transport = worker.child, worker.transport
        assert child is not None and transport is not None
        worker.child = worker.transport = None
        done: Deferred[None] = Deferred()
        self._retiring[child] = done
        _signal(transport, "TERM")
        kill = self._reactor.callLater(self._stop_grace, _kill, transport)

        def cancel(result: object) -> object:
            if kill.active():
                kill.cancel()
            return result

        return done.addBoth(cancel)

    def _spawn(self, worker: _Worker) -> None:
        worker.restart = None
        fds = list(self._fds())
        argv = [self._python, "-m", "relaygw.receiver"]
        for i in range(len(fds)):
            argv += ["--fd", str(_FIRST_FD + i)]
        if self._config_path is not None:
            argv += ["--config", self._config_path]
        child_fds: dict[int, object] = {0: "w", 1: "r", 2: "r"}
        child_fds.update({_FIRST_FD + i: fd for i, fd in enumerate(fds)})
        child = ChildProtocol(_Owner(self, worker), name=f"receiving worker {worker.index + 1}",
                              on_peer=lambda line: self._peer(worker, line))
        worker.child = child
        worker.started_at = self._reactor.seconds()
        process = cast(IReactorProcess, self._reactor)
        worker.transport = process.spawnProcess(
            child, self._python, argv, env=child_environment(), path=os.getcwd(),
            childFDs=child_fds,  # type: ignore[arg-type]
        )
        if worker.transport.pid is not None:
            self._pids[child] = worker.transport.pid
        self._log.info("receiving worker {index} started (pid {pid})",
                       index=worker.index + 1, pid=worker.transport.pid)

    def _republish(self, record: bytes) -> None:
        try:
            event = event_from_child(record)
        except ValueError:
            self._log.warn("a receiving worker wrote an unreadable log record")
            return
        if event.get("event") == "receive.queued":
            queue_id = event.get("queue_id")
            if isinstance(queue_id, str):
                self._on_queued(queue_id)
        republish(event, self._publisher)

    def _ended(self, worker: _Worker, child: ChildProtocol, reason: Failure) -> None:
        pid = self._pids.pop(child, None)
        if pid is not None:
            # Its connections ended with it, in every process's counts.
            forget = PeerLimits.forget_message(pid)
            self._on_peer(forget)
            self.broadcast(forget)
            # Its partial spool entries (killed mid-DATA) would otherwise
            # stay until the next gateway start.
            self._on_dead(pid, set(self._pids.values()))
        retired = self._retiring.pop(child, None)
        if retired is not None:
            retired.callback(None)
            return
        if child is not worker.child:
            return
        worker.child = worker.transport = None
        if self._stopping:
            return
        if self._reactor.seconds() - worker.started_at > _HEALTHY_AFTER:
            worker.failures = 0
        delay = _RESTART_DELAYS[min(worker.failures, len(_RESTART_DELAYS) - 1)]
        worker.failures += 1
        self._log.error(
            "receiving worker {index} ended unexpectedly ({how}); restarting in {delay} s",
            index=worker.index + 1, how=str(reason.value), delay=delay,
        )
        worker.restart = self._reactor.callLater(delay, self._spawn, worker)


class _Owner:
    """A worker's child protocol reports here: the slot is known."""

    def __init__(self, workers: ReceiveWorkers, worker: _Worker) -> None:
        self._workers = workers
        self._worker = worker

    def _republish(self, record: bytes) -> None:
        self._workers._republish(record)

    def _ended(self, child: ChildProtocol, reason: Failure) -> None:
        self._workers._ended(self._worker, child, reason)


def _cancel(worker: _Worker) -> None:
    """Forget a restart planned after a crash."""
    if worker.restart is not None and worker.restart.active():
        worker.restart.cancel()
    worker.restart = None


def _signal(transport: IProcessTransport | None, name: str) -> None:
    if transport is not None:
        try:
            transport.signalProcess(name)
        except ProcessExitedAlready:
            pass


def _kill(transport: IProcessTransport) -> None:
    _log.warn("receiving worker {pid} did not stop in time; killing it", pid=transport.pid)
    _signal(transport, "KILL")


def _all(waits: list[Deferred[None]]) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    DeferredList(waits, consumeErrors=True).addBoth(lambda _: d.callback(None))
    return d
