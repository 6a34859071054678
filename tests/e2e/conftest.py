"""
Fixtures for the end-to-end tests: the real C{twistd -n relaygw} process and
real peers on loopback, all started here and stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.servers.ports import free_port
from tests.servers.relaygw import RelaygwProcess, installed_problem
from tests.servers.sink import SmtpSink

HOST = "127.0.0.1"


@pytest.fixture(scope="session")
def relaygw_installed() -> None:
    """
    The tests run the pip-installed relaygw of the interpreter's environment
    (scripts/test installs it); a missing or stale install is a failure on CI
    and a skip elsewhere.
    """
    problem = installed_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


def _public_tmp() -> Path:
    # mode 755 so that the postfix user (smtp-sink, Postfix) can enter it too
    d = Path(tempfile.mkdtemp(prefix="relaygw-e2e-", dir="/tmp"))
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh directory under /tmp (mode 755), removed afterwards."""
    d = _public_tmp()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def module_workdir() -> Iterator[Path]:
    """Like L{workdir}, shared by a module's tests."""
    d = _public_tmp()
    yield d
    shutil.rmtree(d, ignore_errors=True)


Launch = Callable[..., RelaygwProcess]


class _Launcher:
    def __init__(self) -> None:
        self.started: list[RelaygwProcess] = []

    def __call__(
        self, workdir: Path, config: str | None, ports: Sequence[int], *, start: bool = True
    ) -> RelaygwProcess:
        proc = RelaygwProcess(workdir, config, ports=ports)
        self.started.append(proc)
        if start:
            proc.start()
        return proc

    def close(self) -> None:
        for proc in self.started:
            proc.stop(timeout=10)
            lines = proc.output().splitlines()
            print(f"--- twistd output ({proc.workdir}), last {min(len(lines), 80)} lines ---")
            print("\n".join(lines[-80:]))


@pytest.fixture
def launch(relaygw_installed: None, workdir: Path) -> Iterator[Launch]:
    """
    Start C{twistd -n relaygw} processes; every one is stopped (SIGTERM, then
    kill -9, by PID) when the test ends, and its output printed for the report.
    (It depends on L{workdir} so that the directory outlives the processes.)
    """
    launcher = _Launcher()
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def module_launch(relaygw_installed: None, module_workdir: Path) -> Iterator[Launch]:
    """Like L{launch}, for processes shared by a module's tests."""
    launcher = _Launcher()
    yield launcher
    launcher.close()


Sinks = Callable[..., SmtpSink]


class _Sinks:
    def __init__(self) -> None:
        self.started: list[SmtpSink] = []

    def __call__(self, workdir: Path, *, dump: bool = True) -> SmtpSink:
        sink = SmtpSink(workdir, free_port(), dump=dump)
        self.started.append(sink)
        return sink.start()

    def close(self) -> None:
        for sink in self.started:
            sink.stop()


def _need_smtp_sink() -> None:
    if not os.path.exists("/usr/sbin/smtp-sink"):
        pytest.skip("smtp-sink is not installed (Debian package postfix; scripts/test installs it)")


@pytest.fixture
def sinks(workdir: Path) -> Iterator[Sinks]:
    """Start smtp-sink instances on free ports; stopped by PID afterwards."""
    _need_smtp_sink()
    started = _Sinks()
    yield started
    started.close()


@pytest.fixture(scope="module")
def module_sinks(module_workdir: Path) -> Iterator[Sinks]:
    """Like L{sinks}, shared by a module's tests."""
    _need_smtp_sink()
    started = _Sinks()
    yield started
    started.close()


def gateway_toml(
    admin_port: int,
    *,
    hostname: str = "gw.e2e.test",
    default_route: str | None = None,
    workers: int | None = None,
) -> str:
    """The C{[gateway]} and C{[queue]} sections the tests share (paths under the workdir)."""
    route = f'default_route = "{default_route}"\n' if default_route else ""
    return (
        "[gateway]\n"
        + (f"workers = {workers}\n" if workers is not None else "")
        + f'hostname = "{hostname}"\n'
        'spool_dir = "var/spool"\n'
        'log_dir = "var/log"\n'
        f'admin_listen = "127.0.0.1:{admin_port}"\n'
        f"{route}\n"
        "[queue]\n"
        'retry = ["1s", "2s"]\n\n'
    )


def smarthost_relay(port: int, domain: str = "example.test") -> str:
    """C{domain} (internal-relay) routed as C{downstream} to a smarthost on loopback C{port}."""
    return f"""
[[accepted_domains]]
domain = "{domain}"
type = "internal-relay"
route = "downstream"

[[routes]]
name = "downstream"
via = "smarthost"
smarthosts = ["127.0.0.1:{port}"]
tls = "off"
"""


def mx_internet(dns_port: int, mx_port: int) -> str:
    """The resolver on loopback C{dns_port} and the C{internet} route by MX to C{mx_port}."""
    return f"""
[dns]
servers = ["127.0.0.1:{dns_port}"]

[[routes]]
name = "internet"
via = "mx"
port = {mx_port}
tls = "off"
"""


#: example.test delivered to the Maildir var/mail (the routes most tests need).
LOCAL_MAILDIR = """
[[accepted_domains]]
domain = "example.test"
route = "local"

[[routes]]
name = "local"
via = "maildir"
maildir = "var/mail"
"""


def maildir_messages(root: Path, local: str | None = None) -> list[Path]:
    """Delivered files in C{root/<local>/new/} (every local part when C{None})."""
    pattern = f"{local}/new/*" if local is not None else "*/new/*"
    return sorted(p for p in root.glob(pattern) if p.is_file())


def spool_entries(spool: Path) -> list[Path]:
    """Queue entries left in the spool (C{.msg} entry files and C{.upd} updates)."""
    return [p for p in spool.rglob("*") if p.is_file() and p.suffix in (".msg", ".upd")]


def smtp(
    port: int, source: str | None = None, timeout: float = 20.0
) -> tuple[smtplib.SMTP, int, bytes]:
    """
    An smtplib client connected to C{127.0.0.1:port}, optionally from the
    source address C{source}, with the banner's code and text.
    """
    client = smtplib.SMTP(timeout=timeout, source_address=(source, 0) if source else None)
    code, banner = client.connect(HOST, port)
    return client, code, banner
