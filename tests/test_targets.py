"""Tests for L{relaygw.deliver.targets}: Maildir on a temporary directory, smarthosts on smtp-sink."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, cast
from unittest import mock

import pytest
from attrs import evolve
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from relaygw.config._model import DNS, HostPort, Route
from relaygw.deliver import outcome, targets
from relaygw.deliver.mx import MXTarget, make_resolver
from relaygw.deliver.smtpclient import ClientTimeouts
from relaygw.deliver.targets import (
    MaildirTarget,
    SmarthostTarget,
    build_target,
    mailbox_name,
)
from relaygw.interfaces import IDeliveryTarget
from relaygw.spool.envelope import Envelope, Recipient
from tests.servers.ports import free_port
from tests.servers.sink import SINK_MISSING, sink_missing
from tests.test_smtpclient import start_sink

def _tmpdir(case: SynchronousTestCase) -> Path:
    """A fresh temporary directory outside the work tree, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="relaygw-test-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


def _opener(path: Path) -> Callable[[], BinaryIO]:
    """An C{open_data} callable for IDeliveryTarget.deliver reading the whole file at C{path}."""
    return lambda: open(path, "rb")


BODY = b"Subject: hi\r\n\r\nline one\r\n.dot\r\n"


def _envelope(*rcpts: str) -> Envelope:
    return Envelope(
        id="Q1",
        sender="s@x.test",
        recipients=tuple(Recipient(r) for r in rcpts),
        connector="c",
        client_ip="127.0.0.1",
        received_at=0.0,
        size=len(BODY),
        message_id="<m@x>",
    )


class MaildirTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = _tmpdir(self)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.root = self.tmp / "mail"
        self.data = self.tmp / "Q1.msg"
        self.data.write_bytes(BODY)
        clock = Clock()
        clock.advance(1_800_000_000.25)
        self.target = MaildirTarget(self.root, clock)

    def deliver(self, *rcpts: str) -> dict[str, Any]:
        return self.successResultOf(
            self.target.deliver(_envelope(*rcpts), list(rcpts), _opener(self.data))
        )

    def test_provides_interface(self) -> None:
        """MaildirTarget provides IDeliveryTarget."""
        self.assertTrue(verifyObject(IDeliveryTarget, self.target))

    def test_delivers_into_new(self) -> None:
        """The message lands in <root>/<local-part>/new/ with LF line ends; tmp/ is empty."""
        result = self.deliver("alice@example.test")
        self.assertEqual(result["alice@example.test"].kind, "delivered")
        [msg] = list((self.root / "alice" / "new").iterdir())
        self.assertEqual(msg.read_bytes(), BODY.replace(b"\r\n", b"\n"))
        self.assertEqual(list((self.root / "alice" / "tmp").iterdir()), [])
        self.assertTrue((self.root / "alice" / "cur").is_dir())
        self.assertRegex(msg.name, r"^1800000000\.M250000P\d+Q\d+R[0-9a-f]+\..+$")

    def test_local_part_lower_cased_and_unquoted(self) -> None:
        """The folder is the local part unquoted and lower-cased."""
        self.deliver('"Bob"@example.test', "CAROL@example.test")
        self.assertEqual(sorted(p.name for p in self.root.iterdir()), ["bob", "carol"])

    def test_one_copy_per_mailbox(self) -> None:
        """Two recipients sharing a mailbox get one copy."""
        result = self.deliver("dave@example.test", "Dave@example.test")
        self.assertEqual({o.kind for o in result.values()}, {"delivered"})
        self.assertEqual(len(list((self.root / "dave" / "new").iterdir())), 1)

    def test_traversal_refused(self) -> None:
        """Local parts that are not one safe path component bounce with 5.1.3; nothing is written."""
        bad = [
            '"../../etc"@example.test',
            '"a/b"@example.test',
            '".."@example.test',
            '"."@example.test',
            ".hidden@example.test",
            '"x\\\x00y"@example.test',
        ]
        result = self.deliver(*bad)
        for address in bad:
            self.assertEqual(result[address].kind, "bounce", address)
            self.assertIn(" 5.1.3 ", result[address].reply)
        self.assertFalse(self.root.exists())
        self.assertEqual(sorted(p.name for p in self.tmp.iterdir()), ["Q1.msg"])

    def test_mailbox_name(self) -> None:
        """mailbox_name unquotes, lower-cases and refuses unsafe names."""
        self.assertEqual(mailbox_name('"A\\"b"@x'), 'a"b')
        self.assertEqual(mailbox_name("a.b@x"), "a.b")
        self.assertIsNone(mailbox_name('""@x'))
        self.assertIsNone(mailbox_name('"a\\/b"@x'))

    def test_atomic_rename(self) -> None:
        """Nothing is in new/ until the complete, fsynced file is renamed from tmp/."""
        seen: list[tuple[bytes, list[Path]]] = []
        real_rename = os.rename

        def spy(src: Any, dst: Any) -> None:
            seen.append((Path(src).read_bytes(), list((self.root / "eve" / "new").iterdir())))
            self.assertEqual(Path(src).parent.name, "tmp")
            real_rename(src, dst)

        with mock.patch.object(targets.os, "rename", spy):
            self.deliver("eve@example.test")
        self.assertEqual(seen, [(BODY.replace(b"\r\n", b"\n"), [])])

    def test_write_failure_retries(self) -> None:
        """An OSError while writing is a retry, and the partial tmp file is removed."""
        self.deliver("frank@example.test")
        for done in (self.root / "frank" / "new").iterdir():
            done.unlink()
        with mock.patch.object(targets.os, "fsync", side_effect=OSError("EIO")):
            result = self.deliver("frank@example.test")
        self.assertEqual(result["frank@example.test"].reply, str(outcome.MAILBOX_WRITE_FAILED))
        self.assertEqual(result["frank@example.test"].kind, "retry")
        self.assertEqual(list((self.root / "frank" / "new").iterdir()), [])
        self.assertEqual(list((self.root / "frank" / "tmp").iterdir()), [])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_missing_data_retries(self) -> None:
        """A missing spool data file is a retry."""
        self.data.unlink()
        result = self.deliver("gina@example.test")
        self.assertEqual(result["gina@example.test"].kind, "retry")
        self.flushLoggedErrors(OSError)

    def test_copies_only_the_data_of_a_spool_entry(self) -> None:
        """Delivered from a real spool entry, the copy is the message data alone (no envelope or trailer)."""
        from relaygw._types import ISpoolReactor
        from relaygw.spool.store import DirectorySpool, SpoolWriter

        clock = Clock()
        clock.advance(1_800_000_000)
        spool = DirectorySpool(self.tmp / "spool", cast(ISpoolReactor, clock))
        self.addCleanup(spool.close)
        writer = cast(SpoolWriter, spool.begin())
        writer.write(BODY)
        envelope = evolve(_envelope("ivy@example.test"), id=writer.queue_id)
        writer.commit_now(envelope)
        opener = functools.partial(spool.open_data, writer.queue_id)
        result = self.successResultOf(self.target.deliver(envelope, ["ivy@example.test"], opener))
        self.assertEqual(result["ivy@example.test"].kind, "delivered")
        [msg] = list((self.root / "ivy" / "new").iterdir())
        self.assertEqual(msg.read_bytes(), BODY.replace(b"\r\n", b"\n"))

    def test_crlf_split_across_chunks(self) -> None:
        """A CRLF split by the copy's chunk boundary still becomes one LF."""
        content = b"x" * (64 * 1024 - 1) + b"\r\nend\r\n"
        self.data.write_bytes(content)
        self.deliver("hal@example.test")
        [msg] = list((self.root / "hal" / "new").iterdir())
        self.assertEqual(msg.read_bytes(), b"x" * (64 * 1024 - 1) + b"\nend\n")


class BuildTests(SynchronousTestCase):
    def test_build_target_by_via(self) -> None:
        """build_target picks the class by route.via."""
        r = MemoryReactorClock()
        kinds = {
            "maildir": Route("m", via="maildir", maildir=Path("/m")),
            "smarthost": Route("s", via="smarthost", smarthosts=(HostPort("h", 25),)),
            "mx": Route("x", via="mx"),
        }
        resolver = make_resolver(DNS(servers=(HostPort("127.0.0.1", 53),)), r)
        built = {
            k: build_target(v, reactor=r, resolver=resolver, helo="gw") for k, v in kinds.items()
        }
        self.assertIsInstance(built["maildir"], MaildirTarget)
        self.assertIsInstance(built["smarthost"], SmarthostTarget)
        self.assertIsInstance(built["mx"], MXTarget)
        for t in built.values():
            self.assertTrue(verifyObject(IDeliveryTarget, t))

    def test_mx_route_needs_a_resolver(self) -> None:
        with self.assertRaises(ValueError):
            build_target(Route("x"), reactor=MemoryReactorClock(), resolver=None, helo="gw")



@pytest.mark.skipif(sink_missing(), reason=SINK_MISSING)
class SmarthostTests(TestCase):
    """SmarthostTarget against smtp-sink on loopback (real reactor)."""

    timeout = 30

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        tmp = _tmpdir(self)
        tmp.mkdir(parents=True, exist_ok=True)
        self.data = tmp / "Q1.msg"
        self.data.write_bytes(BODY)

    def target(self, *hosts: HostPort) -> SmarthostTarget:
        route = Route("smart", via="smarthost", smarthosts=hosts, tls="opportunistic")
        return SmarthostTarget(
            route,
            reactor=self.reactor,
            helo="gw.example.test",
            timeouts=ClientTimeouts(connect=5, reply=5, data_done=5),
        )

    async def test_first_host_down_fails_over(self) -> None:
        """A closed first host passes the message to the next one, which delivers it."""
        sink = start_sink(self)
        t = self.target(HostPort("127.0.0.1", free_port()), sink.host)
        result = await t.deliver(_envelope("a@x.test"), ["a@x.test"], _opener(self.data))
        self.assertEqual(result["a@x.test"].kind, "delivered")
        self.assertEqual(result["a@x.test"].remote_host, str(sink.host))
        self.assertEqual(len(sink.messages()), 1)

    async def test_mail_4xx_fails_over(self) -> None:
        """A host answering MAIL with 4xx passes the message to the next host."""
        refusing = start_sink(self, "-r", "MAIL")
        sink = start_sink(self)
        t = self.target(refusing.host, sink.host)
        result = await t.deliver(_envelope("a@x.test"), ["a@x.test"], _opener(self.data))
        self.assertEqual(result["a@x.test"].remote_host, str(sink.host))
        self.assertEqual(result["a@x.test"].kind, "delivered")

    async def test_rcpt_refusal_does_not_fail_over(self) -> None:
        """A host that took the transaction decides: its 5xx at RCPT is the outcome."""
        refusing = start_sink(self, "-f", "RCPT")
        sink = start_sink(self)
        t = self.target(refusing.host, sink.host)
        result = await t.deliver(_envelope("a@x.test"), ["a@x.test"], _opener(self.data))
        self.assertEqual(result["a@x.test"].kind, "bounce")
        self.assertEqual(result["a@x.test"].remote_host, str(refusing.host))

    async def test_all_hosts_down(self) -> None:
        """With every host unreachable, all recipients are retried."""
        t = self.target(HostPort("127.0.0.1", free_port()), HostPort("127.0.0.1", free_port()))
        result = await t.deliver(_envelope("a@x.test", "b@x.test"), ["a@x.test", "b@x.test"], _opener(self.data))
        self.assertEqual({o.kind for o in result.values()}, {"retry"})
