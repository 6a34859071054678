"""
MAIL and RCPT decisions of one connector (SPEC sections 2 "Rights" and 3).

Each check returns the L{Reply} to send: C{MAIL_OK} / C{RCPT_OK} or a
refusal.  The protocol asks and sends; it never decides.  Pure: no I/O, no
Twisted.
"""

from __future__ import annotations

from attrs import frozen

from relaygw import replies
from relaygw.auth.user import AuthenticatedUser
from relaygw.config._model import AcceptedDomain, Connector
from relaygw.replies import Reply
from relaygw.session.address import Mailbox, folds_into_ascii

__all__ = ["Policy"]


@frozen
class Policy:
    """
    The session policy of one connector.

    @ivar connector: the connector the session was given.
    @ivar accepted_domains: the configuration's accepted domains.
    """

    connector: Connector
    accepted_domains: tuple[AcceptedDomain, ...]

    def is_accepted(self, domain: str) -> bool:
        """
        Whether C{domain} is an accepted domain: an exact entry, or a
        subdomain of a C{*.} entry.

        @param domain: any case; one trailing dot is ignored.  An IP literal
            (C{[192.0.2.1]}) matches only an entry holding that literal
            exactly, never a wildcard.
        """
        d = domain.lower()
        if d.endswith("."):
            d = d[:-1]
        if not d or d.endswith("."):
            return False
        literal = d.startswith("[")
        for entry in self.accepted_domains:
            if literal and entry.domain.startswith("*."):
                continue
            if entry.matches(d):
                return True
        return False

    def check_mail(
        self,
        *,
        rights: frozenset[str],
        user: AuthenticatedUser | None,
        sender: Mailbox | None,
        tls_active: bool,
    ) -> Reply:
        """
        Decide a MAIL command.

        In order: C{require_tls} without TLS gives 530 5.7.10; no C{submit}
        gives 530 5.7.57 before AUTH and 550 5.7.60 after it (the user is
        known, so "not authenticated" would be false; Exchange answers a
        submit-less authenticated user with its send-as refusal too); the
        null sender is then always allowed; C{accept-any-sender} allows any
        sender; an anonymous sender inside an accepted domain needs
        C{accept-authoritative-sender}; an authenticated user may send only
        as one of its own addresses (case-insensitive, but a character
        outside ASCII never stands for an ASCII one: C{\\u212aarl} is not C{karl}).

        @param rights: the session's rights (L{relaygw.session.rights.session_rights}).
        @param user: the authenticated user, C{None} before AUTH.
        @param sender: the reverse path, C{None} for C{<>}.
        @param tls_active: whether the session runs over TLS now.
        @return: L{replies.MAIL_OK} or the refusal.
        """
        if self.connector.require_tls and not tls_active:
            return replies.MUST_STARTTLS
        if "submit" not in rights:
            return replies.NOT_AUTHENTICATED if user is None else replies.SEND_AS_DENIED
        if sender is None or "accept-any-sender" in rights:
            return replies.MAIL_OK
        if user is None:
            if self.is_accepted(sender.routing_domain) and (
                "accept-authoritative-sender" not in rights
            ):
                return replies.SEND_AS_DENIED
            return replies.MAIL_OK
        address = f"{sender.local.lower()}@{sender.routing_domain}"
        if not folds_into_ascii(sender.local) and address in {
            a.lower().rstrip(".") for a in user.addresses
        }:
            return replies.MAIL_OK
        return replies.SEND_AS_DENIED

    def check_rcpt(
        self, *, rights: frozenset[str], recipient: Mailbox, accepted_so_far: int
    ) -> Reply:
        """
        Decide a RCPT command.

        @param rights: the session's rights.
        @param recipient: the parsed forward path.
        @param accepted_so_far: recipients already accepted in this transaction.
        @return: L{replies.RCPT_OK}, 452 4.5.3 once C{max_recipients} were
            accepted, or 550 5.7.54 for a domain that is not accepted without
            the C{relay} right.
        """
        if accepted_so_far >= self.connector.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        if "relay" not in rights and not self.is_accepted(recipient.routing_domain):
            return replies.UNABLE_TO_RELAY
        return replies.RCPT_OK
