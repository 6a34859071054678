"""
A session's rights (SPEC section 2, "Rights").

Before AUTH a session has the connector's C{permissions.anonymous}; after
AUTH, C{permissions.authenticated} plus the rights of every grant whose group
the user is a member of.  Pure: no I/O, no Twisted.
"""

from __future__ import annotations

import re

from relaygw.auth.user import AuthenticatedUser
from relaygw.config._model import Connector

__all__ = ["group_matches", "session_rights"]

# An attribute type (descr or numeric OID) followed by "=": what makes a DN a DN.
_RDN_START = re.compile(r"\s*(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*)\s*=")
_HEX = frozenset("0123456789abcdefABCDEF")


def session_rights(connector: Connector, user: AuthenticatedUser | None) -> frozenset[str]:
    """
    The rights of a session on C{connector}.

    @param user: the authenticated user, or C{None} before (or without) AUTH.
    @return: the set of right names (C{submit}, C{relay}, ...).
    """
    if user is None:
        return connector.permissions_anonymous
    rights = set(connector.permissions_authenticated)
    for grant in connector.grants:
        if any(group_matches(grant.group, g) for g in user.groups):
            rights |= grant.rights
    return frozenset(rights)


def group_matches(grant_group: str, user_group: str) -> bool:
    """
    Whether a grant naming C{grant_group} applies to a member of C{user_group}.

    Both may be a DN (C{CN=Relay,OU=Groups,DC=example,DC=com}) or a plain
    name (a group's CN, or a users-file group).  Comparison is
    case-insensitive; DNs are compared RDN by RDN, so spacing around C{,} and
    C{=} and escaping do not matter.  A plain grant matches a DN whose first
    RDN is C{CN=<that name>}.  A DN grant never matches a plain user group: it
    names one directory group, which a plain name cannot prove to be.

    @return: C{True} when the grant applies.
    """
    grant_dn = _parse_dn(grant_group)
    user_dn = _parse_dn(user_group)
    if grant_dn is None:
        name = grant_group.strip().casefold()
        if user_dn is None:
            return name == user_group.strip().casefold()
        return user_dn[0] == ("cn", name)
    return grant_dn == user_dn


def _parse_dn(text: str) -> list[tuple[str, str]] | None:
    """
    The RDNs of C{text} as case-folded (type, unescaped value) pairs, or
    C{None} when C{text} is not a DN.  Multi-valued RDNs (C{+}) stay one
    value; they do not occur in group grants.
    """
    if not _RDN_START.match(text):
        return None
    rdns: list[tuple[str, str]] = []
    for part in _split_unescaped(text):
        attr, eq, value = part.partition("=")
        if not eq or not attr.strip():
            return None
        rdns.append((attr.strip().casefold(), _unescape(value.strip()).casefold()))
    return rdns


def _split_unescaped(text: str) -> list[str]:
    parts: list[str] = []
    start = 0
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == ",":
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _unescape(value: str) -> str:
    # RFC 4514 section 2.4: "\" then a special character, or two hex digits (a UTF-8 octet).
    out = bytearray()
    i = 0
    while i < len(value):
        c = value[i]
        pair = value[i + 1 : i + 3]
        if c == "\\" and len(pair) == 2 and all(h in _HEX for h in pair):
            out.append(int(pair, 16))
            i += 3
        elif c == "\\" and i + 1 < len(value):
            out += value[i + 1].encode("utf-8")
            i += 2
        else:
            out += c.encode("utf-8")
            i += 1
    return out.decode("utf-8", errors="replace")
