"""
The Microsoft Graph route end to end (issue 9, "Graph route"): a real
gateway takes mail from a device over plain SMTP and delivers it through a
C{via = "graph"} route to a local Graph-like HTTPS endpoint
(L{tests.servers.graph_endpoint}), with access tokens from a local token
endpoint (L{tests.servers.oauth_endpoint}), both behind a throwaway CA the
route trusts.  Everything goes through the queue: a delivered message (the
exact MIME, sent from the sender's mailbox), a 429 with Retry-After
(delivered after the wait, not before), a permanent 400 (a DSN in the
sender's Maildir), Graph down and the token endpoint down (queued, listed by
C{relaygw queue list}, delivered when they are back); the tracking log and
C{/metrics} show the route like any other; no token or secret is in any
file of the gateway.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.e2e.conftest import Launch, gateway_toml, maildir_messages, smtp, spool_entries
from tests.servers.graph_endpoint import GraphEndpoint, Scripted, Sent
from tests.servers.oauth_endpoint import OAuthEndpoint
from tests.servers.ports import free_ports, wait_until
from tests.servers.recording_smtp import TestCA
from tests.servers.relaygw import BIN, RelaygwProcess
from tests.servers.smtp_clients import files_containing

pytestmark = pytest.mark.e2e

SECRET = "graph-e2e-client-secret-Zq8~x1"
TENANT = "contoso.onmicrosoft.com"
CLIENT = "11111111-2222-3333-4444-555555555555"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"


@attrs.define
class Env:
    port: int
    admin: int
    gw: RelaygwProcess
    graph: GraphEndpoint
    oauth: OAuthEndpoint

    @property
    def dir(self) -> Path:
        return self.gw.workdir


def _config(port: int, admin: int, graph: GraphEndpoint, oauth: OAuthEndpoint, ca: Path) -> str:
    return gateway_toml(admin) + f"""
[[accepted_domains]]
domain = "corp.test"
route = "local"

[[accepted_domains]]
domain = "tenant.test"
route = "m365"

[[routes]]
name = "local"
via = "maildir"
maildir = "var/mail"

[[routes]]
name = "m365"
via = "graph"
graph_endpoint = "{graph.url}"
ca_file = "{ca}"

[routes.oauth]
tenant_id = "{TENANT}"
client_id = "{CLIENT}"
client_secret_file = "m365.secret"
token_endpoint = "{oauth.url}"
ca_file = "{ca}"

[[connectors]]
name = "Devices"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit", "relay", "accept-any-sender"]
"""


@pytest.fixture(scope="module")
def env(module_launch: Launch, module_workdir: Path) -> Iterator[Env]:
    ca = TestCA(module_workdir)
    pem = ca.issue("127.0.0.1", ["127.0.0.1"])
    oauth = OAuthEndpoint(pem, tenant=TENANT, client_id=CLIENT, secret=SECRET,
                          scope=GRAPH_SCOPE).start()
    graph = GraphEndpoint(pem, valid_token=oauth.valid).start()
    try:
        port, admin = free_ports(2)
        gwdir = module_workdir / "gw"
        gwdir.mkdir()
        secret = gwdir / "m365.secret"
        secret.write_text(SECRET + "\n")
        secret.chmod(0o600)
        gw = module_launch(gwdir, _config(port, admin, graph, oauth, ca.ca_file), [port])
        yield Env(port, admin, gw, graph, oauth)
    finally:
        graph.stop()
        oauth.stop()


def _message(subject: str, to: str = "alice@tenant.test") -> bytes:
    return (
        f"From: Scanner <scanner@corp.test>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@printer.test>\r\n\r\n"
        "Scanned document attached.\r\n.leading dot line\r\n"
    ).encode()


def _send(env: Env, subject: str, rcpts: list[str], to: str = "alice@tenant.test") -> bytes:
    data = _message(subject, to)
    client, code, _ = smtp(env.port)
    assert code == 220
    client.ehlo("printer.e2e.test")
    assert client.sendmail("scanner@corp.test", rcpts, data) == {}
    client.quit()
    return data


def _delivered(env: Env, subject: str, timeout: float = 30) -> Sent:
    wait_until(lambda: bool(env.graph.messages(subject)), timeout, interval=0.1,
               what=f"Graph to accept {subject!r}")
    [sent] = env.graph.messages(subject)
    return sent


def _drained(env: Env) -> None:
    wait_until(lambda: not spool_entries(env.dir / "var" / "spool"), 30, interval=0.1,
               what="the spool to drain")


def _queue_list(env: Env) -> str:
    assert env.gw.config_path is not None
    done = subprocess.run([str(BIN / "relaygw"), "queue", "list", "-c", str(env.gw.config_path)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _track(env: Env, *args: str) -> list[dict[str, str]]:
    assert env.gw.config_path is not None
    done = subprocess.run(
        [str(BIN / "relaygw"), "track", "-c", str(env.gw.config_path), "--json", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def _metric(env: Env, name: str, route: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{env.admin}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{route="{route}"}} '):
            return float(line.split()[-1])
    return 0.0


def test_delivered_with_exact_mime(env: Env) -> None:
    """
    The message reaches Graph from the sender's mailbox with a token the
    token endpoint issued; the MIME is the received message (relaygw's
    Received header before it), plus a Bcc for the blind envelope recipient.
    """
    data = _send(env, "delivered", ["alice@tenant.test", "bob@tenant.test"])
    sent = _delivered(env, "delivered")
    assert sent.mailbox == "scanner@corp.test"
    assert env.oauth.valid(sent.token)
    assert sent.mime.startswith(b"Received: ")
    assert sent.mime.endswith(data.replace(b"\r\n\r\n", b"\r\nBcc: bob@tenant.test\r\n\r\n", 1))
    assert sent.mime.count(b"Received: ") == 1
    assert sorted(sent.recipients) == ["alice@tenant.test", "bob@tenant.test"]
    assert env.oauth.refusals == []
    _drained(env)


def test_429_waits_for_retry_after(env: Env) -> None:
    """
    A 429 with Retry-After: 4 keeps the message queued; it is sent again
    only after 4 s, though the queue's retry interval is 1 s.
    """
    env.graph.push(Scripted(429, "ApplicationThrottled", "Too many requests", retry_after="4"))
    start = time.time()
    _send(env, "throttled", ["alice@tenant.test"])
    sent = _delivered(env, "throttled", timeout=40)
    answers = [s for s in env.graph.requests_for(start)]
    assert [s.status for s in answers] == [429, 202]
    assert answers[1].at - answers[0].at >= 3.9
    rows = _track(env, "--message-id", "<throttled@printer.test>")
    defer = [r for r in rows if r["event-id"] == "DEFER"]
    assert defer and "4.4.5" in defer[0]["recipient-status"] and "ApplicationThrottled" in defer[0]["recipient-status"]
    assert sent.mailbox == "scanner@corp.test"
    _drained(env)


def _dsns(env: Env, subject: str) -> list[email.message.EmailMessage]:
    found = []
    for path in maildir_messages(env.dir / "var" / "mail", "scanner"):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        if msg.get_content_type() == "multipart/report" and f"Subject: {subject}" in str(
            msg.get_payload()[2]
        ):
            found.append(msg)
    return found


def test_permanent_400_bounces_to_sender(env: Env) -> None:
    """A 400 bounces: one DSN to the sender with Graph's error code, nothing retried."""
    env.graph.push(Scripted(400, "ErrorMimeContentInvalid", "The MIME content is invalid"))
    start = time.time()
    _send(env, "refused", ["alice@tenant.test"])
    wait_until(lambda: bool(_dsns(env, "refused")), 30, interval=0.1, what="the DSN for 'refused'")
    [dsn] = _dsns(env, "refused")
    status = dsn.get_payload()[1].get_payload()
    block = status[1]
    assert block["Final-Recipient"] == "rfc822; alice@tenant.test"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.6.0"
    assert "ErrorMimeContentInvalid" in block["Diagnostic-Code"]
    _drained(env)
    assert [s.status for s in env.graph.requests_for(start)] == [400]
    assert env.graph.messages("refused") == []


def test_graph_down_then_back(env: Env) -> None:
    """With Graph down the message waits in the queue (queue list shows it), then goes out."""
    env.graph.stop()
    try:
        _send(env, "while down", ["carol@tenant.test"], to="carol@tenant.test")
        wait_until(lambda: "carol@tenant.test" in _queue_list(env)
                   and bool([r for r in _track(env, "--message-id", "<while-down@printer.test>")
                             if r["event-id"] == "DEFER"]),
                   30, interval=0.5, what="the message deferred and listed")
        [line] = [x for x in _queue_list(env).splitlines() if "carol@tenant.test" in x]
        assert "451 4.4.1 Graph at 127.0.0.1 did not answer" in line, line
    finally:
        env.graph.start()
    sent = _delivered(env, "while down", timeout=40)
    assert sent.recipients == ("carol@tenant.test",)
    _drained(env)


def test_token_endpoint_down_then_back(env: Env) -> None:
    """
    Graph refuses the cached token (401) while the token endpoint is down: the
    message is retried (4.7.0), not bounced, and goes out with a new token
    once the endpoint is back.
    """
    issued = len(env.oauth.issued)
    env.oauth.stop()
    env.graph.push(Scripted(401, "InvalidAuthenticationToken", "Lifetime validation failed"))
    try:
        _send(env, "no token", ["dave@tenant.test"], to="dave@tenant.test")
        wait_until(lambda: any("4.7.0" in r["recipient-status"]
                               for r in _track(env, "--message-id", "<no-token@printer.test>")
                               if r["event-id"] == "DEFER"),
                   30, interval=0.5, what="a 4.7.0 deferral")
        [line] = [x for x in _queue_list(env).splitlines() if "dave@tenant.test" in x]
        assert "451 4.7.0 No access token for Graph" in line, line
    finally:
        env.oauth.start()
    sent = _delivered(env, "no token", timeout=40)
    assert len(env.oauth.issued) == issued + 1
    assert sent.token == env.oauth.issued[-1]
    _drained(env)


def test_tracking_metrics_and_no_secrets(env: Env) -> None:
    """
    The tracking log has DELIVER rows for the Graph route, /metrics counts
    it, and no token or the client secret is in any file of the gateway.
    """
    rows = _track(env, "--message-id", "<delivered@printer.test>")
    delivers = [r for r in rows if r["event-id"] == "DELIVER"]
    assert sorted(r["recipient-address"] for r in delivers) == ["alice@tenant.test", "bob@tenant.test"]
    assert _metric(env, "relaygw_messages_delivered_total", "m365") >= 5
    assert _metric(env, "relaygw_messages_deferred_total", "m365") >= 3
    assert _metric(env, "relaygw_messages_bounced_total", "m365") >= 1
    needles = [SECRET.encode()] + [t.encode() for t in env.oauth.issued]
    needles += [t.encode().split(b".")[1] for t in env.oauth.issued]
    assert files_containing([env.dir], needles, exclude=[env.dir / "m365.secret"]) == []
