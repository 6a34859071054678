"""
AUTH (RFC 4954) for L{relaygw.session.protocol.Session}: the command, the
client responses inside an exchange, and the login through the throttle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred

from relaygw import replies
from relaygw.auth import sasl
from relaygw.auth.throttle import LoginResult, guarded_login
from relaygw.replies import Reply

if TYPE_CHECKING:
    from relaygw.session._state import SessionState as _Base
else:
    _Base = object

__all__ = ["AuthCommands"]


class AuthCommands(_Base):
    """The AUTH command and its exchange; a mixin of L{Session}."""

    def do_AUTH(self, args: str) -> Reply | Deferred[Reply]:
        if self.helo is None:
            return replies.NEED_HELO
        if self.user is not None:
            return replies.AUTH_ALREADY
        if self._txn is not None:
            return replies.BAD_SEQUENCE  # RFC 4954 section 4: not during a transaction
        parts = args.split()
        if not 1 <= len(parts) <= 2:
            return replies.SYNTAX_ERROR
        offered = {m.upper() for m in self._c.auth_mechanisms}
        started = sasl.start(parts[0], parts[1] if len(parts) == 2 else None)
        if not self._auth_offered() or parts[0].upper() not in offered or started is None:
            return replies.AUTH_MECHANISM
        return self._auth_step(*started)

    def _auth_line(self, line: bytes) -> None:
        """A client response inside an AUTH exchange (never logged: it is a secret)."""
        exchange = self._sasl
        assert exchange is not None
        if self._verbose:
            self._log.debug("< {data}", event="receive.command", data="****", **self._fields())
        reply = self._auth_step(exchange, exchange.respond(line.decode("ascii", "replace")))
        if isinstance(reply, Deferred):
            self._await(reply)
        else:
            self._answer(reply)

    def _auth_step(self, exchange: sasl.Exchange, step: sasl.Step) -> Reply | Deferred[Reply]:
        if isinstance(step, sasl.Challenge):
            self._sasl = exchange
            return replies.auth_challenge(step.prompt)
        self._sasl = None
        if isinstance(step, sasl.Refused):
            self._log.warn("AUTH from {peer} refused: {reason}", event="auth.result",
                           result="failure", reason=step.reason, auth_user=None,
                           **self._fields())
            return step.reply
        credentials = sasl.Credentials(step.username, step.password, self._client_ip,
                                       self._c.name)
        login = guarded_login(cast(Portal, self._factory.portal),
                              self._factory.auth_throttle(self._c), credentials,
                              self._reactor, self._fields(),
                              self._c.timeouts.command.total_seconds())
        return login.addCallback(self._authenticated)

    def _authenticated(self, result: LoginResult) -> Reply:
        if result.user is not None:
            self.user = result.user
            self._log.info("authenticated as {auth_user}", event="receive.authenticated",
                           auth_user=result.user.name, **self._fields())
        return result.reply
