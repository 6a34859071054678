"""
A bounded, seeded fuzz of the ESMTP session: whatever a misbehaving client
sends, it gets well-formed SPEC replies, never a traceback, and the session
logs no unexpected failure (SPEC: "A client that misbehaves gets the SPEC's
reply, never a traceback; the server stays up").
"""

from __future__ import annotations

import random
import re

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import Harness, make_connector

_REPLY_LINE = re.compile(rb"^[2-5][0-9][0-9][ -]")

_VERBS = [
    b"HELO", b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"BDAT", b"RSET", b"NOOP",
    b"QUIT", b"VRFY", b"HELP", b"STARTTLS", b"AUTH", b"EXPN", b"mail from:", b"XYZZY",
]
_ARGS = [
    b"", b"<>", b"<a@example.test>", b"<b@elsewhere.test>", b"<@x,@y:c@example.test>",
    b'<"q@uoted"@example.test>', b"<a%b@example.test>", b"<a@[127.0.0.1]>", b"<a@>",
    b"<a>", b"<", b">", b"SIZE=99999999999", b"BODY=BINARYMIME", b"SMTPUTF8", b"10 LAST",
    b"0", b"-1", b"LAST", b"PLAIN", b"LOGIN dGVzdA==", b"\x00\xff\xfe", "\u00e9@\u00e9.test".encode(),
]


def _random_input(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randrange(1, 40)):
        kind = rng.random()
        if kind < 0.7:
            line = rng.choice(_VERBS) + b" " + rng.choice(_ARGS)
        elif kind < 0.85:
            line = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        else:
            line = b"x" * rng.choice([1999, 2000, 2001, 5000])
        parts.append(line + rng.choice([b"\r\n", b"\n", b"\r", b"\r\n\r\n", b""]))
        if rng.random() < 0.1:
            parts.append(b".\r\n")
    return b"".join(parts)


class FuzzTests(SynchronousTestCase):
    """Random input, random segmentation, bounded count."""

    def test_random_clients_get_replies_and_no_failures(self) -> None:
        """
        300 seeded random sessions, each fed in random segment sizes: every
        line written is a reply line, and no unexpected-error event is logged.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        rng = random.Random(20261127)
        for _ in range(300):
            harness = Harness(make_connector(max_message_size=4096))
            session, transport = harness.connect()
            data = _random_input(rng)
            i = 0
            while i < len(data) and transport.connected and not transport.disconnecting:
                n = rng.randrange(1, 64)
                session.dataReceived(data[i : i + n])
                i += n
            written = transport.value()
            for line in written.split(b"\r\n")[:-1]:
                self.assertRegex(line, _REPLY_LINE)
            if transport.connected and not transport.disconnecting:
                session.connectionLost(None)
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(failures, [], [e.get("log_format") for e in failures][:3])
