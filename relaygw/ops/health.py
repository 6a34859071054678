"""
The checks of C{GET /health} (SPEC section 7).

Each check answers C{(ok, detail)}; they run concurrently, each bounded by
its own timeout, and each runs at most once at a time (L{Once}: a hung probe
is waited for, not stacked).  The status is C{ok} when every I{critical}
check is:

  - C{spool}: a probe file is created, fsynced and removed in the spool's
    C{queue/} directory (where messages are written), and the file system
    has at least L{Health.min_free} bytes (C{gateway.health_min_free}) and
    L{MIN_FREE_INODES} inodes free;
  - C{listeners}: every planned listening socket is listening;
  - C{directory} (only with a C{[directory]}): a service-account bind
    answers within the directory's timeout per server; cached for
    L{DIRECTORY_TTL} seconds so that probes every second do not bind every
    second;
  - C{queue}: the oldest queued message is younger than
    C{gateway.health_queue_age} (default half of C{[queue].expire}: a
    message that old has waited through most of its retries);
  - C{delivery}: the delivery process runs (or delivery runs in-process).

With C{health_queue_age = "0s"} the queue check only reports the count and
the age, and never fails.  Behind a load balancer that may be wanted: a backlog
for one unreachable destination is on every gateway at once, and failing
them all would turn a delay into an outage.

Only changes are logged (ok to failing and back), never a line per probe.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relaygw._types import ISpoolReactor
from relaygw.config._model import Config
from relaygw.interfaces import IDirectory
from relaygw.listen.bindings import plan_sockets
from relaygw.ops._once import Once
from relaygw.ops.queue import QueueView

__all__ = ["CRITICAL", "DIRECTORY_TTL", "CheckResult", "GatewayView", "Health", "MIN_FREE_INODES"]

#: Checks whose failure makes the status C{fail} (and C{/health} 503).
CRITICAL = frozenset({"spool", "listeners", "queue", "directory", "delivery"})
#: Seconds a directory answer is reused for.
DIRECTORY_TTL = 5.0
#: Seconds the spool, queue and delivery checks may take.
CHECK_TIMEOUT = 5.0
MIN_FREE_INODES = 1000
_MIB = 1024 * 1024


@frozen
class CheckResult:
    ok: bool
    detail: str


@frozen
class GatewayView:
    """
    What the checks read from the running gateway, as functions (the
    gateway's configuration, sockets and processes change on a reload or a
    restart of the delivery process).

    @ivar config: the running configuration.
    @ivar ports: the listening ports.
    @ivar delivery_pid: the delivery process's pid (C{None} while it is
        down); C{None} itself when delivery runs in this process.
    @ivar directory: the directory of C{[directory]}, C{None} without one.
    """

    config: Callable[[], Config]
    ports: Callable[[], Sequence[IListeningPort]]
    delivery_pid: Callable[[], int | None] | None
    directory: Callable[[], IDirectory | None]


def _size(octets: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", _MIB), ("KiB", 1024)):
        if octets >= scale:
            return f"{octets / scale:.1f} {unit}"
    return f"{int(octets)} B"


def _span(seconds: float) -> str:
    s = int(seconds)
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= scale:
            return f"{s / scale:.1f}{unit}"
    return f"{s}s"


def probe_spool(queue_dir: str, min_free: int) -> CheckResult:
    """
    Create, write, fsync and remove a probe file in C{queue_dir}, then look
    at its file system's free space (blocking: run it in a thread).

    The probe's name ends in C{.tmp}, which spool recovery removes, should
    the process die in between.
    """
    probe = os.path.join(queue_dir, f".health-{os.getpid()}.tmp")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"relaygw health probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            try:
                os.unlink(probe)
            except FileNotFoundError:
                pass
        fs = os.statvfs(queue_dir)
    except OSError as error:
        return CheckResult(False, f"{queue_dir} is not writable: {error.strerror or error}")
    free = fs.f_bavail * fs.f_frsize
    if free < min_free:
        return CheckResult(
            False, f"{queue_dir}: only {_size(free)} free, {_size(min_free)} needed"
        )
    if fs.f_files > 0 and fs.f_favail < MIN_FREE_INODES:
        return CheckResult(False, f"{queue_dir}: only {fs.f_favail} inodes free")
    return CheckResult(True, f"{queue_dir} writable, {_size(free)} free")


class Health:
    """Runs the checks for C{/health}."""

    _log = Logger()

    def __init__(
        self,
        view: GatewayView,
        *,
        reactor: ISpoolReactor,
        pool: ThreadPool,
        queue: QueueView,
        min_free: int | None = None,
    ) -> None:
        """
        @param pool: the threads the spool probe runs in.
        @param queue: the spool counts for the C{queue} check.
        @param min_free: free bytes the spool needs; default
            C{gateway.health_min_free}, else twice the largest
            C{max_message_size} (so that one more message fits beside one
            in progress), at least 64 MiB.
        """
        self._view = view
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._pool = pool
        self._queue = queue
        self._min_free = min_free
        self._last: dict[str, bool] = {}
        self._directory_answer: tuple[float, CheckResult] | None = None
        self._spool = Once(self._spool_probe, reactor)
        self._directory = Once(self._directory_probe, reactor)

    @property
    def min_free(self) -> int:
        """The free bytes the spool check needs."""
        if self._min_free is not None:
            return self._min_free
        config = self._view.config()
        if config.gateway.health_min_free is not None:
            return config.gateway.health_min_free
        sizes = [c.max_message_size for c in config.connectors]
        return max(64 * _MIB, 2 * max(sizes, default=0))

    def run(self) -> Deferred[tuple[bool, dict[str, CheckResult]]]:
        """
        Run every check.

        @return: fires with the status (C{True}: ok) and each check's
            result by name, in the SPEC's order; never fails.
        """
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> tuple[bool, dict[str, CheckResult]]:
        config = self._view.config()
        checks: dict[str, tuple[Deferred[CheckResult], float]] = {
            "spool": (self._spool.get(), CHECK_TIMEOUT),
            "listeners": (succeed(self._listeners(config)), CHECK_TIMEOUT),
            "queue": (self._queue_check(config), CHECK_TIMEOUT),
        }
        directory = self._view.directory()
        if config.directory is not None and directory is not None:
            settings = config.directory
            timeout = settings.timeout.total_seconds() * max(1, len(settings.servers)) + 0.5
            checks["directory"] = (self._directory_check(), timeout)
        checks["delivery"] = (succeed(self._delivery()), CHECK_TIMEOUT)
        waits = [self._bounded(name, d, timeout) for name, (d, timeout) in checks.items()]
        answers = await DeferredList(waits, consumeErrors=True)
        results = {}
        for name, (_, answer) in zip(checks, answers):
            result = answer if isinstance(answer, CheckResult) else CheckResult(False, "error")
            results[name] = result
            self._note(name, result)
        ok = all(r.ok for name, r in results.items() if name in CRITICAL)
        return ok, results

    def _bounded(self, name: str, d: Deferred[CheckResult], timeout: float) -> Deferred[Any]:
        def late(result: object, seconds: float) -> CheckResult:
            return CheckResult(False, f"no answer within {seconds:g} s")

        def failed(failure: Failure) -> CheckResult:
            self._log.failure("health check {check} failed unexpectedly", failure, check=name)
            return CheckResult(False, f"error: {failure.getErrorMessage()}")

        d.addTimeout(timeout, self._clock, onTimeoutCancel=late)
        return d.addErrback(failed)

    def _note(self, name: str, result: CheckResult) -> None:
        """Log a check's changes only (an unknown previous state counts as ok)."""
        previous = self._last.get(name, True)
        self._last[name] = result.ok
        if previous and not result.ok:
            self._log.warn("health check {check} failing: {detail}", check=name,
                           detail=result.detail, event="health.fail")
        elif result.ok and not previous:
            self._log.info("health check {check} ok again: {detail}", check=name,
                           detail=result.detail, event="health.ok")

    # -- checks -------------------------------------------------------------

    def _spool_probe(self) -> Deferred[CheckResult]:
        queue_dir = str(self._view.config().gateway.spool_dir / "queue")
        return deferToThreadPool(
            self._reactor, self._pool, probe_spool, queue_dir, self.min_free
        )

    def _listeners(self, config: Config) -> CheckResult:
        planned = len(plan_sockets(config.connectors))
        ports = list(self._view.ports())
        down = [p for p in ports if not getattr(p, "connected", True)]
        up = len(ports) - len(down)
        detail = f"{up} of {planned} socket(s) listening"
        names = ", ".join(_address(p) for p in down)
        if names:
            detail += f"; closed: {names}"
        return CheckResult(up >= planned, detail)

    def _queue_check(self, config: Config) -> Deferred[CheckResult]:
        limit = _queue_age(config)

        def judged(stats: Any) -> CheckResult:
            age = stats.oldest_age(self._clock.seconds())
            detail = f"{stats.count} message(s), oldest {_span(age)} old"
            if limit == 0:
                return CheckResult(True, detail + " (no threshold)")
            detail += f" (threshold {_span(limit)})"
            return CheckResult(age < limit, detail)

        def unreadable(failure: Failure) -> CheckResult:
            return CheckResult(False, f"the spool cannot be listed: {failure.getErrorMessage()}")

        return self._queue.stats().addCallbacks(judged, unreadable)

    def _directory_check(self) -> Deferred[CheckResult]:
        answer = self._directory_answer
        if answer is not None and self._clock.seconds() - answer[0] < DIRECTORY_TTL:
            return succeed(answer[1])
        return self._directory.get()

    def _directory_probe(self) -> Deferred[CheckResult]:
        directory = self._view.directory()
        started = self._clock.seconds()
        if directory is None:
            return succeed(CheckResult(True, "no directory"))

        def answered(_: object) -> CheckResult:
            return CheckResult(True, f"answered in {self._clock.seconds() - started:.3f} s")

        def unavailable(failure: Failure) -> CheckResult:
            return CheckResult(False, failure.getErrorMessage())

        def keep(result: CheckResult) -> CheckResult:
            self._directory_answer = (self._clock.seconds(), result)
            return result

        d: Deferred[object] = directory.check()  # type: ignore[assignment]
        return d.addCallbacks(answered, unavailable).addCallback(keep)

    def _delivery(self) -> CheckResult:
        if self._view.delivery_pid is None:
            return CheckResult(True, "delivery runs in this process")
        pid = self._view.delivery_pid()
        if pid is None:
            return CheckResult(False, "the delivery process is not running (restarting)")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return CheckResult(False, f"the delivery process {pid} is gone")
        except PermissionError:
            pass  # it exists, under another user
        return CheckResult(True, f"delivery process {pid} running")


def _queue_age(config: Config) -> float:
    """The queue check's threshold in seconds (0: none)."""
    age = config.gateway.health_queue_age
    if age is None:
        return config.queue.expire.total_seconds() / 2
    return age.total_seconds()


def _address(port: IListeningPort) -> str:
    host = port.getHost()
    return f"{getattr(host, 'host', '?')}:{getattr(host, 'port', '?')}"
