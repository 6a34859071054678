"""
Recipient address to route name (SPEC section 4, "Routing").  Pure.

Recipients in an accepted domain go to that domain's route (or, when the
domain names none, to C{gateway.default_route}); every other recipient goes
to C{gateway.default_route}.
"""

from __future__ import annotations

from zope.interface import implementer

from relaygw.config._model import Config
from relaygw.interfaces import IRouter
from relaygw.quoting import UnbalancedQuote, unquoted

__all__ = ["Router", "split_address", "routing_domain"]


def split_address(address: str) -> tuple[str, str]:
    """
    Split C{local@domain} at the last C{@} outside double quotes.

    @param address: a recipient as the envelope holds it (quotes and
        backslash escapes of the local part kept).
    @return: C{(local, domain)} as written; C{domain} is C{""} when there is
        no C{@} outside quotes.
    """
    at = -1
    try:
        for i, c in unquoted(address):
            if c == "@":
                at = i
    except UnbalancedQuote:
        pass  # the receive side refuses these; route on what was seen
    if at < 0:
        return address, ""
    return address[:at], address[at + 1 :]


def routing_domain(address: str) -> str:
    """The domain that decides routing: lower-case, one trailing dot stripped."""
    domain = split_address(address)[1].lower()
    return domain[:-1] if domain.endswith(".") else domain


@implementer(IRouter)
class Router:
    """
    Routes recipients by the configuration's accepted domains.

    @ivar _config: the configuration whose accepted domains and default
        route decide.
    """

    def __init__(self, config: Config) -> None:
        """
        @param config: the validated configuration (its route names exist).
        """
        self._config = config

    def route(self, address: str) -> str:
        """
        @param address: a recipient address (local@domain).
        @return: the accepted domain's route, else C{gateway.default_route}.
        @raise LookupError: no accepted domain and no default route apply.
        """
        domain = routing_domain(address)
        entry = self._config.accepted_domain(domain) if domain else None
        if entry is not None and entry.route is not None:
            return entry.route
        default = self._config.gateway.default_route
        if default is None:
            raise LookupError(f"no route for domain {domain!r}")
        return default
