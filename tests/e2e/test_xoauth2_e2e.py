"""
XOAUTH2 towards a Microsoft 365-like smarthost, end to end (issue 9): the
real gateway process, a local HTTPS token endpoint (client credentials
grant, secret from a file, checked as Microsoft documents it) and a local
submission server that offers STARTTLS, then only AUTH XOAUTH2, and checks
the SASL string and the bearer token.

Token expiry (a second message after a short-lived token fetches a second
token), a refused token (535: a fresh token, delivered in the same
attempt), and the token endpoint down (the message waits in the queue,
shown by `relaygw queue list`, and goes out once the endpoint is back).
No token and no secret lands in any file of the gateway's directory.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.e2e.conftest import Launch, gateway_toml, smtp, spool_entries
from tests.servers.oauth_endpoint import OAuthEndpoint
from tests.servers.ports import free_port, free_ports, wait_until
from tests.servers.recording_smtp import TestCA
from tests.servers.relaygw import BIN, RelaygwProcess
from tests.servers.smtp_clients import files_containing
from tests.servers.xoauth2_smtp import XOAuth2SMTP

pytestmark = pytest.mark.e2e

CLIENT = "0d5c4e1a-6f2b-4c7e-9a3d-2b1f8e7c6a59"
SECRET = "Qx8~e2e.Secret-Value_0123456789abcdefXYZ"
MAILBOX = "scanner@contoso.test"


@attrs.define
class Rig:
    endpoint: OAuthEndpoint
    server: XOAuth2SMTP
    gw: RelaygwProcess
    port: int

    def send(self, subject: str) -> str:
        """Send one message to the gateway; its queue id."""
        client, code, _ = smtp(self.port)
        assert code == 220
        client.ehlo("printer.e2e.test")
        assert client.mail("printer@e2e.test")[0] == 250
        assert client.rcpt("alice@contoso.test")[0] == 250
        code, reply = client.data(f"Subject: {subject}\r\n\r\nscan attached\r\n".encode())
        client.quit()
        assert code == 250, reply
        found = re.search(rb"InternalId=([^,\]]+)", reply)
        assert found, reply
        return found.group(1).decode()

    def arrived(self, subject: str) -> bool:
        return any(f"Subject: {subject}".encode() in m.data for m in self.server.delivered())

    def queue_list(self) -> str:
        assert self.gw.config_path is not None
        result = subprocess.run(
            [str(BIN / "relaygw"), "queue", "list", "-c", str(self.gw.config_path)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout


def _config(port: int, admin: int, smtp_port: int, endpoint: str, secrets: Path) -> str:
    return gateway_toml(admin) + f"""
[[accepted_domains]]
domain = "contoso.test"
route = "m365"

[[routes]]
name = "m365"
via = "smarthost"
smarthosts = ["127.0.0.1:{smtp_port}"]
tls = "verify"
ca_file = "{secrets / 'ca.pem'}"
auth = "xoauth2"
auth_user = "{MAILBOX}"
protocol_logging = "verbose"

[routes.oauth]
tenant_id = "contoso.onmicrosoft.com"
client_id = "{CLIENT}"
client_secret_file = "{secrets / 'm365.secret'}"
token_endpoint = "{endpoint}"
ca_file = "{secrets / 'ca.pem'}"
timeout = "5s"

[[connectors]]
name = "Printers"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
"""


@pytest.fixture
def rig(launch: Launch, workdir: Path) -> Iterator[Rig]:
    """The token endpoint (started), the submission server and the gateway."""
    secrets = workdir / "secrets"  # outside the gateway's directory
    secrets.mkdir()
    ca = TestCA(secrets)
    (secrets / "m365.secret").write_text(SECRET + "\n")
    endpoint = OAuthEndpoint(
        ca.issue("login.test", ["127.0.0.1"]), client_id=CLIENT, secret=SECRET, port=free_port()
    ).start()
    server = XOAuth2SMTP(ca.issue("smtp.test", ["127.0.0.1"]), MAILBOX, endpoint.valid).start()
    port, admin = free_ports(2)
    gw = launch(workdir / "gw", _config(port, admin, server.port, endpoint.url, secrets), [port])
    yield Rig(endpoint, server, gw, port)
    server.stop()
    endpoint.stop()


def _no_secrets(rig: Rig) -> None:
    needles = [SECRET.encode(), *(t.encode() for t in rig.endpoint.issued)]
    assert files_containing([rig.gw.workdir], needles) == []


def test_delivered_with_token_and_expiry(rig: Rig) -> None:
    """
    A message goes out over verified STARTTLS with AUTH XOAUTH2 as the
    mailbox, with a token of the endpoint; once that token is near expiry,
    the next message fetches a new one.  The SmtpSend log shows
    C{AUTH XOAUTH2 ****}; no secret or token is in any file.
    """
    rig.endpoint.expires_in = 3
    rig.send("first scan")
    wait_until(lambda: rig.arrived("first scan"), 30, interval=0.1, what="the first message")
    [attempt] = rig.server.attempts()
    assert (attempt.user, attempt.code, attempt.tls) == (MAILBOX, 235, True)
    assert attempt.token == rig.endpoint.issued[0]
    assert rig.endpoint.requests == 1
    assert rig.endpoint.refusals == []
    time.sleep(3.2)
    rig.send("second scan")
    wait_until(lambda: rig.arrived("second scan"), 30, interval=0.1, what="the second message")
    assert rig.endpoint.requests == 2
    assert all(rig.endpoint.valid(a.token) for a in rig.server.attempts())
    wait_until(lambda: not spool_entries(rig.gw.workdir / "var" / "spool"), 30, interval=0.1,
               what="the spool to drain")
    logs = list((rig.gw.workdir / "var" / "log" / "ProtocolLog" / "SmtpSend").glob("*.LOG"))
    text = "".join(p.read_text() for p in logs)
    assert "AUTH XOAUTH2 ****" in text
    _no_secrets(rig)


def test_refused_token_refreshed(rig: Rig) -> None:
    """The server refuses the first token (535): a new one is fetched and the message delivered."""
    rig.server.refuse_next = 1
    rig.send("refresh")
    wait_until(lambda: rig.arrived("refresh"), 30, interval=0.1, what="the message")
    first, second = rig.server.attempts()
    assert (first.code, second.code) == (535, 235)
    assert (first.token, second.token) == tuple(rig.endpoint.issued)
    assert rig.endpoint.requests == 2
    _no_secrets(rig)


def test_refused_with_challenge_refreshed(rig: Rig) -> None:
    """A 334 error challenge, the client's empty line, 535: refreshed the same way."""
    rig.server.refuse_next = 1
    rig.server.challenge = True
    rig.send("challenge")
    wait_until(lambda: rig.arrived("challenge"), 30, interval=0.1, what="the message")
    assert [a.code for a in rig.server.attempts()] == [535, 235]
    assert rig.endpoint.requests == 2


def test_endpoint_down_message_waits(rig: Rig) -> None:
    """
    With the token endpoint down the message stays queued (queue list shows
    it, with the reason) and is delivered once the endpoint is back.
    """
    rig.endpoint.stop()
    queue_id = rig.send("while down")
    wait_until(lambda: "token endpoint" in rig.queue_list(), 30, interval=0.2,
               what="a failed attempt in the queue")
    listing = rig.queue_list()
    assert queue_id in listing
    assert rig.server.attempts() == []
    rig.endpoint.start()
    wait_until(lambda: rig.arrived("while down"), 30, interval=0.1, what="the message")
    wait_until(lambda: queue_id not in rig.queue_list(), 30, interval=0.2,
               what="the queue to drain")
    _no_secrets(rig)
