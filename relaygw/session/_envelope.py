"""
The envelope commands of L{relaygw.session.protocol.Session}: MAIL and RCPT,
with the rate limit, the policy checks and C{validate_recipients} lookups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred

from relaygw import replies
from relaygw.accept.intake import Transaction
from relaygw.interfaces import DirectoryUnavailable
from relaygw.replies import Reply
from relaygw.session.address import AddressError, Mailbox, parse_mail_from, parse_rcpt_to

if TYPE_CHECKING:
    from relaygw.session._state import SessionState as _Base
else:
    _Base = object

__all__ = ["EnvelopeCommands"]

_BODY_TYPES = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})


class EnvelopeCommands(_Base):
    """MAIL and RCPT; a mixin of L{Session}."""

    def do_MAIL(self, args: str) -> Reply | None:
        if self.helo is None:
            return replies.NEED_HELO
        if self._txn is not None:
            return replies.DUPLICATE_MAIL
        try:
            sender, params = parse_mail_from(args)
        except AddressError as e:
            return e.reply
        c = self._c
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
        key = f"user:{self.user.name}" if self.user else f"ip:{self._client_ip}"
        if not self._factory.rate_limiter(c).allow(key):
            self._log.warn("message rate limit reached for {rate_key}", rate_key=key,
                           event="receive.rate-limited", **self._fields())
            self._answer(replies.rate_limited(c.fqdn), close=True)
            return None
        assert self._policy is not None
        reply = self._policy.check_mail(rights=self._rights(), user=self.user, sender=sender,
                                        tls_active=self._tls_active)
        if reply.code < 400:
            self._txn = Transaction(sender, body=body, smtputf8=smtputf8)
        return reply

    def do_RCPT(self, args: str) -> Reply | Deferred[Reply]:
        if self.helo is None:
            return replies.NEED_HELO
        txn = self._txn
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
        assert self._policy is not None
        reply = self._policy.check_rcpt(rights=self._rights(), recipient=recipient,
                                        accepted_so_far=len(txn.recipients))
        if reply.code >= 400:
            return reply
        entry = self._config.accepted_domain(recipient.routing_domain)
        if (entry is not None and entry.type == "authoritative" and entry.validate_recipients
                and self._factory.addresses is not None
                and not recipient.routing_domain.startswith("[")):
            return Deferred.fromCoroutine(self._validate(txn, recipient))
        txn.recipients.append(recipient)
        return reply

    async def _validate(self, txn: Transaction, recipient: Mailbox) -> Reply:
        """C{validate_recipients}: look C{recipient} up in the directory (cached)."""
        lookup = self._factory.addresses
        assert lookup is not None
        address = f"{recipient.local}@{recipient.routing_domain}"
        try:
            exists = await lookup.exists(address)
        except DirectoryUnavailable as error:
            self._log.error("recipient lookup failed: {problem}", problem=str(error),
                            event="receive.lookup-failed", **self._fields())
            return replies.RECIPIENT_LOOKUP_FAILED
        except Exception:
            self._log.failure("recipient lookup failed", event="receive.lookup-failed",
                              **self._fields())
            return replies.RECIPIENT_LOOKUP_FAILED
        if not exists:
            self._log.info("recipient <{recipient}> not found", recipient=address,
                           event="receive.recipient-unknown", **self._fields())
            return replies.RECIPIENT_NOT_FOUND
        if self._txn is txn:
            txn.recipients.append(recipient)
        return replies.RCPT_OK
