"""
Start and stop real peers on loopback for the end-to-end tests and benchmarks.

Everything here is started by the test suite itself and stopped by PID:
L{ports} (free ports, waiting for a listener), L{procs} (stopping a process),
L{relaygw} (the real C{twistd -n relaygw} process), L{sink} (Postfix's
C{smtp-sink}) and L{postfix} (a private Postfix instance).  The system's own
Postfix is never used or touched.
"""

from __future__ import annotations

__all__ = ["ports", "procs", "relaygw", "sink", "postfix"]
