"""
The keys of a C{via = "graph"} route (issue 9): C{graph_endpoint} and
C{mailbox}.  The C{[routes.oauth]} table it needs is checked by
L{relaygw.config._oauth}.

Defaults an administrator may look for:

  - C{graph_endpoint}: C{https://graph.microsoft.com} (the global service;
    national clouds have their own, e.g. C{https://graph.microsoft.us}).
  - C{mailbox}: absent, each message is sent from the envelope sender's own
    mailbox (C{POST /users/{sender}/sendMail}).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from relaygw.config._table import Table
from relaygw.config._units import parse_hostname

__all__ = ["GRAPH_KEYS", "DEFAULT_GRAPH_ENDPOINT", "graph_route"]

GRAPH_KEYS = ("graph_endpoint", "mailbox")
DEFAULT_GRAPH_ENDPOINT = "https://graph.microsoft.com"


def graph_route(t: Table, via: str) -> tuple[str, str | None]:
    """
    The route's C{graph_endpoint} and C{mailbox}.

    @param t: the route's table (it declares L{GRAPH_KEYS} and C{tls}).
    @raise ConfigError: a bad value, or a key that does not go with C{via}.
    """
    if via != "graph":
        for key in GRAPH_KEYS:
            if t.has(key):
                raise t.error(key, f'is only used with via = "graph" (this route has via = "{via}")')
        return DEFAULT_GRAPH_ENDPOINT, None
    if t.has("tls"):
        raise t.error("tls", 'is not used with via = "graph" (HTTPS, always verified)')
    endpoint = t.parsed("graph_endpoint", _endpoint, DEFAULT_GRAPH_ENDPOINT)
    mailbox = t.parsed("mailbox", _mailbox, None)
    return endpoint, mailbox


def _endpoint(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{text!r} is not an https:// URL (the access token goes to it)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{text!r}: give the service's base URL only, like https://graph.microsoft.com")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"{text!r} has an invalid port") from None
    return text.rstrip("/")


def _mailbox(text: str) -> str:
    local, at, domain = text.strip().rpartition("@")
    bad = not at or not local or any(c.isspace() or c in '<>"(),;:\\/?#%' for c in local)
    if not bad:
        try:
            domain = parse_hostname(domain).lower()
        except ValueError:
            bad = True
    if bad:
        raise ValueError(f"{text!r} is not a mailbox address (user@example.com)")
    return f"{local}@{domain}"
