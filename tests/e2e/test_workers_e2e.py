"""
Receiving workers on a real gateway (issue 10: both cores for receiving).

With C{workers = 3} the twistd process spawns two receiving workers on its
sockets: concurrent sessions are served by more than one process, every
message reaches delivery and is counted once in the one tracking log and
the one C{/metrics}; SIGHUP reaches the workers (new banner from every
process), a worker killed with kill -9 is replaced, and SIGTERM stops them
all with exit status 0.
"""

from __future__ import annotations

import os
import signal
import smtplib
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Launch, gateway_toml, maildir_messages, smtp
from tests.servers.ports import free_ports, wait_until
from tests.servers.procstats import established, receiving_workers, socket_inodes

pytestmark = pytest.mark.e2e

SESSIONS = 30


def _config(port: int, admin: int, banner: str) -> str:
    return gateway_toml(admin, workers=3) + f"""
[[accepted_domains]]
domain = "example.test"
route = "local"

[[routes]]
name = "local"
via = "maildir"
maildir = "var/mail"

[[connectors]]
name = "Main"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
banner = "{{fqdn}} {banner}"
max_connections_per_ip = 100
"""


def _scrape(admin: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_workers_share_the_sockets(launch: Launch, workdir: Path) -> None:
    port, admin = free_ports(2)
    gw = launch(workdir / "gw", _config(port, admin, "one"), [port])
    wait_until(lambda: len(receiving_workers(gw.pid)) == 2, 20, what="two receiving workers")
    wait_until(lambda: gw.output().count("relaygw ready") == 3, 20,
               what="the parent and both workers to be ready")
    workers = receiving_workers(gw.pid)

    # Concurrent sessions, each in the middle of a transaction: who holds them?
    def opened(_: int) -> smtplib.SMTP:
        client, code, banner = smtp(port)
        assert code == 220 and b"one" in banner
        client.ehlo("printer.e2e.test")
        assert client.mail("printer@example.test")[0] == 250
        return client

    clients: list[smtplib.SMTP] = []
    try:
        # At once, as a load arrives: each process accepts while it is free.
        with ThreadPoolExecutor(10) as pool:
            clients = list(pool.map(opened, range(SESSIONS)))
        open_ends = established(port)
        holders = {pid for pid in [gw.pid, *workers] if socket_inodes(pid) & open_ends}
        assert len(holders) >= 2, f"all {SESSIONS} sessions in one process"
        for n, client in enumerate(clients):
            assert client.rcpt(f"user{n}@example.test")[0] == 250
            assert client.data(f"Subject: w{n}\r\n\r\nbody\r\n".encode())[0] == 250
            client.quit()
    finally:
        for client in clients:
            client.close()

    wait_until(lambda: len(maildir_messages(workdir / "gw" / "var" / "mail")) == SESSIONS, 30,
               what="every message delivered")

    def received() -> float:
        return _scrape(admin).get(
            ("relaygw_messages_received_total", (("connector", "Main"),)), 0.0)

    wait_until(lambda: received() == SESSIONS, 10, what="every message counted once")
    rows = Path(workdir / "gw" / "var" / "log" / "MessageTracking")
    wait_until(lambda: rows.is_dir() and sum(
        p.read_text().count(",RECEIVE,") for p in rows.iterdir()) == SESSIONS,
               10, what="one RECEIVE row per message")

    # SIGHUP reaches every worker: no process answers with the old banner.
    assert gw.config_path is not None
    gw.config_path.write_text(_config(port, admin, "two"))
    gw.send_signal(signal.SIGHUP)
    wait_until(lambda: gw.output().count("configuration reloaded") >= 3, 20,
               what="the parent and both workers to reload")
    assert receiving_workers(gw.pid) == workers  # the same sockets: the same workers
    for _ in range(20):
        client, code, banner = smtp(port)
        assert code == 220 and b"two" in banner, banner
        client.quit()

    # A worker killed is replaced; the gateway keeps serving meanwhile.
    os.kill(workers[0], signal.SIGKILL)
    def replaced() -> bool:
        now = receiving_workers(gw.pid)
        return len(now) == 2 and workers[0] not in now

    wait_until(replaced, 20, what="the killed worker replaced")
    for _ in range(5):
        client, code, _ = smtp(port)
        assert code == 220
        client.quit()

    last = receiving_workers(gw.pid)
    assert gw.stop(timeout=40) == 0
    time.sleep(0.2)
    assert not [pid for pid in last if Path(f"/proc/{pid}").exists()
                and "relaygw.receiver" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()]
