"""
Tests for L{relaygw.service.RelayGatewayService}: start and stop with the
real reactor on free loopback ports.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, cast

from twisted.internet import task, threads
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from twisted.application.service import IService

from relaygw._types import IServeReactor
from relaygw.config._load import load_text
from relaygw.config._model import Config
from relaygw.listen.bindings import ListenError
from relaygw.service import RelayGatewayService, StartupError
from tests.servers.ports import free_ports

_CONFIG = """
[gateway]
hostname = "mx.example.test"
spool_dir = "spool"
log_dir = "log"
default_route = "local"

[[accepted_domains]]
domain = "example.test"
route = "local"

[[connectors]]
name = "Plain"
bindings = ["127.0.0.1:{plain}"]
tls = "off"

[[connectors]]
name = "Submission"
bindings = ["127.0.0.1:{submission}"]
tls = "starttls"
certificate = "tls/mail.pem"

[[routes]]
name = "local"
via = "maildir"
maildir = "mail"
"""


def _read_line(port: int) -> bytes:
    """Blocking client: connect, read the first line, say QUIT, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        data = b""
        while not data.endswith(b"\r\n") and len(data) < 1000:
            chunk = client.recv(1000)
            if not chunk:
                break
            data += chunk
        client.sendall(b"QUIT\r\n")
        return data


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


async def _settle() -> None:
    """Let the reactor run the closes that stopListening scheduled."""
    from twisted.internet import reactor

    await task.deferLater(cast(IServeReactor, reactor), 0.05, lambda: None)


class ServiceTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="relaygw-service-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        self.plain, self.submission = free_ports(2)
        self.config = self._config(self.plain, self.submission)

    def _config(self, plain: int, submission: int) -> Config:
        text = _CONFIG.replace("{plain}", str(plain)).replace("{submission}", str(submission))
        return load_text(text, "test.toml", self.base)

    def _service(self, config: Config | None = None) -> RelayGatewayService:
        from twisted.internet import reactor

        return RelayGatewayService(config or self.config, cast(IServeReactor, reactor))

    def _started(self) -> RelayGatewayService:
        service = self._service()
        service.privilegedStartService()
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    def test_provides_iservice(self) -> None:
        """The service provides IService."""
        self.assertTrue(verifyObject(IService, self._service()))

    async def _banner(self, port: int) -> bytes:
        line: Any = await threads.deferToThread(_read_line, port)
        return cast(bytes, line)

    def test_listens_and_greets(self) -> None:
        """
        After start, every binding takes connections and the client gets a
        220 banner with the connector's FQDN.
        """
        service = self._started()
        self.assertEqual(len(service.ports), 2)

        async def check() -> None:
            for port in (self.plain, self.submission):
                line = await self._banner(port)
                self.assertTrue(line.startswith(b"220 mx.example.test "), line)

        return Deferred.fromCoroutine(check())  # type: ignore[return-value]

    def test_start_creates_directories_and_certificate(self) -> None:
        """
        Start creates the spool and log directories and generates the
        missing certificate of a STARTTLS connector.
        """
        self._started()
        self.assertTrue((self.base / "spool" / "queue").is_dir())
        self.assertTrue((self.base / "log").is_dir())
        self.assertTrue((self.base / "tls" / "mail.pem").is_file())

    def test_stop_closes_listeners(self) -> None:
        """After stopService's Deferred fires, the ports refuse connections."""
        service = self._started()

        async def check() -> None:
            await service.stopService()
            refused: Any = await threads.deferToThread(_refused, self.plain)
            self.assertTrue(refused)
            self.assertEqual(service.ports, ())

        return Deferred.fromCoroutine(check())  # type: ignore[return-value]

    def test_listen_failure_names_binding_and_binds_nothing(self) -> None:
        """
        When a port is taken, start raises ListenError naming the binding,
        and the sockets already bound are closed again.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", self.submission))
        taken.listen()
        service = self._service()
        error = self.assertRaises(ListenError, service.privilegedStartService)
        self.assertIn(f"127.0.0.1:{self.submission}", str(error))
        self.assertIn("Submission", str(error))
        self.assertEqual(service.ports, ())

        async def check() -> None:
            await _settle()
            refused: Any = await threads.deferToThread(_refused, self.plain)
            self.assertTrue(refused)

        return Deferred.fromCoroutine(check())  # type: ignore[return-value]

    def test_bad_certificate_stops_start(self) -> None:
        """
        An unusable certificate file stops the start with a StartupError
        naming the connector and the file; nothing stays bound.
        """
        pem = self.base / "tls" / "mail.pem"
        pem.parent.mkdir()
        pem.write_text("garbage\n")
        service = self._service()
        service.privilegedStartService()
        error = self.assertRaises(StartupError, service.startService)
        self.assertIn("Submission", str(error))
        self.assertIn(str(pem), str(error))
        self.assertEqual(service.ports, ())

        async def check() -> None:
            await _settle()
            refused: Any = await threads.deferToThread(_refused, self.plain)
            self.assertTrue(refused)

        return Deferred.fromCoroutine(check())  # type: ignore[return-value]

    def test_recovered_entry_is_delivered(self) -> None:
        """
        A message committed to the spool before start (a restart) is handed
        to delivery at start and lands in the Maildir of its route.
        """
        from twisted.internet import reactor

        from relaygw.spool.envelope import Envelope, Recipient
        from relaygw.spool.store import DirectorySpool, SpoolWriter

        spool = DirectorySpool(self.base / "spool", cast(IServeReactor, reactor))
        writer = cast(SpoolWriter, spool.begin())
        writer.write(b"Subject: before the restart\r\n\r\nhello\r\n")
        writer.commit_now(
            Envelope(
                id=writer.queue_id,
                sender="sender@example.test",
                recipients=(Recipient("alice@example.test"),),
                connector="Plain",
                client_ip="127.0.0.1",
                received_at=reactor.seconds(),  # type: ignore[attr-defined]
                size=writer.size,
                message_id="<before@mx.example.test>",
            )
        )
        self._started()
        new = self.base / "mail" / "alice" / "new"

        async def check() -> None:
            delivered = await _delivered(new)
            self.assertEqual(len(delivered), 1)
            self.assertIn(b"before the restart", delivered[0].read_bytes())

        return Deferred.fromCoroutine(check())  # type: ignore[return-value]

    def test_smtp_message_lands_in_maildir(self) -> None:
        """
        End to end through the assembled service: a message sent with smtplib
        to an accepted domain is queued (250) and delivered to the Maildir.
        """
        self._started()
        new = self.base / "mail" / "bob" / "new"

        def send() -> None:
            import smtplib

            with smtplib.SMTP("127.0.0.1", self.plain, timeout=10) as client:
                client.sendmail(
                    "sender@example.test",
                    ["bob@example.test"],
                    b"Subject: through the service\r\n\r\nhello\r\n",
                )

        async def check() -> None:
            await threads.deferToThread(send)
            delivered = await _delivered(new)
            self.assertEqual(len(delivered), 1)
            self.assertIn(b"through the service", delivered[0].read_bytes())

        return Deferred.fromCoroutine(check())  # type: ignore[return-value]

    def test_mx_route_resolver_leaves_nothing_behind(self) -> None:
        """
        With an mx route and the system resolver configuration, stopService
        leaves no timer of the resolver pending (trial fails a test that
        leaves delayed calls in the reactor).
        """
        text = (
            _CONFIG.replace("{plain}", str(self.plain)).replace("{submission}", str(self.submission))
            + '\n[[routes]]\nname = "internet"\nvia = "mx"\n'
        ).replace('default_route = "local"', 'default_route = "internet"')
        service = self._service(load_text(text, "test.toml", self.base))
        service.startService()
        return service.stopService()  # type: ignore[return-value]


async def _delivered(new: Path) -> list[Path]:
    """The files in a Maildir C{new/} once one appears (polled for at most 5 s)."""
    from twisted.internet import reactor

    for _ in range(100):
        if new.is_dir() and any(new.iterdir()):
            break
        await task.deferLater(cast(IServeReactor, reactor), 0.05, lambda: None)
    return list(new.iterdir())
