"""
Tests for L{relaygw.listen.tls}: self-signed generation, loading PEMs and
real handshakes on loopback with Python's ssl client.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from relaygw.config._model import Connector
from relaygw.listen.tls import (
    ServerTLSOptions,
    TLSSetupError,
    ensure_certificate,
    server_tls_options,
)


def _tempdir(case: SynchronousTestCase) -> Path:
    """A fresh directory removed after the test (trial's mktemp writes under the CWD)."""
    path = Path(tempfile.mkdtemp(prefix="relaygw-tls-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


def _connector(certificate: Path | None, min_tls_version: str = "1.2") -> Connector:
    return Connector(
        name="TLS",
        bindings=(),
        remote_ranges=(),
        fqdn="mx.example.test",
        certificate=certificate,
        min_tls_version=min_tls_version,
    )


class EnsureCertificateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = _tempdir(self) / "tls" / "deep" / "mail.pem"

    def test_generates_missing_file_with_parents_and_mode_0600(self) -> None:
        """A missing PEM is generated, parent directories created, mode 0600."""
        ensure_certificate(self.path, "mail.example.test")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)

    def test_generated_pem_is_certificate_then_key(self) -> None:
        """The file holds the certificate first, then an unencrypted key."""
        ensure_certificate(self.path, "mail.example.test")
        text = self.path.read_text()
        self.assertLess(text.index("BEGIN CERTIFICATE"), text.index("BEGIN PRIVATE KEY"))

    def test_generated_certificate_names_host_and_loopback(self) -> None:
        """
        The certificate is EC P-256, for the host name (CN and SAN DNS) and
        for IP 127.0.0.1.
        """
        ensure_certificate(self.path, "mail.example.test")
        certificate = x509.load_pem_x509_certificate(self.path.read_bytes())
        key = certificate.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        self.assertEqual(key.curve.name, "secp256r1")
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["mail.example.test"])
        self.assertIn("127.0.0.1", [str(a) for a in san.get_values_for_type(x509.IPAddress)])

    def test_existing_file_is_left_alone(self) -> None:
        """An existing file is never overwritten."""
        self.path.parent.mkdir(parents=True)
        self.path.write_text("operator's own\n")
        ensure_certificate(self.path, "mail.example.test")
        self.assertEqual(self.path.read_text(), "operator's own\n")


class ServerTLSOptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = _tempdir(self) / "mail.pem"
        ensure_certificate(self.path, "mail.example.test")

    def test_no_certificate_means_no_options(self) -> None:
        """A connector without a certificate gets None (no STARTTLS)."""
        self.assertIsNone(server_tls_options(_connector(None)))

    def test_cached_per_path_and_version(self) -> None:
        """The same file and minimum share options; another minimum does not."""
        cache = ServerTLSOptions()
        first = cache(_connector(self.path, "1.2"))
        self.assertIs(cache(_connector(self.path, "1.2")), first)
        self.assertIsNot(cache(_connector(self.path, "1.3")), first)

    def test_reload_reads_the_file_again(self) -> None:
        """After reload(), new options are built from the file."""
        cache = ServerTLSOptions()
        first = cache(_connector(self.path))
        cache.reload()
        self.assertIsNot(cache(_connector(self.path)), first)

    def test_missing_file_names_the_file(self) -> None:
        """A missing PEM raises TLSSetupError naming the file."""
        missing = self.path.parent / "absent.pem"
        error = self.assertRaises(TLSSetupError, ServerTLSOptions(), _connector(missing))
        self.assertIn(str(missing), str(error))

    def test_garbage_file_names_the_file(self) -> None:
        """A file without a PEM certificate raises TLSSetupError naming it."""
        self.path.write_text("not a certificate\n")
        error = self.assertRaises(TLSSetupError, ServerTLSOptions(), _connector(self.path))
        self.assertIn(str(self.path), str(error))
        self.assertIn("certificate", str(error))

    def test_certificate_without_key_is_refused(self) -> None:
        """A PEM with a certificate but no key raises TLSSetupError about the key."""
        text = self.path.read_text()
        self.path.write_text(text[: text.index("-----BEGIN PRIVATE KEY")])
        error = self.assertRaises(TLSSetupError, ServerTLSOptions(), _connector(self.path))
        self.assertIn("private key", str(error))

    def test_mismatched_key_is_refused(self) -> None:
        """A key that does not belong to the certificate raises TLSSetupError."""
        other = self.path.parent / "other.pem"
        ensure_certificate(other, "other.example.test")
        mine, theirs = self.path.read_text(), other.read_text()
        cert = mine[: mine.index("-----BEGIN PRIVATE KEY")]
        key = theirs[theirs.index("-----BEGIN PRIVATE KEY") :]
        self.path.write_text(cert + key)
        error = self.assertRaises(TLSSetupError, ServerTLSOptions(), _connector(self.path))
        self.assertIn("does not match", str(error))


class _StartTLSAtOnce(Protocol):
    """Server side: start TLS as soon as connected, then echo."""

    def connectionMade(self) -> None:
        self.transport.startTLS(self.factory.options)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


def _client_context(maximum: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that accepts anything (self-signed) and allows old versions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        # Level 0 on the client too: otherwise OpenSSL 3 itself would refuse
        # to offer TLS 1.0/1.1 and the test would prove nothing about the server.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = maximum
    return context


def _handshake(port: int, context: ssl.SSLContext) -> str:
    """Blocking client: handshake, round-trip a line; return the TLS version."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            tls.sendall(b"ping\r\n")
            assert tls.recv(100) == b"ping\r\n"
            version = tls.version()
            assert version is not None
            return version


class HandshakeTests(TestCase):
    """Real handshakes on loopback through C{transport.startTLS}."""

    timeout = 30

    def setUp(self) -> None:
        self.path = _tempdir(self) / "mail.pem"
        ensure_certificate(self.path, "mail.example.test")

    def _serve(self, min_tls_version: str) -> int:
        from twisted.internet import reactor

        factory = ServerFactory.forProtocol(_StartTLSAtOnce)
        factory.options = ServerTLSOptions()(  # type: ignore[attr-defined]
            _connector(self.path, min_tls_version)
        )
        tcp: IReactorTCP = reactor  # type: ignore[assignment]
        port = tcp.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number: int = port.getHost().port  # type: ignore[attr-defined]
        return number

    def _client(self, port: int, maximum: ssl.TLSVersion) -> Deferred[str]:
        d: Deferred[Any] = threads.deferToThread(_handshake, port, _client_context(maximum))
        return d

    async def _check(self, minimum: str, maximum: ssl.TLSVersion) -> str:
        return await self._client(self._serve(minimum), maximum)

    def test_modern_client_negotiates_tls13(self) -> None:
        """A current client gets TLS 1.3 from a "1.2" connector."""
        d = Deferred.fromCoroutine(self._check("1.2", ssl.TLSVersion.MAXIMUM_SUPPORTED))
        d.addCallback(self.assertEqual, "TLSv1.3")
        return d  # type: ignore[return-value]

    def test_tls11_client_accepted_by_10_connector(self) -> None:
        """
        A client capped at TLS 1.1 completes a handshake with a "1.0"
        connector (the old-printer case; needs OpenSSL security level 0).
        """
        d = Deferred.fromCoroutine(self._check("1.0", ssl.TLSVersion.TLSv1_1))
        d.addCallback(self.assertEqual, "TLSv1.1")
        return d  # type: ignore[return-value]

    def test_tls11_client_refused_by_12_connector(self) -> None:
        """A client capped at TLS 1.1 fails against a "1.2" connector."""
        d = Deferred.fromCoroutine(self._check("1.2", ssl.TLSVersion.TLSv1_1))
        self.assertFailure(d, ssl.SSLError, ConnectionError)
        return d  # type: ignore[return-value]

    def test_tls12_client_refused_by_13_connector(self) -> None:
        """A client capped at TLS 1.2 fails against a "1.3" connector."""
        d = Deferred.fromCoroutine(self._check("1.3", ssl.TLSVersion.TLSv1_2))
        self.assertFailure(d, ssl.SSLError, ConnectionError)
        return d  # type: ignore[return-value]
