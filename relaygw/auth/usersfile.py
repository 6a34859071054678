"""
The local users file (C{[users].file}): the credential store used when no
C{[directory]} is configured.

Format: UTF-8 text, one JSON object per line (JSON Lines); blank lines and
lines starting with C{#} are ignored::

    {"name": "alice", "password": "scrypt$16384$8$1$<salt>$<hash>",
     "addresses": ["alice@example.com"], "groups": ["SMTP Relay Devices"]}

(one line per user).  C{password} is C{scrypt$N$r$p$salt$hash} with salt
and hash in unpadded standard base64; new hashes use N=2**14, r=8, p=1
(16 MiB, about 65 ms on a 2020s server core), computed in the thread pool
when one is given so the reactor never waits.  Names are matched
case-insensitively (like Active Directory's); addresses are lower-cased.
The file is written atomically (temporary file, fsync, rename, directory
fsync) with mode 0600, and re-read when its inode, size or modification
time changes (checked, with one C{stat}, on every use).  A replaced file
(a new inode: relaygw's own writes, editors that save by rename) is used at
once; a file changed in place (an editor writing over it, which may show
it empty or half-written for a moment) once it has looked the same for
L{SETTLE} seconds on the gateway's own clock, not by the file's times:
ext4 shows a file being truncated with its new size (0) before its new
modification time, so an emptied file would look old.  A login that finds
such a change pending waits for it (once, at most L{SETTLE}), so the first
login after an edit gets the new version.  Until then, and whenever a
version cannot be read (logged once, with file and line), the last good
version stays in use, so that users the edit leaves alone never see a 535
(which would also count against the AUTH throttle).
"""

from __future__ import annotations

import binascii
import ctypes
import hashlib
import hmac
import json
import os
import time
from base64 import b64decode, b64encode
from collections.abc import Iterable
from pathlib import Path
from typing import Callable, TypeVar

from attrs import field, frozen
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relaygw.auth.user import AuthenticatedUser
from relaygw.interfaces import IDirectory

__all__ = [
    "UserEntry",
    "UsersFile",
    "UsersFileError",
    "add_user",
    "delete_user",
    "hash_password",
    "read_users",
    "verify_password",
    "write_users",
]

_T = TypeVar("_T")
#: Seconds a file changed in place must be seen unchanged before it is used.
SETTLE = 1.0
_N, _R, _P = 2**14, 8, 1
_MAXMEM = 64 * 1024 * 1024
#: glibc's mallopt parameter number of M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3
_large_buffers_returned = False


def _return_large_buffers() -> None:
    """
    Each scrypt call mallocs a 16 MiB work area.  glibc serves the first
    with mmap, then raises its mmap threshold above that size, so later
    ones come from the calling thread's arena and stay resident when freed:
    16 MiB kept per pool thread (measured: +80 MiB per receiving process
    after a soak).  A fixed threshold (1 MiB) keeps every work area an mmap,
    returned at once.  No-op where there is no glibc mallopt.
    """
    global _large_buffers_returned
    if _large_buffers_returned:
        return
    _large_buffers_returned = True
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


class UsersFileError(Exception):
    """The users file cannot be read or written; the message names the file and line."""


def _b64(data: bytes) -> str:
    return b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    """
    @return: C{scrypt$n$r$p$salt$hash} for C{password} with a fresh salt.
    @raise ValueError: an empty password.
    """
    if not password:
        raise ValueError("empty password")
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                            maxmem=_MAXMEM, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """
    Whether C{password} matches the C{scrypt$...} string C{encoded}
    (constant-time comparison).  A malformed C{encoded} never matches.
    """
    try:
        scheme, n, r, p, salt, expected = encoded.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=_unb64(salt),
                                n=int(n), r=int(r), p=int(p), maxmem=_MAXMEM,
                                dklen=len(_unb64(expected)))
        return hmac.compare_digest(digest, _unb64(expected))
    except (ValueError, binascii.Error, MemoryError):
        return False


# Compared against when the user is unknown, so that unknown and known
# names cost the same time.
_DUMMY = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


@frozen
class UserEntry:
    """One user of the file; C{password_hash} is never shown by C{repr}."""

    name: str
    password_hash: str = field(repr=False)
    addresses: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def user(self) -> AuthenticatedUser:
        """The session's view of this user."""
        return AuthenticatedUser(self.name, frozenset(self.addresses), frozenset(self.groups))

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "password": self.password_hash,
                           "addresses": list(self.addresses), "groups": list(self.groups)},
                          ensure_ascii=False)


def _strings(value: object, what: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsersFileError(f"{where}: {what} must be a list of strings")
    return tuple(value)


def read_users(path: Path) -> dict[str, UserEntry]:
    """
    @return: the users of the file by case-folded name (empty when the file
        does not exist).
    @raise UsersFileError: the file is unreadable or malformed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise UsersFileError(f"{path}: cannot read: {error}") from None
    users: dict[str, UserEntry] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except ValueError:
            raise UsersFileError(f"{where}: not a JSON object") from None
        if not isinstance(item, dict):
            raise UsersFileError(f"{where}: not a JSON object")
        name, password = item.get("name"), item.get("password")
        if not isinstance(name, str) or not name or not isinstance(password, str):
            raise UsersFileError(f"{where}: needs a name and a password hash")
        entry = UserEntry(
            name, password,
            tuple(a.lower() for a in _strings(item.get("addresses", []), "addresses", where)),
            _strings(item.get("groups", []), "groups", where),
        )
        users[name.casefold()] = entry
    return users


def write_users(path: Path, users: Iterable[UserEntry]) -> None:
    """
    Replace the file atomically: temporary file (mode 0600), fsync, rename,
    fsync of the directory.

    @raise OSError: the file cannot be written; the old one is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(entry.to_json() + "\n" for entry in users)
    header = "# relaygw users file: one JSON object per line; written by `relaygw user add`\n"
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(header + body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_name(name: str) -> None:
    if (not name or name != name.strip() or len(name) > 256
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise ValueError(f"{name!r} is not a usable user name")


def add_user(path: Path, name: str, password: str, addresses: Iterable[str] = (),
             groups: Iterable[str] = ()) -> bool:
    """
    Add C{name}, or replace it (password, addresses and groups).

    @return: C{True} when the user was new.
    @raise ValueError: an empty password, a bad name or address.
    @raise UsersFileError: the file is malformed.
    @raise OSError: the file cannot be written.
    """
    _check_name(name)
    if not password:
        raise ValueError("empty password")
    addresses = tuple(a.strip().lower() for a in addresses)
    for address in addresses:
        if "@" not in address or any(c.isspace() for c in address):
            raise ValueError(f"{address!r} is not an address")
    users = read_users(path)
    new = name.casefold() not in users
    users[name.casefold()] = UserEntry(name, hash_password(password), addresses, tuple(groups))
    write_users(path, users.values())
    return new


def delete_user(path: Path, name: str) -> bool:
    """
    @return: C{True} when C{name} was there and is removed, C{False} when unknown.
    @raise UsersFileError: the file is malformed.
    @raise OSError: the file cannot be written.
    """
    users = read_users(path)
    if users.pop(name.casefold(), None) is None:
        return False
    write_users(path, users.values())
    return True


@implementer(IDirectory)
class UsersFile:
    """
    The users file as an L{IDirectory}.

    @ivar path: the file.
    """

    _log = Logger()

    def __init__(
        self,
        path: Path,
        *,
        reactor: IReactorFromThreads | None = None,
        threadpool: ThreadPool | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param reactor: with C{threadpool}, where scrypt runs (off the
            reactor thread); without them it runs inline (the CLI).
        @param clock: what a change in place is timed on and a login waits
            on for it; without it (the CLI) the monotonic clock, no wait.
        """
        self.path = path
        self._reactor = reactor
        self._pool = threadpool
        if threadpool is not None:
            _return_large_buffers()
        self._users: dict[str, UserEntry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._clock = clock
        self._now: Callable[[], float] = clock.seconds if clock is not None else time.monotonic
        #: A change in place not used yet: its stamp and when it was first seen so.
        self._seen: tuple[tuple[int, int, int], float] | None = None

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return (0, 0, 0)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _current(self) -> tuple[dict[str, UserEntry], float]:
        """The users in use, and the seconds until a pending change in place may be used."""
        stamp = self._stat()
        if stamp == self._stamp:
            return self._users, 0.0
        if self._stamp is not None and stamp[0] == self._stamp[0] and stamp[0]:
            # Changed in place (same inode: an editor saving over the file,
            # not a rename): it may be half-written.  Keep the last good
            # version until the file has looked the same for SETTLE seconds.
            now = self._now()
            if self._seen is None or self._seen[0] != stamp:
                self._seen = (stamp, now)
            if now - self._seen[1] < SETTLE:
                return self._users, self._seen[1] + SETTLE - now
        try:
            users, problem = read_users(self.path), ""
        except UsersFileError as error:
            users, problem = self._users, str(error)
        if self._stat() != stamp:
            return self._users, 0.0  # written while read: read it again next time
        if problem:
            # Logged once per version (the stamp is kept), with file and line.
            self._log.error("users file not reloaded, the previous version stays: {problem}",
                            problem=problem)
            self._stamp = stamp
            return self._users, 0.0
        if self._stamp is not None:
            self._log.info("users file {path} reloaded: {count} user(s)",
                           path=str(self.path), count=len(users))
        self._users, self._stamp = users, stamp
        return self._users, 0.0

    def _settled(self, use: Callable[[dict[str, UserEntry]], Deferred[_T]]) -> Deferred[_T]:
        """
        C{use(users)}; when the file was just changed in place, after waiting
        for that change to settle (once: a file still changing then leaves
        the last good version in use).
        """
        users, wait = self._current()
        if wait <= 0 or self._clock is None:
            return use(users)
        return deferLater(self._clock, wait, lambda: None).addCallback(
            lambda _: use(self._current()[0]))

    def _run(self, f: Callable[[], _T]) -> Deferred[_T]:
        if self._reactor is not None and self._pool is not None:
            return deferToThreadPool(self._reactor, self._pool, f)
        try:
            return succeed(f())
        except Exception:
            return fail()

    def authenticate(
        self, username: str, password: str, gate: object | None = None
    ) -> Deferred[AuthenticatedUser]:
        """See L{IDirectory.authenticate}; one name per user here, so no C{gate} to ask."""
        if not password:
            return fail(UnauthorizedLogin("empty password"))

        def verify(users: dict[str, UserEntry]) -> Deferred[AuthenticatedUser]:
            entry = users.get(username.casefold())
            encoded = entry.password_hash if entry is not None else _DUMMY

            def check() -> AuthenticatedUser:
                if not verify_password(password, encoded) or entry is None:
                    raise UnauthorizedLogin("unknown user or wrong password")
                return entry.user()

            return self._run(check)

        return self._settled(verify)

    def has_address(self, address: str) -> Deferred[bool]:
        """See L{IDirectory.has_address}."""
        wanted = address.lower()
        return self._settled(lambda users: succeed(any(wanted in e.addresses
                                                       for e in users.values())))  # fmt: skip

    def check(self) -> Deferred[None]:
        """See L{IDirectory.check}: the file is readable (or absent, meaning no users)."""
        try:
            read_users(self.path)
        except UsersFileError as error:
            return fail(error)
        return succeed(None)

    def users(self) -> dict[str, UserEntry]:
        """The current users by case-folded name (re-read when the file changed)."""
        return dict(self._current()[0])
