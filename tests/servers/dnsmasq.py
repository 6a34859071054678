"""
dnsmasq as an authoritative test resolver on loopback (Debian package
C{dnsmasq-base}; recipe in the shared notes, test-servers.md section 3).

It answers only for C{.test} (C{--local=/test/}), never recurses, and keeps
no state.  Names outside C{.test} get REFUSED; C{timeout.test} is forwarded
to a UDP socket of ours that never answers, so its queries time out, and
C{servfail.test} to one that answers every query SERVFAIL, which dnsmasq
passes on.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from twisted.names import dns

from tests.servers.ports import free_port
from tests.servers.procs import stop_process

#: The test zone: (dnsmasq option, value) pairs.
RECORDS: tuple[tuple[str, str], ...] = (
    # multi.test: two exchangers at preference 10, one at 20.
    ("mx-host", "multi.test,mx1.multi.test,10"),
    ("mx-host", "multi.test,mx2.multi.test,10"),
    ("mx-host", "multi.test,mx3.multi.test,20"),
    ("host-record", "mx1.multi.test,127.0.0.31"),
    ("host-record", "mx2.multi.test,127.0.0.32"),
    ("host-record", "mx3.multi.test,127.0.0.33"),
    # No MX: the A record is the exchanger (RFC 5321 section 5.1).
    ("host-record", "aonly.test,127.0.0.34"),
    ("host-record", "dual.test,127.0.0.36,::1"),
    # RFC 7505 null MX, as raw rdata (preference 0, the root name).
    ("dns-rr", "nullmx.test,15,000000"),
    # An MX whose target does not exist.
    ("mx-host", "badmx.test,nowhere.badmx.test,10"),
    # A name that exists with neither MX nor address records.
    ("txt-record", "empty.test,nothing here"),
)

DNSMASQ_MISSING = "dnsmasq (package dnsmasq-base) is not installed"


def dnsmasq_missing() -> bool:
    """
    Whether to skip the DNS tests: dnsmasq is absent on a developer's machine.
    On CI (scripts/test installs it) it is never skipped, so that a missing
    package fails the DNS tests instead of hiding them.
    """
    return dnsmasq_binary() is None and not os.environ.get("CI")


def dnsmasq_binary() -> str | None:
    return shutil.which("dnsmasq") or (
        "/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None
    )


class _Servfail:
    """A UDP socket on loopback that answers every DNS query SERVFAIL (a thread)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
                message = dns.Message()
                message.fromStr(data)
            except (OSError, EOFError, ValueError):
                continue
            message.answer, message.rCode = 1, dns.ESERVER
            message.answers, message.authority, message.additional = [], [], []
            try:
                self._sock.sendto(message.toStr(), peer)
            except OSError:
                pass

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._sock.close()


class Dnsmasq:
    """
    One dnsmasq on C{127.0.0.1:port}, started and stopped by PID.

    @ivar port: its UDP (and TCP) port.
    """

    def __init__(self, workdir: Path, extra: tuple[tuple[str, str], ...] = ()) -> None:
        """
        @param extra: (dnsmasq option, value) pairs served beside L{RECORDS}.
        """
        self.workdir = Path(workdir)
        self.extra = extra
        self.port = free_port()  # dnsmasq takes it for UDP and TCP
        # Held open, never read: dnsmasq's forwarded timeout.test queries die here.
        self._blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._blackhole.bind(("127.0.0.1", 0))
        self._servfail: _Servfail | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 5.0) -> Dnsmasq:
        binary = dnsmasq_binary()
        if binary is None:
            raise RuntimeError(DNSMASQ_MISSING)
        self.workdir.mkdir(parents=True, exist_ok=True)
        blackhole = self._blackhole.getsockname()[1]
        self._servfail = _Servfail()
        args = [
            binary, "-k", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={self.port}",
            f"--pid-file={self.workdir / 'dnsmasq.pid'}",
            f"--log-facility={self.workdir / 'dnsmasq.log'}",
            "--local=/test/", f"--server=/timeout.test/127.0.0.1#{blackhole}",
            f"--server=/servfail.test/127.0.0.1#{self._servfail.port}",
        ] + (["--user=root"] if os.geteuid() == 0 else []) + [
            f"--{key}={value}" for key, value in RECORDS + self.extra
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read() if self._proc.stderr else b""
                raise RuntimeError(f"dnsmasq exited: {err.decode(errors='replace')}")
            if self._answers():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("dnsmasq did not answer")

    def _answers(self) -> bool:
        query = dns.Message(id=4711, recDes=0)
        query.queries = [dns.Query(b"aonly.test", dns.A)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            try:
                s.sendto(query.toStr(), ("127.0.0.1", self.port))
                s.recv(512)
            except OSError:
                return False
        return True

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, timeout=5)
            if self._proc.stderr:
                self._proc.stderr.close()
        self._blackhole.close()
        if self._servfail is not None:
            self._servfail.stop()
