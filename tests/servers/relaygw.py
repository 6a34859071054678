"""
The real relaygw: C{twistd -n relaygw [-c FILE]} from the same environment as
the test interpreter (C{Path(sys.executable).parent / "twistd"}), where
relaygw must be pip-installed (C{scripts/test} does that).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.servers.ports import wait_for_ports, wait_until
from tests.servers.procs import cpu_seconds, kill_process, stop_process

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
#: What the service logs once it takes sessions (relaygw.service).
READY = "relaygw ready: accepting connections"


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.suffix in (".py", ".toml") and "__pycache__" not in p.parts
    }


def installed_problem() -> str | None:
    """
    C{None} when the environment of C{sys.executable} holds a non-stale
    pip-installed relaygw with its twistd plugin; otherwise what is wrong.
    """
    if not TWISTD.exists():
        return f"{TWISTD} does not exist: Twisted is not installed in this environment"
    with tempfile.TemporaryDirectory() as cwd:
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import os, relaygw, relaygw.tap, twisted.plugins.relaygw_plugin as p;"
                "print(os.path.dirname(relaygw.__file__)); print(p.__file__)",
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
    if probe.returncode != 0:
        tail = probe.stderr.strip().splitlines()[-1:] or [""]
        return (
            f"relaygw is not pip-installed in {sys.prefix} ({tail[0]}); "
            "scripts/test installs it, or run `pip install .`"
        )
    installed = Path(probe.stdout.splitlines()[0])
    if installed.resolve() == (REPO / "relaygw").resolve():
        return None
    if _digest(installed) != _digest(REPO / "relaygw"):
        return (
            f"the relaygw installed in {installed} differs from the working tree: "
            "rerun scripts/test (or `pip install .`) before the end-to-end tests"
        )
    return None


class RelaygwProcess:
    """
    One C{twistd -n relaygw} process in C{workdir} (its current directory).

    @param workdir: working directory; the configuration file is written here
        as C{relaygw.toml}, and the process output as C{twistd.out}.
    @param config: TOML text, or C{None} for the embedded default (no C{-c}).
    @param ports: loopback ports that must accept connections before
        L{start} returns.
    @param prefix: a command twistd runs under (valgrind, for one).
    """

    def __init__(
        self,
        workdir: Path,
        config: str | None,
        *,
        ports: Sequence[int] = (),
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        prefix: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.prefix = tuple(prefix)
        self.config = config
        self.ports = tuple(ports)
        self.host = host
        self.extra_args = tuple(extra_args)
        self.config_path: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._out = self.workdir / "twistd.out"
        self.workdir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            self.config_path = self.workdir / "relaygw.toml"
            self.config_path.write_text(config)

    @property
    def pid(self) -> int:
        """The twistd process's PID (it runs in the foreground: C{-n})."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    def args(self) -> list[str]:
        """The command line."""
        args = [*self.prefix, str(TWISTD), "-n", "--pidfile=", "relaygw"]
        if self.config_path is not None:
            args += ["-c", str(self.config_path)]
        return args + list(self.extra_args)

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to listen."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("already running")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        with open(self._out, "ab") as out:
            self.proc = subprocess.Popen(
                self.args(),
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        return self.proc

    def start(self, timeout: float = 30.0) -> RelaygwProcess:
        """Start and wait (bounded) until every port in C{ports} accepts connections."""
        mark = len(self.output())  # the output file is appended to across restarts
        proc = self.spawn()
        try:
            wait_for_ports(self.host, self.ports, timeout, alive=lambda: proc.poll() is None)
            # Bound sockets accept TCP before the service has recovered the
            # spool and generated certificates; the service says when it is.
            wait_until(
                lambda: READY in self.output()[mark:] or proc.poll() is not None,
                timeout,
                0.05,
                "relaygw to report ready",
            )
            if proc.poll() is not None:
                raise RuntimeError(f"exited with status {proc.returncode}")
        except (TimeoutError, RuntimeError) as e:
            self.kill9()
            raise RuntimeError(
                f"relaygw did not start: {e}\n--- twistd output ---\n{self.output()}"
            ) from e
        return self

    def running(self) -> bool:
        """Whether the process is still alive."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then kill -9 after C{timeout} seconds; returns the exit status."""
        if self.proc is None:
            return None
        return stop_process(self.proc, timeout=timeout)

    def kill9(self) -> None:
        """kill -9 the process (by its PID) and reap it."""
        if self.proc is not None:
            kill_process(self.proc)

    def send_signal(self, sig: signal.Signals) -> None:
        """Send C{sig} to the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def cpu_seconds(self) -> float:
        """utime + stime of the process so far."""
        return cpu_seconds(self.pid)

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr."""
        try:
            return self._out.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> RelaygwProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
