"""
Bounces and delay warnings end to end (issue 7, "Bounces"): a real gateway
relays to a scripted receiver that refuses one recipient of two and defers
another until it expires; the DSNs come back to the sender's Maildir and are
parsed with Python's C{email} package, field by field.  A message from
C{<>} gets no DSN, and a DSN that cannot be delivered is dropped, not looped.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Launch, gateway_toml, maildir_messages, smtp, spool_entries
from tests.servers.ports import free_ports, wait_until
from tests.servers.scripted_smtp import ScriptedSMTP

pytestmark = pytest.mark.e2e

HOSTNAME = "gw.e2e.test"


def _rule(address: str) -> str | None:
    local = address.partition("@")[0]
    if local.startswith("bad"):
        return "550 5.1.1 <%s>: user unknown" % address
    if local.startswith("slow"):
        return "451 4.2.0 mailbox busy, try later"
    return None


def _config(port: int, admin: int, relay: int) -> str:
    toml = gateway_toml(admin, hostname=HOSTNAME)
    # Quick schedule: warn after 2 s, give up after 5 s.
    toml = toml.replace('retry = ["1s", "2s"]', 'retry = ["1s"]\nexpire = "5s"\n'
                        'delay_warning = "2s"')
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
name = "Devices"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit", "relay", "accept-any-sender"]
"""


@pytest.fixture(scope="module")
def gateway(module_launch: Launch, module_workdir: Path) -> Iterator[tuple[int, ScriptedSMTP, Path]]:
    """(SMTP port, the scripted receiver, the gateway's workdir)."""
    relay = ScriptedSMTP(_rule).start()
    try:
        port, admin = free_ports(2)
        module_launch(module_workdir / "gw", _config(port, admin, relay.port), [port])
        yield port, relay, module_workdir / "gw"
    finally:
        relay.stop()


def _send(port: int, sender: str, rcpts: list[str], subject: str) -> None:
    client, code, _ = smtp(port)
    assert code == 220
    client.ehlo("printer.e2e.test")
    refused = client.sendmail(
        sender, rcpts, f"Subject: {subject}\r\nFrom: <{sender or 'x@corp.test'}>\r\n\r\nbody\r\n"
        .encode()
    )
    client.quit()
    assert refused == {}


def _dsns(gw: Path, local: str, subject: str) -> list[email.message.EmailMessage]:
    found = []
    for path in maildir_messages(gw / "var" / "mail", local):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        if msg.get_content_type() == "multipart/report" and f"Subject: {subject}" in str(
            msg.get_payload()[2] if msg.is_multipart() else ""
        ):
            found.append(msg)
    return found


def _status_blocks(dsn: email.message.EmailMessage) -> list[email.message.Message]:
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    human, status, original = dsn.get_payload()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert original.get_content_type() == "text/rfc822-headers"
    blocks = status.get_payload()
    assert blocks[0]["Reporting-MTA"] == f"dns; {HOSTNAME}"
    assert blocks[0]["Arrival-Date"]
    return list(blocks[1:])


def _drained(gw: Path) -> None:
    wait_until(lambda: not spool_entries(gw / "var" / "spool"), 30, interval=0.1,
               what="the spool to drain")


def test_one_refused_recipient_of_two_bounces(gateway: tuple[int, ScriptedSMTP, Path]) -> None:
    """ok@ is delivered; bad@ comes back in one DSN from <>, with the receiver's reply."""
    port, relay, gw = gateway
    _send(port, "alice@corp.test", ["ok@remote.test", "bad1@remote.test"], "two rcpts")
    wait_until(lambda: bool(_dsns(gw, "alice", "two rcpts")), 30, interval=0.1,
               what="the bounce in alice's Maildir")
    [dsn] = _dsns(gw, "alice", "two rcpts")
    assert dsn["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOSTNAME}"
    assert dsn["To"].addresses[0].addr_spec == "alice@corp.test"
    assert dsn["Auto-Submitted"] == "auto-replied"
    [block] = _status_blocks(dsn)
    assert block["Final-Recipient"] == "rfc822; bad1@remote.test"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; 127.0.0.1"
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    delivered = [t for t in relay.transactions() if t.data and b"Subject: two rcpts" in t.data]
    assert [t.accepted for t in delivered] == [["ok@remote.test"]]
    assert delivered[0].refused == ["bad1@remote.test"]
    _drained(gw)
    time.sleep(1.5)  # a second DSN would be spooled within an attempt or two
    assert len(_dsns(gw, "alice", "two rcpts")) == 1


def test_delay_warning_then_expiry(gateway: tuple[int, ScriptedSMTP, Path]) -> None:
    """A recipient deferred past delay_warning gets one 'delayed' DSN, then 'failed' 5.4.7."""
    port, _, gw = gateway
    _send(port, "bob@corp.test", ["slow1@remote.test"], "deferred")

    def both() -> bool:
        actions = [_status_blocks(d)[0]["Action"] for d in _dsns(gw, "bob", "deferred")]
        return "failed" in actions

    wait_until(both, 30, interval=0.2, what="the delay warning and the bounce")
    _drained(gw)
    blocks = sorted((_status_blocks(d)[0] for d in _dsns(gw, "bob", "deferred")),
                    key=lambda b: b["Action"])
    assert [b["Action"] for b in blocks] == ["delayed", "failed"]
    delayed, failed = blocks
    assert delayed["Status"] == "4.2.0"
    assert delayed["Final-Recipient"] == "rfc822; slow1@remote.test"
    assert failed["Status"] == "5.4.7"
    assert "451 4.2.0" in failed["Diagnostic-Code"]


def test_no_dsn_for_the_null_sender(gateway: tuple[int, ScriptedSMTP, Path]) -> None:
    """A refused recipient of a message from <> is dropped: nothing is sent anywhere."""
    port, relay, gw = gateway
    before = len(relay.transactions())
    _send(port, "", ["bad2@remote.test"], "from null")
    _drained(gw)
    # The refused transaction is recorded at the RSET that may follow the
    # entry's removal; then a DSN, were one sent, would have had its time.
    wait_until(lambda: len(relay.transactions()) > before, 10, interval=0.05,
               what="the refused transaction")
    time.sleep(1.5)
    seen = relay.transactions()[before:]
    assert [t.sender for t in seen] == [""]  # the one attempt, no DSN after it
    assert [t.refused for t in seen] == [["bad2@remote.test"]]


def test_undeliverable_dsn_is_dropped(gateway: tuple[int, ScriptedSMTP, Path]) -> None:
    """The DSN to a return path that refuses it is tried once and dropped, never bounced."""
    port, relay, gw = gateway
    before = len(relay.transactions())
    _send(port, "bad3@remote.test", ["bad4@remote.test"], "loop")
    _drained(gw)
    time.sleep(1.5)
    seen = relay.transactions()[before:]
    assert [(t.sender, t.refused) for t in seen] == [
        ("bad3@remote.test", ["bad4@remote.test"]),
        ("", ["bad3@remote.test"]),
    ]
