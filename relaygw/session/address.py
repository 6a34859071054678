"""
MAIL FROM / RCPT TO argument parsing (RFC 5321 section 4.1.2, SPEC section 3).

The rules that keep the relay closed live here: routing uses the domain after
the last C{@} outside quotes; C{%}, C{!} and quoted text (a quoted C{@}
included) belong to the local part and never route; an RFC 5321 source route
(C{<@a,@b:user@c>}) is dropped, so only C{user@c} counts.

Decisions the RFCs leave open, taken the strict way:
  - A mailbox with two C{@} outside quotes (C{bob@elsewhere.test@example.test})
    is refused (501 5.1.3 for RCPT, 501 5.1.7 for MAIL) rather than routed on
    either domain.
  - A recipient without a domain is refused with 501 5.1.3, C{<postmaster>}
    included (RFC 5321 section 4.5.1 asks servers to take it; relaygw has no
    local postmaster yet).
  - IP literals (C{[192.0.2.1]}, C{[IPv6:2001:db8::1]}) are accepted as written
    and validated; other address-literal tags are refused.
  - A non-ASCII domain label must be in its IDNA canonical form: one that
    IDNA maps to another name (U+212A KELVIN SIGN to C{k}, U+017F LONG S or
    U+00DF to C{s}/C{ss}, fullwidth letters to ASCII, U+0130 or a decomposed
    accent to another form) is refused, so that no normalisation can make a
    look-alike an accepted domain, nor deliver it to the name DNS would give.

Device tolerance: a space after the colon (C{MAIL FROM: <a@b>}) and a path
without angle brackets (C{RCPT TO:a@b}) are accepted.  Non-ASCII is allowed
(SMTPUTF8); whether it was negotiated is the protocol's business.
"""

from __future__ import annotations

import ipaddress
import re
import string
import unicodedata

import idna
from attrs import frozen

from relaygw import replies
from relaygw.quoting import UnbalancedQuote, unquoted
from relaygw.replies import Reply

__all__ = ["AddressError", "Mailbox", "folds_into_ascii", "parse_mail_from", "parse_rcpt_to"]

_MAX_ADDRESS_OCTETS = 254
_MAX_LOCAL_OCTETS = 64
_MAX_LABEL_OCTETS = 63

#: Characters RFC 5321 calls specials; outside quotes they are never part of a local part.
_LOCAL_SPECIALS = frozenset('()<>[]:;@\\,"')
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: A label of ASCII letters, digits, "-" and "_" (the slower check covers Unicode).
_ASCII_LABEL = re.compile(r"[A-Za-z0-9_-]+\Z")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


@frozen
class Mailbox:
    """
    One mailbox of a MAIL or RCPT command.

    @ivar local: the local part as written, quotes and escapes kept.
    @ivar domain: the domain as written (an IP literal keeps its brackets,
        a trailing dot is kept).
    """

    local: str
    domain: str

    @property
    def routing_domain(self) -> str:
        """The domain that decides routing: lower-case, one trailing dot stripped."""
        d = self.domain.lower()
        return d[:-1] if d.endswith(".") else d

    @property
    def is_ip_literal(self) -> bool:
        """Whether the domain is an address literal such as C{[192.0.2.1]}."""
        return self.domain.startswith("[")

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


class AddressError(Exception):
    """
    A MAIL or RCPT argument that cannot be accepted.

    @ivar reply: the reply the client gets.
    @ivar reason: what was wrong, for the log only.
    """

    def __init__(self, reply: Reply, reason: str = "") -> None:
        self.reply = reply
        self.reason = reason
        super().__init__(f"{reply} ({reason})" if reason else str(reply))


class _Bad(Exception):
    """Internal: the mailbox text is malformed; the caller picks the reply."""


def parse_mail_from(args: str) -> tuple[Mailbox | None, dict[str, str | None]]:
    """
    Parse the text after C{MAIL}: C{FROM:<path> [params]}.

    @param args: e.g. C{" FROM:<a@example.test> SIZE=10 BODY=8BITMIME"}.
    @return: the sender (C{None} for the null sender C{<>}) and the ESMTP
        parameters, keys upper-cased, C{None} for a parameter without value.
    @raise AddressError: with L{replies.SYNTAX_ERROR} when the C{FROM:} part
        or the parameters are malformed, L{replies.BAD_SENDER_SYNTAX} when the
        address is.
    """
    path, params = _split(args, "FROM:")
    if path in ("<>", ""):
        if path == "":
            raise AddressError(replies.SYNTAX_ERROR, "empty reverse path")
        return None, params
    try:
        return _mailbox(path), params
    except _Bad as e:
        raise AddressError(replies.BAD_SENDER_SYNTAX, str(e)) from None


def parse_rcpt_to(args: str) -> tuple[Mailbox, dict[str, str | None]]:
    """
    Parse the text after C{RCPT}: C{TO:<path> [params]}.

    @param args: e.g. C{" TO:<bob@example.test> NOTIFY=NEVER"}.
    @return: the recipient and the ESMTP parameters (as L{parse_mail_from}).
    @raise AddressError: with L{replies.SYNTAX_ERROR} when the C{TO:} part or
        the parameters are malformed, L{replies.BAD_RECIPIENT_SYNTAX} when the
        address is (no domain, C{<>}, bad characters, too long, ...).
    """
    path, params = _split(args, "TO:")
    if path == "":
        raise AddressError(replies.SYNTAX_ERROR, "empty forward path")
    try:
        if path == "<>":
            raise _Bad("null recipient")
        return _mailbox(path), params
    except _Bad as e:
        raise AddressError(replies.BAD_RECIPIENT_SYNTAX, str(e)) from None


def _split(args: str, prefix: str) -> tuple[str, dict[str, str | None]]:
    """
    Split C{FROM:<path> params} into the path text and the parameters.

    The path is returned with its angle brackets when it had them.
    """
    text = args.lstrip(" \t")
    if text[: len(prefix)].upper() != prefix:
        raise AddressError(replies.SYNTAX_ERROR, f"expected {prefix}")
    rest = text[len(prefix) :].lstrip(" \t")
    if not rest:
        return "", {}
    end = _path_end(rest)
    path, tail = rest[:end], rest[end:]
    if tail and tail[0] not in " \t":
        raise AddressError(replies.SYNTAX_ERROR, "no space after the path")
    return path, _params(tail)


def _path_end(text: str) -> int:
    """
    The index just past the path at the start of C{text}: the C{>} matching
    the opening C{<} (outside quotes), or the first unquoted blank.  An
    unclosed bracket or quote leaves the whole text as the path, which then
    fails mailbox syntax.
    """
    bracketed = text.startswith("<")
    start = 1 if bracketed else 0
    try:
        for i, c in unquoted(text[start:]):
            if bracketed and c == ">":
                return start + i + 1
            if not bracketed and c in " \t":
                return start + i
    except UnbalancedQuote:
        pass
    return len(text)


def _params(text: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        if not _KEYWORD.match(key) or (eq and not value) or _has_controls(word):
            raise AddressError(replies.SYNTAX_ERROR, "malformed parameter")
        key = key.upper()
        if key in out:
            raise AddressError(replies.SYNTAX_ERROR, "duplicate parameter")
        out[key] = value if eq else None
    return out


def _has_controls(text: str) -> bool:
    # Cc covers NUL, C0, DEL and C1; Cs are lone surrogates from undecodable
    # bytes.  In ASCII text only C0 and DEL can occur: one regex scan.
    if text.isascii():
        return _ASCII_CONTROL.search(text) is not None
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


def _mailbox(path: str) -> Mailbox:
    """The mailbox in a path, with or without brackets; raises L{_Bad}."""
    if _has_controls(path):
        raise _Bad("control character")
    if path.startswith("<"):
        if not path.endswith(">") or len(path) < 2:
            raise _Bad("unbalanced angle bracket")
        path = path[1:-1]
    elif path.endswith(">"):
        raise _Bad("unbalanced angle bracket")
    if path.startswith("@"):
        path = _drop_source_route(path)
    at = _unquoted_at(path)
    if at is None:
        raise _Bad("no domain")
    local, domain = path[:at], path[at + 1 :]
    _check_local(local)
    _check_domain(domain)
    if len(local.encode("utf-8")) > _MAX_LOCAL_OCTETS:
        raise _Bad("local part too long")
    if len(path.encode("utf-8")) > _MAX_ADDRESS_OCTETS:
        raise _Bad("address too long")
    return Mailbox(local, domain)


def _drop_source_route(path: str) -> str:
    """C{@a,@b:user@c} -> C{user@c}; the hops are checked, then ignored (RFC 5321 C.)."""
    adl, colon, rest = path.partition(":")
    if not colon:
        raise _Bad("source route without colon")
    for hop in adl.split(","):
        if not hop.startswith("@"):
            raise _Bad("malformed source route")
        _check_domain(hop[1:])
    return rest


def _unquoted_at(local_and_domain: str) -> int | None:
    """
    The index of the only C{@} outside quotes; C{None} when there is none.
    Raises L{_Bad} for an unbalanced quote or a second unquoted C{@}.
    """
    found: int | None = None
    try:
        for i, c in unquoted(local_and_domain):
            if c == "@":
                if found is not None:
                    raise _Bad("more than one @ outside quotes")
                found = i
    except UnbalancedQuote:
        raise _Bad("unbalanced quote") from None
    return found


def _check_local(local: str) -> None:
    if not local:
        raise _Bad("empty local part")
    try:
        for _, c in unquoted(local):
            if c in _LOCAL_SPECIALS or c.isspace():
                raise _Bad("special character in local part")
    except UnbalancedQuote:
        raise _Bad("unbalanced quote") from None


def _check_domain(domain: str) -> None:
    if not domain:
        raise _Bad("empty domain")
    if domain.startswith("["):
        _check_literal(domain)
        return
    name = domain[:-1] if domain.endswith(".") else domain
    if len(name.encode("utf-8")) > 253:
        raise _Bad("domain too long")
    for label in name.split("."):
        if not label:
            raise _Bad("empty domain label")
        if len(label.encode("utf-8")) > _MAX_LABEL_OCTETS:
            raise _Bad("domain label too long")
        if _ASCII_LABEL.match(label):
            continue
        if not all(c.isalnum() or c in "-_" for c in label):
            raise _Bad("bad character in domain")
        if not _canonical_idn_label(label):
            raise _Bad("domain label not in IDNA canonical form")


def _canonical_idn_label(label: str) -> bool:
    """
    Whether a non-ASCII label is valid IDNA 2008 as written, but for ASCII
    letter case: no mapping (UTS 46 is off), so a character that NFKC or
    case folding would turn into another (fullwidth, long s, Kelvin sign,
    a capital) is refused rather than quietly taken for its image.
    """
    try:
        idna.encode(label.translate(_ASCII_LOWER))
    except idna.IDNAError:
        return False
    return True


def folds_into_ascii(text: str) -> bool:
    """
    Whether lower-casing C{text} makes ASCII of a character that is not
    (U+212A KELVIN SIGN gives C{k}, U+0130 gives C{i} and a combining dot):
    such an address must not be compared, case-insensitively, with ASCII
    ones (a directory lookup, the send-as check).
    """
    return not text.isascii() and any(
        not c.isascii() and any(f.isascii() for f in c.lower()) for c in text
    )


def _check_literal(domain: str) -> None:
    if not domain.endswith("]"):
        raise _Bad("unbalanced address literal")
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise _Bad("bad address literal") from None
