"""
Outbound TLS trust (SPEC section 4, route C{tls} and C{ca_file}): the client
context factories handed to C{transport.startTLS}, by server name.

C{"opportunistic"} and C{"required"} encrypt without verifying (as Postfix's
C{may} and C{encrypt} levels); C{"verify"} checks the certificate chain
against the route's C{ca_file} or the system store and the server name with
service-identity.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.error import ConnectionDone, ConnectionLost

from relaygw.deliver._transaction import ClientTLS, TLSOptionsFactory

__all__ = [
    "SYSTEM_TRUST",
    "load_ca_file",
    "tls_failure_reason",
    "tls_options_for",
    "unverified_tls_options",
    "verified_tls_options",
]

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def unverified_tls_options(host: str) -> object:
    """Client TLS for opportunistic and required modes: encryption, no verification."""
    return ssl.CertificateOptions()


def verified_tls_options(trust: IOpenSSLTrustRoot | None = None) -> TLSOptionsFactory:
    """
    Client TLS for C{tls = "verify"}: the certificate must chain to C{trust}
    and name the server (service-identity, through C{optionsForClientTLS},
    which also sends the name as SNI).

    @param trust: the trusted CAs (L{load_ca_file}); C{None} for the
        system store.
    @return: server name -> options; the options of recent names are kept,
        so a context is not built anew per connection.
    """
    root = ssl.platformTrust() if trust is None else trust  # type: ignore[no-untyped-call]

    @functools.lru_cache(maxsize=256)
    def options(name: str) -> object:
        return ssl.optionsForClientTLS(name, trustRoot=root)

    return options


def load_ca_file(path: Path) -> IOpenSSLTrustRoot:
    """
    The PEM certificates of C{path} (a route's C{ca_file}) as a trust root.

    @raise OSError: the file cannot be read.
    @raise ValueError: it holds no certificate, or one that does not parse.
    """
    blocks = _PEM_CERTIFICATE.findall(path.read_bytes())
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    try:
        certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    except SSL.Error:
        raise ValueError(f"{path} holds a certificate that does not parse") from None
    trust = ssl.trustRootFromCertificates  # untyped in Twisted
    root: IOpenSSLTrustRoot = trust(certificates)  # type: ignore[no-untyped-call]
    return root


def tls_options_for(tls: ClientTLS, ca_file: Path | None = None) -> TLSOptionsFactory:
    """
    The TLS options factory of a route: verifying against C{ca_file} (or
    the system store) for C{"verify"}, unverified otherwise.

    @raise OSError: C{ca_file} cannot be read.
    @raise ValueError: C{ca_file} holds no usable certificate.
    """
    if tls != "verify":
        return unverified_tls_options
    return verified_tls_options(None if ca_file is None else load_ca_file(ca_file))


SYSTEM_TRUST = verified_tls_options()


def tls_failure_reason(exc: object, server_name: str) -> str:
    """Why a TLS handshake failed, for the log: OpenSSL's reasons, never a transcript."""
    if isinstance(exc, VerificationError):
        kinds = ", ".join(sorted({type(e).__name__ for e in exc.errors}))
        return f"the certificate does not name {server_name} ({kinds})"
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        reasons = [str(e[-1]) for e in exc.args[0] if isinstance(e, tuple) and e]
        if reasons:
            return "; ".join(reasons)
    if isinstance(exc, (ConnectionDone, ConnectionLost)):
        return "connection closed during the handshake"
    return type(exc).__name__
