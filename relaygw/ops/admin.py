"""
The admin HTTP endpoint on C{gateway.admin_listen} (SPEC section 7), with
twisted.web:

  - C{GET /health}: 200 or 503 with C{{"status", "checks"}}
    (L{relaygw.ops.health});
  - C{GET /metrics}: Prometheus text (L{relaygw.ops.metrics});
  - C{GET /queue[?limit=N]}: the oldest C{N} messages (default
    L{DEFAULT_LIMIT}, at most L{MAX_LIMIT}) as a JSON list; the header
    C{X-Queue-Total} gives the number of messages in the spool.  Ids sort
    by creation time, so the list is oldest first.

With C{gateway.admin_token_file} every request needs C{Authorization:
Bearer <token>} (compared in constant time), else 401; the loader requires
the file when C{admin_listen} is not a loopback address.

Nothing is logged per request (no access log: a load balancer probes every
second); health checks log their changes, refused tokens are logged at most
once a minute.
"""

from __future__ import annotations

import hmac
import json
from typing import Any
from urllib.parse import parse_qs

from attrs import frozen
from twisted.internet.defer import Deferred, TimeoutError as DeferTimeout
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from relaygw._types import IServeReactor
from relaygw.config._model import Config, HostPort
from relaygw.ops.health import GatewayView, Health
from relaygw.events import MESSAGES
from relaygw.ops.metrics import CONTENT_TYPE, Metrics, MetricsObserver
from relaygw.ops.queue import DEFAULT_LIMIT, MAX_LIMIT, QueueView

__all__ = ["AdminError", "AdminResource", "AdminServer", "check_token", "read_token"]

#: Threads for the spool probe, the spool count and a listing (one each at a time).
ADMIN_THREADS = 3
#: Seconds an idle HTTP connection stays open.
_IDLE_TIMEOUT = 60
_REFUSAL_LOG_INTERVAL = 60.0
#: Seconds a scrape waits for a fresh spool count before it shows the last one.
_STATS_WAIT = 2.0


class AdminError(Exception):
    """The endpoint cannot start: its token file is unusable, or it cannot listen."""


def read_token(path: Any) -> bytes:
    """
    The token in the file at C{path}, surrounding white space removed.

    @raise AdminError: it cannot be read, or is empty.
    """
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as error:
        raise AdminError(f"cannot read gateway.admin_token_file {path}: {error.strerror}") from None
    if not token:
        raise AdminError(f"gateway.admin_token_file {path} is empty")
    return token


def check_token(header: bytes | None, token: bytes | None) -> bool:
    """
    Whether an C{Authorization} header value passes: always without a
    token; else it must be C{Bearer <token>} (scheme in any case),
    compared in constant time.
    """
    if token is None:
        return True
    if header is None:
        return False
    scheme, _, supplied = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(supplied.strip(), token)


class _QuietSite(Site):
    """A Site without an access log (twisted.web's goes to the main log).

    twisted.web's Request is untyped, hence C{Any} for requests here."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


class AdminResource(Resource):
    """The three endpoints, behind the token check."""

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        *,
        health: Health,
        metrics: Metrics,
        queue: QueueView,
        token: bytes | None,
        clock: IReactorTime,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._health = health
        self._metrics = metrics
        self._queue = queue
        self._token = token
        self._clock = clock
        self._refused = 0
        self._refusal_logged: float | None = None

    def render_GET(self, request: Any) -> bytes | int:
        if not check_token(request.getHeader(b"authorization"), self._token):
            self._note_refusal(request)
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="relaygw"')
            return _json(request, {"error": "a valid bearer token is required"})
        path = (request.path or b"/").rstrip(b"/")
        if path == b"/health":
            return _later(request, self._render_health())
        if path == b"/metrics":
            return _later(request, self._render_metrics())
        if path == b"/queue":
            limit = _limit(request)
            if limit is None:
                request.setResponseCode(400)
                return _json(request, {"error": f"limit must be an integer from 1 to {MAX_LIMIT}"})
            return _later(request, self._render_queue(limit))
        request.setResponseCode(404)
        return _json(request, {"error": "not found; try /health, /metrics or /queue"})

    def _note_refusal(self, request: Any) -> None:
        self._refused += 1
        now = self._clock.seconds()
        if self._refusal_logged is None or now - self._refusal_logged >= _REFUSAL_LOG_INTERVAL:
            peer = request.getClientAddress()
            self._log.warn(
                "admin HTTP: {count} request(s) without a valid token (last from {peer})",
                count=self._refused, peer=str(getattr(peer, "host", peer)),
                event="admin.unauthorized",
            )
            self._refused, self._refusal_logged = 0, now

    async def _render_health(self) -> _Answer:
        ok, results = await self._health.run()
        body = {
            "status": "ok" if ok else "fail",
            "checks": {name: {"ok": r.ok, "detail": r.detail} for name, r in results.items()},
        }
        return _Answer(200 if ok else 503, _dumps(body))

    async def _render_metrics(self) -> _Answer:
        try:
            # A hung spool (NFS) must not hang the scrape as well.
            await self._queue.stats().addTimeout(_STATS_WAIT, self._clock)
        except (OSError, DeferTimeout):
            pass  # the gauges show the last count (NaN before one)
        return _Answer(200, self._metrics.render(), CONTENT_TYPE.encode("ascii"))

    async def _render_queue(self, limit: int) -> _Answer:
        try:
            total, entries = await self._queue.listing(limit)
        except OSError as error:
            return _Answer(503, _dumps({"error": f"the spool cannot be listed: {error.strerror}"}))
        return _Answer(200, _dumps(entries), extra=((b"x-queue-total", str(total).encode()),))


@frozen
class _Answer:
    code: int
    body: bytes
    content_type: bytes = b"application/json"
    extra: tuple[tuple[bytes, bytes], ...] = ()


def _limit(request: Any) -> int | None:
    query = parse_qs((request.uri or b"").partition(b"?")[2].decode("latin-1"))
    values = query.get("limit")
    if not values:
        return DEFAULT_LIMIT
    try:
        limit = int(values[-1])
    except ValueError:
        return None
    return limit if 1 <= limit <= MAX_LIMIT else None


def _dumps(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, indent=1).encode("utf-8") + b"\n"


def _json(request: Any, value: object) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return _dumps(value)


def _later(request: Any, work: Any) -> int:
    """Answer C{request} when the coroutine C{work} gives (code, body, type)."""
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def answer(result: _Answer) -> None:
        if gone:
            return
        request.setResponseCode(result.code)
        request.setHeader(b"content-type", result.content_type)
        request.setHeader(b"cache-control", b"no-store")
        for name, value in result.extra:
            request.setHeader(name, value)
        request.setHeader(b"content-length", str(len(result.body)).encode("ascii"))
        request.write(result.body)
        request.finish()

    def failed(failure: Failure) -> None:
        AdminResource._log.failure("admin HTTP request failed", failure)
        if not gone:
            request.setResponseCode(500)
            request.write(_json(request, {"error": "internal error"}))
            request.finish()

    Deferred.fromCoroutine(work).addCallback(answer).addErrback(failed)
    return NOT_DONE_YET


class AdminServer:
    """
    The endpoint with everything behind it: its thread pool, the metrics
    observer on the global log publisher, the spool reader, the socket.
    """

    _log = Logger()

    def __init__(
        self,
        config: Config,
        view: GatewayView,
        reactor: IServeReactor,
        *,
        publisher: Any = globalLogPublisher,
    ) -> None:
        """
        @param config: the running configuration: C{gateway.admin_listen},
            C{admin_token_file}, the spool.
        @raise AdminError: the token file cannot be read.
        """
        listen = config.gateway.admin_listen
        assert listen is not None, "no admin_listen: no admin server"
        self.listen: HostPort = listen
        token_file = config.gateway.admin_token_file
        self._token = read_token(token_file) if token_file is not None else None
        self._reactor = reactor
        self._publisher = publisher
        self._pool = ThreadPool(minthreads=0, maxthreads=ADMIN_THREADS, name="relaygw-admin")
        self._queue: QueueView | None = None
        self._port: IListeningPort | None = None
        self._observer: MetricsObserver | None = None
        self._config = config
        self._view = view
        self.metrics: Metrics | None = None

    @property
    def port(self) -> IListeningPort | None:
        """The listening port, while listening."""
        return self._port

    def start(self) -> None:
        """
        Start counting events and listen.

        @raise AdminError: C{admin_listen} cannot be bound, or the spool
            opened; nothing is left running.
        """
        try:
            queue = QueueView(self._config.gateway.spool_dir, self._reactor, self._pool)
        except OSError as error:
            raise AdminError(f"admin HTTP: cannot open the spool: {error.strerror}") from None
        metrics = Metrics(self._config, queue_stats=queue.cached, now=self._reactor.seconds)
        health = Health(self._view, reactor=self._reactor, pool=self._pool, queue=queue)
        resource = AdminResource(health=health, metrics=metrics, queue=queue,
                                 token=self._token, clock=self._reactor)
        site: Any = _QuietSite(resource, timeout=_IDLE_TIMEOUT)  # type: ignore[no-untyped-call]
        site.displayTracebacks = False
        try:
            port = IReactorTCP(self._reactor).listenTCP(
                self.listen.port, site, interface=self.listen.host
            )
        except Exception as error:
            queue.close()
            raise AdminError(f"admin HTTP cannot listen on {self.listen}: {error}") from None
        self._pool.start()
        self._queue, self._port, self.metrics = queue, port, metrics
        self._observer = MetricsObserver(metrics)
        self._publisher.addObserver(self._observer)
        MESSAGES.addObserver(self._observer)
        address = port.getHost()
        self._log.info("admin HTTP on {host}:{port}{auth}",
                       host=getattr(address, "host", self.listen.host),
                       port=getattr(address, "port", self.listen.port),
                       auth=" (bearer token required)" if self._token else "")

    async def stop(self) -> None:
        """Stop listening and counting; join the threads."""
        if self._observer is not None:
            self._publisher.removeObserver(self._observer)
            MESSAGES.removeObserver(self._observer)
            self._observer = None
        port, self._port = self._port, None
        if port is not None:
            result = port.stopListening()
            if isinstance(result, Deferred):
                await result
        if self._queue is not None:
            self._queue.close()
            self._queue = None
        if self._pool.started:
            self._pool.stop()
