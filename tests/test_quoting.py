"""Tests for L{relaygw.quoting}: characters outside RFC 5321 quotes."""

from __future__ import annotations

import pytest

from relaygw.quoting import UnbalancedQuote, unquoted


def test_quoted_text_and_escapes_are_skipped() -> None:
    """An @ inside quotes, even after an escaped quote, is not outside them."""
    text = r'"a\"@b"@c'
    assert [c for _, c in unquoted(text)] == ["@", "c"]
    assert [i for i, c in unquoted(text) if c == "@"] == [7]


def test_unbalanced_quote_raises_after_the_last_character() -> None:
    """An open quote is reported once everything outside it was yielded."""
    seen = []
    with pytest.raises(UnbalancedQuote):
        for _, c in unquoted('ab"c@d'):
            seen.append(c)
    assert seen == ["a", "b"]
