"""
Tests for L{relaygw.deliver.graph} and L{relaygw.deliver._graphmime}: the
Graph sendMail request (path, headers, base64 MIME body), each HTTP status's
outcome, Retry-After and the route's throttle, the 401 refresh, the
envelope-recipient rule, and the C{via = "graph"} configuration keys.

The HTTP layer is treq's in-memory L{RequestTraversalAgent} in front of a
scripted twisted.web resource; the token source is a recording fake.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from email.utils import format_datetime
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relaygw.config import Route
from relaygw.config._load import load_text
from relaygw.deliver._graphmime import (
    MAX_RETRY_AFTER,
    RecipientMismatch,
    error_detail,
    parse_retry_after,
    submission,
)
from relaygw.deliver.graph import GraphTarget
from relaygw.errors import ConfigError
from relaygw.interfaces import IDeliveryTarget, ITokenSource, TokenUnavailable
from relaygw.spool.envelope import Envelope, Outcome, Recipient
from tests.test_scheduler import Harness, envelope as sched_envelope

T0 = 1_800_000_000.0
SECRET_TOKENS = ("eyJ0eXAi.tok-one.sig", "eyJ0eXAi.tok-two.sig", "eyJ0eXAi.tok-three.sig")

MIME = (
    b"Received: from printer (127.0.0.1) by gw.test\r\n"
    b"From: Scanner <scanner@corp.test>\r\n"
    b"To: Alice <alice@corp.test>,\r\n bob@partner.test\r\n"
    b"Subject: scan\r\n"
    b"\r\n"
    b"body line\r\n"
)


@implementer(ITokenSource)
class FakeTokens:
    """Hands out L{SECRET_TOKENS} in turn; records invalidations; can fail."""

    def __init__(self) -> None:
        self.current = 0
        self.invalidated: list[str] = []
        self.error: Exception | None = None

    def token(self) -> Deferred[str]:
        if self.error is not None:
            return fail(self.error)
        return succeed(SECRET_TOKENS[self.current])

    def invalidate(self, token: str) -> None:
        self.invalidated.append(token)
        if token == SECRET_TOKENS[self.current]:
            self.current += 1


class FakeGraph(Resource):
    """
    Records each request (path, headers, body) and answers with the next
    scripted (code, headers, body); 202 when the script is empty.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.script: list[tuple[int, dict[str, str], bytes]] = []
        self.seen: list[tuple[str, dict[str, str], bytes]] = []

    def render_POST(self, request: Request) -> bytes:
        headers = {
            k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        assert request.content is not None
        self.seen.append((request.uri.decode(), headers, request.content.read()))
        code, extra, body = self.script.pop(0) if self.script else (202, {}, b"")
        request.setResponseCode(code)
        for name, value in extra.items():
            request.setHeader(name, value)
        return body


def graph_error(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def make_envelope(*rcpts: str, sender: str = "scanner@corp.test") -> Envelope:
    return Envelope(
        id="Q1",
        sender=sender,
        recipients=tuple(Recipient(r) for r in rcpts),
        connector="Devices",
        client_ip="127.0.0.1",
        received_at=T0,
        size=len(MIME),
        message_id="<m@x>",
    )


def opener(data: bytes) -> Callable[[], io.BytesIO]:
    return lambda: io.BytesIO(data)


def route(**kw: Any) -> Route:
    settings: dict[str, Any] = dict(name="m365", via="graph", mailbox="relay@corp.test")
    settings.update(kw)
    return Route(**settings)


class GraphTargetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.graph = FakeGraph()
        self.tokens = FakeTokens()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def target(self, agent: Any = None, **kw: Any) -> GraphTarget:
        return GraphTarget(
            route(**kw.pop("route", {})),
            reactor=self.clock,  # type: ignore[arg-type]
            tokens=self.tokens,
            agent=RequestTraversalAgent(self.graph) if agent is None else agent,
            clock=self.clock,
            **kw,
        )

    def deliver(
        self, target: GraphTarget, rcpts: tuple[str, ...] = ("alice@corp.test", "bob@partner.test"),
        data: bytes = MIME, sender: str = "scanner@corp.test",
    ) -> dict[str, Outcome]:
        d = target.deliver(make_envelope(*rcpts, sender=sender), list(rcpts), opener(data))
        result: dict[str, Outcome] = self.successResultOf(d)
        self.assertEqual(sorted(result), sorted(rcpts))
        return result

    def one(self, result: dict[str, Outcome]) -> Outcome:
        [outcome] = set(result.values())
        return outcome

    def tearDown(self) -> None:
        # No token in any log event (the fake tokens are recognisable strings).
        for event in self.events:
            text = repr(event)
            for token in SECRET_TOKENS:
                self.assertNotIn(token, text)

    def test_provides_interface(self) -> None:
        """GraphTarget provides IDeliveryTarget."""
        self.assertTrue(verifyObject(IDeliveryTarget, self.target()))

    def test_delivered_request_is_graph_mime_send(self) -> None:
        """
        A 202 delivers every recipient; the request is POST /v1.0/users/{mailbox}/sendMail
        with a bearer token, Content-Type text/plain and the base64 of the MIME message.
        """
        outcome = self.one(self.deliver(self.target()))
        self.assertEqual(outcome.kind, "delivered")
        self.assertEqual(outcome.reply, "250 2.0.0 Graph accepted the message (HTTP 202)")
        self.assertEqual(outcome.remote_host, "graph.microsoft.com")
        [(path, headers, body)] = self.graph.seen
        self.assertEqual(path, "/v1.0/users/relay@corp.test/sendMail")
        self.assertEqual(headers["authorization"], "Bearer " + SECRET_TOKENS[0])
        self.assertEqual(headers["content-type"], "text/plain")
        self.assertEqual(base64.b64decode(body, validate=True), MIME)

    def test_sender_mode_uses_envelope_sender(self) -> None:
        """Without a configured mailbox, the message is sent from the envelope sender's mailbox."""
        self.deliver(self.target(route={"mailbox": None}), sender="Scanner+3@corp.test")
        self.assertEqual(self.graph.seen[0][0], "/v1.0/users/Scanner+3@corp.test/sendMail")

    def test_sender_mode_null_sender_bounces(self) -> None:
        """Sender mode has no mailbox for <>: 5.1.7, nothing sent."""
        outcome = self.one(self.deliver(self.target(route={"mailbox": None}), sender=""))
        self.assertEqual(outcome.kind, "bounce")
        self.assertTrue(outcome.reply.startswith("550 5.1.7 "), outcome.reply)
        self.assertEqual(self.graph.seen, [])

    def test_endpoint_from_route(self) -> None:
        """The request goes to the route's graph_endpoint; remote_host is its host."""
        agent = RecordingAgent()
        target = self.target(agent=agent, route={"graph_endpoint": "https://graph.example.us:8443"})
        self.deliver(target)
        self.assertEqual(agent.urls, [b"https://graph.example.us:8443/v1.0/users/relay@corp.test/sendMail"])

    def test_blind_recipient_added_as_bcc(self) -> None:
        """An envelope recipient not in To/Cc is submitted as Bcc; the rest is byte-exact."""
        rcpts = ("alice@corp.test", "bob@partner.test", "carol@corp.test")
        self.one(self.deliver(self.target(), rcpts))
        sent = base64.b64decode(self.graph.seen[0][2])
        self.assertEqual(sent, MIME.replace(b"Subject: scan\r\n", b"Subject: scan\r\nBcc: carol@corp.test\r\n"))

    def test_header_recipient_not_in_envelope_bounces(self) -> None:
        """
        A To address that is not an envelope recipient of the attempt would be
        sent to by Graph past the relay rules: 5.7.1 naming it, nothing sent.
        """
        outcome = self.one(self.deliver(self.target(), ("alice@corp.test",)))
        self.assertEqual(outcome.kind, "bounce")
        self.assertTrue(outcome.reply.startswith("550 5.7.1 "), outcome.reply)
        self.assertIn("bob@partner.test", outcome.reply)
        self.assertEqual(self.graph.seen, [])

    def test_401_refreshes_token_once(self) -> None:
        """A 401 invalidates the token and retries once with a new one."""
        self.graph.script = [(401, {}, graph_error("InvalidAuthenticationToken", "expired"))]
        outcome = self.one(self.deliver(self.target()))
        self.assertEqual(outcome.kind, "delivered")
        self.assertEqual(self.tokens.invalidated, [SECRET_TOKENS[0]])
        self.assertEqual(
            [h["authorization"] for _, h, _ in self.graph.seen],
            ["Bearer " + SECRET_TOKENS[0], "Bearer " + SECRET_TOKENS[1]],
        )

    def test_401_twice_is_temporary(self) -> None:
        """A second 401 is retried later (4.7.0), after two requests only."""
        self.graph.script = [(401, {}, b""), (401, {}, b"")]
        outcome = self.one(self.deliver(self.target()))
        self.assertEqual(outcome.kind, "retry")
        self.assertTrue(outcome.reply.startswith("451 4.7.0 "), outcome.reply)
        self.assertEqual(len(self.graph.seen), 2)
        self.assertEqual(self.tokens.invalidated, list(SECRET_TOKENS[:2]))

    def test_429_retry_after_seconds_throttles_route(self) -> None:
        """
        A 429 is retried not before its Retry-After, and no message of the
        route is sent before then (attempts in between send nothing).
        """
        self.graph.script = [(429, {"Retry-After": "30"}, graph_error("ApplicationThrottled", "slow down"))]
        target = self.target()
        outcome = self.one(self.deliver(target))
        self.assertEqual(outcome.kind, "retry")
        self.assertTrue(outcome.reply.startswith("451 4.4.5 "), outcome.reply)
        self.assertIn("ApplicationThrottled", outcome.reply)
        self.assertEqual(outcome.retry_at, T0 + 30)
        self.clock.advance(29)
        held = self.one(self.deliver(target))
        self.assertEqual((held.kind, held.retry_at), ("retry", T0 + 30))
        self.assertEqual(len(self.graph.seen), 1)
        self.clock.advance(1)
        self.assertEqual(self.one(self.deliver(target)).kind, "delivered")
        self.assertEqual(len(self.graph.seen), 2)

    def test_429_retry_after_http_date(self) -> None:
        """Retry-After as an HTTP-date is honoured too."""
        when = format_datetime(datetime.fromtimestamp(T0 + 120, timezone.utc), usegmt=True)
        self.graph.script = [(429, {"Retry-After": when}, b"")]
        self.assertEqual(self.one(self.deliver(self.target())).retry_at, T0 + 120)

    def test_429_without_retry_after_waits_default(self) -> None:
        """A 429 without Retry-After still holds the route back a minute."""
        self.graph.script = [(429, {}, b"")]
        self.assertEqual(self.one(self.deliver(self.target())).retry_at, T0 + 60)

    def test_5xx_is_temporary(self) -> None:
        """500 is retried on the schedule, the reply naming Graph and the status."""
        self.graph.script = [(500, {}, graph_error("InternalServerError", "oops"))]
        outcome = self.one(self.deliver(self.target()))
        self.assertEqual(
            (outcome.kind, outcome.reply, outcome.retry_at),
            ("retry", "451 4.4.0 Graph answered HTTP 500 InternalServerError: oops", 0.0),
        )

    def test_503_retry_after_honoured(self) -> None:
        """A 503 with Retry-After holds the route back like a 429."""
        self.graph.script = [(503, {"Retry-After": "10"}, b"")]
        target = self.target()
        outcome = self.one(self.deliver(target))
        self.assertEqual((outcome.kind, outcome.retry_at, target.not_before), ("retry", T0 + 10, T0 + 10))

    def test_permanent_statuses_bounce_with_graph_error(self) -> None:
        """400, 403, 404, 413 and other 4xx bounce with Graph's error code and message."""
        cases = {
            400: "554 5.6.0 Graph refused the message (HTTP 400 ErrorMimeContentInvalid: bad)",
            403: "550 5.7.1 Graph refused to send as relay@corp.test (HTTP 403 ErrorAccessDenied: bad)",
            404: "550 5.1.8 Graph found no mailbox relay@corp.test (HTTP 404 ErrorInvalidUser: bad)",
            413: "552 5.3.4 Graph refused the message as too large (HTTP 413 ErrorMessageSizeExceeded: bad)",
            409: "550 5.0.0 Graph refused the message (HTTP 409 Conflict: bad)",
        }
        codes = {400: "ErrorMimeContentInvalid", 403: "ErrorAccessDenied", 404: "ErrorInvalidUser",
                 413: "ErrorMessageSizeExceeded", 409: "Conflict"}
        for status, reply in cases.items():
            self.graph.script = [(status, {"Content-Type": "application/json"}, graph_error(codes[status], "bad"))]
            outcome = self.one(self.deliver(self.target()))
            self.assertEqual((outcome.kind, outcome.reply), ("bounce", reply))

    def test_long_graph_error_is_cut(self) -> None:
        """Graph's error text is cut short in the reply."""
        self.graph.script = [(400, {}, graph_error("ErrorX", "y" * 5000))]
        outcome = self.one(self.deliver(self.target()))
        self.assertLess(len(outcome.reply), 300)
        self.assertTrue(outcome.reply.endswith("...)"))

    def test_token_unavailable_is_temporary(self) -> None:
        """No access token: retried (4.7.0) with the source's reason, nothing sent."""
        self.tokens.error = TokenUnavailable("token endpoint login.test answered HTTP 503")
        outcome = self.one(self.deliver(self.target()))
        self.assertEqual(outcome.kind, "retry")
        self.assertEqual(
            outcome.reply, "451 4.7.0 No access token for Graph: token endpoint login.test answered HTTP 503"
        )
        self.assertEqual(self.graph.seen, [])

    def test_unusable_token_is_temporary_and_not_logged(self) -> None:
        """A token that cannot go in a header is retried, sent nowhere and logged nowhere."""
        tokens = FakeTokens()
        tokens.token = lambda: succeed("tok\u00e9n-" + SECRET_TOKENS[2])  # type: ignore[method-assign]
        target = GraphTarget(route(), reactor=self.clock, tokens=tokens,  # type: ignore[arg-type]
                             agent=RequestTraversalAgent(self.graph), clock=self.clock)
        outcome = self.one(self.deliver(target))
        self.assertEqual(outcome.reply, "451 4.7.0 No usable access token for Graph; see the log")
        self.assertEqual(self.graph.seen, [])

    def test_too_large_bounces_5_3_4(self) -> None:
        """A message whose base64 exceeds the request limit bounces 5.3.4, nothing sent."""
        outcome = self.one(self.deliver(self.target(max_request=100)))
        self.assertEqual(outcome.kind, "bounce")
        self.assertTrue(outcome.reply.startswith("552 5.3.4 The message is too large for Microsoft Graph"))
        self.assertEqual(self.graph.seen, [])

    def test_connection_refused_is_temporary(self) -> None:
        """A network error is retried, the reply naming Graph."""
        agent = RecordingAgent(fail(ConnectionRefusedError()))
        outcome = self.one(self.deliver(self.target(agent=agent)))
        self.assertEqual(outcome.kind, "retry")
        self.assertTrue(outcome.reply.startswith("451 4.4.1 Graph at graph.microsoft.com did not answer"),
                        outcome.reply)

    def test_timeout_is_temporary(self) -> None:
        """A request that does not finish within the timeout is cancelled and retried."""
        agent = RecordingAgent(Deferred())
        d = self.target(agent=agent, timeout=5).deliver(make_envelope("alice@corp.test", "bob@partner.test"),
                                                        ["alice@corp.test", "bob@partner.test"], opener(MIME))
        self.assertNoResult(d)
        self.clock.advance(5)
        outcome = self.one(self.successResultOf(d))
        self.assertEqual(outcome.kind, "retry")
        self.assertIn("timed out", outcome.reply)

    def test_unreadable_data_is_temporary(self) -> None:
        """The spool data cannot be read: retried, nothing sent."""
        def broken() -> io.BytesIO:
            raise OSError("gone")
        d = self.target().deliver(make_envelope("alice@corp.test"), ["alice@corp.test"], broken)
        self.assertEqual(self.one(self.successResultOf(d)).kind, "retry")
        self.assertEqual(self.graph.seen, [])
        self.flushLoggedErrors(OSError)

    def test_unreadable_ca_file_is_temporary(self) -> None:
        """A route whose ca_file cannot be read sends nothing and retries."""
        target = GraphTarget(route(ca_file=Path("/nonexistent/ca.pem")), reactor=self.clock,  # type: ignore[arg-type]
                             tokens=self.tokens, clock=self.clock)
        outcome = self.one(self.deliver(target))
        self.assertTrue(outcome.reply.startswith("451 4.3.5 "), outcome.reply)


class RecordingAgent:
    """An IAgent that records URLs and answers with a given Deferred (default: a 202)."""

    def __init__(self, answer: Deferred[Any] | None = None) -> None:
        self.urls: list[bytes] = []
        self._answer = answer

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        self.urls.append(uri)
        if self._answer is not None:
            return self._answer
        return RequestTraversalAgent(FakeGraph()).request(method, uri, headers, bodyProducer)


# --- the pure parts ------------------------------------------------------


def test_submission_replaces_existing_bcc() -> None:
    """An original (folded) Bcc header is replaced by the blind recipients of the attempt."""
    data = b"To: a@x.test\r\nBcc: b@x.test,\r\n c@x.test\r\nSubject: s\r\n\r\nBcc: not a header\r\n"
    assert submission(data, ["a@x.test", "b@x.test"]) == (
        b"To: a@x.test\r\nSubject: s\r\nBcc: b@x.test\r\n\r\nBcc: not a header\r\n"
    )


def test_submission_unchanged_when_headers_match() -> None:
    """Headers naming exactly the recipients (any case, display names) leave the message as is."""
    data = b'To: "A" <A@X.test>\r\nCc: b@x.test\r\n\r\nx\r\n'
    assert submission(data, ["a@x.test", "B@x.test"]) == data


def test_submission_folds_many_blind_recipients() -> None:
    """Several blind recipients go in one folded Bcc header."""
    out = submission(b"Subject: s\r\n\r\nx\r\n", ["a@x.test", "b@x.test"])
    assert out == b"Subject: s\r\nBcc: a@x.test,\r\n b@x.test\r\n\r\nx\r\n"


def test_submission_refuses_extra_header_recipients() -> None:
    """A To or Cc address beyond the recipients raises RecipientMismatch naming it."""
    with pytest.raises(RecipientMismatch) as info:
        submission(b"To: a@x.test\r\nCc: Z@y.test\r\n\r\n", ["a@x.test"])
    assert info.value.extra == ("z@y.test",)


def test_submission_undisclosed_recipients_group() -> None:
    """An empty group (undisclosed-recipients:;) names nobody."""
    out = submission(b"To: undisclosed-recipients:;\r\n\r\nx\r\n", ["a@x.test"])
    assert out == b"To: undisclosed-recipients:;\r\nBcc: a@x.test\r\n\r\nx\r\n"


def test_parse_retry_after() -> None:
    """Retry-After: delay-seconds or HTTP-date, clamped to [0, MAX_RETRY_AFTER]; junk is None."""
    assert parse_retry_after("120", T0) == 120.0
    assert parse_retry_after(" 0 ", T0) == 0.0
    assert parse_retry_after("99999999", T0) == MAX_RETRY_AFTER
    date = format_datetime(datetime.fromtimestamp(T0 + 45, timezone.utc), usegmt=True)
    assert parse_retry_after(date, T0) == 45.0
    assert parse_retry_after(date, T0 + 100) == 0.0
    assert parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", T0) == 0.0
    assert parse_retry_after("soon", T0) is None
    assert parse_retry_after("-5", T0) is None
    assert parse_retry_after(None, T0) is None


def test_error_detail() -> None:
    """Graph's JSON error gives code and message; other bodies only the status."""
    assert error_detail(400, graph_error("E", "line1\nline2")) == "HTTP 400 E: line1 line2"
    assert error_detail(502, b"<html>bad gateway</html>") == "HTTP 502"
    assert error_detail(400, b'{"error": "text"}') == "HTTP 400"


# --- the schedule honours Retry-After -------------------------------------


class RetryAtScheduleTests(Harness):
    def test_retry_at_is_a_floor_under_the_schedule(self) -> None:
        """An outcome's retry_at delays the next attempt beyond the retry interval."""
        T = self.clock.seconds()
        throttled = Outcome("retry", "451 4.4.5 throttled", "h", retry_at=T + 600)
        self.local.script = {"a@local.test": [throttled]}
        s = self.scheduler()
        self.submit(s, sched_envelope("A", "a@local.test"))
        self.clock.advance(0)
        [updated] = self.spool.updates
        self.assertEqual(updated.next_attempt, T + 600)
        self.clock.advance(599)
        self.assertEqual(len(self.local.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.local.calls), 2)

    def test_retry_at_never_past_expiry(self) -> None:
        """
        A Retry-After beyond the message's expiry is cut: the delay warning
        (4 h) still comes first, then the expiry (2 d), never later.
        """
        T = self.clock.seconds()
        throttled = Outcome("retry", "451 4.4.5 throttled", "h", retry_at=T + 10 * 86400)
        self.local.script = {"a@local.test": [throttled, throttled]}
        s = self.scheduler()
        self.submit(s, sched_envelope("A", "a@local.test", received_at=T))
        self.clock.advance(0)
        self.assertEqual(self.spool.updates[0].next_attempt, T + 4 * 3600)
        self.clock.advance(4 * 3600)
        self.assertEqual(self.spool.updates[-1].next_attempt, T + 2 * 86400)


# --- configuration ------------------------------------------------------------

_BASE = """
[[connectors]]
name = "C"
bindings = ["127.0.0.1:2525"]

[[routes]]
name = "m365"
via = "graph"
"""
_OAUTH = """
[routes.oauth]
tenant_id = "contoso.onmicrosoft.com"
client_id = "11111111-2222-3333-4444-555555555555"
client_secret_file = "m365.secret"
"""


def _load(extra: str = "", oauth: str = _OAUTH) -> Route:
    config = load_text(_BASE + extra + oauth, "relaygw.toml", Path("/srv/relaygw"))
    return config.route("m365")


def _error(extra: str = "", oauth: str = _OAUTH, base: str = _BASE) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(base + extra + oauth, "relaygw.toml", Path("/srv/relaygw"))
    return str(info.value)


def test_config_graph_defaults() -> None:
    """A graph route: Graph's global endpoint, sender mode, the Graph scope."""
    r = _load()
    assert (r.via, r.graph_endpoint, r.mailbox) == ("graph", "https://graph.microsoft.com", None)
    assert r.oauth is not None and r.oauth.scope == "https://graph.microsoft.com/.default"


def test_config_graph_keys() -> None:
    """graph_endpoint (trailing / dropped), mailbox (domain lower-cased), ca_file without tls."""
    r = _load('graph_endpoint = "https://127.0.0.1:8443/"\nmailbox = "Relay@Corp.Test"\nca_file = "ca.pem"\n')
    assert (r.graph_endpoint, r.mailbox, r.ca_file) == (
        "https://127.0.0.1:8443", "Relay@corp.test", Path("/srv/relaygw/ca.pem"))


def test_config_graph_needs_oauth() -> None:
    """Without [routes.oauth], an error at routes[0].oauth."""
    assert _error(oauth="") == 'relaygw.toml: routes[0].oauth: via = "graph" needs the [routes.oauth] table'


@pytest.mark.parametrize(
    "extra, message",
    [
        ('graph_endpoint = "http://graph.microsoft.com"\n',
         "routes[0].graph_endpoint: 'http://graph.microsoft.com' is not an https:// URL"),
        ('graph_endpoint = "https://graph.microsoft.com/?x=1"\n', "routes[0].graph_endpoint: "),
        ('mailbox = "relay"\n', "routes[0].mailbox: 'relay' is not a mailbox address"),
        ('mailbox = "a b@corp.test"\n', "routes[0].mailbox: 'a b@corp.test' is not a mailbox address"),
        ('tls = "verify"\n', 'routes[0].tls: is not used with via = "graph"'),
    ],
)
def test_config_graph_bad_values(extra: str, message: str) -> None:
    """Bad graph keys are errors in SPEC section 2 form."""
    assert _error(extra).startswith("relaygw.toml: " + message)


def test_config_graph_keys_only_with_graph() -> None:
    """mailbox on another route kind is an error."""
    base = _BASE.replace('via = "graph"', 'via = "mx"')
    assert _error('mailbox = "relay@corp.test"\n', oauth="", base=base) == (
        'relaygw.toml: routes[0].mailbox: is only used with via = "graph" (this route has via = "mx")'
    )


def test_build_target_wires_graph_with_token_source(tmp_path: Path) -> None:
    """build_target gives a graph route a GraphTarget with the route's OAuth token source."""
    from relaygw.config import OAuth
    from relaygw.deliver.oauth import ClientCredentials
    from relaygw.deliver.targets import build_target

    secret = tmp_path / "secret"
    secret.write_text("s\n")
    oauth = OAuth("contoso.onmicrosoft.com", "client", "https://login.test/token",
                  "https://graph.microsoft.com/.default", client_secret_file=secret)
    clock = Clock()
    target = build_target(route(oauth=oauth), reactor=clock, resolver=None, helo="gw.test")  # type: ignore[arg-type]
    assert isinstance(target, GraphTarget)
    assert isinstance(target._tokens, ClientCredentials)
    with pytest.raises(ValueError):
        build_target(route(), reactor=clock, resolver=None, helo="gw.test")  # type: ignore[arg-type]
