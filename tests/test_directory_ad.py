"""
L{relaygw.auth.directory.LDAPDirectory} against a real Samba Active
Directory domain controller on its own loopback address
(tests/servers/samba_ad.py), provisioned once per test session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.cred.error import UnauthorizedLogin

from relaygw.auth.directory import LDAPDirectory, _refuse_disabled_or_locked
from tests.servers import samba_ad as A
from tests.servers.dirtest import DirectoryTestCase, settings, ticks_during, unavailable
from tests.servers.slowproxy import DelayingProxy


@pytest.fixture(scope="session")
def samba_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One provisioned domain per test session (the seconds-long step), and its address."""
    unavailable(A.samba_unavailable())
    ip = A.pick_ip()
    return A.provision_template(tmp_path_factory.mktemp("samba-template"), ip), ip


@pytest.fixture(scope="session")
def samba_dc(
    samba_template: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[A.SambaDC]:
    """A DC copied from the template, for this session's AD tests."""
    template, ip = samba_template
    dc = A.start_dc(template, tmp_path_factory.mktemp("samba-dc"), ip)
    yield dc
    dc.stop()


class ADTests(DirectoryTestCase):
    @pytest.fixture(autouse=True)
    def _servers(self, samba_dc: A.SambaDC) -> None:
        self.dc = samba_dc

    def ad(self, *servers: str, timeout: float = 5) -> LDAPDirectory:
        config = settings(
            "active-directory",
            servers or (self.dc.ldaps_url,),
            base_dn=A.BASE_DN,
            bind_dn=A.SERVICE_DN,
            ca_file=self.dc.ca_file,
            timeout=timeout,
        )
        return self.directory(config, A.SERVICE_PASSWORD)

    async def refused(self, username: str, password: str) -> str:
        with pytest.raises(UnauthorizedLogin) as caught:
            await self.ad().authenticate(username, password)
        return str(caught.value)

    async def test_login_by_samaccountname(self) -> None:
        """
        sAMAccountName logs in; addresses are mail plus the smtp: proxyAddresses, lower-cased,
        X400 left out.
        """
        user = await self.ad().authenticate("alice", "alicepw")
        self.assertEqual(user.name, "alice")
        self.assertEqual(
            user.addresses, frozenset({"alice@example.test", "alice.smith@example.test"})
        )
        self.assertIn(A.dn("relay-users"), user.groups)

    async def test_login_by_upn(self) -> None:
        """The userPrincipalName logs in as the sAMAccountName."""
        user = await self.ad().authenticate("alice@example.test", "alicepw")
        self.assertEqual(user.name, "alice")

    async def test_login_by_domain_backslash_user(self) -> None:
        """EXAMPLE\\alice logs in as alice (the NetBIOS domain part is dropped)."""
        user = await self.ad().authenticate("EXAMPLE\\alice", "alicepw")
        self.assertEqual(user.name, "alice")

    async def test_starttls_login(self) -> None:
        """ldap:// on 389 with StartTLS works against AD too."""
        user = await self.ad(self.dc.ldap_url).authenticate("bob", "bobpw")
        self.assertEqual(user.name, "bob")

    async def test_nested_group_in_chain(self) -> None:
        """bob, in team-b, which is in relay-users, has both groups (in-chain rule)."""
        user = await self.ad().authenticate("bob", "bobpw")
        self.assertEqual(user.groups, frozenset({A.dn("team-b"), A.dn("relay-users")}))

    async def test_wrong_password_refused(self) -> None:
        """A wrong password is UnauthorizedLogin."""
        self.assertIn("49", await self.refused("bob", "not-bobpw"))

    async def test_disabled_account_refused(self) -> None:
        """A disabled account is refused even with its right password."""
        self.assertEqual(await self.refused("dave", "davepw"), "account disabled")

    async def test_locked_out_account_refused(self) -> None:
        """
        After the domain's lockout threshold of bad passwords, the right password is refused as
        locked out.
        """
        for _ in range(A.LOCKOUT_THRESHOLD):
            await self.refused("erin", "not-erinpw")
        self.assertEqual(await self.refused("erin", "erinpw"), "account locked out")

    async def test_injection_star(self) -> None:
        """'*' as a user name matches nobody."""
        self.assertEqual(await self.refused("*", "alicepw"), "unknown user")

    async def test_injection_or_clause(self) -> None:
        """'alice)(|(sAMAccountName=*' cannot add an alternative."""
        self.assertEqual(await self.refused("alice)(|(sAMAccountName=*", "alicepw"), "unknown user")

    async def test_has_address_proxy_address(self) -> None:
        """An smtp: proxyAddresses value (not the mail attribute) is a known address."""
        self.assertTrue(await self.ad().has_address("alice.smith@example.test"))

    async def test_has_address_unknown(self) -> None:
        """An address nobody holds is unknown."""
        self.assertFalse(await self.ad().has_address("nobody@example.test"))

    async def test_reactor_not_blocked_by_slow_directory(self) -> None:
        """
        While the DC answers 2 s late, a 10 ms LoopingCall keeps ticking (its certificate names
        localhost).
        """
        proxy = DelayingProxy((self.dc.ip, 636), delay=2.0)
        self.addCleanup(proxy.stop)
        directory = self.ad(f"ldaps://localhost:{proxy.port}", timeout=10)
        user, ticks = await ticks_during(lambda: directory.authenticate("alice", "alicepw"))
        self.assertEqual(user.name, "alice")
        self.assertGreater(ticks, 50)

    async def test_passwords_never_logged(self) -> None:
        """No log event or exception text carries a password, refused or accepted."""
        texts = []
        for name, password in [("alice", "alicepw"), ("alice", "Wr0ngSecret!"), ("dave", "davepw")]:
            try:
                await self.ad().authenticate(name, password)
            except UnauthorizedLogin as e:
                texts.append(str(e))
        logged = self.logged() + "\n".join(texts)
        self.assertIn("refused", logged)
        for secret in ("alicepw", "Wr0ngSecret!", "davepw", A.SERVICE_PASSWORD):
            self.assertNotIn(secret, logged)


def test_expired_lockout_not_refused() -> None:
    """
    lockoutTime stays set after a lockout expires; when the server computes
    msDS-User-Account-Control-Computed without UF_LOCKOUT, the account is not
    locked.
    """
    _refuse_disabled_or_locked(
        {"useraccountcontrol": ["512"], "lockouttime": ["133000000000000000"],
         "msds-user-account-control-computed": ["0"]}
    )  # fmt: skip


def test_lockout_time_used_without_computed_attribute() -> None:
    """Without the computed attribute, lockoutTime > 0 means locked out."""
    with pytest.raises(UnauthorizedLogin, match="locked"):
        _refuse_disabled_or_locked({"useraccountcontrol": ["512"], "lockouttime": ["1"]})


def test_computed_lockout_bit_refused() -> None:
    """UF_LOCKOUT (0x10) in msDS-User-Account-Control-Computed means locked out."""
    with pytest.raises(UnauthorizedLogin, match="locked"):
        _refuse_disabled_or_locked(
            {"useraccountcontrol": ["512"], "msds-user-account-control-computed": ["16"]}
        )
