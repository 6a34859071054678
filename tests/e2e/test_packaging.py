"""
Packaging (SPEC section 1; issue 2, "Must work" 1): a plain, non-editable
C{pip install <repo>} into a fresh virtualenv gives the twistd plugin and the
C{relaygw} console script.

The virtualenv is really fresh (no system or test site-packages visible), so
its dependencies come from the package index through pip's cache; once
scripts/test has installed the same versions into .venv the wheels are
cached and this takes about half a minute.  The repository is copied first
(without .git, .venv and build output) so the install sees what a fresh
clone holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.relaygw import REPO

pytestmark = pytest.mark.e2e

_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "var", "__pycache__",
    ".mypy_cache", ".pytest_cache", "dropin.cache", "twistd.pid",
)


def _run(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_ROOT_USER_ACTION"] = "ignore"
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new virtualenv with C{pip install <copy of the repo>} (not editable) done."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=_IGNORE)
    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=root)
    assert made.returncode == 0, made.stdout + made.stderr
    installed = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
                     cwd=root, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    yield venv
    shutil.rmtree(root, ignore_errors=True)


def test_install_is_not_editable(fresh_venv: Path, tmp_path: Path) -> None:
    """The installed package lives in the virtualenv's site-packages, not in the source tree."""
    probe = _run([str(fresh_venv / "bin" / "python"), "-c",
                  "import relaygw, relaygw.tap; print(relaygw.__file__)"], cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(fresh_venv), probe.stdout


def test_twistd_lists_plugin(fresh_venv: Path, tmp_path: Path) -> None:
    """C{twistd --help} of the fresh virtualenv lists the relaygw plugin."""
    result = _run([str(fresh_venv / "bin" / "twistd"), "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:1] == ["relaygw"] for line in result.stdout.splitlines()), result.stdout


def test_plugin_options(fresh_venv: Path, tmp_path: Path) -> None:
    """C{twistd relaygw --help} documents C{-c/--config}."""
    result = _run([str(fresh_venv / "bin" / "twistd"), "relaygw", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--config" in result.stdout and "-c" in result.stdout, result.stdout


def test_console_script_checks_default_config(fresh_venv: Path, tmp_path: Path) -> None:
    """The C{relaygw} console script runs C{check-config} on the embedded default: exit 0."""
    result = _run([str(fresh_venv / "bin" / "relaygw"), "check-config"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
