"""
The soak (issue 11, "Must show" 6), shared by C{bench/soak.py} (30 minutes
by default) and C{tests/e2e/test_soak_e2e.py} (about a minute).

A real gateway (two receiving processes and the delivery process) with an
anonymous connector and an AUTH connector on a users file (scrypt) relays
C{soak.test} to a L{FlakySMTP} downstream that drops connections and answers
4xx at random and refuses C{bounce-*} recipients; the queue retries after 1
and then every 2 seconds.  Client threads run sessions, anonymous or
authenticated, of one to three messages each, and leave at random: before
DATA, in the middle of DATA, or after the final dot without reading the
reply.  Each message carries a unique C{X-Soak-Id}.

At the end (load stopped, queue drained) the books must balance:

  - every message answered 250 is delivered exactly once to each of its
    recipients, except C{bounce-*} ones, which get exactly one DSN (to the
    message's sender, naming that recipient);
  - a message whose final-dot reply was never read ("maybe") is delivered
    at most once per recipient; one whose data was never finished, never;
  - the gateway's RSS (summed over its processes) and each process's open
    descriptors return to their level after the warm-up, within the stated
    tolerances.

Two options add session kinds (both off by default, the CI soak runs
neither).  C{tls}: part of the sessions run over TLS, on STARTTLS
connectors with a certificate (C{require_tls}, anonymous and AUTH) and on
an implicit-TLS connector (both kinds of session), the client verifying
the certificate; some leave right after the 220 to STARTTLS without a
handshake.  C{directory="slapd"}: the AUTH connectors authenticate against
a real OpenLDAP slapd (L{tests.servers.slapd}, over StartTLS, no login
cache: every login is a search and a bind) instead of the users file, the
fixture users sending as their C{mail} addresses (C{example.com} and
C{example.org} are then accepted domains routed downstream as well, so
that their DSNs are counted).  The books are the same for every kind.
"""

from __future__ import annotations

import base64
import random
import ssl
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import attrs

from relaygw.auth.usersfile import add_user
from tests.servers import slapd as S
from tests.servers.certs import self_signed
from tests.servers.flaky_smtp import Delivery, FaultRates, FlakySMTP
from tests.servers.ports import free_ports, wait_until
from tests.servers.procstats import tree_fds, tree_rss_each_kib, tree_rss_kib
from tests.servers.relaygw import RelaygwProcess
from tests.servers.smtp_clients import LineClient, client_context

__all__ = ["SoakResult", "run_soak", "soak_config"]

DOMAIN = "soak.test"
USERS = [(f"device{n}", f"pw-{n}-{uuid.uuid4().hex[:8]}") for n in range(4)]
#: The slapd fixture users the directory soak logs in as: (uid, password, mail).
DIRECTORY_USERS = [(uid, S.PASSWORDS[uid], mail) for uid, mail in (
    ("alice", "alice@example.com"), ("bob", "bob@example.com"),
    ("carol", "carol@example.org"), ("dan", "dan@example.com"))]  # fmt: skip
#: The directory users' domains, accepted so that their DSNs come downstream.
DIRECTORY_DOMAINS = ("example.com", "example.org")
DIRECTORIES = ("slapd",)
#: RSS the gateway may keep above its post-warm-up level once drained.
RSS_TOLERANCE_KIB = 30 * 1024
#: Descriptors a process may hold above its post-warm-up count (none: the
#: outbound cache and the sessions are gone once drained and idle).
FD_TOLERANCE = 0

_SOAK_ID = re.compile(rb"^X-Soak-Id: (\S+)", re.M)
_FINAL = re.compile(rb"^Final-Recipient: rfc822; ?(\S+)", re.M | re.I)


@attrs.frozen
class Ports:
    """The gateway's listening ports (the TLS ones 0 without C{tls})."""

    anon: int
    auth: int
    anon_tls: int = 0
    auth_tls: int = 0
    implicit: int = 0

    def listening(self) -> list[int]:
        return [p for p in (self.anon, self.auth, self.anon_tls, self.auth_tls, self.implicit)
                if p]  # fmt: skip


def soak_config(anon: int, auth: int, admin: int, downstream: int, *,
                tls: Ports | None = None, directory: str = "") -> str:  # fmt: skip
    """
    Two connectors (anonymous, AUTH on the users file) relaying soak.test
    downstream; with C{tls} (its ports), three TLS connectors as well; with
    C{directory} (its C{[directory]} table), AUTH on that directory instead
    of the users file, and the directory users' domains accepted.
    """
    return _base_config(anon, auth, admin, downstream, directory) + (
        _tls_connectors(tls) if tls else "")


def _base_config(anon: int, auth: int, admin: int, downstream: int, directory: str) -> str:
    store = directory or '\n[users]\nfile = "users"\n'
    more_domains = "".join(f"""
[[accepted_domains]]
domain = "{d}"
type = "internal-relay"
route = "flaky"
""" for d in (DIRECTORY_DOMAINS if directory else ()))
    return f"""
[gateway]
workers = 2
hostname = "gw.soak.test"
spool_dir = "var/spool"
log_dir = "var/log"
admin_listen = "127.0.0.1:{admin}"

[queue]
retry = ["1s", "2s"]
expire = "1h"
delay_warning = "0s"
{store}
[[accepted_domains]]
domain = "{DOMAIN}"
type = "internal-relay"
route = "flaky"
{more_domains}
[[routes]]
name = "flaky"
via = "smarthost"
smarthosts = ["127.0.0.1:{downstream}"]
tls = "off"
max_concurrency = 10

[[connectors]]
name = "Anonymous"
bindings = ["127.0.0.1:{anon}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit", "accept-authoritative-sender"]
message_rate_limit = "1000000/m"
max_connections_per_ip = 1000

[[connectors]]
name = "Devices"
bindings = ["127.0.0.1:{auth}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
allow_plaintext_auth = true
permissions.anonymous = []
permissions.authenticated = ["submit"]
message_rate_limit = "1000000/m"
max_connections_per_ip = 1000
"""


#: The connectors' certificate file (chain and key), relative to the gateway's directory.
CERTIFICATE = "tls/soak.pem"


def _tls_connectors(ports: Ports) -> str:
    common = f"""remote_ranges = ["127.0.0.0/8"]
certificate = "{CERTIFICATE}"
message_rate_limit = "1000000/m"
max_connections_per_ip = 1000
"""
    return f"""
[[connectors]]
name = "Anonymous TLS"
bindings = ["127.0.0.1:{ports.anon_tls}"]
tls = "starttls"
require_tls = true
permissions.anonymous = ["submit", "accept-authoritative-sender"]
{common}
[[connectors]]
name = "Devices TLS"
bindings = ["127.0.0.1:{ports.auth_tls}"]
tls = "starttls"
require_tls = true
permissions.anonymous = []
permissions.authenticated = ["submit"]
{common}
[[connectors]]
name = "Implicit"
bindings = ["127.0.0.1:{ports.implicit}"]
tls = "implicit"
permissions.anonymous = ["submit", "accept-authoritative-sender"]
permissions.authenticated = ["submit"]
{common}"""


def directory_config(server: S.Slapd) -> str:
    """C{[directory]} on C{server} (ldap:// with StartTLS, verified; no login cache)."""
    return f"""
[directory]
kind = "ldap"
servers = ["{server.ldap_url}"]
start_tls = true
ca_file = "{server.ca_file}"
bind_dn = "{S.SERVICE_DN}"
bind_password_file = "ldap.secret"
base_dn = "{S.BASE_DN}"
timeout = "10s"
cache_ttl = "0s"
"""


def _write_certificate(gw_dir: Path, ca: Path) -> None:
    """The connectors' self-signed certificate: C{ca} (clients), cert + key (gateway)."""
    key = ca.with_suffix(".key")
    self_signed(ca, key, "gw.soak.test", ["gw.soak.test", "127.0.0.1"])
    pem = gw_dir / CERTIFICATE
    pem.parent.mkdir(parents=True, exist_ok=True)
    pem.write_bytes(ca.read_bytes() + key.read_bytes())
    pem.chmod(0o600)
    key.unlink()


@attrs.frozen
class Setup:
    """What the client sessions need: ports, TLS context, accounts."""

    ports: Ports
    #: Verifies the connectors' certificate; C{None}: no TLS sessions.
    tls: ssl.SSLContext | None = None
    #: Authenticate against the directory's users rather than the users file.
    directory: bool = False


@attrs.define
class Book:
    """What the clients know about each message, by its soak id."""

    lock: threading.Lock = attrs.field(factory=threading.Lock)
    #: id -> (sender, recipients) for every message whose DATA got 250.
    acked: dict[str, tuple[str, list[str]]] = attrs.field(factory=dict)
    #: ids whose final dot was sent but whose reply was never read.
    maybe: dict[str, list[str]] = attrs.field(factory=dict)
    #: ids whose data the client never finished (or never began).
    never: set[str] = attrs.field(factory=set)
    #: other replies to the final dot (4xx from the gateway, if any).
    refused: Counter[str] = attrs.field(factory=Counter)
    sessions: int = 0
    auth_sessions: int = 0
    #: sessions by kind ("anonymous plain", "authenticated implicit", ...).
    kinds: Counter[str] = attrs.field(factory=Counter)
    tls_sessions: int = 0
    #: AUTH answered 235 by the directory (directory soak only).
    directory_logins: int = 0
    disconnects: Counter[str] = attrs.field(factory=Counter)
    errors: list[str] = attrs.field(factory=list)


@attrs.define
class SoakResult:
    """The figures of one run and what did not balance (empty: all good)."""

    seconds: float
    sessions: int
    auth_sessions: int
    acked: int
    acked_recipients: int
    maybe: int
    never: int
    refused: dict[str, int]
    disconnects: dict[str, int]
    delivered: int
    bounced: int
    duplicates: int
    faults: dict[str, int]
    rss_baseline_kib: int
    rss_peak_kib: int
    rss_after_kib: int
    fds_before: dict[int, int]
    fds_after: dict[int, int]
    problems: list[str]
    kinds: dict[str, int] = attrs.field(factory=dict)
    tls_sessions: int = 0
    directory_logins: int = 0
    #: User binds slapd logged during the load (directory soak only).
    directory_binds: int = 0
    #: Which options ran: "tls", "directory slapd".
    options: list[str] = attrs.field(factory=list)

    def report(self) -> str:
        extra = [
            f"  options: {', '.join(self.options)}; sessions by kind: {self.kinds}",
            f"  TLS sessions: {self.tls_sessions}; directory logins (235): "
            f"{self.directory_logins}, user binds slapd logged: {self.directory_binds}",
        ] if self.options else []
        return "\n".join([
            f"soak: {self.seconds:.0f} s of load, {self.sessions} sessions "
            f"({self.auth_sessions} authenticated)",
            *extra,
            f"  messages acknowledged (250): {self.acked} ({self.acked_recipients} recipients); "
            f"maybe (reply unread): {self.maybe}; never finished: {self.never}; "
            f"refused: {self.refused}",
            f"  client disconnects: {self.disconnects}",
            f"  downstream faults injected: {self.faults}",
            f"  delivered (message, recipient): {self.delivered}; bounced (DSN): {self.bounced}; "
            f"duplicates: {self.duplicates}",
            f"  gateway RSS: after warm-up {self.rss_baseline_kib} KiB, peak {self.rss_peak_kib} "
            f"KiB, drained {self.rss_after_kib} KiB (tolerance +{RSS_TOLERANCE_KIB} KiB)",
            f"  open descriptors per process: before {self.fds_before}, after {self.fds_after} "
            f"(tolerance +{FD_TOLERANCE})",
            f"  problems: {self.problems or 'none'}",
        ])


def _message(soak_id: str, sender: str, rcpts: list[str], rng: random.Random) -> bytes:
    lines = [f"X-Soak-Id: {soak_id}", f"From: <{sender}>", f"To: {', '.join(rcpts)}",
             f"Subject: soak {soak_id}", ""]
    lines += [f".line {n} " + "x" * rng.randrange(0, 200) for n in range(rng.randrange(1, 60))]
    return ("\r\n".join(lines) + "\r\n").encode().replace(b"\r\n.", b"\r\n..")


def _session(book: Book, rng: random.Random, setup: Setup) -> None:
    authenticated = rng.random() < 0.35
    if authenticated:
        if setup.directory:
            name, password, sender = rng.choice(DIRECTORY_USERS)
        else:
            name, password = rng.choice(USERS)
            sender = f"{name}@{DOMAIN}"
    else:
        sender = f"anon{rng.randrange(20)}@{DOMAIN}"
    # Without TLS no draw: the plain soak's sessions stay those of its seed.
    transport = rng.choice(("plain", "plain", "starttls", "starttls", "implicit")) if (
        setup.tls) else "plain"  # fmt: skip
    ports = setup.ports
    port = {"plain": ports.auth if authenticated else ports.anon,
            "starttls": ports.auth_tls if authenticated else ports.anon_tls,
            "implicit": ports.implicit}[transport]  # fmt: skip
    with book.lock:
        book.sessions += 1
        book.auth_sessions += authenticated
        book.tls_sessions += transport != "plain"
        book.kinds[f"{'authenticated' if authenticated else 'anonymous'} {transport}"] += 1
    client = LineClient(port, timeout=60,
                        implicit_tls=setup.tls if transport == "implicit" else None)
    try:
        assert client.reply().code == 220
        assert client.command("EHLO soak-client.test").code == 250
        if transport == "starttls":
            assert setup.tls is not None
            assert client.command("STARTTLS").code == 220
            if rng.random() < 0.03:  # leaves before the handshake
                with book.lock:
                    book.disconnects["after STARTTLS"] += 1
                return
            client.starttls(setup.tls)
            assert client.command("EHLO soak-client.test").code == 250
        if authenticated:
            blob = base64.b64encode(f"\0{name}\0{password}".encode()).decode()
            reply = client.command(f"AUTH PLAIN {blob}")
            assert reply.code == 235, reply
            if setup.directory:
                with book.lock:
                    book.directory_logins += 1
        for _ in range(rng.randrange(1, 4)):
            soak_id = f"soak-{uuid.uuid4().hex}"
            rcpts = [f"user{rng.randrange(50)}@{DOMAIN}" for _ in range(rng.randrange(1, 4))]
            if rng.random() < 0.08:
                rcpts.append(f"bounce-{rng.randrange(5)}@{DOMAIN}")
            rcpts = list(dict.fromkeys(rcpts))
            assert client.command(f"MAIL FROM:<{sender}>").code == 250
            for r in rcpts:
                reply = client.command(f"RCPT TO:<{r}>")
                assert reply.code == 250, reply
            fate = rng.random()
            if fate < 0.04:  # leaves before DATA
                with book.lock:
                    book.never.add(soak_id)
                    book.disconnects["before DATA"] += 1
                return
            assert client.command("DATA").code == 354
            data = _message(soak_id, sender, rcpts, rng)
            if fate < 0.08:  # leaves in the middle of DATA
                client.send(data[: len(data) // 2])
                with book.lock:
                    book.never.add(soak_id)
                    book.disconnects["mid-DATA"] += 1
                return
            client.send(data + b".\r\n")
            if fate < 0.12:  # leaves after the final dot, the reply unread
                with book.lock:
                    book.maybe[soak_id] = rcpts
                    book.disconnects["after the dot"] += 1
                return
            reply = client.reply()
            with book.lock:
                if reply.code == 250:
                    book.acked[soak_id] = (sender, rcpts)
                else:
                    book.refused[f"{reply.code} {reply.text}"] += 1
                    book.never.add(soak_id)
        client.command("QUIT")
    finally:
        client.close()


def _client_loop(book: Book, seed: int, until: float, setup: Setup) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        try:
            _session(book, rng, setup)
        except (AssertionError, OSError, ConnectionError, ValueError) as e:
            with book.lock:
                book.errors.append(repr(e))
            if len(book.errors) > 20:
                return
            time.sleep(0.1)


def _settle(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    wait_until(predicate, timeout, 0.2, what)


def run_soak(workdir: Path, seconds: float, *, clients: int = 6, seed: int = 1,
             rates: FaultRates = FaultRates(), drain_timeout: float = 180,
             log: Callable[[str], None] = print, tls: bool = False,
             directory: str | None = None) -> SoakResult:  # fmt: skip
    """
    Run the soak in C{workdir} for C{seconds} of load; the gateway (and
    slapd) are stopped afterwards.

    @param tls: part of the sessions over STARTTLS and implicit TLS.
    @param directory: C{"slapd"}: AUTH against a real slapd instead of the users file.
    """
    if directory not in (None, *DIRECTORIES):
        raise ValueError(f"unknown directory {directory!r}: one of {DIRECTORIES}")
    gw_dir = workdir / "gw"
    gw_dir.mkdir(parents=True, exist_ok=True)
    anon, auth, admin, anon_tls, auth_tls, implicit = free_ports(6)
    ports = Ports(anon, auth, *((anon_tls, auth_tls, implicit) if tls else ()))
    context = None
    if tls:
        _write_certificate(gw_dir, workdir / "soak-ca.pem")
        context = client_context(cafile=workdir / "soak-ca.pem")
    setup = Setup(ports, context, directory is not None)
    slapd = S.start_slapd(workdir / "slapd") if directory == "slapd" else None
    downstream = None
    try:
        downstream = FlakySMTP(rates, seed=seed).start()
        if slapd is not None:
            (gw_dir / "ldap.secret").write_text(S.SERVICE_PASSWORD + "\n")
        else:
            for name, password in USERS:
                add_user(gw_dir / "users", name, password, [f"{name}@{DOMAIN}"], ["Devices"])
        config = soak_config(anon, auth, admin, downstream.port, tls=ports if tls else None,
                             directory=directory_config(slapd) if slapd else "")
        options = (["tls"] if tls else []) + ([f"directory {directory}"] if directory else [])
        return _run(gw_dir, config, setup, downstream, slapd, seconds, clients=clients,
                    seed=seed, drain_timeout=drain_timeout, log=log, options=options)
    finally:
        if downstream is not None:
            downstream.stop()
        if slapd is not None:
            slapd.stop()


def _user_binds(slapd: S.Slapd | None) -> int:
    """User binds slapd has logged (its log is written asynchronously: a lower bound)."""
    if slapd is None:
        return 0
    log = (slapd.directory / "slapd.log").read_text(errors="replace")
    return sum(log.count(f'BIND dn="{S.user_dn(uid)}" method=128') for uid, _, _ in DIRECTORY_USERS)


def _run(gw_dir: Path, config: str, setup: Setup, downstream: FlakySMTP,
         slapd: S.Slapd | None, seconds: float, *, clients: int, seed: int,
         drain_timeout: float, log: Callable[[str], None],
         options: list[str]) -> SoakResult:  # fmt: skip
    gw = RelaygwProcess(gw_dir, config, ports=setup.ports.listening())
    spool = gw_dir / "var" / "spool"
    book = Book()
    try:
        gw.start()
        _settle(lambda: len(tree_fds(gw.pid)) == 3, 30,
                "the receiving worker and the delivery process")
        # Warm-up: every code path once (sessions of both kinds, retries,
        # bounces), drained, then the baseline.
        _client_loop(book, seed + 1000, time.monotonic() + 3, setup)
        _drain(spool, drain_timeout)
        book = Book()
        base_count = len(downstream.deliveries())
        time.sleep(6)  # idle outbound connections close after 5 s
        binds_before = _user_binds(slapd)
        rss_base, fds_before = tree_rss_kib(gw.pid), tree_fds(gw.pid)
        log(f"  after warm-up: RSS per process {tree_rss_each_kib(gw.pid)} KiB")
        peak = [rss_base]
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.5):
                peak[0] = max(peak[0], tree_rss_kib(gw.pid))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.monotonic()
        until = started + seconds
        threads = [threading.Thread(target=_client_loop, daemon=True,
                                    args=(book, seed + n, until, setup))
                   for n in range(clients)]
        for t in threads:
            t.start()
        next_note = started + 60
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            if time.monotonic() >= next_note:
                next_note += 60
                extra = (f" ({book.tls_sessions} TLS, {book.directory_logins} directory "
                         f"logins)" if options else "")
                log(f"  {time.monotonic() - started:.0f} s: {book.sessions} sessions{extra}, "
                    f"{len(book.acked)} acknowledged, {len(downstream.deliveries())} delivered, "
                    f"RSS {tree_rss_kib(gw.pid)} KiB")
        for t in threads:
            t.join(120)
        loaded = time.monotonic() - started
        _drain(spool, drain_timeout)
        time.sleep(6)
        stop.set()
        watcher.join(5)
        rss_after = tree_rss_kib(gw.pid)
        log(f"  drained: RSS per process {tree_rss_each_kib(gw.pid)} KiB")
        fds_after = tree_fds(gw.pid)
        deliveries = downstream.deliveries()[base_count:]
        result = _balance(book, deliveries, loaded, downstream.faults(), rss_base,
                          max(peak[0], rss_after), rss_after, fds_before, fds_after)
        result.options = options
        result.directory_binds = _user_binds(slapd) - binds_before
        if slapd is not None and result.directory_binds < book.directory_logins:
            time.sleep(1)  # slapd's log lags behind
            result.directory_binds = _user_binds(slapd) - binds_before
            if result.directory_binds < book.directory_logins:
                result.problems.append(
                    f"{book.directory_logins} directory logins but {result.directory_binds}"
                    " user binds in slapd's log")
        return result
    finally:
        gw.stop()


def _drain(spool: Path, timeout: float) -> None:
    """Wait until the spool holds no queue entry (twice in a row, 1 s apart)."""
    def empty() -> bool:
        return not any(p.suffix in (".msg", ".upd") for p in spool.rglob("*") if p.is_file())

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if empty():
            time.sleep(1)
            if empty():
                return
        time.sleep(0.5)
    raise TimeoutError(f"the queue did not drain in {timeout:.0f} s")


def _balance(book: Book, deliveries: list[Delivery], loaded: float, faults: Counter[str],
             rss_base: int, rss_peak: int, rss_after: int,
             fds_before: dict[int, int], fds_after: dict[int, int]) -> SoakResult:  # fmt: skip
    problems: list[str] = []
    got: Counter[tuple[str, str]] = Counter()  # (soak id, recipient) delivered
    dsns: Counter[tuple[str, str, str]] = Counter()  # (soak id, sender, failed recipient)
    for d in deliveries:
        ids = _SOAK_ID.findall(d.data)
        if not ids:
            problems.append(f"a delivery without a soak id: {d.data[:200]!r}")
            continue
        soak_id = ids[0].decode()
        if d.sender == "":  # a DSN: to the original sender, naming the failed recipients
            for failed in _FINAL.findall(d.data):
                for r in d.recipients:
                    dsns[(soak_id, r.lower(), failed.decode().lower())] += 1
        else:
            for r in d.recipients:
                got[(soak_id, r.lower())] += 1
    expected = 0
    for soak_id, (sender, rcpts) in book.acked.items():
        for r in rcpts:
            expected += 1
            if r.startswith("bounce-"):
                n = dsns.get((soak_id, sender.lower(), r.lower()), 0)
                if n != 1:
                    problems.append(f"{soak_id} to {r}: {n} DSN(s) to {sender}, not 1")
                if got.get((soak_id, r.lower())):
                    problems.append(f"{soak_id} delivered to refused {r}")
            elif got.get((soak_id, r.lower()), 0) != 1:
                problems.append(f"{soak_id} to {r}: delivered {got.get((soak_id, r.lower()), 0)}"
                                " times, not once")
    for soak_id, rcpts in book.maybe.items():
        for r in rcpts:
            if got.get((soak_id, r.lower()), 0) > 1:
                problems.append(f"maybe {soak_id} to {r}: delivered {got[(soak_id, r.lower())]}")
    for (soak_id, r), n in got.items():
        if soak_id in book.never:
            problems.append(f"{soak_id}, never finished by its client, delivered to {r}")
        elif soak_id not in book.acked and soak_id not in book.maybe:
            problems.append(f"{soak_id} delivered to {r} but never sent in this phase")
    if book.errors:
        problems.append(f"client errors: {book.errors[:5]}")
    if rss_after > rss_base + RSS_TOLERANCE_KIB:
        problems.append(f"RSS {rss_after} KiB after draining, baseline {rss_base} KiB")
    if set(fds_after) != set(fds_before):
        problems.append(f"processes changed: {sorted(fds_before)} -> {sorted(fds_after)}")
    for pid, n in fds_after.items():
        if n > fds_before.get(pid, 0) + FD_TOLERANCE:
            problems.append(f"process {pid}: {n} descriptors, {fds_before.get(pid)} before")
    duplicates = sum(n - 1 for n in got.values() if n > 1) + sum(n - 1 for n in dsns.values()
                                                                 if n > 1)
    return SoakResult(
        seconds=loaded, sessions=book.sessions, auth_sessions=book.auth_sessions,
        acked=len(book.acked), acked_recipients=expected, maybe=len(book.maybe),
        never=len(book.never), refused=dict(book.refused), disconnects=dict(book.disconnects),
        delivered=sum(got.values()), bounced=sum(dsns.values()), duplicates=duplicates,
        faults=dict(faults), rss_baseline_kib=rss_base, rss_peak_kib=rss_peak,
        rss_after_kib=rss_after, fds_before=fds_before, fds_after=fds_after, problems=problems,
        kinds=dict(book.kinds), tls_sessions=book.tls_sessions,
        directory_logins=book.directory_logins,
    )
