"""
A receiving worker killed -9 mid-DATA leaves partial spool entries
(C{queue/<id>.tmp}, a message over the 64 KiB write buffer): the gateway
removes them when the worker ends, by the pid tag in their ids, and never
touches the other processes' entries in progress (issue 11, "Must show" 4).
Before, they stayed until the next gateway start.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
from pathlib import Path

import pytest

from tests.e2e.conftest import Launch, gateway_toml, smarthost_relay
from tests.servers.ports import free_ports, wait_until
from tests.servers.procs import child_pids, delivery_pids
from relaygw.spool.ids import pid_tag
from tests.servers.scripted_smtp import ScriptedSMTP

pytestmark = pytest.mark.e2e

LINES = 1100  # 80-octet lines: 88 KiB, over the write buffer, so a .tmp exists in DATA


def _tag(name: str) -> str:
    return name[11:15]


def test_dead_workers_partials_removed(launch: Launch, workdir: Path) -> None:
    down = ScriptedSMTP(lambda address: None).start()
    try:
        port, admin = free_ports(2)
        gw = launch(workdir / "gw", gateway_toml(admin, workers=2) + smarthost_relay(down.port) + f"""
[[connectors]]
name = "D"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit"]
message_rate_limit = "100000/m"
""", [port])
        queue = gw.workdir / "var" / "spool" / "queue"
        socks: list[socket.socket] = []
        try:
            # Sessions mid-DATA until both the parent and the worker hold some.
            worker = [p for p in child_pids(gw.pid) if p not in delivery_pids(gw.pid)]
            assert len(worker) == 1, child_pids(gw.pid)
            tags = {pid_tag(gw.pid), pid_tag(worker[0])}
            for n in range(30):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.recv(1000)
                sock.sendall(b"EHLO partial.test\r\nMAIL FROM:<a@partial.test>\r\n"
                             b"RCPT TO:<b@example.test>\r\nDATA\r\n")
                got = b""
                while b"354 " not in got:
                    got += sock.recv(1000)
                sock.sendall(f"Subject: p{n}\r\n\r\n".encode() + (b"y" * 78 + b"\r\n") * LINES)
                socks.append(sock)
                wait_until(lambda: len(list(queue.glob("*.tmp"))) == len(socks), 10,
                           what="a .tmp per session")
                if {_tag(p.name) for p in queue.glob("*.tmp")} == tags:
                    break
            partial = {p.name for p in queue.glob("*.tmp")}
            theirs = {n for n in partial if _tag(n) == pid_tag(worker[0])}
            ours = partial - theirs
            assert theirs and ours, partial
            os.kill(worker[0], signal.SIGKILL)
            wait_until(lambda: not theirs & {p.name for p in queue.glob("*.tmp")}, 20,
                       what="the dead worker's partial entries removed")
            assert {p.name for p in queue.glob("*.tmp")} == ours  # the parent's untouched
            # The parent's sessions go on: each message ends and is queued.
            for sock in socks:
                try:
                    sock.sendall(b".\r\nQUIT\r\n")
                except OSError:
                    pass
            wait_until(lambda: len(down.transactions()) == len(ours), 30,
                       what="the parent's messages delivered")
        finally:
            for sock in socks:
                sock.close()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:  # still serving
            assert client.ehlo()[0] == 250
    finally:
        down.stop()
