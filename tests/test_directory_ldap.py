"""
L{relaygw.auth.directory.LDAPDirectory} against a real OpenLDAP slapd on
loopback (tests/servers/slapd.py), over StartTLS and LDAPS.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.cred.error import UnauthorizedLogin

from relaygw.auth.directory import LDAPDirectory
from relaygw.auth.user import AuthenticatedUser
from relaygw.interfaces import DirectoryUnavailable
from tests.servers import slapd as S
from tests.servers.certs import self_signed
from tests.servers.dirtest import (
    DirectoryTestCase,
    closed_port,
    from_directory,
    settings,
    ticks_during,
    unavailable,
)
from tests.servers.slowproxy import DelayingProxy


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S.Slapd]:
    """One slapd with the fixture data for the module's read-only tests."""
    unavailable(S.slapd_unavailable())
    server = S.start_slapd(tmp_path_factory.mktemp("slapd"))
    yield server
    server.stop()


class _Base(DirectoryTestCase):
    @pytest.fixture(autouse=True)
    def _servers(self, slapd: S.Slapd, tmp_path: Path) -> None:
        self.slapd = slapd
        self.tmp = tmp_path

    def ldap(self, *servers: str, ca_file: Path | None = None, timeout: float = 5,
             password: str = S.SERVICE_PASSWORD) -> LDAPDirectory:  # fmt: skip
        config = settings(
            "ldap",
            servers or (self.slapd.ldaps_url,),
            base_dn=S.BASE_DN,
            bind_dn=S.SERVICE_DN,
            ca_file=ca_file or self.slapd.ca_file,
            timeout=timeout,
        )
        return self.directory(config, password)

    async def refused(self, directory: LDAPDirectory, username: str, password: str) -> str:
        """Assert the login fails with UnauthorizedLogin; return its reason."""
        with pytest.raises(UnauthorizedLogin) as caught:
            await directory.authenticate(username, password)
        return str(caught.value)

    def _wrong_ca(self) -> Path:
        other = self.tmp / "other-ca.pem"
        self_signed(other, self.tmp / "other-key.pem", "localhost", ["localhost", "127.0.0.1"])
        return other

    def connections(self, server: S.Slapd | None = None) -> int:
        """How many connections slapd has accepted so far (from its stats log)."""
        log = ((server or self.slapd).directory / "slapd.log").read_text(errors="replace")
        return log.count(" ACCEPT from ")


class LoginTests(_Base):
    async def test_starttls_login_by_uid(self) -> None:
        """
        A uid and its password log in over ldap:// with StartTLS; the user carries uid, mail
        values and groups.
        """
        directory = self.ldap(self.slapd.ldap_url)
        user = await directory.authenticate("alice", "alicepw")
        self.assertEqual(
            user,
            AuthenticatedUser(
                "alice",
                frozenset({"alice@example.com", "alice.smith@example.com"}),
                frozenset({S.group_dn("relay-users"), S.group_dn("admins")}),
            ),
        )

    async def test_ldaps_login_by_mail(self) -> None:
        """A mail address logs in over ldaps://; the canonical name is the uid."""
        user = await self.ldap().authenticate("bob@example.com", "bobpw")
        self.assertEqual(user.name, "bob")
        self.assertEqual(user.addresses, frozenset({"bob@example.com"}))

    async def test_wrong_password_refused(self) -> None:
        """A wrong password is UnauthorizedLogin (the server's invalidCredentials)."""
        reason = await self.refused(self.ldap(), "alice", "alicepw-not")
        self.assertIn("49", reason)

    async def test_unknown_user_refused(self) -> None:
        """A name that matches no entry is UnauthorizedLogin."""
        self.assertEqual(await self.refused(self.ldap(), "nobody", "x"), "unknown user")

    async def test_ambiguous_login_refused(self) -> None:
        """A name matching two entries is refused even with their shared password."""
        reason = await self.refused(self.ldap(), "shared@example.com", "duppw")
        self.assertIn("more than one", reason)

    async def test_nested_group(self) -> None:
        """A member of team-c, a member of relay-users, gets both groups."""
        user = await self.ldap().authenticate("carol", "carolpw")
        self.assertEqual(user.groups, frozenset({S.group_dn("team-c"), S.group_dn("relay-users")}))

    async def test_groups_by_member_without_memberof(self) -> None:
        """A user without memberOf values gets the groups whose member is its DN."""
        user = await self.ldap().authenticate("dan", "danpw")
        self.assertEqual(user.groups, frozenset({S.group_dn("admins")}))

    async def test_has_address(self) -> None:
        """has_address is true for a second mail value, false for an unknown address."""
        directory = self.ldap()
        self.assertTrue(await directory.has_address("alice.smith@example.com"))
        self.assertFalse(await directory.has_address("nobody@example.com"))

    async def test_has_address_wildcard_is_literal(self) -> None:
        """A '*' in an address is matched literally, never as a wildcard."""
        self.assertFalse(await self.ldap().has_address("*"))

    async def test_check(self) -> None:
        """check() succeeds when the service account can bind."""
        self.assertIsNone(await self.ldap().check())

    async def test_check_wrong_service_password(self) -> None:
        """A refused service-account bind makes the directory unavailable, not the user wrong."""
        with pytest.raises(DirectoryUnavailable):
            await self.ldap(password="not-svcpw").check()

    def test_bind_dn_without_password_rejected(self) -> None:
        """A bind DN with an empty password (an unauthenticated bind) is refused at construction."""
        with pytest.raises(ValueError):
            self.ldap(password="")


class InjectionTests(_Base):
    """Usernames that would change the filter match nobody, with a password that would work."""

    async def _nobody(self, username: str) -> None:
        before = self.connections()
        reason = await self.refused(self.ldap(), username, "alicepw")
        self.assertEqual(reason, "unknown user")
        self.assertGreater(self.connections(), before)  # the server was asked, and matched no one

    async def test_star(self) -> None:
        """'*' is searched literally and matches nobody."""
        await self._nobody("*")

    async def test_close_paren(self) -> None:
        """')(uid=*' cannot close the filter."""
        await self._nobody(")(uid=*")

    async def test_or_clause(self) -> None:
        """'alice)(|(uid=*' cannot add an alternative."""
        await self._nobody("alice)(|(uid=*")

    async def test_backslash(self) -> None:
        """A backslash is escaped, not taken as a filter escape."""
        await self._nobody("alic\\65")

    async def test_nul_refused_without_asking(self) -> None:
        """A NUL byte in the name is refused before any connection."""
        before = self.connections()
        reason = await self.refused(self.ldap(), "alice\0", "alicepw")
        self.assertIn("NUL", reason)
        self.assertEqual(self.connections(), before)

    async def test_huge_name_refused_quickly(self) -> None:
        """A 1 MiB user name is refused without a connection, within a second."""
        before = self.connections()
        started = time.monotonic()
        reason = await self.refused(self.ldap(), "a" * (1 << 20), "alicepw")
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertIn("longer", reason)
        self.assertEqual(self.connections(), before)


class EmptyPasswordTests(_Base):
    @pytest.fixture(autouse=True)
    def _anon_dn(self, tmp_path: Path) -> Iterator[None]:
        self.permissive = S.start_slapd(tmp_path / "anon", allow_bind_anon_dn=True)
        yield
        self.permissive.stop()

    def test_server_would_accept_empty_password(self) -> None:
        """The danger is real: this slapd answers a DN with an empty password with success."""
        done = S.ldapwhoami(self.permissive, S.user_dn("alice"), "")
        self.assertEqual((done.returncode, done.stdout.strip()), (0, "anonymous"))

    async def test_empty_password_refused_without_bind(self) -> None:
        """
        An empty password is UnauthorizedLogin before any connection, even where the server
        would accept it.
        """
        directory = self.ldap(self.permissive.ldaps_url, ca_file=self.permissive.ca_file)
        before = self.connections(self.permissive)
        reason = await self.refused(directory, "alice", "")
        self.assertEqual(reason, "empty password")
        self.assertEqual(self.connections(self.permissive), before)


class AvailabilityTests(_Base):
    async def test_failover_skips_closed_port(self) -> None:
        """With the first server refusing connections, the second one answers the login."""
        dead = f"ldaps://127.0.0.1:{closed_port()}"
        user = await self.ldap(dead, self.slapd.ldaps_url).authenticate("alice", "alicepw")
        self.assertEqual(user.name, "alice")
        self.assertTrue(any(dead in t for t in self.log_texts(from_directory)))

    async def test_all_servers_down(self) -> None:
        """When no server connects, the login fails with DirectoryUnavailable (454, never 535)."""
        a, b = (f"ldap://127.0.0.1:{closed_port()}" for _ in range(2))
        with pytest.raises(DirectoryUnavailable):
            await self.ldap(a, b).authenticate("alice", "alicepw")

    async def test_stopped_mid_run(self) -> None:
        """A login works, the directory stops, and the next login is DirectoryUnavailable."""
        own = S.start_slapd(self.tmp / "own")
        self.addCleanup(own.stop)
        directory = self.ldap(own.ldap_url, ca_file=own.ca_file)
        self.assertEqual((await directory.authenticate("bob", "bobpw")).name, "bob")
        own.stop()
        with pytest.raises(DirectoryUnavailable):
            await directory.authenticate("bob", "bobpw")

    async def test_silent_server_times_out(self) -> None:
        """
        A server that accepts TCP but never answers costs one timeout, then
        DirectoryUnavailable.
        """
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            url = f"ldaps://127.0.0.1:{silent.getsockname()[1]}"
            started = time.monotonic()
            with pytest.raises(DirectoryUnavailable):
                await self.ldap(url, timeout=1).check()
            self.assertLess(time.monotonic() - started, 10)

    async def test_ldaps_wrong_ca_unavailable(self) -> None:
        """
        LDAPS to a certificate the ca_file does not vouch for is DirectoryUnavailable; the log
        says why.
        """
        with pytest.raises(DirectoryUnavailable):
            await self.ldap(ca_file=self._wrong_ca()).authenticate("alice", "alicepw")
        logged = self.log_texts(from_directory)
        self.assertTrue(any("CERTIFICATE_VERIFY_FAILED" in t for t in logged))

    async def test_starttls_wrong_ca_unavailable(self) -> None:
        """StartTLS to a certificate the ca_file does not vouch for is DirectoryUnavailable."""
        directory = self.ldap(self.slapd.ldap_url, ca_file=self._wrong_ca())
        with pytest.raises(DirectoryUnavailable):
            await directory.authenticate("alice", "alicepw")

    async def test_reactor_not_blocked_by_slow_directory(self) -> None:
        """While the directory takes 2 s per answer, a 10 ms LoopingCall keeps ticking."""
        proxy = DelayingProxy(("127.0.0.1", self.slapd.ldaps_port), delay=2.0)
        self.addCleanup(proxy.stop)
        directory = self.ldap(f"ldaps://127.0.0.1:{proxy.port}", timeout=10)
        user, ticks = await ticks_during(lambda: directory.authenticate("alice", "alicepw"))
        self.assertEqual(user.name, "alice")
        # 2 s at 10 ms is 200 ticks; a blocked reactor would give one.
        self.assertGreater(ticks, 50)


class SecrecyTests(_Base):
    async def test_passwords_never_logged(self) -> None:
        """No log event or exception text carries a password, whatever the outcome."""
        secrets = ["alicepw", "Wr0ngSecret!", S.SERVICE_PASSWORD, "svc-wrong-pw"]
        texts = []
        good = self.ldap()
        for directory, password in [
            (good, "alicepw"),
            (good, "Wr0ngSecret!"),
            (self.ldap(password="svc-wrong-pw"), "alicepw"),
            (self.ldap(f"ldaps://127.0.0.1:{closed_port()}"), "alicepw"),
            (self.ldap(self.slapd.ldap_url, ca_file=self._wrong_ca()), "Wr0ngSecret!"),
        ]:
            try:
                await directory.authenticate("alice", password)
            except Exception as e:
                texts += [str(e), repr(e)]
            texts.append(repr(directory))
        logged = self.logged() + "\n".join(texts)
        self.assertIn("refused", logged)  # something was logged
        for secret in secrets:
            self.assertNotIn(secret, logged)
