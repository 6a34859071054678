"""
Tests for L{relaygw.deliver.smtpclient}: protocol-level against a scripted
server over L{twisted.test.iosim}, and socket-level against Postfix's
smtp-sink on loopback (real reactor).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.protocols.basic import LineReceiver
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase

from relaygw.config._model import HostPort
from relaygw.deliver import outcome
from relaygw.deliver.connections import deliver_to_host
from relaygw.deliver.smtpclient import (
    ClientAuth,
    ClientTLS,
    ClientTimeouts,
    OutboundMessage,
    TransactionResult,
    check_tls_mode,
    make_client,
)
from tests.servers.ports import free_port
from tests.servers.sink import SINK_MISSING, SMTP_SINK, sink_missing


def _tmpdir(case: SynchronousTestCase) -> Path:
    """A fresh temporary directory outside the work tree, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="relaygw-test-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


class FakeTLS:
    """A context factory iosim's fake TLS accepts."""

    def iosimVerify(self, other: object) -> bool:
        return True


class ScriptedServer(LineReceiver):
    """
    A minimal SMTP server answering from a script; records commands and the
    raw DATA lines (still dot-stuffed).
    """

    delimiter = b"\r\n"

    def __init__(
        self,
        greeting: bytes | None = b"220 fake ESMTP",
        ehlo: tuple[bytes, ...] = (b"250-fake", b"250-8BITMIME", b"250 ENHANCEDSTATUSCODES"),
        helo: bytes = b"250 fake",
        mail: bytes = b"250 2.1.0 ok",
        rcpt: dict[bytes, bytes] | None = None,
        data: bytes = b"354 go ahead",
        final: bytes | None = b"250 2.0.0 queued as X",
    ) -> None:
        self.greeting = greeting
        self.ehlo = ehlo
        self.helo = helo
        self.mail = mail
        self.rcpt = rcpt or {}
        self.data = data
        self.final = final
        self.commands: list[bytes] = []
        self.body: list[bytes] = []
        self.in_data = False

    def connectionMade(self) -> None:
        if self.greeting is not None:
            self.sendLine(self.greeting)

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            if line == b".":
                self.in_data = False
                if self.final is not None:
                    self.sendLine(self.final)
            else:
                self.body.append(line)
            return
        self.commands.append(line)
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if verb == b"EHLO":
            for reply in self.ehlo:
                self.sendLine(reply)
        elif verb == b"HELO":
            self.sendLine(self.helo)
        elif verb == b"STARTTLS":
            self.sendLine(b"220 2.0.0 ready")
            self.transport.startTLS(FakeTLS())
        elif verb == b"MAIL":
            self.sendLine(self.mail)
        elif verb == b"RCPT":
            address = line.partition(b"<")[2].partition(b">")[0]
            self.sendLine(self.rcpt.get(address, b"250 2.1.5 ok"))
        elif verb == b"DATA":
            self.sendLine(self.data)
            self.in_data = self.data.startswith(b"354")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 what")


def _answer_auth(server: ScriptedServer, reply: bytes) -> Any:
    """A lineReceived for C{server} that answers AUTH with C{reply}."""
    plain = ScriptedServer.lineReceived.__get__(server)

    def received(line: bytes) -> None:
        if line.startswith(b"AUTH"):
            server.commands.append(line)
            server.sendLine(reply)
        else:
            plain(line)

    return received


def _data_file(tmp: Path, content: bytes = b"Subject: t\r\n\r\nhello\r\n") -> Path:
    path = tmp / "msg"
    path.write_bytes(content)
    return path


class ProtocolTests(SynchronousTestCase):
    """The transaction over iosim: replies to outcomes."""

    def setUp(self) -> None:
        self.tmp = _tmpdir(self)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.clock = Clock()

    def run_client(
        self,
        server: ScriptedServer,
        recipients: tuple[str, ...] = ("a@x.test",),
        *,
        tls: ClientTLS = "opportunistic",
        content: bytes = b"Subject: t\r\n\r\nhello\r\n",
        eight_bit: bool = False,
        smtputf8: bool = False,
        pump: bool = True,
        auth: ClientAuth | None = None,
    ) -> tuple[Any, Any, IOPump]:
        path = _data_file(self.tmp, content)
        message = OutboundMessage(
            "s@x.test", recipients, lambda: open(path, "rb"), eight_bit, smtputf8, len(content)
        )
        data = message.open_data()
        client, self.result = make_client(
            message,
            data,
            host="peer.test:25",
            helo="gw.example.test",
            tls=tls,
            clock=self.clock,
            tls_options=lambda host: FakeTLS(),
            auth=auth,
        )
        c, s, p = connectedServerAndClient(lambda: server, lambda: client, greet=False)
        if pump:
            for _ in range(100):
                if not p.pump():
                    break
        return c, s, p

    def outcome_of(self) -> TransactionResult:
        return self.successResultOf(self.result)

    def test_per_recipient_outcomes(self) -> None:
        """Each recipient's RCPT reply decides its fate; accepted ones take the DATA reply."""
        server = ScriptedServer(
            rcpt={b"b@x.test": b"550 5.1.1 no such user", b"c@x.test": b"451 4.2.0 try later"}
        )
        self.run_client(server, ("a@x.test", "b@x.test", "c@x.test"))
        r = self.outcome_of()
        self.assertEqual(
            {k: (v.kind, v.reply) for k, v in r.outcomes.items()},
            {
                "a@x.test": ("delivered", "250 2.0.0 queued as X"),
                "b@x.test": ("bounce", "550 5.1.1 no such user"),
                "c@x.test": ("retry", "451 4.2.0 try later"),
            },
        )
        self.assertFalse(r.failover)
        self.assertEqual(r.outcomes["a@x.test"].remote_host, "peer.test:25")

    def test_all_refused_sends_no_data(self) -> None:
        """When every RCPT is refused, DATA is never sent."""
        server = ScriptedServer(rcpt={b"a@x.test": b"550 5.1.1 no"})
        self.run_client(server)
        self.assertNotIn(b"DATA", server.commands)
        self.assertEqual(self.outcome_of().outcomes["a@x.test"].kind, "bounce")

    def test_data_refusal_applies_to_accepted(self) -> None:
        """A 5xx to the final dot bounces every accepted recipient; refused ones keep theirs."""
        server = ScriptedServer(
            rcpt={b"b@x.test": b"452 4.5.3 too many"}, final=b"554 5.6.0 content rejected"
        )
        self.run_client(server, ("a@x.test", "b@x.test"))
        o = self.outcome_of().outcomes
        self.assertEqual((o["a@x.test"].kind, o["b@x.test"].kind), ("bounce", "retry"))

    def test_mail_4xx_fails_over(self) -> None:
        """A 4xx to MAIL is a host that did not take the transaction: retry, try the next."""
        server = ScriptedServer(mail=b"451 4.3.2 not now")
        self.run_client(server)
        r = self.outcome_of()
        self.assertTrue(r.failover)
        self.assertEqual(r.outcomes["a@x.test"].reply, "451 4.3.2 not now")
        self.assertNotIn(b"RCPT", b" ".join(server.commands))

    def test_mail_5xx_bounces(self) -> None:
        """A 5xx to MAIL bounces all recipients and does not fail over."""
        server = ScriptedServer(mail=b"553 5.7.1 sender refused")
        self.run_client(server, ("a@x.test", "b@x.test"))
        r = self.outcome_of()
        self.assertFalse(r.failover)
        self.assertEqual({o.kind for o in r.outcomes.values()}, {"bounce"})

    def test_greeting_refusal_fails_over(self) -> None:
        """A non-220 greeting is retried with the server's text and fails over."""
        server = ScriptedServer(greeting=b"554 5.3.2 go away")
        self.run_client(server)
        r = self.outcome_of()
        self.assertTrue(r.failover)
        self.assertEqual(r.outcomes["a@x.test"], outcome.Outcome("retry", "554 5.3.2 go away", "peer.test:25"))

    def test_helo_refusal_ends(self) -> None:
        """EHLO then HELO refused: the attempt ends (twisted.mail alone would loop on HELO)."""
        server = ScriptedServer(ehlo=(b"500 5.5.1 no EHLO",), helo=b"550 5.7.1 no HELO either")
        self.run_client(server)
        r = self.outcome_of()
        self.assertTrue(r.failover)
        self.assertEqual(r.outcomes["a@x.test"].kind, "retry")
        self.assertLessEqual(sum(c.startswith(b"HELO") for c in server.commands), 1)

    def test_dot_stuffing_and_line_ends(self) -> None:
        """Lines starting with a dot are doubled on the wire, across chunk edges too."""
        edge = b"x" * (2**14 - 1) + b"\r"
        content = b".first\r\n" + edge + b"\n.second\r\nlast"
        server = ScriptedServer()
        self.run_client(server, content=content)
        self.assertEqual(self.outcome_of().outcomes["a@x.test"].kind, "delivered")
        self.assertEqual(server.body, [b"..first", b"x" * (2**14 - 1), b"..second", b"last"])

    def test_timeout_waiting_for_greeting(self) -> None:
        """A silent server times out after the reply timeout: retry, fail over."""
        server = ScriptedServer(greeting=None)
        _, _, pump = self.run_client(server)
        self.assertNoResult(self.result)
        self.clock.advance(ClientTimeouts().reply)
        pump.flush()
        r = self.outcome_of()
        self.assertTrue(r.failover)
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.TIMED_OUT))

    def test_required_tls_not_offered(self) -> None:
        """tls = required and no STARTTLS offered: retry, fail over, no MAIL sent."""
        server = ScriptedServer()
        self.run_client(server, tls="required")
        r = self.outcome_of()
        self.assertTrue(r.failover)
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.TLS_NOT_OFFERED))
        self.assertFalse(any(c.startswith(b"MAIL") for c in server.commands))

    def test_opportunistic_starttls(self) -> None:
        """tls = opportunistic sends STARTTLS when offered, then EHLO again, then the mail."""
        server = ScriptedServer(ehlo=(b"250-fake", b"250 STARTTLS"))
        client, _, _ = self.run_client(server)
        self.assertEqual([c.split(b" ")[0] for c in server.commands][:3], [b"EHLO", b"STARTTLS", b"EHLO"])
        self.assertEqual(self.outcome_of().outcomes["a@x.test"].kind, "delivered")

    def test_tls_off_never_starttls(self) -> None:
        """tls = off never sends STARTTLS, even when offered."""
        server = ScriptedServer(ehlo=(b"250-fake", b"250 STARTTLS"))
        self.run_client(server, tls="off")
        self.assertNotIn(b"STARTTLS", server.commands)
        self.assertEqual(self.outcome_of().outcomes["a@x.test"].kind, "delivered")

    def test_body_8bitmime(self) -> None:
        """An 8-bit message is sent with BODY=8BITMIME when the server offers it."""
        server = ScriptedServer()
        self.run_client(server, eight_bit=True)
        self.assertIn(b"MAIL FROM:<s@x.test> BODY=8BITMIME", server.commands)

    def test_8bit_content_to_a_7bit_server_bounces(self) -> None:
        """8-bit bytes are never sent to a server without 8BITMIME: 5.6.3, before MAIL."""
        server = ScriptedServer(ehlo=(b"250-fake", b"250 ENHANCEDSTATUSCODES"))
        self.run_client(server, eight_bit=True, content="Subject: é\r\n\r\nçà\r\n".encode())
        r = self.outcome_of()
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.EIGHTBIT_NOT_OFFERED))
        self.assertEqual(r.outcomes["a@x.test"].kind, "bounce")
        self.assertFalse(any(c.startswith(b"MAIL") for c in server.commands))

    def test_declared_8bitmime_but_ascii_goes_to_a_7bit_server(self) -> None:
        """BODY=8BITMIME declared for ASCII content: sent plainly, without BODY=."""
        server = ScriptedServer(ehlo=(b"250-fake", b"250 ENHANCEDSTATUSCODES"))
        self.run_client(server, eight_bit=True)
        self.assertIn(b"MAIL FROM:<s@x.test>", server.commands)
        self.assertEqual(self.outcome_of().outcomes["a@x.test"].kind, "delivered")

    PIPELINING = (b"250-fake", b"250-PIPELINING", b"250-SIZE 1000", b"250 8BITMIME")

    def test_pipelined_envelope(self) -> None:
        """With PIPELINING, MAIL, every RCPT and DATA go in one write; replies are matched in order."""
        server = ScriptedServer(ehlo=self.PIPELINING, rcpt={b"b@x.test": b"550 5.1.1 no such user"})
        chunks: list[bytes] = []
        received = server.dataReceived
        server.dataReceived = lambda data: (chunks.append(data), received(data))  # type: ignore[method-assign]
        self.run_client(server, ("a@x.test", "b@x.test"))
        [envelope] = [c for c in chunks if b"MAIL FROM" in c]
        self.assertEqual(envelope.split(b"\r\n")[:-1], [
            b"MAIL FROM:<s@x.test> SIZE=21", b"RCPT TO:<a@x.test>", b"RCPT TO:<b@x.test>", b"DATA"
        ])
        o = self.outcome_of().outcomes
        self.assertEqual((o["a@x.test"].kind, o["b@x.test"].reply),
                         ("delivered", "550 5.1.1 no such user"))

    def test_pipelined_mail_refused(self) -> None:
        """A refused MAIL decides every recipient, whatever the RCPT and DATA replies echo."""
        server = ScriptedServer(ehlo=self.PIPELINING, mail=b"451 4.3.0 not now")
        self.run_client(server, ("a@x.test", "b@x.test"))
        r = self.outcome_of()
        self.assertEqual({o.reply for o in r.outcomes.values()}, {"451 4.3.0 not now"})
        self.assertTrue(r.failover)
        self.assertEqual(server.body, [])  # the 354 the server gave anyway got an empty message

    def test_pipelined_all_recipients_refused(self) -> None:
        server = ScriptedServer(ehlo=self.PIPELINING, rcpt={b"a@x.test": b"550 5.1.1 no"},
                                data=b"554 5.5.1 no valid recipients")
        self.run_client(server)
        r = self.outcome_of()
        self.assertEqual(r.outcomes["a@x.test"].reply, "550 5.1.1 no")
        self.assertFalse(r.failover)

    def test_pipelined_data_refused(self) -> None:
        """DATA refused after an accepted RCPT: the DATA reply is that recipient's outcome."""
        server = ScriptedServer(ehlo=self.PIPELINING, data=b"451 4.3.0 disk full")
        self.run_client(server)
        r = self.outcome_of()
        self.assertEqual(r.outcomes["a@x.test"].reply, "451 4.3.0 disk full")
        self.assertFalse(r.failover)

    def test_size_over_the_hosts_limit_bounces(self) -> None:
        """A message over the host's announced SIZE is bounced (5.3.4) without MAIL."""
        server = ScriptedServer(ehlo=self.PIPELINING)
        self.run_client(server, content=b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n")
        r = self.outcome_of()
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.TOO_BIG_FOR_HOST))
        self.assertFalse(any(c.startswith(b"MAIL") for c in server.commands))

    def test_smtputf8_not_offered_bounces(self) -> None:
        """A message needing SMTPUTF8 bounces (5.6.7) at a server that lacks it."""
        server = ScriptedServer()
        self.run_client(server, smtputf8=True)
        r = self.outcome_of()
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.SMTPUTF8_NOT_OFFERED))
        self.assertFalse(any(c.startswith(b"MAIL") for c in server.commands))

    def test_connection_lost_in_data(self) -> None:
        """A connection lost during DATA retries the accepted recipients; refused ones keep theirs."""
        server = ScriptedServer(rcpt={b"b@x.test": b"550 5.1.1 no"}, final=None)
        _, _, pump = self.run_client(server, ("a@x.test", "b@x.test"))
        self.assertNoResult(self.result)
        server.transport.loseConnection()
        pump.flush()
        r = self.outcome_of()
        o = r.outcomes
        self.assertEqual((o["a@x.test"].kind, o["b@x.test"].kind), ("retry", "bounce"))
        self.assertEqual(o["a@x.test"].reply, str(outcome.CONNECTION_LOST))
        self.assertFalse(r.failover)

    def test_no_transcript_kept(self) -> None:
        """The client keeps no transcript (twisted.mail puts it into its exceptions)."""
        server = ScriptedServer()
        client, _, _ = self.run_client(server)
        self.assertEqual(client.log.str(), b"")

    def test_starttls_discards_plaintext_after_220(self) -> None:
        """Lines sent in clear behind the STARTTLS 220 are dropped (CVE-2011-0411 class)."""

        class Injecting(ScriptedServer):
            def lineReceived(self, line: bytes) -> None:
                if line == b"STARTTLS":
                    self.commands.append(line)
                    self.transport.write(b"220 2.0.0 ready\r\n250-injected\r\n250 AUTH PLAIN\r\n")
                    self.transport.startTLS(FakeTLS())
                    self.ehlo = (b"250-fake", b"250 8BITMIME")
                else:
                    super().lineReceived(line)

        server = Injecting(ehlo=(b"250-fake", b"250 STARTTLS"))
        client, _, _ = self.run_client(server)
        self.assertEqual(self.outcome_of().outcomes["a@x.test"].kind, "delivered")
        self.assertEqual(client._extensions, frozenset({b"8BITMIME"}))
        self.assertIn(b"QUIT", server.commands)

    def test_auth_plain_over_tls_no_transcript(self) -> None:
        """AUTH PLAIN after STARTTLS sends NUL user NUL password once; no transcript is kept."""
        server = ScriptedServer(ehlo=(b"250-fake", b"250-AUTH LOGIN PLAIN", b"250 STARTTLS"))
        server.lineReceived = _answer_auth(server, b"235 2.7.0 ok")  # type: ignore[method-assign]
        client, _, _ = self.run_client(server, auth=ClientAuth("u", "pw"))
        self.assertEqual(self.outcome_of().outcomes["a@x.test"].kind, "delivered")
        self.assertIn(b"AUTH PLAIN " + base64.b64encode(b"\0u\0pw"), server.commands)
        self.assertEqual(client.log.str(), b"")

    def test_auth_before_tls_not_sent(self) -> None:
        """Credentials and no TLS on the connection: no AUTH line, retry, fail over."""
        server = ScriptedServer(ehlo=(b"250-fake", b"250 AUTH PLAIN"))
        self.run_client(server, auth=ClientAuth("u", "pw"))
        r = self.outcome_of()
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.AUTH_NEEDS_TLS))
        self.assertTrue(r.failover)
        self.assertFalse(any(c.startswith(b"AUTH") for c in server.commands))

    def test_auth_needs_ehlo(self) -> None:
        """Credentials and a server without EHLO: no HELO fallback, retry."""
        server = ScriptedServer(ehlo=(b"500 5.5.1 no EHLO",))
        self.run_client(server, auth=ClientAuth("u", "pw"))
        self.assertEqual(self.outcome_of().outcomes["a@x.test"].reply, str(outcome.AUTH_NOT_OFFERED))
        self.assertFalse(any(c.startswith(b"HELO") for c in server.commands))

    def test_xoauth2_sasl_string(self) -> None:
        """AUTH XOAUTH2 sends base64("user=U^Aauth=Bearer T^A^A") after STARTTLS (issue 9)."""
        server = ScriptedServer(ehlo=(b"250-fake", b"250-AUTH XOAUTH2", b"250 STARTTLS"))
        server.lineReceived = _answer_auth(server, b"235 2.7.0 ok")  # type: ignore[method-assign]
        client, _, _ = self.run_client(server, tls="verify",
                                       auth=ClientAuth("box@x.test", "tok.en", "xoauth2"))
        r = self.outcome_of()
        self.assertEqual(r.outcomes["a@x.test"].kind, "delivered")
        self.assertFalse(r.auth_refused)
        sasl = base64.b64encode(b"user=box@x.test\x01auth=Bearer tok.en\x01\x01")
        self.assertIn(b"AUTH XOAUTH2 " + sasl, server.commands)
        self.assertEqual(client.log.str(), b"")

    def test_xoauth2_not_offered(self) -> None:
        """A host without AUTH XOAUTH2 gets no token: retry, fail over."""
        server = ScriptedServer(ehlo=(b"250-fake", b"250-AUTH PLAIN LOGIN", b"250 STARTTLS"))
        self.run_client(server, tls="verify", auth=ClientAuth("u", "tok", "xoauth2"))
        r = self.outcome_of()
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.XOAUTH2_NOT_OFFERED))
        self.assertTrue(r.failover)
        self.assertFalse(any(c.startswith(b"AUTH") for c in server.commands))

    def test_xoauth2_refused_is_retry_and_flagged(self) -> None:
        """535 to the token: retried (4.7.8, never a bounce), auth_refused set, token not shown."""
        server = ScriptedServer(ehlo=(b"250-fake", b"250-AUTH XOAUTH2", b"250 STARTTLS"))
        server.lineReceived = _answer_auth(  # type: ignore[method-assign]
            server, b"535 5.7.3 Authentication unsuccessful tok.en")
        self.run_client(server, tls="verify", auth=ClientAuth("u", "tok.en", "xoauth2"))
        r = self.outcome_of()
        result = r.outcomes["a@x.test"]
        self.assertEqual(result.kind, "retry")
        self.assertIn("4.7.8", result.reply)
        self.assertNotIn("tok.en", result.reply)
        self.assertTrue(r.auth_refused)

    def test_xoauth2_error_challenge_answered_empty(self) -> None:
        """A 334 error challenge is answered with an empty line; the 535 then ends AUTH."""
        server = ScriptedServer(ehlo=(b"250-fake", b"250-AUTH XOAUTH2", b"250 STARTTLS"))
        plain = ScriptedServer.lineReceived.__get__(server)
        answers: list[bytes] = []

        def received(line: bytes) -> None:
            if line.startswith(b"AUTH"):
                server.commands.append(line)
                server.sendLine(b"334 " + base64.b64encode(b'{"status":"401"}'))
            elif server.commands and server.commands[-1].startswith(b"AUTH") and not answers:
                answers.append(line)
                server.sendLine(b"535 5.7.3 Authentication unsuccessful")
            else:
                plain(line)

        server.lineReceived = received  # type: ignore[method-assign]
        self.run_client(server, tls="verify", auth=ClientAuth("u", "tok", "xoauth2"))
        self.assertEqual(answers, [b""])
        r = self.outcome_of()
        self.assertEqual(r.outcomes["a@x.test"].kind, "retry")
        self.assertTrue(r.auth_refused)

    def test_client_auth_repr_hides_password(self) -> None:
        """ClientAuth's repr (as in a log line or a traceback) has the user, not the password."""
        self.assertEqual(repr(ClientAuth("u", "hunter2")), "ClientAuth(user='u')")

    def test_tls_modes(self) -> None:
        """mta-sts starts opportunistic (the MX target upgrades enforced domains); others pass through."""
        for mode in ("off", "opportunistic", "required", "verify"):
            self.assertEqual(check_tls_mode(mode), mode)  # type: ignore[arg-type]
        self.assertEqual(check_tls_mode("mta-sts"), "opportunistic")


# -- real peers on loopback ------------------------------------------------


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1, dumping each message into C{dump}."""

    def __init__(self, *options: str) -> None:
        # Its own directory under /tmp: smtp-sink drops to user postfix, which
        # must be able to reach it.
        self.dump = Path(tempfile.mkdtemp(prefix="relaygw-sink-"))
        os.chmod(self.dump, 0o777)
        self.port = free_port()
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [SMTP_SINK, *user, "-d", f"{self.dump}/%M.", *options, f"127.0.0.1:{self.port}", "100"],
            stdout=None if os.environ.get("SINK_DEBUG") else subprocess.DEVNULL,
            stderr=None if os.environ.get("SINK_DEBUG") else subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("smtp-sink did not start")

    @property
    def host(self) -> HostPort:
        return HostPort("127.0.0.1", self.port)

    def messages(self) -> list[bytes]:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            files = sorted(self.dump.iterdir())
            if files:
                return [f.read_bytes() for f in files]
            time.sleep(0.05)
        return []

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        shutil.rmtree(self.dump, ignore_errors=True)


def start_sink(case: TestCase, *options: str) -> SmtpSink:
    """Start an smtp-sink for C{case}, stopped at cleanup."""
    sink = SmtpSink(*options)
    case.addCleanup(sink.stop)
    return sink


@pytest.mark.skipif(sink_missing(), reason=SINK_MISSING)
class SinkTests(TestCase):
    """One transaction against smtp-sink over real loopback sockets."""

    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        tmp = _tmpdir(self)
        tmp.mkdir(parents=True, exist_ok=True)
        self.data = _data_file(tmp, b"Subject: sink\r\n\r\n.dot line\r\nbody\r\n")

    def send(self, host: HostPort, tls: ClientTLS = "opportunistic") -> Any:
        path = self.data
        message = OutboundMessage("s@x.test", ("a@x.test", "b@x.test"), lambda: open(path, "rb"))
        timeouts = ClientTimeouts(connect=5, reply=5, data_done=5)
        return deliver_to_host(
            self.reactor, host, message, helo="gw.example.test", tls=tls, timeouts=timeouts
        )

    async def test_delivers_to_sink(self) -> None:
        """smtp-sink takes the message: both recipients delivered, the body intact."""
        sink = start_sink(self)
        r = await self.send(sink.host)
        self.assertEqual({o.kind for o in r.outcomes.values()}, {"delivered"})
        [dumped] = sink.messages()
        self.assertIn(b"X-Rcpt-Args: <a@x.test>\nX-Rcpt-Args: <b@x.test>", dumped)
        self.assertIn(b"\n.dot line\nbody\n", dumped)

    async def test_sink_soft_rcpt_rejects(self) -> None:
        """4xx to every RCPT: all retried, and no message is sent."""
        sink = start_sink(self, "-r", "RCPT")
        r = await self.send(sink.host)
        self.assertEqual({o.kind for o in r.outcomes.values()}, {"retry"})
        self.assertTrue(all(o.reply.startswith("450 4.3.0") for o in r.outcomes.values()))
        self.assertFalse(r.failover)
        # smtp-sink opens its dump file at MAIL; the body would follow DATA.
        self.assertFalse(any(b"Subject: sink" in f.read_bytes() for f in sink.dump.iterdir()))

    async def test_sink_hard_data_reject(self) -> None:
        """5xx to the final dot bounces the accepted recipients."""
        sink = start_sink(self, "-f", ".")
        r = await self.send(sink.host)
        self.assertEqual({o.kind for o in r.outcomes.values()}, {"bounce"})

    async def test_required_tls_against_sink(self) -> None:
        """smtp-sink offers no STARTTLS: tls = required gives retry and fails over."""
        sink = start_sink(self)
        r = await self.send(sink.host, tls="required")
        self.assertTrue(r.failover)
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.TLS_NOT_OFFERED))

    async def test_closed_port(self) -> None:
        """A closed port is a connection refusal: retry and fail over."""
        r = await self.send(HostPort("127.0.0.1", free_port()))
        self.assertTrue(r.failover)
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.CONNECTION_REFUSED))

    async def test_missing_data_file(self) -> None:
        """A missing data file is a local error: retried, nothing sent."""
        self.data.unlink()
        r = await self.send(HostPort("127.0.0.1", free_port()))
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.LOCAL_ERROR))
        self.flushLoggedErrors()
