"""
What a receive session's command handlers share: the session's state, the
services it uses (L{SessionServices}, which the server factory provides),
and the conversation they answer through (L{Conversation}, which
L{relaygw.session.protocol.Session} provides).

Nothing here imports the factory or the protocol, so the session package's
imports run one way: protocol → handlers → state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from relaygw.session.rights import session_rights

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime

    from relaygw.accept.intake import DataDecoder, MessageIntake, Transaction
    from relaygw.auth import sasl
    from relaygw.auth.checker import AddressLookup
    from relaygw.auth.throttle import Throttle
    from relaygw.auth.user import AuthenticatedUser
    from relaygw.config._model import Config, Connector
    from relaygw.interfaces import IProtocolLog, IProtocolLogSession, ISpool
    from relaygw.replies import Reply
    from relaygw.session.limits import ConnectionCounter, RateLimiter
    from relaygw.session.policy import Policy
    from relaygw.spool.envelope import TLSInfo

__all__ = ["Conversation", "SessionServices", "SessionState", "seconds"]


def seconds(value: float) -> float | None:
    """A configured timeout for C{setTimeout}: zero (or less) means none."""
    return value if value > 0 else None


class SessionServices(Protocol):
    """What sessions share, per listening binding (the server factory)."""

    @property
    def reactor(self) -> IReactorTime: ...

    @property
    def spool(self) -> ISpool: ...

    @property
    def portal(self) -> object | None: ...

    @property
    def addresses(self) -> AddressLookup | None: ...

    @property
    def protocol_log(self) -> IProtocolLog | None: ...

    def session_id(self) -> str: ...

    def tls_options(self, connector: Connector) -> object | None: ...

    def connection_counter(self, connector: Connector) -> ConnectionCounter: ...

    def rate_limiter(self, connector: Connector) -> RateLimiter: ...

    def auth_throttle(self, connector: Connector) -> Throttle: ...


class Conversation(Protocol):
    """How a command handler answers and steers the session's input."""

    def answer(self, reply: Reply, close: bool = False) -> None:
        """Send the reply to a command (the bad-command rule applies)."""

    def wait_for(self, answer: Deferred[Reply]) -> None:
        """Answer when C{answer} fires; input that arrives meanwhile waits."""

    def command_mode(self) -> None:
        """Read command lines, under the command timeout."""

    def raw_mode(self, mode: str) -> None:
        """Read message data (C{"data"} or C{"bdat"}), under the data timeout."""

    def stop_idle_timeout(self) -> None:
        """No timeout while the client waits for us."""

    def restart_idle_timeout(self) -> None:
        """The command timeout again, unless the session is ending."""

    def start_tls(self, options: object) -> None:
        """Say 220, then start TLS; pipelined plaintext is discarded."""


class SessionState:
    """
    One session's state, read and changed by its command handlers.

    @ivar connector: the connector, once chosen.
    @ivar user: the authenticated user, C{None} before (or without) AUTH.
    @ivar helo: the HELO/EHLO argument, C{None} until greeted.
    @ivar tls: the negotiated TLS, once the handshake completed.
    @ivar txn: the mail transaction, from MAIL until it ends.
    @ivar intake: the message being received, during DATA or BDAT.
    @ivar sasl: the AUTH exchange waiting for a client response.
    @ivar plog: the protocol log handle (a verbose connector's sessions).
    """

    def __init__(self, services: SessionServices, config: Config, session_id: str) -> None:
        self.services = services
        self.config = config
        self.reactor = services.reactor
        self.session_id = session_id
        self.connector: Connector | None = None
        self.policy: Policy | None = None
        self.user: AuthenticatedUser | None = None
        self.helo: str | None = None
        self.esmtp = False
        self.tls: TLSInfo | None = None
        self.tls_active = False
        self.txn: Transaction | None = None
        self.intake: MessageIntake | None = None
        self.decoder: DataDecoder | None = None
        self.sasl: sasl.Exchange | None = None
        self.client_ip = ""
        self.client_port = 0
        self.verbose = False
        self.plog: IProtocolLogSession | None = None
        self.messages = 0

    @property
    def c(self) -> Connector:
        """The connector (commands run only once it is chosen)."""
        assert self.connector is not None
        return self.connector

    def fields(self) -> dict[str, Any]:
        """The fields every session log event carries."""
        return {
            "connector": self.connector.name if self.connector else None,
            "session_id": self.session_id,
            "peer": f"{self.client_ip}:{self.client_port}",
        }

    def rights(self) -> frozenset[str]:
        return session_rights(self.c, self.user)

    def auth_offered(self) -> bool:
        c = self.c
        return (
            self.services.portal is not None
            and self.user is None
            and bool(c.auth_mechanisms)
            and (self.tls_active or c.allow_plaintext_auth)
        )

    def abort_message(self) -> None:
        if self.intake is not None:
            self.intake.abort()
            self.intake = None
        self.decoder = None

    def reset_transaction(self) -> None:
        self.abort_message()
        self.txn = None
