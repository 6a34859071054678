"""
The OAuth token source (relaygw.deliver.oauth, issue 9): the client
credentials grant's parameters, secret and certificate forms, caching until
shortly before expiry, one fetch for concurrent callers, refresh after a
refusal, and failures as TokenUnavailable whose message never holds a
secret, an assertion or a token.

In memory (treq's RequestTraversalAgent, task.Clock) for the logic; against
the local HTTPS token endpoint (tests/servers/oauth_endpoint.py) with the
real reactor for TLS, the grant as Microsoft documents it, and failures.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from treq.testing import RequestTraversalAgent
from twisted.internet import task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface.verify import verifyObject

from relaygw.config._model import OAuth, Route
from relaygw.deliver.oauth import (
    ASSERTION_TYPE,
    ClientCredentials,
    client_assertion,
    refresh_margin,
    token_source,
)
from relaygw.interfaces import ITokenSource, TokenUnavailable
from tests.servers.oauth_endpoint import OAuthEndpoint, rsa_client_certificate
from tests.servers.ports import free_port
from tests.servers.recording_smtp import TestCA

ENDPOINT = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
CLIENT = "11111111-2222-3333-4444-555555555555"
SCOPE = "https://outlook.office365.com/.default"
SECRET = "s3cr3t~Value.With-Chars_0123456789abcdef"


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _Token(Resource):
    """A scripted token endpoint: records each form, answers from a list."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, list[str]]] = []
        self.content_types: list[str] = []
        self.answers: list[tuple[int, bytes]] = []
        self.held: list[Any] = []
        self.hold = False
        self.count = 0

    def render_POST(self, request: Any) -> Any:
        self.count += 1
        self.content_types.append(request.getHeader("content-type") or "")
        self.forms.append(parse_qs(request.content.read().decode(), keep_blank_values=True))
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        code, body = self.answers.pop(0) if self.answers else self.ok()
        request.setResponseCode(code)
        request.setHeader("content-type", "application/json")
        return body

    def ok(self, expires_in: int = 3599) -> tuple[int, bytes]:
        token = f"eyJ.token-{self.count}.sig"
        return 200, json.dumps(
            {"token_type": "Bearer", "expires_in": expires_in, "access_token": token}
        ).encode()

    def release(self) -> None:
        for request in self.held:
            code, body = self.ok()
            request.setResponseCode(code)
            request.write(body)
            request.finish()
        self.held = []


class MemoryTests(SynchronousTestCase):
    """The token source's logic, over an in-memory agent and a fake clock."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        self.secret_file = self.dir / "m365.secret"
        self.secret_file.write_text(SECRET + "\n")
        self.clock = task.Clock()
        self.resource = _Token()
        self.agent = RequestTraversalAgent(self.resource)

    def source(self, **change: Any) -> ClientCredentials:
        values: dict[str, Any] = dict(
            tenant_id="contoso.onmicrosoft.com", client_id=CLIENT, token_endpoint=ENDPOINT,
            scope=SCOPE, client_secret_file=self.secret_file,
        )
        values.update(change)
        return ClientCredentials(
            OAuth(**values), reactor=self.clock, clock=self.clock,  # type: ignore[arg-type]
            agent=self.agent, route="m365",
        )

    def get(self, source: ClientCredentials) -> str:
        d = source.token()
        self.agent.flush()
        return self.successResultOf(d)

    def refused(self, source: ClientCredentials) -> str:
        d = source.token()
        self.agent.flush()
        message = str(self.failureResultOf(d, TokenUnavailable).value)
        self.assertNotIn(SECRET, message)
        return message

    def test_provides_interface(self) -> None:
        """ClientCredentials provides ITokenSource; token_source builds one for an oauth route."""
        self.assertTrue(verifyObject(ITokenSource, self.source()))
        route = Route("m365", via="smarthost", auth="xoauth2",
                      oauth=OAuth("t", CLIENT, ENDPOINT, SCOPE, client_secret_file=self.secret_file))
        self.assertTrue(verifyObject(ITokenSource, token_source(route, self.clock)))  # type: ignore[arg-type]
        self.assertRaises(ValueError, token_source, Route("x"), self.clock)

    def test_secret_grant_parameters(self) -> None:
        """The secret form posts exactly client_id, scope, grant_type and the file's secret."""
        token = self.get(self.source())
        self.assertEqual(token, "eyJ.token-1.sig")
        self.assertEqual(self.resource.forms, [{
            "client_id": [CLIENT], "scope": [SCOPE], "grant_type": ["client_credentials"],
            "client_secret": [SECRET],
        }])
        self.assertEqual(self.resource.content_types, ["application/x-www-form-urlencoded"])

    def test_secret_file_read_at_each_fetch(self) -> None:
        """A rotated secret is used for the next fetch without a reload."""
        source = self.source()
        self.get(source)
        self.secret_file.write_text("rotated\n")
        self.clock.advance(3600)
        self.get(source)
        self.assertEqual(self.resource.forms[1]["client_secret"], ["rotated"])

    def test_assertion_grant(self) -> None:
        """
        The certificate form posts a client assertion: an RS256 JWT, x5t the
        certificate's SHA-1 thumbprint, signed by its key (checked with the
        certificate's public key), aud the endpoint, iss = sub = client id.
        """
        cert_path, key_path = rsa_client_certificate(self.dir)
        self.clock.advance(1_700_000_000)
        jtis = iter(["jti-1", "jti-2"])
        source = self.source(client_secret_file=None, certificate_file=cert_path,
                             private_key_file=key_path)
        source._new_jti = lambda: next(jtis)
        self.get(source)
        form = {k: v[0] for k, v in self.resource.forms[0].items()}
        self.assertEqual(set(form), {"client_id", "scope", "grant_type",
                                     "client_assertion_type", "client_assertion"})
        self.assertEqual(form["client_assertion_type"], ASSERTION_TYPE)
        head, body, signature = form["client_assertion"].split(".")
        header, claims = json.loads(_b64url_decode(head)), json.loads(_b64url_decode(body))
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        der = certificate.public_bytes(serialization.Encoding.DER)
        sha1, sha256 = hashes.Hash(hashes.SHA1()), hashes.Hash(hashes.SHA256())
        sha1.update(der)
        sha256.update(der)
        self.assertEqual(header["alg"], "RS256")
        self.assertEqual(header["typ"], "JWT")
        self.assertEqual(_b64url_decode(header["x5t"]), sha1.finalize())
        self.assertEqual(_b64url_decode(header["x5t#S256"]), sha256.finalize())
        self.assertEqual(claims, {
            "aud": ENDPOINT, "iss": CLIENT, "sub": CLIENT, "jti": "jti-1",
            "nbf": 1_700_000_000, "iat": 1_700_000_000, "exp": 1_700_000_600,
        })
        public = certificate.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(_b64url_decode(signature), f"{head}.{body}".encode(),
                      padding.PKCS1v15(), hashes.SHA256())

    def test_assertion_key_and_certificate_in_one_file(self) -> None:
        """One PEM holding the certificate and its key serves as both files."""
        cert_path, key_path = rsa_client_certificate(self.dir)
        both = self.dir / "both.pem"
        both.write_bytes(cert_path.read_bytes() + key_path.read_bytes())
        assertion = client_assertion(both.read_bytes(), both.read_bytes(), client_id=CLIENT,
                                     audience=ENDPOINT, now=0)
        self.assertEqual(assertion.count("."), 2)

    def test_assertion_needs_rsa_key(self) -> None:
        """An EC key cannot sign RS256: TokenUnavailable, naming the problem, not the key."""
        from tests.servers.certs import self_signed

        self_signed(self.dir / "ec.crt", self.dir / "ec.key", "ec", ["ec.test"])
        source = self.source(client_secret_file=None, certificate_file=self.dir / "ec.crt",
                             private_key_file=self.dir / "ec.key")
        message = self.refused(source)
        self.assertIn("not an RSA key", message)
        self.assertNotIn("PRIVATE KEY", message)
        self.assertEqual(self.resource.count, 0)

    def test_cached_until_near_expiry(self) -> None:
        """A token of an hour is reused for 55 minutes, then replaced."""
        source = self.source()
        first = self.get(source)
        self.clock.advance(3599 - 300 - 1)
        self.assertEqual(self.get(source), first)
        self.assertEqual(self.resource.count, 1)
        self.clock.advance(1)
        self.assertNotEqual(self.get(source), first)
        self.assertEqual(self.resource.count, 2)

    def test_short_lived_token_margin(self) -> None:
        """A token of 60 s is used for 54 s (a tenth of its life as margin)."""
        self.assertEqual(refresh_margin(3600), 300)
        self.assertEqual(refresh_margin(60), 6)
        source = self.source()
        self.resource.answers.append(self.resource.ok(expires_in=60))
        first = self.get(source)
        self.clock.advance(53.9)
        self.assertEqual(self.get(source), first)
        self.clock.advance(0.1)
        self.assertNotEqual(self.get(source), first)

    def test_concurrent_callers_share_one_fetch(self) -> None:
        """Callers arriving during a fetch wait for it: one request, one token for all."""
        source = self.source()
        self.resource.hold = True
        waiting = [source.token() for _ in range(3)]
        self.agent.flush()
        self.assertEqual(self.resource.count, 1)
        for d in waiting:
            self.assertNoResult(d)
        self.resource.release()
        self.agent.flush()
        tokens = {self.successResultOf(d) for d in waiting}
        self.assertEqual(len(tokens), 1)
        self.assertEqual(self.resource.count, 1)

    def test_invalidate_refetches_once(self) -> None:
        """After invalidate(token) the next call fetches; invalidating a replaced token does not."""
        source = self.source()
        first = self.get(source)
        source.invalidate(first)
        second = self.get(source)
        self.assertNotEqual(first, second)
        self.assertEqual(self.resource.count, 2)
        source.invalidate(first)  # a late refusal of the old token
        self.assertEqual(self.get(source), second)
        self.assertEqual(self.resource.count, 2)

    def test_http_error_names_status_and_code(self) -> None:
        """An error answer: the endpoint, HTTP status, error and AADSTS code; no secret."""
        source = self.source()
        self.resource.answers.append((401, json.dumps({
            "error": "invalid_client",
            "error_description": f"AADSTS7000215: Invalid client secret provided ({SECRET}).",
        }).encode()))
        message = self.refused(source)
        self.assertEqual(message, f"token endpoint {ENDPOINT}: HTTP 401 (invalid_client, AADSTS7000215)")

    def test_server_error(self) -> None:
        """A 5xx without JSON: the status only."""
        self.resource.answers.append((503, b"<html>busy</html>"))
        self.assertEqual(self.refused(self.source()), f"token endpoint {ENDPOINT}: HTTP 503")

    def test_bad_answers(self) -> None:
        """Not JSON, no token, a token with spaces, not Bearer, no expiry: each refused, token unshown."""
        for body, why in (
            (b"not json", "not a JSON object"),
            (b'{"token_type": "Bearer", "expires_in": 10}', "usable access_token"),
            (b'{"token_type": "Bearer", "expires_in": 10, "access_token": "a b"}', "usable access_token"),
            (b'{"token_type": "mac", "expires_in": 10, "access_token": "tok-x"}', "not Bearer"),
            (b'{"token_type": "Bearer", "access_token": "tok-y"}', "valid expires_in"),
            (b'{"token_type": "Bearer", "expires_in": -5, "access_token": "tok-z"}', "valid expires_in"),
        ):
            self.resource.answers.append((200, body))
            message = self.refused(self.source())
            self.assertIn(why, message)
            self.assertNotIn("tok-", message)

    def test_expires_in_as_string(self) -> None:
        """The v1 endpoint's string expires_in is understood."""
        self.resource.answers.append((200, b'{"token_type": "bearer", "expires_in": "3599", "access_token": "t1"}'))
        source = self.source()
        self.assertEqual(self.get(source), "t1")
        self.clock.advance(3000)
        self.assertEqual(self.get(source), "t1")

    def test_timeout(self) -> None:
        """No answer within the timeout: TokenUnavailable, and the next call tries again."""
        source = self.source(timeout=timedelta(seconds=10))
        self.resource.hold = True
        d = source.token()
        self.agent.flush()
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(str(self.failureResultOf(d, TokenUnavailable).value),
                         f"token endpoint {ENDPOINT}: no answer within 10s")
        self.resource.hold = False
        self.assertTrue(self.get(source))

    def test_unreadable_secret_file(self) -> None:
        """A missing secret file: the path and the error, no request sent."""
        self.secret_file.unlink()
        message = self.refused(self.source())
        self.assertIn(f"cannot read client_secret_file {self.secret_file}: No such file", message)
        self.assertEqual(self.resource.count, 0)

    def test_failures_logged_without_secrets(self) -> None:
        """The log of a fetch and of a failure holds neither the secret nor the token."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        source = self.source()
        token = self.get(source)
        self.resource.answers.append((401, b'{"error": "invalid_client"}'))
        source.invalidate(token)
        self.refused(source)
        text = repr(list(events))
        self.assertIn("invalid_client", text)
        self.assertNotIn(SECRET, text)
        self.assertNotIn(token, text)


class EndpointTests(TestCase):
    """Against the local HTTPS token endpoint, with the real reactor."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        self.ca = TestCA(self.dir)
        self.pem = self.ca.issue("login.test", ["127.0.0.1"])
        self.secret_file = self.dir / "secret"
        self.secret_file.write_text(SECRET)

    def endpoint(self, **kwargs: Any) -> OAuthEndpoint:
        endpoint = OAuthEndpoint(self.pem, client_id=CLIENT, **kwargs).start()
        self.addCleanup(endpoint.stop)
        return endpoint

    def source(self, url: str, **change: Any) -> ClientCredentials:
        values: dict[str, Any] = dict(
            tenant_id="contoso.onmicrosoft.com", client_id=CLIENT, token_endpoint=url,
            scope=SCOPE, client_secret_file=self.secret_file, ca_file=self.ca.ca_file,
            timeout=timedelta(seconds=5),
        )
        values.update(change)
        return ClientCredentials(OAuth(**values), reactor=self.reactor, route="m365")

    async def failure(self, source: ClientCredentials) -> str:
        try:
            await source.token()
        except TokenUnavailable as e:
            self.assertNotIn(SECRET, str(e))
            return str(e)
        self.fail("a token was had")

    async def test_secret_grant(self) -> None:
        """The endpoint takes the secret grant as sent, over TLS verified with ca_file."""
        endpoint = self.endpoint(secret=SECRET)
        token = await self.source(endpoint.url).token()
        self.assertEqual(endpoint.issued, [token])
        self.assertEqual(endpoint.refusals, [])

    async def test_assertion_grant(self) -> None:
        """The endpoint verifies the assertion with the registered certificate."""
        cert_path, key_path = rsa_client_certificate(self.dir)
        endpoint = self.endpoint(certificate=cert_path)
        source = self.source(endpoint.url, client_secret_file=None, certificate_file=cert_path,
                             private_key_file=key_path)
        token = await source.token()
        source.invalidate(token)
        second = await source.token()  # a fresh jti: no replay refusal
        self.assertEqual(endpoint.issued, [token, second])
        self.assertEqual(endpoint.refusals, [])

    async def test_wrong_secret(self) -> None:
        """A refused secret: HTTP 401 with Entra ID's codes."""
        endpoint = self.endpoint(secret="another")
        message = await self.failure(self.source(endpoint.url))
        self.assertEqual(message, f"token endpoint {endpoint.url}: HTTP 401 (invalid_client, AADSTS7000215)")

    async def test_endpoint_down(self) -> None:
        """Nothing listening: connection refused; once it listens, a token."""
        port = free_port()
        endpoint = OAuthEndpoint(self.pem, client_id=CLIENT, secret=SECRET, port=port)
        source = self.source(endpoint.url)
        message = await self.failure(source)
        self.assertEqual(message, f"token endpoint {endpoint.url}: connection refused")
        endpoint.start()
        self.addCleanup(endpoint.stop)
        self.assertTrue(endpoint.valid(await source.token()))

    async def test_server_error(self) -> None:
        """A 500 from the endpoint."""
        endpoint = self.endpoint(secret=SECRET)
        endpoint.fail_status = 500
        message = await self.failure(self.source(endpoint.url))
        self.assertEqual(message, f"token endpoint {endpoint.url}: HTTP 500 (temporarily_unavailable, AADSTS90033)")

    async def test_untrusted_certificate(self) -> None:
        """An endpoint whose certificate does not chain to ca_file: a TLS failure, no token."""
        endpoint = self.endpoint(secret=SECRET)
        (self.dir / "other").mkdir()
        other = TestCA(self.dir / "other")
        message = await self.failure(self.source(endpoint.url, ca_file=other.ca_file))
        self.assertTrue(message.startswith(f"token endpoint {endpoint.url}: TLS"), message)
        self.assertEqual(endpoint.issued, [])

    async def test_concurrent_callers(self) -> None:
        """Concurrent callers over the network: one request."""
        endpoint = self.endpoint(secret=SECRET)
        source = self.source(endpoint.url)
        first, second = source.token(), source.token()
        self.assertEqual(await first, await second)
        self.assertEqual(endpoint.requests, 1)
