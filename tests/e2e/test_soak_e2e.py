"""
The soak in CI (issue 11, "Must show" 6): about 60 s of mixed anonymous and
authenticated sessions (users file, scrypt) with random client disconnects,
against a downstream that drops connections and answers 4xx at random, on
a 1 s / 2 s retry schedule (method: L{tests.servers.soak}; the long run is
C{bench/soak.py}).  At the end every message answered 250 is delivered
exactly once to each recipient or bounced with exactly one DSN, nothing a
client left unfinished is delivered, "maybe" messages at most once, and the
gateway's RSS (within +30 MiB) and descriptors (exactly) are back to their
level after the warm-up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers.soak import run_soak

pytestmark = pytest.mark.e2e

SECONDS = 60


def test_soak(relaygw_installed: None, workdir: Path) -> None:
    result = run_soak(workdir, SECONDS, clients=2, seed=11, drain_timeout=120)
    print(result.report())
    # The run exercised what it claims to.
    assert result.acked > 100 and result.auth_sessions > 10, result.report()
    assert result.bounced > 0 and result.maybe > 0 and len(result.disconnects) == 3
    assert result.faults.get("drop_after_dot", 0) > 0 and result.faults.get("defer_rcpt", 0) > 0
    assert result.problems == [], result.report()
    assert result.duplicates == 0
