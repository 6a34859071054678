"""
RFC 5321 quoted local parts: which characters of an address stand outside
double quotes.  Shared by the receive side (parsing MAIL and RCPT) and the
send side (routing), which never import each other.  Pure.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["UnbalancedQuote", "unquoted"]


class UnbalancedQuote(ValueError):
    """A double quote opened and never closed."""


def unquoted(text: str) -> Iterator[tuple[int, str]]:
    """
    Yield C{(index, character)} for every character of C{text} outside
    double quotes (the quotes themselves and backslash escapes inside them
    are skipped).

    @raise UnbalancedQuote: after the last character, when a quote is open.
    """
    if '"' not in text:  # the common case: every character stands outside
        yield from enumerate(text)
        return
    quoted = False
    i = 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        else:
            yield i, c
        i += 1
    if quoted:
        raise UnbalancedQuote(text)
