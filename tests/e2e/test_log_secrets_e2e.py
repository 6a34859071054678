"""
No password in any file (issue 8, "Tests"): a gateway with verbose
protocol logging, the tracking log and its own output takes AUTH PLAIN and
LOGIN logins, right and wrong, and relays a message; then every file the
gateway wrote (logs of every kind, its output, the spool) is searched for
the passwords and every base64 form a client sent.
"""

from __future__ import annotations

import base64
import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import LOCAL_MAILDIR, Launch, gateway_toml, maildir_messages, smtp
from tests.servers.ports import free_ports, wait_until
from tests.servers.relaygw import BIN

pytestmark = pytest.mark.e2e

USER, PASSWORD, WRONG = "scanner7", "Pr1nter-S3cret!x", "Wr0ng-Guess?y"


def _b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


def _needles() -> list[str]:
    found = []
    for secret in (PASSWORD, WRONG):
        found += [secret, _b64(secret), _b64(f"\0{USER}\0{secret}"), _b64(f"{USER}\0{USER}\0{secret}")]
    return found


def _config(port: int, admin: int) -> str:
    return gateway_toml(admin) + LOCAL_MAILDIR + f"""
[users]
file = "users"

[[connectors]]
name = "Logged"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
allow_plaintext_auth = true
protocol_logging = "verbose"
"""


def _login(port: int, mechanism: str, password: str) -> int:
    client, code, _ = smtp(port)
    assert code == 220
    client.ehlo("scanner.e2e.test")
    try:
        if mechanism == "PLAIN":
            code, _ = client.docmd("AUTH", "PLAIN " + _b64(f"\0{USER}\0{password}"))
        else:
            assert client.docmd("AUTH", "LOGIN")[0] == 334
            assert client.docmd(_b64(USER))[0] == 334
            code, _ = client.docmd(_b64(password))
        if code == 235:
            client.sendmail(f"{USER}@example.test", ["alice@example.test"],
                            b"Subject: logged\r\n\r\nscan\r\n")
        client.quit()
    except smtplib.SMTPException:
        client.close()
    return code


def test_no_password_in_any_file(launch: Launch, workdir: Path) -> None:
    port, admin = free_ports(2)
    gw = launch(workdir / "gw", _config(port, admin), [port])
    assert gw.config_path is not None
    added = subprocess.run(
        [str(BIN / "relaygw"), "user", "add", "-c", str(gw.config_path), USER,
         "--address", f"{USER}@example.test"],
        input=PASSWORD + "\n", capture_output=True, text=True, timeout=60, check=False,
    )
    assert added.returncode == 0, added.stderr
    assert [_login(port, m, p) for m in ("PLAIN", "LOGIN") for p in (PASSWORD, WRONG)] == [
        235, 535, 235, 535,
    ]
    mail = gw.workdir / "var" / "mail"
    wait_until(lambda: len(maildir_messages(mail, "alice")) == 2, 30, 0.1, "both messages")
    gw.stop()

    written = [p for p in gw.workdir.rglob("*") if p.is_file() and p.name != "users"]
    logs = [p for p in written if p.suffix.upper() == ".LOG"]
    assert logs, "no log files were written"
    # The verbose connector's SmtpReceive protocol log is among the files searched.
    assert any(p.name.startswith("RECV") and p.parent.name == "SmtpReceive" for p in logs), logs
    for path in written:
        data = path.read_bytes()
        for needle in _needles():
            assert needle.encode() not in data, f"{needle!r} in {path}"
