"""
Memory and file descriptors of a process tree, read from /proc: the
gateway's twistd process with its receiving workers and delivery process.
"""

from __future__ import annotations

import os

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
