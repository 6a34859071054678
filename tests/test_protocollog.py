"""
Tests for L{relaygw.ops.protolog} and L{relaygw.ops._logfiles}: the
Exchange protocol log format, CSV quoting, AUTH masking on the receive and
the send side, hourly rotation and the size cap on an injected clock,
clean-up by age, and the writer thread.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relaygw.deliver.smtpclient import ClientAuth, OutboundMessage, SendLog, make_client
from relaygw.interfaces import IProtocolLog, IProtocolLogSession
from relaygw.ops._logfiles import Stamps, csv_field, utc_stamp
from relaygw.ops.protolog import FIELDS, ProtocolLog, protocol_dir, read_rows, RECEIVE, SEND
from tests.fakes import Harness, make_connector
from tests.test_auth_protocol import AuthSession, b64, plain
from tests.test_smtpclient import FakeTLS, ScriptedServer

#: 2026-12-07T10:59:58Z
T0 = datetime(2026, 12, 7, 10, 59, 58, tzinfo=timezone.utc).timestamp()


def tmpdir(case: SynchronousTestCase) -> Path:
    path = Path(tempfile.mkdtemp(prefix="relaygw-protolog-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


def inline(work: Callable[[], None]) -> Deferred[None]:
    return maybeDeferred(work)


def make_log(case: SynchronousTestCase, clock: Clock, kind: Any = "receive", **kw: Any) -> ProtocolLog:
    log = ProtocolLog(tmpdir(case), kind, clock, run=inline, **kw)
    log.start()
    return log


def file_names(log: ProtocolLog) -> list[str]:
    return [p.name for _, _, p in log.files.files()]


class FormatTests(SynchronousTestCase):
    """The file's header, the rows and their quoting."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.log = make_log(self, self.clock)
        self.log_dir = self.log.files.directory.parent.parent

    def flush(self) -> None:
        self.clock.advance(1)

    def test_provides_interfaces(self) -> None:
        """The log and its session handles provide the pipeline's interfaces."""
        self.assertTrue(verifyObject(IProtocolLog, self.log))
        handle = self.log.session("c", "S1", ("127.0.0.1", 25), ("127.0.0.2", 4000))
        self.assertTrue(verifyObject(IProtocolLogSession, handle))

    def test_header_and_row(self) -> None:
        """A new file starts with Exchange's five header lines, then one CSV row per call."""
        handle = self.log.session("Default", "08DC0001", ("127.0.0.1", 25), ("192.0.2.7", 40001))
        handle.row("+")
        handle.row("<", b"EHLO client.test")
        self.flush()
        [path] = [p for _, _, p in self.log.files.files()]
        self.assertEqual(path.parent, protocol_dir(self.log_dir, RECEIVE))
        self.assertEqual(path.name, "RECV2026120710-1.LOG")
        lines = path.read_bytes().decode().split("\r\n")
        from relaygw import __version__

        self.assertEqual(lines[:5], [
            f"#Software: relaygw {__version__}",
            "#Version: 15.0.0.0",
            "#Log-type: SMTP Receive Protocol Log",
            "#Date: 2026-12-07T10:59:59.000Z",
            "#Fields: date-time,connector-id,session-id,sequence-number,local-endpoint,"
            "remote-endpoint,event,data,context",
        ])
        self.assertEqual(lines[5:], [
            "2026-12-07T10:59:58.000Z,Default,08DC0001,0,127.0.0.1:25,192.0.2.7:40001,+,,",
            "2026-12-07T10:59:58.000Z,Default,08DC0001,1,127.0.0.1:25,192.0.2.7:40001,<,"
            "EHLO client.test,",
            "",
        ])

    def test_send_header(self) -> None:
        """The SmtpSend log has its own directory, prefix and log type; it makes session ids."""
        log = make_log(self, self.clock, "send")
        handle = log.session("internet", None, ("10.0.0.1", 50000), ("10.0.0.2", 25))
        handle.row("+")
        self.flush()
        [path] = [p for _, _, p in log.files.files()]
        self.assertEqual(path.parent.name, SEND.directory)
        self.assertTrue(path.name.startswith("SEND2026120710-"), path.name)
        self.assertIn("#Log-type: SMTP Send Protocol Log\r\n", path.read_bytes().decode())
        self.assertEqual(len(handle.session_id), 16)

    def test_csv_quoting(self) -> None:
        """Fields with a comma or a quote are quoted, quotes doubled, as Exchange writes them."""
        self.assertEqual(csv_field("plain text"), "plain text")
        self.assertEqual(csv_field("a,b"), '"a,b"')
        self.assertEqual(csv_field('say "hi"'), '"say ""hi"""')
        self.assertEqual(csv_field("two\r\nlines"), "two  lines")
        handle = self.log.session("Front, door", "S", ("::1", 25), ("::ffff:10.0.0.1", 1))
        handle.row("<", b'MAIL FROM:<"odd,local"@x.test>', 'a "context"')
        self.flush()
        [row] = list(read_rows(self.log_dir, "receive"))
        self.assertEqual(row["connector-id"], "Front, door")
        self.assertEqual(row["data"], 'MAIL FROM:<"odd,local"@x.test>')
        self.assertEqual(row["context"], 'a "context"')
        self.assertEqual((row["local-endpoint"], row["remote-endpoint"]),
                         ("[::1]:25", "[::ffff:10.0.0.1]:1"))
        self.assertEqual(list(row), list(FIELDS))

    def test_multiline_reply_is_one_row_per_line(self) -> None:
        """A multi-line reply is a row per line, each with the next sequence number."""
        handle = self.log.session("c", "S", ("127.0.0.1", 25), ("127.0.0.1", 2))
        handle.row(">", b"250-gw Hello [127.0.0.1]\r\n250-SIZE 100\r\n250 CHUNKING\r\n")
        handle.row("-", "", "Local")
        self.flush()
        rows = list(read_rows(self.log_dir, "receive"))
        self.assertEqual([(r["sequence-number"], r["event"], r["data"]) for r in rows], [
            ("0", ">", "250-gw Hello [127.0.0.1]"), ("1", ">", "250-SIZE 100"),
            ("2", ">", "250 CHUNKING"), ("3", "-", ""),
        ])
        self.assertEqual(rows[-1]["context"], "Local")

    def test_stamps(self) -> None:
        """Times are UTC with milliseconds and a Z; the cached form agrees with the plain one."""
        stamps = Stamps()
        for t in (T0, T0 + 0.9995, T0 + 1.25, T0 + 3600.001):
            self.assertEqual(stamps(t), utc_stamp(t))
        self.assertEqual(utc_stamp(T0 + 0.5), "2026-12-07T10:59:58.500Z")

    def test_row_only_queues(self) -> None:
        """A row is a tuple queued on the reactor thread; nothing is written before the timer."""
        handle = self.log.session("c", "S", ("127.0.0.1", 25), ("127.0.0.1", 2))
        handle.row("<", b"NOOP")
        self.assertEqual(self.log.writer.pending, 1)
        self.assertEqual(self.log.files.files(), [])
        self.clock.advance(0.5)
        self.assertEqual(self.log.writer.pending, 0)
        self.assertEqual(len(self.log.files.files()), 1)


class RotationTests(SynchronousTestCase):
    """Hourly files, the size cap, restarts and clean-up by age, on an injected clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)

    def test_hourly_files(self) -> None:
        """Rows go to the file of their own UTC hour."""
        log = make_log(self, self.clock)
        handle = log.session("c", "S", ("127.0.0.1", 25), ("127.0.0.1", 2))
        handle.row("<", b"before")
        self.clock.advance(3)  # 11:00:01, the timer fires meanwhile
        handle.row("<", b"after")
        self.clock.advance(1)
        self.assertEqual(file_names(log), ["RECV2026120710-1.LOG", "RECV2026120711-1.LOG"])
        rows = list(read_rows(log.files.directory.parent.parent, "receive"))
        self.assertEqual([r["data"] for r in rows], ["before", "after"])
        self.assertEqual([r["sequence-number"] for r in rows], ["0", "1"])

    def test_size_cap(self) -> None:
        """A full file is closed and the hour's next -<n> file starts, with its own header."""
        log = make_log(self, self.clock, max_bytes=1000)
        handle = log.session("c", "S", ("127.0.0.1", 25), ("127.0.0.1", 2))
        for i in range(30):
            handle.row("<", b"NOOP %d" % i)
        self.clock.advance(1)
        names = file_names(log)
        self.assertGreater(len(names), 2)
        self.assertEqual(names[:2], ["RECV2026120710-1.LOG", "RECV2026120710-2.LOG"])
        for _, _, path in log.files.files():
            text = path.read_text()
            self.assertTrue(text.startswith("#Software: relaygw"))
            self.assertLessEqual(len(text.encode()), 1000)
        rows = list(read_rows(log.files.directory.parent.parent, "receive"))
        self.assertEqual([r["data"] for r in rows], [f"NOOP {i}" for i in range(30)])

    def test_later_flushes_continue_the_file(self) -> None:
        """Each flush appends to the hour's file; no new file or header per flush."""
        log = make_log(self, self.clock)
        handle = log.session("c", "S", ("127.0.0.1", 25), ("127.0.0.1", 2))
        for _ in range(3):
            handle.row("<", b"NOOP")
            self.clock.advance(0.5)
        [(_, _, path)] = log.files.files()
        self.assertEqual(path.read_text().count("#Fields"), 1)
        self.assertEqual(len(list(read_rows(log.files.directory.parent.parent, "receive"))), 3)

    def test_writers_never_share_a_file(self) -> None:
        """
        Two writers on one directory (receiving workers, or a restart) each
        take the hour's next free -<n>: every file has one header and one
        writer's rows.
        """
        log = make_log(self, self.clock)
        log_dir = log.files.directory.parent.parent
        other = ProtocolLog(log_dir, "receive", self.clock, run=inline)
        other.start()
        a = log.session("c", "A", ("127.0.0.1", 25), ("127.0.0.1", 2))
        b = other.session("c", "B", ("127.0.0.1", 25), ("127.0.0.1", 3))
        for _ in range(3):
            a.row("<", b"NOOP")
            b.row("<", b"NOOP")
            self.clock.advance(0.5)
        self.assertEqual(file_names(log), ["RECV2026120710-1.LOG", "RECV2026120710-2.LOG"])
        for _, _, path in log.files.files():
            text = path.read_bytes().decode()
            self.assertEqual(text.count("#Software"), 1)
            self.assertEqual(len({line.split(",")[2] for line in text.split("\r\n")[5:] if line}), 1)
        restarted = ProtocolLog(log_dir, "receive", self.clock, run=inline)
        restarted.start()
        restarted.session("c", "C", ("127.0.0.1", 25), ("127.0.0.1", 4)).row("+")
        self.clock.advance(1)
        self.assertEqual(file_names(log)[-1], "RECV2026120710-3.LOG")
        self.assertEqual(len(list(read_rows(log_dir, "receive"))), 7)

    def test_clean_up_by_age(self) -> None:
        """Files whose hour ended more than max_age ago go at start and at each new hour."""
        log = ProtocolLog(tmpdir(self), "receive", self.clock, run=inline, max_age=timedelta(days=30))
        directory = log.files.directory
        directory.mkdir(parents=True)
        old = directory / "RECV2026110709-1.LOG"       # ended 30 days and an hour ago
        edge = directory / "RECV2026110710-3.LOG"      # ends 30 days before 11:00
        recent = directory / "RECV2026120709-1.LOG"
        other = directory / "notes.txt"
        for path in (old, edge, recent, other):
            path.write_text("x")
        log.start()
        self.assertEqual(sorted(p.name for p in directory.iterdir()),
                         ["RECV2026110710-3.LOG", "RECV2026120709-1.LOG", "notes.txt"])
        self.clock.advance(3600)  # 11:59:58: the 11:00 file rows trigger a clean-up
        log.session("c", "S", ("127.0.0.1", 25), ("127.0.0.1", 2)).row("+")
        self.clock.advance(1)
        self.assertFalse(edge.exists())
        self.assertTrue(recent.exists() and other.exists())


@implementer(IReactorFromThreads)
class ThreadClock(Clock):
    """A Clock whose callFromThread queues calls for the test to run."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []
        self._lock = threading.Lock()

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        with self._lock:
            self.from_threads.append((f, args, kw))

    def run_from_threads(self) -> None:
        with self._lock:
            calls, self.from_threads = self.from_threads, []
        for f, args, kw in calls:
            f(*args, **kw)


class WriterThreadTests(SynchronousTestCase):
    """Writes happen in a thread of their own; a stuck writer costs bounded memory."""

    def test_writes_off_the_reactor_thread(self) -> None:
        """The formatting and the file write run in the writer thread, never the caller's."""
        clock = ThreadClock()
        clock.advance(T0)
        log = ProtocolLog(tmpdir(self), "receive", clock)
        seen: list[int] = []
        write = log.files.write

        def recording(rows: Any, now: float) -> None:
            seen.append(threading.get_ident())
            write(rows, now)

        log.files.write = recording  # type: ignore[method-assign]
        log.start()
        log.session("c", "S", ("127.0.0.1", 25), ("127.0.0.1", 2)).row("+")
        clock.advance(0.5)
        stopped = log.stop()
        deadline = time.monotonic() + 10
        while not stopped.called and time.monotonic() < deadline:
            clock.run_from_threads()
            time.sleep(0.01)
        self.assertTrue(stopped.called)
        self.assertEqual(len(seen), 1)
        self.assertNotEqual(seen[0], threading.get_ident())
        self.assertEqual(len(log.files.files()), 1)

    def test_stuck_writer_drops_and_counts(self) -> None:
        """Rows beyond max_buffered are dropped while the writer is busy, then a warning counts them."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = Clock()
        clock.advance(T0)
        gate: Deferred[None] = Deferred()
        calls: list[Callable[[], None]] = []

        def stuck(work: Callable[[], None]) -> Deferred[None]:
            calls.append(work)
            return gate if len(calls) == 2 else maybeDeferred(work)

        log = ProtocolLog(tmpdir(self), "receive", clock, run=stuck, max_buffered=5)
        log.start()
        handle = log.session("c", "S", ("127.0.0.1", 25), ("127.0.0.1", 2))
        handle.row("+")
        clock.advance(0.5)  # the first batch: its write hangs
        for _ in range(8):
            handle.row("<", b"NOOP")
        self.assertEqual((log.writer.pending, log.writer.dropped), (5, 3))
        calls[1]()
        gate.callback(None)
        [warning] = [e for e in events if "dropped" in e.get("log_format", "")]
        self.assertEqual(warning["count"], 3)
        clock.advance(0.5)
        self.assertEqual(len(list(read_rows(log.files.directory.parent.parent, "receive"))), 6)


class ReceiveSessionTests(AuthSession):
    """A real receive session over StringTransport writes its rows, AUTH masked."""

    def open_log(self) -> Path:
        log = ProtocolLog(self.tempdir(), "receive", self.clock, run=inline)
        log.start()
        self.harness.factory.protocol_log = log
        self.connect()
        self.log_dir = log.files.directory.parent.parent
        return self.log_dir

    def rows(self) -> list[dict[str, str]]:
        self.clock.advance(1)
        return list(read_rows(self.log_dir, "receive"))

    def all_text(self) -> str:
        return "".join(p.read_text() for p in self.log_dir.rglob("*.LOG"))

    def test_session_rows(self) -> None:
        """Connect, the chosen connector and why, commands, replies, the user and disconnect."""
        self.setup()
        self.open_log()
        self.send(b"EHLO c.test\r\n" + plain(b"alice", b"s3cret"))
        self.send(b"QUIT\r\n")
        self.session.connectionLost()
        rows = self.rows()
        self.assertEqual([int(r["sequence-number"]) for r in rows], list(range(len(rows))))
        self.assertEqual(rows[0]["event"], "+")
        self.assertEqual((rows[1]["event"], rows[1]["data"]), ("*", "Default"))
        self.assertIn("connector chosen: remote range", rows[1]["context"])
        self.assertEqual((rows[2]["event"], rows[2]["data"][:4]), (">", "220 "))
        shown = [(r["event"], r["data"]) for r in rows]
        self.assertIn(("<", "EHLO c.test"), shown)
        self.assertIn(("<", "AUTH PLAIN ****"), shown)
        self.assertIn(("*", "alice"), shown)
        self.assertIn((">", "235 2.7.0 Authentication successful"), shown)
        self.assertEqual((rows[-1]["event"], rows[-1]["context"]), ("-", "Local"))
        self.assertEqual({r["session-id"] for r in rows}, {self.session.session_id})
        self.assertEqual({r["connector-id"] for r in rows}, {"Default"})
        self.assertNotIn(b64(b"\x00alice\x00s3cret").decode(), self.all_text())

    def test_auth_login_responses_masked(self) -> None:
        """Each AUTH LOGIN response (user name, password) is logged as ****."""
        self.setup()
        self.open_log()
        self.send(b"EHLO c\r\n")
        self.send(b"AUTH LOGIN\r\n")
        self.send(b64(b"alice") + b"\r\n")
        self.send(b64(b"s3cret") + b"\r\n")
        rows = [(r["event"], r["data"]) for r in self.rows()]
        i = rows.index(("<", "AUTH LOGIN"))
        self.assertEqual(rows[i:i + 6], [
            ("<", "AUTH LOGIN"), (">", "334 VXNlcm5hbWU6"), ("<", "****"),
            (">", "334 UGFzc3dvcmQ6"), ("<", "****"), ("*", "alice"),
        ])
        text = self.all_text()
        for secret in ("s3cret", b64(b"s3cret").decode(), b64(b"alice").decode()):
            self.assertNotIn(secret, text)

    def test_unrecognized_lines_not_logged(self) -> None:
        """A line that is no command (perhaps a confused client's password) is not written."""
        self.setup()
        self.open_log()
        self.send(b"EHLO c\r\nc2VjcmV0\r\n")
        rows = [(r["event"], r["data"]) for r in self.rows()]
        self.assertIn(("<", "(unrecognized command)"), rows)
        self.assertNotIn("c2VjcmV0", self.all_text())

    def test_message_data_not_logged(self) -> None:
        """DATA is logged as the command and its replies; the message's lines are not."""
        self.setup()
        self.open_log()
        self.send(b"EHLO c\r\n" + plain(b"alice", b"s3cret"))
        self.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
        self.send(b"Subject: private-subject\r\n\r\nprivate-body\r\n.\r\n")
        self.assertIn(("<", "DATA"), [(r["event"], r["data"]) for r in self.rows()])
        text = self.all_text()
        self.assertIn("<,DATA,", text)
        self.assertNotIn("private", text)

    def test_not_verbose_no_rows(self) -> None:
        """A connector with protocol_logging = "none" writes nothing, even with a log present."""
        self.setup(protocol_logging="none")
        self.open_log()
        self.send(b"EHLO c\r\nQUIT\r\n")
        self.assertEqual(self.rows(), [])
        self.assertIsNone(self.session._plog)


class ReceiveTLSTests(SynchronousTestCase):
    """The TLS row of a receive session."""

    def test_tls_row(self) -> None:
        """After the handshake, a * row names the protocol and the cipher."""
        from relaygw.spool.envelope import TLSInfo

        harness = Harness(make_connector(protocol_logging="verbose"))
        log = ProtocolLog(tmpdir(self), "receive", harness.reactor, run=inline)
        log.start()
        harness.factory.protocol_log = log
        session, _ = harness.connect()

        class Handle:
            def get_protocol_version_name(self) -> str:
                return "TLSv1.3"

            def get_cipher_name(self) -> str:
                return "TLS_AES_256_GCM_SHA384"

        session.transport.getHandle = lambda: Handle()
        session.handshakeCompleted()
        self.assertEqual(session.state.tls, TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"))
        harness.reactor.advance(1)
        rows = list(read_rows(log.files.directory.parent.parent, "receive"))
        self.assertIn(("*", "TLSv1.3 TLS_AES_256_GCM_SHA384", "TLS negotiated"),
                      [(r["event"], r["data"], r["context"]) for r in rows])


class LoginServer(ScriptedServer):
    """Answers AUTH LOGIN with its two 334 prompts, then 235."""

    def lineReceived(self, line: bytes) -> None:
        if line.startswith(b"AUTH LOGIN"):
            self.commands.append(line)
            self.sendLine(b"334 VXNlcm5hbWU6")
            self.login = 2
        elif getattr(self, "login", 0):
            self.commands.append(line)
            self.login -= 1
            self.sendLine(b"334 UGFzc3dvcmQ6" if self.login else b"235 2.7.0 ok")
        else:
            super().lineReceived(line)


class SendSessionTests(SynchronousTestCase):
    """The SmtpSend rows of a client transaction over iosim, AUTH masked."""

    def run_client(self, server: ScriptedServer, auth: ClientAuth | None,
                   outcome: str = "delivered") -> list[dict[str, str]]:
        clock = Clock()
        clock.advance(T0)
        log = ProtocolLog(tmpdir(self), "send", clock, run=inline)
        log.start()
        tmp = tmpdir(self)
        body = b"Subject: t\r\n\r\nprivate-body\r\n"
        (tmp / "msg").write_bytes(body)
        message = OutboundMessage("s@x.test", ("a@x.test",), lambda: open(tmp / "msg", "rb"),
                                  False, False, len(body))
        client, result = make_client(
            message, message.open_data(), host="peer.test:25", helo="gw.test", tls="opportunistic",
            clock=clock, tls_options=lambda host: FakeTLS(), auth=auth,
            send_log=SendLog(log, "smarthost-route"),
        )
        _, _, pump = connectedServerAndClient(lambda: server, lambda: client, greet=False)
        for _ in range(100):
            if not pump.pump():
                break
        self.assertEqual(self.successResultOf(result).outcomes["a@x.test"].kind, outcome)
        clock.advance(1)
        self.text = "".join(p.read_text() for p in log.files.directory.glob("*.LOG"))
        return list(read_rows(log.files.directory.parent.parent, "send"))

    def test_plain(self) -> None:
        """AUTH PLAIN is logged with its mechanism only; no message data, no password."""
        server = ScriptedServer(ehlo=(b"250-fake", b"250-AUTH LOGIN PLAIN", b"250 STARTTLS"))
        server.lineReceived = _auth_ok(server)  # type: ignore[method-assign]
        rows = self.run_client(server, ClientAuth("relayuser", "pw-Secret-1"))
        shown = [(r["event"], r["data"]) for r in rows]
        self.assertEqual(shown[0], ("+", ""))
        self.assertIn((">", "EHLO gw.test"), shown)
        self.assertIn((">", "STARTTLS"), shown)
        self.assertIn((">", "AUTH PLAIN ****"), shown)
        self.assertIn(("*", "relayuser"), shown)
        self.assertIn((">", "MAIL FROM:<s@x.test>"), shown)
        self.assertIn(("*", "28 octets"), shown)
        self.assertIn((">", "."), shown)
        self.assertEqual(rows[-1]["event"], "-")
        self.assertEqual({r["connector-id"] for r in rows}, {"smarthost-route"})
        self.assertTrue(any(r["context"] == "TLS negotiated" for r in rows))
        for secret in ("pw-Secret-1", base64.b64encode(b"\0relayuser\0pw-Secret-1").decode(),
                       "private-body"):
            self.assertNotIn(secret, self.text)

    def test_echoed_secret_masked(self) -> None:
        """A server reply that echoes the AUTH line has the secret masked in its < row."""
        server = ScriptedServer(ehlo=(b"250-fake", b"250-AUTH PLAIN", b"250 STARTTLS"))
        server.lineReceived = _auth_ok(server, echo=True)  # type: ignore[method-assign]
        rows = self.run_client(server, ClientAuth("relayuser", "pw-Secret-1"), outcome="retry")
        self.assertIn(("<", "535 5.7.8 bad: AUTH PLAIN ***"), [(r["event"], r["data"]) for r in rows])
        self.assertNotIn(base64.b64encode(b"\0relayuser\0pw-Secret-1").decode(), self.text)

    def test_login(self) -> None:
        """The AUTH LOGIN responses are ****."""
        server = LoginServer(ehlo=(b"250-fake", b"250-AUTH LOGIN", b"250 STARTTLS"))
        rows = self.run_client(server, ClientAuth("relayuser", "pw-Secret-1"))
        shown = [(r["event"], r["data"]) for r in rows]
        i = shown.index((">", "AUTH LOGIN"))
        self.assertEqual(shown[i:i + 6], [
            (">", "AUTH LOGIN"), ("<", "334 VXNlcm5hbWU6"), (">", "****"),
            ("<", "334 UGFzc3dvcmQ6"), (">", "****"), ("<", "235 2.7.0 ok"),
        ])
        for secret in ("pw-Secret-1", base64.b64encode(b"pw-Secret-1").decode(),
                       base64.b64encode(b"relayuser").decode()):
            self.assertNotIn(secret, self.text)


def _auth_ok(server: ScriptedServer, echo: bool = False) -> Any:
    plain_received = ScriptedServer.lineReceived.__get__(server)

    def received(line: bytes) -> None:
        if line.startswith(b"AUTH"):
            server.commands.append(line)
            server.sendLine(b"535 5.7.8 bad: " + line if echo else b"235 2.7.0 ok")
        else:
            plain_received(line)

    return received


class ConfigTests(SynchronousTestCase):
    """The route key that switches the SmtpSend log on."""

    ROUTE = ('[[connectors]]\nname = "C"\nbindings = ["127.0.0.1:2525"]\n\n'
             '[[routes]]\nname = "out"\nvia = "smarthost"\nsmarthosts = ["127.0.0.1:25"]\n')

    def test_route_protocol_logging(self) -> None:
        """protocol_logging on a route is "none" by default, "verbose" when set."""
        from relaygw.config._load import load_text

        [route] = load_text(self.ROUTE, "relaygw.toml", Path("/")).routes
        self.assertEqual(route.protocol_logging, "none")
        [route] = load_text(self.ROUTE + 'protocol_logging = "verbose"\n', "relaygw.toml",
                            Path("/")).routes
        self.assertEqual(route.protocol_logging, "verbose")

    def test_route_protocol_logging_error(self) -> None:
        """A bad value is refused in the SPEC's error form, naming the key path."""
        from relaygw.config._load import load_text
        from relaygw.errors import ConfigError

        with self.assertRaises(ConfigError) as caught:
            load_text(self.ROUTE + 'protocol_logging = "loud"\n', "relaygw.toml", Path("/"))
        self.assertEqual(str(caught.exception),
                         "relaygw.toml: routes[0].protocol_logging: 'loud' is not one of "
                         '"none", "verbose"')

    def test_only_verbose_routes_get_the_log(self) -> None:
        """build_target hands the SmtpSend log only to a verbose route's target."""
        from relaygw.config._load import load_text
        from relaygw.deliver.targets import build_target

        clock = Clock()
        log = ProtocolLog(tmpdir(self), "send", clock, run=inline)
        for value, expected in (("none", None), ("verbose", SendLog(log, "out"))):
            [route] = load_text(self.ROUTE + f'protocol_logging = "{value}"\n', "relaygw.toml",
                                Path("/")).routes
            target = build_target(route, reactor=clock, resolver=None, helo="gw.test",  # type: ignore[arg-type]
                                  protocol_log=log)
            self.assertEqual(target._send_log, expected)  # type: ignore[attr-defined]


class RefusedTests(SynchronousTestCase):
    """A verbose connector's refused connection is logged with its reply."""

    def test_connection_limit(self) -> None:
        """Over the connection limit: +, the connector, > 421, - Local."""
        harness = Harness(make_connector(protocol_logging="verbose", max_connections=1))
        log = ProtocolLog(tmpdir(self), "receive", harness.reactor, run=inline)
        log.start()
        harness.factory.protocol_log = log
        harness.connect()
        refused, transport = harness.connect()
        refused.connectionLost()
        harness.reactor.advance(1)
        rows = [(r["session-id"], r["event"], r["data"], r["context"])
                for r in read_rows(log.files.directory.parent.parent, "receive")]
        mine = [row[1:] for row in rows if row[0] == refused.session_id]
        self.assertEqual([e for e, _, _ in mine], ["+", "*", ">", "-"])
        self.assertEqual(mine[2][1], "421 4.3.2 Service not available")
        self.assertEqual(mine[3][2], "Local")
