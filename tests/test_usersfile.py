"""
Tests for L{relaygw.auth.usersfile}: scrypt hashes, the JSON Lines file
written atomically with mode 0600, and L{UsersFile} as an IDirectory that
reloads on change.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from relaygw.auth.user import AuthenticatedUser
from relaygw.auth.usersfile import (
    UsersFile,
    UsersFileError,
    add_user,
    delete_user,
    hash_password,
    read_users,
    verify_password,
)
from relaygw.interfaces import IDirectory


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def test_hash_format_and_verify() -> None:
    """Hashes are scrypt$n$r$p$salt$hash, salted, and verify only the right password."""
    encoded = hash_password("s3cret")
    assert encoded.startswith("scrypt$16384$8$1$") and len(encoded.split("$")) == 6
    assert encoded != hash_password("s3cret")
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cre", encoded)
    assert not verify_password("s3cret", "plain$s3cret")
    with pytest.raises(ValueError):
        hash_password("")


def test_add_writes_mode_0600_without_password(tmp_path: Path) -> None:
    """user add writes a 0600 file holding the hash, never the password."""
    path = tmp_path / "users"
    assert add_user(path, "alice", "s3cret", ["Alice@Example.test"], ["Relay"])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "s3cret" not in path.read_text()
    [entry] = read_users(path).values()
    assert (entry.name, entry.addresses, entry.groups) == ("alice", ("alice@example.test",),
                                                           ("Relay",))
    assert "s3cret" not in repr(entry) and entry.password_hash not in repr(entry)
    assert list(tmp_path.iterdir()) == [path]


def test_add_replaces_and_delete(tmp_path: Path) -> None:
    """Adding an existing name replaces it; delete removes it and reports unknown names."""
    path = tmp_path / "users"
    add_user(path, "alice", "one")
    assert not add_user(path, "ALICE", "two")
    assert len(read_users(path)) == 1
    assert delete_user(path, "alice")
    assert not delete_user(path, "alice")
    assert read_users(path) == {}


def test_add_refuses_bad_input(tmp_path: Path) -> None:
    """Empty passwords, control characters in names and addresses without @ are refused."""
    path = tmp_path / "users"
    for name, password, addresses in (("a", "", []), ("a\x00b", "pw", []), ("a", "pw", ["x"])):
        with pytest.raises(ValueError):
            add_user(path, name, password, addresses)
    assert not path.exists()


def test_usersfile_authenticates(tmp_path: Path) -> None:
    """UsersFile provides IDirectory; the right password gives the user, case-insensitive name."""
    path = tmp_path / "users"
    add_user(path, "alice", "s3cret", ["alice@example.test"], ["Relay"])
    store = UsersFile(path)
    assert verifyObject(IDirectory, store)
    assert result(store.authenticate("Alice", "s3cret")) == AuthenticatedUser(
        "alice", frozenset({"alice@example.test"}), frozenset({"Relay"}))
    for name, password in (("alice", "wrong"), ("bob", "s3cret"), ("alice", "")):
        failure = result(store.authenticate(name, password))
        assert failure.check(UnauthorizedLogin)
        assert "s3cret" not in str(failure.value)


def test_usersfile_reloads_on_change(tmp_path: Path) -> None:
    """A user added after the store was made is seen on next use."""
    path = tmp_path / "users"
    store = UsersFile(path)
    assert not result(store.has_address("bob@example.test"))
    add_user(path, "bob", "pw", ["bob@example.test"])
    assert result(store.has_address("BOB@example.test"))
    assert result(store.check()) is None


def test_malformed_file_keeps_old_users(tmp_path: Path) -> None:
    """A broken file is reported and the users last read stay in use."""
    path = tmp_path / "users"
    add_user(path, "bob", "pw", ["bob@example.test"])
    store = UsersFile(path)
    assert result(store.has_address("bob@example.test"))
    path.write_text("{not json\n")
    assert result(store.has_address("bob@example.test"))
    with pytest.raises(UsersFileError):
        read_users(path)
    assert result(store.check()).check(UsersFileError)


class _InlinePool:
    """A thread pool stand-in that records and runs work at once."""

    def __init__(self) -> None:
        self.ran = 0

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], None], f: Callable[[], Any]
    ) -> None:
        self.ran += 1
        try:
            value = f()
        except BaseException:
            from twisted.python.failure import Failure

            onResult(False, Failure())
        else:
            onResult(True, value)


class _Reactor:
    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def test_hash_runs_in_thread_pool(tmp_path: Path) -> None:
    """With a reactor and pool, the scrypt check runs in the pool, not inline."""
    path = tmp_path / "users"
    add_user(path, "alice", "pw")
    pool = _InlinePool()
    store = UsersFile(path, reactor=_Reactor(), threadpool=pool)  # type: ignore[arg-type]
    assert result(store.authenticate("alice", "pw")).name == "alice"
    assert result(store.authenticate("alice", "bad")).check(UnauthorizedLogin)
    assert pool.ran == 2


_SCRYPT_IN_THREADS = """
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from relaygw.auth.usersfile import UsersFile, hash_password, verify_password

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

encoded = hash_password("pw")
if sys.argv[1] == "pooled":  # what the gateway does: a users file on a thread pool
    UsersFile(Path("users"), reactor=object(), threadpool=object())
before = rss()
with ThreadPoolExecutor(8) as pool:
    for _ in range(3):
        assert all(pool.map(lambda _: verify_password("pw", encoded), range(8)))
print(rss() - before)
"""


def _scrypt_growth_kib(mode: str) -> int:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SCRYPT_IN_THREADS, mode], capture_output=True,
                          text=True, timeout=120, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc for VmRSS")
def test_scrypt_in_threads_returns_its_memory() -> None:
    """
    Regression (soak): scrypt's 16 MiB work area used to stay resident in
    every thread's malloc arena (+80 MiB per receiving process).  With the
    users file set up for a thread pool, 8 threads hashing leave under
    32 MiB behind; the same work without it keeps more (glibc), so the
    check can fail.
    """
    pooled = _scrypt_growth_kib("pooled")
    assert pooled < 32 * 1024, f"{pooled} KiB kept"
    plain = _scrypt_growth_kib("plain")
    if plain < 64 * 1024:
        pytest.skip(f"this C library returns scrypt's memory anyway (+{plain} KiB)")
