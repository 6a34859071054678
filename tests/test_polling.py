"""
L{relaygw.polling}: the epoll reactor without the per-event log context
still delivers data, disconnects, and survives a protocol that raises.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from relaygw.polling import LeanEPollReactor, make_lean


class _Recorder(Protocol):
    def __init__(self, reactor: EPollReactor, fail_on_lost: bool = False) -> None:
        self.reactor = reactor
        self.data = b""
        self.lost: Failure | None = None
        self.fail_on_lost = fail_on_lost

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost = reason
        if self.fail_on_lost:
            raise RuntimeError("a buggy connectionLost")


def _spin(reactor: EPollReactor, until: object, rounds: int = 200) -> None:
    for _ in range(rounds):
        if until():  # type: ignore[operator]
            return
        reactor.doIteration(0.01)
    raise AssertionError("the reactor did not get there")


def test_make_lean_turns_the_epoll_reactor() -> None:
    reactor = EPollReactor()
    assert make_lean(reactor)
    assert type(reactor) is LeanEPollReactor
    assert reactor.doIteration.__func__ is LeanEPollReactor.doPoll  # type: ignore[attr-defined]


def test_make_lean_leaves_other_reactors() -> None:
    reactor = SelectReactor()
    assert not make_lean(reactor)
    assert type(reactor) is SelectReactor


@pytest.mark.parametrize("fail_on_lost", [False, True])
def test_reads_and_disconnects(fail_on_lost: bool) -> None:
    reactor = EPollReactor()
    make_lean(reactor)
    ours, theirs = socket.socketpair()
    protocol = _Recorder(reactor, fail_on_lost)
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _Factory(protocol))
        ours.close()  # adopted: the reactor holds its own descriptor
        theirs.sendall(b"hello")
        _spin(reactor, lambda: protocol.data == b"hello")
        theirs.close()
        _spin(reactor, lambda: protocol.lost is not None)
        errors = [e for e in events if e.get("log_failure") is not None]
        if fail_on_lost:
            # Logged, not raised out of the reactor's loop.
            assert any("buggy connectionLost" in str(e["log_failure"].value)  # type: ignore[attr-defined]
                       for e in errors)
        else:
            assert errors == []
        assert protocol.transport not in reactor.getReaders()
    finally:
        globalLogPublisher.removeObserver(events.append)
        reactor.removeAll()


class _Factory:
    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


class _Server(Protocol):
    pass


@pytest.mark.parametrize("tls", [False, True])
def test_write_now(tls: bool) -> None:
    """Plain TCP: the peer has the bytes before the reactor runs again; a TLS
    connection's writes still go through its transport (never around TLS)."""
    from twisted.internet.protocol import ServerFactory

    from relaygw.polling import write_now

    reactor = EPollReactor()
    make_lean(reactor)
    factory = ServerFactory.forProtocol(_Server)
    servers: list[Protocol] = []
    build = factory.buildProtocol
    factory.buildProtocol = lambda addr: servers.append(build(addr)) or servers[-1]  # type: ignore[method-assign,func-returns-value]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    try:
        _spin(reactor, lambda: bool(servers) and servers[0].transport is not None)
        transport = servers[0].transport
        written: list[bytes] = []
        if tls:
            transport.TLS = True  # type: ignore[union-attr]
            transport.write = written.append  # type: ignore[union-attr,method-assign]
        write_now(transport, b"220 ready\r\n")  # type: ignore[arg-type]
        if tls:
            assert written == [b"220 ready\r\n"]
            client.settimeout(0.2)
            with pytest.raises(socket.timeout):
                client.recv(100)
        else:
            assert client.recv(100) == b"220 ready\r\n"
            assert not transport.dataBuffer and not transport._tempDataBuffer  # type: ignore[union-attr]
    finally:
        client.close()
        port.stopListening()
        reactor.removeAll()
