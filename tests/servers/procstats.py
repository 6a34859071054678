"""
Memory and file descriptors of a process tree, read from /proc: the
gateway's twistd process with its receiving workers and delivery process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

from attrs import frozen

from tests.servers.procs import child_pids


def tree(pid: int) -> list[int]:
    """C{pid} and all its descendants (those alive now)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(child_pids(p))
    return found


def rss_kib(pid: int) -> int:
    """VmRSS of C{pid} in KiB (0 for a process that has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int:
    """Open file descriptors of C{pid} (0 for a process that has gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def tree_rss_kib(pid: int) -> int:
    """VmRSS summed over the tree of C{pid}, in KiB."""
    return sum(rss_kib(p) for p in tree(pid))


def tree_fds(pid: int) -> dict[int, int]:
    """Open file descriptors per process of the tree of C{pid}."""
    return {p: fd_count(p) for p in tree(pid)}


def tree_rss_each_kib(pid: int) -> dict[int, int]:
    """VmRSS per process of the tree of C{pid}, in KiB."""
    return {p: rss_kib(p) for p in tree(pid)}


def receiving_workers(pid: int) -> list[int]:
    """The receiving workers (C{relaygw.receiver}) among the children of C{pid}."""
    found = []
    for child in child_pids(pid):
        try:
            if b"relaygw.receiver" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            continue
    return sorted(found)


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets C{pid} holds (empty for a process that has gone)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


#: /proc/net/tcp's state numbers (include/net/tcp_states.h).
_TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
               6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
               11: "CLOSING"}  # fmt: skip


@frozen
class TcpSocket:
    """One line of /proc/net/tcp; C{inode} "0": no descriptor holds it (TIME_WAIT)."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: str
    inode: str


def tcp4() -> Iterator[TcpSocket]:
    """Every IPv4 TCP socket, from /proc/net/tcp."""
    def address(field: str) -> tuple[str, int]:
        ip, port = field.split(":")
        return socket.inet_ntoa(bytes.fromhex(ip)[::-1]), int(port, 16)

    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        yield TcpSocket(address(fields[1]), address(fields[2]),
                        _TCP_STATES.get(int(fields[3], 16), fields[3]), fields[9])  # fmt: skip


def established(port: int) -> set[str]:
    """Inodes of the server ends of established connections on C{port} (IPv4)."""
    return {t.inode for t in tcp4() if t.state == "ESTABLISHED" and t.local[1] == port}
