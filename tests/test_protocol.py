"""
Tests for L{relaygw.session.protocol.Session}: the SPEC section 3 replies on
the wire, over StringTransport with a MemoryReactorClock and a
RecordingSpool.
"""

from __future__ import annotations

import tracemalloc
from datetime import timedelta
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from relaygw import replies
from relaygw.auth.user import AuthenticatedUser
from relaygw.config._model import Rate, Timeouts
from relaygw.spool.envelope import TLSInfo
from tests.fakes import (
    all_events,
    GATEWAY_FQDN,
    Harness,
    make_connector,
    reply_lines,
)

FQDN = GATEWAY_FQDN
BANNER = f"220 {FQDN} relaygw ESMTP ready"
ENVELOPE = b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<bob@example.test>\r\n"
MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


class SessionTestCase(SynchronousTestCase):
    """Helpers: connect, send, and read the replies written since the last read."""

    def connect(self, harness: Harness | None = None, **kwargs: Any) -> None:
        self.harness = harness or Harness()
        self.session, self.transport = self.harness.connect(**kwargs)

    def send(self, data: bytes) -> list[str]:
        self.transport.clear()
        self.session.dataReceived(data)
        return reply_lines(self.transport.value())

    def queue_message(self, body: bytes = MESSAGE) -> list[str]:
        self.send(ENVELOPE + b"DATA\r\n")
        return self.send(body + b".\r\n")

    def queued_line(self, index: int = 0) -> str:
        envelope = self.harness.spool.committed[index][0]
        return str(replies.queued(envelope.message_id, envelope.id, FQDN))


class GreetingTests(SessionTestCase):
    def test_banner(self) -> None:
        """The greeting is 220 and the connector's banner with {fqdn} and {connector} filled in."""
        self.connect(Harness(make_connector(name="Printers", banner="{fqdn} {connector} hi")))
        self.assertEqual(reply_lines(self.transport.value()), [f"220 {FQDN} Printers hi"])

    def test_no_connector_closes_silently(self) -> None:
        """A client no connector's ranges hold is disconnected without a byte."""
        self.connect(Harness(make_connector(remote_ranges=(_range("10.0.0.0/8"),))))
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_connection_limit(self) -> None:
        """Past max_connections_per_ip the client gets 421 4.3.2 instead of the banner, then close."""
        harness = Harness(make_connector(max_connections_per_ip=1))
        self.connect(harness)
        second, transport = harness.connect()
        self.assertEqual(reply_lines(transport.value()), ["421 4.3.2 Service not available"])
        self.assertTrue(transport.disconnecting)

    def test_connection_released_on_close(self) -> None:
        """A closed connection frees its slot."""
        harness = Harness(make_connector(max_connections=1))
        self.connect(harness)
        self.session.connectionLost(None)
        _, transport = harness.connect(peer="192.0.2.99")
        self.assertEqual(reply_lines(transport.value()), [BANNER])

    def test_implicit_tls_before_banner(self) -> None:
        """On an implicit-TLS connector TLS starts before any byte (the banner) is written."""
        options = object()
        self.connect(Harness(make_connector(tls="implicit"), tls_options=lambda c: options))
        self.assertEqual(self.transport.tls_started, [options])
        self.assertEqual(self.transport.written_before_tls, b"")
        self.assertEqual(reply_lines(self.transport.value()), [BANNER])

    def test_implicit_tls_without_certificate_closes(self) -> None:
        """Implicit TLS without usable options closes without a byte."""
        self.connect(Harness(make_connector(tls="implicit"), tls_options=lambda c: None))
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_connect_event(self) -> None:
        """With verbose protocol logging an accepted connection is logged with connector, session id and peer."""
        events = all_events(self)
        self.connect(Harness(make_connector(protocol_logging="verbose")))
        [event] = [e for e in events if e.get("event") == "receive.connect"]
        self.assertEqual(
            (event["connector"], event["peer"], event["session_id"]),
            ("Default", "192.0.2.10:40001", self.session.session_id),
        )


class HelloTests(SessionTestCase):
    def test_ehlo_keywords(self) -> None:
        """EHLO lists the SPEC keywords in order; no STARTTLS or AUTH when not usable."""
        self.connect()
        self.assertEqual(
            self.send(b"EHLO client.test\r\n"),
            [
                f"250-{FQDN} Hello [192.0.2.10]",
                "250-SIZE 37748736",
                "250-PIPELINING",
                "250-8BITMIME",
                "250-ENHANCEDSTATUSCODES",
                "250-SMTPUTF8",
                "250 CHUNKING",
            ],
        )

    def test_ehlo_starttls_and_auth(self) -> None:
        """STARTTLS is offered with a certificate; AUTH with a portal and plaintext allowed."""
        self.connect(
            Harness(
                make_connector(tls="starttls", allow_plaintext_auth=True, max_message_size=1000),
                tls_options=lambda c: object(),
                portal=object(),
            )
        )
        self.assertEqual(
            self.send(b"EHLO client.test\r\n")[1:],
            ["250-SIZE 1000", "250-PIPELINING", "250-8BITMIME", "250-ENHANCEDSTATUSCODES",
             "250-SMTPUTF8", "250-STARTTLS", "250-AUTH PLAIN LOGIN", "250 CHUNKING"],
        )

    def test_auth_not_offered_in_plaintext(self) -> None:
        """With a portal but without TLS and allow_plaintext_auth, AUTH is not offered."""
        self.connect(Harness(make_connector(tls="starttls"), tls_options=lambda c: object(),
                             portal=object()))
        self.assertNotIn("250-AUTH PLAIN LOGIN", self.send(b"EHLO client.test\r\n"))

    def test_mapped_address_shown_as_ipv4(self) -> None:
        """An IPv4-mapped client address is shown as plain IPv4."""
        self.connect(local="::ffff:127.0.0.1", peer="::ffff:192.0.2.7")
        self.assertEqual(self.send(b"HELO c\r\n"), [f"250 {FQDN} Hello [192.0.2.7]"])

    def test_helo(self) -> None:
        """HELO gets the single-line greeting; without argument 501."""
        self.connect()
        self.assertEqual(self.send(b"HELO c\r\nHELO\r\n"),
                         [f"250 {FQDN} Hello [192.0.2.10]", "501 5.5.4 Invalid arguments"])


class CommandTests(SessionTestCase):
    def setUp(self) -> None:
        self.connect()

    def test_simple_commands(self) -> None:
        """NOOP, RSET, VRFY, HELP and unknown verbs get their fixed replies."""
        self.assertEqual(
            self.send(b"NOOP\r\nRSET\r\nVRFY bob\r\nXYZZY\r\nHELP\r\n"),
            ["250 2.0.0 OK", "250 2.0.0 Resetting",
             "252 2.1.5 Cannot VRFY user, but will accept message for delivery",
             "500 5.3.3 Unrecognized command",
             "214-This server supports the following commands:",
             "214 HELO EHLO STARTTLS RCPT DATA RSET MAIL QUIT HELP AUTH BDAT"],
        )

    def test_quit(self) -> None:
        """QUIT says goodbye and closes; pipelined bytes after it are ignored."""
        self.assertEqual(self.send(b"QUIT\r\nNOOP\r\n"),
                         [f"221 2.0.0 {FQDN} Service closing transmission channel"])
        self.assertTrue(self.transport.disconnecting)

    def test_order(self) -> None:
        """MAIL before HELO, RCPT before MAIL and DATA before RCPT get 503."""
        self.assertEqual(self.send(b"MAIL FROM:<a@b.test>\r\n"), ["503 5.5.2 Send hello first"])
        self.assertEqual(
            self.send(b"EHLO c\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")[-2:],
            ["503 5.5.1 Sender not yet given", "503 5.5.1 Sender not yet given"],
        )
        self.assertEqual(self.send(b"MAIL FROM:<a@b.test>\r\nDATA\r\nMAIL FROM:<>\r\n"),
                         ["250 2.1.0 Sender OK", "503 5.5.1 Need RCPT command",
                          "503 5.5.2 Sender already specified"])

    def test_auth_without_portal(self) -> None:
        """AUTH without a portal is 504 5.7.4."""
        self.assertEqual(self.send(b"EHLO c\r\nAUTH PLAIN AGFAYg==\r\n")[-1],
                         "504 5.7.4 Unrecognized authentication type")

    def test_verbose_log_hides_auth(self) -> None:
        """With protocol logging on, commands are logged but never AUTH payloads or unknown lines."""
        events = all_events(self)
        self.connect(Harness(make_connector(protocol_logging="verbose")))
        self.send(b"EHLO c\r\nAUTH PLAIN AHVzZXIAc2VjcmV0\r\nc2VjcmV0\r\n")
        logged = [e["data"] for e in events if e.get("event") == "receive.command"]
        self.assertEqual(logged, ["EHLO c", "AUTH PLAIN ****", "(unrecognized command)"])
        self.assertNotIn("c2VjcmV0", repr(list(events)))
        replies_logged = [e["smtp_code"] for e in events if e.get("event") == "receive.reply"]
        self.assertEqual(replies_logged, [220, 250, 504, 500])

    def test_bare_lf_commands(self) -> None:
        """Commands ending in a bare LF are understood."""
        self.assertEqual(self.send(b"NOOP\nNOOP\r\n"), ["250 2.0.0 OK", "250 2.0.0 OK"])

    def test_line_of_2000_octets(self) -> None:
        """A 2,000-octet command line is a command; 2,001 octets get 500 5.5.2 and close."""
        self.assertEqual(self.send(b"NOOP " + b"x" * 1995 + b"\r\n"), ["250 2.0.0 OK"])
        self.assertEqual(self.send(b"NOOP " + b"x" * 1996 + b"\r\n"),
                         ["500 5.5.2 Command line too long"])
        self.assertTrue(self.transport.disconnecting)

    def test_long_line_without_end(self) -> None:
        """An unfinished line past 2,000 octets is refused at once, not buffered."""
        self.assertEqual(self.send(b"NOOP " + b"x" * 1995), [])
        self.assertEqual(self.send(b"\r"), [])
        self.assertEqual(self.send(b"y"), ["500 5.5.2 Command line too long"])
        self.assertTrue(self.transport.disconnecting)

    def test_ten_bad_commands(self) -> None:
        """The 10th bad command in a row gets 421 4.7.0 instead of its reply, then close."""
        lines = self.send(b"BAD\r\n" * 9 + b"NOOP\r\n" + b"BAD\r\n" * 10 + b"NOOP\r\n")
        self.assertEqual(lines[:10], ["500 5.3.3 Unrecognized command"] * 9 + ["250 2.0.0 OK"])
        self.assertEqual(lines[10:], ["500 5.3.3 Unrecognized command"] * 9
                         + ["421 4.7.0 Too many errors on this connection, "
                            "closing transmission channel"])
        self.assertTrue(self.transport.disconnecting)

    def test_command_timeout(self) -> None:
        """No command within timeouts.command: 421 4.4.2 and close."""
        self.send(b"EHLO c\r\n")
        self.harness.reactor.advance(299)
        self.assertFalse(self.transport.disconnecting)
        self.transport.clear()
        self.harness.reactor.advance(1)
        self.assertEqual(reply_lines(self.transport.value()),
                         [f"421 4.4.2 {FQDN} Timeout waiting for client input"])
        self.assertTrue(self.transport.disconnecting)

    def test_command_timeout_counts_whole_lines(self) -> None:
        """
        A byte every 30 s of a command line (slowloris) does not restart the
        command timeout; a whole line does.
        """
        self.send(b"EHLO c\r\n")
        self.harness.reactor.advance(290)
        self.send(b"NOOP\r\n")  # restarts it
        start = self.harness.reactor.seconds()
        for byte in b"EHLO slow.example":
            self.harness.reactor.advance(30)
            if self.transport.disconnecting:
                break
            self.send(bytes([byte]))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(reply_lines(self.transport.value())[-1],
                         f"421 4.4.2 {FQDN} Timeout waiting for client input")
        self.assertEqual(self.harness.reactor.seconds() - start, 300)

    def test_unexpected_error_answers_451(self) -> None:
        """An exception in a handler is logged and answered 451 4.3.0; the session goes on."""
        self.session.verbs["NOOP"] = lambda args: 1 / 0
        self.assertEqual(self.send(b"NOOP\r\nRSET\r\n"),
                         ["451 4.3.0 Temporary server error, please try again later",
                          "250 2.0.0 Resetting"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class PolicyReplyTests(SessionTestCase):
    def test_relay_refused(self) -> None:
        """RCPT outside accepted domains without relay: 550 5.7.54."""
        self.connect()
        self.assertEqual(
            self.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\n")[-1],
            "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain",
        )

    def test_not_authenticated(self) -> None:
        """MAIL without submit before AUTH: 530 5.7.57."""
        self.connect(Harness(make_connector(permissions_anonymous=frozenset())))
        self.assertEqual(
            self.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")[-1],
            "530 5.7.57 SMTP; Client was not authenticated to send anonymous mail during MAIL FROM",
        )

    def test_send_as_denied(self) -> None:
        """An anonymous sender in an accepted domain without the right: 550 5.7.60."""
        self.connect(Harness(make_connector(permissions_anonymous=frozenset({"submit"}))))
        self.assertEqual(
            self.send(b"EHLO c\r\nMAIL FROM:<a@example.test>\r\n")[-1],
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        )

    def test_require_tls(self) -> None:
        """MAIL before STARTTLS on a require_tls connector: 530 5.7.10."""
        self.connect(Harness(make_connector(require_tls=True)))
        self.assertEqual(self.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")[-1],
                         "530 5.7.10 Must issue a STARTTLS command first")

    def test_recipient_without_domain(self) -> None:
        """A recipient without a domain: 501 5.1.3."""
        self.connect()
        self.assertEqual(self.send(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob>\r\n")[-1],
                         "501 5.1.3 Bad recipient address syntax")

    def test_max_recipients(self) -> None:
        """The recipient after max_recipients gets 452 4.5.3."""
        self.connect(Harness(make_connector(max_recipients=2)))
        lines = self.send(b"EHLO c\r\nMAIL FROM:<>\r\n"
                          + b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(3)))
        self.assertEqual(lines[-3:], ["250 2.1.5 Recipient OK"] * 2
                         + ["452 4.5.3 Too many recipients"])

    def test_non_ascii_needs_smtputf8(self) -> None:
        """A non-ASCII recipient is refused without SMTPUTF8 on MAIL and accepted with it."""
        self.connect()
        rcpt = "RCPT TO:<jörg@example.test>\r\n".encode()
        self.assertEqual(self.send(b"EHLO c\r\nMAIL FROM:<>\r\n" + rcpt)[-1],
                         "501 5.1.3 Bad recipient address syntax")
        self.assertEqual(self.send(b"RSET\r\nMAIL FROM:<> SMTPUTF8\r\n" + rcpt)[-1],
                         "250 2.1.5 Recipient OK")

    def test_size_parameter(self) -> None:
        """MAIL SIZE over max_message_size: 552 5.3.4; a malformed SIZE: 501."""
        self.connect(Harness(make_connector(max_message_size=100)))
        self.assertEqual(
            self.send(b"EHLO c\r\nMAIL FROM:<> SIZE=101\r\nMAIL FROM:<> SIZE=x\r\n")[-2:],
            ["552 5.3.4 Message size exceeds fixed maximum message size",
             "501 5.5.4 Invalid SIZE parameter"],
        )
        self.assertEqual(self.send(b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\n"),
                         ["250 2.1.0 Sender OK"])

    def test_rate_limit(self) -> None:
        """Past the message rate the MAIL gets 421 4.4.2 and the connection closes."""
        self.connect(Harness(make_connector(message_rate_limit=Rate(1, timedelta(minutes=1)))))
        self.queue_message()
        self.assertEqual(
            self.send(b"MAIL FROM:<>\r\n"),
            [f"421 4.4.2 {FQDN} Message submission rate for this client has exceeded "
             "the configured limit"],
        )
        self.assertTrue(self.transport.disconnecting)

    def test_rate_limit_per_user(self) -> None:
        """An authenticated session is limited per user name, not per IP."""
        harness = Harness(make_connector(message_rate_limit=Rate(1, timedelta(minutes=1))))
        self.connect(harness)
        self.session.user = AuthenticatedUser("u", frozenset({"a@sender.test"}))
        self.queue_message()
        other, transport = harness.connect()
        other.dataReceived(b"EHLO c\r\nMAIL FROM:<>\r\n")
        self.assertEqual(reply_lines(transport.value())[-1], "250 2.1.0 Sender OK")


class DataTests(SessionTestCase):
    def setUp(self) -> None:
        self.connect()

    def test_queued(self) -> None:
        """DATA gets 354; the end gets 250 2.6.0 with message id, queue id and host name."""
        self.assertEqual(self.send(ENVELOPE + b"DATA\r\n")[-1],
                         "354 Start mail input; end with <CRLF>.<CRLF>")
        self.assertEqual(self.send(MESSAGE + b".\r\n"), [self.queued_line()])
        self.assertRegex(self.queued_line(), r"^250 2\.6\.0 <Q000001\.[0-9A-F]+@mail\.example\.test>"
                         r" \[InternalId=Q000001, Hostname=mail\.example\.test\] Queued mail for delivery$")

    def test_pipelined_in_one_write(self) -> None:
        """MAIL, RCPT and DATA in one chunk are answered together in one write."""
        writes: list[bytes] = []
        self.transport.write = writes.append  # type: ignore[method-assign]
        self.session.dataReceived(ENVELOPE + b"DATA\r\n")
        self.assertEqual(len(writes), 1)
        self.assertEqual(len(reply_lines(writes[0])), 10)

    def test_message_and_next_command_in_one_chunk(self) -> None:
        """Bytes after CRLF.CRLF are the next commands."""
        self.send(ENVELOPE + b"DATA\r\n")
        self.assertEqual(self.send(MESSAGE + b".\r\nNOOP\r\n"),
                         [self.queued_line(), "250 2.0.0 OK"])

    def test_dot_unstuffing(self) -> None:
        """A dot-stuffed line is spooled with its first dot removed."""
        self.queue_message(b"Subject: a\r\n\r\n..hidden\r\n...\r\n")
        self.assertTrue(self.harness.spool.committed[0][1].endswith(b"\r\n.hidden\r\n..\r\n"))

    def test_end_split_at_every_offset(self) -> None:
        """The message ends correctly wherever CRLF.CRLF is split between chunks."""
        tail = MESSAGE + b".\r\n"
        for k in range(len(tail)):
            self.send(ENVELOPE + b"DATA\r\n")
            self.assertEqual(self.send(tail[:k]), [])
            self.assertEqual(len(self.send(tail[k:])), 1)
        committed = self.harness.spool.committed
        self.assertEqual(len(committed), len(tail))
        for envelope, data in committed:
            self.assertTrue(data.endswith(
                b"\r\nSubject: hello\r\nMessage-ID: " + envelope.message_id.encode()
                + b"\r\n\r\nbody\r\n"))

    def test_received_and_message_id(self) -> None:
        """The spooled message starts with Received and gains one Message-ID."""
        self.queue_message()
        envelope, data = self.harness.spool.committed[0]
        self.assertTrue(data.startswith(
            b"Received: from client.test ([192.0.2.10])\r\n\tby mail.example.test (relaygw) with "
            b"ESMTP id Q000001\r\n\tfor <bob@example.test>; "))
        self.assertIn(b"Subject: hello\r\nMessage-ID: " + envelope.message_id.encode() + b"\r\n\r\n",
                      data)
        self.assertEqual(data.count(b"Message-ID"), 1)

    def test_existing_message_id(self) -> None:
        """A message with a Message-ID keeps it alone, and the 250 shows it."""
        self.assertEqual(self.queue_message(b"Message-Id: <own@x.test>\r\n\r\nb\r\n"),
                         ["250 2.6.0 <own@x.test> [InternalId=Q000001, Hostname=mail.example.test]"
                          " Queued mail for delivery"])
        self.assertEqual(self.harness.spool.committed[0][1].lower().count(b"message-id"), 1)

    def test_envelope(self) -> None:
        """The envelope holds sender, recipients, connector, client, HELO and time."""
        self.queue_message()
        env = self.harness.spool.committed[0][0]
        self.assertEqual(
            (env.sender, [r.address for r in env.recipients], env.connector, env.client_ip,
             env.client_port, env.helo, env.auth_user, env.tls, env.received_at, env.body),
            ("a@sender.test", ["bob@example.test"], "Default", "192.0.2.10", 40001,
             "client.test", None, None, 1_800_000_000.0, "7BIT"),
        )
        self.assertEqual(env.size, len(self.harness.spool.committed[0][1]))

    def test_transaction_reset_after_data(self) -> None:
        """After the message, RCPT needs a new MAIL."""
        self.queue_message()
        self.assertEqual(self.send(b"RCPT TO:<bob@example.test>\r\n"),
                         ["503 5.5.1 Sender not yet given"])

    def test_bare_lf(self) -> None:
        """Bare LF in the data: 550 5.6.11 after the end, nothing committed."""
        self.assertEqual(self.queue_message(b"Subject: a\r\n\r\nbad\nline\r\n"),
                         ["550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal"])
        self.assertEqual(self.harness.spool.committed, [])
        self.assertEqual(self.harness.spool.aborted, ["Q000001"])

    def test_bare_cr(self) -> None:
        """Bare CR in the data: 550 5.6.11, nothing committed."""
        self.assertEqual(self.queue_message(b"Subject: a\r\n\r\nbad\rline\r\n"),
                         ["550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal"])
        self.assertEqual(self.harness.spool.committed, [])

    def test_too_big(self) -> None:
        """A message over max_message_size is read to its end, then 552 5.3.4; nothing queued."""
        self.connect(Harness(make_connector(max_message_size=1000)))
        self.send(ENVELOPE + b"DATA\r\n")
        for _ in range(100):
            self.assertEqual(self.send(b"x" * 98 + b"\r\n"), [])
        self.assertEqual(self.send(b".\r\nNOOP\r\n"),
                         ["552 5.3.4 Message size exceeds fixed maximum message size",
                          "250 2.0.0 OK"])
        self.assertEqual(self.harness.spool.committed, [])
        self.assertLess(self.harness.spool.writers[0].size, 2000)

    def test_spool_begin_failure(self) -> None:
        """DATA when the spool cannot open an entry: 452 4.3.1, nothing acknowledged."""
        self.harness.spool.fail_begin = True
        self.assertEqual(self.send(ENVELOPE + b"DATA\r\n")[-1], "452 4.3.1 Insufficient system resources")

    def test_spool_write_failure(self) -> None:
        """A failed write: 452 4.3.1 after the end, no commit."""
        self.send(ENVELOPE + b"DATA\r\n")
        self.harness.spool.fail_write = True
        self.assertEqual(self.send(MESSAGE + b".\r\n"), ["452 4.3.1 Insufficient system resources"])
        self.assertEqual(self.harness.spool.committed, [])

    def test_spool_commit_failure(self) -> None:
        """A failed commit: 452 4.3.1, no commit, the writer aborted."""
        self.harness.spool.fail_commit = True
        self.assertEqual(self.queue_message(), ["452 4.3.1 Insufficient system resources"])
        self.assertEqual((self.harness.spool.committed, self.harness.spool.aborted), ([], ["Q000001"]))

    def test_data_timeout(self) -> None:
        """No data within timeouts.data: 421 4.4.2, close, the entry removed."""
        self.connect(Harness(make_connector(timeouts=Timeouts(command=timedelta(seconds=30),
                                                              data=timedelta(seconds=60)))))
        self.send(ENVELOPE + b"DATA\r\n")
        self.harness.reactor.advance(45)
        self.send(b"Subject: x\r\n\r\n" + b"y" * 1024)  # 1 KiB restarts the timer
        self.harness.reactor.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.transport.clear()
        self.harness.reactor.advance(1)
        self.assertEqual(reply_lines(self.transport.value()),
                         [f"421 4.4.2 {FQDN} Timeout waiting for client input"])
        self.assertEqual(self.harness.spool.aborted, ["Q000001"])

    def test_data_trickle_cut_by_the_data_timeout(self) -> None:
        """
        Message data a few bytes at a time (slowloris) does not restart the
        data timeout: under 1 KiB within timeouts.data is a timeout.
        """
        self.connect(Harness(make_connector(timeouts=Timeouts(command=timedelta(seconds=30),
                                                              data=timedelta(seconds=60)))))
        self.send(ENVELOPE + b"DATA\r\n")
        for _ in range(59):
            self.harness.reactor.advance(1)
            self.send(b"x\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.harness.reactor.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(reply_lines(self.transport.value())[-1],
                         f"421 4.4.2 {FQDN} Timeout waiting for client input")
        self.assertEqual(self.harness.spool.aborted, ["Q000001"])

    def test_lost_connection_aborts(self) -> None:
        """A connection lost inside DATA leaves nothing in the spool."""
        self.send(ENVELOPE + b"DATA\r\nSubject: x\r\n")
        self.session.connectionLost(None)
        self.assertEqual((self.harness.spool.committed, self.harness.spool.aborted), ([], ["Q000001"]))

    def test_memory_flat_for_50_mib(self) -> None:
        """A 50 MiB message streams through: the session holds no more than a few chunks."""
        self.connect(Harness(make_connector(max_message_size=64 * 1024 * 1024)))
        self.harness.spool.keep_data = False
        self.send(ENVELOPE + b"DATA\r\n")
        chunk = (b"y" * 1022 + b"\r\n") * 64
        tracemalloc.start()
        try:
            self.session.dataReceived(b"Subject: big\r\n\r\n")
            for _ in range(50 * 16):
                self.session.dataReceived(chunk)
            self.session.dataReceived(b".\r\n")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(len(self.harness.spool.committed), 1)
        self.assertGreater(self.harness.spool.committed[0][0].size, 50 * 1024 * 1024)
        self.assertLess(peak, 2 * 1024 * 1024)

    def test_queued_event(self) -> None:
        """A queued message is logged with its queue id and reply code."""
        events = all_events(self)
        self.queue_message()
        [event] = [e for e in events if e.get("event") == "receive.queued"]
        self.assertEqual((event["queue_id"], event["smtp_code"], event["connector"]),
                         ("Q000001", 250, "Default"))


class BdatTests(SessionTestCase):
    def setUp(self) -> None:
        self.connect()

    def test_bdat_last(self) -> None:
        """BDAT chunks are acknowledged with their size; LAST queues; no dot-unstuffing."""
        self.send(ENVELOPE)
        self.assertEqual(self.send(b"BDAT 12\r\nSubject: a\r\n"), ["250 2.0.0 12 octets received"])
        lines = self.send(b"BDAT 9 LAST\r\n\r\n..x\r\n\r\nNOOP\r\n")
        self.assertEqual(lines, [self.queued_line(), "250 2.0.0 OK"])
        self.assertTrue(self.harness.spool.committed[0][1].endswith(b"\r\n\r\n..x\r\n\r\n"))

    def test_bdat_across_chunks(self) -> None:
        """A BDAT chunk split over reads is counted exactly; following bytes are commands."""
        self.send(ENVELOPE)
        payload = b"Subject: a\r\n\r\nBDAT 1\r\n"
        self.assertEqual(self.send(b"BDAT %d LAST\r\n" % len(payload) + payload[:5]), [])
        self.assertEqual(self.send(payload[5:-1]), [])
        self.assertEqual(self.send(payload[-1:] + b"NOOP\r\n"), [self.queued_line(), "250 2.0.0 OK"])
        data = self.harness.spool.committed[0][1]
        self.assertIn(b"\r\nSubject: a\r\nMessage-ID: ", data)
        self.assertTrue(data.endswith(b"\r\n\r\nBDAT 1\r\n"))

    def test_bdat_zero_last(self) -> None:
        """BDAT 0 LAST ends the message."""
        self.send(ENVELOPE + b"BDAT 5\r\n\r\nx\r\n")
        self.assertEqual(self.send(b"BDAT 0 LAST\r\n"), [self.queued_line()])

    def test_refused_bdat_consumes_chunk(self) -> None:
        """A BDAT without a transaction is refused after its bytes are read, not run as commands."""
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.send(b"BDAT 6\r\nQUIT\r\nNOOP\r\n"),
                         ["503 5.5.1 Sender not yet given", "250 2.0.0 OK"])

    def test_data_after_bdat(self) -> None:
        """DATA after a BDAT chunk in the same transaction is refused."""
        self.send(ENVELOPE + b"BDAT 2\r\n\r\n")
        self.assertEqual(self.send(b"DATA\r\n"),
                         ["503 5.5.1 Invalid command sequence: DATA and BDAT cannot be mixed"])

    def test_bdat_too_big(self) -> None:
        """A BDAT chunk crossing max_message_size is refused with 552 and nothing queued."""
        self.connect(Harness(make_connector(max_message_size=10)))
        self.send(ENVELOPE)
        self.assertEqual(self.send(b"BDAT 11\r\n" + b"x" * 11),
                         ["552 5.3.4 Message size exceeds fixed maximum message size"])
        self.assertEqual(self.harness.spool.committed, [])

    def test_bdat_bare_lf(self) -> None:
        """Bare LF in BDAT data (not BINARYMIME): 550 5.6.11, nothing queued."""
        self.send(ENVELOPE)
        self.assertEqual(self.send(b"BDAT 4 LAST\r\na\nb\n"),
                         ["550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal"])
        self.assertEqual(self.harness.spool.committed, [])


class StartTLSTests(SessionTestCase):
    def setUp(self) -> None:
        self.options = object()
        self.connect(Harness(make_connector(tls="starttls"), tls_options=lambda c: self.options))

    def test_injection_discarded(self) -> None:
        """Plaintext pipelined after STARTTLS is discarded; only 220 is answered before TLS."""
        self.send(b"EHLO c\r\n")
        lines = self.send(b"STARTTLS\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\n")
        self.assertEqual(lines, ["220 2.0.0 SMTP server ready"])
        self.assertEqual(self.transport.tls_started, [self.options])
        self.assertTrue(self.transport.written_before_tls.endswith(b"220 2.0.0 SMTP server ready\r\n"))

    def test_session_reset(self) -> None:
        """After STARTTLS the client must greet again; STARTTLS is no longer offered."""
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nSTARTTLS\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<a@b.test>\r\n"), ["503 5.5.2 Send hello first"])
        self.assertNotIn("250-STARTTLS", self.send(b"EHLO c\r\n"))
        self.assertEqual(self.send(b"STARTTLS\r\n"), ["503 5.5.1 TLS already active"])

    def test_tls_recorded(self) -> None:
        """After the handshake, the TLS version and cipher go into Received and the envelope."""
        self.send(b"EHLO c\r\nSTARTTLS\r\n")
        self.session.handshakeCompleted()
        self.queue_message()
        envelope, data = self.harness.spool.committed[0]
        self.assertEqual(envelope.tls, TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"))
        self.assertIn(b"with ESMTPS id", data)
        self.assertIn(b"(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384)", data)

    def test_starttls_unavailable(self) -> None:
        """STARTTLS without usable TLS options is 454 4.7.0; on a tls=off connector 500."""
        self.connect(Harness(make_connector(tls="starttls"), tls_options=lambda c: None))
        self.assertEqual(self.send(b"EHLO c\r\nSTARTTLS\r\n")[-1],
                         "454 4.7.0 TLS not available due to temporary reason")
        self.connect()
        self.assertEqual(self.send(b"EHLO c\r\nSTARTTLS\r\n")[-1], "500 5.3.3 Unrecognized command")


def _range(text: str) -> Any:
    from relaygw.config._units import parse_range

    return parse_range(text)

