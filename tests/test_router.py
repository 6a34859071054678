"""Tests for L{relaygw.route.router}."""

from __future__ import annotations

from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from relaygw.config._model import AcceptedDomain, Config, Gateway, Route
from relaygw.interfaces import IRouter
from relaygw.route.router import Router, routing_domain, split_address


def _config(default_route: str | None = "internet") -> Config:
    return Config(
        source="test",
        gateway=Gateway(
            hostname="gw.example.test",
            spool_dir=Path("/nonexistent/spool"),
            log_dir=Path("/nonexistent/log"),
            default_route=default_route,
        ),
        connectors=(),
        routes=(Route("internet"), Route("local", via="maildir", maildir=Path("/m")), Route("exch")),
        accepted_domains=(
            AcceptedDomain("example.test", route="local"),
            AcceptedDomain("*.corp.test", route="exch"),
            AcceptedDomain("noroute.test"),
        ),
    )


def test_provides_irouter() -> None:
    """Router provides IRouter."""
    assert verifyObject(IRouter, Router(_config()))


def test_accepted_domain_uses_its_route() -> None:
    """A recipient in an accepted domain goes to that domain's route."""
    assert Router(_config()).route("alice@example.test") == "local"


def test_domain_case_and_trailing_dot() -> None:
    """The domain is compared lower-case with one trailing dot stripped."""
    assert Router(_config()).route("alice@EXAMPLE.Test.") == "local"


def test_wildcard_domain() -> None:
    """A subdomain of a wildcard accepted domain takes that entry's route."""
    assert Router(_config()).route("bob@eu.corp.test") == "exch"


def test_accepted_domain_without_route_uses_default() -> None:
    """An accepted domain that names no route falls back to default_route."""
    assert Router(_config()).route("x@noroute.test") == "internet"


def test_other_domain_uses_default_route() -> None:
    """A recipient outside the accepted domains goes to default_route."""
    assert Router(_config()).route("bob@elsewhere.test") == "internet"


def test_no_default_route_raises_lookup_error() -> None:
    """Without a default route, a non-accepted domain has no route: LookupError."""
    with pytest.raises(LookupError):
        Router(_config(default_route=None)).route("bob@elsewhere.test")


def test_accepted_domain_routes_without_default() -> None:
    """Accepted domains still route when there is no default route."""
    assert Router(_config(default_route=None)).route("a@example.test") == "local"


def test_quoted_at_does_not_decide_domain() -> None:
    """An @ inside a quoted local part is not the domain separator."""
    assert Router(_config()).route('"bob@example.test"@elsewhere.test') == "internet"
    assert Router(_config()).route('"a@elsewhere.test"@example.test') == "local"


def test_last_unquoted_at_decides() -> None:
    """The domain follows the last @ outside quotes."""
    assert split_address('"x\\"@y"@example.test') == ('"x\\"@y"', "example.test")
    assert routing_domain("a@b@Example.Test") == "example.test"


def test_address_without_domain() -> None:
    """An address with no @ has an empty domain and takes the default route."""
    assert split_address("postmaster") == ("postmaster", "")
    assert Router(_config()).route("postmaster") == "internet"
