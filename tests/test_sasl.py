"""
Tests for L{relaygw.auth.sasl}: the PLAIN and LOGIN exchanges of SMTP AUTH
as pure state machines.
"""

from __future__ import annotations

from base64 import b64encode

from twisted.cred.credentials import IUsernamePassword
from zope.interface.verify import verifyObject

from relaygw import replies
from relaygw.auth import sasl
from relaygw.auth.sasl import Challenge, Credentials, Refused, Response


def b64(data: bytes) -> str:
    return b64encode(data).decode("ascii")


def test_plain_initial_response() -> None:
    """PLAIN with the initial response on the AUTH line completes at once."""
    started = sasl.start("plain", b64(b"\x00alice\x00s3cret"))
    assert started is not None
    assert started[1] == Response(b"alice", b"s3cret")


def test_plain_without_initial_response_asks_with_empty_challenge() -> None:
    """PLAIN without an initial response gets "334 " and takes the next line."""
    started = sasl.start("PLAIN", None)
    assert started is not None
    exchange, step = started
    assert step == Challenge("")
    assert exchange.respond(b64(b"alice\x00alice\x00pw")) == Response(b"alice", b"pw")


def test_plain_foreign_authzid_refused() -> None:
    """An authorization identity other than the login is refused with 535."""
    started = sasl.start("PLAIN", b64(b"bob\x00alice\x00pw"))
    assert started is not None
    step = started[1]
    assert isinstance(step, Refused) and step.reply == replies.AUTH_FAILED


def test_plain_malformed_message_refused() -> None:
    """A PLAIN message without two NULs is a 501 syntax error."""
    started = sasl.start("PLAIN", b64(b"alice-pw"))
    assert started is not None
    step = started[1]
    assert isinstance(step, Refused) and step.reply.code == 501


def test_login_prompts_username_then_password() -> None:
    """LOGIN asks "Username:" then "Password:" in base64 (334 VXNlcm5hbWU6 / UGFzc3dvcmQ6)."""
    started = sasl.start("LOGIN", None)
    assert started is not None
    exchange, step = started
    assert step == Challenge("VXNlcm5hbWU6")
    assert exchange.respond(b64(b"alice")) == Challenge("UGFzc3dvcmQ6")
    assert exchange.respond(b64(b"pw")) == Response(b"alice", b"pw")


def test_login_initial_response_is_the_username() -> None:
    """The device quirk AUTH LOGIN <base64 user> asks only for the password."""
    started = sasl.start("LOGIN", b64(b"printer"))
    assert started is not None
    exchange, step = started
    assert step == Challenge("UGFzc3dvcmQ6")
    assert exchange.respond(b64(b"pw")) == Response(b"printer", b"pw")


def test_star_cancels() -> None:
    """A "*" line cancels the exchange with 501 (RFC 4954 section 4)."""
    started = sasl.start("LOGIN", None)
    assert started is not None
    step = started[0].respond("*")
    assert isinstance(step, Refused) and step.reply == replies.AUTH_CANCELLED
    assert step.reply.code == 501


def test_bad_base64_refused() -> None:
    """A response that is not base64 is answered 501 5.5.2."""
    started = sasl.start("PLAIN", "not base64!")
    assert started is not None
    step = started[1]
    assert isinstance(step, Refused) and step.reply == replies.AUTH_BAD_BASE64
    assert str(step.reply).startswith("501 5.5.2")


def test_unknown_mechanism() -> None:
    """A mechanism this module does not implement gives None."""
    assert sasl.start("CRAM-MD5", None) is None


def test_credentials_provide_iusernamepassword_and_hide_password() -> None:
    """Credentials provide IUsernamePassword, compare passwords and never show the password."""
    credentials = Credentials(b"alice", b"s3cret", "192.0.2.1", "Client")
    assert verifyObject(IUsernamePassword, credentials)
    assert credentials.checkPassword(b"s3cret") and not credentials.checkPassword(b"x")
    assert "s3cret" not in repr(credentials)
    assert "s3cret" not in repr(Response(b"alice", b"s3cret"))
