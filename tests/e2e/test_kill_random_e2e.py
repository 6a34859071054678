"""
kill -9 at random points of receive and delivery (issue 11, "Must show" 4),
over many runs: while clients keep sending (small messages buffered in
memory and large ones written through to the spool during DATA), each run
kills one of the whole gateway (twistd and every child), one receiving
worker, or the delivery process, after a random delay, then waits for the
gateway to recover (restarted by the test, or the child by the gateway).

At the end every message that got a 250 has reached a real downstream
(Postfix's smtp-sink, dump on) at least once, no message whose final dot
was never sent has, and once the gateway is killed a last time and
restarted, the spool's directory holds no file that the queue does not
account for: after the queue drains, nothing at all (no C{.tmp} of a
message cut in DATA, no C{.upd} without its entry).

test_kill9.py (one kill of the whole gateway mid-batch, every ack checked)
and test_delivery_crash.py (the delivery process killed, recorded outcomes
not repeated) cover the single cases; this one draws the points at random.
bench/kill9_soak.py runs it for longer.
"""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

import attrs
import pytest

from tests.e2e.conftest import Launch, Sinks, gateway_toml, smarthost_relay
from tests.servers.ports import free_ports, wait_until
from tests.servers.procs import child_pids, delivery_pids
from tests.servers.relaygw import RelaygwProcess
from tests.servers.sink import SmtpSink

pytestmark = pytest.mark.e2e

#: Kill runs in CI (bench/kill9_soak.py takes --runs).
RUNS = 15
CLIENTS = 4
BIG = 80 * 1024  # over the spool's 64 KiB write buffer: a .tmp exists during DATA
SUBJECT = re.compile(rb"^Subject: (\S+)", re.M)


def config(port: int, admin: int, sink: int) -> str:
    """Two receiving processes, relaying to the sink."""
    return gateway_toml(admin, workers=2) + f"""
{smarthost_relay(sink)}

[[connectors]]
name = "Devices"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit"]
message_rate_limit = "100000/m"
max_connections_per_ip = 100
"""


@attrs.define
class Ledger:
    """What the clients saw, per subject (thread-safe)."""

    lock: threading.Lock = attrs.field(factory=threading.Lock)
    acked: set[str] = attrs.field(factory=set)
    maybe: set[str] = attrs.field(factory=set)  # final dot sent, no reply
    unfinished: set[str] = attrs.field(factory=set)  # final dot never sent
    stage: dict[int, str] = attrs.field(factory=dict)  # client -> where it is now
    errors: list[str] = attrs.field(factory=list)

    def stages(self) -> Counter[str]:
        with self.lock:
            return Counter(self.stage.values())


def _body(subject: str, size: int) -> tuple[bytes, bytes]:
    head = f"Subject: {subject}\r\nMessage-ID: <{subject}@client.e2e.test>\r\n\r\n".encode()
    line = b"kill -9 at random, padding padding padding padding padding padding pad\r\n"
    body = line * max(1, size // len(line))
    return head + body[: len(body) // 2], body[len(body) // 2 :]


def _client(port: int, cid: int, ledger: Ledger, stop: threading.Event, rng: random.Random) -> None:
    """Send messages until C{stop}, reconnecting after every break."""
    n = 0
    while not stop.is_set():
        def at(stage: str) -> None:
            with ledger.lock:
                ledger.stage[cid] = stage

        at("connect")
        try:
            client = smtplib.SMTP("127.0.0.1", port, timeout=10)
            client.ehlo(f"client{cid}.e2e.test")
        except (OSError, smtplib.SMTPException):
            stop.wait(0.05)
            continue
        try:
            while not stop.is_set():
                subject = f"kr-{cid}-{n:05d}"
                n += 1
                at("envelope")
                if client.docmd("MAIL", "FROM:<device@client.e2e.test>")[0] != 250:
                    break
                if client.docmd("RCPT", f"TO:<u{cid}@example.test>")[0] != 250:
                    break
                if client.docmd("DATA")[0] != 354:
                    break
                with ledger.lock:
                    ledger.unfinished.add(subject)
                    ledger.stage[cid] = "data"
                first, second = _body(subject, BIG if rng.random() < 0.3 else 1024)
                client.send(first)
                stop.wait(rng.random() * 0.01)
                client.send(second)
                with ledger.lock:
                    ledger.unfinished.discard(subject)
                    ledger.maybe.add(subject)
                    ledger.stage[cid] = "dot"
                client.send(b".\r\n")
                code, text = client.getreply()
                with ledger.lock:
                    ledger.maybe.discard(subject)
                    if code == 250:
                        ledger.acked.add(subject)
                    elif code != 421:  # 421: the gateway is going away
                        ledger.errors.append(f"{subject}: {code} {text!r}")
                if code != 250:
                    break
        except (OSError, smtplib.SMTPException):
            pass
        finally:
            client.close()
    with ledger.lock:
        ledger.stage[cid] = "stopped"


def receiver_pids(gateway_pid: int) -> list[int]:
    """The gateway's receiving workers (children that are not the delivery process)."""
    delivery = set(delivery_pids(gateway_pid))
    return [p for p in child_pids(gateway_pid) if p not in delivery]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_gateway(gw: RelaygwProcess) -> None:
    """kill -9 twistd and each of its children (an orphan delivery process too)."""
    children = child_pids(gw.pid)
    gw.kill9()
    for pid in children:
        _kill(pid)
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") and _alive(p) for p in children),
               10, what="the gateway's children to die")  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _replace_child(gw: RelaygwProcess, pids: object, victim: int, what: str) -> None:
    assert callable(pids)
    _kill(victim)
    wait_until(lambda: victim not in pids(gw.pid) and len(pids(gw.pid)) >= 1, 30,
               interval=0.05, what=what)  # fmt: skip


def spool_orphans(spool: Path) -> list[str]:
    """Files in the queue directory that no committed entry accounts for."""
    queue = spool / "queue"
    names = {p.name for p in queue.iterdir()} if queue.exists() else set()
    entries = {n[: -len(".msg")] for n in names if n.endswith(".msg")}
    return sorted(n for n in names
                  if not n.endswith(".msg") and not (n.endswith(".upd") and n[:-4] in entries))  # fmt: skip


def delivered(sink: SmtpSink) -> Counter[str]:
    """Subjects received by the sink, with their counts (duplicates allowed: at least once)."""
    got: Counter[str] = Counter()
    for message in sink.messages():
        m = SUBJECT.search(message)
        if m:
            got[m.group(1).decode()] += 1
    return got


@attrs.define
class Soak:
    """The figures of one soak."""

    kills: Counter[str]
    stages_at_kill: Counter[str]
    acked: int
    maybe: int
    unfinished: int
    delivered: int
    duplicates: int
    orphans_before_drain: list[str]


def soak(gw: RelaygwProcess, port: int, sink: SmtpSink, runs: int, seed: int) -> Soak:
    """
    C{runs} kills at random points while the clients send; then a last
    kill of the whole gateway, a restart, the drain, and the checks.
    """
    rng = random.Random(seed)
    ledger = Ledger()
    stop = threading.Event()
    threads = [
        threading.Thread(target=_client, args=(port, cid, ledger, stop, random.Random(seed + cid)),
                         daemon=True)  # fmt: skip
        for cid in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    kills: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    # A child killed twice within a minute is restarted after 2 s, then 5 s
    # (backoff): each child kind is killed at most once per gateway lifetime.
    killed_since_start: set[str] = set()
    try:
        for _ in range(runs):
            target = rng.choice(["gateway", "worker", "delivery"])
            if target in killed_since_start:
                target = "gateway"
            time.sleep(rng.uniform(0.05, 0.6))
            stages.update(ledger.stages())
            kills[target] += 1
            if target == "gateway":
                kill_gateway(gw)
                gw.start()
                killed_since_start.clear()
            elif target == "worker":
                _replace_child(gw, receiver_pids, rng.choice(receiver_pids(gw.pid)),
                               "a new receiving worker")  # fmt: skip
                killed_since_start.add(target)
            else:
                [victim] = delivery_pids(gw.pid)
                _replace_child(gw, delivery_pids, victim, "a new delivery process")
                killed_since_start.add(target)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads), "a client hung"
    # The last kill, with no client left: recovery must account for every file.
    kill_gateway(gw)
    spool = gw.workdir / "var" / "spool"
    orphans_before = spool_orphans(spool)
    gw.start()
    acked = set(ledger.acked)
    wait_until(lambda: acked <= set(delivered(sink)) and not list((spool / "queue").iterdir()),
               60, interval=0.2, what="every acknowledged message delivered, the spool empty")  # fmt: skip
    got = delivered(sink)
    assert not ledger.errors, ledger.errors
    assert acked <= set(got)
    never_sent = ledger.unfinished & set(got)
    assert not never_sent, f"delivered without its final dot: {sorted(never_sent)}"
    stray = set(got) - acked - ledger.maybe
    assert not stray, f"delivered but never sent: {sorted(stray)}"
    return Soak(
        kills=kills, stages_at_kill=stages, acked=len(acked), maybe=len(ledger.maybe),
        unfinished=len(ledger.unfinished), delivered=sum(got.values()),
        duplicates=sum(c - 1 for c in got.values()), orphans_before_drain=orphans_before,
    )  # fmt: skip


def test_kill9_at_random_points(launch: Launch, sinks: Sinks, workdir: Path) -> None:
    """
    RUNS (15) kills at random points (whole gateway, a receiving worker, the
    delivery process): every 250 is delivered at least once, nothing cut
    before its final dot is, and the spool is left with no orphan file.
    """
    sink = sinks(workdir / "sink", dump=True)
    port, admin = free_ports(2)
    gw = launch(workdir / "gw", config(port, admin, sink.port), [port])
    seed = int(os.environ.get("KILL9_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (KILL9_SEED={seed} repeats it)")
    result = soak(gw, port, sink, RUNS, seed)
    print(result)
    assert sum(result.kills.values()) == RUNS
    assert result.acked > 0
    assert result.orphans_before_drain == [] or all(
        n.endswith(".tmp") for n in result.orphans_before_drain
    ), result.orphans_before_drain
    assert gw.running()

