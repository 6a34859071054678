"""
Which sockets to listen on for a configuration, and listening on them.

One socket per distinct binding of the enabled connectors, except that a
wildcard binding covers the specific-address bindings of its family on the
same port: the kernel refuses a specific address next to a wildcard
listener on the same port, and the selector picks the connector from the
connection's local address anyway.  A C{[::]} socket is dual-stack (IPv4
clients arrive as IPv4-mapped addresses) unless a C{0.0.0.0} binding shares
its port, in which case it is IPv6-only; a dual-stack C{[::]} socket also
covers the IPv4 bindings of its port, for the same kernel reason.

L{plan_sockets} is pure; L{listen_on} does the I/O.
"""

from __future__ import annotations

import socket
from typing import Iterable

from attrs import frozen
from twisted.internet import tcp
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.internet.protocol import ServerFactory

from relaygw.config._model import Binding, Connector

__all__ = ["ListenError", "ListenSocket", "plan_sockets", "listen_on"]

_BACKLOG = 128


@frozen
class ListenSocket:
    """
    One listening socket.

    @ivar binding: the address and port bound.
    @ivar covers: the configured bindings whose connections arrive on this
        socket (C{binding} itself first when it is configured).
    @ivar connectors: names of the enabled connectors served, in file order.
    @ivar v6only: for an IPv6 socket, whether it refuses IPv4 clients;
        C{False} for IPv4 sockets.
    """

    binding: Binding
    covers: tuple[Binding, ...]
    connectors: tuple[str, ...]
    v6only: bool = False

    def __str__(self) -> str:
        return str(self.binding)


class ListenError(Exception):
    """
    A planned socket could not be opened (port in use, no permission,
    address not on this host).  The message names the binding.
    """

    def __init__(self, socket: ListenSocket, reason: str) -> None:
        self.socket = socket
        self.reason = reason
        names = ", ".join(socket.connectors)
        super().__init__(f"cannot listen on {socket.binding} (connectors: {names}): {reason}")


def plan_sockets(connectors: Iterable[Connector]) -> tuple[ListenSocket, ...]:
    """
    The sockets to open for the enabled C{connectors}.

    @return: sockets ordered by port, then IPv4 before IPv6, then address.
    """
    served: dict[Binding, list[str]] = {}
    for connector in connectors:
        if not connector.enabled:
            continue
        for binding in connector.bindings:
            names = served.setdefault(binding, [])
            if connector.name not in names:
                names.append(connector.name)

    plans: list[ListenSocket] = []
    for port in sorted({b.port for b in served}):
        on_port = [b for b in served if b.port == port]
        v4_wild = Binding("0.0.0.0", port)
        v6_wild = Binding("::", port)
        covered: set[Binding] = set()
        if v6_wild in served:
            v6only = v4_wild in served
            covers = [b for b in on_port if b.version == 6 or not v6only]
            plans.append(_socket(v6_wild, covers, served, v6only=v6only))
            covered.update(covers)
        if v4_wild in served:
            covers = [b for b in on_port if b.version == 4]
            plans.append(_socket(v4_wild, covers, served))
            covered.update(covers)
        for binding in on_port:
            if binding not in covered:
                plans.append(_socket(binding, [binding], served, v6only=binding.version == 6))
    plans.sort(key=lambda p: (p.binding.port, p.binding.version, int(p.binding.address)))
    return tuple(plans)


def _socket(
    binding: Binding,
    covers: list[Binding],
    served: dict[Binding, list[str]],
    *,
    v6only: bool = False,
) -> ListenSocket:
    ordered = sorted(covers, key=lambda b: (b != binding, b.version, int(b.address)))
    names: list[str] = []
    for covered in ordered:
        names.extend(n for n in served[covered] if n not in names)
    return ListenSocket(binding, tuple(ordered), tuple(names), v6only)


class _IPv6Port(tcp.Port):
    """
    A TCP port that sets C{IPV6_V6ONLY} explicitly, so dual-stack or not is
    decided by the configuration rather than by the host's
    C{net.ipv6.bindv6only} sysctl.
    """

    def __init__(
        self,
        port: int,
        factory: ServerFactory,
        backlog: int,
        interface: str,
        reactor: object,
        v6only: bool,
    ) -> None:
        super().__init__(port, factory, backlog, interface, reactor)
        self._v6only = v6only

    def createInternetSocket(self) -> socket.socket:
        s: socket.socket = super().createInternetSocket()  # type: ignore[no-untyped-call]
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if self._v6only else 0)
        return s


def listen_on(
    reactor: IReactorTCP, plan: ListenSocket, factory: ServerFactory
) -> IListeningPort:
    """
    Open one planned socket.

    IPv6 sockets are built as L{tcp.Port} subclasses on C{reactor}, so
    C{reactor} must then be a real (file-descriptor based) reactor; IPv4
    sockets go through C{reactor.listenTCP}.

    @raise ListenError: the socket could not be opened; the message names
        the binding and the reason.
    """
    try:
        if plan.binding.version == 6:
            port = _IPv6Port(
                plan.binding.port, factory, _BACKLOG, plan.binding.host, reactor, plan.v6only
            )
            port.startListening()
            return port
        return reactor.listenTCP(
            plan.binding.port, factory, backlog=_BACKLOG, interface=plan.binding.host
        )
    except CannotListenError as error:
        raise ListenError(plan, _reason(error)) from None


def _reason(error: CannotListenError) -> str:
    cause = error.socketError
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause)
