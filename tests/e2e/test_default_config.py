"""
The embedded default configuration, run as a user would run it (SPEC section 1;
issue 2, "What a user can do"): C{twistd -n relaygw} without C{-c} in a fresh
working directory, then swaks against 127.0.0.1:2525.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Launch, maildir_messages
from tests.servers.ports import accepts, is_listening, wait_until

pytestmark = pytest.mark.e2e

#: SPEC section 1: the embedded default's fixed ports (SMTP) and its admin port.
SMTP_PORTS = (2525, 5870, 4650)
ADMIN_PORT = 8025

QUEUED = re.compile(
    r"^<-  250 2\.6\.0 <[^>\s]+@[^>\s]+> \[InternalId=[0-9A-Z]+, Hostname=[^\]\s]+\] "
    r"Queued mail for delivery$",
    re.M,
)


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", "127.0.0.1:2525", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture
def default_gateway(launch: Launch, workdir: Path) -> Path:
    """relaygw on its embedded default in C{workdir}; fails clearly if its fixed ports are taken."""
    busy = [p for p in (*SMTP_PORTS, ADMIN_PORT) if is_listening("127.0.0.1", p)]
    if busy:
        pytest.fail(
            f"the embedded default needs the fixed ports {SMTP_PORTS} and {ADMIN_PORT}, "
            f"but something already listens on {busy}: stop it (another relaygw?) and rerun"
        )
    launch(workdir, None, SMTP_PORTS)
    return workdir


def test_default_delivers_accepted_domain_to_maildir(default_gateway: Path) -> None:
    """
    swaks --to alice@example.test gets the SPEC section 3 replies, and the
    message lands in ./var/mail/alice/new/ of the working directory.
    """
    result = swaks("--to", "alice@example.test", "--header", "Subject: e2e default alice")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert re.search(r"^<-  220 .+", out, re.M), out
    assert re.search(r"^<-  250[- ]\S+ Hello \[127\.0\.0\.1\]$", out, re.M), out
    for keyword in ("SIZE", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING"):
        assert re.search(rf"^<-  250[- ]{keyword}\b", out, re.M), (keyword, out)
    assert "<-  250 2.1.0 Sender OK" in out, out
    assert "<-  250 2.1.5 Recipient OK" in out, out
    assert "<-  354 Start mail input; end with <CRLF>.<CRLF>" in out, out
    assert QUEUED.search(out), out
    assert re.search(r"^<-  221 2\.0\.0 ", out, re.M), out

    mail = default_gateway / "var" / "mail"
    wait_until(lambda: maildir_messages(mail, "alice"), 20, what="a file in var/mail/alice/new/")
    [delivered] = maildir_messages(mail, "alice")
    text = delivered.read_bytes()
    assert b"Subject: e2e default alice" in text
    assert re.search(rb"^Received: from ", text, re.M), text[:500]


def test_default_refuses_relay_to_other_domains(default_gateway: Path) -> None:
    """
    swaks --to bob@elsewhere.test is refused at RCPT with
    550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain.
    """
    result = swaks("--to", "bob@elsewhere.test")
    out = result.stdout
    assert result.returncode != 0, out
    assert "<** 550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain" in out, out
    assert not QUEUED.search(out), out
    assert not (default_gateway / "var" / "mail" / "bob").exists()


def test_default_listens_on_loopback_only(default_gateway: Path) -> None:
    """The embedded default's SMTP ports listen on 127.0.0.1 only, never on a wildcard address."""
    for port in SMTP_PORTS:
        assert accepts("127.0.0.1", port)
        out = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout
        locals_ = {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}
        assert locals_ == {"127.0.0.1"}, out
