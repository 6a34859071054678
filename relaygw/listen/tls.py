"""
Server TLS for receive connectors: the connector's PEM (certificate chain and
key), a self-signed one generated when the file is missing, and the minimum
TLS version per connector.

The options returned are L{twisted.internet.ssl.CertificateOptions}, usable
with C{transport.startTLS} (STARTTLS) and for implicit TLS.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IAcceptableCiphers, ICipher
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

from relaygw.config._model import Connector

__all__ = [
    "TLSSetupError",
    "ServerTLSOptions",
    "ensure_certificate",
    "server_tls_options",
    "tls_version",
]

_log = Logger()

#: How long a generated self-signed certificate is valid.
_SELF_SIGNED_LIFETIME = timedelta(days=5 * 365)

_VERSIONS = {
    "1.0": TLSVersion.TLSv1_0,
    "1.1": TLSVersion.TLSv1_1,
    "1.2": TLSVersion.TLSv1_2,
    "1.3": TLSVersion.TLSv1_3,
}

_PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | dsa.DSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_PRIVATE_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

#: Versions below Twisted's default minimum (TLS 1.2).
_LEGACY = frozenset({"1.0", "1.1"})


class TLSSetupError(Exception):
    """
    A connector's certificate file cannot be used.  The message names the
    file and the problem (never key material).
    """


def tls_version(text: str) -> object:
    """
    @param text: C{"1.0"}, C{"1.1"}, C{"1.2"} or C{"1.3"}.
    @return: the L{TLSVersion} constant.
    @raise ValueError: any other text.
    """
    try:
        return _VERSIONS[text]
    except KeyError:
        raise ValueError(f"unknown TLS version {text!r}") from None


def ensure_certificate(path: Path, hostname: str) -> None:
    """
    Make sure C{path} holds a PEM certificate and key; when the file is
    missing, generate a self-signed EC P-256 certificate for C{hostname}
    (SAN DNS:hostname, IP:127.0.0.1, IP:::1), written as one PEM file
    (certificate, then key) with mode 0600.  Parent directories are created.
    An existing file is never touched.

    @param path: the PEM file.
    @param hostname: the name the certificate is for (a DNS name or an IP).
    @raise TLSSetupError: the file or its directory cannot be written.
    """
    if path.exists():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, _self_signed_pem(hostname))
    except FileExistsError:
        return
    except OSError as error:
        raise TLSSetupError(f"{path}: cannot write a self-signed certificate: {error.strerror}") from None
    _log.info("generated a self-signed certificate for {hostname} in {path}", hostname=hostname, path=str(path))


def _self_signed_pem(hostname: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        names.append(x509.DNSName(hostname))
    for loopback in ("127.0.0.1", "::1"):
        address = ipaddress.ip_address(loopback)
        if x509.IPAddress(address) not in names:
            names.append(x509.IPAddress(address))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + _SELF_SIGNED_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write C{data} to a new file at C{path}, mode 0600, atomically."""
    fd, temporary = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        # link() fails if another process created the file meanwhile: first writer wins.
        os.link(temporary, path)
    finally:
        os.unlink(temporary)


@implementer(IAcceptableCiphers)
class _LegacyCiphers:
    """
    OpenSSL 3 refuses TLS 1.0 and 1.1 handshakes at security level 1 and
    above (their signatures use SHA-1), whatever the protocol options say; so
    a connector whose minimum is 1.0 or 1.1 (old printers) needs level 0.
    Twisted joins the selected ciphers' names into the OpenSSL cipher string,
    so this one "cipher" sets that string.
    """

    def selectCiphers(self, availableCiphers: Iterable[ICipher]) -> tuple[ICipher]:
        return (_CipherString("DEFAULT:@SECLEVEL=0"),)


@implementer(ICipher)
class _CipherString:
    """An OpenSSL cipher string standing in for one L{ICipher}."""

    def __init__(self, fullName: str) -> None:
        self.fullName = fullName


def _load_pem(path: Path) -> tuple[_PrivateKey, x509.Certificate, list[x509.Certificate]]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TLSSetupError(f"{path}: cannot read the certificate file: {error.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSSetupError(f"{path}: no valid PEM certificate in the file") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise TLSSetupError(
            f"{path}: no valid unencrypted PEM private key in the file"
        ) from None
    if not isinstance(key, _PRIVATE_KEY_TYPES):
        raise TLSSetupError(f"{path}: unsupported private key type")
    leaf, *chain = certificates
    return key, leaf, chain


class ServerTLSOptions:
    """
    Server TLS options per connector, cached per (certificate file, minimum
    version) so connectors sharing a certificate share one context.
    L{reload} drops the cache (SIGHUP, certificates renewed on disk).
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[Path, str], CertificateOptions] = {}

    def __call__(self, connector: Connector) -> CertificateOptions | None:
        """
        @param connector: a connector; its C{certificate} and C{min_tls_version}
            are used.
        @return: options for C{transport.startTLS}, or C{None} when the
            connector has no certificate configured.
        @raise TLSSetupError: the file is missing, unreadable or invalid, or
            its key does not match its certificate.
        """
        if connector.certificate is None:
            return None
        key = (connector.certificate, connector.min_tls_version)
        options = self._cache.get(key)
        if options is None:
            options = _build(connector.certificate, connector.min_tls_version)
            self._cache[key] = options
        return options

    def reload(self) -> None:
        """Forget every cached context; the next call reads the files again."""
        self._cache.clear()


def _build(path: Path, min_version: str) -> CertificateOptions:
    private_key, leaf, chain = _load_pem(path)
    minimum = tls_version(min_version)
    kwargs: dict[str, object] = {}
    if min_version in _LEGACY:
        kwargs["insecurelyLowerMinimumTo"] = minimum
        kwargs["acceptableCiphers"] = _LegacyCiphers()
    else:
        kwargs["raiseMinimumTo"] = minimum
    # pyOpenSSL takes cryptography objects directly (its own X509/PKey
    # wrappers are deprecated); Twisted only passes these through.
    options = CertificateOptions(
        privateKey=private_key,  # type: ignore[arg-type]
        certificate=leaf,  # type: ignore[arg-type]
        extraCertChain=chain,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        # Built now so that a key not matching its certificate is reported at
        # start, not at the first STARTTLS.
        options.getContext()
    except SSL.Error:
        raise TLSSetupError(f"{path}: the private key does not match the certificate") from None
    return options


_default = ServerTLSOptions()


def server_tls_options(connector: Connector) -> CertificateOptions | None:
    """
    Options for C{transport.startTLS} for C{connector}, from a process-wide
    cache (see L{ServerTLSOptions}; the service keeps its own instance).

    @return: L{CertificateOptions} with the connector's minimum TLS version,
        or C{None} when the connector has no certificate configured.
    @raise TLSSetupError: the PEM file is missing, unreadable or invalid.
    """
    return _default(connector)
