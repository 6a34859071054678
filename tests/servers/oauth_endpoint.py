"""
A local Entra ID-like token endpoint over HTTPS (issue 9): the client
credentials grant of the Microsoft identity platform's v2.0 endpoint,
checked as Microsoft documents it
(learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow):

  - C{POST /{tenant}/oauth2/v2.0/token}, C{application/x-www-form-urlencoded};
  - C{client_id}, C{scope} (one C{.default} scope), C{grant_type=client_credentials};
  - either C{client_secret}, or C{client_assertion_type =
    urn:ietf:params:oauth:client-assertion-type:jwt-bearer} and a
    C{client_assertion}: an RS256 JWT whose header C{x5t} is the base64url
    SHA-1 thumbprint of the registered certificate, signed by its key, with
    C{aud} the endpoint, C{iss} = C{sub} = the client id, a fresh C{jti},
    and a current C{nbf}/C{exp};
  - no other parameter, none twice.

Answers are Microsoft's: C{{"token_type": "Bearer", "expires_in": N,
"ext_expires_in": N, "access_token": ...}}, and C{400}/C{401} with C{error},
C{error_description} (an AADSTS code) and C{error_codes}.

It runs in its own thread (stdlib C{http.server} over C{ssl}), so it serves
while a test blocks on a gateway process, and also beside a trial test's
reactor.  It can be stopped and started again on the same port (the
endpoint "down"), made to fail with a status, and counts requests.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = ["OAuthEndpoint", "ASSERTION_TYPE", "rsa_client_certificate"]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def rsa_client_certificate(directory: Path, name: str = "relaygw-app") -> tuple[Path, Path]:
    """
    A self-signed RSA certificate and key, as an administrator uploads to an
    Entra ID app registration (C{New-SelfSignedCertificate}).

    @return: the certificate's and the key's PEM files.
    """
    import datetime

    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, code: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store, no-cache")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, error: str, aadsts: int, text: str) -> None:
        self.server.owner._refused(f"{error}: {text}")
        self._answer(code, {
            "error": error,
            "error_description": f"AADSTS{aadsts}: {text} Trace ID: {secrets.token_hex(8)}",
            "error_codes": [aadsts],
        })

    def do_GET(self) -> None:
        self._error(405, "invalid_request", 900561, "The endpoint only accepts POST requests.")

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        with owner.lock:
            owner.requests += 1
            status = owner.fail_status
            expires_in = owner.expires_in
        if status is not None:
            self._answer(status, {"error": "temporarily_unavailable",
                                  "error_description": "AADSTS90033: A transient error."})
            return
        if self.path != owner.path:
            self._error(404, "invalid_request", 90002, f"Tenant of {self.path} not found.")
            return
        media = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if media != "application/x-www-form-urlencoded":
            self._error(400, "invalid_request", 900144, f"Wrong content type {media!r}.")
            return
        try:
            form = parse_qs(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            self._error(400, "invalid_request", 900144, "The request body must be a form.")
            return
        problem = owner._check(form)
        if problem is not None:
            code, error, aadsts, text = problem
            self._error(code, error, aadsts, text)
            return
        token = owner._issue()
        self._answer(200, {"token_type": "Bearer", "expires_in": expires_in,
                           "ext_expires_in": expires_in, "access_token": token})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: OAuthEndpoint


class OAuthEndpoint:
    """
    Serve the token endpoint of C{tenant} on 127.0.0.1 (port 0: any) until
    L{stop}.

    @param pem: the server certificate and key (L{TestCA.issue} for
        C{127.0.0.1}).
    @param secret: the registered client secret, or C{None}.
    @param certificate: the registered certificate's PEM file, or C{None}.
    @param scope: the scope the app may ask for.
    @ivar requests: token requests received (any outcome).
    @ivar issued: the tokens handed out, in order.
    @ivar refusals: why requests were refused (the grant was not as documented).
    @ivar fail_status: answer every request with this HTTP status (C{None}: serve).
    @ivar expires_in: the C{expires_in} of the next tokens.
    """

    __test__ = False

    def __init__(
        self,
        pem: Path,
        *,
        client_id: str = "11111111-2222-3333-4444-555555555555",
        tenant: str = "contoso.onmicrosoft.com",
        secret: str | None = None,
        certificate: Path | None = None,
        scope: str = "https://outlook.office365.com/.default",
        expires_in: int = 3599,
        port: int = 0,
    ) -> None:
        self.client_id = client_id
        self.tenant = tenant
        self.secret = secret
        self.scope = scope
        self.expires_in = expires_in
        self.path = f"/{tenant}/oauth2/v2.0/token"
        self.lock = threading.Lock()
        self.requests = 0
        self.issued: list[str] = []
        self.refusals: list[str] = []
        self.fail_status: int | None = None
        self._jtis: set[str] = set()
        self._certificate: x509.Certificate | None = None
        if certificate is not None:
            self._certificate = x509.load_pem_x509_certificate(certificate.read_bytes())
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(pem))
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The token endpoint's URL, for a route's C{token_endpoint}."""
        return f"https://127.0.0.1:{self._port}{self.path}"

    def start(self) -> OAuthEndpoint:
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.owner = self
        server.socket = self._context.wrap_socket(server.socket, server_side=True)
        self._port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (the endpoint is down until L{start})."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def valid(self, token: str) -> bool:
        """Whether C{token} was issued here."""
        with self.lock:
            return token in self.issued

    def wait_requests(self, count: int, timeout: float = 20.0) -> int:
        """Wait until at least C{count} requests came; the number seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.requests >= count:
                    return self.requests
            time.sleep(0.05)
        return self.requests

    # -- in the handler threads ------------------------------------------------

    def _refused(self, why: str) -> None:
        with self.lock:
            self.refusals.append(why)

    def _issue(self) -> str:
        # A JWT-shaped opaque string, as Entra ID's tokens look to a client.
        token = "eyJ0eXAiOiJKV1QifQ." + secrets.token_urlsafe(48) + "." + secrets.token_urlsafe(32)
        with self.lock:
            self.issued.append(token)
        return token

    def _check(self, form: dict[str, list[str]]) -> tuple[int, str, int, str] | None:
        for name, values in form.items():
            if len(values) != 1:
                return 400, "invalid_request", 90015, f"Parameter {name} given twice."
        fields = {name: values[0] for name, values in form.items()}
        if fields.get("grant_type") != "client_credentials":
            return 400, "unsupported_grant_type", 70003, "The grant type must be client_credentials."
        if fields.get("client_id") != self.client_id:
            return 400, "unauthorized_client", 700016, "Application not found in the directory."
        if fields.get("scope") != self.scope:
            return 400, "invalid_scope", 1002012, f"The scope {fields.get('scope')!r} is not valid."
        common = {"grant_type", "client_id", "scope"}
        if "client_secret" in fields:
            if set(fields) != common | {"client_secret"}:
                return 400, "invalid_request", 90014, f"Unexpected parameters {sorted(fields)}."
            if self.secret is None or fields["client_secret"] != self.secret:
                return 401, "invalid_client", 7000215, "Invalid client secret provided."
            return None
        if set(fields) != common | {"client_assertion_type", "client_assertion"}:
            return 400, "invalid_request", 7000218, "client_assertion or client_secret is required."
        if fields["client_assertion_type"] != ASSERTION_TYPE:
            return 400, "invalid_request", 70002, "Wrong client_assertion_type."
        problem = self._check_assertion(fields["client_assertion"])
        return None if problem is None else (401, "invalid_client", 700027, problem)

    def _check_assertion(self, assertion: str) -> str | None:
        if self._certificate is None:
            return "No certificate is registered for the application."
        try:
            head, claims_part, signature = assertion.split(".")
            header = json.loads(_b64url_decode(head))
            claims = json.loads(_b64url_decode(claims_part))
        except ValueError:
            return "The client assertion is not a JWT."
        der = self._certificate.public_bytes(serialization.Encoding.DER)
        thumb = hashes.Hash(hashes.SHA1())
        thumb.update(der)
        expected = base64.urlsafe_b64encode(thumb.finalize()).rstrip(b"=").decode()
        if header.get("alg") != "RS256" or header.get("typ") != "JWT":
            return f"Unexpected JWT header {header}."
        if header.get("x5t") != expected:
            return "The x5t thumbprint does not match the registered certificate."
        key = self._certificate.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        try:
            key.verify(_b64url_decode(signature), f"{head}.{claims_part}".encode(),
                       padding.PKCS1v15(), hashes.SHA256())
        except Exception:
            return "The client assertion's signature is invalid."
        now = time.time()
        if claims.get("aud") != self.url:
            return f"Wrong audience {claims.get('aud')!r}."
        if claims.get("iss") != self.client_id or claims.get("sub") != self.client_id:
            return "iss and sub must be the client id."
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            return "No jti."
        with self.lock:
            if jti in self._jtis:
                return "The jti was used before (replay)."
            self._jtis.add(jti)
        nbf, exp = claims.get("nbf"), claims.get("exp")
        if not isinstance(nbf, int) or not isinstance(exp, int):
            return "nbf and exp must be numbers."
        if nbf > now + 300 or exp < now - 300 or exp <= nbf:
            return "The client assertion is not valid now."
        return None
