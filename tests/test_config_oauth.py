"""
Tests for L{relaygw.config._oauth}: a route's C{auth = "xoauth2"} and its
C{[routes.oauth]} table (issue 9), errors in SPEC section 2's form.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from relaygw.config import OAuth, Route
from relaygw.config._load import load_text
from relaygw.errors import ConfigError

BASE = """
[[connectors]]
name = "C"
bindings = ["127.0.0.1:2525"]

[[routes]]
name = "m365"
via = "smarthost"
smarthosts = ["smtp.office365.com:587"]
tls = "verify"
auth_user = "scanner@contoso.com"
"""
OAUTH = """
[routes.oauth]
tenant_id = "contoso.onmicrosoft.com"
client_id = "0d5c4e1a-6f2b-4c7e-9a3d-2b1f8e7c6a59"
client_secret_file = "m365.secret"
"""


def _route(text: str) -> Route:
    return load_text(text, "relaygw.toml", Path("/srv/relaygw")).routes[0]


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        _route(text)
    return str(info.value)


def test_xoauth2_route_defaults() -> None:
    """The endpoint of the tenant, the Exchange Online scope, 10 s, paths resolved."""
    route = _route(BASE + 'auth = "xoauth2"\n' + OAUTH)
    assert route.auth == "xoauth2"
    assert route.oauth == OAuth(
        tenant_id="contoso.onmicrosoft.com",
        client_id="0d5c4e1a-6f2b-4c7e-9a3d-2b1f8e7c6a59",
        token_endpoint="https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token",
        scope="https://outlook.office365.com/.default",
        client_secret_file=Path("/srv/relaygw/m365.secret"),
        timeout=timedelta(seconds=10),
    )


def test_password_is_the_default() -> None:
    """Without auth, a route keeps password AUTH and has no oauth."""
    route = _route(BASE + 'auth_password_file = "pw"\n')
    assert (route.auth, route.oauth) == ("password", None)


def test_certificate_and_overrides() -> None:
    """Certificate credentials, token_endpoint, scope, ca_file and timeout as given."""
    route = _route(BASE + 'auth = "xoauth2"\n' + """
[routes.oauth]
tenant_id = "7f3c1b2a-0000-4000-8000-123456789abc"
client_id = "app"
certificate_file = "app.crt"
private_key_file = "/etc/relaygw/app.key"
token_endpoint = "https://127.0.0.1:8443/t/oauth2/v2.0/token"
scope = "https://example.test/.default"
ca_file = "ca.pem"
timeout = "3s"
""")
    assert route.oauth is not None
    assert route.oauth.certificate_file == Path("/srv/relaygw/app.crt")
    assert route.oauth.private_key_file == Path("/etc/relaygw/app.key")
    assert route.oauth.client_secret_file is None
    assert route.oauth.token_endpoint == "https://127.0.0.1:8443/t/oauth2/v2.0/token"
    assert route.oauth.scope == "https://example.test/.default"
    assert route.oauth.ca_file == Path("/srv/relaygw/ca.pem")
    assert route.oauth.timeout == timedelta(seconds=3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('auth = "xoauth2"\n',
         'routes[0].oauth: auth = "xoauth2" needs the [routes.oauth] table'),
        ('auth = "oauth"\n',
         "routes[0].auth: 'oauth' is not one of \"password\", \"xoauth2\""),
        ('auth_password_file = "pw"\n' + OAUTH,
         'routes[0].oauth: is only used with auth = "xoauth2" or via = "graph"'),
        ('auth = "xoauth2"\nauth_password_file = "pw"\n' + OAUTH,
         'routes[0].auth_password_file: is not used with auth = "xoauth2" (the token replaces it)'),
        ('auth = "xoauth2"\n' + OAUTH.replace('client_secret_file = "m365.secret"\n', ""),
         "routes[0].oauth.client_secret_file: required (or certificate_file and private_key_file)"),
        ('auth = "xoauth2"\n' + OAUTH + 'certificate_file = "c.pem"\n',
         "routes[0].oauth.certificate_file: client_secret_file is set; use a secret or a "
         "certificate, not both"),
        ('auth = "xoauth2"\n' + OAUTH.replace('client_secret_file = "m365.secret"',
                                               'certificate_file = "c.pem"'),
         "routes[0].oauth.private_key_file: certificate_file is set, so its private key is needed"),
        ('auth = "xoauth2"\n' + OAUTH.replace("contoso.onmicrosoft.com", "contoso/../x"),
         "routes[0].oauth.tenant_id: 'contoso/../x' is not a tenant id (a GUID or a domain name)"),
        ('auth = "xoauth2"\n' + OAUTH + 'token_endpoint = "http://login.test/token"\n',
         "routes[0].oauth.token_endpoint: 'http://login.test/token' is not an https:// URL "
         "(the client secret goes to it)"),
        ('auth = "xoauth2"\n' + OAUTH + 'scope = "a b"\n',
         "routes[0].oauth.scope: 'a b' is not one scope (the grant takes one .default scope)"),
        ('auth = "xoauth2"\n' + OAUTH + 'secret = "x"\n',
         "routes[0].oauth.secret: unknown key"),
    ],
)
def test_errors(extra: str, message: str) -> None:
    """Each problem names the file, the key path and the problem."""
    assert _error(BASE + extra) == f"relaygw.toml: {message}"


def test_xoauth2_needs_tls() -> None:
    """A bearer token is never sent in clear: tls must be verify or required."""
    text = BASE.replace('tls = "verify"', 'tls = "opportunistic"') + 'auth = "xoauth2"\n' + OAUTH
    assert _error(text) == (
        'relaygw.toml: routes[0].tls: auth = "xoauth2" needs tls = "verify" or "required" '
        '(this route has tls = "opportunistic")'
    )


def test_xoauth2_needs_the_mailbox() -> None:
    """auth_user names the mailbox the app sends as."""
    text = BASE.replace('auth_user = "scanner@contoso.com"\n', "") + 'auth = "xoauth2"\n' + OAUTH
    assert _error(text) == (
        'relaygw.toml: routes[0].auth_user: auth = "xoauth2" needs the mailbox to send as'
    )


def test_xoauth2_only_on_smarthost_routes() -> None:
    """auth = "xoauth2" on a maildir route is refused."""
    text = """
[[connectors]]
name = "C"
bindings = ["127.0.0.1:2525"]

[[routes]]
name = "m"
via = "maildir"
maildir = "var/mail"
auth = "xoauth2"
"""
    assert _error(text) == (
        'relaygw.toml: routes[0].auth: "xoauth2" is only used with via = "smarthost" '
        '(this route has via = "maildir")'
    )
