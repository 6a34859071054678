"""
Tests for L{relaygw.accept.intake}: DATA decoding, line-end checks, header
handling and the commit rules, without a protocol.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from relaygw import replies
from relaygw.accept.intake import DataDecoder, LineEndChecker, MessageIntake, Transaction
from relaygw.errors import DeferReply, RejectReply
from relaygw.interfaces import IMessageWriter, ISpool
from relaygw.session.address import Mailbox
from relaygw.spool.envelope import Envelope
from tests.fakes import RecordingSpool

RECEIVED = b"Received: from x ([192.0.2.1])\r\n\tby relay; date\r\n"
NEW_ID = "<NEW@relay.test>"


def decode_all(chunks: list[bytes]) -> tuple[bytes, bytes | None]:
    decoder = DataDecoder()
    content = []
    leftover = None
    for chunk in chunks:
        if leftover is not None:
            # After the end, later chunks are commands too.
            leftover += chunk
            continue
        part, leftover = decoder.feed(chunk)
        content.append(part)
    return b"".join(content), leftover


def make_intake(
    spool: RecordingSpool, max_size: int = 10_000, check: bool = True
) -> MessageIntake:
    return MessageIntake(
        spool.begin(), received=RECEIVED, new_message_id=NEW_ID, max_size=max_size,
        check_line_ends=check,
    )


def envelope_maker(queue_id: str):  # type: ignore[no-untyped-def]
    txn = Transaction(Mailbox("a", "example.test"))
    txn.recipients.append(Mailbox("b", "example.test"))

    def make(message_id: str, size: int) -> Envelope:
        return txn.envelope(
            queue_id=queue_id, message_id=message_id, size=size, connector="c",
            client_ip="192.0.2.1", client_port=1, helo="h", auth_user=None, tls=None,
            received_at=0.0,
        )

    return make


class DataDecoderTests(SynchronousTestCase):
    def test_dot_unstuffing(self) -> None:
        """A line starting with a dot loses that one dot; the first line counts too."""
        content, leftover = decode_all([b"..first\r\nmid\r\n...two\r\n.\r\n"])
        self.assertEqual(content, b".first\r\nmid\r\n..two\r\n")
        self.assertEqual(leftover, b"")

    def test_empty_message(self) -> None:
        """A lone dot line at once ends an empty message."""
        self.assertEqual(decode_all([b".\r\nQUIT\r\n"]), (b"", b"QUIT\r\n"))

    def test_leftover_is_next_commands(self) -> None:
        """Bytes after CRLF.CRLF are returned untouched as the next commands."""
        self.assertEqual(decode_all([b"a\r\n.\r\nMAIL FROM:<>\r\n"]), (b"a\r\n", b"MAIL FROM:<>\r\n"))

    def test_dot_inside_line_kept(self) -> None:
        """Dots not at a line start, and a dot line followed by text, are content."""
        content, _ = decode_all([b"a.b\r\n.x\r\n.\r.\r\n.\r\n"])
        self.assertEqual(content, b"a.b\r\nx\r\n\r.\r\n")

    def test_end_split_at_every_offset(self) -> None:
        """CRLF.CRLF and dot-stuffing are found wherever the chunk boundaries fall."""
        stream = b"Subject: x\r\n\r\n..a\r\nb\r\n.\r\nNOOP\r\n"
        for i in range(len(stream) + 1):
            for j in range(i, len(stream) + 1):
                content, leftover = decode_all(
                    [c for c in (stream[:i], stream[i:j], stream[j:]) if c]
                    or [b""]
                )
                self.assertEqual(
                    (content, leftover), (b"Subject: x\r\n\r\n.a\r\nb\r\n", b"NOOP\r\n"),
                    f"split {i},{j}",
                )

    def test_byte_at_a_time(self) -> None:
        """One byte per chunk decodes the same as one chunk."""
        stream = b"..\r\n.\r\r\n\r\n.\r\n"
        decoder = DataDecoder()
        out = []
        leftover = None
        for k in range(len(stream)):
            part, leftover = decoder.feed(stream[k : k + 1])
            out.append(part)
        self.assertEqual((b"".join(out), leftover), (b".\r\n\r\r\n\r\n", b""))

    def test_not_ended(self) -> None:
        """Without the end marker the decoder reports no end and holds at most a few bytes."""
        decoder = DataDecoder()
        part, leftover = decoder.feed(b"x" * 100 + b"\r\n.")
        self.assertIsNone(leftover)
        self.assertEqual(part, b"x" * 100)


class LineEndCheckerTests(SynchronousTestCase):
    def check(self, *chunks: bytes) -> bool:
        checker = LineEndChecker()
        for c in chunks:
            checker.feed(c)
        checker.close()
        return checker.bad

    def test_crlf_ok(self) -> None:
        """CRLF line ends, also split between chunks, are fine."""
        self.assertFalse(self.check(b"a\r\nb\r", b"\nc\r\n"))

    def test_bare_lf(self) -> None:
        """An LF without CR is found."""
        self.assertTrue(self.check(b"a\r\nb\nc\r\n"))

    def test_bare_cr(self) -> None:
        """A CR without LF is found, also at a chunk end or the stream end."""
        self.assertTrue(self.check(b"a\rb\r\n"))
        self.assertTrue(self.check(b"a\r", b"b\r\n"))
        self.assertTrue(self.check(b"a\r"))


class MessageIntakeTests(SynchronousTestCase):
    def test_spool_fake_provides_interfaces(self) -> None:
        """The recording spool and its writers provide ISpool and IMessageWriter."""
        spool = RecordingSpool()
        verifyObject(ISpool, spool)
        verifyObject(IMessageWriter, spool.begin())

    def test_received_then_data_then_message_id_before_blank_line(self) -> None:
        """Received comes first; a missing Message-ID is inserted before the blank line."""
        spool = RecordingSpool()
        intake = make_intake(spool)
        for c in (b"Subject: a\r\nFr", b"om: b\r\n", b"\r\nbody\r\n"):
            intake.feed(c)
        env = self.successResultOf(intake.finish(envelope_maker(intake.queue_id)))
        self.assertEqual(env.message_id, NEW_ID)
        self.assertEqual(
            spool.committed[0][1],
            RECEIVED + b"Subject: a\r\nFrom: b\r\nMessage-ID: <NEW@relay.test>\r\n\r\nbody\r\n",
        )

    def test_existing_message_id_kept_once(self) -> None:
        """A folded Message-ID in any case is found, reported, and not duplicated."""
        spool = RecordingSpool()
        intake = make_intake(spool)
        intake.feed(b"MESSAGE-id:\r\n <abc@x.test>\r\nSubject: a\r\n\r\nMessage-ID: <no@body>\r\n")
        env = self.successResultOf(intake.finish(envelope_maker(intake.queue_id)))
        self.assertEqual(env.message_id, "<abc@x.test>")
        self.assertEqual(spool.committed[0][1].lower().count(b"message-id:"), 2)
        self.assertNotIn(NEW_ID.encode(), spool.committed[0][1])

    def test_message_without_body(self) -> None:
        """A message of headers only gets its Message-ID at the end."""
        spool = RecordingSpool()
        intake = make_intake(spool)
        intake.feed(b"Subject: a\r\n")
        self.successResultOf(intake.finish(envelope_maker(intake.queue_id)))
        self.assertEqual(
            spool.committed[0][1], RECEIVED + b"Subject: a\r\nMessage-ID: <NEW@relay.test>\r\n"
        )

    def test_empty_message(self) -> None:
        """An empty message still gets Received and Message-ID."""
        spool = RecordingSpool()
        intake = make_intake(spool)
        self.successResultOf(intake.finish(envelope_maker(intake.queue_id)))
        self.assertEqual(spool.committed[0][1], RECEIVED + b"Message-ID: <NEW@relay.test>\r\n")

    def test_size_counts_client_octets(self) -> None:
        """Exactly max_size octets pass; one more is refused with 552 and nothing committed."""
        spool = RecordingSpool()
        intake = make_intake(spool, max_size=10)
        intake.feed(b"\r\n12345678")
        self.successResultOf(intake.finish(envelope_maker(intake.queue_id)))
        intake = make_intake(spool, max_size=10)
        intake.feed(b"\r\n123456789")
        e = self.assertRaises(RejectReply, intake.finish, envelope_maker(intake.queue_id))
        self.assertEqual(e.reply, replies.TOO_BIG)
        self.assertEqual(len(spool.committed), 1)
        self.assertEqual(spool.writers[1].state, "aborted")

    def test_oversize_stops_writing(self) -> None:
        """Past the limit nothing more is written: memory and disk stay bounded."""
        spool = RecordingSpool()
        intake = make_intake(spool, max_size=100)
        for _ in range(50):
            intake.feed(b"x" * 98 + b"\r\n")
        self.assertLess(spool.writers[0].size, 300)

    def test_bare_lf_refused(self) -> None:
        """Bare LF gives 550 5.6.11 and an aborted writer."""
        spool = RecordingSpool()
        intake = make_intake(spool)
        intake.feed(b"Subject: a\n\r\nx\r\n")
        e = self.assertRaises(RejectReply, intake.finish, envelope_maker(intake.queue_id))
        self.assertEqual(e.reply, replies.BARE_LF)
        self.assertEqual((spool.committed, spool.aborted), ([], ["Q000001"]))

    def test_binary_skips_line_end_check(self) -> None:
        """With the check off (BINARYMIME), bare CR and LF are content."""
        spool = RecordingSpool()
        intake = make_intake(spool, check=False)
        intake.feed(b"\r\n\x00\r\n\r")
        self.successResultOf(intake.finish(envelope_maker(intake.queue_id)))
        self.assertTrue(spool.committed[0][1].endswith(b"\r\n\r\n\x00\r\n\r"))

    def test_write_failure(self) -> None:
        """A failed write gives 452 4.3.1 at the end, with nothing committed."""
        spool = RecordingSpool()
        intake = make_intake(spool)
        spool.fail_write = True
        intake.feed(b"\r\nbody\r\n")
        e = self.assertRaises(DeferReply, intake.finish, envelope_maker(intake.queue_id))
        self.assertEqual(e.reply, replies.SPOOL_FAILED)
        self.assertEqual(spool.committed, [])
        self.assertEqual(spool.writers[0].state, "aborted")

    def test_commit_failure(self) -> None:
        """A failed commit fails finish's Deferred with 452 4.3.1; nothing is committed."""
        spool = RecordingSpool()
        intake = make_intake(spool)
        spool.fail_commit = True
        intake.feed(b"\r\nbody\r\n")
        failure = self.failureResultOf(intake.finish(envelope_maker(intake.queue_id)), DeferReply)
        self.assertEqual(failure.value.reply, replies.SPOOL_FAILED)
        self.assertEqual((spool.committed, spool.writers[0].state), ([], "aborted"))

    def test_finish_waits_for_the_commit(self) -> None:
        """finish's Deferred fires only when the spool's commit does, with the envelope."""
        spool = RecordingSpool()
        spool.hold_commits = True
        intake = make_intake(spool)
        intake.feed(b"\r\nbody\r\n")
        finished = intake.finish(envelope_maker(intake.queue_id))
        self.assertNoResult(finished)
        spool.release()
        self.assertEqual(self.successResultOf(finished), spool.committed[0][0])

    def test_abort_after_finish_keeps_the_commit(self) -> None:
        """The session ending while the commit is pending does not undo it."""
        spool = RecordingSpool()
        spool.hold_commits = True
        intake = make_intake(spool)
        intake.feed(b"\r\nbody\r\n")
        finished = intake.finish(envelope_maker(intake.queue_id))
        intake.abort()
        spool.release()
        self.successResultOf(finished)
        self.assertEqual((len(spool.committed), spool.aborted), (1, []))

    def test_envelope_fields(self) -> None:
        """The envelope carries the writer's id and size and the message's Message-ID."""
        spool = RecordingSpool()
        intake = make_intake(spool)
        intake.feed(b"\r\nb\r\n")
        env = self.successResultOf(intake.finish(envelope_maker(intake.queue_id)))
        self.assertEqual(
            (env.id, env.size, env.sender, [r.address for r in env.recipients]),
            ("Q000001", spool.writers[0].size, "a@example.test", ["b@example.test"]),
        )
