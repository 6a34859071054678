"""
The session commands: HELO and EHLO, STARTTLS, RSET, NOOP, QUIT, VRFY, HELP.
"""

from __future__ import annotations

from relaygw import replies
from relaygw.replies import Reply
from relaygw.session.state import Conversation, SessionState

__all__ = ["SessionCommands"]


def _text(args: str) -> str:
    """
    The HELO/EHLO name as text that can be stored: bytes that were not
    UTF-8 (lone surrogates from the line's decoding) become U+FFFD, or the
    spool entry of every message of the session could not be written.
    """
    if args.isascii():
        return args
    return args.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class SessionCommands:
    """Greeting, TLS and the commands that carry no mail."""

    def __init__(self, state: SessionState, io: Conversation) -> None:
        self._s = state
        self._io = io

    def do_HELO(self, args: str) -> Reply:
        s = self._s
        if not args:
            return replies.SYNTAX_ERROR
        s.reset_transaction()
        s.helo, s.esmtp = _text(args), False
        return replies.helo(s.c.fqdn, s.client_ip)

    def do_EHLO(self, args: str) -> Reply:
        s = self._s
        if not args:
            return replies.SYNTAX_ERROR
        s.reset_transaction()
        s.helo, s.esmtp = _text(args), True
        c = s.c
        keywords = [f"SIZE {c.max_message_size}", "PIPELINING", "8BITMIME",
                    "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if (c.tls == "starttls" and not s.tls_active
                and s.services.tls_options(c) is not None):
            keywords.append("STARTTLS")
        if s.auth_offered():
            keywords.append("AUTH " + " ".join(c.auth_mechanisms))
        keywords.append("CHUNKING")
        return replies.ehlo(c.fqdn, s.client_ip, keywords)

    def do_STARTTLS(self, args: str) -> Reply | None:
        s = self._s
        c = s.c
        if s.tls_active:
            return replies.TLS_ALREADY
        if c.tls != "starttls":
            return replies.UNRECOGNIZED
        if args:
            return replies.SYNTAX_ERROR
        if s.helo is None:
            return replies.NEED_HELO
        options = s.services.tls_options(c)
        if options is None:
            return replies.TLS_UNAVAILABLE
        self._io.start_tls(options)
        s.tls_active = True
        s.reset_transaction()
        s.helo, s.esmtp, s.user, s.sasl = None, False, None, None
        return None

    def do_RSET(self, args: str) -> Reply:
        self._s.reset_transaction()
        return replies.RESET_OK

    def do_NOOP(self, args: str) -> Reply:
        return replies.OK

    def do_QUIT(self, args: str) -> None:
        self._io.answer(replies.bye(self._s.c.fqdn), close=True)

    def do_VRFY(self, args: str) -> Reply:
        return replies.VRFY_REFUSED

    def do_HELP(self, args: str) -> Reply:
        return replies.HELP
