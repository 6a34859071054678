"""Tests for L{relaygw.deliver.outcome}: the one classification of delivery results."""

from __future__ import annotations

import pytest
from twisted.internet import error
from twisted.python.failure import Failure

from relaygw.deliver import outcome
from relaygw.spool.envelope import Outcome


@pytest.mark.parametrize(
    "code, kind",
    [
        (250, "delivered"),
        (251, "delivered"),
        (200, "delivered"),
        (421, "retry"),
        (450, "retry"),
        (451, "retry"),
        (452, "retry"),
        (500, "bounce"),
        (550, "bounce"),
        (554, "bounce"),
        (354, "retry"),
        (-1, "retry"),
        (0, "retry"),
        (999, "retry"),
    ],
)
def test_classify_table(code: int, kind: str) -> None:
    """2xx is delivered, 5xx bounced, anything else (4xx and nonsense) retried."""
    assert outcome.classify(code) == kind


def test_reply_outcome_keeps_enhanced_code() -> None:
    """A remote reply's code and text, enhanced code included, become the outcome's reply."""
    o = outcome.reply_outcome(550, b"5.1.1 <bob@x.test>: user unknown", "mx.x.test:25")
    assert o == Outcome("bounce", "550 5.1.1 <bob@x.test>: user unknown", "mx.x.test:25")


def test_reply_outcome_joins_lines() -> None:
    """A multi-line reply becomes one line."""
    o = outcome.reply_outcome(451, "4.3.0 first\n4.3.0 second")
    assert o.reply == "451 4.3.0 first 4.3.0 second"
    assert o.kind == "retry"


def test_reply_outcome_scrubs_controls_and_length() -> None:
    """Control characters are replaced and the text is bounded."""
    o = outcome.reply_outcome(250, b"ok\x00\x1b" + b"x" * 5000)
    assert "\x00" not in o.reply and "\x1b" not in o.reply
    assert len(o.reply) <= outcome.MAX_REPLY_CHARS + 4


def test_basic_code_decides_over_enhanced() -> None:
    """A 4xx reply with a 5.x.x enhanced code is still retried."""
    assert outcome.reply_outcome(450, "5.7.1 odd").kind == "retry"


@pytest.mark.parametrize(
    "exc, reply",
    [
        (error.ConnectionRefusedError(), outcome.CONNECTION_REFUSED),
        (ConnectionRefusedError(), outcome.CONNECTION_REFUSED),
        (error.TimeoutError(), outcome.TIMED_OUT),
        (error.TCPTimedOutError(), outcome.TIMED_OUT),
        (TimeoutError(), outcome.TIMED_OUT),
        (error.DNSLookupError(), outcome.HOST_NOT_FOUND),
        (error.ConnectionLost(), outcome.CONNECTION_LOST),
        (error.ConnectionDone(), outcome.CONNECTION_LOST),
        (error.ConnectError(), outcome.CONNECTION_FAILED),
        (error.NoRouteError(), outcome.CONNECTION_FAILED),
        (RuntimeError("boom"), outcome.LOCAL_ERROR),
    ],
)
def test_failure_outcome_table(exc: Exception, reply: outcome.Reply) -> None:
    """Connection failures, timeouts and local errors are retried with a fixed text."""
    o = outcome.failure_outcome(Failure(exc), "h:25")
    assert o == Outcome("retry", str(reply), "h:25")


def test_tls_errors_retry() -> None:
    """A TLS failure (pyOpenSSL error) is retried as a TLS failure."""
    from OpenSSL import SSL

    o = outcome.failure_outcome(SSL.Error([("ssl", "fn", "handshake failure")]))
    assert o == Outcome("retry", str(outcome.TLS_FAILED))


def test_failure_outcome_never_renders_exception() -> None:
    """The exception's message (which may hold a transcript with secrets) is never used."""
    o = outcome.failure_outcome(RuntimeError("AUTH PLAIN c2VjcmV0 password=hunter2"))
    assert "hunter2" not in o.reply and "c2VjcmV0" not in o.reply


def test_local_outcomes_are_consistent() -> None:
    """Each local reply's kind follows its code, and they are one line."""
    for name in outcome.__all__:
        value = getattr(outcome, name)
        if isinstance(value, outcome.Reply):
            o = outcome.local_outcome(value)
            assert o.kind == outcome.classify(value.code)
            assert "\n" not in o.reply
            assert o.reply.startswith(f"{value.code} {value.enhanced} ")


def test_named_local_outcomes() -> None:
    """The replies the brief fixes: no route, Maildir traversal, null MX."""
    assert str(outcome.NO_ROUTE) == "550 5.4.4 no route"
    assert outcome.BAD_MAILBOX.enhanced == "5.1.3"
    assert outcome.NULL_MX.enhanced == "5.1.10"
