"""
The admin HTTP endpoint end to end (SPEC section 7; issue 8 item 3): a real
gateway takes messages from swaks (anonymous, an authenticated login from
its users file, a failed login), delivers to its Maildir and to a scripted
smarthost that defers one recipient; then one scrape of C{/metrics}, read
with prometheus_client's parser, holds the receiving process's counters
(connections, received, AUTH results) and the delivery process's
(delivered, deferred) together.  C{/queue} shows the deferred message,
C{/health} turns 503 while the spool is read-only and back; the bearer
token is checked on a gateway that has one.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Launch, gateway_toml, maildir_messages
from tests.e2e.test_haproxy_e2e import _ReadOnly
from tests.servers.ports import free_ports, wait_until
from tests.servers.relaygw import BIN, RelaygwProcess
from tests.servers.scripted_smtp import ScriptedSMTP
from tests.servers.smtp_clients import swaks

pytestmark = pytest.mark.e2e

USER, PASSWORD = "scanner9", "Adm1n-E2e-Pass!"
CONNECTOR = "Devices"


def _rule(address: str) -> str | None:
    return "451 4.2.0 mailbox busy, try later" if address.startswith("slow") else None


def _config(port: int, admin: int, relay: int, extra: str = "") -> str:
    # One attempt only within the test: the deferred count stays 1.
    toml = gateway_toml(admin).replace('retry = ["1s", "2s"]', 'retry = ["1h"]')
    toml = toml.replace("[gateway]\n", f"[gateway]\n{extra}")
    return toml + f"""
[users]
file = "users"

[[accepted_domains]]
domain = "example.test"
route = "local"

[[accepted_domains]]
domain = "remote.test"
route = "hub"

[[routes]]
name = "local"
via = "maildir"
maildir = "var/mail"

[[routes]]
name = "hub"
via = "smarthost"
smarthosts = ["127.0.0.1:{relay}"]
tls = "off"

[[connectors]]
name = "{CONNECTOR}"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
allow_plaintext_auth = true
permissions.anonymous = ["submit", "relay", "accept-any-sender"]
permissions.authenticated = ["submit", "relay"]
"""


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as answer:  # fmt: skip
            return int(answer.status), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _metrics(admin: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape: every sample by (name, sorted labels)."""
    status, body = _get(f"http://127.0.0.1:{admin}/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def _add_user(gw: RelaygwProcess) -> None:
    added = subprocess.run(
        [str(BIN / "relaygw"), "user", "add", "-c", str(gw.config_path), USER,
         "--address", f"{USER}@example.test"],
        input=PASSWORD + "\n", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr


@pytest.fixture
def relay() -> Iterator[ScriptedSMTP]:
    server = ScriptedSMTP(_rule).start()
    yield server
    server.stop()


def test_one_scrape_counts_both_processes(
    launch: Launch, workdir: Path, relay: ScriptedSMTP
) -> None:
    """
    After two local deliveries, one authenticated relay, one deferral and a
    failed AUTH, a single /metrics scrape has the received, connection and
    AUTH counters of the receiving process and the delivered and deferred
    counters of the delivery process, with the right values; /queue shows the
    deferred recipient with its attempts and last reply.
    """
    port, admin = free_ports(2)
    gw = launch(workdir / "gw", _config(port, admin, relay.port), [port])
    _add_user(gw)

    def send(*args: str) -> subprocess.CompletedProcess[str]:
        return swaks(port, "--ehlo", "printer.e2e.test", *args, timeout=60)

    for n in (1, 2):
        done = send("--from", "device@devices.test", "--to", "bob@example.test",
                    "--header", f"Subject: local {n}")
        assert done.returncode == 0, done.stdout
    done = send("--from", f"{USER}@example.test", "--to", "carol@remote.test",
                "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD)
    assert done.returncode == 0 and "235 " in done.stdout, done.stdout
    done = send("--from", "device@devices.test", "--to", "slow@remote.test",
                "--header", "Subject: deferred")
    assert done.returncode == 0, done.stdout
    done = send("--from", f"{USER}@example.test", "--to", "carol@remote.test",
                "--auth", "LOGIN", "--auth-user", USER, "--auth-password", "wrong-guess")
    assert done.returncode != 0 and "535 " in done.stdout, done.stdout

    wait_until(lambda: len(maildir_messages(gw.workdir / "var" / "mail", "bob")) == 2,
               30, 0.1, "the two local deliveries")
    wait_until(lambda: any(t.accepted == ["carol@remote.test"] for t in relay.transactions()),
               30, 0.1, "the relayed message")
    c = (("connector", CONNECTOR),)
    expected = {
        ("relaygw_messages_received_total", c): 4.0,
        # five swaks sessions and the launcher's probe that the port listens
        ("relaygw_connections_total", c): 6.0,
        ("relaygw_auth_attempts_total", (("connector", CONNECTOR), ("result", "success"))): 1.0,
        ("relaygw_auth_attempts_total", (("connector", CONNECTOR), ("result", "failure"))): 1.0,
        ("relaygw_auth_attempts_total", (("connector", CONNECTOR), ("result", "tempfail"))): 0.0,
        ("relaygw_auth_attempts_total", (("connector", CONNECTOR), ("result", "throttled"))): 0.0,
        ("relaygw_messages_delivered_total", (("route", "local"),)): 2.0,
        ("relaygw_messages_delivered_total", (("route", "hub"),)): 1.0,
        ("relaygw_messages_deferred_total", (("route", "hub"),)): 1.0,
        ("relaygw_messages_deferred_total", (("route", "local"),)): 0.0,
        ("relaygw_messages_bounced_total", (("route", "hub"),)): 0.0,
        ("relaygw_queue_messages", ()): 1.0,
        ("relaygw_directory_request_seconds_count", ()): 0.0,
    }
    scraped: dict[Any, float] = {}

    def settled() -> bool:
        # The deferral and the queue count (cached for 5 s) come a little later.
        scraped.clear()
        scraped.update(_metrics(admin))
        return all(scraped.get(key) == value for key, value in expected.items())

    try:
        wait_until(settled, 30, 0.5, "the counters of both processes")
    except TimeoutError:
        raise AssertionError(
            {str(k): (scraped.get(k), v) for k, v in expected.items() if scraped.get(k) != v}
        ) from None
    assert 0 <= scraped[("relaygw_queue_oldest_age_seconds", ())] < 120

    status, body = _get(f"http://127.0.0.1:{admin}/queue")
    assert status == 200
    [entry] = json.loads(body)
    assert set(entry) == {"id", "sender", "size", "received_at", "recipients"}
    assert entry["sender"] == "device@devices.test"
    assert entry["size"] > 0
    assert entry["received_at"].endswith("Z")
    [rcpt] = entry["recipients"]
    assert rcpt["address"] == "slow@remote.test"
    assert rcpt["state"] == "queued"
    assert rcpt["attempts"] == 1
    assert rcpt["last_reply"].startswith("451 4.2.0 mailbox busy"), rcpt


def test_health_fails_on_a_read_only_spool_and_recovers(
    launch: Launch, workdir: Path, relay: ScriptedSMTP
) -> None:
    """
    /health is 200 with every check ok; with the spool read-only it is 503
    with the spool check failing; writable again, 200.  Probing twice a
    second for the whole time logs only the two changes.
    """
    port, admin = free_ports(2)
    gw = launch(workdir / "gw", _config(port, admin, relay.port), [port])
    url = f"http://127.0.0.1:{admin}/health"
    status, body = _get(url)
    assert status == 200, body
    health = json.loads(body)
    assert health["status"] == "ok"
    assert set(health["checks"]) == {"spool", "listeners", "queue", "delivery"}
    assert all(check["ok"] for check in health["checks"].values())
    before = len(gw.output().splitlines())
    with _ReadOnly(gw.workdir / "var" / "spool"):
        wait_until(lambda: _get(url)[0] == 503, 20, 0.5, "/health to fail")
        status, body = _get(url)
        assert status == 503
        failed = json.loads(body)
        assert failed["status"] == "fail"
        assert failed["checks"]["spool"]["ok"] is False
        assert "not writable" in failed["checks"]["spool"]["detail"]
    wait_until(lambda: _get(url)[0] == 200, 20, 0.5, "/health to recover")
    lines = gw.output().splitlines()[before:]
    assert [line for line in lines if "health check" in line and "spool" in line], lines
    assert len(lines) <= 6, lines


def test_bearer_token(launch: Launch, workdir: Path, relay: ScriptedSMTP) -> None:
    """
    With gateway.admin_token_file, every endpoint answers 401 without the
    token or with another one, and 200 with it.
    """
    port, admin = free_ports(2)
    (workdir / "gw").mkdir()
    (workdir / "gw" / "admin.token").write_text("e2e-admin-token\n")
    gw = launch(workdir / "gw",
                _config(port, admin, relay.port, 'admin_token_file = "admin.token"\n'), [port])
    assert "bearer token required" in gw.output()
    for path in ("/health", "/metrics", "/queue"):
        url = f"http://127.0.0.1:{admin}{path}"
        assert _get(url)[0] == 401, path
        assert _get(url, "not-the-token")[0] == 401, path
        assert _get(url, "e2e-admin-token")[0] == 200, path


def test_non_loopback_admin_needs_a_token_file(
    launch: Launch, workdir: Path, relay: ScriptedSMTP
) -> None:
    """
    admin_listen on every address without admin_token_file: check-config
    and twistd refuse the file, naming the key, before anything listens;
    with a token file that does not exist twistd names the file.
    """
    port, admin = free_ports(2)
    bad = _config(port, admin, relay.port).replace(
        f'admin_listen = "127.0.0.1:{admin}"', f'admin_listen = "0.0.0.0:{admin}"'
    )
    gw = launch(workdir / "gw", bad, [], start=False)
    checked = subprocess.run(
        [str(BIN / "relaygw"), "check-config", "-c", str(gw.config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode != 0
    problem = (f"gateway.admin_token_file: required when admin_listen (0.0.0.0:{admin}) "
               "is not a loopback address")
    assert problem in checked.stdout + checked.stderr
    proc = gw.spawn()
    assert proc.wait(60) != 0
    assert problem in gw.output()

    missing = _config(port, admin, relay.port, 'admin_token_file = "nowhere.token"\n')
    gw2 = launch(workdir / "gw2", missing, [], start=False)
    proc = gw2.spawn()
    assert proc.wait(60) != 0
    assert f"gateway.admin_token_file {workdir / 'gw2' / 'nowhere.token'}" in gw2.output()
