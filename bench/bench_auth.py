"""
Benchmark: AUTH PLAIN over STARTTLS against a real slapd, login cache cold and
warm, and the TLS handshake rate against C{openssl s_server}, in one run
(issue 3, "Performance").

It starts, on loopback:
 1. slapd (C{tests/servers/slapd.py}: fixture users, StartTLS, its own CA);
 2. two real C{twistd -n relaygw} processes of this interpreter's
    environment, each with one STARTTLS+AUTH connector and an C{ldap}
    C{[directory]} (C{ldap://} + C{start_tls}, C{ca_file} = slapd's
    certificate): one with C{cache_ttl = "0s"} (COLD: every login is a
    service bind, a user search, a group search and a user bind at slapd,
    over a fresh StartTLS connection), one with C{cache_ttl = "5m"} (WARM:
    every user logged in once before the measurement);
 3. C{openssl s_server -www} on the same certificate and the same TLS
    settings as relaygw's connector (minimum TLS 1.2, no session cache, no
    tickets, server cipher preference): the handshake ceiling.

Load: C{--sessions} client processes (smtplib and the ssl module, the same
client code for every target) loop until C{--seconds} have passed or
C{--max-ops} operations are done, whichever comes first:
  - login: connect, EHLO, STARTTLS, EHLO, AUTH PLAIN, QUIT; a login counts
    when AUTH got 235.  The AUTH step's own latency is reported apart from
    the STARTTLS step (command + TLS handshake);
  - relaygw handshake: connect, banner, EHLO, STARTTLS + handshake, QUIT;
  - s_server handshake: connect, TLS handshake, close.
Every client verifies the server certificate (the same CA file).  The four
measurements are interleaved for C{--rounds} rounds (order alternating); the
summary gives the medians, the relaygw / s_server handshake ratio per round,
and CPU milliseconds per operation of relaygw, slapd and s_server (absolute
rates move 25-50 % on the shared machine; ratios from one run do not).

Run with relaygw pip-installed in the interpreter's environment::

    .venv/bin/python bench/bench_auth.py [--sessions 8] [--seconds 5] [--rounds 2]

No pass/fail unless C{--check} with explicit figures (C{--min-cold},
C{--min-warm}, C{--min-tls-ratio}): then exit 1 when one is missed.  Exit 2
when the setup fails.
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import shutil
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers.certs import self_signed  # noqa: E402
from tests.servers.ports import free_ports, wait_for_ports  # noqa: E402
from tests.servers.procs import cpu_seconds, stop_process  # noqa: E402
from tests.servers.relaygw import RelaygwProcess, installed_problem  # noqa: E402
from tests.servers.slapd import (  # noqa: E402
    BASE_DN, PASSWORDS, SERVICE_DN, SERVICE_PASSWORD, Slapd, slapd_unavailable, start_slapd,
)

HOST = "127.0.0.1"
CLIENT_TIMEOUT = 15.0
# What relaygw's connector does (Twisted CertificateOptions as built by
# relaygw/listen/tls.py): minimum TLS 1.2, OP_NO_TICKET, session cache off,
# OP_CIPHER_SERVER_PREFERENCE; default TLS 1.3 suites and groups.
S_SERVER_TLS = ["-min_protocol", "TLSv1.2", "-no_ticket", "-no_cache", "-serverpref"]


def relaygw_config(port: int, admin: int, slapd: Slapd, cache_ttl: str, cert: Path) -> str:
    """One STARTTLS+AUTH connector; the directory is slapd over StartTLS."""
    return f"""
[gateway]
hostname = "gw.bench.test"
spool_dir = "var/spool"
log_dir = "var/log"
admin_listen = "127.0.0.1:{admin}"

[directory]
kind = "ldap"
servers = ["{slapd.ldap_url}"]
start_tls = true
ca_file = "{slapd.ca_file}"
bind_dn = "{SERVICE_DN}"
bind_password_file = "ldap.secret"
base_dn = "{BASE_DN}"
timeout = "5s"
cache_ttl = "{cache_ttl}"

[[connectors]]
name = "Submission"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "starttls"
certificate = "{cert}"
min_tls_version = "1.2"
auth_mechanisms = ["PLAIN"]
permissions.anonymous = []
permissions.authenticated = ["submit"]
protocol_logging = "none"
max_connections = 10000
max_connections_per_ip = 10000
"""


# -- client processes ------------------------------------------------------


def _context(cafile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _one(kind: str, port: int, context: ssl.SSLContext, token: str, rec: dict[str, Any]) -> bool:
    """One operation; appends its step latencies to C{rec}; True when it succeeded."""
    if kind == "raw":
        t0 = time.monotonic()
        with socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT) as raw:
            with context.wrap_socket(raw, server_hostname=HOST) as tls:
                rec["tls"].append(time.monotonic() - t0)
                rec["version"] = f"{tls.version()} {(tls.cipher() or ('?',))[0]}"
        return True
    client = smtplib.SMTP(HOST, port, timeout=CLIENT_TIMEOUT)
    try:
        client.ehlo("client.bench.test")
        t0 = time.monotonic()
        code, _ = client.starttls(context=context)
        if code != 220:
            rec["fail"][f"STARTTLS {code}"] += 1
            return False
        rec["tls"].append(time.monotonic() - t0)
        sock = client.sock
        if isinstance(sock, ssl.SSLSocket):
            rec["version"] = f"{sock.version()} {(sock.cipher() or ('?',))[0]}"
        if kind == "login":
            client.ehlo("client.bench.test")
            t0 = time.monotonic()
            code, _ = client.docmd("AUTH", f"PLAIN {token}")
            rec["auth"].append(time.monotonic() - t0)
            if code != 235:
                rec["fail"][f"AUTH {code}"] += 1
                return False
        client.quit()
    finally:
        client.close()
    return True


def _worker(kind: str, port: int, cafile: str, user: str, start: float, end: float,
            cap: int) -> dict[str, Any]:  # fmt: skip
    """A client process's loop; returns its counts and latencies (picklable)."""
    context = _context(cafile)
    token = base64.b64encode(f"\0{user}\0{PASSWORDS.get(user, '')}".encode()).decode()
    rec: dict[str, Any] = {"ok": 0, "fail": Counter(), "tls": [], "auth": [], "version": ""}
    time.sleep(max(0.0, start - time.monotonic()))
    done = 0
    while done < cap and time.monotonic() < end:
        done += 1
        try:
            if _one(kind, port, context, token, rec):
                rec["ok"] += 1
        except (OSError, smtplib.SMTPException) as e:
            rec["fail"][type(e).__name__] += 1
    rec["finished"] = time.monotonic()
    return rec


# -- measurements ----------------------------------------------------------


def _pctl(values: list[float], p: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return 1000 * values[0]
    return 1000 * statistics.quantiles(values, n=100, method="inclusive")[p - 1]


class Measure:
    """One named load against one port, and the processes whose CPU it costs."""

    def __init__(self, name: str, kind: str, port: int, pids: dict[str, int]) -> None:
        self.name, self.kind, self.port, self.pids = name, kind, port, pids
        self.runs: list[dict[str, Any]] = []

    def run(self, pool: Any, args: argparse.Namespace, cafile: str, deadline: float) -> dict[str, Any]:
        seconds = max(1.0, min(args.seconds, deadline - time.monotonic() - 5))
        users = args.users.split(",")
        cpu0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        start = time.monotonic() + 0.3
        cap = max(1, args.max_ops // args.sessions)
        jobs = [(self.kind, self.port, cafile, users[i % len(users)], start, start + seconds, cap)
                for i in range(args.sessions)]  # fmt: skip
        results = pool.starmap_async(_worker, jobs).get(timeout=seconds + 3 * CLIENT_TIMEOUT)
        elapsed = max(r["finished"] for r in results) - start
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in self.pids.items()}
        ok = sum(r["ok"] for r in results)
        fail: Counter[str] = sum((r["fail"] for r in results), Counter())
        tls = [x for r in results for x in r["tls"]]
        auth = [x for r in results for x in r["auth"]]
        run = {
            "rate": ok / elapsed, "ok": ok, "fail": dict(fail), "elapsed": elapsed,
            "tls": tls, "auth": auth,
            "version": next((r["version"] for r in results if r["version"]), "?"),
            "cpu_ms": {name: 1000 * c / max(ok, 1) for name, c in cpu.items()},
            "busy": {name: 100 * c / elapsed for name, c in cpu.items()},
        }  # fmt: skip
        self.runs.append(run)
        return run

    def median(self, key: str) -> float:
        return float(statistics.median(r[key] for r in self.runs))

    def pooled(self, key: str) -> list[float]:
        return [x for r in self.runs for x in r[key]]

    def cpu(self, name: str, key: str = "cpu_ms") -> float:
        return float(statistics.median(r[key][name] for r in self.runs))


def _line(run: dict[str, Any]) -> str:
    parts = [f"{run['rate']:7.1f}/s ({run['ok']} in {run['elapsed']:.1f} s)"]
    if run["auth"]:
        parts.append(f"AUTH p50 {_pctl(run['auth'], 50):.1f} ms")
    parts.append(f"STARTTLS/handshake p50 {_pctl(run['tls'], 50):.1f} ms")
    if run["fail"]:
        parts.append(f"failures {run['fail']}")
    return ", ".join(parts)


def _start_s_server(root: Path, port: int, cert: Path, key: Path) -> subprocess.Popen[bytes]:
    with open(root / "s_server.out", "wb") as out:
        proc = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"{HOST}:{port}", "-cert", str(cert),
             "-key", str(key), "-www", "-quiet", *S_SERVER_TLS],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    wait_for_ports(HOST, [port], timeout=15, alive=lambda: proc.poll() is None)
    return proc


def _prime(port: int, cafile: str, users: list[str]) -> None:
    """One login per user on the warm gateway, so that its cache holds them."""
    context = _context(cafile)
    for user in users:
        token = base64.b64encode(f"\0{user}\0{PASSWORDS[user]}".encode()).decode()
        rec: dict[str, Any] = {"fail": Counter(), "tls": [], "auth": [], "version": ""}
        if not _one("login", port, context, token, rec):
            raise RuntimeError(f"priming login as {user} failed: {dict(rec['fail'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8, help="concurrent client processes")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--max-ops", type=int, default=20000, help="per measurement, at most")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--users", default="alice,bob,carol,dan", help="fixture users, rotated")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="whole benchmark")
    parser.add_argument("--check", action="store_true", help="exit 1 when a --min-* is missed")
    parser.add_argument("--min-cold", type=float, help="cold logins/s")
    parser.add_argument("--min-warm", type=float, help="warm logins/s")
    parser.add_argument("--min-tls-ratio", type=float, help="relaygw / s_server handshakes")
    args = parser.parse_args(argv)
    if args.check and (args.min_cold, args.min_warm, args.min_tls_ratio) == (None, None, None):
        parser.error("--check needs at least one of --min-cold, --min-warm, --min-tls-ratio")
    users = args.users.split(",")
    if unknown := [u for u in users if u not in PASSWORDS]:
        parser.error(f"not fixture users: {unknown}")

    problems = [p for p in (installed_problem(), slapd_unavailable()) if p]
    if shutil.which("openssl") is None:
        problems.append("openssl is missing (Debian package openssl)")
    if problems:
        print("bench_auth: cannot run: " + "; ".join(problems), file=sys.stderr)
        return 2

    deadline = time.monotonic() + args.max_seconds
    root = Path(tempfile.mkdtemp(prefix="relaygw-bench-auth-", dir="/tmp"))
    cert, key, pem = root / "cert.pem", root / "key.pem", root / "gw.pem"
    self_signed(cert, key, "gw.bench.test", ["gw.bench.test", HOST])
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    os.chmod(pem, 0o600)
    cold_port, warm_port, tls_port, admin1, admin2 = free_ports(5)
    slapd: Slapd | None = None
    s_server: subprocess.Popen[bytes] | None = None
    gateways: list[RelaygwProcess] = []
    pool = None
    try:
        slapd = start_slapd(root / "slapd")
        for name, port, admin, ttl in (("cold", cold_port, admin1, "0s"),
                                       ("warm", warm_port, admin2, "5m")):  # fmt: skip
            (root / name).mkdir()
            (root / name / "ldap.secret").write_text(SERVICE_PASSWORD + "\n")
            gw = RelaygwProcess(root / name, relaygw_config(port, admin, slapd, ttl, pem),
                                ports=[port])  # fmt: skip
            gateways.append(gw)
            gw.start()
        s_server = _start_s_server(root, tls_port, cert, key)
        assert slapd.process is not None
        slapd_pid = slapd.process.pid
        _prime(warm_port, str(cert), users)
        cold, warm = gateways
        measures = [
            Measure("s_server handshake", "raw", tls_port, {"s_server": s_server.pid}),
            Measure("relaygw handshake", "starttls", warm_port, {"relaygw": warm.pid}),
            Measure("login cold", "login", cold_port, {"relaygw": cold.pid, "slapd": slapd_pid}),
            Measure("login warm", "login", warm_port, {"relaygw": warm.pid, "slapd": slapd_pid}),
        ]
        print(f"bench_auth: {args.sessions} client processes, {args.rounds} rounds x "
              f"{args.seconds:g} s (at most {args.max_ops} operations) per measurement; "
              f"users {','.join(users)}; {os.cpu_count()} CPUs", flush=True)  # fmt: skip
        pool = multiprocessing.get_context("fork").Pool(args.sessions)
        ratios = []
        for r in range(args.rounds):
            for m in measures if r % 2 == 0 else measures[::-1]:
                if time.monotonic() > deadline - 10:
                    raise TimeoutError(f"--max-seconds {args.max_seconds:g} reached")
                print(f"round {r + 1}: {m.name:19} {_line(m.run(pool, args, str(cert), deadline))}",
                      flush=True)  # fmt: skip
            ratios.append(measures[1].runs[-1]["rate"] / measures[0].runs[-1]["rate"])
    except (RuntimeError, TimeoutError, OSError, multiprocessing.TimeoutError) as e:
        print(f"bench_auth: failed: {type(e).__name__}: {e}", file=sys.stderr)
        for gw in gateways:
            print(gw.output()[-2000:], file=sys.stderr)
        return 2
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for gw in gateways:
            gw.stop()
        if s_server is not None:
            stop_process(s_server, timeout=5)
        if slapd is not None:
            slapd.stop()
        shutil.rmtree(root, ignore_errors=True)

    s_srv, gw_tls, cold_m, warm_m = measures
    print()
    print(f"{'':28} {'rate/s':>8} {'AUTH p50/p90/p99 ms':>22} {'STARTTLS+handshake p50/p90/p99':>32}"
          f"  CPU ms per op (busy % of one CPU)")  # fmt: skip
    for m in measures:
        auth, tls = m.pooled("auth"), m.pooled("tls")
        a = "/".join(f"{_pctl(auth, p):.1f}" for p in (50, 90, 99)) if auth else "-"
        t = "/".join(f"{_pctl(tls, p):.1f}" for p in (50, 90, 99))
        cpu = ", ".join(f"{name} {m.cpu(name):.2f} ({m.cpu(name, 'busy'):.0f} %)" for name in m.pids)
        print(f"{m.name:28} {m.median('rate'):8.1f} {a:>22} {t:>32}  {cpu}")
    ratio = statistics.median(ratios)
    print(f"negotiated: s_server {s_srv.runs[-1]['version']}; relaygw {gw_tls.runs[-1]['version']}")
    print(f"TLS handshakes relaygw/s_server: {ratio:.2f} "
          f"(per round: {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"CPU per handshake s_server/relaygw: {s_srv.cpu('s_server') / gw_tls.cpu('relaygw'):.2f} "
          "(the rate ratio is capped by the clients' CPU when s_server is not busy)")
    print(f"logins warm/cold: {warm_m.median('rate') / cold_m.median('rate'):.1f}x")
    failures = {m.name: m.runs[-1]["fail"] for m in measures if any(r["fail"] for r in m.runs)}
    if failures:
        print(f"failures (last round): {failures}")

    missed = []
    if args.check:
        for label, got, want in (("cold logins/s", cold_m.median("rate"), args.min_cold),
                                 ("warm logins/s", warm_m.median("rate"), args.min_warm),
                                 ("TLS ratio", ratio, args.min_tls_ratio)):  # fmt: skip
            if want is not None and got < want:
                missed.append(f"{label} {got:.2f} < {want}")
    if missed:
        print("bench_auth: " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
