"""
The checks at connect time, before the greeting: which connector serves the
client (SPEC section 2), implicit TLS, the connection limits, the banner.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, cast

from attrs import frozen
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    ITLSTransport,
    ITransport,
)
from twisted.logger import Logger

from relaygw import replies
from relaygw.config._model import Connector
from relaygw.interfaces import IConnectorSelector
from relaygw.replies import Reply
from relaygw.session.headers import banner_date
from relaygw.session.limits import ConnectionCounter
from relaygw.session.policy import Policy
from relaygw.session.state import SessionServices, SessionState

if TYPE_CHECKING:
    from relaygw.connectors.selector import Selection

_log = Logger(namespace="relaygw.session")


def plain_ip(host: str) -> str:
    """An address as shown to people: IPv4-mapped IPv6 as IPv4; other text unchanged."""
    if ":" not in host:  # IPv4 as transports give it is already canonical
        return host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def banner(connector: Connector, now: float) -> str:
    """The connector's banner with C{{fqdn}}, C{{connector}} and C{{date}} filled in."""
    try:
        return connector.banner.format(
            fqdn=connector.fqdn, connector=connector.name, date=banner_date(now)
        )
    except (KeyError, IndexError, ValueError):
        return connector.banner


@frozen
class Admission:
    """
    The verdict on a new connection.

    @ivar counter: the connection counter holding the client's slot;
        C{None} when the connection is refused.
    @ivar refusal: the reply to send before closing a refused connection,
        C{None} to close it without a byte.
    @ivar local: the local C{address:port} the client connected to.
    @ivar selection: how the connector was chosen (for the protocol log).
    """

    counter: ConnectionCounter | None
    refusal: Reply | None = None
    local: str = ""
    selection: Selection | None = None


def chosen_because(admission: Admission) -> str:
    """
    Why the connector won, as C{relaygw which-connector} puts it: its
    matching range and that range's size, then each candidate it beat.
    """
    selection = admission.selection
    if selection is None:
        return "connector chosen"
    r = selection.range
    why = [f"connector chosen: remote range {r.text} ({r.size} addresses) on {admission.local}"]
    why += [
        f"beat {c.connector.name}: {c.range.text} ({c.range.size} addresses"
        f"{'' if c.exact_binding else ', wildcard binding'})"
        for c in selection.beaten
    ]
    return "; ".join(why)


def admit(
    state: SessionState,
    services: SessionServices,
    selector: IConnectorSelector,
    transport: ITransport,
) -> Admission:
    """
    Fill C{state} with the client and its connector, start implicit TLS,
    take a connection slot; refusals are logged here.
    """
    host, peer = transport.getHost(), transport.getPeer()
    local_host, local_port = getattr(host, "host", ""), getattr(host, "port", 0)
    local = f"{local_host}:{local_port}"
    state.client_ip = plain_ip(getattr(peer, "host", ""))
    state.client_port = getattr(peer, "port", 0)
    try:
        selection = cast(
            "Selection | None", selector.select(local_host, local_port, getattr(peer, "host", ""))
        )
    except ValueError:  # not an IP transport
        selection = None
    if selection is None:
        _log.warn(
            "connection from {peer} to {local} refused: no connector",
            event="receive.refused", reason="no-connector", local=local, **state.fields(),
        )
        return Admission(None)
    connector = state.connector = selection.connector
    state.policy = Policy(connector, state.config.accepted_domains)
    state.verbose = connector.protocol_logging == "verbose"
    if connector.tls == "implicit":
        options = services.tls_options(connector)
        if options is None:
            _log.error(
                "connection from {peer} closed: connector {connector} has no usable "
                "certificate for implicit TLS",
                event="receive.refused", reason="no-certificate", **state.fields(),
            )
            return Admission(None)
        cast(ITLSTransport, transport).startTLS(cast(IOpenSSLServerConnectionCreator, options))
        state.tls_active = True
    counter = services.connection_counter(connector)
    if not counter.acquire(state.client_ip):
        _log.warn(
            "connection from {peer} refused: connection limit of {connector}",
            event="receive.refused", reason="connection-limit",
            smtp_code=replies.CONNECTION_LIMIT.code, **state.fields(),
        )
        return Admission(None, replies.CONNECTION_LIMIT, local, selection)
    if state.verbose and services.protocol_log is None:
        # Otherwise the disconnect event summarises the session (and the
        # protocol log, when there is one, has the rest).
        _log.info(
            "connection from {peer} accepted by connector {connector}",
            event="receive.connect", local=local, **state.fields(),
        )
    return Admission(counter, local=local, selection=selection)
