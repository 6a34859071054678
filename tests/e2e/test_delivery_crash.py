"""
kill -9 while relaying (issue 7, "Tests"): the delivery process killed in the
middle of a batch, and the whole gateway killed with a half-delivered
message.  After the restart every recipient is delivered at least once, and
a recipient whose delivery was recorded is not delivered again.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.e2e.conftest import Launch, Sinks, gateway_toml, smtp, spool_entries
from tests.servers.ports import free_ports, wait_until
from tests.servers.procs import child_pids, delivery_pids
from tests.servers.sink import SmtpSink

pytestmark = pytest.mark.e2e

MESSAGES = 120
SUBJECT = re.compile(rb"^Subject: (\S+)", re.M)
RCPT = re.compile(rb"^X-Rcpt-Args: <([^>]+)>", re.M)


def _config(port: int, admin: int, sink_a: int, sink_b: int) -> str:
    return gateway_toml(admin) + f"""
[[accepted_domains]]
domain = "a.test"
type = "internal-relay"
route = "a"

[[accepted_domains]]
domain = "b.test"
type = "internal-relay"
route = "b"

[[routes]]
name = "a"
via = "smarthost"
smarthosts = ["127.0.0.1:{sink_a}"]
tls = "off"

[[routes]]
name = "b"
via = "smarthost"
smarthosts = ["127.0.0.1:{sink_b}"]
tls = "off"

[[connectors]]
name = "Batch"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit"]
message_rate_limit = "100000/m"
max_connections_per_ip = 100
"""


def _received(sink: SmtpSink) -> list[tuple[str, str]]:
    """(subject, recipient) of every message the sink got, duplicates kept."""
    got = []
    for message in sink.messages():
        subject = SUBJECT.search(message)
        for rcpt in RCPT.findall(message):
            got.append((subject.group(1).decode() if subject else "?", rcpt.decode()))
    return got


def _send(port: int, subjects: list[str], rcpts: list[str]) -> None:
    client, code, _ = smtp(port)
    assert code == 220
    client.ehlo("batch.e2e.test")
    for subject in subjects:
        client.sendmail("batch@client.test", rcpts, f"Subject: {subject}\r\n\r\nx\r\n".encode())
    client.quit()


def test_delivery_process_killed_mid_batch(launch: Launch, sinks: Sinks, workdir: Path) -> None:
    """kill -9 of the delivery process during a batch: every recipient still arrives."""
    sink = sinks(workdir / "sink-a")
    port, admin, closed = free_ports(3)
    gw = launch(workdir / "gw", _config(port, admin, sink.port, closed), [port])
    subjects = [f"m{n}" for n in range(MESSAGES)]
    _send(port, subjects, ["x@a.test", "y@a.test"])
    wait_until(lambda: len(_received(sink)) >= 20, 30, interval=0.01, what="deliveries to start")
    [child] = delivery_pids(gw.pid)
    os.kill(child, signal.SIGKILL)
    # The gateway restarts its delivery process, which finds the rest in the spool.
    wait_until(lambda: not spool_entries(workdir / "gw" / "var" / "spool"), 60, interval=0.1,
               what="the spool to drain after the restart of the delivery process")
    got = set(_received(sink))
    missing = [(s, r) for s in subjects for r in ("x@a.test", "y@a.test") if (s, r) not in got]
    assert missing == []
    assert delivery_pids(gw.pid) != [child]


def test_recorded_delivery_is_not_repeated(launch: Launch, sinks: Sinks, workdir: Path) -> None:
    """
    One recipient delivered, the other deferred (its host down); kill -9 of
    gateway and delivery process; restart with the host up: the deferred one
    arrives, the delivered one is not sent again.
    """
    sink_a = sinks(workdir / "sink-a")
    port, admin, b_port = free_ports(3)
    config = _config(port, admin, sink_a.port, b_port)
    gw = launch(workdir / "gw", config, [port])
    _send(port, ["half"], ["x@a.test", "z@b.test"])
    wait_until(lambda: _received(sink_a) == [("half", "x@a.test")], 30, interval=0.05,
               what="the a.test recipient to be delivered")
    # The outcome is recorded right after the attempt: wait for the update file.
    spool = workdir / "gw" / "var" / "spool"
    wait_until(lambda: any(p.suffix == ".upd" for p in spool.rglob("*")), 30, interval=0.05,
               what="the recorded outcome (.upd)")
    children = child_pids(gw.pid)
    gw.kill9()
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sink_b = SmtpSink(workdir / "sink-b", b_port, dump=True).start()
    try:
        launch(workdir / "gw", config, [port])
        wait_until(lambda: _received(sink_b) == [("half", "z@b.test")], 30, interval=0.05,
                   what="the deferred recipient after the restart")
        wait_until(lambda: not spool_entries(spool), 30, interval=0.1, what="the spool to drain")
        assert _received(sink_a) == [("half", "x@a.test")]
    finally:
        sink_b.stop()

