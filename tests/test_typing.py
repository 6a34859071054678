"""
The package type-checks under mypy strict (DESIGN.md habit 11; the
configuration is setup.cfg's [mypy] section, which checks relaygw/).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None or importlib.util.find_spec("mypy_zope") is None,
    reason="mypy and mypy-zope are not installed (setup.cfg's test extra; scripts/test installs them)",
)
def test_mypy_strict_reports_no_errors() -> None:
    """mypy over relaygw/ with the project's configuration reports no error."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "setup.cfg"), "relaygw"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"mypy found problems:\n{result.stdout}{result.stderr}", pytrace=False)
