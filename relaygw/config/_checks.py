"""
Cross-checks over a parsed configuration (SPEC section 2), run by the loader
after every section has been built: names unique, referenced routes defined,
connectors sharing a binding in agreement, no two connectors claiming the same
client on one binding.

Connector names are compared case-insensitively (Exchange refuses two
connectors whose names differ only in case); route names exactly, as they are
references.  Disabled connectors are checked like enabled ones (as
L{find_conflicts} does), so that enabling one cannot make a valid file wrong.
"""

from __future__ import annotations

from relaygw.config._model import Config, Connector
from relaygw.config._table import Source
from relaygw.connectors.selector import find_conflicts


def check(config: Config, src: Source) -> None:
    """
    @raise ConfigError: the first cross-check that fails, at the key path of
        the later of two clashing entries.
    """
    _unique_names(config, src)
    _route_references(config, src)
    _bindings_agree(config.connectors, src)
    for conflict in find_conflicts(config.connectors):
        raise src.error(
            f"connectors[{conflict.connector_index}].remote_ranges[{conflict.range_index}]",
            conflict.problem,
        )


def _unique_names(config: Config, src: Source) -> None:
    seen: dict[str, int] = {}
    for i, connector in enumerate(config.connectors):
        first = seen.setdefault(connector.name.casefold(), i)
        if first != i:
            raise src.error(
                f"connectors[{i}].name",
                f"{connector.name!r} is already the name of connectors[{first}]",
            )
    seen = {}
    for i, route in enumerate(config.routes):
        first = seen.setdefault(route.name, i)
        if first != i:
            raise src.error(
                f"routes[{i}].name", f"{route.name!r} is already the name of routes[{first}]"
            )
    seen = {}
    for i, domain in enumerate(config.accepted_domains):
        first = seen.setdefault(domain.domain, i)
        if first != i:
            raise src.error(
                f"accepted_domains[{i}].domain",
                f"{domain.domain!r} is already listed at accepted_domains[{first}]",
            )


def _route_references(config: Config, src: Source) -> None:
    names = [route.name for route in config.routes]
    listed = ", ".join(repr(n) for n in names) if names else "none"

    def missing(name: str) -> str:
        return f"no route is named {name!r} (the [[routes]] are: {listed})"

    default_route = config.gateway.default_route
    if default_route is not None and default_route not in names:
        raise src.error("gateway.default_route", missing(default_route))
    for i, domain in enumerate(config.accepted_domains):
        if domain.route is None:
            raise src.error(
                f"accepted_domains[{i}].route",
                "required, as there is no gateway.default_route to fall back on",
            )
        if domain.route not in names:
            raise src.error(f"accepted_domains[{i}].route", missing(domain.route))


def _agreement(a: Connector, b: Connector) -> str | None:
    """What two connectors on one binding disagree on, in words, or C{None}."""
    if (a.tls == "implicit") != (b.tls == "implicit"):
        return f'tls = "{b.tls}", and this one has tls = "{a.tls}"; they must agree on implicit TLS'
    if a.proxy_protocol != b.proxy_protocol:
        return (
            f"proxy_protocol = {str(b.proxy_protocol).lower()}, and this one has"
            f" {str(a.proxy_protocol).lower()}; they must agree on proxy_protocol"
        )
    if frozenset(a.trusted_proxies) != frozenset(b.trusted_proxies):
        return "other trusted_proxies; they must agree on trusted_proxies"
    return None


def _bindings_agree(connectors: tuple[Connector, ...], src: Source) -> None:
    for j, later in enumerate(connectors):
        for k, binding in enumerate(later.bindings):
            for i, earlier in enumerate(connectors[:j]):
                for other in earlier.bindings:
                    if not binding.shares_with(other):
                        continue
                    problem = _agreement(later, earlier)
                    if problem is not None:
                        raise src.error(
                            f"connectors[{j}].bindings[{k}]",
                            f"{str(binding)!r} is shared with connector {earlier.name!r}"
                            f" (connectors[{i}], {str(other)!r}), which has {problem}",
                        )
