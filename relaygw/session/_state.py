"""
What the command mixins of L{relaygw.session.protocol.Session} share with it.

L{seconds} is used at run time.  L{SessionState} declares, for the type
checker only, the session attributes and methods the mixins
(L{relaygw.session._auth}, L{relaygw.session._envelope},
L{relaygw.session._data}) use; they inherit it only under C{TYPE_CHECKING},
so at run time their base is C{object} and L{Session} supplies everything.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime
    from twisted.logger import Logger

    from relaygw.accept.intake import DataDecoder, MessageIntake, Transaction
    from relaygw.auth import sasl
    from relaygw.auth.user import AuthenticatedUser
    from relaygw.config._model import Config, Connector
    from relaygw.replies import Reply
    from relaygw.session.factory import SessionFactory
    from relaygw.session.policy import Policy
    from relaygw.spool.envelope import TLSInfo

__all__ = ["SessionState", "seconds"]


def seconds(value: float) -> float | None:
    """A configured timeout for C{setTimeout}: zero (or less) means none."""
    return value if value > 0 else None


class SessionState:
    """
    The part of L{relaygw.session.protocol.Session} its command mixins use.
    The methods are abstract so that the type checker refuses a L{Session}
    that lacks one.
    """

    _log: Logger
    _factory: SessionFactory
    _config: Config
    _reactor: IReactorTime
    user: AuthenticatedUser | None
    helo: str | None
    tls: TLSInfo | None
    _policy: Policy | None
    _esmtp: bool
    _tls_active: bool
    _txn: Transaction | None
    _intake: MessageIntake | None
    _decoder: DataDecoder | None
    _closing: bool
    _lost: bool
    _bdat_left: int
    _bdat_size: int
    _bdat_last: bool
    _bdat_refusal: Reply | None
    _client_ip: str
    _client_port: int
    _verbose: bool
    _sasl: sasl.Exchange | None
    _messages: int

    @property
    @abstractmethod
    def _c(self) -> Connector: ...

    @abstractmethod
    def _fields(self) -> dict[str, Any]: ...

    @abstractmethod
    def _set_timeout(self, seconds: float | None) -> None: ...

    @abstractmethod
    def _await(self, answer: Deferred[Reply]) -> None: ...

    @abstractmethod
    def _answer(self, reply: Reply, close: bool = False) -> None: ...

    @abstractmethod
    def _rights(self) -> frozenset[str]: ...

    @abstractmethod
    def _reset_transaction(self) -> None: ...

    @abstractmethod
    def _set_command_mode(self) -> None: ...

    @abstractmethod
    def _set_raw_mode(self, mode: str) -> None: ...

    @abstractmethod
    def _auth_offered(self) -> bool: ...
