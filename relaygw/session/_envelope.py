"""
The envelope commands: MAIL and RCPT, with the rate limit, the policy
checks and C{validate_recipients} lookups.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from relaygw import replies
from relaygw.accept.intake import Transaction
from relaygw.interfaces import DirectoryUnavailable
from relaygw.replies import Reply
from relaygw.session.address import (
    AddressError,
    Mailbox,
    folds_into_ascii,
    parse_mail_from,
    parse_rcpt_to,
)
from relaygw.session.state import Conversation, SessionState

__all__ = ["EnvelopeCommands"]

_log = Logger(namespace="relaygw.session")
_BODY_TYPES = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})


class EnvelopeCommands:
    """MAIL and RCPT."""

    def __init__(self, state: SessionState, io: Conversation) -> None:
        self._s = state
        self._io = io

    def do_MAIL(self, args: str) -> Reply | None:
        s = self._s
        if s.helo is None:
            return replies.NEED_HELO
        if s.txn is not None:
            return replies.DUPLICATE_MAIL
        try:
            sender, params = parse_mail_from(args)
        except AddressError as e:
            return e.reply
        c = s.c
        body, smtputf8 = "7BIT", False
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return replies.BAD_SIZE_PARAM
                if int(value) > c.max_message_size:
                    return replies.TOO_BIG
            elif key == "BODY":
                if value is None or value.upper() not in _BODY_TYPES:
                    return replies.SYNTAX_ERROR
                body = value.upper()
            elif key == "SMTPUTF8":
                if value is not None:
                    return replies.SYNTAX_ERROR
                smtputf8 = True
            elif key != "AUTH":  # RFC 4954 section 5: AUTH= may be ignored
                return replies.BAD_PARAMETER
        if sender is not None and not smtputf8 and not str(sender).isascii():
            return replies.BAD_SENDER_SYNTAX
        key = f"user:{s.user.name}" if s.user else f"ip:{s.client_ip}"
        if not s.services.rate_limiter(c).allow(key):
            _log.warn("message rate limit reached for {rate_key}", rate_key=key,
                      event="receive.rate-limited", **s.fields())
            self._io.answer(replies.rate_limited(c.fqdn), close=True)
            return None
        assert s.policy is not None
        reply = s.policy.check_mail(rights=s.rights(), user=s.user, sender=sender,
                                    tls_active=s.tls_active)
        if reply.code < 400:
            s.txn = Transaction(sender, body=body, smtputf8=smtputf8)
        return reply

    def do_RCPT(self, args: str) -> Reply | Deferred[Reply]:
        s = self._s
        if s.helo is None:
            return replies.NEED_HELO
        txn = s.txn
        if txn is None:
            return replies.NEED_MAIL
        if txn.mode is not None:
            return replies.BAD_SEQUENCE
        try:
            recipient, params = parse_rcpt_to(args)
        except AddressError as e:
            return e.reply
        if params:
            return replies.BAD_PARAMETER
        if not txn.smtputf8 and not str(recipient).isascii():
            return replies.BAD_RECIPIENT_SYNTAX
        assert s.policy is not None
        reply = s.policy.check_rcpt(rights=s.rights(), recipient=recipient,
                                    accepted_so_far=len(txn.recipients))
        if reply.code >= 400:
            return reply
        entry = s.config.accepted_domain(recipient.routing_domain)
        if (entry is not None and entry.type == "authoritative" and entry.validate_recipients
                and s.services.addresses is not None
                and not recipient.routing_domain.startswith("[")):
            return Deferred.fromCoroutine(self._validate(txn, recipient))
        txn.recipients.append(recipient)
        return reply

    async def _validate(self, txn: Transaction, recipient: Mailbox) -> Reply:
        """C{validate_recipients}: look C{recipient} up in the directory (cached)."""
        s = self._s
        lookup = s.services.addresses
        assert lookup is not None
        address = f"{recipient.local}@{recipient.routing_domain}"
        try:
            # The lookup compares lower-cased: never let a Kelvin sign pass for "k".
            exists = not folds_into_ascii(address) and await lookup.exists(address)
        except DirectoryUnavailable as error:
            _log.error("recipient lookup failed: {problem}", problem=str(error),
                       event="receive.lookup-failed", **s.fields())
            return replies.RECIPIENT_LOOKUP_FAILED
        except Exception:
            _log.failure("recipient lookup failed", event="receive.lookup-failed",
                         **s.fields())
            return replies.RECIPIENT_LOOKUP_FAILED
        if not exists:
            _log.info("recipient <{recipient}> not found", recipient=address,
                      event="receive.recipient-unknown", **s.fields())
            return replies.RECIPIENT_NOT_FOUND
        if s.txn is txn:
            txn.recipients.append(recipient)
        return replies.RCPT_OK
