"""
The twisted.cred realm of SMTP AUTH: the avatar id the checker produces is
already the L{AuthenticatedUser}, and the realm hands it to the session.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.cred.portal import IRealm
from zope.interface import Interface, implementer

from relaygw.auth.user import AuthenticatedUser

__all__ = ["IAuthenticatedUser", "UserRealm"]


class IAuthenticatedUser(Interface):
    """
    The avatar interface a session asks the portal for: the avatar is an
    L{AuthenticatedUser} (name, addresses, groups).
    """


def _logout() -> None:
    return None


@implementer(IRealm)
class UserRealm:
    """
    Returns the avatar id itself as the avatar, for L{IAuthenticatedUser}.
    """

    def requestAvatar(
        self, avatarId: Any, mind: object, *interfaces: Any
    ) -> tuple[Any, AuthenticatedUser, Callable[[], None]]:
        """
        @param avatarId: the L{AuthenticatedUser} from the checker.
        @return: C{(IAuthenticatedUser, user, logout)}.
        @raise NotImplementedError: L{IAuthenticatedUser} was not asked for,
            or the avatar id is not an L{AuthenticatedUser}.
        """
        if IAuthenticatedUser not in interfaces or not isinstance(avatarId, AuthenticatedUser):
            raise NotImplementedError("only IAuthenticatedUser avatars are served")
        return IAuthenticatedUser, avatarId, _logout
