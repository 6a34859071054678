"""
Tests for L{relaygw.auth.checker} (the twisted.cred checker over an
IDirectory, with its success cache) and L{relaygw.auth.realm}.  The
directory is a recording fake at relaygw's IDirectory seam.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relaygw.auth.checker import AddressLookup, DirectoryChecker
from relaygw.auth.realm import IAuthenticatedUser, UserRealm
from relaygw.auth.sasl import Credentials
from relaygw.auth.user import AuthenticatedUser
from relaygw.interfaces import DirectoryUnavailable, IDirectory


@implementer(IDirectory)
class RecordingDirectory:
    """
    A scripted IDirectory.  It records calls (never passwords).

    @ivar users: login (case-folded) -> (password, user).
    @ivar addresses: the addresses that exist.
    @ivar down: fail every call with DirectoryUnavailable.
    @ivar hold: answer with unfired Deferreds, kept in C{held}.
    @ivar accounts: login (case-folded) -> the account it means (as AD's
        aliases of one account); the login's gate is asked about that
        account before the "bind", and each bind is recorded as
        C{("bind", account)}.
    """

    def __init__(self) -> None:
        self.users: dict[str, tuple[str, AuthenticatedUser]] = {}
        self.addresses: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.down = False
        self.hold = False
        self.held: list[Deferred[Any]] = []
        self.accounts: dict[str, str] = {}

    def add(self, name: str, password: str, addresses: tuple[str, ...] = (),
            groups: tuple[str, ...] = ()) -> AuthenticatedUser:
        user = AuthenticatedUser(name, frozenset(addresses), frozenset(groups))
        self.users[name.casefold()] = (password, user)
        self.addresses.update(a.lower() for a in addresses)
        return user

    def _answer(self, value: Any) -> Deferred[Any]:
        if self.down:
            return fail(DirectoryUnavailable("no directory server answered (fake)"))
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.held.append(d)
            return d
        if isinstance(value, Exception):
            return fail(value)
        return succeed(value)

    def authenticate(self, username: str, password: str, gate: Any = None) -> Deferred[Any]:
        self.calls.append(("authenticate", username))
        account = self.accounts.get(username.casefold())
        if account is not None and gate is not None:
            # The gate may answer later (a receiving worker asks the gateway).
            return maybeDeferred(gate.admit, account).addCallback(
                self._bind, account, password)
        if account is not None:
            return self._bind(True, account, password)
        return self._check(username, password)

    def _bind(self, admitted: bool, account: str, password: str) -> Deferred[Any]:
        if not admitted:
            return fail(UnauthorizedLogin("account throttled"))
        self.calls.append(("bind", account))
        return self._check(account, password)

    def _check(self, username: str, password: str) -> Deferred[Any]:
        known = self.users.get(username.casefold())
        if known is None or known[0] != password or not password:
            return self._answer(UnauthorizedLogin("unknown user or wrong password"))
        return self._answer(known[1])

    def has_address(self, address: str) -> Deferred[Any]:
        self.calls.append(("has_address", address))
        return self._answer(address.lower() in self.addresses)

    def check(self) -> Deferred[Any]:
        self.calls.append(("check", ""))
        return self._answer(None)


def creds(user: bytes = b"alice", password: bytes = b"s3cret") -> Credentials:
    return Credentials(user, password, "192.0.2.1", "Client")


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = RecordingDirectory()
        self.alice = self.directory.add("alice", "s3cret", ("alice@example.test",), ("Relay",))
        self.checker = DirectoryChecker(self.directory, self.clock, timedelta(minutes=5))

    def test_provides_icredentialschecker(self) -> None:
        """The checker provides ICredentialsChecker; the fake provides IDirectory."""
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))
        self.assertTrue(verifyObject(IDirectory, self.directory))

    def test_success_returns_the_user(self) -> None:
        """Right credentials give the directory's AuthenticatedUser as avatar id."""
        self.assertEqual(self.successResultOf(self.checker.requestAvatarId(creds())), self.alice)

    def test_wrong_password_unauthorized(self) -> None:
        """A wrong password fails with UnauthorizedLogin."""
        self.failureResultOf(self.checker.requestAvatarId(creds(password=b"nope")),
                             UnauthorizedLogin)

    def test_empty_password_never_reaches_directory(self) -> None:
        """An empty password is refused before the directory is asked."""
        self.failureResultOf(self.checker.requestAvatarId(creds(password=b"")),
                             UnauthorizedLogin)
        self.assertEqual(self.directory.calls, [])

    def test_impossible_usernames_never_reach_directory(self) -> None:
        """Usernames with NUL, over 256 characters, empty or not UTF-8 are refused unasked."""
        for name in (b"ali\x00ce", b"a" * 257, b"", b"\xff\xfe"):
            self.failureResultOf(self.checker.requestAvatarId(creds(user=name)),
                                 UnauthorizedLogin)
        self.assertEqual(self.directory.calls, [])

    def test_directory_down_propagates(self) -> None:
        """DirectoryUnavailable passes through unchanged (the session answers 454)."""
        self.directory.down = True
        self.failureResultOf(self.checker.requestAvatarId(creds()), DirectoryUnavailable)

    def test_cache_hit_avoids_directory(self) -> None:
        """A repeated successful login within cache_ttl does not ask the directory."""
        self.successResultOf(self.checker.requestAvatarId(creds()))
        self.directory.down = True
        self.assertEqual(self.successResultOf(self.checker.requestAvatarId(creds())), self.alice)
        self.assertEqual(len(self.directory.calls), 1)

    def test_cache_expires(self) -> None:
        """After cache_ttl the directory is asked again."""
        self.successResultOf(self.checker.requestAvatarId(creds()))
        self.clock.advance(301)
        self.successResultOf(self.checker.requestAvatarId(creds()))
        self.assertEqual(len(self.directory.calls), 2)

    def test_cache_miss_on_other_password(self) -> None:
        """A different password is never answered from the cache."""
        self.successResultOf(self.checker.requestAvatarId(creds()))
        self.failureResultOf(self.checker.requestAvatarId(creds(password=b"other")),
                             UnauthorizedLogin)
        self.assertEqual(len(self.directory.calls), 2)

    def test_cache_holds_no_password(self) -> None:
        """The cache stores a salted hash, never the password."""
        self.successResultOf(self.checker.requestAvatarId(creds()))
        self.assertNotIn(b"s3cret", repr(vars(self.checker)).encode())
        self.assertNotIn("s3cret", repr(self.checker._cache))

    def test_zero_ttl_disables_cache(self) -> None:
        """cache_ttl 0s asks the directory every time."""
        checker = DirectoryChecker(self.directory, self.clock, timedelta(0))
        self.successResultOf(checker.requestAvatarId(creds()))
        self.successResultOf(checker.requestAvatarId(creds()))
        self.assertEqual(len(self.directory.calls), 2)

    def test_cache_bounded(self) -> None:
        """The cache never holds more than max_entries logins."""
        checker = DirectoryChecker(self.directory, self.clock, timedelta(minutes=5), max_entries=3)
        for i in range(10):
            self.directory.add(f"u{i}", "pw")
            self.successResultOf(checker.requestAvatarId(creds(f"u{i}".encode(), b"pw")))
        self.assertEqual(len(checker._cache), 3)


class RealmTests(SynchronousTestCase):
    def test_portal_returns_user_as_avatar(self) -> None:
        """Portal(UserRealm, [checker]).login gives the AuthenticatedUser for IAuthenticatedUser."""
        directory = RecordingDirectory()
        alice = directory.add("alice", "pw")
        realm = UserRealm()
        self.assertTrue(verifyObject(IRealm, realm))
        portal = Portal(realm, [DirectoryChecker(directory, Clock())])
        interface, avatar, logout = self.successResultOf(
            portal.login(creds(b"alice", b"pw"), None, IAuthenticatedUser))
        self.assertEqual((interface, avatar), (IAuthenticatedUser, alice))
        logout()


class AddressLookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = RecordingDirectory()
        self.directory.addresses.add("bob@example.test")
        self.lookup = AddressLookup(self.directory, self.clock, timedelta(seconds=60))

    def test_answers_cached_positive_and_negative(self) -> None:
        """Known and unknown answers are both cached for the ttl, case-insensitively."""
        self.assertTrue(self.successResultOf(self.lookup.exists("Bob@Example.test")))
        self.assertFalse(self.successResultOf(self.lookup.exists("nobody@example.test")))
        self.assertTrue(self.successResultOf(self.lookup.exists("bob@example.test")))
        self.assertFalse(self.successResultOf(self.lookup.exists("nobody@example.test")))
        self.assertEqual(len(self.directory.calls), 2)
        self.clock.advance(61)
        self.successResultOf(self.lookup.exists("bob@example.test"))
        self.assertEqual(len(self.directory.calls), 3)

    def test_unavailable_not_cached(self) -> None:
        """A failed lookup fails with DirectoryUnavailable and is asked again next time."""
        self.directory.down = True
        self.failureResultOf(self.lookup.exists("bob@example.test"), DirectoryUnavailable)
        self.directory.down = False
        self.assertTrue(self.successResultOf(self.lookup.exists("bob@example.test")))
