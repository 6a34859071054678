"""
Tests for L{relaygw.session.address}: MAIL FROM / RCPT TO argument parsing.
"""

from __future__ import annotations

import pytest

from relaygw import replies
from relaygw.replies import Reply
from relaygw.session.address import (
    AddressError,
    Mailbox,
    folds_into_ascii,
    parse_mail_from,
    parse_rcpt_to,
)


def _rcpt_error(args: str) -> Reply:
    with pytest.raises(AddressError) as info:
        parse_rcpt_to(args)
    return info.value.reply


def _mail_error(args: str) -> Reply:
    with pytest.raises(AddressError) as info:
        parse_mail_from(args)
    return info.value.reply


def test_mail_from_with_params() -> None:
    """MAIL FROM:<a@b> with parameters gives the mailbox and upper-cased keys."""
    sender, params = parse_mail_from("FROM:<alice@example.test> size=10 BODY=8BITMIME SMTPUTF8")
    assert sender == Mailbox("alice", "example.test")
    assert params == {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}


def test_leading_space_and_case_of_verb_argument() -> None:
    """The text after the verb may start with a blank, and "from:" is case-insensitive."""
    sender, _ = parse_mail_from(" from:<a@example.test>")
    assert sender == Mailbox("a", "example.test")


def test_null_sender() -> None:
    """MAIL FROM:<> is the null sender, returned as None."""
    assert parse_mail_from("FROM:<> BODY=7BIT") == (None, {"BODY": "7BIT"})


def test_space_after_colon_tolerated() -> None:
    """Devices that put a space after the colon are accepted."""
    assert parse_mail_from("FROM: <a@example.test>")[0] == Mailbox("a", "example.test")
    assert parse_rcpt_to("TO: <b@example.test>")[0] == Mailbox("b", "example.test")


def test_missing_brackets_tolerated() -> None:
    """A path without angle brackets is accepted, parameters still split off."""
    rcpt, params = parse_rcpt_to("TO:bob@example.test NOTIFY=NEVER")
    assert rcpt == Mailbox("bob", "example.test")
    assert params == {"NOTIFY": "NEVER"}


def test_malformed_from_part_is_syntax_error() -> None:
    """A MAIL argument that does not start with FROM: is 501 5.5.4."""
    assert _mail_error("TO:<a@example.test>") == replies.SYNTAX_ERROR
    assert _mail_error("FROM <a@example.test>") == replies.SYNTAX_ERROR
    assert _mail_error("") == replies.SYNTAX_ERROR


def test_malformed_to_part_is_syntax_error() -> None:
    """A RCPT argument that does not start with TO: is 501 5.5.4."""
    assert _rcpt_error("FROM:<a@example.test>") == replies.SYNTAX_ERROR


def test_empty_path_is_syntax_error() -> None:
    """FROM: or TO: with nothing after it is 501 5.5.4."""
    assert _mail_error("FROM:") == replies.SYNTAX_ERROR
    assert _rcpt_error("TO:  ") == replies.SYNTAX_ERROR


def test_bad_sender_address_is_501_5_1_7() -> None:
    """A malformed sender address is 501 5.1.7."""
    assert _mail_error("FROM:<alice>") == replies.BAD_SENDER_SYNTAX
    assert _mail_error("FROM:<a@example.test") == replies.BAD_SENDER_SYNTAX


def test_recipient_without_domain_is_501_5_1_3() -> None:
    """A recipient without @ is 501 5.1.3 (SPEC table)."""
    assert _rcpt_error("TO:<alice>") == replies.BAD_RECIPIENT_SYNTAX
    assert str(replies.BAD_RECIPIENT_SYNTAX) == "501 5.1.3 Bad recipient address syntax"


def test_postmaster_without_domain_is_refused_for_now() -> None:
    """<postmaster> without a domain is refused like any domainless recipient (documented)."""
    assert _rcpt_error("TO:<postmaster>") == replies.BAD_RECIPIENT_SYNTAX


def test_null_recipient_refused() -> None:
    """RCPT TO:<> is not a recipient."""
    assert _rcpt_error("TO:<>") == replies.BAD_RECIPIENT_SYNTAX


@pytest.mark.parametrize(
    "args",
    [
        "TO:<@example.test>",
        "TO:<bob@>",
        "TO:<bob@example..test>",
        "TO:<bob@.example.test>",
        "TO:<bob@example.test..>",
        "TO:<bob@elsewhere.test@example.test>",
        'TO:<"bob@example.test>',
        "TO:<bob@example.test",
        "TO:bob@example.test>",
        "TO:<bob\x00@example.test>",
        "TO:<bob@exa\x07mple.test>",
        "TO:<bo\u0085b@example.test>",
        "TO:<bob@[1.2.3.4>",
        "TO:<bob@[300.1.1.1]>",
        "TO:<bob@[IPv6:not-an-address]>",
        "TO:<bob@[1.2.3.4].>",
        "TO:<bo b@example.test>",
        "TO:<bob(x)@example.test>",
        "TO:<bob@exa mple.test>",
        "TO:<bob@example.test!x>",
        "TO:<@:bob@example.test>",
        "TO:<@a..b:bob@example.test>",
        "TO:<@a.test,b.test:bob@example.test>",
        "TO:<@a.test bob@example.test>",
    ],
)
def test_malformed_recipients_refused(args: str) -> None:
    """Malformed recipient addresses are 501 5.1.3, never parsed into a mailbox."""
    assert _rcpt_error(args) == replies.BAD_RECIPIENT_SYNTAX


def test_local_part_over_64_octets_refused() -> None:
    """A local part over 64 octets is refused; 64 is accepted."""
    assert parse_rcpt_to(f"TO:<{'a' * 64}@example.test>")[0].local == "a" * 64
    assert _rcpt_error(f"TO:<{'a' * 65}@example.test>") == replies.BAD_RECIPIENT_SYNTAX


def test_address_over_254_octets_refused() -> None:
    """An address over 254 octets is refused; 254 is accepted."""
    domain = ".".join(["d" * 60] * 3) + "." + "e" * 8  # 189 octets
    local = "l" * (254 - 1 - len(domain))
    assert len(str(parse_rcpt_to(f"TO:<{local}@{domain}>")[0])) == 254
    assert _rcpt_error(f"TO:<{local}x@{domain}>") == replies.BAD_RECIPIENT_SYNTAX


def test_multibyte_length_counts_octets() -> None:
    """Length limits count UTF-8 octets, not characters."""
    assert _rcpt_error(f"TO:<{'é' * 33}@example.test>") == replies.BAD_RECIPIENT_SYNTAX


def test_non_ascii_allowed() -> None:
    """SMTPUTF8 addresses parse; whether SMTPUTF8 was negotiated is the protocol's concern."""
    rcpt, _ = parse_rcpt_to("TO:<jörg@bücher.example>")
    assert rcpt == Mailbox("jörg", "bücher.example")


@pytest.mark.parametrize(
    "domain",
    [
        "\u212aorp.test",  # KELVIN SIGN: lower() and IDNA give k
        "example.te\u017ft",  # LONG S: IDNA gives s
        "\uff45xample.test",  # fullwidth e
        "EXAMPLE.\uff34\uff25\uff33\uff34",  # fullwidth capitals
        "\u0130nternal.test",  # dotted capital I: lower() gives i and a combining dot
        "e\u0301cole.test",  # decomposed e-acute: not NFC
        "B\u00dcCHER.test",  # a non-ASCII capital
    ],
)
def test_domain_not_in_idna_canonical_form_refused(domain: str) -> None:
    """
    A domain that IDNA maps to another name is refused (501 5.1.3 as a
    recipient, 501 5.1.7 as a sender, also in a source route): no
    normalisation can make it an accepted domain or deliver it elsewhere.
    """
    assert _rcpt_error(f"TO:<bob@{domain}>") == replies.BAD_RECIPIENT_SYNTAX
    assert _rcpt_error(f"TO:<@{domain}:bob@example.test>") == replies.BAD_RECIPIENT_SYNTAX
    with pytest.raises(AddressError) as info:
        parse_mail_from(f"FROM:<bob@{domain}>")
    assert info.value.reply == replies.BAD_SENDER_SYNTAX


@pytest.mark.parametrize(
    "domain", ["b\u00fccher.test", "B\u00fccher.Test", "ex\u0430mple.test", "k\u0131osk.test"]
)
def test_canonical_idn_accepted(domain: str) -> None:
    """IDNs in their canonical form (ASCII letters in any case) parse as written."""
    assert parse_rcpt_to(f"TO:<bob@{domain}>")[0] == Mailbox("bob", domain)


def test_folds_into_ascii() -> None:
    """Only characters that lower-case into ASCII while not being ASCII count."""
    assert folds_into_ascii("\u212aarl@example.test")
    assert folds_into_ascii("\u0130nfo")
    assert not folds_into_ascii("KARL@EXAMPLE.TEST")
    assert not folds_into_ascii("J\u00dcRGEN\u017f")  # lower() keeps them outside ASCII


def test_source_route_ignored() -> None:
    """An RFC 5321 source route is dropped: the mailbox is the part after the colon."""
    rcpt, _ = parse_rcpt_to("TO:<@a.test,@b.test:user@c.test>")
    assert rcpt == Mailbox("user", "c.test")
    assert rcpt.routing_domain == "c.test"


def test_source_route_without_brackets() -> None:
    """A source route without brackets is dropped too."""
    assert parse_rcpt_to("TO:@a.test:user@c.test")[0] == Mailbox("user", "c.test")


def test_percent_and_bang_stay_in_local_part() -> None:
    """% and ! are local-part characters and do not route."""
    rcpt, _ = parse_rcpt_to("TO:<elsewhere.test!bob%other.test@example.test>")
    assert rcpt.local == "elsewhere.test!bob%other.test"
    assert rcpt.routing_domain == "example.test"


def test_quoted_at_stays_in_local_part() -> None:
    """An @ inside quotes is part of the local part; the domain is after the unquoted @."""
    rcpt, _ = parse_rcpt_to('TO:<"bob@elsewhere.test"@example.test>')
    assert rcpt == Mailbox('"bob@elsewhere.test"', "example.test")
    assert str(rcpt) == '"bob@elsewhere.test"@example.test'


def test_quoted_local_part_with_escapes_and_brackets() -> None:
    """Quoted local parts may hold blanks, escaped quotes and > without ending the path."""
    rcpt, params = parse_rcpt_to('TO:<"a \\" b>c"@example.test> NOTIFY=NEVER')
    assert rcpt.local == '"a \\" b>c"'
    assert params == {"NOTIFY": "NEVER"}


def test_quoted_at_only_has_no_domain() -> None:
    """A quoted local part with no unquoted @ has no domain: 501 5.1.3."""
    assert _rcpt_error('TO:<"bob@elsewhere.test">') == replies.BAD_RECIPIENT_SYNTAX


def test_routing_domain_lowercases_and_strips_one_dot() -> None:
    """routing_domain lower-cases and strips one trailing dot; domain keeps what was written."""
    rcpt, _ = parse_rcpt_to("TO:<BOB@ElseWhere.TEST.>")
    assert rcpt.domain == "ElseWhere.TEST."
    assert rcpt.routing_domain == "elsewhere.test"


def test_ip_literals_kept_as_written() -> None:
    """IPv4 and IPv6 address literals are accepted and kept with their brackets."""
    v4, _ = parse_rcpt_to("TO:<bob@[127.0.0.1]>")
    v6, _ = parse_rcpt_to("TO:<bob@[IPv6:2001:DB8::1]>")
    assert (v4.domain, v4.is_ip_literal) == ("[127.0.0.1]", True)
    assert v6.domain == "[IPv6:2001:DB8::1]"
    assert v6.routing_domain == "[ipv6:2001:db8::1]"


def test_param_syntax_errors() -> None:
    """Malformed or duplicate parameters are 501 5.5.4."""
    assert _mail_error("FROM:<a@example.test> =x") == replies.SYNTAX_ERROR
    assert _mail_error("FROM:<a@example.test> SIZE=") == replies.SYNTAX_ERROR
    assert _mail_error("FROM:<a@example.test> SIZE=1 size=2") == replies.SYNTAX_ERROR
    assert _mail_error("FROM:<a@example.test>SIZE=1") == replies.SYNTAX_ERROR
    assert _rcpt_error("TO:<b@example.test> X=\x01") == replies.SYNTAX_ERROR


def test_address_error_carries_reason() -> None:
    """AddressError keeps the reply for the client and a reason for the log."""
    with pytest.raises(AddressError) as info:
        parse_rcpt_to("TO:<bob@a..b>")
    assert info.value.reply == replies.BAD_RECIPIENT_SYNTAX
    assert info.value.reason == "empty domain label"
