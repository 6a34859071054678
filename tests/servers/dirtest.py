"""
Shared pieces of the directory tests (tests/test_directory_ldap.py and
tests/test_directory_ad.py): a bounded thread pool per test, settings for a
real server, and a log observer that keeps every event for password checks.

The tests are C{twisted.trial.unittest.TestCase}s on the global reactor,
like the rest of the suite: trial runs the reactor while a test's Deferred
is pending, so the adapter's L{deferToThreadPool} results come back through
the real reactor.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import LoopingCall
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from relaygw.auth.directory import LDAPDirectory
from relaygw.config._model import Directory, DirectoryKind
from tests.servers.ports import free_port

AD_FILTER = (
    "(&(objectCategory=person)(objectClass=user)"
    "(|(sAMAccountName={user})(userPrincipalName={user})(mail={user})))"
)
LDAP_FILTER = "(&(objectClass=inetOrgPerson)(|(uid={user})(mail={user})))"


_T = TypeVar("_T")

def unavailable(reason: str | None) -> None:
    """Skip for a missing server binary; on CI (C{CI} set) that is a failure."""
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def closed_port() -> int:
    """A loopback port that nothing listens on (connections are refused)."""
    return free_port()


def settings(
    kind: DirectoryKind,
    servers: Sequence[str],
    *,
    base_dn: str,
    bind_dn: str,
    ca_file: Path | None,
    start_tls: bool = True,
    timeout: float = 5,
) -> Directory:
    """A C{[directory]} as the loader builds it (SPEC defaults filled in)."""
    ad = kind == "active-directory"
    return Directory(
        kind=kind,
        servers=tuple(servers),
        base_dn=base_dn,
        start_tls=start_tls,
        ca_file=ca_file,
        bind_dn=bind_dn,
        bind_password_file=Path("/nonexistent/secret") if bind_dn else None,
        user_filter=AD_FILTER if ad else LDAP_FILTER,
        address_attributes=("mail", "proxyAddresses") if ad else ("mail",),
        timeout=timedelta(seconds=timeout),
    )


class DirectoryTestCase(TestCase):
    """A trial test case with a bounded, started thread pool and a log capture."""

    timeout = 60

    def setUp(self) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=4, name="directory-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def directory(self, config: Directory, bind_password: str) -> LDAPDirectory:
        """An L{LDAPDirectory} on the global reactor and this test's pool."""
        from twisted.internet import reactor

        threads: IReactorFromThreads = reactor  # type: ignore[assignment]
        return LDAPDirectory(
            config, reactor=threads, threadpool=self.pool, bind_password=bind_password
        )

    def logged(self) -> str:
        """Every captured event: its formatted text and its repr, one per line."""
        return "\n".join(f"{formatEvent(e)} {e!r}" for e in self.events)

    def log_texts(self, predicate: Callable[[LogEvent], bool]) -> list[str]:
        """The formatted text of the captured events that satisfy C{predicate}."""
        return [formatEvent(e) for e in self.events if predicate(e)]


def from_directory(event: dict[str, Any]) -> bool:
    """Whether an event was logged by the directory adapter."""
    return str(event.get("log_namespace", "")).startswith("relaygw.auth.directory")


async def ticks_during(work: Callable[[], Awaitable[_T]]) -> tuple[_T, int]:
    """
    Run C{work()} on the real reactor while a 10 ms LoopingCall counts
    ticks: a reactor blocked by the work gives about one tick.

    @return: the work's result and the number of ticks.
    """
    from twisted.internet import reactor

    ticks = [0]

    def tick() -> None:
        ticks[0] += 1

    loop = LoopingCall(tick)
    loop.clock = reactor  # type: ignore[assignment]
    loop.start(0.01)
    try:
        result = await work()
    finally:
        loop.stop()
    return result, ticks[0]
