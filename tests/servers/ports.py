"""
Free loopback ports and waiting for a listener.
"""

from __future__ import annotations

import errno
import random
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path


def _outside_ephemeral() -> range:
    """
    Where test servers' ports are chosen: outside the kernel's ephemeral
    range (net.ipv4.ip_local_port_range, 32768-60999 by default), so that no
    client's source port, TCP or UDP (a resolver's query), takes one between
    its choice and the server's bind, as a port chosen by a bind to port 0 can.
    """
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low >= 21000:
        return range(20000, low)
    if high <= 64000:
        return range(high + 1, 65536)
    return range(20000, 32768)  # no room outside it: the old default's


PORTS = _outside_ephemeral()
_random = random.SystemRandom()


def free_port(host: str = "127.0.0.1") -> int:
    """A port on C{host} that no TCP or UDP socket holds right now (see L{PORTS})."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """
    C{count} distinct ports of L{PORTS} that no TCP or UDP socket holds on
    C{host} right now, each held open (both kinds, no C{SO_REUSEADDR}, so
    a port in TIME_WAIT is passed over) until all are chosen.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    chosen: list[int] = []
    try:
        for port in _random.sample(PORTS, min(len(PORTS), 50 * count + 100)):
            pair = [socket.socket(family, kind) for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM)]
            socks += pair
            try:
                for s in pair:
                    s.bind((host, port))
            except OSError as error:
                if error.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
                continue
            chosen.append(port)
            if len(chosen) == count:
                return chosen
        raise RuntimeError(f"no {count} free ports on {host} in {PORTS}")
    finally:
        for s in socks:
            s.close()


def accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a TCP connection to C{host:port} is accepted."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_listening(host: str, port: int) -> bool:
    """
    Whether a socket listens on C{host:port} (or on the wildcard), asked of
    the kernel with C{ss}, so that no connection is opened.
    """
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    return any(line.strip() for line in out.splitlines())


def wait_until(
    predicate: object, timeout: float, interval: float = 0.05, what: str = "condition"
) -> None:
    """
    Poll C{predicate()} until it is true; raise L{TimeoutError} after C{timeout} seconds.
    """
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_for_ports(
    host: str, ports: Iterable[int], timeout: float, alive: object = None
) -> None:
    """
    Wait until every port accepts a connection.

    @param alive: optional callable; when it returns false (the server died)
        waiting stops with L{RuntimeError}.
    """
    pending = list(ports)
    deadline = time.monotonic() + timeout
    while pending:
        if alive is not None and callable(alive) and not alive():
            raise RuntimeError(f"server exited before listening on {host}:{pending}")
        pending = [p for p in pending if not accepts(host, p, timeout=0.2)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{pending} after {timeout:.0f}s")
        time.sleep(0.05)
