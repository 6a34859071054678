"""
Errors that carry their meaning as data.

L{ConfigError} names the file, the key path and the problem (SPEC section 2).
L{RejectReply} and L{DeferReply} carry the L{Reply} the client gets plus a
reason that only reaches the log (maddy's rule in C{exterrors/smtp.go}).
"""

from __future__ import annotations

from twisted.mail.smtp import SMTPServerError

from relaygw.replies import Reply


class ConfigError(Exception):
    """
    A configuration problem.

    @ivar file: the file name as the administrator wrote it (C{"<embedded default>"} for the default).
    @ivar key_path: 0-based key path such as C{connectors[2].remote_ranges[0]}; C{""} for the whole file.
    @ivar problem: what is wrong, in words.
    """

    def __init__(self, file: str, key_path: str, problem: str) -> None:
        self.file = file
        self.key_path = key_path
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.key_path:
            return f"{self.file}: {self.key_path}: {self.problem}"
        return f"{self.file}: {self.problem}"


class _ReplyError(SMTPServerError):  # type: ignore[misc]
    """Base for errors that answer the client with a L{Reply}."""

    def __init__(self, reply: Reply, reason: str = "") -> None:
        self.reply = reply
        self.reason = reason
        # SMTPServerError(code, resp): kept for code that still speaks twisted.mail.
        super().__init__(reply.code, f"{reply.enhanced} {reply.text}".strip())

    def __str__(self) -> str:
        return f"{self.reply} ({self.reason})" if self.reason else str(self.reply)


class RejectReply(_ReplyError):
    """A permanent refusal: the client gets C{reply} (5xx), the log gets C{reason}."""


class DeferReply(_ReplyError):
    """A temporary refusal: the client gets C{reply} (4xx), the log gets C{reason}."""
