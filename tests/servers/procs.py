"""
Stopping processes the tests started, by PID only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """
    Stop C{proc}: SIGTERM, wait up to C{timeout} seconds, then SIGKILL.

    @return: the exit status (negative for a signal), or C{None} if it
        could not be reaped.
    """
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process(proc)
    return proc.returncode


def kill_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGKILL C{proc} and reap it."""
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
    return proc.returncode


def child_pids(pid: int) -> list[int]:
    """The PIDs whose parent is C{pid} (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def delivery_pids(pid: int) -> list[int]:
    """The children of gateway C{pid} that are its delivery process (not receiving workers)."""
    found = []
    for child in child_pids(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"relaygw.runner" in f.read():
                    found.append(child)
        except OSError:
            continue
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (and is not a zombie we could reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM a PID that is not our child, wait, then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def cpu_seconds(pid: int) -> float:
    """
    utime + stime of process C{pid} and its reaped children, in seconds
    (from C{/proc/PID/stat}).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17.
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")
