"""
SMTP clients for the end-to-end tests of TLS and AUTH: swaks (the real
command-line client), a small line-oriented client over a raw socket (for
what libraries refuse to send, such as plaintext pipelined after STARTTLS),
TLS contexts (including one capped at TLS 1.0 for old-device tests), the
wire forms of AUTH secrets, and a search of files for them.

Everything connects to loopback only; every read has a timeout.
"""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509

HOST = "127.0.0.1"


def swaks(port: int, *args: str, source: str | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """
    Run C{swaks --server 127.0.0.1:port ARGS} (optionally from C{source})
    and capture its transcript.  Callers check the transcript, not only the
    exit status: without Net::SSLeay swaks skips TLS and still exits 0.
    """
    local = ["--local-interface", source] if source else []
    return subprocess.run(
        ["swaks", "--server", f"{HOST}:{port}", *local, *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def client_context(
    *, cafile: Path | None = None, maximum: ssl.TLSVersion | None = None, legacy: bool = False
) -> ssl.SSLContext:
    """
    A client TLS context.

    @param cafile: verify the server against this certificate (no host name
        check: the tests connect by address); C{None}: no verification.
    @param maximum: the highest TLS version the client offers.
    @param legacy: allow TLS 1.0/1.1 (OpenSSL 3 needs security level 0 for them).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if cafile is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=str(cafile))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1 is deprecated
        if legacy:
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.set_ciphers("DEFAULT@SECLEVEL=0")
        if maximum is not None:
            ctx.maximum_version = maximum
    return ctx


class Reply:
    """One SMTP reply: its code and its lines' texts (after C{NNN-}/C{NNN })."""

    def __init__(self, code: int, lines: list[str]) -> None:
        self.code = code
        self.lines = lines

    @property
    def text(self) -> str:
        """The last line's text (the whole of a one-line reply)."""
        return self.lines[-1] if self.lines else ""

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.lines!r})"


class LineClient:
    """
    A minimal SMTP client over a socket: exact bytes out, replies parsed in.

    @ivar sock: the socket (an L{ssl.SSLSocket} once TLS is on).
    """

    def __init__(self, port: int, *, source: str | None = None, timeout: float = 15,
                 implicit_tls: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.sock: socket.socket = socket.create_connection(
            (HOST, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self._buf = b""
        if implicit_tls is not None:
            self.sock = implicit_tls.wrap_socket(self.sock)

    def send(self, data: bytes) -> None:
        """Send C{data} in one write."""
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unparsed: {self._buf!r}")
            self._buf += chunk
            if len(self._buf) > 1_000_000:
                raise ValueError("reply line too long")
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def reply(self) -> Reply:
        """Read one (possibly multi-line) reply."""
        lines: list[str] = []
        for _ in range(1000):
            raw = self._line().decode("utf-8", "replace")
            lines.append(raw[4:])
            if raw[3:4] != "-":
                return Reply(int(raw[:3]), lines)
        raise ValueError("reply with over 1000 lines")

    def command(self, line: str) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        self.send(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def pending(self) -> bytes:
        """Bytes read beyond the last parsed reply (should be none after STARTTLS)."""
        return self._buf

    def starttls(self, ctx: ssl.SSLContext) -> None:
        """Wrap the socket in TLS (after a 220 to STARTTLS)."""
        assert not self._buf, f"plaintext left over before TLS: {self._buf!r}"
        self.sock = ctx.wrap_socket(self.sock)

    @property
    def tls(self) -> ssl.SSLSocket:
        """The TLS socket (fails when TLS is not on)."""
        assert isinstance(self.sock, ssl.SSLSocket), "TLS is not active"
        return self.sock

    def close(self) -> None:
        """Close the socket (no QUIT)."""
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pem_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file (a connector's chain + key file, or a plain cert)."""
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def served_certificate(sock: ssl.SSLSocket) -> x509.Certificate:
    """The certificate the server presented on C{sock}."""
    der = sock.getpeercert(binary_form=True)
    assert der, "the server presented no certificate"
    return x509.load_der_x509_certificate(der)


def b64(data: bytes | str) -> str:
    """Standard base64 of C{data} (text is UTF-8 encoded)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def plain_blob(user: str, password: str) -> str:
    """The base64 AUTH PLAIN message without an authorization identity."""
    return b64(f"\0{user}\0{password}")


def secret_forms(user: str, password: str) -> list[bytes]:
    """
    Every form in which C{password} travelled on the wire or could be logged:
    the password itself, its base64 (AUTH LOGIN), the PLAIN message with and
    without authorization identity (base64 and decoded).
    """
    forms = {
        password,
        b64(password),
        plain_blob(user, password),
        b64(f"{user}\0{user}\0{password}"),
        f"\0{user}\0{password}",
    }
    return sorted(f.encode("utf-8") for f in forms)


def files_containing(roots: Iterable[Path], needles: Sequence[bytes],
                     exclude: Iterable[Path] = ()) -> list[tuple[str, bytes]]:  # fmt: skip
    """
    (file, needle) for every regular file under C{roots} that contains a
    needle (case-sensitive, and also its JSON-escaped form for NUL bytes).
    """
    skipped = {p.resolve() for p in exclude}
    variants = {n: {n, n.replace(b"\0", b"\\u0000"), n.replace(b"\0", b"\\x00")} for n in needles}
    found: list[tuple[str, bytes]] = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.is_symlink() or path.resolve() in skipped:
                continue
            data = path.read_bytes()
            for needle, forms in variants.items():
                if any(form in data for form in forms):
                    found.append((str(path), needle))
    return found


def wait_for_banner(port: int, timeout: float = 30) -> None:
    """
    Wait until a connection to C{port} is greeted with 220.  A port that
    accepts connections is not yet a serving gateway: twistd binds its
    sockets before the service has started and closes connections until then.
    """
    deadline = time.monotonic() + timeout
    problem = ""
    while time.monotonic() < deadline:
        try:
            with LineClient(port, timeout=5) as client:
                reply = client.reply()
                if reply.code == 220:
                    return
                problem = repr(reply)
        except (OSError, ConnectionError, ValueError) as error:
            problem = str(error)
        time.sleep(0.05)
    raise TimeoutError(f"no 220 banner on port {port} after {timeout:.0f}s: {problem}")
