"""
The classic open-relay address forms, end to end (SPEC section 3, addresses;
issue 2 "Tests"), through smtplib against a connector without the C{relay}
right.  A trap smarthost (smtp-sink) is the default route: anything that
reaches it was relayed.
"""

from __future__ import annotations

import email
import smtplib
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    LOCAL_MAILDIR,
    Launch,
    Sinks,
    gateway_toml,
    maildir_messages,
    smtp,
    spool_entries,
)
from tests.servers.ports import free_ports, wait_until
from tests.servers.sink import SmtpSink

pytestmark = pytest.mark.e2e

REFUSE = "refuse"  # the routing domain is not accepted: never 250
ACCEPT = "accept"  # an accepted domain: 250, delivered to the Maildir
EITHER = "either"  # the routing domain is accepted; refusal allowed, relaying never

#: (RCPT TO address as sent between < and >, expectation, what it tries)
FORMS = [
    ("bob@elsewhere.test", REFUSE, "plain non-accepted domain"),
    ("BOB@ElseWhere.TEST", REFUSE, "mixed case"),
    ("bob@elsewhere.test.", REFUSE, "trailing dot"),
    ("bob@ELSEWHERE.test.", REFUSE, "trailing dot, mixed case"),
    ("bob@[127.0.0.1]", REFUSE, "IPv4 literal"),
    ("bob@[IPv6:::1]", REFUSE, "IPv6 literal"),
    ("@example.test:bob@elsewhere.test", REFUSE, "source route via an accepted domain"),
    ("@example.test,@gw.e2e.test:bob@elsewhere.test", REFUSE, "two-hop source route"),
    ('"bob@example.test"@elsewhere.test', REFUSE, "quoted @ with a foreign domain"),
    ("bob@example.test@elsewhere.test", REFUSE, "two @, foreign last"),
    ("bob%example.test@elsewhere.test", REFUSE, "percent hack, foreign last"),
    ("bob@sub.example.test", REFUSE, "subdomain of an exact accepted domain"),
    ("bob@example.test.elsewhere.test", REFUSE, "accepted domain as a prefix"),
    ("bob@elsewhere.test%example.test", REFUSE, "percent inside the domain"),
    ("bob%elsewhere.test", REFUSE, "percent hack without a domain"),
    ("elsewhere.test!bob", REFUSE, "bang path without a domain"),
    ("bob@example.test", ACCEPT, "accepted domain"),
    ("Bob@EXAMPLE.Test", ACCEPT, "accepted domain, mixed case"),
    ("bob@example.test.", EITHER, "accepted domain, trailing dot"),
    ("bob%elsewhere.test@example.test", EITHER, "percent hack"),
    ("elsewhere.test!bob@example.test", EITHER, "bang path"),
    ('"bob@elsewhere.test"@example.test', EITHER, "quoted local part holding @"),
    ('"bob%elsewhere.test"@example.test', EITHER, "quoted percent hack"),
    ("@elsewhere.test:bob@example.test", EITHER, "source route to an accepted domain"),
    ("bob@elsewhere.test@example.test", EITHER, "two @, accepted last"),
]


def _config(port: int, admin: int, trap: int) -> str:
    return gateway_toml(admin, default_route="trap") + LOCAL_MAILDIR + f"""
[[routes]]
name = "trap"
via = "smarthost"
smarthosts = ["127.0.0.1:{trap}"]
tls = "off"

[[connectors]]
name = "No Relay"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit", "accept-authoritative-sender"]
message_rate_limit = "100000/m"
"""


@pytest.fixture(scope="module")
def relay_setup(
    module_launch: Launch, module_sinks: Sinks, module_workdir: Path
) -> tuple[int, SmtpSink, Path]:
    """relaygw without relay for anonymous clients; its default route is a trap sink."""
    trap = module_sinks(module_workdir / "trap")
    port, admin = free_ports(2)
    module_launch(module_workdir / "gw", _config(port, admin, trap.port), [port])
    return port, trap, module_workdir / "gw"


def _try(port: int, rcpt: str, subject: str) -> tuple[int, bytes, bool]:
    """One transaction to C{rcpt}: (RCPT code, RCPT text, whether DATA got 250)."""
    client, code, _ = smtp(port, "127.0.0.1")
    assert code == 220
    try:
        client.ehlo("relaytest.client.test")
        # the null sender: a later bounce of a probe must not reach the trap either
        assert client.docmd("MAIL", "FROM:<>")[0] == 250
        code, text = client.docmd("RCPT", f"TO:<{rcpt}>")
        queued = False
        if code == 250:
            data_code, _ = client.data(f"Subject: {subject}\r\n\r\nopen relay probe\r\n".encode())
            queued = data_code == 250
        client.quit()
    except smtplib.SMTPServerDisconnected:
        pass
    return code, text, queued


@pytest.mark.parametrize(("rcpt", "expect", "what"), FORMS, ids=[f[2] for f in FORMS])
def test_open_relay_form(
    relay_setup: tuple[int, SmtpSink, Path], rcpt: str, expect: str, what: str
) -> None:
    """
    Without the relay right, an address whose routing domain (after the last @
    outside quotes) is not accepted never gets 250; %, ! and quoted text never
    route; a message accepted for an accepted domain lands in the Maildir and
    never at the trap smarthost.
    """
    port, trap, gw = relay_setup
    subject = f"relay-probe {what}"
    code, text, queued = _try(port, rcpt, subject)
    if expect == REFUSE:
        assert code >= 500, (rcpt, code, text)
        if "@" in rcpt.rsplit(":", 1)[-1]:
            assert (code, text) == (
                550, b"5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
            ) or code == 501, (rcpt, code, text)
        return
    if expect == ACCEPT:
        assert (code, text) == (250, b"2.1.5 Recipient OK"), (rcpt, code, text)
        assert queued
    else:
        assert code == 250 or code >= 500, (rcpt, code, text)
    if not queued:
        return
    mail, spool = gw / "var" / "mail", gw / "var" / "spool"

    def landed() -> bool:
        return any(
            email.message_from_bytes(p.read_bytes())["Subject"] == subject
            for p in maildir_messages(mail)
        )

    wait_until(
        lambda: (landed() and not spool_entries(spool)) or trap.count() > 0,
        30,
        interval=0.1,
        what=f"{rcpt!r} delivered to the Maildir",
    )
    assert trap.count() == 0, trap.messages()
    assert landed()


def test_quoted_local_part_cannot_leave_the_maildir(relay_setup: tuple[int, SmtpSink, Path]) -> None:
    """
    A quoted local part holding path syntax never writes outside the
    Maildir root: refused, or delivered under var/mail/ only.
    """
    port, trap, gw = relay_setup
    code, text, queued = _try(port, '"../../escaped"@example.test', "relay-probe path")
    if queued:
        spool = gw / "var" / "spool"
        wait_until(lambda: not spool_entries(spool), 30, interval=0.1, what="the spool to drain")
    assert not (gw / "escaped").exists()
    assert not (gw / "var" / "escaped").exists()
    assert not (gw.parent / "escaped").exists()
    assert trap.count() == 0
