"""
SMTP AUTH and recipient validation on the wire (SPEC sections 2 and 3):
L{relaygw.session.protocol.Session} over StringTransport with a
MemoryReactorClock, a real portal and checker, and a recording IDirectory
(or the real users file).
"""

from __future__ import annotations

import shutil
import tempfile
from base64 import b64encode
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
from twisted.cred.portal import Portal
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from relaygw.auth.checker import AddressLookup, DirectoryChecker
from relaygw.auth.realm import UserRealm
from relaygw.auth.usersfile import UsersFile, add_user
from relaygw.config._model import AcceptedDomain, AuthThrottle, Grant
from relaygw.interfaces import IDirectory
from tests.fakes import Harness, make_connector, reply_lines
from tests.test_checker import RecordingDirectory

OK = "235 2.7.0 Authentication successful"
FAILED = "535 5.7.3 Authentication unsuccessful"
THROTTLE = AuthThrottle(max_failures=3, window=timedelta(minutes=15),
                        delay=timedelta(seconds=1), max_delay=timedelta(seconds=4))
RELAY = Grant("SMTP Relay Devices", frozenset({"submit", "relay", "accept-any-sender"}))


def b64(data: bytes) -> bytes:
    return b64encode(data)


def plain(user: bytes, password: bytes) -> bytes:
    return b"AUTH PLAIN " + b64(b"\x00" + user + b"\x00" + password) + b"\r\n"


class AuthSession(SynchronousTestCase):
    """Helpers: a harness with a portal over a directory, send and read replies."""

    def tempdir(self) -> Path:
        """A fresh directory outside the work tree, removed after the test."""
        path = Path(tempfile.mkdtemp(prefix="relaygw-auth-"))
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def setup(self, directory: IDirectory | None = None, accepted: tuple[AcceptedDomain, ...] = (),
              tls_options: Any = None, **connector: Any) -> None:
        values: dict[str, Any] = {"allow_plaintext_auth": True, "auth_throttle": THROTTLE,
                                  "grants": (RELAY,), "protocol_logging": "verbose"}
        values.update(connector)
        self.harness = Harness(make_connector(**values), tls_options=tls_options)
        if directory is None:
            directory = self.directory = RecordingDirectory()
            self.alice = self.directory.add("alice", "s3cret", ("alice@example.test",))
            self.printer = self.directory.add("printer", "pr1nt", ("scan@example.test",),
                                              ("CN=SMTP Relay Devices,OU=Groups,DC=example,DC=test",))
        self.clock = self.harness.reactor
        factory = self.harness.factory
        factory.portal = Portal(UserRealm(), [DirectoryChecker(directory, self.clock,
                                                               timedelta(minutes=5))])
        factory.addresses = AddressLookup(directory, self.clock)
        if accepted:
            factory.config = attrs.evolve(factory.config, accepted_domains=accepted)
        self.connect()

    def connect(self) -> None:
        self.session, self.transport = self.harness.connect()
        self.transport.clear()

    def send(self, data: bytes) -> list[str]:
        self.transport.clear()
        self.session.dataReceived(data)
        return self.read()

    def read(self) -> list[str]:
        lines = reply_lines(self.transport.value())
        self.transport.clear()
        return lines


class AuthTests(AuthSession):
    def test_plain_initial_response(self) -> None:
        """AUTH PLAIN with an initial response, pipelined right after EHLO, gives 235 2.7.0."""
        self.setup()
        lines = self.send(b"EHLO c\r\n" + plain(b"alice", b"s3cret"))
        self.assertIn("250-AUTH PLAIN LOGIN", lines)
        self.assertEqual(lines[-1], OK)
        self.assertEqual(self.session.user, self.alice)

    def test_plain_challenge(self) -> None:
        """AUTH PLAIN without initial response answers "334 " and takes the next line."""
        self.setup()
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.send(b"AUTH PLAIN\r\n"), ["334 "])
        self.assertEqual(self.send(b64(b"\x00alice\x00s3cret") + b"\r\n"), [OK])

    def test_login_exchange(self) -> None:
        """AUTH LOGIN asks Username: and Password: in base64, then 235."""
        self.setup()
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.send(b"AUTH LOGIN\r\n"), ["334 VXNlcm5hbWU6"])
        self.assertEqual(self.send(b64(b"alice") + b"\r\n"), ["334 UGFzc3dvcmQ6"])
        self.assertEqual(self.send(b64(b"s3cret") + b"\r\n"), [OK])

    def test_login_initial_response_one_line(self) -> None:
        """The device quirk AUTH LOGIN <base64 user> on one line asks only for the password."""
        self.setup()
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n"),
                         ["334 UGFzc3dvcmQ6"])
        self.assertEqual(self.send(b64(b"s3cret") + b"\r\n"), [OK])

    def test_wrong_password_535_after_delay(self) -> None:
        """Wrong credentials give 535 5.7.3, answered after the throttle delay."""
        self.setup()
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.send(plain(b"alice", b"wrong")), [])
        self.clock.advance(1)
        self.assertEqual(self.read(), [FAILED])
        self.assertIsNone(self.session.user)

    def test_not_offered_in_plaintext_504(self) -> None:
        """Without TLS and allow_plaintext_auth, AUTH is not advertised and answers 504 5.7.4."""
        self.setup(allow_plaintext_auth=False)
        lines = self.send(b"EHLO c\r\n" + plain(b"alice", b"s3cret"))
        self.assertNotIn("250-AUTH PLAIN LOGIN", lines)
        self.assertEqual(lines[-1], "504 5.7.4 Unrecognized authentication type")
        self.assertEqual(self.directory.calls, [])

    def test_unknown_or_unconfigured_mechanism_504(self) -> None:
        """A mechanism not implemented, or not in auth_mechanisms, answers 504 5.7.4."""
        self.setup(auth_mechanisms=("PLAIN",))
        lines = self.send(b"EHLO c\r\nAUTH CRAM-MD5\r\nAUTH LOGIN\r\n")
        self.assertEqual(lines[-2:], ["504 5.7.4 Unrecognized authentication type"] * 2)

    def test_directory_down_454(self) -> None:
        """An unreachable directory gives 454 4.7.0, at once."""
        self.setup()
        self.directory.down = True
        self.assertEqual(self.send(b"EHLO c\r\n" + plain(b"alice", b"s3cret"))[-1],
                         "454 4.7.0 Temporary authentication failure")

    def test_auth_twice_503(self) -> None:
        """AUTH after a successful AUTH is 503."""
        self.setup()
        lines = self.send(b"EHLO c\r\n" + plain(b"alice", b"s3cret") * 2)
        self.assertEqual(lines[-2:], [OK, "503 5.5.1 Already authenticated"])

    def test_auth_in_transaction_503(self) -> None:
        """AUTH during a mail transaction is 503 (RFC 4954 section 4)."""
        self.setup()
        lines = self.send(b"EHLO c\r\nMAIL FROM:<x@other.test>\r\n" + plain(b"alice", b"s3cret"))
        self.assertEqual(lines[-1][:3], "503")
        self.assertEqual(self.directory.calls, [])

    def test_cancel_and_bad_base64_501(self) -> None:
        """"*" cancels with 501; a response that is not base64 gets 501 5.5.2."""
        self.setup()
        self.send(b"EHLO c\r\nAUTH LOGIN\r\n")
        self.assertEqual(self.send(b"*\r\n")[0][:3], "501")
        self.assertEqual(self.send(b"AUTH PLAIN !!!\r\n"),
                         ["501 5.5.2 Cannot Base64-decode client response"])
        self.assertEqual(self.send(b"NOOP\r\n"), ["250 2.0.0 OK"])

    def test_empty_password_never_asks_directory(self) -> None:
        """An empty password is 535 and the directory is never called."""
        self.setup()
        self.send(b"EHLO c\r\n" + plain(b"alice", b""))
        self.clock.advance(1)
        self.assertEqual(self.read(), [FAILED])
        self.assertEqual(self.directory.calls, [])

    def test_cache_hit_avoids_directory(self) -> None:
        """A second session with the same login within cache_ttl does not ask the directory."""
        self.setup()
        self.send(b"EHLO c\r\n" + plain(b"alice", b"s3cret"))
        self.connect()
        self.assertEqual(self.send(b"EHLO c\r\n" + plain(b"alice", b"s3cret"))[-1], OK)
        self.assertEqual(len(self.directory.calls), 1)


class ThrottleTests(AuthSession):
    def fail_once(self) -> list[str]:
        self.transport.clear()
        self.session.dataReceived(plain(b"alice", b"wrong"))
        return self.read()

    def test_throttled_without_directory(self) -> None:
        """After max_failures failures, AUTH is 535 without asking the directory."""
        self.setup()
        self.send(b"EHLO c\r\n")
        for _ in range(3):
            self.fail_once()
            self.clock.advance(4)
            self.assertEqual(self.read(), [FAILED])
        calls = len(self.directory.calls)
        self.assertEqual(calls, 3)
        self.session.dataReceived(plain(b"alice", b"s3cret"))
        self.clock.advance(4)
        self.assertEqual(self.read(), [FAILED])
        self.assertEqual(len(self.directory.calls), calls)

    def test_delays_grow_on_the_clock(self) -> None:
        """Failure replies wait 1 s, 2 s, 4 s (delay doubled per failure, capped)."""
        self.setup()
        self.send(b"EHLO c\r\n")
        for delay in (1.0, 2.0, 4.0, 4.0):
            self.assertEqual(self.fail_once(), [])
            self.clock.advance(delay - 0.01)
            self.assertEqual(self.read(), [])
            self.clock.advance(0.01)
            self.assertEqual(self.read(), [FAILED])

    def test_success_resets(self) -> None:
        """A success clears the counts: the next failure waits the first delay again."""
        self.setup()
        self.send(b"EHLO c\r\n")
        for _ in range(2):
            self.fail_once()
            self.clock.advance(4)
        self.assertEqual(self.send(plain(b"alice", b"s3cret")), [OK])
        self.connect()
        self.send(b"EHLO c\r\n")
        self.fail_once()
        self.clock.advance(1)
        self.assertEqual(self.read(), [FAILED])

    def test_session_keeps_reading_while_delayed(self) -> None:
        """Commands pipelined behind a delayed AUTH are answered after it, in order."""
        self.setup()
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.send(plain(b"alice", b"wrong") + b"NOOP\r\n"), [])
        self.clock.advance(1)
        self.assertEqual(self.read(), [FAILED, "250 2.0.0 OK"])


    def test_default_delay_capped_at_five_seconds(self) -> None:
        """
        Issue 6: with the default throttle, nine failures from one address
        (different user names) are each answered within 5 s (Exchange's
        tarpit), never the 16 s and 30 s a device with a 10 s timeout gives up on.
        """
        self.setup(auth_throttle=AuthThrottle())
        self.send(b"EHLO c\r\n")
        waits = []
        for n in range(9):
            self.assertEqual(self.send(plain(b"user%d" % n, b"wrong")), [])
            waited = 0.0
            while not self.read():
                self.clock.advance(0.5)
                waited += 0.5
                self.assertLessEqual(waited, 5.0)
            waits.append(waited)
        self.assertEqual(waits, [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])

    def test_delay_never_past_command_timeout(self) -> None:
        """A max_delay longer than the connector's command timeout waits the command timeout."""
        from relaygw.config._model import Timeouts

        self.setup(auth_throttle=AuthThrottle(delay=timedelta(seconds=8),
                                              max_delay=timedelta(minutes=10)),
                   timeouts=Timeouts(command=timedelta(seconds=3)))
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.fail_once(), [])
        self.clock.advance(2.99)
        self.assertEqual(self.read(), [])
        self.clock.advance(0.01)
        self.assertEqual(self.read(), [FAILED])
        self.assertTrue(self.transport.connected)

    def test_later_commands_not_delayed(self) -> None:
        """After a throttled 535 the session's next commands are answered at once."""
        self.setup()
        self.send(b"EHLO c\r\n")
        for _ in range(3):
            self.fail_once()
            self.clock.advance(4)
            self.assertEqual(self.read(), [FAILED])
        self.assertEqual(self.send(b"NOOP\r\n"), ["250 2.0.0 OK"])
        self.assertEqual(self.send(b"MAIL FROM:<a@example.test>\r\n")[0][:3], "250")


class RightsTests(AuthSession):
    def test_grant_group_gives_relay(self) -> None:
        """A user in a grant group (DN matched by CN) may relay and use any sender."""
        self.setup(permissions_authenticated=frozenset({"submit"}))
        lines = self.send(b"EHLO c\r\n" + plain(b"printer", b"pr1nt")
                          + b"MAIL FROM:<ceo@elsewhere.test>\r\nRCPT TO:<x@internet.test>\r\n")
        self.assertEqual(lines[-3:], [OK, "250 2.1.0 Sender OK", "250 2.1.5 Recipient OK"])

    def test_no_grant_no_relay(self) -> None:
        """Without a grant and without relay in permissions.authenticated, relaying is 550 5.7.54."""
        self.setup(permissions_authenticated=frozenset({"submit"}))
        lines = self.send(b"EHLO c\r\n" + plain(b"alice", b"s3cret")
                          + b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@internet.test>\r\n")
        self.assertEqual(lines[-1][:10], "550 5.7.54")

    def test_send_as(self) -> None:
        """An authenticated user may send as its own address only (550 5.7.60 otherwise)."""
        self.setup()
        lines = self.send(b"EHLO c\r\n" + plain(b"alice", b"s3cret")
                          + b"MAIL FROM:<bob@example.test>\r\nMAIL FROM:<Alice@example.test>\r\n")
        self.assertEqual(lines[-2:], [
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
            "250 2.1.0 Sender OK"])

    def test_require_auth_connector_530(self) -> None:
        """A connector without anonymous submit answers MAIL before AUTH with 530 5.7.57."""
        self.setup(permissions_anonymous=frozenset())
        self.assertEqual(self.send(b"EHLO c\r\nMAIL FROM:<a@example.test>\r\n")[-1][:10],
                         "530 5.7.57")

    def test_authenticated_message_envelope_and_received(self) -> None:
        """A message after AUTH has auth_user in its envelope and ESMTPA in Received."""
        self.setup()
        self.send(b"EHLO c\r\n" + plain(b"alice", b"s3cret")
                  + b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@internet.test>\r\nDATA\r\n")
        self.assertEqual(self.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")[0][:9], "250 2.6.0")
        envelope, data = self.harness.spool.committed[0]
        self.assertEqual(envelope.auth_user, "alice")
        self.assertIn(b"with ESMTPA", data)

    def test_starttls_resets_auth(self) -> None:
        """AUTH is offered only after STARTTLS (no plaintext AUTH) and STARTTLS forgets the user."""
        self.setup(tls="starttls", allow_plaintext_auth=False, tls_options=lambda c: object())
        self.assertNotIn("250-AUTH PLAIN LOGIN", self.send(b"EHLO c\r\n"))
        self.send(b"STARTTLS\r\n")
        lines = self.send(b"EHLO c\r\n" + plain(b"alice", b"s3cret"))
        self.assertIn("250-AUTH PLAIN LOGIN", lines)
        self.assertEqual(lines[-1], OK)


VALIDATED = (AcceptedDomain("example.test", route="local", validate_recipients=True),
             AcceptedDomain("branch.test", type="internal-relay", route="local",
                            validate_recipients=True))


class ValidateRecipientsTests(AuthSession):
    def test_unknown_recipient_550_5_1_10(self) -> None:
        """In an authoritative domain with validate_recipients, unknown recipients get 550 5.1.10."""
        self.setup(accepted=VALIDATED)
        lines = self.send(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<nobody@example.test>\r\n"
                          b"RCPT TO:<Alice@example.test>\r\n")
        self.assertEqual(lines[-2:], [
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            "250 2.1.5 Recipient OK"])

    def test_kelvin_sign_is_not_k(self) -> None:
        """
        U+212A KELVIN SIGN lower-cases to "k": the recipient it spells is not
        the directory's karl and is not looked up (550 5.1.10); an ASCII case
        variant of karl is karl.
        """
        self.setup(accepted=VALIDATED)
        self.directory.add("karl", "k4rl", ("karl@example.test",))
        lines = self.send("EHLO c\r\nMAIL FROM:<> SMTPUTF8\r\nRCPT TO:<\u212aarl@example.test>\r\n"
                          "RCPT TO:<KARL@example.test>\r\n".encode())
        self.assertEqual(lines[-2:], [
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            "250 2.1.5 Recipient OK"])
        self.assertNotIn("\u212a", repr(self.directory.calls))

    def test_internal_relay_unchecked(self) -> None:
        """internal-relay domains are never looked up."""
        self.setup(accepted=VALIDATED)
        lines = self.send(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<nobody@branch.test>\r\n")
        self.assertEqual(lines[-1], "250 2.1.5 Recipient OK")
        self.assertEqual(self.directory.calls, [])

    def test_directory_down_451(self) -> None:
        """A lookup the directory cannot answer gets a temporary 451 4.4.0."""
        self.setup(accepted=VALIDATED)
        self.directory.down = True
        lines = self.send(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\n")
        self.assertEqual(lines[-1][:9], "451 4.4.0")

    def test_pipelining_order_kept(self) -> None:
        """Commands pipelined behind a pending lookup wait and are answered in order."""
        self.setup(accepted=VALIDATED)
        self.directory.hold = True
        lines = self.send(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<nobody@example.test>\r\n"
                          b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.assertEqual(lines[-1], "250 2.1.0 Sender OK")
        self.directory.held.pop(0).callback(False)
        self.assertEqual(self.read()[0][:10], "550 5.1.10")
        self.directory.held.pop(0).callback(True)
        self.assertEqual(self.read(), ["250 2.1.5 Recipient OK",
                                       "354 Start mail input; end with <CRLF>.<CRLF>"])

    def test_other_sessions_answered_while_directory_slow(self) -> None:
        """While one session waits for the directory, another session is answered at once."""
        self.setup(accepted=VALIDATED)
        self.directory.hold = True
        self.send(b"EHLO c\r\n" + plain(b"alice", b"s3cret"))
        other, transport = self.harness.connect(peer="192.0.2.77")
        transport.clear()
        other.dataReceived(b"NOOP\r\n")
        self.assertEqual(reply_lines(transport.value()), ["250 2.0.0 OK"])
        self.directory.held.pop(0).callback(self.alice)
        self.assertEqual(self.read(), [OK])


    def test_input_held_while_waiting_is_bounded(self) -> None:
        """Past 256 KiB of input held behind a pending answer, the transport is paused."""
        self.setup(accepted=VALIDATED)
        self.directory.hold = True
        self.send(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\n")
        for _ in range(50):
            self.session.dataReceived(b"NOOP\r\n" * 1000)
        self.assertEqual(self.transport.producerState, "paused")
        self.directory.held.pop(0).callback(True)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(len(self.read()), 1 + 50_000)


class SecretsTests(AuthSession):
    def test_no_secret_in_events_or_files(self) -> None:
        """
        A full AUTH PLAIN and AUTH LOGIN session (success and failure) over the
        real users file leaves neither the password nor the base64 payloads in
        any log event (fields or formatted text) nor in any file.
        """
        base = self.tempdir()
        path = base / "users"
        password = b"Tr0ub4dor&3-secret"
        add_user(path, "alice", password.decode(), ["alice@example.test"])
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.setup(directory=UsersFile(path))
        plain_payload = b64(b"\x00alice\x00" + password)
        wrong_payload = b64(b"\x00alice\x00" + password + b"x")
        self.send(b"EHLO c\r\nAUTH PLAIN " + wrong_payload + b"\r\n")
        self.clock.advance(5)
        self.assertEqual(self.send(b"AUTH PLAIN " + plain_payload + b"\r\n"), [OK])
        self.connect()
        self.send(b"EHLO c\r\nAUTH LOGIN " + b64(b"alice") + b"\r\n")
        self.assertEqual(self.send(b64(password) + b"\r\n"), [OK])
        secrets = [password, plain_payload, wrong_payload, b64(password)]
        results = [e["result"] for e in events if e.get("event") == "auth.result"]
        self.assertEqual(results, ["failure", "success", "success"])
        for event in events:
            text = (repr(event) + (formatEvent(event) or "")).encode("utf-8", "replace")
            for secret in secrets:
                self.assertNotIn(secret, text)
        for file in base.rglob("*"):
            if file.is_file():
                for secret in secrets:
                    self.assertNotIn(secret, file.read_bytes())


class WiringTests(AuthSession):
    def test_service_portal_over_users_file(self) -> None:
        """build_directory gives the users file without [directory]; build_portal logs in through it."""
        from twisted.internet.task import Clock

        from relaygw.auth.realm import IAuthenticatedUser
        from relaygw.auth.sasl import Credentials
        from relaygw.config._model import Users
        from relaygw.service import build_directory, build_portal
        from tests.fakes import make_config

        base = self.tempdir()
        add_user(base / "users", "alice", "pw", ["alice@example.test"])
        config = attrs.evolve(make_config(), users=Users(base / "users"))
        store = build_directory(config, reactor=None, threadpool=None)
        self.assertIsInstance(store, UsersFile)
        portal = build_portal(store, config, Clock())
        _, user, _ = self.successResultOf(
            portal.login(Credentials(b"alice", b"pw"), None, IAuthenticatedUser))
        self.assertEqual(user.name, "alice")

    def test_directory_bind_password_file_unreadable(self) -> None:
        """An unreadable bind_password_file stops the start with a StartupError naming it."""
        from relaygw.config._model import Directory
        from relaygw.service import StartupError, build_directory
        from tests.fakes import make_config

        missing = self.tempdir() / "ldap.secret"
        config = attrs.evolve(make_config(), directory=Directory(
            "ldap", ("ldap://127.0.0.1",), "dc=example,dc=test", bind_password_file=missing))
        with self.assertRaises(StartupError) as raised:
            build_directory(config, reactor=None, threadpool=None)
        self.assertIn(str(missing), str(raised.exception))
