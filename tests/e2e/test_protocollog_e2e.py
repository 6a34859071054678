"""
Exchange protocol logs end to end (issue 8; SPEC section 5): two real
C{twistd -n relaygw} gateways on loopback.  swaks submits to the first with
STARTTLS and AUTH PLAIN, then AUTH LOGIN; the first relays via its
smarthost route (STARTTLS and AUTH PLAIN of its own) to the second, which
delivers to a Maildir.  Then the RECV and SEND files are read back: the
header, the rows of each session, and no password (nor any base64 form of
one) in any file either gateway wrote.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Launch, gateway_toml, maildir_messages
from tests.servers.ports import free_ports, wait_until
from tests.servers.relaygw import BIN, RelaygwProcess
from tests.servers.smtp_clients import files_containing, secret_forms, swaks, wait_for_banner

pytestmark = pytest.mark.e2e

USER, PASSWORD = "scanner9", "Sc4n-Pa55word!q"
HUB_USER, HUB_PASSWORD = "relayuser", "Hub-Pa55word!z"
FIELDS = ("#Fields: date-time,connector-id,session-id,sequence-number,local-endpoint,"
          "remote-endpoint,event,data,context")


def _edge(port: int, admin: int, hub: int) -> str:
    return gateway_toml(admin) + f"""
[users]
file = "users"

[[accepted_domains]]
domain = "far.test"
type = "internal-relay"
route = "Hub Route"

[[routes]]
name = "Hub Route"
via = "smarthost"
smarthosts = ["127.0.0.1:{hub}"]
tls = "required"
auth_user = "{HUB_USER}"
auth_password_file = "hub.secret"
protocol_logging = "verbose"

[[connectors]]
name = "Client Frontend"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "starttls"
certificate = "tls/edge.pem"
permissions.anonymous = []
permissions.authenticated = ["submit", "relay"]
protocol_logging = "verbose"
"""


def _hub(port: int, admin: int) -> str:
    return gateway_toml(admin, hostname="hub.e2e.test") + f"""
[users]
file = "users"

[[accepted_domains]]
domain = "far.test"
route = "local"

[[routes]]
name = "local"
via = "maildir"
maildir = "var/mail"

[[connectors]]
name = "Hub"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "starttls"
certificate = "tls/hub.pem"
permissions.anonymous = []
permissions.authenticated = ["submit", "relay", "accept-any-sender"]
protocol_logging = "verbose"
"""


def _add_user(gw: RelaygwProcess, user: str, password: str, address: str) -> None:
    assert gw.config_path is not None
    done = subprocess.run(
        [str(BIN / "relaygw"), "user", "add", "-c", str(gw.config_path), user, "--address", address],
        input=password + "\n", capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr


def _files(gw: RelaygwProcess, kind: str) -> list[Path]:
    prefix = {"SmtpReceive": "RECV", "SmtpSend": "SEND"}[kind]
    return sorted((gw.workdir / "var" / "log" / "ProtocolLog" / kind).glob(f"{prefix}*-*.LOG"))


def _rows(paths: list[Path]) -> list[dict[str, str]]:
    import csv

    names = FIELDS[len("#Fields: "):].split(",")
    rows = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            rows += [dict(zip(names, v)) for v in csv.reader(f) if v and not v[0].startswith("#")]
    return rows


def _sessions(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    found: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        found.setdefault(row["session-id"], []).append(row)
    return found


def _shown(rows: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(r["event"], r["data"]) for r in rows]


def test_protocol_logs(launch: Launch, workdir: Path) -> None:
    """RECV and SEND files for real sessions with STARTTLS and AUTH; no secret in any file."""
    port, admin, hub_port, hub_admin = free_ports(4)
    hub = launch(workdir / "hub", _hub(hub_port, hub_admin), [hub_port], start=False)
    _add_user(hub, HUB_USER, HUB_PASSWORD, f"{HUB_USER}@far.test")
    hub.start()
    wait_for_banner(hub_port)
    edge = launch(workdir / "edge", _edge(port, admin, hub_port), [port], start=False)
    (edge.workdir / "hub.secret").write_text(HUB_PASSWORD + "\n")
    _add_user(edge, USER, PASSWORD, f"{USER}@corp.test")
    edge.start()
    wait_for_banner(port)

    for mechanism in ("PLAIN", "LOGIN"):
        done = swaks(port, "--ehlo", "scanner.e2e.test", "--tls", "--auth", mechanism,
                     "--auth-user", USER, "--auth-password", PASSWORD,
                     "--from", f"{USER}@corp.test", "--to", "bob@far.test",
                     "--header", f"Subject: protolog {mechanism}", "--body", "secret-free body")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "TLS started" in done.stdout, done.stdout
    mail = hub.workdir / "var" / "mail"
    wait_until(lambda: len(maildir_messages(mail, "bob")) == 2, 60, 0.2, "both messages at the hub")
    edge.stop()
    hub.stop()

    # -- the edge's SmtpReceive log: two client sessions ----------------------
    recv = _files(edge, "SmtpReceive")
    assert recv, "no RECV file"
    head = recv[0].read_bytes().decode().split("\r\n")[:5]
    assert head[0].startswith("#Software: relaygw ")
    assert head[1:3] == ["#Version: 15.0.0.0", "#Log-type: SMTP Receive Protocol Log"]
    assert head[3].startswith("#Date: ") and head[3].endswith("Z")
    assert head[4] == FIELDS
    # The launcher's readiness probes connect and close: sessions without EHLO.
    sessions = {sid: rows for sid, rows in _sessions(_rows(recv)).items()
                if ("<", "EHLO scanner.e2e.test") in _shown(rows)}
    assert len(sessions) == 2, sessions.keys()
    by_mechanism = {}
    for sid, rows in sessions.items():
        assert [int(r["sequence-number"]) for r in rows] == list(range(len(rows)))
        assert {r["connector-id"] for r in rows} == {"Client Frontend"}
        assert {r["local-endpoint"] for r in rows} == {f"127.0.0.1:{port}"}
        assert all(r["date-time"].endswith("Z") for r in rows)
        shown = _shown(rows)
        assert shown[0] == ("+", "")
        assert shown[1] == ("*", "Client Frontend")
        assert rows[1]["context"].startswith("connector chosen: remote range 127.0.0.0/8 ")
        assert shown[2][0] == ">" and shown[2][1].startswith("220 ")
        assert ("<", "EHLO scanner.e2e.test") in shown
        assert ("<", "STARTTLS") in shown
        tls = [r for r in rows if r["context"] == "TLS negotiated"]
        assert len(tls) == 1 and tls[0]["data"].startswith("TLSv1."), tls
        assert ("*", USER) in shown
        assert (">", "235 2.7.0 Authentication successful") in shown
        assert ("<", f"MAIL FROM:<{USER}@corp.test>") in shown
        assert ("<", "DATA") in shown
        assert any(e == ">" and d.startswith("250 2.6.0 ") for e, d in shown)
        assert shown[-1] == ("-", "")
        by_mechanism["PLAIN" if ("<", "AUTH PLAIN ****") in shown else "LOGIN"] = shown
    assert set(by_mechanism) == {"PLAIN", "LOGIN"}
    login = by_mechanism["LOGIN"]
    i = login.index(("<", "AUTH LOGIN"))
    assert [e for e, _ in login[i:i + 5]] == ["<", ">", "<", ">", "<"]
    assert login[i + 2] == login[i + 4] == ("<", "****")

    # -- the edge's SmtpSend log: the smarthost sessions -------------------------
    send = _files(edge, "SmtpSend")
    assert send, "no SEND file"
    assert "#Log-type: SMTP Send Protocol Log\r\n" in send[0].read_bytes().decode()
    send_rows = _rows(send)
    assert {r["connector-id"] for r in send_rows} == {"Hub Route"}
    assert {r["remote-endpoint"] for r in send_rows} == {f"127.0.0.1:{hub_port}"}
    shown = _shown(send_rows)
    # An idle connection kept for reuse may still be open when the gateway stops: no "-".
    assert ("+", "") in shown
    assert (">", "STARTTLS") in shown
    assert any(r["context"] == "TLS negotiated" and r["data"].startswith("TLSv1.")
               for r in send_rows)
    assert (">", "AUTH PLAIN ****") in shown
    assert ("*", HUB_USER) in shown
    assert shown.count((">", ".")) == 2
    assert any(e == "<" and d.startswith("235 ") for e, d in shown)

    # -- the hub's SmtpReceive log: the edge's sessions, its AUTH masked --------
    hub_rows = _shown(_rows(_files(hub, "SmtpReceive")))
    assert ("<", "AUTH PLAIN ****") in hub_rows
    assert ("*", HUB_USER) in hub_rows

    # -- no secret anywhere --------------------------------------------------------
    needles = secret_forms(USER, PASSWORD) + secret_forms(HUB_USER, HUB_PASSWORD)
    written = [edge.workdir, hub.workdir]
    exclude = [edge.workdir / "hub.secret", edge.workdir / "users", hub.workdir / "users",
               edge.workdir / "relaygw.toml", hub.workdir / "relaygw.toml"]
    assert files_containing(written, needles, exclude) == []
    assert "secret-free body" not in "".join(
        p.read_text() for p in recv + send + _files(hub, "SmtpReceive"))
