"""
Tests for outbound TLS (C{verify}, the C{opportunistic} fallback to clear)
and smarthost AUTH in L{relaygw.deliver.smtpclient}, against the recording
ESMTP server of L{tests.servers.recording_smtp} over real loopback sockets,
with real TLS (certificates from a throwaway test CA) in the real reactor.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from relaygw.config._model import HostPort, Route
from relaygw.deliver import outcome
from relaygw.deliver.connections import deliver_to_host
from relaygw.deliver.smtpclient import (
    ClientAuth,
    ClientTimeouts,
    ClientTLS,
    OutboundMessage,
    TLSOptionsFactory,
    TransactionResult,
    tls_options_for,
    unverified_tls_options,
)
from relaygw.deliver.targets import SmarthostTarget
from relaygw.spool.envelope import Envelope, Recipient
from tests.servers.certs import self_signed
from tests.servers.recording_smtp import RecordingServer, TestCA

USER = "relay-user"
PASSWORD = "S3cret-pässword!"
WRONG = "not-the-password"
NAME = "mail.test"


def _secret_forms(password: str, user: str = USER) -> list[str]:
    """The password as it could leak: plain, and in its base64 wire forms."""
    p, u = password.encode("utf-8"), user.encode("utf-8")
    forms = [p, base64.b64encode(p), base64.b64encode(b"\0" + u + b"\0" + p)]
    return [f.decode("utf-8") for f in forms]


class _Base(TestCase):
    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = Path(tempfile.mkdtemp(prefix="relaygw-tls-test-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.ca = TestCA(self.tmp)
        self.certificate = self.ca.issue(NAME, [NAME, "localhost", "127.0.0.1"])
        self.data = self.tmp / "msg"
        self.data.write_bytes(b"Subject: tls\r\n\r\n.dot\r\nbody\r\n")
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def server(self, **options: Any) -> RecordingServer:
        server = RecordingServer(**options).start(self.reactor)
        self.addCleanup(server.stop)
        return server

    def message(self) -> OutboundMessage:
        path = self.data
        return OutboundMessage("s@x.test", ("a@x.test",), lambda: open(path, "rb"))

    async def send(
        self,
        server: RecordingServer,
        tls: ClientTLS,
        *,
        server_name: str | None = NAME,
        tls_options: TLSOptionsFactory | None = None,
        auth: ClientAuth | None = None,
    ) -> TransactionResult:
        result: TransactionResult = await deliver_to_host(
            self.reactor,
            HostPort("127.0.0.1", server.port),
            self.message(),
            helo="gw.example.test",
            tls=tls,
            timeouts=ClientTimeouts(connect=5, reply=5, data_done=5),
            tls_options=tls_options,
            server_name=server_name,
            auth=auth,
        )
        return result

    def logged(self) -> list[str]:
        """Every captured event, rendered, with its fields."""
        return [f"{formatEvent(e)} {e!r}" for e in self.events]

    def assert_logged(self, *parts: str) -> None:
        for text in self.logged():
            if all(p in text for p in parts):
                return
        self.fail(f"no event with {parts!r} in {self.logged()!r}")


class VerifyTests(_Base):
    """tls = "verify": the certificate chain and the server name are checked."""

    def verifying(self) -> TLSOptionsFactory:
        return tls_options_for("verify", self.ca.ca_file)

    async def test_verify_ok_with_ca_file(self) -> None:
        """A certificate from the route's CA naming the server: delivered over TLS."""
        server = self.server(certificate=self.certificate)
        r = await self.send(server, "verify", tls_options=self.verifying())
        self.assertEqual(r.outcomes["a@x.test"].kind, "delivered")
        [session] = server.sessions
        self.assertTrue(session.tls)
        self.assertEqual(session.messages, [b"Subject: tls\r\n\r\n.dot\r\nbody"])

    async def test_verify_wrong_name_retries(self) -> None:
        """A server name the certificate does not hold: retry, fail over, logged with the reason."""
        server = self.server(certificate=self.certificate)
        r = await self.send(server, "verify", server_name="other.test", tls_options=self.verifying())
        self.assertEqual(r.outcomes["a@x.test"].kind, "retry")
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.TLS_VERIFY_FAILED))
        self.assertTrue(r.failover)
        self.assertFalse(any(c.startswith(b"MAIL") for c in server.sessions[0].commands))
        self.assert_logged("not verified", f"127.0.0.1:{server.port}", "other.test", "does not name")

    async def test_verify_self_signed_not_in_ca_retries(self) -> None:
        """A self-signed certificate the CA file does not vouch for: retry, no mail sent."""
        cert, key = self.tmp / "self.pem", self.tmp / "self-key.pem"
        self_signed(cert, key, NAME, [NAME, "127.0.0.1"])
        combined = self.tmp / "self-combined.pem"
        combined.write_bytes(cert.read_bytes() + key.read_bytes())
        server = self.server(certificate=combined)
        r = await self.send(server, "verify", tls_options=self.verifying())
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.TLS_VERIFY_FAILED))
        self.assertEqual(r.outcomes["a@x.test"].kind, "retry")
        self.assertEqual(len(server.sessions), 1)
        self.assertFalse(any(c.startswith(b"MAIL") for c in server.sessions[0].commands))
        self.assert_logged("not verified", "certificate verify failed")

    async def test_verify_default_system_store(self) -> None:
        """Without a CA file the system store decides: the test CA is not in it."""
        server = self.server(certificate=self.certificate)
        r = await self.send(server, "verify")
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.TLS_VERIFY_FAILED))

    async def test_verify_ignores_unverified_options(self) -> None:
        """tls = verify given an unverifying options factory still verifies (system store)."""
        server = self.server(certificate=self.certificate)
        r = await self.send(server, "verify", tls_options=unverified_tls_options)
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.TLS_VERIFY_FAILED))

    async def test_verify_needs_starttls(self) -> None:
        """verify towards a host without STARTTLS: retry, nothing sent in clear."""
        server = self.server()
        r = await self.send(server, "verify", tls_options=self.verifying())
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.TLS_NOT_OFFERED))
        self.assertFalse(any(c.startswith(b"MAIL") for c in server.sessions[0].commands))

    async def test_smarthost_route_with_ca_file(self) -> None:
        """A smarthost route with tls = verify and ca_file delivers to a host named in the certificate."""
        server = self.server(certificate=self.certificate)
        route = Route(
            "smart",
            via="smarthost",
            smarthosts=(HostPort("localhost", server.port),),
            tls="verify",
            ca_file=self.ca.ca_file,
        )
        target = SmarthostTarget(
            route, reactor=self.reactor, helo="gw.example.test",
            timeouts=ClientTimeouts(connect=5, reply=5, data_done=5),
        )
        result = await target.deliver(_envelope(), ["a@x.test"], lambda: open(self.data, "rb"))
        self.assertEqual(result["a@x.test"].kind, "delivered")
        self.assertTrue(server.sessions[-1].tls)


class OpportunisticTests(_Base):
    """tls = "opportunistic": a failed handshake is followed by one attempt in clear."""

    async def test_failed_handshake_retries_in_clear(self) -> None:
        """The TLS handshake fails: the same host is tried again without STARTTLS, and it is logged."""
        server = self.server(certificate=self.certificate, break_tls=True)
        r = await self.send(server, "opportunistic")
        self.assertEqual(r.outcomes["a@x.test"].kind, "delivered")
        first, second = server.sessions
        self.assertIn(b"STARTTLS", first.commands)
        self.assertNotIn(b"STARTTLS", second.commands)
        self.assertEqual(len(second.messages), 1)
        self.assert_logged("TLS handshake with", "failed")
        self.assert_logged("Retrying", "in clear")

    async def test_required_does_not_fall_back(self) -> None:
        """tls = required: a failed handshake is a retry, with no second connection."""
        server = self.server(certificate=self.certificate, break_tls=True)
        r = await self.send(server, "required")
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.TLS_FAILED))
        self.assertEqual(len(server.sessions), 1)

    async def test_opportunistic_uses_tls(self) -> None:
        """A working STARTTLS is used, certificate unverified, in one connection."""
        server = self.server(certificate=self.certificate)
        r = await self.send(server, "opportunistic", server_name=None)
        self.assertEqual(r.outcomes["a@x.test"].kind, "delivered")
        self.assertEqual(len(server.sessions), 1)
        self.assertTrue(server.sessions[0].tls)


class AuthTests(_Base):
    """Smarthost AUTH: PLAIN preferred, LOGIN otherwise, only over TLS, secrets never logged."""

    def auth_server(self, *mechanisms: bytes, **options: Any) -> RecordingServer:
        return self.server(
            certificate=self.certificate,
            mechanisms=mechanisms or (b"LOGIN", b"PLAIN"),
            credentials=(USER.encode(), PASSWORD.encode("utf-8")),
            **options,
        )

    def assert_no_secret(self, result: TransactionResult, password: str) -> None:
        texts = self.logged() + [repr(result)] + [o.reply for o in result.outcomes.values()]
        for text in texts:
            for form in _secret_forms(password):
                self.assertNotIn(form, text)

    async def test_auth_plain(self) -> None:
        """PLAIN is preferred when offered; the server gets exactly NUL user NUL password."""
        server = self.auth_server()
        auth = ClientAuth(USER, PASSWORD)
        r = await self.send(server, "opportunistic", auth=auth)
        self.assertEqual(r.outcomes["a@x.test"].kind, "delivered")
        [session] = server.sessions
        self.assertTrue(session.tls and session.authenticated)
        self.assertEqual(
            session.sasl, [(b"PLAIN", [b"\0" + USER.encode() + b"\0" + PASSWORD.encode("utf-8")])]
        )
        self.assert_no_secret(r, PASSWORD)

    async def test_auth_login(self) -> None:
        """LOGIN when PLAIN is not offered: user, then password, each base64."""
        server = self.auth_server(b"LOGIN")
        r = await self.send(server, "required", auth=ClientAuth(USER, PASSWORD))
        self.assertEqual(r.outcomes["a@x.test"].kind, "delivered")
        self.assertEqual(
            server.sessions[0].sasl, [(b"LOGIN", [USER.encode(), PASSWORD.encode("utf-8")])]
        )

    async def test_auth_refused_over_cleartext(self) -> None:
        """AUTH offered in clear, no STARTTLS: no credentials sent, retry with a clear outcome."""
        server = self.server(
            mechanisms=(b"PLAIN", b"LOGIN"), auth_in_clear=True,
            credentials=(USER.encode(), PASSWORD.encode("utf-8")),
        )
        r = await self.send(server, "opportunistic", auth=ClientAuth(USER, PASSWORD))
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.AUTH_NEEDS_TLS))
        self.assertEqual(r.outcomes["a@x.test"].kind, "retry")
        self.assertTrue(r.failover)
        [session] = server.sessions
        self.assertFalse(any(c.upper().startswith(b"AUTH") for c in session.commands))
        self.assertFalse(any(c.startswith(b"MAIL") for c in session.commands))
        self.assert_no_secret(r, PASSWORD)

    async def test_no_clear_fallback_with_auth(self) -> None:
        """With credentials, a failed handshake is not followed by a clear attempt."""
        server = self.auth_server(break_tls=True)
        r = await self.send(server, "opportunistic", auth=ClientAuth(USER, PASSWORD))
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.TLS_FAILED))
        self.assertEqual(len(server.sessions), 1)

    async def test_wrong_password_retries_and_is_never_logged(self) -> None:
        """535 to AUTH: retried (not bounced), an error is logged, and no password form appears anywhere."""
        server = self.auth_server()
        r = await self.send(server, "opportunistic", auth=ClientAuth(USER, WRONG))
        o = r.outcomes["a@x.test"]
        self.assertEqual(o.kind, "retry")
        self.assertTrue(o.reply.startswith(str(outcome.AUTH_REFUSED)), o.reply)
        self.assertIn("535 5.7.8", o.reply)
        self.assertTrue(r.failover)
        self.assertFalse(any(c.startswith(b"MAIL") for c in server.sessions[0].commands))
        self.assert_logged("refused the route's credentials", "535")
        self.assert_no_secret(r, WRONG)

    async def test_echoed_secret_is_scrubbed(self) -> None:
        """A server that echoes the AUTH line back: the outcome and log carry no password form."""
        blob = base64.b64encode(b"\0" + USER.encode() + b"\0" + WRONG.encode())
        server = self.auth_server(auth_failure=b"535 5.7.8 bad: " + blob + b" " + WRONG.encode())
        r = await self.send(server, "opportunistic", auth=ClientAuth(USER, WRONG))
        self.assertEqual(r.outcomes["a@x.test"].kind, "retry")
        self.assert_no_secret(r, WRONG)

    async def test_auth_4xx_retries(self) -> None:
        """A 454 to AUTH is retried with the server's reply."""
        server = self.auth_server(auth_failure=b"454 4.7.0 try later")
        r = await self.send(server, "opportunistic", auth=ClientAuth(USER, WRONG))
        self.assertEqual(r.outcomes["a@x.test"].reply, "454 4.7.0 try later")

    async def test_auth_not_offered(self) -> None:
        """TLS but no AUTH offered: the credentials are not sent and the attempt is retried."""
        server = self.server(certificate=self.certificate)
        r = await self.send(server, "required", auth=ClientAuth(USER, PASSWORD))
        self.assertEqual(r.outcomes["a@x.test"].reply, str(outcome.AUTH_NOT_OFFERED))
        self.assertFalse(any(c.startswith(b"MAIL") for c in server.sessions[0].commands))

    async def test_smarthost_route_reads_password_file(self) -> None:
        """SmarthostTarget reads auth_password_file (trailing newline stripped) and authenticates."""
        server = self.auth_server()
        secret = self.tmp / "password"
        secret.write_text(PASSWORD + "\n", encoding="utf-8")
        route = Route(
            "smart", via="smarthost", smarthosts=(HostPort("127.0.0.1", server.port),),
            tls="required", auth_user=USER, auth_password_file=secret,
        )
        target = SmarthostTarget(
            route, reactor=self.reactor, helo="gw.example.test",
            timeouts=ClientTimeouts(connect=5, reply=5, data_done=5),
        )
        result = await target.deliver(_envelope(), ["a@x.test"], lambda: open(self.data, "rb"))
        self.assertEqual(result["a@x.test"].kind, "delivered")
        self.assertTrue(server.sessions[0].authenticated)
        for text in self.logged():
            for form in _secret_forms(PASSWORD):
                self.assertNotIn(form, text)

    async def test_smarthost_missing_password_file(self) -> None:
        """An unreadable password file: logged, every recipient retried, nothing sent."""
        server = self.auth_server()
        route = Route(
            "smart", via="smarthost", smarthosts=(HostPort("127.0.0.1", server.port),),
            tls="required", auth_user=USER, auth_password_file=self.tmp / "missing",
        )
        target = SmarthostTarget(route, reactor=self.reactor, helo="gw.example.test")
        result = await target.deliver(_envelope(), ["a@x.test"], lambda: open(self.data, "rb"))
        self.assertEqual(result["a@x.test"].reply, str(outcome.ROUTE_FILE_UNREADABLE))
        self.assertEqual(server.sessions, [])
        self.assert_logged("cannot read auth_password_file", "missing")


def _envelope() -> Envelope:
    return Envelope(
        id="Q1", sender="s@x.test", recipients=(Recipient("a@x.test"),), connector="c",
        client_ip="127.0.0.1", received_at=0.0, size=1, message_id="<m@x>",
    )
