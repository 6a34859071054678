"""
A throwaway HAProxy (Debian package C{haproxy}) in TCP mode on loopback, in
front of relaygw backends (recipe in the shared notes, test-servers.md
section 4): C{haproxy -db -f cfg} runs in the foreground, so the child's PID
is haproxy itself and is stopped by that PID.

The configuration is written here: one frontend, one round-robin backend,
the PROXY header (C{send-proxy-v2}, C{send-proxy} or none) towards the
backends, a health check (HTTP C{GET /health} on a per-server check port,
which then carries no PROXY header; an SMTP banner check, whose connections
carry the header: v2 LOCAL, v1 haproxy's own addresses; a bare TCP connect;
or none), haproxy's own source address towards the backends, and a CSV
stats page for reading the servers' states.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from attrs import frozen

from tests.servers.ports import free_port, is_listening, wait_until
from tests.servers.procs import stop_process

HAPROXY_MISSING = "haproxy (Debian package haproxy) is not installed; scripts/test installs it"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


def haproxy_missing() -> bool:
    """
    Whether to skip: haproxy is absent on a developer's machine.  On CI
    (scripts/test installs it) never, so a missing package fails the tests.
    """
    return haproxy_binary() is None and not os.environ.get("CI")


@frozen
class Backend:
    """
    One server of the backend.

    @ivar port: its SMTP port on 127.0.0.1.
    @ivar check_port: where its health check goes (C{None}: C{port}).
    """

    port: int
    check_port: int | None = None


class HAProxy:
    """
    HAProxy on C{127.0.0.1:front_port}; servers are named C{b1}, C{b2}...

    @param proxy: the PROXY header towards the backends.
    @param check: the health check (C{"http"}: C{GET /health} expecting 200
        on each backend's C{check_port}).
    @param source: haproxy's own source address towards the backends.
    """

    def __init__(
        self,
        workdir: Path,
        front_port: int,
        backends: Sequence[Backend],
        *,
        proxy: Literal["v2", "v1", None] = "v2",
        check: Literal["http", "smtp", "tcp", None] = "http",
        source: str | None = None,
        inter_ms: int = 300,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.front_port = front_port
        self.backends = tuple(backends)
        self.stats_port = free_port()
        self.proxy = proxy
        self.check = check
        self.source = source
        self.inter_ms = inter_ms
        self.config_path = self.workdir / "haproxy.cfg"
        self.log_path = self.workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        """The configuration text."""
        lines = [
            "global",
            "  log stdout format raw local0 info",
            "  maxconn 1000",
            "defaults",
            "  mode tcp",
            "  log global",
            "  option tcplog",
            "  timeout connect 2s",
            "  timeout client 60s",
            "  timeout server 60s",
            "frontend fe_smtp",
            f"  bind 127.0.0.1:{self.front_port}",
            "  default_backend be_relay",
            "backend be_relay",
            "  balance roundrobin",
        ]
        if self.source:
            lines.append(f"  source {self.source}")
        if self.check == "http":
            lines += ["  option httpchk GET /health", "  http-check expect status 200"]
        elif self.check == "smtp":
            lines += [
                "  option tcp-check",
                "  tcp-check expect rstring ^220",
                "  tcp-check send QUIT\\r\\n",
                "  tcp-check expect rstring ^221",
            ]
        send = {"v2": " send-proxy-v2", "v1": " send-proxy", None: ""}[self.proxy]
        for i, backend in enumerate(self.backends, 1):
            check = ""
            if self.check is not None:
                # fall 1: one failed probe takes a server out (the test waits for it).
                check = f" check inter {self.inter_ms}ms fall 1 rise 1"
                if backend.check_port is not None:
                    check += f" port {backend.check_port}"
            lines.append(f"  server b{i} 127.0.0.1:{backend.port}{send}{check}")
        lines += [
            "listen stats",
            "  mode http",
            f"  bind 127.0.0.1:{self.stats_port}",
            "  stats enable",
            "  stats uri /",
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20.0) -> HAProxy:
        """Write the configuration, check it, start haproxy and wait for its frontend."""
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError(HAPROXY_MISSING)
        self.config_path.write_text(self.config())
        checked = subprocess.run(
            [binary, "-c", "-q", "-f", str(self.config_path)],
            capture_output=True, text=True, timeout=30, check=False,
        )
        if checked.returncode != 0:
            raise RuntimeError(f"haproxy refuses {self.config_path}: {checked.stdout}{checked.stderr}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "-db", "-f", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        proc = self.proc
        try:
            # Asked of the kernel: a test connection would reach a backend.
            wait_until(
                lambda: proc.poll() is not None
                or (is_listening("127.0.0.1", self.front_port)
                    and is_listening("127.0.0.1", self.stats_port)),
                timeout, 0.02, "haproxy to listen",
            )
            if proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with status {proc.returncode}")
        except (TimeoutError, RuntimeError) as error:
            self.stop()
            raise RuntimeError(f"haproxy did not start: {error}\n{self.log()}") from error
        return self

    def stop(self) -> None:
        """SIGTERM haproxy by its PID, then SIGKILL if it lingers."""
        if self.proc is not None:
            stop_process(self.proc, timeout=10)

    def log(self) -> str:
        """What haproxy wrote (health-check state changes included)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def states(self) -> dict[str, str]:
        """Each server's status (C{UP}, C{DOWN}, C{no check}...), from the stats CSV."""
        url = f"http://127.0.0.1:{self.stats_port}/;csv"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "be_relay" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_for(self, server: str, status: str, timeout: float = 20.0) -> None:
        """Wait until C{server} (C{"b1"}...) has C{status} (C{"UP"}, C{"DOWN"})."""
        wait_until(
            lambda: self.states().get(server, "").split(" ")[0] == status,
            timeout, 0.1, f"haproxy server {server} to be {status}",
        )

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
