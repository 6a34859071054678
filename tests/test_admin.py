"""
Tests for L{relaygw.ops.admin} (with L{relaygw.ops.health},
L{relaygw.ops.metrics} and L{relaygw.ops.queue} behind it): a real
L{AdminServer} on a free loopback port with the real reactor, a real spool
in a temporary directory, and a blocking HTTP client (urllib) in a thread,
as a load balancer's probe would be.  The metrics are read back with
prometheus_client's own parser.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import attrs
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import LogEvent, LogPublisher, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from relaygw._types import IServeReactor
from relaygw.config._load import load_text
from relaygw.config._model import Config
from relaygw.errors import ConfigError
from relaygw.interfaces import IDirectory
from relaygw.ops.admin import AdminError, AdminServer, check_token, read_token
from relaygw.ops.health import GatewayView
from relaygw.ops.metrics import AUTH_RESULTS, Metrics
from relaygw.service import build_directory
from relaygw.spool.envelope import Envelope, Recipient
from relaygw.spool.store import DirectorySpool
from tests.servers.ports import free_port

_CONFIG = """
[gateway]
hostname = "gw.example.test"
spool_dir = "spool"
log_dir = "log"
admin_listen = "{admin_listen}"
{gateway}

[[accepted_domains]]
domain = "example.test"
route = "local"

[[connectors]]
name = "Plain"
bindings = ["127.0.0.1:2525"]
tls = "off"

[[connectors]]
name = "Submission"
bindings = ["127.0.0.1:5870"]
tls = "off"

[[routes]]
name = "local"
via = "maildir"
maildir = "mail"

[[routes]]
name = "hub"
via = "smarthost"
smarthosts = ["127.0.0.1:2526"]
{rest}
"""

#: Every SPEC section 7 metric (as the parser names its family) and its labels.
SPEC_METRICS = {
    "relaygw_connections": ("counter", {"connector"}),
    "relaygw_messages_received": ("counter", {"connector"}),
    "relaygw_messages_delivered": ("counter", {"route"}),
    "relaygw_messages_deferred": ("counter", {"route"}),
    "relaygw_messages_bounced": ("counter", {"route"}),
    "relaygw_queue_messages": ("gauge", set()),
    "relaygw_queue_oldest_age_seconds": ("gauge", set()),
    "relaygw_auth_attempts": ("counter", {"connector", "result"}),
    "relaygw_directory_request_seconds": ("histogram", set()),
}


def _reactor() -> IServeReactor:
    from twisted.internet import reactor

    return cast(IServeReactor, reactor)


@attrs.define
class _Port:
    """A listening port as the listeners check sees one (C{connected}, C{getHost})."""

    port: int
    connected: bool = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)


@attrs.define
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _get(url: str, headers: dict[str, str] | None = None) -> _Answer:
    """A blocking GET (run it in a thread); HTTP errors are answers too."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return _Answer(answer.status, {k.lower(): v for k, v in answer.headers.items()},
                           answer.read())
    except urllib.error.HTTPError as error:
        return _Answer(error.code, {k.lower(): v for k, v in error.headers.items()},
                       error.read())


def _families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The value of the one sample C{name} with exactly C{labels}."""
    found = [
        s.value for family in families.values() for s in family.samples
        if s.name == name and s.labels == labels
    ]
    assert len(found) == 1, (name, labels, found)
    return float(found[0])


class _Admin:
    """An AdminServer over a real spool, with the gateway's view made of test knobs."""

    def __init__(self, case: TestCase, *, gateway: str = "", rest: str = "",
                 publisher: LogPublisher | None = None) -> None:  # fmt: skip
        self.base = Path(tempfile.mkdtemp(prefix="relaygw-admin-"))
        case.addCleanup(shutil.rmtree, self.base, True)
        self.port = free_port()
        text = _CONFIG.format(admin_listen=f"127.0.0.1:{self.port}", gateway=gateway, rest=rest)
        self.config: Config = load_text(text, "relaygw.toml", self.base)
        self.ports: list[_Port] = [_Port(2525), _Port(5870)]
        self.pid: int | None = os.getpid()
        self.directory: IDirectory | None = None
        self.publisher = publisher or LogPublisher()
        self.spool = DirectorySpool(self.config.gateway.spool_dir, _reactor())
        case.addCleanup(self.spool.close)
        view = GatewayView(
            config=lambda: self.config,
            ports=lambda: cast(Sequence[IListeningPort], self.ports),
            delivery_pid=lambda: self.pid,
            directory=lambda: self.directory,
        )
        self.server = AdminServer(self.config, view, _reactor(), publisher=self.publisher)
        self._case = case

    def start(self) -> _Admin:
        self.server.start()
        self._case.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))
        return self

    @property
    def url(self) -> str:
        port = self.server.port
        assert port is not None
        return f"http://127.0.0.1:{getattr(port.getHost(), 'port')}"

    async def get(self, path: str, headers: dict[str, str] | None = None) -> _Answer:
        answer: _Answer = await threads.deferToThread(_get, self.url + path, headers)
        return answer

    async def queue(self, sender: str, rcpts: Sequence[Recipient], received_at: float) -> str:
        """Commit one message to the spool."""
        writer = self.spool.begin()
        writer.write(b"Subject: test\r\n\r\nbody\r\n")
        envelope = Envelope(
            id=writer.queue_id, sender=sender, recipients=tuple(rcpts), connector="Plain",
            client_ip="127.0.0.1", received_at=received_at, size=25,
            message_id="<m@gw.example.test>",
        )
        await writer.commit(envelope)
        return writer.queue_id


def _dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait(10)
    return child.pid


class HealthTests(TestCase):
    timeout = 30

    async def _health(self, admin: _Admin) -> tuple[int, Any]:
        answer = await admin.get("/health")
        self.assertEqual(answer.headers["content-type"], "application/json")
        return answer.status, answer.json()

    async def test_ok(self) -> None:
        """
        With a writable spool, every listener up, an empty queue and the
        delivery process running, /health is 200 with the SPEC's JSON: the
        status and one {ok, detail} per check.
        """
        admin = _Admin(self).start()
        status, body = await self._health(admin)
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "ok")
        self.assertEqual(list(body["checks"]), ["spool", "listeners", "queue", "delivery"])
        for name, check in body["checks"].items():
            self.assertEqual(set(check), {"ok", "detail"}, name)
            self.assertIs(check["ok"], True, name)
            self.assertIsInstance(check["detail"], str)
        self.assertIn("writable", body["checks"]["spool"]["detail"])
        self.assertEqual(body["checks"]["listeners"]["detail"], "2 of 2 socket(s) listening")

    async def test_spool_not_writable(self) -> None:
        """
        A spool whose queue directory cannot take a file (here: it is a
        plain file, which stops root too) fails the spool check: 503.
        """
        admin = _Admin(self).start()
        queue = admin.config.gateway.spool_dir / "queue"
        shutil.rmtree(queue)
        queue.write_bytes(b"")
        status, body = await self._health(admin)
        self.assertEqual(status, 503)
        self.assertEqual(body["status"], "fail")
        self.assertIs(body["checks"]["spool"]["ok"], False)
        self.assertIn("is not writable", body["checks"]["spool"]["detail"])

    async def test_spool_too_little_free_space(self) -> None:
        """Below gateway.health_min_free the spool check fails, naming both sizes."""
        admin = _Admin(self, gateway='health_min_free = "1000000GiB"').start()
        status, body = await self._health(admin)
        self.assertEqual(status, 503)
        detail = body["checks"]["spool"]["detail"]
        self.assertIn("free, 1000000.0 GiB needed", detail)

    async def test_listener_down(self) -> None:
        """A listening socket that closed fails the listeners check, naming it: 503."""
        admin = _Admin(self).start()
        admin.ports[1].connected = False
        status, body = await self._health(admin)
        self.assertEqual(status, 503)
        self.assertEqual(body["checks"]["listeners"], {
            "ok": False, "detail": "1 of 2 socket(s) listening; closed: 127.0.0.1:5870",
        })

    async def test_old_queued_message(self) -> None:
        """
        A queued message older than half of [queue].expire (the default
        threshold) fails the queue check: 503; one that is younger does not.
        """
        admin = _Admin(self, rest='[queue]\nexpire = "2h"\n').start()
        now = _reactor().seconds()
        await admin.queue("a@example.test", [Recipient("b@example.test")], now - 59 * 60)
        status, body = await self._health(admin)
        self.assertEqual(status, 200, body)
        self.assertEqual(body["checks"]["queue"]["detail"],
                         "1 message(s), oldest 59.0m old (threshold 1.0h)")
        admin2 = _Admin(self, rest='[queue]\nexpire = "2h"\n').start()
        await admin2.queue("a@example.test", [Recipient("b@example.test")], now - 61 * 60)
        status, body = await self._health(admin2)
        self.assertEqual(status, 503)
        self.assertEqual(body["checks"]["queue"], {
            "ok": False, "detail": "1 message(s), oldest 1.0h old (threshold 1.0h)",
        })

    async def test_queue_age_threshold_configurable(self) -> None:
        """gateway.health_queue_age sets the threshold; "0s" never fails the queue check."""
        now = _reactor().seconds()
        admin = _Admin(self, gateway='health_queue_age = "10m"').start()
        await admin.queue("", [Recipient("b@example.test")], now - 11 * 60)
        status, body = await self._health(admin)
        self.assertEqual(status, 503)
        self.assertIn("(threshold 10.0m)", body["checks"]["queue"]["detail"])
        off = _Admin(self, gateway='health_queue_age = "0s"').start()
        await off.queue("", [Recipient("b@example.test")], now - 30 * 86400)
        status, body = await self._health(off)
        self.assertEqual(status, 200)
        self.assertEqual(body["checks"]["queue"], {
            "ok": True, "detail": "1 message(s), oldest 30.0d old (no threshold)",
        })

    async def test_delivery_process_dead(self) -> None:
        """
        A delivery process that is not running (restarting) or whose pid is
        gone fails the delivery check: 503.
        """
        admin = _Admin(self).start()
        admin.pid = None
        status, body = await self._health(admin)
        self.assertEqual(status, 503)
        self.assertEqual(body["checks"]["delivery"]["ok"], False)
        self.assertIn("not running", body["checks"]["delivery"]["detail"])
        admin.pid = _dead_pid()
        status, body = await self._health(admin)
        self.assertEqual(status, 503)
        self.assertEqual(body["checks"]["delivery"]["detail"],
                         f"the delivery process {admin.pid} is gone")

    async def test_directory_unreachable(self) -> None:
        """
        With a [directory] whose only server refuses connections (a real
        LDAPDirectory, a closed loopback port), the directory check fails:
        503; without a [directory] there is no directory check at all.
        """
        closed = free_port()
        admin = _Admin(self, rest=f"""
[directory]
kind = "ldap"
servers = ["ldap://127.0.0.1:{closed}"]
start_tls = false
base_dn = "dc=example,dc=test"
timeout = "2s"
""").start()
        pool = ThreadPool(minthreads=0, maxthreads=2, name="test-directory")
        pool.start()
        self.addCleanup(pool.stop)
        admin.directory = build_directory(admin.config, reactor=_reactor(), threadpool=pool)
        status, body = await self._health(admin)
        self.assertEqual(status, 503)
        self.assertEqual(list(body["checks"]),
                         ["spool", "listeners", "queue", "directory", "delivery"])
        self.assertIs(body["checks"]["directory"]["ok"], False)
        self.assertIn(f"127.0.0.1:{closed}", body["checks"]["directory"]["detail"])

    async def test_probe_loop_logs_nothing(self) -> None:
        """
        50 probes (a new connection each, as HAProxy's httpchk) while one
        check fails log a bounded number of events: the change to failing,
        once, and nothing per request (no access log).
        """
        admin = _Admin(self).start()
        admin.pid = None  # failing: 503 every time
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(50):
            answer = await admin.get("/health")
            self.assertEqual(answer.status, 503)
        globalLogPublisher.removeObserver(events.append)
        shown = [e for e in events if e.get("log_format")]
        self.assertLessEqual(len(shown), 3, [e.get("log_format") for e in shown])
        self.assertEqual([e.get("event") for e in events if e.get("event")], ["health.fail"])


class QueueTests(TestCase):
    timeout = 30

    async def test_queue_json(self) -> None:
        """
        /queue lists each message oldest first with id, sender, size,
        received_at (ISO 8601 UTC) and its recipients' address, state,
        attempts and last_reply; X-Queue-Total counts them.
        """
        admin = _Admin(self).start()
        first = await admin.queue("alice@example.test", [
            Recipient("bob@example.test", "queued", 2, "451 4.2.0 mailbox busy"),
            Recipient("carol@example.test", "delivered", 1, "250 2.0.0 ok"),
        ], 1_800_000_000.0)
        second = await admin.queue("", [Recipient("dan@example.test")], 1_800_000_060.0)
        answer = await admin.get("/queue")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.headers["content-type"], "application/json")
        self.assertEqual(answer.headers["x-queue-total"], "2")
        self.assertEqual(answer.json(), [
            {
                "id": first, "sender": "alice@example.test", "size": 25,
                "received_at": "2027-01-15T08:00:00Z",
                "recipients": [
                    {"address": "bob@example.test", "state": "queued", "attempts": 2,
                     "last_reply": "451 4.2.0 mailbox busy"},
                    {"address": "carol@example.test", "state": "delivered", "attempts": 1,
                     "last_reply": "250 2.0.0 ok"},
                ],
            },
            {
                "id": second, "sender": "", "size": 25, "received_at": "2027-01-15T08:01:00Z",
                "recipients": [{"address": "dan@example.test", "state": "queued",
                                "attempts": 0, "last_reply": ""}],
            },
        ])
        limited = await admin.get("/queue?limit=1")
        self.assertEqual([m["id"] for m in limited.json()], [first])
        self.assertEqual(limited.headers["x-queue-total"], "2")
        self.assertEqual((await admin.get("/queue?limit=0")).status, 400)
        self.assertEqual((await admin.get("/nothing")).status, 404)


class MetricsTests(TestCase):
    timeout = 30

    async def test_every_spec_metric_with_its_labels(self) -> None:
        """
        Before any event, /metrics (parsed by prometheus_client) has every
        SPEC section 7 name with its labels: zero series for each connector,
        route and AUTH result; the queue gauges count the spool.
        """
        admin = _Admin(self).start()
        await admin.queue("a@example.test", [Recipient("b@example.test")],
                          _reactor().seconds() - 30)
        answer = await admin.get("/metrics")
        self.assertEqual(answer.status, 200)
        self.assertTrue(answer.headers["content-type"].startswith("text/plain; version=0.0.4"))
        families = _families(answer.body.decode())
        for name, (kind, labels) in SPEC_METRICS.items():
            self.assertIn(name, families)
            self.assertEqual(families[name].type, kind, name)
            for sample in families[name].samples:
                if not sample.name.endswith(("_created", "_bucket")):
                    self.assertEqual(set(sample.labels), labels, sample)
        for connector in ("Plain", "Submission"):
            self.assertEqual(_value(families, "relaygw_connections_total",
                                    connector=connector), 0)
            for result in AUTH_RESULTS:
                self.assertEqual(_value(families, "relaygw_auth_attempts_total",
                                        connector=connector, result=result), 0)
        for route in ("local", "hub"):
            for kind in ("delivered", "deferred", "bounced"):
                self.assertEqual(_value(families, f"relaygw_messages_{kind}_total",
                                        route=route), 0)
        self.assertEqual(_value(families, "relaygw_queue_messages"), 1)
        age = _value(families, "relaygw_queue_oldest_age_seconds")
        self.assertTrue(29 <= age < 120, age)
        self.assertEqual(_value(families, "relaygw_directory_request_seconds_count"), 0)

    async def test_hung_spool_count_does_not_hang_the_scrape(self) -> None:
        """A spool count that never ends (a hung NFS) leaves the gauges at NaN, within seconds."""
        from relaygw.ops._once import Once

        admin = _Admin(self).start()
        queue = admin.server._queue  # type: ignore[attr-defined]
        hung: Deferred[object] = Deferred()
        queue._counting = Once(lambda: hung, _reactor())
        started = _reactor().seconds()
        answer = await admin.get("/metrics")
        self.assertEqual(answer.status, 200)
        self.assertLess(_reactor().seconds() - started, 5)
        self.assertTrue(math.isnan(_value(_families(answer.body.decode()),
                                          "relaygw_queue_messages")))

    async def test_events_counted(self) -> None:
        """
        The log events of the pipeline (as the session, the throttle, the
        directory and the scheduler emit them, the scheduler's via the
        delivery process's re-published records) move the counters.
        """
        admin = _Admin(self).start()
        publish = admin.publisher
        session = {"connector": "Submission", "session_id": "s1", "peer": "127.0.0.1:4000"}
        publish({"event": "receive.disconnect", **session})
        publish({"event": "receive.queued", "queue_id": "q1", **session})
        publish({"event": "receive.queued", "queue_id": "q2", **session})
        for result in ("success", "failure", "failure", "tempfail", "throttled"):
            publish({"event": "auth.result", "result": result, **session})
        publish({"event": "directory.request", "operation": "authenticate", "seconds": 0.02})
        for event_id, route in (("DELIVER", "local"), ("DEFER", "hub"), ("DEFER", "hub"),
                                ("FAIL", "hub"), ("EXPIRE", "hub"), ("DSN", "hub")):
            publish({"event_id": event_id, "route": route, "queue_id": "q1"})
        families = _families((await admin.get("/metrics")).body.decode())
        self.assertEqual(_value(families, "relaygw_connections_total", connector="Submission"), 1)
        self.assertEqual(_value(families, "relaygw_connections_total", connector="Plain"), 0)
        self.assertEqual(
            _value(families, "relaygw_messages_received_total", connector="Submission"), 2
        )
        for result, count in (("success", 1), ("failure", 2), ("tempfail", 1), ("throttled", 1)):
            self.assertEqual(_value(families, "relaygw_auth_attempts_total",
                                    connector="Submission", result=result), count)
        self.assertEqual(_value(families, "relaygw_messages_delivered_total", route="local"), 1)
        self.assertEqual(_value(families, "relaygw_messages_deferred_total", route="hub"), 2)
        self.assertEqual(_value(families, "relaygw_messages_bounced_total", route="hub"), 2)
        self.assertEqual(_value(families, "relaygw_directory_request_seconds_count"), 1)
        self.assertEqual(
            _value(families, "relaygw_directory_request_seconds_bucket", le="0.025"), 1
        )
        self.assertEqual(
            _value(families, "relaygw_directory_request_seconds_bucket", le="0.01"), 0
        )

    async def test_directory_requests_observed(self) -> None:
        """
        A real directory request (a login against a server that refuses the
        connection) emits the event the histogram observes.
        """
        closed = free_port()
        admin = _Admin(self, rest=f"""
[directory]
kind = "ldap"
servers = ["ldap://127.0.0.1:{closed}"]
start_tls = false
base_dn = "dc=example,dc=test"
timeout = "2s"
""", publisher=cast(LogPublisher, globalLogPublisher)).start()
        pool = ThreadPool(minthreads=0, maxthreads=2, name="test-directory")
        pool.start()
        self.addCleanup(pool.stop)
        directory = build_directory(admin.config, reactor=_reactor(), threadpool=pool)
        try:
            await directory.authenticate("alice", "secret")
        except Exception:
            pass
        families = _families((await admin.get("/metrics")).body.decode())
        self.assertEqual(_value(families, "relaygw_directory_request_seconds_count"), 1)
        self.assertFalse(math.isnan(_value(families, "relaygw_directory_request_seconds_sum")))


class TokenTests(TestCase):
    timeout = 30

    async def test_token_required_and_accepted(self) -> None:
        """
        With gateway.admin_token_file, a request without the bearer token, or
        with another, is 401 (every endpoint); with it, 200.
        """
        base = Path(tempfile.mkdtemp(prefix="relaygw-token-"))
        self.addCleanup(shutil.rmtree, base, True)
        (base / "admin.token").write_text("s3cret-token\n")
        admin = _Admin(self, gateway=f'admin_token_file = "{base / "admin.token"}"').start()
        for path in ("/health", "/metrics", "/queue"):
            refused = await admin.get(path)
            self.assertEqual(refused.status, 401, path)
            self.assertEqual(refused.headers["www-authenticate"], 'Bearer realm="relaygw"')
            wrong = await admin.get(path, {"Authorization": "Bearer s3cret-tokem"})
            self.assertEqual(wrong.status, 401, path)
            basic = await admin.get(path, {"Authorization": "Basic czNjcmV0LXRva2Vu"})
            self.assertEqual(basic.status, 401, path)
            ok = await admin.get(path, {"Authorization": "bearer s3cret-token"})
            self.assertEqual(ok.status, 200, (path, ok.body))
            self.assertNotIn(b"s3cret", refused.body + wrong.body)

    def test_non_loopback_needs_token_file(self) -> None:
        """admin_listen on a non-loopback address without admin_token_file is a config error."""
        base = Path(tempfile.mkdtemp(prefix="relaygw-token-"))
        self.addCleanup(shutil.rmtree, base, True)
        for listen in ("0.0.0.0:8025", "192.0.2.2:8025", "[::]:8025"):
            text = _CONFIG.format(admin_listen=listen, gateway="", rest="")
            with self.assertRaises(ConfigError) as raised:
                load_text(text, "relaygw.toml", base)
            self.assertEqual(
                str(raised.exception),
                f"relaygw.toml: gateway.admin_token_file: required when admin_listen "
                f"({'[::]:8025' if listen.startswith('[') else listen}) is not a loopback address",
            )
        for listen in ("127.0.0.2:8025", "[::1]:8025"):
            text = _CONFIG.format(admin_listen=listen, gateway="", rest="")
            load_text(text, "relaygw.toml", base)
        text = _CONFIG.format(admin_listen="0.0.0.0:8025",
                              gateway='admin_token_file = "admin.token"', rest="")
        self.assertEqual(load_text(text, "relaygw.toml", base).gateway.admin_token_file,
                         base / "admin.token")

    def test_unreadable_token_file_stops_startup(self) -> None:
        """A token file that is missing or empty stops the endpoint, naming the key and file."""
        base = Path(tempfile.mkdtemp(prefix="relaygw-token-"))
        self.addCleanup(shutil.rmtree, base, True)
        with self.assertRaises(AdminError) as raised:
            read_token(base / "missing")
        self.assertEqual(
            str(raised.exception),
            f"cannot read gateway.admin_token_file {base / 'missing'}: No such file or directory",
        )
        (base / "empty").write_text(" \n")
        with self.assertRaises(AdminError) as raised:
            read_token(base / "empty")
        self.assertEqual(str(raised.exception),
                         f"gateway.admin_token_file {base / 'empty'} is empty")


class CheckTokenTests(SynchronousTestCase):
    def test_check_token(self) -> None:
        """Without a token everything passes; with one only "Bearer <token>" (any case)."""
        self.assertTrue(check_token(None, None))
        self.assertTrue(check_token(b"Bearer x", None))
        self.assertFalse(check_token(None, b"tok"))
        self.assertFalse(check_token(b"", b"tok"))
        self.assertFalse(check_token(b"Bearer", b"tok"))
        self.assertFalse(check_token(b"Bearer to", b"tok"))
        self.assertFalse(check_token(b"Bearer tokk", b"tok"))
        self.assertFalse(check_token(b"Basic tok", b"tok"))
        self.assertTrue(check_token(b"Bearer tok", b"tok"))
        self.assertTrue(check_token(b"BEARER  tok ", b"tok"))

    def test_metrics_prime_adds_new_series(self) -> None:
        """prime() (run on a reload) gives a new connector and route their zero series."""
        base = Path(tempfile.mkdtemp(prefix="relaygw-metrics-"))
        self.addCleanup(shutil.rmtree, base, True)
        text = _CONFIG.format(admin_listen="127.0.0.1:8025", gateway="", rest="")
        config = load_text(text, "relaygw.toml", base)
        metrics = Metrics(config, queue_stats=lambda: None, now=lambda: 0.0)
        families = _families(metrics.render().decode())
        self.assertTrue(math.isnan(_value(families, "relaygw_queue_messages")))
        bigger = load_text(text.replace('name = "hub"', 'name = "hub2"'), "relaygw.toml", base)
        metrics.prime(bigger)
        families = _families(metrics.render().decode())
        self.assertEqual(_value(families, "relaygw_messages_bounced_total", route="hub2"), 0)
