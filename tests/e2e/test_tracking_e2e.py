"""
The message tracking log end to end (issue 8, "Message tracking"): a real
gateway receives from two client addresses, relays to a scripted receiver
that accepts one recipient, refuses one and defers one until it expires;
`relaygw track` (the console script, as an administrator runs it) then finds
the messages by each filter, with RECEIVE rows from the sessions and DELIVER,
DEFER, FAIL, EXPIRE, DSN rows from the delivery process, all in one log.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Launch, gateway_toml, smtp, spool_entries
from tests.servers.ports import free_ports, wait_until
from tests.servers.relaygw import BIN, RelaygwProcess
from tests.servers.scripted_smtp import ScriptedSMTP

pytestmark = pytest.mark.e2e


def _rule(address: str) -> str | None:
    local = address.partition("@")[0]
    if local == "bad":
        return "550 5.1.1 <%s>: user unknown" % address
    if local == "slow":
        return "451 4.2.0 mailbox busy, try later"
    return None


def _config(port: int, admin: int, relay: int) -> str:
    toml = gateway_toml(admin).replace('retry = ["1s", "2s"]', 'retry = ["1s"]\nexpire = "4s"')
    return toml + f"""
[[accepted_domains]]
domain = "corp.test"
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
name = "Printers"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.20/30"]
tls = "off"
permissions.anonymous = ["submit", "relay", "accept-any-sender"]

[[connectors]]
name = "Apps"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit", "relay", "accept-any-sender"]
"""


def _send(port: int, source: str, sender: str, rcpts: list[str], message_id: str) -> None:
    client, code, _ = smtp(port, source=source)
    assert code == 220
    client.ehlo("client.e2e.test")
    refused = client.sendmail(sender, rcpts, (
        f"Subject: tracked\r\nFrom: <{sender}>\r\nMessage-ID: {message_id}\r\n\r\nbody\r\n"
    ).encode())
    client.quit()
    assert refused == {}


@pytest.fixture(scope="module")
def gateway(module_launch: Launch, module_workdir: Path) -> Iterator[RelaygwProcess]:
    """A gateway that has received two messages and finished delivering them."""
    relay = ScriptedSMTP(_rule).start()
    try:
        port, admin = free_ports(2)
        gw = module_launch(module_workdir / "gw", _config(port, admin, relay.port), [port])
        _send(port, "127.0.0.21", "scanner@corp.test",
              ["ok@remote.test", "bad@remote.test", "slow@remote.test"], "<scan-1@corp.test>")
        _send(port, "127.0.0.9", "app@corp.test", ["dave@corp.test"], "<app-2@corp.test>")
        # Done: the spool is empty once slow@ expired and the DSN reached scanner@'s Maildir.
        wait_until(lambda: not spool_entries(gw.workdir / "var" / "spool"), 40, interval=0.2,
                   what="the spool to drain")
        yield gw
    finally:
        relay.stop()


def _track(gw: RelaygwProcess, *args: str) -> list[dict[str, str]]:
    assert gw.config_path is not None

    def rows(*args: str) -> list[dict[str, str]]:
        done = subprocess.run(
            [str(BIN / "relaygw"), "track", "-c", str(gw.config_path), "--json", *args],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout))

    # The writer flushes every 0.5 s: wait until the last event's rows are there.
    wait_until(lambda: len(rows("--event", "DSN")) == 2, 10, interval=0.2,
               what="the two DSN rows in the tracking log")
    return rows(*args)


def _events(rows: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(r["event-id"], r["recipient-address"]) for r in rows]


def test_sender_filter_tells_the_whole_story(gateway: RelaygwProcess) -> None:
    rows = _track(gateway, "--sender", "scanner@corp.test")
    events = _events(rows)
    for rcpt in ("ok@remote.test", "bad@remote.test", "slow@remote.test"):
        assert ("RECEIVE", rcpt) in events
    assert ("DELIVER", "ok@remote.test") in events
    assert ("FAIL", "bad@remote.test") in events
    assert ("DEFER", "slow@remote.test") in events
    assert ("EXPIRE", "slow@remote.test") in events
    assert ("DSN", "bad@remote.test") in events
    assert ("DSN", "slow@remote.test") in events
    [queue_id] = {r["internal-message-id"] for r in rows}
    fail = next(r for r in rows if r["event-id"] == "FAIL")
    assert fail["recipient-status"].startswith("550 5.1.1")
    assert fail["remote-host"].startswith("127.0.0.1")
    # Delivery rows carry what the session knew: connector, client, message id.
    assert {(r["connector-id"], r["client-ip"], r["message-id"]) for r in rows} == {
        ("Printers", "127.0.0.21", "<scan-1@corp.test>")}
    # Each DSN (bad@ at once, slow@ at expiry) was received from <> under its own queue id.
    dsns = _track(gateway, "--event", "RECEIVE", "--recipient", "scanner@corp.test")
    assert [(r["sender-address"], r["recipient-status"]) for r in dsns] == [
        ("", f"DSN of {queue_id}")] * 2
    assert len({r["internal-message-id"] for r in dsns}) == 2


def test_each_filter_finds_the_message(gateway: RelaygwProcess) -> None:
    by_app = {r["internal-message-id"] for r in _track(gateway, "--sender", "app@corp.test")}
    assert len(by_app) == 1
    for args in (
        ["--recipient", "dave@corp.test"],
        ["--message-id", "<app-2@corp.test>"],
        ["--message-id", "app-2@corp.test"],
        ["--connector", "Apps", "--sender", "app@*"],
        ["--client-ip", "127.0.0.9"],
        ["--since", "10m", "--recipient", "DAVE@corp.test"],
        ["--queue-id", next(iter(by_app))],
    ):
        rows = _track(gateway, *args)
        assert {r["internal-message-id"] for r in rows} == by_app, args
        assert ("DELIVER", "dave@corp.test") in _events(rows), args
    assert _track(gateway, "--client-ip", "127.0.0.20/30", "--recipient", "dave@corp.test") == []
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    assert _track(gateway, "--since", future) == []


def test_table_output(gateway: RelaygwProcess) -> None:
    assert gateway.config_path is not None
    done = subprocess.run(
        [str(BIN / "relaygw"), "track", "-c", str(gateway.config_path), "--recipient", "dave@corp.test"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Time (UTC)")
    assert any(" DELIVER " in line and "dave@corp.test" in line for line in lines[1:])


def test_files_are_named_by_utc_day(gateway: RelaygwProcess) -> None:
    names = {p.name for p in (gateway.workdir / "var" / "log" / "MessageTracking").iterdir()}
    # The run is under a minute: today's UTC day, or yesterday's when it crossed midnight.
    days = {time.strftime("MSGTRK%Y%m%d-1.LOG", time.gmtime(time.time() - s)) for s in (0, 60)}
    assert names and names <= days, names
