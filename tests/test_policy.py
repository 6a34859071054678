"""
Tests for L{relaygw.session.policy}: MAIL and RCPT decisions, and the classic
open-relay address forms through the parser and the policy together.
"""

from __future__ import annotations

import pytest
from attrs import evolve

from relaygw import replies
from relaygw.auth.user import AuthenticatedUser
from relaygw.config._model import AcceptedDomain, Binding, Connector, IPRange
from relaygw.replies import Reply
from relaygw.session.address import AddressError, Mailbox, parse_rcpt_to
from relaygw.session.policy import Policy

ANONYMOUS = frozenset({"submit", "accept-authoritative-sender"})
SUBMIT_ONLY = frozenset({"submit"})
AUTHENTICATED = frozenset({"submit", "relay"})

CONNECTOR = Connector(
    name="Default Frontend",
    bindings=(Binding("127.0.0.1", 2525),),
    remote_ranges=(IPRange.of(4, 0, 2**32 - 1, "0.0.0.0/0"),),
    fqdn="mail.example.test",
    max_recipients=3,
)
DOMAINS = (AcceptedDomain("example.test"), AcceptedDomain("*.corp.example"))
POLICY = Policy(CONNECTOR, DOMAINS)
ALICE = AuthenticatedUser("alice", frozenset({"Alice@Example.TEST"}), frozenset())


def _mail(
    sender: Mailbox | None,
    rights: frozenset[str] = ANONYMOUS,
    user: AuthenticatedUser | None = None,
    tls: bool = False,
    policy: Policy = POLICY,
) -> Reply:
    return policy.check_mail(rights=rights, user=user, sender=sender, tls_active=tls)


def _rcpt(recipient: Mailbox, rights: frozenset[str] = ANONYMOUS, so_far: int = 0) -> Reply:
    return POLICY.check_rcpt(rights=rights, recipient=recipient, accepted_so_far=so_far)


# --- accepted domains ---------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("example.test", True),
        ("EXAMPLE.Test", True),
        ("example.test.", True),
        ("example.test..", False),
        ("sub.example.test", False),
        ("evilexample.test", False),
        ("example.test.elsewhere.test", False),
        ("host.corp.example", True),
        ("a.b.corp.example", True),
        ("corp.example", False),
        ("evilcorp.example", False),
        ("", False),
        (".", False),
        ("[127.0.0.1]", False),
    ],
)
def test_is_accepted(domain: str, expected: bool) -> None:
    """Exact entries match the domain, "*." entries only subdomains; case and one dot ignored."""
    assert POLICY.is_accepted(domain) is expected


def test_ip_literal_accepted_only_when_configured_literally() -> None:
    """An IP literal is accepted only when that literal is itself an accepted domain."""
    policy = Policy(CONNECTOR, (AcceptedDomain("[192.0.2.1]"), AcceptedDomain("*.1]")))
    assert policy.is_accepted("[192.0.2.1]")
    assert not policy.is_accepted("[192.0.2.2]")
    assert not policy.is_accepted("[10.0.0.1]")


# --- MAIL ------------------------------------------------------------------------


def test_require_tls_first() -> None:
    """With require_tls, MAIL before TLS is 530 5.7.10, before any rights check."""
    policy = Policy(evolve(CONNECTOR, require_tls=True), DOMAINS)
    assert _mail(None, rights=frozenset(), policy=policy) == replies.MUST_STARTTLS
    assert _mail(None, policy=policy, tls=True) == replies.MAIL_OK


def test_anonymous_without_submit() -> None:
    """Anonymous without submit is 530 5.7.57, even for the null sender."""
    assert _mail(None, rights=frozenset()) == replies.NOT_AUTHENTICATED
    assert _mail(Mailbox("x", "elsewhere.test"), rights=frozenset()) == replies.NOT_AUTHENTICATED


def test_authenticated_without_submit() -> None:
    """An authenticated user without submit gets 550 5.7.60 (it is authenticated)."""
    assert _mail(Mailbox("alice", "example.test"), frozenset({"relay"}), ALICE) == (
        replies.SEND_AS_DENIED
    )


def test_null_sender_allowed() -> None:
    """The null sender is allowed to anonymous and authenticated sessions with submit."""
    assert _mail(None, SUBMIT_ONLY) == replies.MAIL_OK
    assert _mail(None, AUTHENTICATED, ALICE) == replies.MAIL_OK


def test_anonymous_sender_outside_accepted_domains() -> None:
    """An anonymous session may use any sender outside the accepted domains."""
    assert _mail(Mailbox("printer", "elsewhere.test"), SUBMIT_ONLY) == replies.MAIL_OK


@pytest.mark.parametrize(
    "sender",
    [
        Mailbox("ceo", "example.test"),
        Mailbox("CEO", "Example.TEST."),
        Mailbox("x", "host.corp.example"),
    ],
)
def test_anonymous_authoritative_sender_needs_right(sender: Mailbox) -> None:
    """An anonymous sender inside an accepted domain needs accept-authoritative-sender."""
    assert _mail(sender, SUBMIT_ONLY) == replies.SEND_AS_DENIED
    assert _mail(sender, ANONYMOUS) == replies.MAIL_OK


def test_anonymous_accept_any_sender() -> None:
    """accept-any-sender alone lets an anonymous session use an accepted-domain sender."""
    rights = frozenset({"submit", "accept-any-sender"})
    assert _mail(Mailbox("ceo", "example.test"), rights) == replies.MAIL_OK


def test_authenticated_own_address_case_insensitive() -> None:
    """An authenticated user may send as its own address, compared case-insensitively."""
    assert _mail(Mailbox("ALICE", "example.test"), AUTHENTICATED, ALICE) == replies.MAIL_OK
    assert _mail(Mailbox("alice", "example.test."), AUTHENTICATED, ALICE) == replies.MAIL_OK


@pytest.mark.parametrize(
    "sender",
    [
        Mailbox("bob", "example.test"),
        Mailbox("alice", "elsewhere.test"),
        Mailbox('"alice"', "example.test"),
    ],
)
def test_authenticated_other_address_denied(sender: Mailbox) -> None:
    """An authenticated user without accept-any-sender may not send as another address."""
    assert _mail(sender, AUTHENTICATED | {"accept-authoritative-sender"}, ALICE) == (
        replies.SEND_AS_DENIED
    )


def test_authenticated_kelvin_sign_is_not_k() -> None:
    """
    U+212A KELVIN SIGN lower-cases to "k", but a user may not send as a
    look-alike of its own address spelt with it.
    """
    karl = AuthenticatedUser("karl", frozenset({"karl@example.test"}), frozenset())
    for local in ("\u212aarl", "\u212aARL"):
        assert _mail(Mailbox(local, "example.test"), AUTHENTICATED, karl) == (
            replies.SEND_AS_DENIED
        )
    assert _mail(Mailbox("KARL", "example.test"), AUTHENTICATED, karl) == replies.MAIL_OK


def test_authenticated_accept_any_sender() -> None:
    """accept-any-sender lifts the send-as check for authenticated users."""
    rights = AUTHENTICATED | {"accept-any-sender"}
    assert _mail(Mailbox("bob", "elsewhere.test"), rights, ALICE) == replies.MAIL_OK


# --- RCPT ------------------------------------------------------------------------


def test_rcpt_accepted_domain() -> None:
    """A recipient in an accepted domain is accepted without relay."""
    assert _rcpt(Mailbox("alice", "example.test")) == replies.RCPT_OK


def test_rcpt_relay_denied() -> None:
    """A recipient outside the accepted domains without relay is 550 5.7.54."""
    assert _rcpt(Mailbox("bob", "elsewhere.test")) == replies.UNABLE_TO_RELAY


def test_rcpt_relay_right() -> None:
    """With relay, any domain is accepted."""
    assert _rcpt(Mailbox("bob", "elsewhere.test"), AUTHENTICATED) == replies.RCPT_OK


def test_rcpt_max_recipients() -> None:
    """Once max_recipients were accepted, the next RCPT is 452 4.5.3, before the relay check."""
    assert _rcpt(Mailbox("a", "example.test"), so_far=2) == replies.RCPT_OK
    assert _rcpt(Mailbox("a", "example.test"), so_far=3) == replies.TOO_MANY_RECIPIENTS
    assert _rcpt(Mailbox("a", "elsewhere.test"), so_far=3) == replies.TOO_MANY_RECIPIENTS


# --- the classic open-relay forms --------------------------------------------

SYNTAX = "syntax"
DENIED = "denied"
LOCAL = "local"

OPEN_RELAY_FORMS = [
    ("<bob%elsewhere.test@example.test>", LOCAL),
    ("<bob%elsewhere.test>", SYNTAX),
    ("<bob%example.test@elsewhere.test>", DENIED),
    ("<elsewhere.test!bob@example.test>", LOCAL),
    ("<elsewhere.test!bob>", SYNTAX),
    ("<example.test!bob@elsewhere.test>", DENIED),
    ('<"bob@elsewhere.test"@example.test>', LOCAL),
    ('<"bob@elsewhere.test">', SYNTAX),
    ('<"bob@example.test"@elsewhere.test>', DENIED),
    ('<"bob"@elsewhere.test>', DENIED),
    ("<@example.test:bob@elsewhere.test>", DENIED),
    ("<@example.test,@example.test:bob@elsewhere.test>", DENIED),
    ("<@elsewhere.test:bob@example.test>", LOCAL),
    ("@example.test:bob@elsewhere.test", DENIED),
    ("<bob@elsewhere.test.>", DENIED),
    ("<bob@example.test.>", LOCAL),
    ("<bob@elsewhere.test..>", SYNTAX),
    ("<bob@[127.0.0.1]>", DENIED),
    ("<bob@[IPv6:::1]>", DENIED),
    ('<"bob@example.test"@[127.0.0.1]>', DENIED),
    ("<bob@[example.test]>", SYNTAX),
    ("<BOB@ElseWhere.TEST>", DENIED),
    ("<BOB@EXAMPLE.TEST>", LOCAL),
    ("<bob@elsewhere.test@example.test>", SYNTAX),
    ("<bob@example.test@elsewhere.test>", SYNTAX),
    ("<bob@elsewhere.test%example.test>", SYNTAX),
    ("<bob@elsewhere.test!example.test>", SYNTAX),
    ("<bob@evilexample.test>", DENIED),
    ("<bob@example.test.elsewhere.test>", DENIED),
    ("<bob@host.corp.example>", LOCAL),
    ("<bob@corp.example>", DENIED),
    ("bob@elsewhere.test", DENIED),
    ("<bob@elsewhere.test>@example.test", SYNTAX),
    ("<bob@elsewhere.test> <bob@example.test>", SYNTAX),
    ("<bob@example.test\x00@elsewhere.test>", SYNTAX),
    ("<bob@example.test\r\n@elsewhere.test>", SYNTAX),
    ("<bob@elsewhere.test (example.test)>", SYNTAX),
    ("<bob\\@elsewhere.test@example.test>", SYNTAX),
]


@pytest.mark.parametrize(("path", "expected"), OPEN_RELAY_FORMS)
def test_open_relay_forms_without_relay(path: str, expected: str) -> None:
    """
    Without the relay right, no address form reaches a domain that is not
    accepted: each is a syntax refusal (501), or 550 5.7.54, or it routes to
    an accepted domain and is accepted.
    """
    try:
        recipient, _ = parse_rcpt_to(f"TO:{path}")
    except AddressError as e:
        assert e.reply in (replies.BAD_RECIPIENT_SYNTAX, replies.SYNTAX_ERROR)
        assert expected == SYNTAX
        return
    reply = _rcpt(recipient)
    if POLICY.is_accepted(recipient.routing_domain):
        assert (reply, expected) == (replies.RCPT_OK, LOCAL)
    else:
        assert (reply, expected) == (replies.UNABLE_TO_RELAY, DENIED)


@pytest.mark.parametrize("path", [p for p, kind in OPEN_RELAY_FORMS if kind != SYNTAX])
def test_open_relay_forms_with_relay(path: str) -> None:
    """With the relay right, every well-formed address is accepted."""
    recipient, _ = parse_rcpt_to(f"TO:{path}")
    assert _rcpt(recipient, AUTHENTICATED) == replies.RCPT_OK
