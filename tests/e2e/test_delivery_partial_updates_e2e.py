"""
A delivery process killed -9 while it writes an envelope update leaves
C{queue/<id>.upd.tmp}: the delivery process the gateway respawns removes
them at its start (it holds the delivery lock, and the lock's holder is the
one writer of updates), and the queued messages are still delivered.
Before, they stayed until the next gateway start.

The moment of a real torn update (microseconds between open and rename) is
not caught reliably, so the test writes the leftovers itself, torn copies
of the entries' updates, right after the kill and before the respawn (the
gateway waits a second before it).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from relaygw.spool.control import Request, write_request
from tests.e2e.conftest import Launch, gateway_toml, smarthost_relay, smtp, spool_entries
from tests.servers.ports import free_ports, wait_until
from tests.servers.procs import delivery_pids, pid_alive
from tests.servers.scripted_smtp import ScriptedSMTP

pytestmark = pytest.mark.e2e

MESSAGES = 3
SUBJECT = re.compile(rb"^Subject: (u\d+)", re.M)


def test_respawned_delivery_removes_partial_updates(launch: Launch, workdir: Path) -> None:
    up = threading.Event()
    smarthost = ScriptedSMTP(lambda address: None if up.is_set() else "451 4.3.0 not yet").start()
    try:
        port, admin = free_ports(2)
        # An hour to the next attempt: no update rewrites a leftover by itself.
        head = gateway_toml(admin).replace('retry = ["1s", "2s"]', 'retry = ["1h"]')
        assert 'retry = ["1h"]' in head
        gw = launch(workdir / "gw", head + smarthost_relay(smarthost.port) + f"""
[[connectors]]
name = "D"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit"]
""", [port])
        spool = gw.workdir / "var" / "spool"
        queue = spool / "queue"
        client, code, _ = smtp(port)
        assert code == 220
        for n in range(MESSAGES):
            client.sendmail("a@client.test", ["b@example.test"], f"Subject: u{n}\r\n\r\nx\r\n")
        client.quit()
        wait_until(lambda: len(list(queue.glob("*.upd"))) == MESSAGES, 20,
                   what="every first attempt deferred and recorded (.upd)")
        [child] = delivery_pids(gw.pid)
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: not pid_alive(child), 10, interval=0.01, what="the child dead")
        for update in queue.glob("*.upd"):
            torn = update.read_bytes()
            (queue / (update.name + ".tmp")).write_bytes(torn[: len(torn) // 2])
        assert len(list(queue.glob("*.upd.tmp"))) == MESSAGES
        wait_until(lambda: delivery_pids(gw.pid) not in ([], [child]), 20,
                   what="the delivery process respawned")
        wait_until(lambda: not list(queue.glob("*.upd.tmp")), 20,
                   what="the partial updates removed by the respawned delivery process")
        wait_until(lambda: f"removed {MESSAGES} partial updates of an ended delivery process"
                   in gw.output(), 10, what="the removal logged")
        # The entries and their complete updates are intact: all delivered.
        up.set()
        write_request(spool, Request("retry"), time.time())
        wait_until(lambda: len([t for t in smarthost.transactions() if t.data]) == MESSAGES, 20,
                   what="the queued messages delivered after the respawn")
        wait_until(lambda: not spool_entries(spool), 10, what="the spool to drain")
        delivered = b"".join(t.data or b"" for t in smarthost.transactions())
        assert sorted(SUBJECT.findall(delivered)) == [f"u{n}".encode() for n in range(MESSAGES)]
        assert not list(queue.glob("*.tmp"))
    finally:
        smarthost.stop()
