"""
The authenticated user as the session sees it (the avatar the realm returns).
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import field, frozen

__all__ = ["AuthenticatedUser"]


def _lower_set(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.lower() for v in values)


def _set(values: Iterable[str]) -> frozenset[str]:
    return frozenset(values)


@frozen
class AuthenticatedUser:
    """
    A user who passed AUTH.

    @ivar name: the login name as the directory or users file knows it.
    @ivar addresses: the addresses the user may send as (AD: C{mail} and
        C{proxyAddresses}; users file: its C{--address} values), lower-cased
        on construction.
    @ivar groups: the user's groups, as DNs (directory) or plain names (users
        file); matched against grants by L{relaygw.session.rights.group_matches}.
    """

    name: str
    addresses: frozenset[str] = field(default=frozenset(), converter=_lower_set)
    groups: frozenset[str] = field(default=frozenset(), converter=_set)
