"""
Tests for L{relaygw.session.protocol.Session} with an asynchronous spool
commit: 250 only once the commit is durable, PIPELINING order kept while it
is pending, no timeout meanwhile, a client that leaves meanwhile; and the
receive path's log events per message.
"""

from __future__ import annotations

from datetime import timedelta


from relaygw.config._model import Timeouts
from tests.fakes import Harness, make_connector, reply_lines, all_events
from tests.test_protocol import ENVELOPE, FQDN, MESSAGE, SessionTestCase

SPOOL_FAILED = "452 4.3.1 Insufficient system resources"


class PendingCommitTests(SessionTestCase):
    def setUp(self) -> None:
        self.connect(Harness(make_connector(timeouts=Timeouts(command=timedelta(seconds=30),
                                                              data=timedelta(seconds=60)))))
        self.harness.spool.hold_commits = True
        self.send(ENVELOPE + b"DATA\r\n")

    def release(self, *, failed: bool = False) -> list[str]:
        """Finish the held commits; the replies written meanwhile."""
        self.transport.clear()
        self.harness.spool.release(failed=failed)
        return reply_lines(self.transport.value())

    def test_250_only_after_the_commit(self) -> None:
        """The end of data is answered only when the commit's Deferred fires, then with 250."""
        self.assertEqual(self.send(MESSAGE + b".\r\n"), [])
        self.assertEqual(self.harness.spool.committed, [])
        self.assertEqual(self.release(), [self.queued_line()])

    def test_failed_commit_is_452(self) -> None:
        """A commit that fails is answered 452 4.3.1 and nothing is acknowledged or committed."""
        self.send(MESSAGE + b".\r\n")
        self.assertEqual(self.release(failed=True), [SPOOL_FAILED])
        self.assertEqual(self.harness.spool.committed, [])
        self.assertEqual(self.send(b"NOOP\r\n"), ["250 2.0.0 OK"])

    def test_pipelined_commands_wait_in_order(self) -> None:
        """
        Commands pipelined after the end of data, in the same chunk and in
        later ones, are answered after the 250, in order.
        """
        self.assertEqual(self.send(MESSAGE + b".\r\nMAIL FROM:<c@sender.test>\r\n"), [])
        self.assertEqual(self.send(b"RCPT TO:<d@example.test>\r\nNOOP\r\n"), [])
        self.assertEqual(
            self.release(),
            [self.queued_line(), "250 2.1.0 Sender OK", "250 2.1.5 Recipient OK", "250 2.0.0 OK"],
        )

    def test_next_message_pipelined_behind_a_pending_commit(self) -> None:
        """A whole second transaction sent behind a pending commit is queued after it, in order."""
        self.send(MESSAGE + b".\r\n" + ENVELOPE[len(b"EHLO client.test\r\n"):] + b"DATA\r\n"
                  + MESSAGE + b".\r\nQUIT\r\n")
        first = self.release()
        self.assertEqual(first[0], self.queued_line(0))
        self.assertEqual(first[1:], ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK",
                                     "354 Start mail input; end with <CRLF>.<CRLF>"])
        second = self.release()
        self.assertEqual(second, [self.queued_line(1), f"221 2.0.0 {FQDN} Service closing transmission channel"])

    def test_no_timeout_while_committing(self) -> None:
        """
        A slow commit does not time the client out; the command timeout
        runs again once the 250 is sent.
        """
        self.send(MESSAGE + b".\r\n")
        self.harness.reactor.advance(300)
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.release(), [self.queued_line()])
        self.transport.clear()
        self.harness.reactor.advance(30)
        self.assertEqual(reply_lines(self.transport.value()),
                         [f"421 4.4.2 {FQDN} Timeout waiting for client input"])

    def test_client_gone_while_committing(self) -> None:
        """
        A client that disconnects while its commit is pending: the message
        is still committed and logged as queued, and nothing is written to
        the gone transport.
        """
        events = all_events(self)
        self.send(MESSAGE + b".\r\nNOOP\r\n")
        self.session.connectionLost(None)
        self.assertEqual(self.release(), [])
        self.assertEqual(len(self.harness.spool.committed), 1)
        self.assertEqual(self.harness.spool.aborted, [])
        self.assertEqual([e["queue_id"] for e in events if e.get("event") == "receive.queued"],
                         ["Q000001"])

    def test_bdat_last_waits_for_the_commit(self) -> None:
        """BDAT LAST is answered 250 only after the commit, and later commands wait for it."""
        self.connect()
        self.harness.spool.hold_commits = True
        self.send(ENVELOPE)
        self.assertEqual(self.send(b"BDAT 6 LAST\r\nab\r\n\r\nNOOP\r\n"), [])
        self.assertEqual(self.release(), [self.queued_line(), "250 2.0.0 OK"])


class EventsPerMessageTests(SessionTestCase):
    def test_two_events_for_a_one_message_session(self) -> None:
        """
        Without verbose protocol logging a one-message session logs two
        events: the queued message (with its fields) and the session summary
        at disconnect (connector, peer, messages, duration).
        """
        events = all_events(self)
        self.connect()
        self.queue_message()
        self.harness.reactor.advance(2)
        self.send(b"QUIT\r\n")
        self.session.connectionLost(None)
        self.assertEqual([e.get("event") for e in events], ["receive.queued", "receive.disconnect"])
        queued, summary = events
        self.assertEqual(
            (queued["queue_id"], queued["sender"], queued["recipients"], queued["smtp_code"],
             queued["connector"], queued["peer"]),
            ("Q000001", "a@sender.test", ["bob@example.test"], 250, "Default",
             "192.0.2.10:40001"),
        )
        self.assertEqual(
            (summary["connector"], summary["peer"], summary["messages"], summary["duration"]),
            ("Default", "192.0.2.10:40001", 1, 2.0),
        )

    def test_verbose_logs_every_command(self) -> None:
        """With protocol_logging = "verbose" each command and reply is an event as well."""
        events = all_events(self)
        self.connect(Harness(make_connector(protocol_logging="verbose")))
        self.queue_message()
        names = [e.get("event") for e in events]
        self.assertEqual(names.count("receive.command"), 4)
        self.assertEqual(names.count("receive.reply"), 6)
        self.assertIn("receive.connect", names)
