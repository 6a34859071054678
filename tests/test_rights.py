"""
Tests for L{relaygw.session.rights}: a session's rights (SPEC section 2, "Rights").
"""

from __future__ import annotations

import pytest

from relaygw.auth.user import AuthenticatedUser
from relaygw.config._model import Binding, Connector, Grant, IPRange
from relaygw.session.rights import group_matches, session_rights

RELAY_DN = "CN=SMTP Relay Devices,OU=Groups,DC=example,DC=com"


def _connector(*grants: Grant) -> Connector:
    return Connector(
        name="Client Frontend",
        bindings=(Binding("127.0.0.1", 5870),),
        remote_ranges=(IPRange.of(4, 0, 2**32 - 1, "0.0.0.0/0"),),
        fqdn="mail.example.test",
        permissions_anonymous=frozenset({"submit"}),
        permissions_authenticated=frozenset({"submit", "relay"}),
        grants=grants,
    )


def test_anonymous_rights() -> None:
    """Before AUTH a session has exactly permissions.anonymous."""
    grant = Grant("Everyone", frozenset({"accept-any-sender"}))
    assert session_rights(_connector(grant), None) == frozenset({"submit"})


def test_authenticated_rights_without_grants() -> None:
    """After AUTH a user in no granted group has exactly permissions.authenticated."""
    user = AuthenticatedUser("alice", frozenset(), frozenset({"Staff"}))
    grant = Grant("SMTP Relay Devices", frozenset({"accept-any-sender"}))
    assert session_rights(_connector(grant), user) == frozenset({"submit", "relay"})


def test_grant_by_cn_matches_member_dn() -> None:
    """A grant naming a group's CN adds its rights for a member listed by DN."""
    user = AuthenticatedUser("scanner", frozenset(), frozenset({RELAY_DN}))
    grant = Grant("smtp relay devices", frozenset({"accept-any-sender"}))
    assert session_rights(_connector(grant), user) == frozenset(
        {"submit", "relay", "accept-any-sender"}
    )


def test_grants_accumulate() -> None:
    """Every matching grant adds its rights; non-matching ones add nothing."""
    user = AuthenticatedUser("p", frozenset(), frozenset({"A", "b"}))
    grants = (
        Grant("a", frozenset({"accept-any-sender"})),
        Grant("B", frozenset({"accept-authoritative-sender"})),
        Grant("C", frozenset({"nothing-else"})),
    )
    assert session_rights(_connector(*grants), user) == frozenset(
        {"submit", "relay", "accept-any-sender", "accept-authoritative-sender"}
    )


@pytest.mark.parametrize(
    ("grant", "group", "expected"),
    [
        ("SMTP Relay Devices", "smtp relay devices", True),
        ("SMTP Relay Devices", "SMTP Relay", False),
        ("SMTP Relay Devices", RELAY_DN, True),
        ("smtp relay devices", RELAY_DN.lower(), True),
        ("OU=Groups", RELAY_DN, False),
        ("Groups", RELAY_DN, False),
        ("example", RELAY_DN, False),
        (RELAY_DN, RELAY_DN.upper(), True),
        (RELAY_DN, "cn=smtp relay devices, ou=groups, dc=example, dc=com", True),
        (RELAY_DN, "CN=SMTP Relay Devices,OU=Other,DC=example,DC=com", False),
        (RELAY_DN, "SMTP Relay Devices", False),
        ("Relay, Printers", r"CN=Relay\, Printers,OU=Groups,DC=example,DC=com", True),
        ("Relay, Printers", r"CN=Relay\2C Printers,OU=Groups,DC=example,DC=com", True),
        ("Relay", r"CN=Relay\, Printers,OU=Groups,DC=example,DC=com", False),
        ("Relay", "OU=Relay,DC=example,DC=com", False),
    ],
)
def test_group_matches(grant: str, group: str, expected: bool) -> None:
    """Grant groups match DNs and CNs case-insensitively; a CN matches a DN's first RDN only."""
    assert group_matches(grant, group) is expected
