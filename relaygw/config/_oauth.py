"""
The OAuth keys of a route (issue 9): C{auth = "xoauth2"} on a smarthost
route and the C{[routes.oauth]} table it (and C{via = "graph"}) needs.

Defaults an administrator may look for:

  - C{token_endpoint}: Entra ID's v2.0 endpoint of the tenant,
    C{https://login.microsoftonline.com/{tenant_id}/oauth2/v2.0/token}.
  - C{scope}: C{https://outlook.office365.com/.default} (SMTP AUTH) or, for
    C{via = "graph"}, C{https://graph.microsoft.com/.default}: the
    client credentials grant takes only C{.default} scopes.
  - C{timeout}: C{10s} for one token request.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from relaygw.config._model import OAuth, RouteAuth
from relaygw.config._table import Table

__all__ = ["OAUTH_KEYS", "route_auth", "DEFAULT_ENDPOINT", "SMTP_SCOPE", "GRAPH_SCOPE"]

OAUTH_KEYS = (
    "tenant_id", "client_id", "client_secret_file", "certificate_file", "private_key_file",
    "token_endpoint", "scope", "ca_file", "timeout",
)  # fmt: skip
DEFAULT_ENDPOINT = "https://login.microsoftonline.com/{tenant_id}/oauth2/v2.0/token"
SMTP_SCOPE = "https://outlook.office365.com/.default"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"

# A tenant is a GUID or a verified domain (contoso.onmicrosoft.com); either
# goes into the endpoint's path, so nothing else is accepted.
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
_CLIENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def route_auth(
    t: Table, *, via: str, tls: str, auth_user: str, auth_password_file: Path | None
) -> tuple[RouteAuth, OAuth | None]:
    """
    The route's C{auth} and C{oauth}, cross-checked with the keys already read.

    @param t: the route's table (it declares C{auth} and C{oauth}).
    @raise ConfigError: a bad value, or keys that do not go together.
    """
    auth: RouteAuth = t.choice("auth", "password", ("password", "xoauth2"))
    if auth == "xoauth2":
        if via != "smarthost":
            raise t.error(
                "auth", f'"xoauth2" is only used with via = "smarthost" (this route has via = "{via}")'
            )
        if not auth_user:
            raise t.error("auth_user", 'auth = "xoauth2" needs the mailbox to send as')
        if auth_password_file is not None:
            raise t.error(
                "auth_password_file", 'is not used with auth = "xoauth2" (the token replaces it)'
            )
        if tls not in ("required", "verify"):
            # A bearer token is as good as a password: never in clear.
            raise t.error(
                "tls",
                f'auth = "xoauth2" needs tls = "verify" or "required" (this route has tls = "{tls}")',
            )
    table = t.table("oauth", OAUTH_KEYS)
    needed = 'auth = "xoauth2"' if auth == "xoauth2" else 'via = "graph"' if via == "graph" else ""
    if table is None:
        if needed:
            raise t.error("oauth", f"{needed} needs the [routes.oauth] table")
        return auth, None
    if not needed:
        raise t.error("oauth", 'is only used with auth = "xoauth2" or via = "graph"')
    return auth, _oauth(table, via)


def _oauth(t: Table, via: str) -> OAuth:
    tenant = t.required_string("tenant_id")
    if not _TENANT.fullmatch(tenant):
        raise t.error("tenant_id", f"{tenant!r} is not a tenant id (a GUID or a domain name)")
    client = t.required_string("client_id")
    if not _CLIENT.fullmatch(client):
        raise t.error("client_id", f"{client!r} is not an application (client) id")
    endpoint = t.parsed("token_endpoint", _https_url, DEFAULT_ENDPOINT.format(tenant_id=tenant))
    scope = t.string("scope", "") or (GRAPH_SCOPE if via == "graph" else SMTP_SCOPE)
    if any(c.isspace() for c in scope.strip()) or not scope.strip():
        raise t.error("scope", f"{scope!r} is not one scope (the grant takes one .default scope)")
    secret = t.path("client_secret_file", None)
    certificate = t.path("certificate_file", None)
    key = t.path("private_key_file", None)
    if secret is not None and (certificate is not None or key is not None):
        which = "certificate_file" if certificate is not None else "private_key_file"
        raise t.error(which, "client_secret_file is set; use a secret or a certificate, not both")
    if secret is None:
        if certificate is None and key is None:
            raise t.error(
                "client_secret_file", "required (or certificate_file and private_key_file)"
            )
        if certificate is None:
            raise t.error(
                "certificate_file", "private_key_file is set, so the certificate is needed"
            )
        if key is None:
            raise t.error(
                "private_key_file", "certificate_file is set, so its private key is needed"
            )
    return OAuth(
        tenant_id=tenant,
        client_id=client,
        token_endpoint=endpoint,
        scope=scope.strip(),
        client_secret_file=secret,
        certificate_file=certificate,
        private_key_file=key,
        ca_file=t.path("ca_file", None),
        timeout=t.duration("timeout", timedelta(seconds=10)),
    )


def _https_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{text!r} is not an https:// URL (the client secret goes to it)")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r} has a query or fragment; give the endpoint's URL only")
    return text
