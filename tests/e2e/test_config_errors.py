"""
Configuration errors stop the process before it listens (SPEC section 2;
issue 2, "Must work" 2): C{twistd -n relaygw -c bad.toml} exits non-zero and
names the file, the key path and the problem.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import LOCAL_MAILDIR, Launch, gateway_toml
from tests.servers.ports import accepts, free_ports
from tests.servers.relaygw import BIN

pytestmark = pytest.mark.e2e


def _good(port: int, admin: int) -> str:
    return gateway_toml(admin) + LOCAL_MAILDIR + f"""
[[connectors]]
name = "Internal"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
"""


#: (how the good file is spoiled, key path, problem words that must appear)
CASES: list[tuple[Callable[[str], str], str, str]] = [
    (
        lambda t: t.replace('remote_ranges = ["127.0.0.0/8"]',
                            'remote_ranges = ["192.168.0.300"]'),
        "connectors[0].remote_ranges[0]",
        "'192.168.0.300' is not an IP address, network or range",
    ),
    (
        lambda t: t.replace('route = "local"', 'route = "nowhere"'),
        "accepted_domains[0].route",
        "nowhere",
    ),
    (lambda t: t.replace("[gateway]\n", '[gateway]\ncolour = "blue"\n'), "gateway.colour", ""),
    (lambda t: t.replace('tls = "off"', 'tls = "sometimes"'), "connectors[0].tls", "sometimes"),
]


@pytest.mark.parametrize(("spoil", "key_path", "problem"), CASES, ids=[c[1] for c in CASES])
def test_bad_config_exits_before_listening(
    launch: Launch, workdir: Path, spoil: Callable[[str], str], key_path: str, problem: str
) -> None:
    """
    A bad file makes twistd exit non-zero with "bad.toml", the key path and the
    problem in its output, and its SMTP port never accepts a connection.
    """
    port, admin = free_ports(2)
    gateway = launch(workdir, None, [], start=False)
    bad = workdir / "bad.toml"
    bad.write_text(spoil(_good(port, admin)))
    gateway.extra_args = ("-c", str(bad))
    proc = gateway.spawn()
    deadline = time.monotonic() + 30
    listened = False
    while proc.poll() is None and time.monotonic() < deadline:
        listened = listened or any(accepts("127.0.0.1", p, timeout=0.1) for p in (port, admin))
        time.sleep(0.02)
    assert proc.poll() is not None, "twistd did not exit on a bad configuration"
    out = gateway.output()
    assert proc.returncode != 0, out
    assert not listened
    assert "bad.toml" in out and key_path in out and problem in out, out
    assert "Traceback" not in out, out


def test_check_config_reports_bad_file(workdir: Path, relaygw_installed: None) -> None:
    """C{relaygw check-config -c bad.toml} exits non-zero with file, key path and problem."""
    port, admin = free_ports(2)
    bad = workdir / "bad.toml"
    spoil, key_path, problem = CASES[0]
    bad.write_text(spoil(_good(port, admin)))
    result = subprocess.run([str(BIN / "relaygw"), "check-config", "-c", str(bad)],
                            cwd=workdir, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert f"bad.toml: {key_path}: {problem}" in out, out
