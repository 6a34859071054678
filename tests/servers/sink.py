"""
Postfix's C{smtp-sink}: a fast SMTP receiver that counts, and optionally
dumps, what it is given.  Debian package C{postfix}.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.servers.ports import wait_for_ports
from tests.servers.procs import stop_process

SMTP_SINK = "/usr/sbin/smtp-sink"
SINK_MISSING = ("Postfix's smtp-sink (/usr/sbin/smtp-sink, package postfix) is not installed; "
                "scripts/test installs it")


def sink_missing() -> bool:
    """
    Whether to skip: smtp-sink is absent on a developer's machine.  On CI
    (scripts/test installs it) never, so a missing package fails the tests.
    """
    return not os.path.exists(SMTP_SINK) and not os.environ.get("CI")


_COUNTER = re.compile(rb"mesg=(\d+)")


def postfix_can_enter(path: Path) -> None:
    """
    Make C{path} and its parents searchable by others, as the C{postfix}
    user needs (C{mkdtemp} makes 0700 directories).
    """
    for p in [path, *path.parents]:
        if str(p) in ("/", "/tmp"):
            break
        mode = p.stat().st_mode & 0o777
        if mode & 0o005 != 0o005:
            os.chmod(p, mode | 0o755)


class SmtpSink:
    """
    C{smtp-sink -c [-d DUMP/%M.] [OPTIONS] HOST:PORT 1000} started and stopped by PID.

    @ivar port: the listening port.
    @ivar workdir: where its output (the running counters) is written.
    @ivar dump_dir: when set, one file per received message lands here.
    """

    def __init__(
        self,
        workdir: Path,
        port: int,
        *,
        host: str = "127.0.0.1",
        dump: bool = False,
        options: tuple[str, ...] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port
        self.options = options
        self.dump_dir: Path | None = self.workdir / "dump" if dump else None
        self._out = self.workdir / f"smtp-sink-{port}.out"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The sink's PID while it runs."""
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 10.0) -> SmtpSink:
        """Start and wait until the port accepts connections."""
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        args = [binary, "-c"]
        if os.geteuid() == 0:
            args += ["-u", "postfix"]
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dump_dir, 0o777)
            postfix_can_enter(self.dump_dir)
            args += ["-d", f"{self.dump_dir}/%H%M%S."]
        args += [*self.options, f"{self.host}:{self.port}", "1000"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self._out, "wb") as out:
            self._proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        proc = self._proc
        wait_for_ports(self.host, [self.port], timeout, alive=lambda: proc.poll() is None)
        return self

    def count(self) -> int:
        """Messages received so far (smtp-sink's C{mesg=} counter)."""
        try:
            data = self._out.read_bytes()
        except FileNotFoundError:
            return 0
        found = _COUNTER.findall(data)
        return int(found[-1]) if found else 0

    def messages(self) -> list[bytes]:
        """The dumped messages (with smtp-sink's X-* lines first); needs C{dump=True}."""
        if self.dump_dir is None:
            raise RuntimeError("started without dump=True")
        return [p.read_bytes() for p in sorted(self.dump_dir.rglob("*")) if p.is_file()]

    def stop(self) -> None:
        """Stop by PID (SIGTERM, then SIGKILL)."""
        if self._proc is not None:
            stop_process(self._proc, timeout=5)

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
