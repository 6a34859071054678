"""
Connection reuse (L{relaygw.deliver.connections}): several messages in turn
over one connection (RSET between them, one TLS handshake and one AUTH),
the idle timeout, a server that closes an idle connection, the reuse time
limit; against the recording ESMTP server over real loopback sockets with
real TLS.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from relaygw.config._model import HostPort
from relaygw.deliver import connections
from relaygw.deliver.connections import ConnectionCache, deliver_to_host
from relaygw.deliver.smtpclient import (
    ClientAuth,
    ClientTimeouts,
    OutboundMessage,
    TransactionResult,
    tls_options_for,
)
from tests.servers.recording_smtp import RecordingServer, TestCA

NAME = "mail.test"


class ReuseTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.tmp = Path(tempfile.mkdtemp(prefix="relaygw-reuse-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.ca = TestCA(self.tmp)
        certificate = self.ca.issue(NAME, [NAME])
        self.server = RecordingServer(
            certificate=certificate, mechanisms=(b"PLAIN",), credentials=(b"u", b"pw")
        ).start(self.reactor)
        self.addCleanup(self.server.stop)
        self.cache = ConnectionCache(self.reactor)
        self.addCleanup(self.cache.close)
        self.timeouts = ClientTimeouts(connect=5, reply=5, data_done=5, idle=5)

    def send(self, n: int, *, cache: ConnectionCache | None = None) -> Any:
        path = self.tmp / f"m{n}"
        path.write_bytes(b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n))
        message = OutboundMessage("s@x.test", (f"r{n}@x.test",), lambda: open(path, "rb"))
        return deliver_to_host(
            self.reactor,
            HostPort("127.0.0.1", self.server.port),
            message,
            helo="gw.example.test",
            tls="verify",
            timeouts=self.timeouts,
            tls_options=tls_options_for("verify", self.ca.ca_file),
            server_name=NAME,
            auth=ClientAuth("u", "pw"),
            cache=cache,
        )

    def verbs(self, index: int) -> list[bytes]:
        return [c.split(b" ")[0].upper() for c in self.server.sessions[index].commands]

    async def until(self, condition: Any) -> None:
        for _ in range(200):
            if condition():
                return
            await task.deferLater(self.reactor, 0.01, lambda: None)
        self.fail("condition not met within 2 s")

    async def test_one_connection_carries_messages_in_turn(self) -> None:
        for n in range(3):
            result: TransactionResult = await self.send(n, cache=self.cache)
            self.assertEqual(result.outcomes[f"r{n}@x.test"].kind, "delivered")
        [session] = self.server.sessions
        await self.until(lambda: self.verbs(0)[-1] == b"RSET")
        self.assertTrue(session.tls)
        self.assertEqual([m.split(b"\r\n")[0] for m in session.messages],
                         [b"Subject: 0", b"Subject: 1", b"Subject: 2"])
        verbs = self.verbs(0)
        self.assertEqual((verbs.count(b"EHLO"), verbs.count(b"STARTTLS"), verbs.count(b"AUTH")),
                         (2, 1, 1))
        self.assertEqual(verbs[verbs.index(b"MAIL"):],
                         [b"MAIL", b"RCPT", b"DATA", b"RSET"] * 3)
        self.assertEqual(len(self.cache), 1)

    async def test_without_a_cache_each_message_has_its_connection(self) -> None:
        for n in range(2):
            await self.send(n)
        self.assertEqual(len(self.server.sessions), 2)
        self.assertEqual(self.verbs(0)[-1], b"QUIT")

    async def test_idle_connection_quits_after_the_idle_time(self) -> None:
        self.timeouts = ClientTimeouts(connect=5, reply=5, data_done=5, idle=0.1)
        await self.send(0, cache=self.cache)
        await self.until(lambda: self.verbs(0)[-1] == b"QUIT" and len(self.cache) == 0)

    async def test_concurrent_messages_use_separate_connections(self) -> None:
        await gatherResults([self.send(0, cache=self.cache), self.send(1, cache=self.cache)])
        self.assertEqual(len(self.server.sessions), 2)
        await self.until(lambda: len(self.cache) == 2)
        await self.send(2, cache=self.cache)
        self.assertEqual(len(self.server.sessions), 2)

    async def test_server_closing_an_idle_connection(self) -> None:
        """Closed while idle, seen or not yet seen by the client: the next message still goes."""
        await self.send(0, cache=self.cache)
        for proto in list(self.server._open):
            proto.transport.loseConnection()
        # Same reactor turn: the client has not seen the close, takes the
        # dead connection, and must retry on a new one.
        result = await self.send(1, cache=self.cache)
        self.assertEqual(result.outcomes["r1@x.test"].kind, "delivered")
        self.assertEqual(len(self.server.sessions), 2)
        self.assertEqual(len(self.server.sessions[1].messages), 1)

    async def test_reuse_time_limit(self) -> None:
        self.patch(connections, "REUSE_SECONDS", 0.0)
        await self.send(0, cache=self.cache)
        await self.send(1, cache=self.cache)
        self.assertEqual(len(self.server.sessions), 2)
        await self.until(lambda: self.verbs(0)[-1] == b"QUIT")
