"""
A small recording ESMTP server on loopback, in the test's own reactor, for
the outbound TLS and AUTH tests: it offers STARTTLS with a certificate from a
throwaway test CA (L{TestCA}), offers AUTH PLAIN and/or LOGIN and checks the
exact SASL strings, and records every session (commands, the decoded AUTH
exchanges, whether TLS was on, the messages).  It can also break the TLS
handshake on purpose (answer STARTTLS with 220, then send non-TLS bytes).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _alt_names(names: Sequence[str]) -> x509.SubjectAlternativeName:
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(alt)


class TestCA:
    """
    A throwaway CA (EC P-256, two days) that issues server certificates.

    @ivar ca_file: its certificate, PEM, for a route's C{ca_file}.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "relaygw test CA") -> None:
        self._dir = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, names: Sequence[str]) -> Path:
        """A server certificate for C{names} (subjectAltName), as one PEM file with its key."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(_alt_names(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        path = self._dir / f"{common_name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + _pem_key(key))
        return path


@define
class Session:
    """
    What one connection did.

    @ivar commands: every command line, in order (AUTH continuation lines as
        sent, base64 included).
    @ivar sasl: the decoded SASL data per AUTH attempt: C{(mechanism,
        [decoded responses])}.
    @ivar tls: whether STARTTLS completed (a command arrived over TLS).
    @ivar authenticated: whether an AUTH succeeded.
    @ivar messages: the DATA of each message, dot-unstuffed, lines joined by CRLF.
    """

    commands: list[bytes] = field(factory=list)
    sasl: list[tuple[bytes, list[bytes]]] = field(factory=list)
    tls: bool = False
    authenticated: bool = False
    messages: list[bytes] = field(factory=list)


class _Protocol(LineReceiver):
    delimiter = b"\r\n"

    def __init__(self, server: RecordingServer) -> None:
        self.server = server
        self.session = Session()
        self._state = "command"
        self._tls_started = False
        self._mechanism = b""
        self._lines: list[bytes] = []

    def connectionMade(self) -> None:
        self.server.sessions.append(self.session)
        self.server._open.add(self)
        self.sendLine(b"220 recording.test ESMTP")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.server._open.discard(self)

    def lineReceived(self, line: bytes) -> None:
        if self._tls_started:
            self.session.tls = True
        if self._state == "data":
            if line == b".":
                self._state = "command"
                self.session.messages.append(b"\r\n".join(self._lines))
                self._lines = []
                self.sendLine(b"250 2.0.0 recorded")
            else:
                self._lines.append(line[1:] if line.startswith(b"..") else line)
            return
        self.session.commands.append(line)
        if self._state == "auth":
            self._auth_line(line)
            return
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        handler = getattr(self, "do_" + verb.decode("ascii", "replace"), None)
        if handler is None:
            self.sendLine(b"502 5.5.2 unknown command")
        else:
            handler(arg)

    def do_EHLO(self, arg: bytes) -> None:
        server = self.server
        lines = [b"recording.test", b"8BITMIME", b"ENHANCEDSTATUSCODES"]
        if server.certificate is not None and not self._tls_started:
            lines.append(b"STARTTLS")
        if server.mechanisms and (self._tls_started or server.auth_in_clear):
            lines.append(b"AUTH " + b" ".join(server.mechanisms))
        for line in lines[:-1]:
            self.sendLine(b"250-" + line)
        self.sendLine(b"250 " + lines[-1])

    def do_HELO(self, arg: bytes) -> None:
        self.sendLine(b"250 recording.test")

    def do_STARTTLS(self, arg: bytes) -> None:
        if self.server.certificate is None or self._tls_started:
            self.sendLine(b"502 5.5.1 no STARTTLS")
            return
        self.sendLine(b"220 2.0.0 go ahead")
        if self.server.break_tls:
            self.transport.write(b"this is not a TLS ServerHello\r\n" * 4)
            self.transport.loseConnection()
            return
        self._tls_started = True
        self.transport.startTLS(self.server.certificate)

    def do_AUTH(self, arg: bytes) -> None:
        mechanism, _, initial = arg.partition(b" ")
        mechanism = mechanism.upper()
        if mechanism not in self.server.mechanisms:
            self.sendLine(b"504 5.5.4 unrecognised mechanism")
            return
        self._mechanism = mechanism
        self.session.sasl.append((mechanism, []))
        self._state = "auth"
        if initial:
            self._auth_line(initial)
        elif mechanism == b"LOGIN":
            self.sendLine(b"334 VXNlcm5hbWU6")
        else:
            self.sendLine(b"334 ")

    def _auth_line(self, line: bytes) -> None:
        try:
            decoded = base64.b64decode(line, validate=True)
        except binascii.Error:
            self._state = "command"
            self.sendLine(b"501 5.5.2 bad base64")
            return
        responses = self.session.sasl[-1][1]
        responses.append(decoded)
        if self._mechanism == b"LOGIN" and len(responses) == 1:
            self.sendLine(b"334 UGFzc3dvcmQ6")
            return
        self._state = "command"
        user, password = self.server.credentials
        if self._mechanism == b"PLAIN":
            ok = decoded == b"\0" + user + b"\0" + password
        else:
            ok = responses == [user, password]
        if ok:
            self.session.authenticated = True
            self.sendLine(b"235 2.7.0 authenticated")
        else:
            self.sendLine(self.server.auth_failure)

    def do_MAIL(self, arg: bytes) -> None:
        if self.server.mechanisms and not self.session.authenticated:
            self.sendLine(b"530 5.7.0 authentication required")
        else:
            self.sendLine(b"250 2.1.0 ok")

    def do_RCPT(self, arg: bytes) -> None:
        self.sendLine(b"250 2.1.5 ok")

    def do_DATA(self, arg: bytes) -> None:
        self._state = "data"
        self.sendLine(b"354 go ahead")

    def do_RSET(self, arg: bytes) -> None:
        self.sendLine(b"250 2.0.0 ok")

    def do_QUIT(self, arg: bytes) -> None:
        self.sendLine(b"221 2.0.0 bye")
        self.transport.loseConnection()


class _Factory(Factory):
    noisy = False

    def __init__(self, server: RecordingServer) -> None:
        self._server = server

    def buildProtocol(self, addr: object) -> _Protocol:
        return _Protocol(self._server)


class RecordingServer:
    """
    The server; L{start} listens on C{127.0.0.1} (a free port), L{stop}
    closes the port and every open connection.

    @param certificate: a PEM file with certificate and key (L{TestCA.issue}
        or C{tests.servers.certs.self_signed}); C{None}: no STARTTLS.
    @param mechanisms: the AUTH mechanisms offered (after TLS, or always with
        C{auth_in_clear}); when any, MAIL needs a successful AUTH first.
    @param credentials: the user and password AUTH accepts.
    @param auth_failure: the reply to wrong credentials.
    @param break_tls: answer STARTTLS with 220, then send non-TLS bytes.
    @ivar sessions: one L{Session} per connection, in order.
    """

    def __init__(
        self,
        *,
        certificate: Path | None = None,
        mechanisms: Sequence[bytes] = (),
        credentials: tuple[bytes, bytes] = (b"", b""),
        auth_in_clear: bool = False,
        auth_failure: bytes = b"535 5.7.8 authentication credentials invalid",
        break_tls: bool = False,
    ) -> None:
        # From the file: CertificateOptions with pyOpenSSL objects warns.
        self.certificate = (
            None
            if certificate is None
            else ssl.DefaultOpenSSLContextFactory(str(certificate), str(certificate))
        )
        self.mechanisms = tuple(m.upper() for m in mechanisms)
        self.credentials = credentials
        self.auth_in_clear = auth_in_clear
        self.auth_failure = auth_failure
        self.break_tls = break_tls
        self.sessions: list[Session] = []
        self._open: set[_Protocol] = set()
        self._port: IListeningPort | None = None

    @property
    def port(self) -> int:
        """The listening port (after L{start})."""
        assert self._port is not None
        port: int = self._port.getHost().port
        return port

    def start(
        self, reactor: IReactorTCP, host: str = "127.0.0.1", port: int = 0
    ) -> RecordingServer:
        """Listen on C{host:port} (by default 127.0.0.1, a free port)."""
        self._port = reactor.listenTCP(port, _Factory(self), interface=host)
        return self

    def stop(self) -> Deferred[object]:
        """Stop listening and drop the connections still open."""
        for proto in list(self._open):
            proto.transport.abortConnection()
        waits: list[Deferred[object]] = []
        if self._port is not None:
            stopped = self._port.stopListening()
            if isinstance(stopped, Deferred):
                waits.append(stopped)
        return DeferredList(waits).addCallback(lambda _: None)
