"""
Credentials checking over an L{IDirectory}, and the address lookups of
C{validate_recipients}, both with bounded caches on an injected clock.

L{DirectoryChecker} is the twisted.cred checker: it refuses empty passwords
and impossible usernames before the directory is asked (an empty password
"succeeds" as an unauthenticated LDAP bind on many servers, RFC 4513
section 6.3.1), and caches successful logins for C{cache_ttl} as a salted
hash of the password, never the password itself.

Failures: L{UnauthorizedLogin} for wrong credentials (535 5.7.3);
L{DirectoryUnavailable} passes through unchanged (454 4.7.0).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from datetime import timedelta
from typing import Any, cast

from attrs import frozen
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from relaygw.auth.user import AuthenticatedUser
from relaygw.interfaces import IDirectory

__all__ = ["AddressLookup", "DirectoryChecker", "MAX_USERNAME"]

#: Longest accepted login name, in characters.
MAX_USERNAME = 256
# PBKDF2 rounds for the success cache: ~1 ms per cached login on the reactor
# thread; the salt is random per process and never leaves memory.
_CACHE_ROUNDS = 2000


@frozen
class _Cached:
    expires: float
    digest: bytes
    user: AuthenticatedUser


def _trim(cache: OrderedDict[Any, Any], limit: int, now: float) -> None:
    """Drop expired entries, then the oldest, until C{cache} fits C{limit}."""
    if len(cache) <= limit:
        return
    for key in [k for k, v in cache.items() if v.expires <= now]:
        del cache[key]
    while len(cache) > limit:
        cache.popitem(last=False)


@implementer(ICredentialsChecker)
class DirectoryChecker:
    """
    Checks L{IUsernamePassword} credentials against an L{IDirectory}.

    @ivar directory: the store asked on a cache miss.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        directory: IDirectory,
        clock: IReactorTime,
        cache_ttl: timedelta = timedelta(0),
        max_entries: int = 10_000,
    ) -> None:
        """
        @param cache_ttl: how long a successful login is remembered; zero
            disables the cache.
        @param max_entries: bound on cached logins.
        """
        self.directory = directory
        self._clock = clock
        self._ttl = cache_ttl.total_seconds()
        self._max = max_entries
        self._salt = os.urandom(16)
        self._cache: OrderedDict[str, _Cached] = OrderedDict()

    # The avatar id is the user value itself, not bytes: UserRealm takes it as is.
    def requestAvatarId(  # type: ignore[override]
        self, credentials: Any
    ) -> Deferred[AuthenticatedUser]:
        """
        @param credentials: an L{IUsernamePassword} provider (octets).
        @return: a Deferred firing with the L{AuthenticatedUser}; failing
            with L{UnauthorizedLogin} (wrong or impossible credentials) or
            L{relaygw.interfaces.DirectoryUnavailable}.
        """
        return Deferred.fromCoroutine(self._check(credentials))

    def _digest(self, username: str, password: str) -> bytes:
        return hashlib.pbkdf2_hmac(
            "sha256", password.encode("utf-8", "surrogatepass"),
            self._salt + username.encode("utf-8", "surrogatepass"), _CACHE_ROUNDS,
        )

    async def _check(self, credentials: Any) -> AuthenticatedUser:
        username, password = _texts(credentials)
        key = username.casefold()
        now = self._clock.seconds()
        digest = self._digest(key, password) if self._ttl > 0 else b""
        cached = self._cache.get(key)
        if cached is not None:
            if cached.expires > now and hmac.compare_digest(cached.digest, digest):
                return cached.user
            del self._cache[key]
        gate = getattr(credentials, "gate", None)
        user = cast(
            AuthenticatedUser,
            await cast("Deferred[object]", self.directory.authenticate(username, password, gate)),
        )
        if self._ttl > 0:
            self._cache[key] = _Cached(self._clock.seconds() + self._ttl, digest, user)
            _trim(self._cache, self._max, now)
        return user


def _texts(credentials: Any) -> tuple[str, str]:
    """The username and password as text, or L{UnauthorizedLogin} when impossible."""
    raw_user, raw_password = credentials.username, credentials.password
    if not isinstance(raw_user, bytes) or not isinstance(raw_password, bytes):
        raise UnauthorizedLogin("credentials are not octets")
    if not raw_password:
        raise UnauthorizedLogin("empty password")
    try:
        username = raw_user.decode("utf-8")
        password = raw_password.decode("utf-8")
    except UnicodeDecodeError:
        raise UnauthorizedLogin("username or password is not UTF-8") from None
    if not username.strip() or len(username) > MAX_USERNAME:
        raise UnauthorizedLogin("username empty or too long")
    if "\x00" in username or "\x00" in password:
        raise UnauthorizedLogin("NUL in username or password")
    return username, password


@frozen
class _Known:
    expires: float
    exists: bool


class AddressLookup:
    """
    C{validate_recipients}: whether an address exists in the directory,
    cached (positive and negative answers alike) and bounded.
    """

    def __init__(
        self,
        directory: IDirectory,
        clock: IReactorTime,
        ttl: timedelta = timedelta(seconds=60),
        max_entries: int = 10_000,
    ) -> None:
        self.directory = directory
        self._clock = clock
        self._ttl = ttl.total_seconds()
        self._max = max_entries
        self._cache: OrderedDict[str, _Known] = OrderedDict()

    def exists(self, address: str) -> Deferred[bool]:
        """
        @param address: C{local@domain}; compared case-insensitively.
        @return: a Deferred firing with C{True} or C{False}, or failing with
            L{relaygw.interfaces.DirectoryUnavailable} (never cached).
        """
        return Deferred.fromCoroutine(self._exists(address.lower()))

    async def _exists(self, address: str) -> bool:
        now = self._clock.seconds()
        known = self._cache.get(address)
        if known is not None and known.expires > now:
            return known.exists
        answer = bool(await cast("Deferred[object]", self.directory.has_address(address)))
        self._cache[address] = _Known(self._clock.seconds() + self._ttl, answer)
        self._cache.move_to_end(address)
        _trim(self._cache, self._max, now)
        return answer
