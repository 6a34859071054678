"""
The delivery process: the send side of the Postfix cut.

relaygw receives and delivers in two processes joined only by the spool, as
Postfix does (smtpd and cleanup on one side, qmgr and smtp on the other): the
receiving process answers clients and commits messages; this process runs the
queue scheduler.  Delivery thus gets a core of its own, and a slow or busy
delivery never delays a client's 250.

Parent side, L{DeliveryProcess}: a service of the gateway.  It spawns
C{python -m relaygw.runner [--config PATH]} in the gateway's working
directory, writes each committed queue id to the child's stdin (one per
line), re-publishes the child's log events (JSON records on its stdout) into
the gateway's own log, and restarts the child, with backoff, if it dies.

Child side, L{main}: loads the same configuration, removes the partial
envelope updates a killed predecessor left (updates are this process's
alone), lists the spool's committed entries without changing anything else
(the receiving process owns crash recovery and has done it before spawning
the child), starts the scheduler, and enqueues every id read from stdin.
The end of stdin (the gateway stopping, or killed with kill -9) stops the
scheduler, bounded, and ends the process.  Ids lost while the child was
down are found by the next child's listing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
import threading
from typing import TYPE_CHECKING, Protocol, TextIO, cast

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorCore,
    IReactorFromThreads,
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    ILogObserver,
    Logger,
    globalLogBeginner,
    globalLogPublisher,
)
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

import relaygw
from relaygw._types import IServeReactor
from relaygw.config._model import Config, Queue
from relaygw.errors import ConfigError
from relaygw.events import child_log_observer, event_from_child, forward_to_parent, republish
from relaygw.interfaces import IDeliveryTarget, IProtocolLog, IRouter, ISpool
from relaygw.polling import make_lean
from relaygw.spool.ids import is_queue_id

if TYPE_CHECKING:
    from relaygw.deliver.scheduler import Scheduler

__all__ = ["DeliveryProcess", "Routes", "build_routes", "build_scheduler", "main", "reconfigure"]

_log = Logger()

#: How long the parent waits for the child to finish its deliveries in
#: progress at stop, before killing it (the scheduler's own bound is 30 s).
STOP_GRACE = 35.0
#: Seconds after a reload before the old routes' resources are released.
RELEASE_AFTER = 60.0
#: Added to the delivery process's nice value (lower CPU priority).
DELIVERY_NICENESS = 5
_RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
#: A child that ran this long is healthy: the next crash restarts it at once.
_HEALTHY_AFTER = 60.0


@frozen
class Routes:
    """
    The delivery side of one configuration, as L{Scheduler.reconfigure} takes it.

    @ivar release: releases what the targets hold (the DNS resolver's
        timers) once no attempt uses them any more.
    """

    router: IRouter
    targets: Mapping[str, IDeliveryTarget]
    concurrency: Mapping[str, int]
    queue: Queue
    release: Callable[[], None]


def build_routes(
    config: Config, reactor: IServeReactor, protocol_log: IProtocolLog | None = None
) -> Routes:
    """
    The router, one target per route, and the limits of C{config}.

    @param protocol_log: the SmtpSend protocol log of this process, for the
        routes with C{protocol_logging = "verbose"}.
    """
    from relaygw.deliver.mx import make_resolver
    from relaygw.deliver.targets import build_target
    from relaygw.route.router import Router

    resolver = (
        make_resolver(config.dns, reactor) if any(r.via == "mx" for r in config.routes) else None
    )
    targets = {
        route.name: build_target(
            route, reactor=reactor, resolver=resolver, helo=config.gateway.hostname,
            protocol_log=protocol_log,
        )
        for route in config.routes
    }

    def release() -> None:
        # client.Resolver re-reads resolv.conf from a repeating delayed call
        # that nothing else cancels.
        call = getattr(resolver, "_parseCall", None)
        if call is not None and call.active():
            call.cancel()

    return Routes(
        router=Router(config),
        targets=targets,
        concurrency={route.name: route.max_concurrency for route in config.routes},
        queue=config.queue,
        release=release,
    )


def build_scheduler(
    config: Config, reactor: IServeReactor, spool: ISpool,
    protocol_log: IProtocolLog | None = None,
) -> tuple[Scheduler, Routes]:
    """
    The scheduler of a configuration over C{spool}.

    @param protocol_log: as L{build_routes} takes it.

    @return: the scheduler (not started) and its routes, whose C{release}
        is called after the scheduler stopped.
    """
    from relaygw.deliver.bounce import SpoolNotifier
    from relaygw.deliver.scheduler import Scheduler

    routes = build_routes(config, reactor, protocol_log)
    scheduler = Scheduler(
        spool=spool,
        router=routes.router,
        targets=routes.targets,
        concurrency=routes.concurrency,
        queue=routes.queue,
        clock=reactor,
        notifier=SpoolNotifier(spool, hostname=config.gateway.hostname, clock=reactor),
    )
    return scheduler, routes


def reconfigure(scheduler: Scheduler, old: Routes, new: Routes, clock: IReactorTime) -> None:
    """
    Hand C{new} to C{scheduler} for the attempts that start from now.  The
    attempts in flight keep their targets, so C{old} is released only after
    they have had time to end (a scheduler's stop bound).
    """
    scheduler.reconfigure(new.router, new.targets, new.concurrency, new.queue)
    clock.callLater(RELEASE_AFTER, old.release)


# -- parent side ------------------------------------------------------------


#: Starts a line of a child's stdout that is not a log record (JSON log
#: records start with RS, 0x1e).
PEER_MARK = b"\x1d"


#: Seconds a child holds its pipe traffic to the gateway (log records,
#: limits changes) to send it in one write: one wake-up of the gateway per
#: period rather than one per record (fewer context switches under load;
#: a new message reaches the delivery process at most this much later).
PIPE_DELAY = 0.005


class BatchedOutput:
    """
    A child's stdout to the gateway: log records are held up to
    L{PIPE_DELAY} seconds and sent in one write, a limits change goes at the
    end of its reactor turn (with what is held).  Thread-safe (log events come from threads too);
    before L{attach}, and after the reactor stopped, writes go straight
    through.
    """

    def __init__(self, stream: TextIO, delay: float = PIPE_DELAY) -> None:
        self._stream = stream
        self._delay = delay
        self._lock = threading.Lock()
        self._chunks: list[str] = []
        self._urgent = False  # an immediate flush is on its way
        self._reactor: IReactorFromThreads | None = None

    def attach(self, reactor: IReactorFromThreads) -> None:
        """Batch from now on, flushing from C{reactor}'s thread, until it shuts down."""
        self._reactor = reactor
        cast(IReactorCore, reactor).addSystemEventTrigger("after", "shutdown", self.detach)

    def detach(self) -> None:
        """Write straight through again (the reactor is gone), and what waits now."""
        self._reactor = None
        self.flush_now()

    def write(self, text: str) -> None:
        """A log record: sent within L{PIPE_DELAY}."""
        self._add(text, urgent=False)

    def write_now(self, text: str) -> None:
        """A limits change: sent at the end of this reactor turn (the other
        processes' limits wait for it), with what is held."""
        self._add(text, urgent=True)

    def _add(self, text: str, *, urgent: bool) -> None:
        with self._lock:
            self._chunks.append(text)
            first = len(self._chunks) == 1
            arm = (first or urgent) and not self._urgent
            self._urgent = self._urgent or urgent
        reactor = self._reactor
        if reactor is None:
            self.flush_now()
        elif arm:
            reactor.callFromThread(self._arm, reactor, urgent)

    def _arm(self, reactor: IReactorFromThreads, urgent: bool) -> None:
        if urgent:
            self.flush_now()
        else:
            cast(IReactorTime, reactor).callLater(self._delay, self.flush_now)

    def flush(self) -> None:
        """The log observer's flush after each record: the timer flushes."""

    def flush_now(self) -> None:
        with self._lock:
            text, self._chunks = "".join(self._chunks), []
            self._urgent = False
        if text:
            try:
                self._stream.write(text)
                self._stream.flush()
            except OSError:
                pass  # the gateway is gone; stdin's end stops this process


def child_environment() -> dict[str, str]:
    """The environment of a child process: it imports the very relaygw this process runs."""
    package_parent = str(Path(relaygw.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_parent, env.get("PYTHONPATH", "")) if p
    )
    return env


class ChildOwner(Protocol):
    """What a L{ChildProtocol} reports to."""

    def _republish(self, record: bytes) -> None: ...

    def _ended(self, child: ChildProtocol, reason: Failure) -> None: ...


class ChildProtocol(ProcessProtocol):
    """The parent's end of one child: log records in, process end out."""

    def __init__(
        self,
        owner: ChildOwner,
        name: str = "delivery process",
        on_peer: Callable[[bytes], None] | None = None,
    ) -> None:
        """
        @param on_peer: takes the child's other records: lines that start
            with C{PEER_MARK} (a receiving worker's shared limits), mark removed.
        """
        self._owner = owner
        self._name = name
        self._on_peer = on_peer
        self._out = b""
        self._err = b""

    def outReceived(self, data: bytes) -> None:
        # child_log_observer writes "\x1e" + JSON + "\n": a record is
        # complete at its line end (JSON text has no raw newline), not when
        # the next record starts.
        self._out += data
        *records, self._out = self._out.split(b"\n")
        for record in records:
            if record.startswith(PEER_MARK) and self._on_peer is not None:
                self._on_peer(record[len(PEER_MARK):])
                continue
            record = record.strip(b"\x1e \r")
            if record:
                self._owner._republish(record)

    def errReceived(self, data: bytes) -> None:
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line.strip():
                _log.error(
                    "{child}: {line}", child=self._name, line=line.decode("utf-8", "replace")
                )

    def processEnded(self, reason: Failure) -> None:
        self._owner._ended(self, reason)


class DeliveryProcess(Service):
    """
    Keeps one delivery child running and tells it about new spool entries.
    """

    _log = _log

    def __init__(
        self,
        *,
        reactor: IServeReactor,
        config_path: str | None,
        publisher: ILogObserver = globalLogPublisher,
        python: str = sys.executable,
    ) -> None:
        """
        @param reactor: must also provide C{IReactorProcess}.
        @param config_path: the configuration file, or C{None} for the
            embedded default (the child resolves it against the same working
            directory).
        @param publisher: where the child's log events are re-published.
        @param python: the interpreter that runs the child.
        """
        self._reactor = reactor
        self._config_path = None if config_path is None else os.path.abspath(config_path)
        self._publisher = publisher
        self._python = python
        self._child: ChildProtocol | None = None
        self._transport: IProcessTransport | None = None
        self._started_at = 0.0
        self._failures = 0
        self._restart: IDelayedCall | None = None
        self._stopped: Deferred[None] | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id, while one runs."""
        return None if self._transport is None else self._transport.pid

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._spawn()

    def reload(self) -> None:
        """Have the child load the configuration again (SIGHUP; its attempts in flight go on)."""
        if self._transport is not None:
            try:
                self._transport.signalProcess("HUP")
            except ProcessExitedAlready:
                pass

    def notify(self, queue_id: str) -> None:
        """Tell the child about a committed entry (dropped while none runs)."""
        if self._transport is not None:
            self._transport.write(queue_id.encode("ascii") + b"\n")

    def _spawn(self) -> None:
        self._restart = None
        argv = [self._python, "-m", "relaygw.runner"]
        if self._config_path is not None:
            argv += ["--config", self._config_path]
        child = ChildProtocol(self)
        self._child = child
        self._started_at = self._reactor.seconds()
        process = cast(IReactorProcess, self._reactor)
        self._transport = process.spawnProcess(
            child, self._python, argv, env=child_environment(), path=os.getcwd()
        )
        self._log.info("delivery process {pid} started", pid=self._transport.pid)

    def _republish(self, record: bytes) -> None:
        try:
            event = event_from_child(record)
        except ValueError:
            self._log.warn("delivery process wrote an unreadable log record")
            return
        republish(event, self._publisher)

    def _ended(self, child: ChildProtocol, reason: Failure) -> None:
        if child is not self._child:
            return
        self._child = self._transport = None
        if self._stopped is not None:
            self._stopped.callback(None)
            return
        clean = isinstance(reason.value, ProcessDone)
        if self._reactor.seconds() - self._started_at > _HEALTHY_AFTER:
            self._failures = 0
        delay = _RESTART_DELAYS[min(self._failures, len(_RESTART_DELAYS) - 1)]
        self._failures += 1
        self._log.error(
            "delivery process ended unexpectedly ({how}); restarting in {delay} s",
            how="exit 0" if clean else str(reason.value),
            delay=delay,
        )
        self._restart = self._reactor.callLater(delay, self._spawn)

    def stopService(self) -> Deferred[None]:
        """
        Close the child's stdin so it finishes the deliveries in progress,
        and wait for it (killing it after L{STOP_GRACE} seconds).
        """
        super().stopService()  # type: ignore[no-untyped-call]
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        stopped: Deferred[None] = Deferred()
        transport = self._transport
        if transport is None:
            stopped.callback(None)
            return stopped
        self._stopped = stopped
        transport.closeStdin()
        kill = self._reactor.callLater(STOP_GRACE, _kill, transport)
        stopped.addBoth(_cancel_then_pass, kill)
        return stopped


def _kill(transport: IProcessTransport) -> None:
    _log.warn("delivery process {pid} did not stop in time; killing it", pid=transport.pid)
    try:
        transport.signalProcess("KILL")
    except ProcessExitedAlready:
        pass


def _cancel_then_pass(result: object, call: IDelayedCall) -> object:
    if call.active():
        call.cancel()
    return result


# -- child side -------------------------------------------------------------


class _QueueIds(LineOnlyReceiver):
    """Reads queue ids from the parent, one per line."""

    delimiter = b"\n"

    def __init__(self, scheduler: Scheduler, done: Deferred[None]) -> None:
        self._scheduler = scheduler
        self._done = done

    def lineReceived(self, line: bytes) -> None:
        queue_id = line.decode("ascii", "replace").strip()
        if not is_queue_id(queue_id):
            _log.warn("delivery process: ignoring {line!r} (not a queue id)", line=queue_id)
            return
        # The attempt reads the envelope; reading it here too would double
        # the delivery process's spool reads.
        self._scheduler.enqueue_id(queue_id)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self._done.called:
            self._done.callback(None)


async def _run(reactor: IServeReactor, config: Config, load_config: Callable[[], Config]) -> None:
    from twisted.internet import stdio

    from relaygw.ops.protolog import ProtocolLog
    from relaygw.spool.control import ControlPoller
    from relaygw.spool.store import DirectorySpool

    spool = DirectorySpool(config.gateway.spool_dir, reactor)
    # This process holds the delivery lock: no update is being written, so
    # any .upd.tmp is a killed predecessor's (the gateway's recovery removes
    # them only when the gateway starts, not when it respawns this process).
    spool.remove_partial_updates()
    # The SmtpSend log is written where the sessions are: in this process.
    send_log = ProtocolLog(config.gateway.log_dir, "send", reactor)
    send_log.start()
    scheduler, routes = build_scheduler(config, reactor, spool, send_log)

    def reload() -> None:
        # The gateway checked the new file before it sent SIGHUP; checked
        # again here, since it is read again.
        nonlocal routes
        try:
            new = build_routes(load_config(), reactor, send_log)
        except ConfigError as error:
            _log.error("delivery process: reload refused, configuration kept: {problem}",
                       problem=str(error))
            return
        reconfigure(scheduler, routes, new, reactor)
        routes = new
        _log.info("delivery process: configuration reloaded")

    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reload))  # type: ignore[attr-defined]
    scheduler.start(spool.iter_entries())
    _log.info("delivery process: {count} queued message(s) in the schedule", count=scheduler.held)
    # Started after the scheduler, so a pending delete beats the first attempts.
    control = ControlPoller(
        config.gateway.spool_dir, spool=spool, scheduler=scheduler, clock=reactor
    )
    control.start()
    done: Deferred[None] = Deferred()
    # Only stdin is read: the log owns stdout, which StandardIO would make
    # non-blocking (a full pipe would then fail the log's writes).
    stdio.StandardIO(_QueueIds(scheduler, done), stdout=os.open(os.devnull, os.O_WRONLY),  # type: ignore[call-arg,no-untyped-call]
                     reactor=reactor)
    await done
    control.stop()
    await scheduler.stop()
    routes.release()
    await send_log.stop()
    _log.info("delivery process stopped")


def main(argv: Sequence[str] | None = None) -> None:
    """
    C{python -m relaygw.runner [--config PATH]}: the delivery process.
    Started by the gateway, not by hand.
    """
    # Until the scheduler can reload, a reload request must not end the
    # process (SIGHUP's default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="python -m relaygw.runner")
    parser.add_argument("--config", "-c", default=None)
    args = parser.parse_args(argv)
    # Receiving answers clients who wait for each reply; delivery is
    # background work that a queue exists to absorb.  On a busy machine the
    # receiving process goes first (measured in bench/bench_accept.py: accept
    # rate up, delivery rate unchanged).
    os.nice(DELIVERY_NICENESS)
    out = BatchedOutput(sys.stdout)
    globalLogBeginner.beginLoggingTo(
        [child_log_observer(cast(TextIO, out))], redirectStandardIO=False
    )
    forward_to_parent()

    from twisted.internet import task

    from relaygw.config._load import load, load_default
    from relaygw.spool.control import SpoolLock, lock_holder

    def load_config() -> Config:
        return load(args.config) if args.config else load_default()

    config = load_config()
    # Held until this process ends: while it is, `relaygw queue` sends its
    # changes here instead of making them, and no second delivery process
    # (an orphan still finishing after kill -9 of the gateway) delivers too.
    lock = SpoolLock.acquire(config.gateway.spool_dir, wait=False)
    if lock is None:
        _log.warn(
            "delivery process: waiting for the spool lock (held by pid {pid})",
            pid=lock_holder(config.gateway.spool_dir),
        )
        lock = SpoolLock.acquire(config.gateway.spool_dir, wait=True)

    def start(reactor: IServeReactor) -> Deferred[None]:
        make_lean(reactor)
        out.attach(cast(IReactorFromThreads, reactor))
        # A terminal's Ctrl-C reaches the whole process group; the gateway
        # stops this process by closing its stdin, after its own sessions.
        reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)  # type: ignore[attr-defined]
        return Deferred.fromCoroutine(_run(reactor, config, load_config))

    task.react(start)


if __name__ == "__main__":
    main()
