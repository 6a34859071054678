"""
Hostile bytes in the greeting (issue 11): a HELO/EHLO name holding NUL and
bytes that are not UTF-8 must not stop the session's messages from being
spooled.  Regression: the name reached the envelope with lone surrogates,
its JSON could not be encoded, and every message got 451 4.3.0.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from relaygw.spool.envelope import Envelope
from tests.fakes import Harness, reply_lines

BODY = b"Subject: x\r\n\r\nhi\r\n.\r\n"


class HostileGreetingTests(SynchronousTestCase):
    def _queue(self, greeting: bytes) -> tuple[list[str], Envelope, bytes]:
        harness = Harness()
        session, transport = harness.connect()
        session.dataReceived(greeting + b"\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\n"
                             b"DATA\r\n" + BODY)
        lines = reply_lines(transport.value())
        envelope, data = harness.spool.committed[0] if harness.spool.committed else (None, b"")
        assert envelope is not None, lines
        return lines, envelope, data

    def test_ehlo_with_undecodable_bytes(self) -> None:
        """The message is queued; the stored name has U+FFFD; Received shows '?'."""
        lines, envelope, data = self._queue(b"EHLO bad\xff\xfe\x00name.example")
        self.assertTrue(lines[-1].startswith("250 2.6.0 "), lines)
        self.assertEqual(envelope.helo, "bad\ufffd\ufffd\x00name.example")
        self.assertEqual(Envelope.from_json(envelope.to_json()).helo, envelope.helo)
        self.assertIn(b"Received: from bad???name.example ([192.0.2.10])", data)

    def test_helo_with_undecodable_bytes(self) -> None:
        """HELO as well (SMTP, not ESMTP)."""
        lines, envelope, _ = self._queue(b"HELO \xc0\xaf")
        self.assertTrue(lines[-1].startswith("250 2.6.0 "), lines)
        envelope.to_json()

    def test_utf8_name_kept(self) -> None:
        """A name in valid UTF-8 is stored as sent."""
        _, envelope, _ = self._queue("EHLO h\u00f6st.example".encode())
        self.assertEqual(envelope.helo, "h\u00f6st.example")
