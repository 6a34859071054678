"""
Free loopback ports and waiting for a listener.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterable


def free_port(host: str = "127.0.0.1") -> int:
    """
    A TCP port on C{host} that nothing listens on right now (the kernel's
    choice for a bind to port 0).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """C{count} distinct free ports (held open together while choosing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
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
