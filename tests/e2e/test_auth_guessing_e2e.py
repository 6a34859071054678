"""
AUTH guessing spread over many connections, source addresses and login
names, against the real directories (issue 11): the real C{twistd -n
relaygw} in front of a Samba AD DC (tests/servers/samba_ad.py, its own copy
for this module) and an OpenLDAP slapd (tests/servers/slapd.py), with
C{max_failures = 3}; the last test runs three receiving processes
(C{workers = 3}) in front of slapd, the guesses spread over all three.

Each guess is its own connection from its own 127.x source address, all
through STARTTLS first and then released together (a barrier), so that
the AUTHs arrive at once.  What reached the directory is read from the
directory itself: AD's C{badPwdCount} (the domain locks an account after
L{A.LOCKOUT_THRESHOLD} = 5) and slapd's stats log of BIND operations.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ldap3 import MODIFY_REPLACE, Connection, Server, Tls

from tests.e2e.conftest import LOCAL_MAILDIR, Launch, gateway_toml
from tests.servers import samba_ad as A
from tests.servers import slapd as S
from tests.servers.dirtest import unavailable
from tests.servers.ports import free_ports, wait_until
from tests.servers.procstats import established, receiving_workers, socket_inodes
from tests.servers.relaygw import RelaygwProcess
from tests.servers.smtp_clients import LineClient, client_context, plain_blob, wait_for_banner

pytestmark = pytest.mark.e2e

MAX_FAILURES = 3
WORKERS = 3
WRONG = "Wr0ng-Guess-Qv8"
#: erin's login names in AD: sAMAccountName, DOMAIN\user, userPrincipalName,
#: and the mail address the test gives her (all one account).
ERIN_ALIASES = ("erin", "EXAMPLE\\erin", "erin@example.test", "erin.mail@example.test")
UF_LOCKOUT = 0x10


def _connector(port: int) -> str:
    return LOCAL_MAILDIR + f"""
[[connectors]]
name = "Submission"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "starttls"
certificate = "tls/submit.pem"
permissions.anonymous = []
permissions.authenticated = ["submit"]
auth_throttle = {{ max_failures = {MAX_FAILURES}, window = "10m", delay = "0s", max_delay = "0s" }}
"""


def _directory(kind: str, url: str, ca: Path, base: str, bind: str) -> str:
    return f"""
[directory]
kind = "{kind}"
servers = ["{url}"]
start_tls = true
ca_file = "{ca}"
bind_dn = "{bind}"
bind_password_file = "ldap.secret"
base_dn = "{base}"
timeout = "5s"
cache_ttl = "0s"
"""


def _gateway(launch: Launch, workdir: Path, directory: str, password: str,
             workers: int = 1) -> tuple[RelaygwProcess, int]:  # fmt: skip
    port, admin = free_ports(2)
    workdir.mkdir()
    (workdir / "ldap.secret").write_text(password + "\n")
    proc = launch(workdir, gateway_toml(admin, workers=workers) + directory + _connector(port),
                  [port])  # fmt: skip
    wait_until(lambda: proc.output().count("relaygw ready") == workers, 30,
               what=f"{workers} receiving process(es) ready")
    wait_for_banner(port)
    return proc, port


def guess_at_once(port: int, guesses: Sequence[tuple[str, str, str]],
                  at_barrier: Callable[[], None] | None = None) -> list[int]:  # fmt: skip
    """
    One connection per C{(source, user, password)}: banner, EHLO, STARTTLS,
    EHLO on each, then every AUTH PLAIN sent together; the reply codes.
    C{at_barrier} runs once every connection is ready, before the AUTHs.
    """
    barrier = threading.Barrier(len(guesses), action=at_barrier, timeout=60)

    def one(source: str, user: str, password: str) -> int:
        with LineClient(port, source=source, timeout=60) as client:
            assert client.reply().code == 220
            assert client.command("EHLO guess.e2e.test").code == 250
            assert client.command("STARTTLS").code == 220
            client.starttls(client_context())
            assert client.command("EHLO guess.e2e.test").code == 250
            barrier.wait()
            return client.command(f"AUTH PLAIN {plain_blob(user, password)}").code

    with ThreadPoolExecutor(max_workers=len(guesses)) as pool:
        return list(pool.map(lambda g: one(*g), guesses))


def _who_holds(port: int, processes: set[int], holders: list[set[int]]) -> Callable[[], None]:
    """A barrier action: adds to C{holders} which of C{processes} hold a connection to C{port}."""

    def record() -> None:
        open_ends = established(port)
        holders.append({pid for pid in processes if socket_inodes(pid) & open_ends})

    return record


def source(i: int) -> str:
    return f"127.0.{60 + i // 200}.{i % 200 + 1}"


def auth_once(port: int, src: str, user: str, password: str) -> int:
    return guess_at_once(port, [(src, user, password)])[0]


# -- Active Directory ----------------------------------------------------------------


@pytest.fixture(scope="module")
def samba_dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[A.SambaDC]:
    """This module's own DC (the test changes erin and counts her bad passwords)."""
    unavailable(A.samba_unavailable())
    ip = A.pick_ip()
    template = A.provision_template(tmp_path_factory.mktemp("guess-samba-template"), ip)
    dc = A.start_dc(template, tmp_path_factory.mktemp("guess-samba-dc"), ip)
    yield dc
    dc.stop()


def _admin(dc: A.SambaDC) -> Connection:
    server = Server(dc.ip, port=636, use_ssl=True,
                    tls=Tls(ca_certs_file=str(dc.ca_file), validate=ssl.CERT_REQUIRED), get_info="NO_INFO")
    return Connection(server, user=f"CN=Administrator,CN=Users,{A.BASE_DN}",
                      password=A.ADMIN_PASSWORD, auto_bind=True, raise_exceptions=True)


def erin_state(dc: A.SambaDC, cn: str = "erin") -> dict[str, int]:
    """badPwdCount, lockoutTime and the computed lockout bit of erin (or C{cn}), read over LDAPS."""
    with _admin(dc) as conn:
        conn.search(A.dn(cn), "(objectClass=user)", search_scope="BASE",
                    attributes=["badPwdCount", "lockoutTime",
                                "msDS-User-Account-Control-Computed"])  # fmt: skip
        assert conn.response
        raw = {k.lower(): v for k, v in conn.response[0]["raw_attributes"].items()}

    def number(name: str) -> int:
        values = raw.get(name.lower()) or [b"0"]
        return int(values[0])

    return {"badPwdCount": number("badPwdCount"), "lockoutTime": number("lockoutTime"),
            "locked": number("msDS-User-Account-Control-Computed") & UF_LOCKOUT}  # fmt: skip


def test_ad_guesses_spread_over_sources_and_aliases_never_lock_the_account(
    module_launch: Launch, module_workdir: Path, samba_dc: A.SambaDC
) -> None:
    """
    40 wrong passwords for erin at once, from 10 source addresses under her
    4 login names (AD locks her after 5): every reply is 535 or 454, AD
    counted at most max_failures (3) bad passwords, she is not locked out,
    her right password still binds, and the gateway now refuses her
    (throttled) without asking AD.
    """
    with _admin(samba_dc) as conn:
        assert conn.modify(A.dn("erin"), {"mail": [(MODIFY_REPLACE, ["erin.mail@example.test"])]})
    assert erin_state(samba_dc)["badPwdCount"] == 0
    _, port = _gateway(module_launch, module_workdir / "ad",
                       _directory("active-directory", samba_dc.ldaps_url, samba_dc.ca_file,
                                  A.BASE_DN, A.SERVICE_DN), A.SERVICE_PASSWORD)  # fmt: skip
    guesses = [(source(i), alias, WRONG) for i in range(10) for alias in ERIN_ALIASES]
    codes = Counter(guess_at_once(port, guesses))
    state = erin_state(samba_dc)
    print(f"AD: {len(guesses)} guesses, replies {dict(codes)}, erin {state}")
    assert set(codes) <= {535, 454} and sum(codes.values()) == 40, codes
    assert 1 <= state["badPwdCount"] <= MAX_FAILURES, state
    assert state["locked"] == 0 and state["lockoutTime"] == 0, state
    # Her right password, through the gateway, under each name: throttled, AD not asked.
    for i, alias in enumerate(ERIN_ALIASES):
        assert auth_once(port, source(100 + i), alias, A.PASSWORDS["erin"]) == 535
    assert erin_state(samba_dc) == state
    # ... while AD itself still takes it: the account works.
    with _admin(samba_dc) as conn:
        user = Connection(conn.server, user=A.dn("erin"), password=A.PASSWORDS["erin"])
        assert user.bind(), user.result
        user.unbind()


def test_ad_guesses_spread_over_receiving_processes_never_lock_the_account(
    module_launch: Launch, module_workdir: Path, samba_dc: A.SambaDC
) -> None:
    """
    C{workers = 3}: 60 wrong passwords for bob at once, from 20 sources
    under his 3 login names, spread over the three receiving processes: AD
    counted at most max_failures (3) bad passwords (it locks after 5), bob
    is not locked out, and his right password is then 535 without a bind.
    """
    assert erin_state(samba_dc, "bob")["badPwdCount"] == 0
    gw, port = _gateway(module_launch, module_workdir / "ad-workers",
                        _directory("active-directory", samba_dc.ldaps_url, samba_dc.ca_file,
                                   A.BASE_DN, A.SERVICE_DN), A.SERVICE_PASSWORD,
                        workers=WORKERS)  # fmt: skip
    processes = {gw.pid, *receiving_workers(gw.pid)}
    assert len(processes) == WORKERS
    holders: list[set[int]] = []
    names = ("bob", "EXAMPLE\\bob", "bob@example.test")
    guesses = [(source(200 + i), name, WRONG) for i in range(20) for name in names]
    codes = Counter(guess_at_once(port, guesses, at_barrier=_who_holds(port, processes, holders)))
    state = erin_state(samba_dc, "bob")
    print(f"AD, {WORKERS} workers: {len(guesses)} guesses for bob, replies {dict(codes)}, "
          f"bob {state}, held by {len(holders[0])} processes")
    assert holders == [processes], "the guesses did not reach every process"
    assert set(codes) <= {535, 454} and sum(codes.values()) == len(guesses), codes
    assert 1 <= state["badPwdCount"] <= MAX_FAILURES, state
    assert state["locked"] == 0 and state["lockoutTime"] == 0, state
    assert auth_once(port, source(280), "bob", A.PASSWORDS["bob"]) == 535
    assert erin_state(samba_dc, "bob") == state


# -- OpenLDAP ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S.Slapd]:
    unavailable(S.slapd_unavailable())
    server = S.start_slapd(tmp_path_factory.mktemp("guess-slapd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ldap_port(module_launch: Launch, module_workdir: Path, slapd: S.Slapd) -> int:
    _, port = _gateway(module_launch, module_workdir / "ldap",
                       _directory("ldap", slapd.ldap_url, slapd.ca_file, S.BASE_DN, S.SERVICE_DN),
                       S.SERVICE_PASSWORD)  # fmt: skip
    return port


def user_binds(server: S.Slapd, *uids: str) -> int:
    """BIND operations slapd has logged for the fixture users C{uids}."""
    log = (server.directory / "slapd.log").read_text(errors="replace")
    return sum(log.count(f'BIND dn="{S.user_dn(uid)}" method=128') for uid in uids)


def settled_binds(server: S.Slapd, *uids: str) -> int:
    """L{user_binds} once slapd's log (written asynchronously) has stopped growing."""
    seen, deadline = -1, time.monotonic() + 5
    while time.monotonic() < deadline:
        now = user_binds(server, *uids)
        if now == seen:
            return now
        seen = now
        time.sleep(0.3)
    return seen


def test_ldap_guesses_for_one_user_from_many_sources(ldap_port: int, slapd: S.Slapd) -> None:
    """
    30 wrong passwords for dan at once, from 10 sources under his uid, its
    upper case and his mail: slapd saw at most max_failures binds as dan;
    all 30 got 535 (or 454).
    """
    before = settled_binds(slapd, "dan")
    names = ("dan", "DAN", "dan@example.com")
    guesses = [(source(200 + i), name, WRONG) for i in range(10) for name in names]
    codes = Counter(guess_at_once(ldap_port, guesses))
    binds = settled_binds(slapd, "dan") - before
    print(f"slapd, one user: {len(guesses)} guesses, replies {dict(codes)}, binds as dan {binds}")
    assert set(codes) <= {535, 454} and sum(codes.values()) == 30, codes
    assert 1 <= binds <= MAX_FAILURES


def test_ldap_guesses_for_many_users_from_one_source(ldap_port: int, slapd: S.Slapd) -> None:
    """
    12 wrong passwords at once from one address, for alice, bob and carol
    (uid and mail each): at most max_failures user binds reached slapd in
    all, and the right password of a fourth user from there is 535 too.
    """
    users = ("alice", "bob", "carol")
    before = settled_binds(slapd, *users)
    names = ("alice", "alice@example.com", "bob", "bob@example.com", "carol",
             "carol@example.org")  # fmt: skip
    guesses = [("127.0.70.1", name, WRONG) for name in names for _ in range(2)]
    codes = Counter(guess_at_once(ldap_port, guesses))
    binds = settled_binds(slapd, *users) - before
    print(f"slapd, one source: {len(guesses)} guesses, replies {dict(codes)}, user binds {binds}")
    assert set(codes) <= {535, 454} and sum(codes.values()) == 12, codes
    assert 1 <= binds <= MAX_FAILURES
    assert auth_once(ldap_port, "127.0.70.1", "dup1", S.PASSWORDS["dup1"]) == 535
    assert settled_binds(slapd, "dup1") == 0


#: The fixture users' login names: uid, upper-case uid, mail (one account each).
NAMES = {"alice": ("alice", "ALICE", "alice@example.com"), "bob": ("bob", "BOB", "bob@example.com"),
         "carol": ("carol", "CAROL", "carol@example.org"), "dan": ("dan", "DAN", "dan@example.com")}


def test_ldap_guesses_spread_over_receiving_processes(
    module_launch: Launch, module_workdir: Path, slapd: S.Slapd
) -> None:
    """
    C{workers = 3}, four rounds (one user each): 60 wrong passwords for the
    user at once, from 20 sources under three of its names, held by all
    three receiving processes (checked before the AUTHs go): slapd saw at
    most max_failures binds as the user (the gateway process admits every
    check; with each process deciding alone, 4 or 5 in half the rounds),
    and the user's right password is then 535 unbound.
    """
    gw, port = _gateway(module_launch, module_workdir / "ldap-workers",
                        _directory("ldap", slapd.ldap_url, slapd.ca_file, S.BASE_DN,
                                   S.SERVICE_DN), S.SERVICE_PASSWORD, workers=WORKERS)  # fmt: skip
    processes = {gw.pid, *receiving_workers(gw.pid)}
    assert len(processes) == WORKERS
    found: dict[str, int] = {}
    for round_, (uid, names) in enumerate(NAMES.items()):
        holders: list[set[int]] = []
        before = settled_binds(slapd, uid)
        guesses = [(source(300 + round_ * 25 + i), name, WRONG) for i in range(20) for name in names]
        codes = Counter(guess_at_once(port, guesses,
                                      at_barrier=_who_holds(port, processes, holders)))
        found[uid] = settled_binds(slapd, uid) - before
        print(f"slapd, {WORKERS} workers: {len(guesses)} guesses for {uid}, replies {dict(codes)}, "
              f"binds {found[uid]}, held by {len(holders[0])} processes")
        assert holders == [processes], "the guesses did not reach every process"
        assert set(codes) <= {535, 454} and sum(codes.values()) == len(guesses), codes
        assert auth_once(port, source(290 - round_), uid, S.PASSWORDS[uid]) == 535
    assert all(1 <= binds <= MAX_FAILURES for binds in found.values()), found
