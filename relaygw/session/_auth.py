"""
AUTH (RFC 4954): the command, the client responses inside an exchange, and
the login through the throttle.
"""

from __future__ import annotations

from typing import cast

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from relaygw import replies
from relaygw.auth import sasl
from relaygw.auth.throttle import LoginResult, guarded_login
from relaygw.replies import Reply
from relaygw.session.state import Conversation, SessionState

__all__ = ["AuthCommands"]

_log = Logger(namespace="relaygw.session")


class AuthCommands:
    """The AUTH command and its exchange."""

    def __init__(self, state: SessionState, io: Conversation) -> None:
        self._s = state
        self._io = io

    def do_AUTH(self, args: str) -> Reply | Deferred[Reply]:
        s = self._s
        if s.helo is None:
            return replies.NEED_HELO
        if s.user is not None:
            return replies.AUTH_ALREADY
        if s.txn is not None:
            return replies.BAD_SEQUENCE  # RFC 4954 section 4: not during a transaction
        parts = args.split()
        if not 1 <= len(parts) <= 2:
            return replies.SYNTAX_ERROR
        offered = {m.upper() for m in s.c.auth_mechanisms}
        started = sasl.start(parts[0], parts[1] if len(parts) == 2 else None)
        if not s.auth_offered() or parts[0].upper() not in offered or started is None:
            return replies.AUTH_MECHANISM
        return self._step(*started)

    def line(self, line: bytes) -> None:
        """A client response inside an AUTH exchange (never logged: it is a secret)."""
        s = self._s
        exchange = s.sasl
        assert exchange is not None
        if s.plog is not None:
            s.plog.row("<", "****")
        elif s.verbose:
            _log.debug("< {data}", event="receive.command", data="****", **s.fields())
        reply = self._step(exchange, exchange.respond(line.decode("ascii", "replace")))
        if isinstance(reply, Deferred):
            self._io.wait_for(reply)
        else:
            self._io.answer(reply)

    def _step(self, exchange: sasl.Exchange, step: sasl.Step) -> Reply | Deferred[Reply]:
        s = self._s
        if isinstance(step, sasl.Challenge):
            s.sasl = exchange
            return replies.auth_challenge(step.prompt)
        s.sasl = None
        if isinstance(step, sasl.Refused):
            _log.warn("AUTH from {peer} refused: {reason}", event="auth.result",
                      result="failure", reason=step.reason, auth_user=None, **s.fields())
            return step.reply
        c = s.c
        credentials = sasl.Credentials(step.username, step.password, s.client_ip, c.name)
        login = guarded_login(cast(Portal, s.services.portal), s.services.auth_throttle(c),
                              credentials, s.reactor, s.fields(),
                              c.timeouts.command.total_seconds())
        return login.addCallback(self._authenticated)

    def _authenticated(self, result: LoginResult) -> Reply:
        if result.user is not None:
            self._s.user = result.user
            if self._s.plog is not None:
                self._s.plog.row("*", result.user.name, "authenticated")
            _log.info("authenticated as {auth_user}", event="receive.authenticated",
                      auth_user=result.user.name, **self._s.fields())
        return result.reply
