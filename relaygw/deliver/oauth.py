"""
OAuth 2.0 access tokens for Microsoft 365 routes (issue 9): the client
credentials grant against Entra ID's token endpoint, fetched with treq.

The application proves itself with a client secret (read from
C{client_secret_file} at each fetch, so a rotated secret needs no reload)
or with a certificate: a client assertion, an RS256 JWT whose header names
the certificate by its SHA-1 thumbprint (C{x5t}, the form Microsoft
documents; C{x5t#S256} too) and whose claims are C{aud} (the endpoint),
C{iss} = C{sub} (the client id), C{jti}, C{nbf}, C{iat} and C{exp}.

A token is cached until shortly before it expires (L{refresh_margin});
callers arriving while a fetch is under way share it.  Every failure
(connection, TLS, timeout, an HTTP error, an answer without a usable
token, an unreadable file) is L{TokenUnavailable}, whose message names the
endpoint and what went wrong -- the HTTP status and Entra ID's error code
-- but never the secret, the assertion or a token.

treq's second home (DESIGN section 1, with L{relaygw.deliver.mtasts}).
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from pathlib import Path
from typing import Callable, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from OpenSSL import SSL
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgent
from zope.interface import implementer

from relaygw._types import IServeReactor
from relaygw.deliver._http import Body
from relaygw.config._model import OAuth, Route
from relaygw.deliver.tlspolicy import load_ca_file
from relaygw.interfaces import ITokenSource, TokenUnavailable

__all__ = ["ClientCredentials", "client_assertion", "refresh_margin", "token_source"]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Seconds a client assertion is valid (Microsoft: at most 10 minutes is usual).
ASSERTION_LIFETIME = 600
#: The largest token response read.
MAX_BODY = 64 * 1024
# A token goes into a SASL string and an Authorization header: visible
# ASCII only (a JWT is base64url parts and dots).
_TOKEN = re.compile(r"[\x21-\x7e]+")
_AADSTS = re.compile(r"\bAADSTS\d+\b")
_PRIVATE_KEY = re.compile(
    rb"-----BEGIN (?:RSA )?PRIVATE KEY-----\r?\n.+?\r?\n-----END (?:RSA )?PRIVATE KEY-----",
    re.DOTALL,
)


def refresh_margin(expires_in: float) -> float:
    """
    Seconds before expiry that a cached token is replaced: five minutes, or
    a tenth of its life when that is shorter (so a short-lived token is
    still used for most of it).
    """
    return min(300.0, expires_in / 10)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def client_assertion(
    certificate_pem: bytes,
    key_pem: bytes,
    *,
    client_id: str,
    audience: str,
    now: float,
    jti: str | None = None,
) -> str:
    """
    A client assertion (RFC 7523) as Entra ID takes it for certificate
    credentials.

    @param certificate_pem: the application's certificate (the first PEM
        certificate is used).
    @param key_pem: its RSA private key, unencrypted PEM (PKCS#8 or PKCS#1;
        other blocks in the same data are skipped).
    @param audience: the token endpoint's URL.
    @param now: the time, in POSIX seconds.
    @param jti: the token id; a random UUID by default.
    @raise ValueError: a certificate or key that cannot be used.
    """
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    block = _PRIVATE_KEY.search(key_pem)
    if block is None:
        raise ValueError("no unencrypted PEM private key")
    key = serialization.load_pem_private_key(block.group(0), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the private key is not an RSA key (RS256 needs one)")
    der = certificate.public_bytes(serialization.Encoding.DER)
    header = {
        "alg": "RS256",
        "typ": "JWT",
        "x5t": _b64url(x509_thumbprint(der, hashes.SHA1())),
        "x5t#S256": _b64url(x509_thumbprint(der, hashes.SHA256())),
    }
    issued = int(now)
    claims = {
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": jti or str(uuid.uuid4()),
        "nbf": issued,
        "iat": issued,
        "exp": issued + ASSERTION_LIFETIME,
    }
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


def x509_thumbprint(der: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
    """The digest of a certificate's DER encoding (its "thumbprint")."""
    digest = hashes.Hash(algorithm)
    digest.update(der)
    return digest.finalize()


class _Failed(Exception):
    """A fetch failed; the text is the reason after the endpoint's URL (never a secret)."""


@implementer(ITokenSource)
class ClientCredentials:
    """
    The tokens of one Entra ID application for one scope (L{ITokenSource}).
    """

    _log = Logger()

    def __init__(
        self,
        oauth: OAuth,
        *,
        reactor: IServeReactor,
        route: str = "",
        clock: IReactorTime | None = None,
        agent: IAgent | None = None,
        new_jti: Callable[[], str] | None = None,
    ) -> None:
        """
        @param oauth: the route's C{[routes.oauth]}.
        @param reactor: TCP, TLS and time for the HTTPS requests.
        @param route: the route's name, for the log.
        @param clock: expiry and the request timeout; the reactor by default.
        @param agent: replaces the HTTPS agent trusting C{oauth.ca_file}
            (tests).
        @param new_jti: makes an assertion's C{jti} (tests).
        """
        self._oauth = oauth
        self._reactor = reactor
        self._route = route
        self._clock: IReactorTime = reactor if clock is None else clock
        self._agent = agent
        self._new_jti = new_jti
        self._token: str | None = None
        self._refresh_at = 0.0
        self._waiting: list[Deferred[str]] = []

    def token(self) -> Deferred[str]:
        """See L{ITokenSource.token}."""
        if self._token is not None and self._clock.seconds() < self._refresh_at:
            return succeed(self._token)
        result: Deferred[str] = Deferred()
        self._waiting.append(result)
        if len(self._waiting) == 1:
            Deferred.fromCoroutine(self._fetch()).addBoth(self._fire)
        return result

    def invalidate(self, token: str) -> None:
        """See L{ITokenSource.invalidate}."""
        if token == self._token:
            self._token = None
            self._log.info(
                "OAuth token of route {route} refused upstream; a new one will be fetched",
                route=self._route,
            )

    def _fire(self, result: str | Failure) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if waiter.called:  # cancelled by its caller
                continue
            if isinstance(result, Failure):
                waiter.errback(Failure(result.value))  # type: ignore[no-untyped-call]
            else:
                waiter.callback(result)

    async def _fetch(self) -> str:
        endpoint = self._oauth.token_endpoint
        started = self._clock.seconds()
        try:
            form = self._form(started)
            request = Deferred.fromCoroutine(self._post(form))
            token, expires_in = await request.addTimeout(
                self._oauth.timeout.total_seconds(), self._clock
            )
        except _Failed as e:
            reason = str(e)
        except Exception as e:
            reason = _reason(e, self._oauth.timeout.total_seconds())
        else:
            self._token = token
            self._refresh_at = started + expires_in - refresh_margin(expires_in)
            self._log.info(
                "OAuth token of route {route} fetched from {endpoint}, valid {expires_in}s",
                route=self._route,
                endpoint=endpoint,
                expires_in=expires_in,
            )
            return token
        message = f"token endpoint {endpoint}: {reason}"
        self._log.warn(
            "No OAuth token for route {route}: {reason}", route=self._route, reason=message
        )
        raise TokenUnavailable(message)

    def _form(self, now: float) -> dict[str, str]:
        oauth = self._oauth
        form = {
            "client_id": oauth.client_id,
            "scope": oauth.scope,
            "grant_type": "client_credentials",
        }
        if oauth.client_secret_file is not None:
            secret = _read(oauth.client_secret_file, "client_secret_file").decode(
                "utf-8", "replace"
            ).strip()
            if not secret:
                raise _Failed(f"client_secret_file {oauth.client_secret_file} is empty")
            form["client_secret"] = secret
            return form
        assert oauth.certificate_file is not None and oauth.private_key_file is not None
        certificate = _read(oauth.certificate_file, "certificate_file")
        key = _read(oauth.private_key_file, "private_key_file")
        try:
            assertion = client_assertion(
                certificate,
                key,
                client_id=oauth.client_id,
                audience=oauth.token_endpoint,
                now=now,
                jti=self._new_jti() if self._new_jti is not None else None,
            )
        except ValueError as e:
            # cryptography's messages name what failed, never key material.
            raise _Failed(f"cannot sign the client assertion: {e}") from None
        form["client_assertion_type"] = ASSERTION_TYPE
        form["client_assertion"] = assertion
        return form

    def _http_agent(self) -> IAgent:
        if self._agent is None:
            trust: IOpenSSLTrustRoot | None = None
            if self._oauth.ca_file is not None:
                try:
                    trust = load_ca_file(self._oauth.ca_file)
                except (OSError, ValueError) as e:
                    reason = getattr(e, "strerror", None) or str(e)
                    raise _Failed(f"cannot read ca_file {self._oauth.ca_file}: {reason}") from None
            # None: the system store.
            policy = BrowserLikePolicyForHTTPS(trustRoot=trust)  # type: ignore[no-untyped-call]
            self._agent = cast(IAgent, Agent(  # type: ignore[no-untyped-call]
                self._reactor,  # type: ignore[arg-type]
                contextFactory=policy,
                connectTimeout=self._oauth.timeout.total_seconds(),
            ))
        return self._agent

    async def _post(self, form: dict[str, str]) -> tuple[str, float]:
        headers: dict[bytes | str, bytes | str] = {"Accept": "application/json"}
        response = await HTTPClient(self._http_agent(), data_to_body_producer=Body).post(
            self._oauth.token_endpoint,
            data=form,
            headers=headers,
            allow_redirects=False,
            # treq only times out with it; passed so that it does not import the global reactor.
            reactor=self._reactor,  # type: ignore[arg-type]
        )
        body = await response.content()
        if len(body) > MAX_BODY:
            raise _Failed(f"HTTP {response.code}, an answer larger than {MAX_BODY} bytes")
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if response.code != 200:
            raise _Failed(f"HTTP {response.code}{_error_detail(answer)}")
        if not isinstance(answer, dict):
            raise _Failed("HTTP 200, but the answer is not a JSON object")
        token = answer.get("access_token")
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise _Failed("HTTP 200, but without a usable access_token")
        if str(answer.get("token_type", "")).lower() != "bearer":
            raise _Failed("HTTP 200, but the token_type is not Bearer")
        expires_in = answer.get("expires_in")
        try:
            # The v1 endpoint sends a string, v2 a number.
            seconds = float(cast(str, expires_in))
        except (TypeError, ValueError):
            seconds = 0.0
        if not 0 < seconds < 10 * 365 * 86400 or isinstance(expires_in, bool):
            raise _Failed("HTTP 200, but without a valid expires_in")
        return token, seconds


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        # Only the path and the error's kind, never content.
        raise _Failed(f"cannot read {key} {path}: {e.strerror or type(e).__name__}") from None


def _error_detail(answer: object) -> str:
    """Entra ID's error code and AADSTS number of an error answer (no trace ids, no secrets)."""
    if not isinstance(answer, dict):
        return ""
    parts = []
    error = answer.get("error")
    if isinstance(error, str) and re.fullmatch(r"[a-z_]{1,64}", error):
        parts.append(error)
    description = answer.get("error_description")
    if isinstance(description, str):
        code = _AADSTS.search(description)
        if code is not None:
            parts.append(code.group(0))
    return f" ({', '.join(parts)})" if parts else ""


def _reason(exc: BaseException, timeout: float) -> str:
    """Why a request failed, from the exception's kind (its text may quote a request)."""
    inner = getattr(exc, "reasons", None)  # ResponseNeverReceived and kin
    if inner:
        for failure in inner:
            if isinstance(failure, Failure) and failure.value is not None:
                return _reason(failure.value, timeout)
    if isinstance(exc, (TimeoutError, CancelledError)):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, DNSLookupError):
        return "host name lookup failed"
    if isinstance(exc, VerificationError):
        return "TLS: the certificate does not name the endpoint's host"
    if isinstance(exc, SSL.Error):
        reasons = [str(e[-1]) for e in (exc.args[0] if exc.args and isinstance(exc.args[0], list)
                                        else ()) if isinstance(e, tuple) and e]
        return "TLS: " + ("; ".join(reasons) or "handshake failed")
    if isinstance(exc, ConnectError):
        return "connection failed"
    return type(exc).__name__


def token_source(route: Route, reactor: IServeReactor) -> ITokenSource:
    """
    The token source of C{route} (one with C{oauth}: C{auth = "xoauth2"} or
    C{via = "graph"}).

    @raise ValueError: the route has no C{oauth} table.
    """
    if route.oauth is None:
        raise ValueError(f"route {route.name!r} has no [routes.oauth]")
    return ClientCredentials(route.oauth, reactor=reactor, route=route.name)
