"""
A small HTTPS server (twisted.web, in the test's reactor) that serves
scripted responses by path and records every request: the MTA-STS policy
host of the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attrs import define, field, frozen
from twisted.internet import ssl
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.http import Request
from twisted.web.resource import Resource
from twisted.web.server import Site


@frozen
class Reply:
    """One scripted response."""

    body: bytes
    code: int = 200
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()


@define
class Seen:
    """One request: method, path and Host header."""

    method: str
    path: str
    host: str


class _Scripted(Resource):
    isLeaf = True

    def __init__(self, server: HTTPSServer) -> None:
        super().__init__()
        self._server = server

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        path = request.path.decode()
        host = request.getHeader("host") or ""
        self._server.requests.append(Seen(request.method.decode(), path, host))
        reply = self._server.replies.get(path, Reply(b"not found\n", 404))
        request.setResponseCode(reply.code)
        request.setHeader("content-type", reply.content_type)
        for name, value in reply.headers:
            request.setHeader(name, value)
        return reply.body


class _TrackingSite(Site):
    """A Site that knows its open connections, so that stopping can close them."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.open: dict[Any, Deferred[None]] = {}

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        assert protocol is not None
        closed: Deferred[None] = Deferred()
        self.open[protocol] = closed
        lost = protocol.connectionLost

        def connectionLost(reason: Any) -> None:
            self.open.pop(protocol, None)
            lost(reason)
            closed.callback(None)

        protocol.connectionLost = connectionLost
        return protocol


@define
class HTTPSServer:
    """
    Listens on C{host:port} with the certificate and key of C{pem}.

    @ivar replies: path -> L{Reply}; other paths get 404.
    @ivar requests: every request received, in order.
    """

    reactor: Any
    pem: Path
    host: str
    port: int
    replies: dict[str, Reply] = field(factory=dict)
    requests: list[Seen] = field(factory=list)
    _listening: Any = None
    _site: _TrackingSite | None = None

    def start(self) -> HTTPSServer:
        options = ssl.PrivateCertificate.loadPEM(self.pem.read_bytes()).options()
        self._site = _TrackingSite(_Scripted(self))
        self._listening = self.reactor.listenSSL(
            self.port, self._site, options, interface=self.host)
        return self

    def stop(self) -> Deferred[Any]:
        """Stop listening and wait until every connection is closed."""
        waits: list[Deferred[Any]] = []
        if self._listening is not None:
            waits.append(Deferred.fromCoroutine(_maybe(self._listening.stopListening())))
            self._listening = None
        if self._site is not None:
            for protocol, closed in list(self._site.open.items()):
                waits.append(closed)
                channel = getattr(protocol, "_channel", protocol)  # Site wraps its HTTPChannel
                channel.transport.abortConnection()
        return gatherResults(waits)


async def _maybe(result: Any) -> None:
    if isinstance(result, Deferred):
        await result
