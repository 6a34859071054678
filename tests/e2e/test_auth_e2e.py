"""
SMTP AUTH end to end (issue 3, "Must work" 2-7; SPEC sections 2, 3 and 6):
the real C{twistd -n relaygw} process against a real OpenLDAP slapd
(StartTLS and LDAPS) and a real Samba Active Directory DC, and against its
local users file written by the real C{relaygw user add}; clients are swaks,
and a raw socket client for the exact bytes of device quirks.

Servers shared by the module (started here, stopped by PID):
  - slapd (tests/servers/slapd.py) behind gateway "ldap" (ldap:// + StartTLS,
    C{ca_file});
  - a second slapd allowing DN binds with an empty password (the dangerous
    server behaviour) behind gateway "ldaps" (ldaps://); the last test using
    it stops it mid-run;
  - a Samba AD DC (tests/servers/samba_ad.py) behind gateway "ad";
  - gateway "users" on its users file, logging JSON events (every field of
    every event lands in the output, not only the formatted text).
Each test talks from its own 127.x source address, so the per-IP AUTH
throttle of one test never meets another's.  The last test searches every
file the gateways wrote for the passwords used here.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import gateway_toml, maildir_messages
from tests.servers import samba_ad as A
from tests.servers import slapd as S
from tests.servers.dirtest import unavailable
from tests.servers.ports import free_ports, wait_until
from tests.servers.relaygw import RelaygwProcess
from tests.servers.smtp_clients import (
    LineClient,
    Reply,
    b64,
    client_context,
    files_containing,
    plain_blob,
    secret_forms,
    swaks,
    wait_for_banner,
)

pytestmark = pytest.mark.e2e

RELAYGW = Path(sys.executable).parent / "relaygw"
AUTH_OK = (235, "2.7.0 Authentication successful")
AUTH_FAILED = (535, "5.7.3 Authentication unsuccessful")
AUTH_TEMPFAIL = (454, "4.7.0 Temporary authentication failure")
NO_RELAY = (550, "5.7.54 SMTP; Unable to relay recipient in non-accepted domain")
SEND_AS = (550, "5.7.60 SMTP; Client does not have permissions to send as this sender")
NOT_FOUND = (
    550, "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
)
SWAKS_QUEUED = re.compile(r"^<~  250 2\.6\.0 <[^>]+> \[InternalId=[0-9A-Z]+, ", re.M)

#: Passwords of the users-file accounts, and the wrong passwords tried; with
#: the directories' fixture passwords, the last test searches the logs for all.
PRINTER = ("printer1", "Pr1nter-Secret-Xq7")
WRONG = "wr0ng-Pa55word-Zk4"
USED: set[tuple[str, str]] = {
    PRINTER,
    *((user, WRONG) for user in ("printer1", "alice", "alice@example.test", "dan", "erin",
                                 "nobody1", "nobody2", "nobody3")),
    *S.PASSWORDS.items(),
    *A.PASSWORDS.items(),
    ("alice@example.test", "alicepw"),
    ("EXAMPLE\\alice", "alicepw"),
    ("svc-relay", A.SERVICE_PASSWORD),
}


class JsonLoggedGateway(RelaygwProcess):
    """A gateway run with C{--logger=relaygw.tap.json_log}: all event fields in its output."""

    def args(self) -> list[str]:
        args = super().args()
        at = args.index("relaygw")
        return [*args[:at], "--logger=relaygw.tap.json_log", *args[at:]]


@pytest.fixture(scope="module")
def gateways(relaygw_installed: None, module_workdir: Path) -> Iterator[list[RelaygwProcess]]:
    """Every gateway of the module; all stopped (by PID) when the module ends."""
    started: list[RelaygwProcess] = []
    yield started
    for proc in started:
        proc.stop(timeout=10)
        lines = proc.output().splitlines()
        print(f"--- twistd output ({proc.workdir}), last {min(len(lines), 60)} lines ---")
        print("\n".join(lines[-60:]))


@pytest.fixture(scope="module")
def captured() -> list[str]:
    """Output of the relaygw commands run here (searched for secrets at the end)."""
    return []


class Gateway:
    """A started gateway: its process, directory and SMTP port(s)."""

    def __init__(self, proc: RelaygwProcess, port: int, implicit_port: int = 0) -> None:
        self.proc = proc
        self.dir = proc.workdir
        self.port = port
        self.implicit_port = implicit_port

    @property
    def config(self) -> Path:
        assert self.proc.config_path is not None
        return self.proc.config_path


def _connector(port: int, *, grant: str, rights: str = '"relay"', extra: str = "") -> str:
    return f"""
[[connectors]]
name = "Submission"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
fqdn = "submit.e2e.test"
tls = "starttls"
certificate = "tls/submit.pem"
protocol_logging = "verbose"
permissions.anonymous = []
permissions.authenticated = ["submit"]
grants = [ {{ group = "{grant}", rights = [{rights}] }} ]
{extra}"""


def _domain(domain: str, *, validate: bool) -> str:
    return f"""
[[accepted_domains]]
domain = "{domain}"
route = "local"
validate_recipients = {"true" if validate else "false"}

[[routes]]
name = "local"
via = "maildir"
maildir = "var/mail"
"""


def _run(gateways: list[RelaygwProcess], workdir: Path, config: str, ports: list[int], *,
         bind_password: str | None = None, cls: type[RelaygwProcess] = RelaygwProcess,
         ) -> Gateway:  # fmt: skip
    """
    Start a gateway in C{workdir} (its directory bind password, if any, in
    C{ldap.secret}) and wait until it greets on the first port.
    """
    workdir.mkdir()
    if bind_password is not None:
        (workdir / "ldap.secret").write_text(bind_password + "\n")
    proc = cls(workdir, config, ports=ports)
    gateways.append(proc)
    proc.start()
    wait_for_banner(ports[0])
    return Gateway(proc, *ports)


# -- servers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S.Slapd]:
    """The module's slapd (fixture users and groups)."""
    unavailable(S.slapd_unavailable())
    server = S.start_slapd(tmp_path_factory.mktemp("e2e-slapd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def risky_slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S.Slapd]:
    """A slapd where a DN with an empty password binds successfully; stopped by a test."""
    unavailable(S.slapd_unavailable())
    server = S.start_slapd(tmp_path_factory.mktemp("e2e-slapd-risky"), allow_bind_anon_dn=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def samba_dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[A.SambaDC]:
    """A Samba AD DC on its own 127.x address, provisioned for this module."""
    unavailable(A.samba_unavailable())
    ip = A.pick_ip()
    template = A.provision_template(tmp_path_factory.mktemp("e2e-samba-template"), ip)
    dc = A.start_dc(template, tmp_path_factory.mktemp("e2e-samba-dc"), ip)
    yield dc
    dc.stop()


# -- gateways ------------------------------------------------------------------


def _directory_toml(kind: str, server: str, ca: Path, base: str, bind: str,
                    extra: str = "") -> str:  # fmt: skip
    return f"""
[directory]
kind = "{kind}"
servers = ["{server}"]
start_tls = true
ca_file = "{ca}"
bind_dn = "{bind}"
bind_password_file = "ldap.secret"
base_dn = "{base}"
timeout = "3s"
{extra}"""


@pytest.fixture(scope="module")
def ldap_gw(gateways: list[RelaygwProcess], module_workdir: Path, slapd: S.Slapd) -> Gateway:
    """Gateway on slapd over ldap:// with StartTLS; throttle: 3 failures, no delay."""
    port, admin = free_ports(2)
    config = (
        gateway_toml(admin)
        + _domain("example.com", validate=False)
        + _directory_toml("ldap", slapd.ldap_url, slapd.ca_file, S.BASE_DN, S.SERVICE_DN)
        + _connector(port, grant="relay-users", extra=(
            'auth_throttle = { max_failures = 3, window = "10m", delay = "0s", max_delay = "0s" }'
        ))
    )  # fmt: skip
    return _run(gateways, module_workdir / "ldap", config, [port],
                bind_password=S.SERVICE_PASSWORD)


@pytest.fixture(scope="module")
def ldaps_gw(gateways: list[RelaygwProcess], module_workdir: Path,
             risky_slapd: S.Slapd) -> Gateway:  # fmt: skip
    """Gateway on the risky slapd over ldaps://, no login cache, recipients validated."""
    port, admin = free_ports(2)
    config = (
        gateway_toml(admin)
        + _domain("example.com", validate=True)
        + _directory_toml("ldap", risky_slapd.ldaps_url, risky_slapd.ca_file, S.BASE_DN,
                          S.SERVICE_DN, 'cache_ttl = "0s"')
        + _connector(port, grant="relay-users")
    )
    return _run(gateways, module_workdir / "ldaps", config, [port],
                bind_password=S.SERVICE_PASSWORD)


@pytest.fixture(scope="module")
def ad_gw(gateways: list[RelaygwProcess], module_workdir: Path, samba_dc: A.SambaDC) -> Gateway:
    """
    Gateway on the Samba DC over ldaps://; grant "relay" to the group
    relay-users (by CN); recipients in example.test validated; throttle: 3
    failures in a 3 s window, no delay.
    """
    port, admin = free_ports(2)
    config = (
        gateway_toml(admin)
        + _domain("example.test", validate=True)
        + _directory_toml("active-directory", samba_dc.ldaps_url, samba_dc.ca_file, A.BASE_DN,
                          A.SERVICE_DN)
        + _connector(port, grant="relay-users", extra=(
            'auth_throttle = { max_failures = 3, window = "3s", delay = "0s", max_delay = "0s" }'
        ))
    )  # fmt: skip
    return _run(gateways, module_workdir / "ad", config, [port],
                bind_password=A.SERVICE_PASSWORD)


@pytest.fixture(scope="module")
def users_gw(gateways: list[RelaygwProcess], module_workdir: Path) -> Gateway:
    """
    Gateway on its users file (none yet: tests add users with the real
    command), a STARTTLS connector and an implicit-TLS one; grant to the
    group "SMTP Relay Devices".
    """
    port, implicit, admin = free_ports(3)
    config = (
        gateway_toml(admin)
        + _domain("example.net", validate=False)
        + '\n[users]\nfile = "users"\n'
        + _connector(port, grant="SMTP Relay Devices", rights='"relay", "accept-any-sender"')
        + f"""
[[connectors]]
name = "Implicit"
bindings = ["127.0.0.1:{implicit}"]
remote_ranges = ["127.0.0.0/8"]
tls = "implicit"
certificate = "tls/submit.pem"
protocol_logging = "verbose"
permissions.anonymous = []
permissions.authenticated = ["submit"]
"""
    )
    return _run(gateways, module_workdir / "users", config, [port, implicit],
                cls=JsonLoggedGateway)


# -- helpers -------------------------------------------------------------------


def tls_session(port: int, source: str) -> LineClient:
    """A client after banner, EHLO, STARTTLS and EHLO again; EHLO must offer AUTH then."""
    client = LineClient(port, source=source)
    assert client.reply().code == 220
    assert client.command("EHLO client.e2e.test").code == 250
    assert client.command("STARTTLS").code == 220
    client.starttls(client_context())
    ehlo = client.command("EHLO client.e2e.test")
    assert ehlo.code == 250 and "AUTH PLAIN LOGIN" in ehlo.lines, ehlo
    return client


def pair(reply: Reply) -> tuple[int, str]:
    return reply.code, reply.text


def auth_plain(port: int, source: str, user: str, password: str) -> tuple[int, str]:
    """One AUTH PLAIN (initial response) in a fresh TLS session; its reply."""
    with tls_session(port, source) as client:
        return pair(client.command(f"AUTH PLAIN {plain_blob(user, password)}"))


def swaks_auth(gw: Gateway, source: str, mechanism: str, user: str, password: str,
               sender: str, to: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return swaks(
        gw.port, "--tls", "--auth", mechanism, "--auth-user", user, "--auth-password", password,
        "--from", sender, "--to", to, source=source,
    )  # fmt: skip


def relaygw_cli(
    captured: list[str], *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """The real console script of this environment; its output is kept for the secrets test."""
    done = subprocess.run(
        [str(RELAYGW), *args], input=stdin, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    captured.append(done.stdout + done.stderr)
    return done


def slapd_binds(server: S.Slapd, uid: str) -> int:
    """How many BIND operations as fixture user C{uid} slapd has logged."""
    log = (server.directory / "slapd.log").read_text(errors="replace")
    return log.count(f'BIND dn="{S.user_dn(uid)}" method=128')


# -- OpenLDAP over StartTLS ----------------------------------------------------


def test_ldap_starttls_swaks_plain_login(ldap_gw: Gateway, slapd: S.Slapd) -> None:
    """
    swaks --tls --auth PLAIN as an LDAP uid gets 235 2.7.0 and its message
    queued; the gateway talked to slapd through StartTLS.
    """
    result = swaks_auth(ldap_gw, "127.0.1.1", "PLAIN", "alice", "alicepw",
                        "alice@example.com", "bob@example.com")  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "<~  235 2.7.0 Authentication successful" in out, out
    assert SWAKS_QUEUED.search(out), out
    log = (slapd.directory / "slapd.log").read_text(errors="replace")
    assert "EXT oid=1.3.6.1.4.1.1466.20037" in log, log[-2000:]  # StartTLS


def test_ldap_wrong_password_swaks_login(ldap_gw: Gateway) -> None:
    """swaks --auth LOGIN with a wrong password gets 535 5.7.3 and nothing is queued."""
    result = swaks_auth(ldap_gw, "127.0.1.2", "LOGIN", "alice", WRONG,
                        "alice@example.com", "bob@example.com")  # fmt: skip
    out = result.stdout
    assert result.returncode != 0, out
    assert "<~* 535 5.7.3 Authentication unsuccessful" in out, out
    assert not SWAKS_QUEUED.search(out), out


def test_ldap_nested_group_grant(ldap_gw: Gateway) -> None:
    """
    carol, in team-c which is in relay-users, gets "relay" from the grant on
    relay-users; dan, in no granted group, does not.
    """
    with tls_session(ldap_gw.port, "127.0.1.3") as client:
        assert pair(client.command(f"AUTH PLAIN {plain_blob('carol', 'carolpw')}")) == AUTH_OK
        assert client.command("MAIL FROM:<carol@example.org>").code == 250
        assert pair(client.command("RCPT TO:<someone@elsewhere.test>")) == (
            250, "2.1.5 Recipient OK")
    with tls_session(ldap_gw.port, "127.0.1.4") as client:
        assert pair(client.command(f"AUTH PLAIN {plain_blob('dan', 'danpw')}")) == AUTH_OK
        assert client.command("MAIL FROM:<dan@example.com>").code == 250
        assert pair(client.command("RCPT TO:<someone@elsewhere.test>")) == NO_RELAY


@pytest.mark.parametrize("user", ["*", ")(uid=*", "alice)(|(uid=*", "alice\\00", "*)(mail=*"])
def test_ldap_filter_injection_refused(ldap_gw: Gateway, user: str) -> None:
    """LDAP filter metacharacters in the login name never match anyone: 535 5.7.3."""
    assert auth_plain(ldap_gw.port, "127.0.1.5", user, "alicepw") == AUTH_FAILED


def test_nul_in_login_name_refused(ldap_gw: Gateway) -> None:
    """A NUL byte inside an AUTH LOGIN user name (PLAIN cannot carry one) gets 535 5.7.3."""
    with tls_session(ldap_gw.port, "127.0.1.9") as client:
        assert client.command("AUTH LOGIN").code == 334
        assert client.command(b64("alice\0")).code == 334
        assert pair(client.command(b64("alicepw"))) == AUTH_FAILED


def test_long_login_name_never_reaches_directory(ldap_gw: Gateway, slapd: S.Slapd) -> None:
    """
    A login name as long as a command line allows (1,400 characters) gets 535
    5.7.3 without a directory search for it.
    """
    name = "q" * 1400
    assert auth_plain(ldap_gw.port, "127.0.1.10", name, "alicepw") == AUTH_FAILED
    time.sleep(0.3)
    log = (slapd.directory / "slapd.log").read_text(errors="replace")
    assert "q" * 100 not in log


def test_throttle_answers_without_directory(ldap_gw: Gateway, slapd: S.Slapd) -> None:
    """
    After max_failures (3) failed logins for dan, the gateway answers 535
    without binding to slapd: ten wrong passwords and then the right one
    cause exactly three binds as dan.
    """
    before = slapd_binds(slapd, "dan")
    with tls_session(ldap_gw.port, "127.0.1.6") as client:
        for _ in range(10):
            assert pair(client.command(f"AUTH PLAIN {plain_blob('dan', WRONG)}")) == AUTH_FAILED
            assert client.command("NOOP").code == 250  # keeps the bad-command count low
        assert pair(client.command(f"AUTH PLAIN {plain_blob('dan', 'danpw')}")) == AUTH_FAILED
    time.sleep(0.3)  # slapd writes its log asynchronously
    assert slapd_binds(slapd, "dan") - before == 3


def test_throttle_per_ip_covers_other_users(ldap_gw: Gateway, slapd: S.Slapd) -> None:
    """Once an IP reached max_failures, another user's right password from it is 535, unasked."""
    before = slapd_binds(slapd, "bob")
    for user in ("nobody1", "nobody2", "nobody3"):
        assert auth_plain(ldap_gw.port, "127.0.1.7", user, WRONG) == AUTH_FAILED
    assert auth_plain(ldap_gw.port, "127.0.1.7", "bob", "bobpw") == AUTH_FAILED
    assert auth_plain(ldap_gw.port, "127.0.1.8", "bob", "bobpw") == AUTH_OK
    time.sleep(0.3)
    assert slapd_binds(slapd, "bob") - before == 1


# -- OpenLDAP over LDAPS, empty passwords, the directory going away --------------


def test_ldaps_login(ldaps_gw: Gateway) -> None:
    """AUTH against slapd over ldaps:// (certificate verified with ca_file) succeeds."""
    assert auth_plain(ldaps_gw.port, "127.0.2.1", "bob", "bobpw") == AUTH_OK


def test_empty_password_refused_before_bind(ldaps_gw: Gateway, risky_slapd: S.Slapd) -> None:
    """
    On a server where a DN with an empty password binds (as anonymous), AUTH
    with an empty password is still 535, and the gateway never tried that bind.
    """
    assert S.ldapwhoami(risky_slapd, S.user_dn("alice"), "").returncode == 0  # the danger is real
    before = slapd_binds(risky_slapd, "alice")
    assert auth_plain(ldaps_gw.port, "127.0.2.2", "alice", "") == AUTH_FAILED
    with tls_session(ldaps_gw.port, "127.0.2.3") as client:
        assert client.command("AUTH LOGIN").code == 334
        assert client.command(b64("alice")).code == 334
        assert pair(client.command("=")) == AUTH_FAILED
    time.sleep(0.3)
    assert slapd_binds(risky_slapd, "alice") == before


def test_directory_stopped_mid_run(ldaps_gw: Gateway, risky_slapd: S.Slapd) -> None:
    """
    With the directory stopped, AUTH gets 454 4.7.0 (not 535) and a
    recipient lookup in a validated domain gets a 4xx; a session
    authenticated before keeps its rights.
    """
    with tls_session(ldaps_gw.port, "127.0.2.4") as client:
        assert pair(client.command(f"AUTH PLAIN {plain_blob('bob', 'bobpw')}")) == AUTH_OK
        risky_slapd.stop()
        assert client.command("MAIL FROM:<bob@example.com>").code == 250
        rcpt = client.command("RCPT TO:<someone-new@example.com>")
        assert rcpt.code == 451 and rcpt.text.startswith("4."), rcpt
    assert auth_plain(ldaps_gw.port, "127.0.2.5", "alice", "alicepw") == AUTH_TEMPFAIL
    # A tempfail is not a failure: it does not feed the throttle.
    for _ in range(5):
        assert auth_plain(ldaps_gw.port, "127.0.2.5", "alice", "alicepw") == AUTH_TEMPFAIL


# -- Active Directory (Samba) ----------------------------------------------------


@pytest.mark.parametrize(
    ("mechanism", "login", "source"),
    [("PLAIN", "alice", "127.0.3.1"), ("LOGIN", "alice@example.test", "127.0.3.2"),
     ("PLAIN", "EXAMPLE\\alice", "127.0.3.3")],
    ids=["sAMAccountName", "UPN", "DOMAIN-backslash-user"],
)  # fmt: skip
def test_ad_logins(ad_gw: Gateway, mechanism: str, login: str, source: str) -> None:
    """swaks --tls --auth logs in to AD by sAMAccountName, UPN and DOMAIN\\user, and sends."""
    result = swaks_auth(ad_gw, source, mechanism, login, "alicepw",
                        "alice@example.test", "bob@example.test")  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "<~  235 2.7.0 Authentication successful" in out, out
    assert SWAKS_QUEUED.search(out), out


def test_ad_disabled_account_refused(ad_gw: Gateway) -> None:
    """dave is disabled in AD: his right password gets 535 5.7.3."""
    assert auth_plain(ad_gw.port, "127.0.3.4", "dave", "davepw") == AUTH_FAILED


def test_ad_wrong_password_refused(ad_gw: Gateway) -> None:
    """A wrong password for an AD user (by UPN) gets 535 5.7.3."""
    assert auth_plain(ad_gw.port, "127.0.3.5", "alice@example.test", WRONG) == AUTH_FAILED


def test_ad_nested_group_grant(ad_gw: Gateway) -> None:
    """
    bob, in team-b which is in relay-users, may relay (the grant on
    relay-users); svc-relay, in neither, may not.
    """
    with tls_session(ad_gw.port, "127.0.3.6") as client:
        assert pair(client.command(f"AUTH PLAIN {plain_blob('bob', 'bobpw')}")) == AUTH_OK
        assert client.command("MAIL FROM:<bob@example.test>").code == 250
        assert pair(client.command("RCPT TO:<partner@elsewhere.test>")) == (
            250, "2.1.5 Recipient OK")
    with tls_session(ad_gw.port, "127.0.3.7") as client:
        login = plain_blob("svc-relay", A.SERVICE_PASSWORD)
        assert pair(client.command(f"AUTH PLAIN {login}")) == AUTH_OK
        assert client.command("MAIL FROM:<>").code == 250
        assert pair(client.command("RCPT TO:<partner@elsewhere.test>")) == NO_RELAY


def test_ad_send_as(ad_gw: Gateway) -> None:
    """
    alice may send as her proxyAddresses alias; a sender that is not hers gets
    550 5.7.60.
    """
    with tls_session(ad_gw.port, "127.0.3.8") as client:
        assert pair(client.command(f"AUTH PLAIN {plain_blob('alice', 'alicepw')}")) == AUTH_OK
        assert pair(client.command("MAIL FROM:<Alice.Smith@example.test>")) == (
            250, "2.1.0 Sender OK")
        assert client.command("RSET").code == 250
        assert pair(client.command("MAIL FROM:<carol@elsewhere.test>")) == SEND_AS
        assert pair(client.command("MAIL FROM:<bob@example.test>")) == SEND_AS


def test_ad_anonymous_needs_auth(ad_gw: Gateway) -> None:
    """Without AUTH on a connector without anonymous submit, MAIL gets 530 5.7.57."""
    with tls_session(ad_gw.port, "127.0.3.9") as client:
        reply = client.command("MAIL FROM:<alice@example.test>")
        assert reply.code == 530 and reply.text.startswith("5.7.57 "), reply


def test_ad_validate_recipients(ad_gw: Gateway) -> None:
    """
    In the validated domain an unknown recipient gets 550 5.1.10; a known
    mail address and a proxyAddresses alias get 250.
    """
    with tls_session(ad_gw.port, "127.0.3.10") as client:
        assert pair(client.command(f"AUTH PLAIN {plain_blob('alice', 'alicepw')}")) == AUTH_OK
        assert client.command("MAIL FROM:<alice@example.test>").code == 250
        assert pair(client.command("RCPT TO:<nobody@example.test>")) == NOT_FOUND
        assert pair(client.command("RCPT TO:<bob@example.test>")) == (250, "2.1.5 Recipient OK")
        assert pair(client.command("RCPT TO:<alice.smith@example.test>")) == (
            250, "2.1.5 Recipient OK")


def test_ad_test_auth_command(ad_gw: Gateway, captured: list[str]) -> None:
    """
    relaygw test-auth (password on stdin) against AD prints bob's groups,
    nested ones included, and his rights on the connector.
    """
    done = relaygw_cli(captured, "test-auth", "-c", str(ad_gw.config), "bob", stdin="bobpw\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "authenticated: bob" in done.stdout
    assert "bob@example.test" in done.stdout
    assert A.dn("team-b") in done.stdout and A.dn("relay-users") in done.stdout, done.stdout
    assert re.search(r"Submission.*relay", done.stdout), done.stdout


def test_ad_throttle_protects_account_from_lockout(ad_gw: Gateway) -> None:
    """
    Ten wrong passwords for erin (AD locks after five) are all 535, but with
    the throttle at three the directory saw only three: once the throttle
    window has passed, erin's right password logs in (the account is not
    locked out).
    """
    source = "127.0.3.11"
    start = time.monotonic()
    with tls_session(ad_gw.port, source) as client:
        for _ in range(10):
            assert pair(client.command(f"AUTH PLAIN {plain_blob('erin', WRONG)}")) == AUTH_FAILED
            assert client.command("NOOP").code == 250
        throttled = pair(client.command(f"AUTH PLAIN {plain_blob('erin', 'erinpw')}"))
    elapsed = time.monotonic() - start
    assert elapsed < 2.5, f"the attempts took {elapsed:.1f}s, longer than the 3 s window"
    assert throttled == AUTH_FAILED  # right password, but throttled
    time.sleep(max(0.0, 3.2 - elapsed))
    assert auth_plain(ad_gw.port, source, "erin", "erinpw") == AUTH_OK


# -- the users file and the relaygw commands ------------------------------------


def test_user_add_then_auth_delivers_esmtpsa(users_gw: Gateway, captured: list[str]) -> None:
    """
    relaygw user add (password on stdin) writes a user the running gateway
    picks up; swaks --tls --auth LOGIN as it is accepted, and the delivered
    message's Received header says "with ESMTPSA" and names the TLS version
    and cipher.  The users file holds no password.
    """
    name, password = PRINTER
    done = relaygw_cli(captured, "user", "add", "-c", str(users_gw.config), name,
                       "--address", "printer1@example.net", "--group", "SMTP Relay Devices",
                       stdin=password + "\n")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    users = (users_gw.dir / "users").read_text()
    assert '"printer1"' in users and "scrypt$" in users and password not in users
    result = swaks(
        users_gw.port, "--tls", "--auth", "LOGIN", "--auth-user", name, "--auth-password",
        password, "--from", "printer1@example.net", "--to", "scans@example.net",
        source="127.0.4.1",
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "<~  235 2.7.0 Authentication successful" in out, out
    tls = re.search(r"^=== TLS started with cipher (TLSv[0-9.]+):([A-Z0-9_-]+):", out, re.M)
    assert tls and SWAKS_QUEUED.search(out), out
    mail = users_gw.dir / "var" / "mail"
    wait_until(lambda: maildir_messages(mail, "scans"), 20, what="delivery to scans")
    text = maildir_messages(mail, "scans")[0].read_text()
    assert " with ESMTPSA id " in text, text[:600]
    assert f"(version={tls.group(1)} cipher={tls.group(2)})" in text, text[:600]


def test_users_file_wrong_password(users_gw: Gateway) -> None:
    """A wrong password for a users-file account gets 535 5.7.3."""
    assert auth_plain(users_gw.port, "127.0.4.2", PRINTER[0], WRONG) == AUTH_FAILED


def test_auth_refused_before_starttls(users_gw: Gateway) -> None:
    """
    Without allow_plaintext_auth, EHLO before STARTTLS offers no AUTH and AUTH
    gets 504 5.7.4 (the credentials are not even checked).
    """
    with LineClient(users_gw.port, source="127.0.4.3") as client:
        assert client.reply().code == 220
        ehlo = client.command("EHLO client.e2e.test")
        assert ehlo.code == 250 and not any(line.startswith("AUTH") for line in ehlo.lines)
        reply = client.command(f"AUTH PLAIN {plain_blob(*PRINTER)}")
        assert pair(reply) == (504, "5.7.4 Unrecognized authentication type")


def test_auth_login_initial_response_quirk(users_gw: Gateway) -> None:
    """
    The device quirk "AUTH LOGIN <base64 user>" on one line: the gateway asks
    only for the password, then answers 235.
    """
    name, password = PRINTER
    with tls_session(users_gw.port, "127.0.4.4") as client:
        assert pair(client.command(f"AUTH LOGIN {b64(name)}")) == (334, b64("Password:"))
        assert pair(client.command(b64(password))) == AUTH_OK
        assert client.command("MAIL FROM:<anyone@anywhere.test>").code == 250


def test_auth_pipelined_with_ehlo_on_implicit_tls(users_gw: Gateway) -> None:
    """
    A client that sends AUTH before the EHLO reply has arrived (one segment,
    port 465 style) gets the full EHLO reply, then 235.
    """
    with LineClient(users_gw.implicit_port, source="127.0.4.5",
                    implicit_tls=client_context()) as client:  # fmt: skip
        assert client.reply().code == 220
        client.send(f"EHLO client.e2e.test\r\nAUTH PLAIN {plain_blob(*PRINTER)}\r\n".encode())
        ehlo = client.reply()
        assert ehlo.code == 250 and "AUTH PLAIN LOGIN" in ehlo.lines, ehlo
        assert pair(client.reply()) == AUTH_OK


def test_users_test_auth_then_delete(users_gw: Gateway, captured: list[str]) -> None:
    """
    relaygw test-auth shows the users-file account's address, group and
    rights; after relaygw user delete its login gets 535.
    """
    name, password = PRINTER
    config = str(users_gw.config)
    done = relaygw_cli(captured, "test-auth", "-c", config, name, stdin=password + "\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "printer1@example.net" in done.stdout and "SMTP Relay Devices" in done.stdout
    assert re.search(r"Submission.*accept-any-sender", done.stdout), done.stdout
    assert auth_plain(users_gw.port, "127.0.4.6", name, password) == AUTH_OK
    done = relaygw_cli(captured, "user", "delete", "-c", config, name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert auth_plain(users_gw.port, "127.0.4.6", name, password) == AUTH_FAILED


# -- secrets -------------------------------------------------------------------


def test_no_secret_in_any_file_or_output(
    module_workdir: Path, gateways: list[RelaygwProcess], captured: list[str]
) -> None:
    """
    After all the AUTH above, no file under any gateway's directory (twistd
    output with its protocol log, spool, logs, users file, delivered mail)
    and no command output holds a password used here, nor its base64 forms
    (the PLAIN message, the LOGIN password).  Only the directory bind
    password files, which are configuration, are exempt.
    """
    assert gateways, "no gateway ran"
    outputs = "\n".join(p.output() for p in gateways)
    assert "auth.result" in outputs  # AUTH was logged
    # ... and so were the AUTH commands, masked, in the verbose connectors' protocol logs.
    received = "".join(path.read_text(errors="replace") for path in
                       module_workdir.glob("*/var/log/ProtocolLog/SmtpReceive/RECV*.LOG"))
    assert "AUTH PLAIN ****" in received
    needles = sorted({form for user, pw in USED if pw for form in secret_forms(user, pw)})
    exempt = list(module_workdir.glob("*/ldap.secret"))
    leaks = files_containing([module_workdir], needles, exclude=exempt)
    assert not leaks, leaks
    for text in captured:
        for needle in needles:
            assert needle.decode() not in text, (needle, text)
