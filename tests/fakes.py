"""
Hand-written recording fakes at relaygw's own seams (DESIGN habit 9).

L{RecordingSpool} is an in-memory L{ISpool}: it records every commit and
abort and can be told to fail C{begin}, C{write} or C{commit} with
L{OSError}.  L{TLSStringTransport} is a L{StringTransport} that records
C{startTLS} and what had been written before it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

from pathlib import Path

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer

from relaygw.config._model import AcceptedDomain, Config, Connector, Gateway, Route
from relaygw.config._units import parse_binding, parse_range
from relaygw.interfaces import IMessageWriter, ISpool
from relaygw.spool.envelope import Envelope

__all__ = [
    "FakeTLSConnection",
    "Harness",
    "RecordingSpool",
    "RecordingWriter",
    "TLSStringTransport",
    "make_config",
    "make_connector",
    "reply_lines",
]


@implementer(IMessageWriter)
class RecordingWriter:
    """
    One message written into a L{RecordingSpool}.

    @ivar data: everything written, while the message is open or committed.
    @ivar state: C{"open"}, C{"committing"} (held), C{"committed"} or
        C{"aborted"} (also after a failed commit).
    """

    def __init__(self, spool: RecordingSpool, queue_id: str) -> None:
        self.queue_id = queue_id
        self.size = 0
        self.state = "open"
        self._spool = spool
        self._data = io.BytesIO()
        self.writes = 0

    @property
    def data(self) -> bytes:
        return self._data.getvalue()

    def write(self, data: bytes) -> None:
        if self.state != "open":
            raise ValueError(f"write to {self.state} writer {self.queue_id}")
        if self._spool.fail_write:
            raise OSError(28, "No space left on device (fake)")
        self.writes += 1
        if self._spool.keep_data:
            self._data.write(data)
        self.size += len(data)

    def commit(self, envelope: object) -> Deferred[None]:
        if self.state != "open":
            raise ValueError(f"commit of {self.state} writer {self.queue_id}")
        if not isinstance(envelope, Envelope) or envelope.id != self.queue_id:
            raise ValueError("commit needs this writer's Envelope")
        self.state = "committing"
        if self._spool.hold_commits:
            waiting: Deferred[None] = Deferred()
            self._spool.held.append((self, envelope, waiting))
            return waiting
        return self._finish_commit(envelope, self._spool.fail_commit)

    def _finish_commit(self, envelope: Envelope, failed: bool) -> Deferred[None]:
        if failed:
            # Like the real spool: a failed commit removes the entry itself.
            self.state = "aborted"
            self._spool.aborted.append(self.queue_id)
            self._data = io.BytesIO()
            return fail(OSError(5, "Input/output error (fake)"))
        self.state = "committed"
        self._spool.committed.append((envelope, self.data))
        for callback in self._spool.subscribers:
            callback(envelope)
        return succeed(None)

    def abort(self) -> None:
        if self.state == "open":
            self.state = "aborted"
            self._spool.aborted.append(self.queue_id)
            self._data = io.BytesIO()


@implementer(ISpool)
class RecordingSpool:
    """
    An in-memory spool that records what the receive side does to it.

    @ivar committed: C{(envelope, data)} per commit, in order.
    @ivar aborted: queue ids of aborted writers.
    @ivar writers: every writer handed out.
    @ivar fail_begin: make L{begin} raise L{OSError}.
    @ivar fail_write: make C{write} raise L{OSError}.
    @ivar fail_commit: make C{commit}'s Deferred fail with L{OSError}.
    @ivar hold_commits: make C{commit} return a Deferred that fires only
        when the test calls L{release}; the commits wait in C{held}.
    @ivar keep_data: C{False} counts written octets but stores nothing (for
        memory checks and measurements with many messages).
    """

    def __init__(self) -> None:
        self.committed: list[tuple[Envelope, bytes]] = []
        self.aborted: list[str] = []
        self.writers: list[RecordingWriter] = []
        self.subscribers: list[Callable[[Envelope], None]] = []
        self.fail_begin = False
        self.fail_write = False
        self.fail_commit = False
        self.hold_commits = False
        self.held: list[tuple[RecordingWriter, Envelope, Deferred[None]]] = []
        self.keep_data = True
        self._next = 0

    def release(self, *, failed: bool = False) -> None:
        """Finish every held commit (successfully unless C{failed}), oldest first."""
        held, self.held = self.held, []
        for writer, envelope, waiting in held:
            writer._finish_commit(envelope, failed).chainDeferred(waiting)

    def begin(self) -> RecordingWriter:
        if self.fail_begin:
            raise OSError(30, "Read-only file system (fake)")
        self._next += 1
        writer = RecordingWriter(self, f"Q{self._next:06d}")
        self.writers.append(writer)
        return writer

    def recover(self) -> list[object]:
        return [e for e, _ in self.committed]

    def entries(self) -> list[object]:
        return [e for e, _ in self.committed]

    def clean(self) -> int:
        return len(self.committed)

    def iter_entries(self) -> Iterator[object]:
        return iter(self.entries())

    def load(self, queue_id: str) -> object:
        for envelope, _ in self.committed:
            if envelope.id == queue_id:
                return envelope
        raise KeyError(queue_id)

    def open_data(self, queue_id: str) -> object:
        for envelope, data in self.committed:
            if envelope.id == queue_id:
                return io.BytesIO(data)
        raise KeyError(queue_id)

    def update(self, envelope: object) -> None:
        raise NotImplementedError("not used by the receive side")

    def remove(self, queue_id: str) -> None:
        self.committed = [(e, d) for e, d in self.committed if e.id != queue_id]

    def subscribe(self, callback: object) -> None:
        self.subscribers.append(callback)  # type: ignore[arg-type]


class FakeTLSConnection:
    """What C{transport.getHandle()} returns once TLS runs: a pyOpenSSL-like connection."""

    def __init__(self, version: str = "TLSv1.3", cipher: str = "TLS_AES_256_GCM_SHA384") -> None:
        self._version = version
        self._cipher = cipher

    def get_protocol_version_name(self) -> str:
        return self._version

    def get_cipher_name(self) -> str:
        return self._cipher


class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} whose C{startTLS} records its options and the bytes
    written before it, and then pretends TLS runs (C{getHandle} gives a
    L{FakeTLSConnection}).

    @ivar tls_started: the options passed to each C{startTLS} call.
    @ivar written_before_tls: C{value()} at the first C{startTLS} call.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.tls_started: list[object] = []
        self.written_before_tls: bytes | None = None

    def startTLS(self, options: object) -> None:
        if self.written_before_tls is None:
            self.written_before_tls = self.value()  # type: ignore[no-untyped-call]
        self.tls_started.append(options)

    def getHandle(self) -> object:
        return FakeTLSConnection() if self.tls_started else None


# -- building sessions over StringTransport ------------------------------------

GATEWAY_FQDN = "mail.example.test"


def make_connector(**overrides: Any) -> Connector:
    """A connector on 127.0.0.1:2525 for every IPv4 client, with C{overrides}."""
    values: dict[str, Any] = {
        "name": "Default",
        "bindings": (parse_binding("127.0.0.1:2525"),),
        "remote_ranges": (parse_range("0.0.0.0/0"),),
        "fqdn": GATEWAY_FQDN,
        "tls": "off",
    }
    values.update(overrides)
    return Connector(**values)


def make_config(*connectors: Connector, accepted: tuple[str, ...] = ("example.test",)) -> Config:
    """A configuration with C{connectors} and the C{accepted} domains."""
    return Config(
        source="<test>",
        gateway=Gateway(hostname=GATEWAY_FQDN, spool_dir=Path("/nonexistent/spool"),
                        log_dir=Path("/nonexistent/log")),
        connectors=connectors or (make_connector(),),
        routes=(Route("local", via="maildir", maildir=Path("/nonexistent/mail")),),
        accepted_domains=tuple(AcceptedDomain(d, route="local") for d in accepted),
    )


class Harness:
    """
    A L{SessionFactory} over a L{RecordingSpool} and a L{MemoryReactorClock},
    with helpers to connect sessions over L{TLSStringTransport}.
    """

    def __init__(
        self,
        *connectors: Connector,
        accepted: tuple[str, ...] = ("example.test",),
        tls_options: Callable[[Connector], object | None] | None = None,
        portal: object | None = None,
    ) -> None:
        from relaygw.connectors.selector import ConnectorSelector
        from relaygw.session.factory import SessionFactory

        self.config = make_config(*connectors, accepted=accepted)
        self.spool = RecordingSpool()
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        self.factory = SessionFactory(
            selector=ConnectorSelector(self.config.connectors),
            config=self.config,
            spool=self.spool,
            reactor=self.reactor,
            tls_options=tls_options,
            portal=portal,
        )

    def connect(
        self, peer: str = "192.0.2.10", local: str = "127.0.0.1", port: int = 2525
    ) -> tuple[Any, TLSStringTransport]:
        """A connected session and its transport (greeting already written)."""
        family = IPv6Address if ":" in peer else IPv4Address
        local_family = IPv6Address if ":" in local else IPv4Address
        transport = TLSStringTransport(
            hostAddress=local_family("TCP", local, port),
            peerAddress=family("TCP", peer, 40001),
        )
        session = self.factory.buildProtocol(transport.getPeer())
        session.makeConnection(transport)
        return session, transport


def reply_lines(data: bytes) -> list[str]:
    """The CRLF-terminated lines of C{data} as text."""
    assert data.endswith(b"\r\n") or not data, data
    return [line.decode("utf-8") for line in data.split(b"\r\n")[:-1]]


def all_events(case: Any) -> Any:
    """
    An EventLoggingObserver of the global log and of the per-message events
    (L{relaygw.events.MESSAGES}) together, removed when C{case} ends.
    """
    from twisted.internet.testing import EventLoggingObserver
    from twisted.logger import globalLogPublisher

    from relaygw.events import MESSAGES

    events = EventLoggingObserver.createWithCleanup(case, globalLogPublisher)
    MESSAGES.addObserver(events)
    case.addCleanup(MESSAGES.removeObserver, events)
    return events
