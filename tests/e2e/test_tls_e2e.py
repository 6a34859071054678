"""
TLS per receive connector, end to end (issue 3, "Must work" 1; SPEC sections
2 and 3): the real C{twistd -n relaygw} process, with swaks, C{openssl
s_client} and Python's ssl/socket as clients.

One gateway serves the module:
  - port P (STARTTLS), shared by four connectors chosen by source address:
    "Strict" (127.0.0.0/8, minimum TLS 1.2, certificate file missing so the
    gateway generates a self-signed one), "Legacy Printers" (127.0.10.0/24,
    minimum TLS 1.0, its own configured certificate), "Require TLS"
    (127.0.20.0/24, C{require_tls}) and "Plaintext AUTH" (127.0.30.0/24,
    C{allow_plaintext_auth}, no anonymous submit; one users-file account
    added with C{relaygw user add} before the start);
  - port I: "Implicit" (port 465 style) with its own configured certificate.
Mail for example.test goes to a Maildir; mail for stuck.test to a smarthost
that refuses connections, so its envelope stays in the spool.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509.oid import NameOID

from tests.e2e.conftest import Launch, gateway_toml, maildir_messages
from tests.servers.certs import self_signed
from tests.servers.ports import free_ports, wait_until
from tests.servers.relaygw import RelaygwProcess
from tests.servers.smtp_clients import (
    LineClient,
    client_context,
    pem_certificate,
    plain_blob,
    served_certificate,
    swaks,
    wait_for_banner,
)

pytestmark = pytest.mark.e2e

LEGACY_SOURCE = "127.0.10.5"
REQUIRE_SOURCE = "127.0.20.5"
PLAIN_AUTH_SOURCE = "127.0.30.5"
RELAYGW = Path(sys.executable).parent / "relaygw"
DEVICE = ("mfp7", "Mfp7-Users-File-Pw")
QUEUED = re.compile(r"^<~  250 2\.6\.0 <[^>]+> \[InternalId=([0-9A-Z]+), Hostname=", re.M)
SWAKS_TLS = re.compile(r"^=== TLS started with cipher (TLSv[0-9.]+):([A-Z0-9_-]+):", re.M)


class Gateway:
    """The module's gateway: its process, ports and certificate files."""

    def __init__(self, proc: RelaygwProcess, port: int, implicit_port: int) -> None:
        self.proc = proc
        self.port = port
        self.implicit_port = implicit_port
        self.dir = proc.workdir
        self.generated = self.dir / "tls" / "strict.pem"
        self.legacy = self.dir / "tls" / "legacy.pem"
        self.implicit = self.dir / "tls" / "implicit.pem"


def _connector_pem(path: Path, common_name: str) -> None:
    """A connector certificate file: the certificate, then its key, in one PEM."""
    cert, key = path.with_suffix(".crt"), path.with_suffix(".key")
    self_signed(cert, key, common_name, [common_name, "127.0.0.1"])
    path.write_bytes(cert.read_bytes() + key.read_bytes())
    cert.unlink()
    key.unlink()
    path.chmod(0o600)


def _config(port: int, implicit: int, admin: int, closed: int) -> str:
    return gateway_toml(admin) + f"""
[users]
file = "users"

[[accepted_domains]]
domain = "example.test"
route = "local"

[[accepted_domains]]
domain = "stuck.test"
route = "stuck"

[[routes]]
name = "local"
via = "maildir"
maildir = "var/mail"

[[routes]]
name = "stuck"
via = "smarthost"
smarthosts = ["127.0.0.1:{closed}"]
tls = "off"

[[connectors]]
name = "Strict"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
fqdn = "strict.e2e.test"
certificate = "tls/strict.pem"
min_tls_version = "1.2"
protocol_logging = "verbose"

[[connectors]]
name = "Legacy Printers"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.10.0/24"]
fqdn = "legacy.e2e.test"
certificate = "tls/legacy.pem"
min_tls_version = "1.0"

[[connectors]]
name = "Require TLS"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.20.0/24"]
fqdn = "strict.e2e.test"
certificate = "tls/strict.pem"
require_tls = true

[[connectors]]
name = "Plaintext AUTH"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.30.0/24"]
certificate = "tls/strict.pem"
allow_plaintext_auth = true
permissions.anonymous = []
permissions.authenticated = ["submit"]

[[connectors]]
name = "Implicit"
bindings = ["127.0.0.1:{implicit}"]
remote_ranges = ["127.0.0.0/8"]
fqdn = "implicit.e2e.test"
tls = "implicit"
certificate = "tls/implicit.pem"
"""


@pytest.fixture(scope="module")
def gw(module_launch: Launch, module_workdir: Path) -> Gateway:
    """The module's gateway (see the module docstring)."""
    port, implicit, admin, closed = free_ports(4)
    tls = module_workdir / "tls"
    tls.mkdir()
    _connector_pem(tls / "legacy.pem", "legacy.e2e.test")
    _connector_pem(tls / "implicit.pem", "implicit.e2e.test")
    config = _config(port, implicit, admin, closed)
    proc = module_launch(module_workdir, config, [port, implicit], start=False)
    assert proc.config_path is not None
    added = subprocess.run(
        [str(RELAYGW), "user", "add", "-c", str(proc.config_path), DEVICE[0],
         "--address", "mfp7@example.test"],
        input=DEVICE[1] + "\n", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stdout + added.stderr
    proc.start()
    wait_for_banner(port)
    return Gateway(proc, port, implicit)


def _cn(cert_path: Path) -> str:
    name = pem_certificate(cert_path).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(name[0].value)


def _starttls(client: LineClient, ctx: ssl.SSLContext | None = None) -> None:
    assert client.reply().code == 220
    ehlo = client.command("EHLO client.e2e.test")
    assert ehlo.code == 250 and "STARTTLS" in ehlo.lines, ehlo
    assert client.command("STARTTLS").lines == ["2.0.0 SMTP server ready"]
    client.starttls(ctx or client_context())


# -- certificates ----------------------------------------------------------


def test_missing_certificate_generated_and_served(gw: Gateway) -> None:
    """
    A connector whose certificate file is missing gets a self-signed one
    for its fqdn, written with mode 0600, and STARTTLS serves exactly it.
    """
    assert gw.generated.exists()
    assert gw.generated.stat().st_mode & 0o077 == 0
    assert _cn(gw.generated) == "strict.e2e.test"
    with LineClient(gw.port) as client:
        _starttls(client, client_context(cafile=gw.generated))
        assert served_certificate(client.tls) == pem_certificate(gw.generated)


def test_starttls_serves_connector_certificate(gw: Gateway) -> None:
    """On a shared port, STARTTLS serves the certificate of the connector chosen by source IP."""
    with LineClient(gw.port, source=LEGACY_SOURCE) as client:
        _starttls(client, client_context(cafile=gw.legacy))
        assert served_certificate(client.tls) == pem_certificate(gw.legacy)
        assert client.command("EHLO client.e2e.test").code == 250


def test_implicit_tls_serves_connector_certificate(gw: Gateway) -> None:
    """
    An implicit-TLS connector handshakes before the banner with its own
    certificate, and does not offer STARTTLS inside TLS.
    """
    with LineClient(gw.implicit_port, implicit_tls=client_context(cafile=gw.implicit)) as client:
        assert served_certificate(client.tls) == pem_certificate(gw.implicit)
        banner = client.reply()
        assert banner.code == 220 and banner.text.startswith("implicit.e2e.test"), banner
        ehlo = client.command("EHLO client.e2e.test")
        assert ehlo.code == 250 and "STARTTLS" not in ehlo.lines, ehlo
        assert client.command("STARTTLS").code == 503


def test_swaks_starttls_verified_delivery(gw: Gateway) -> None:
    """
    swaks --tls (verifying the connector's certificate) is accepted over
    STARTTLS and its message reaches the Maildir.
    """
    result = swaks(
        gw.port, "--tls", "--tls-verify", "--tls-ca-path", str(gw.generated),
        "--to", "tls1@example.test", "--header", "Subject: e2e starttls",
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert " -> STARTTLS\n<-  220 2.0.0 SMTP server ready" in out, out
    assert SWAKS_TLS.search(out), out
    assert QUEUED.search(out), out
    wait_until(lambda: maildir_messages(gw.dir / "var" / "mail", "tls1"), 20, what="delivery")


def test_swaks_tls_on_connect(gw: Gateway) -> None:
    """swaks --tls-on-connect (port 465 style) delivers through the implicit connector."""
    result = swaks(
        gw.implicit_port, "--tls-on-connect", "--tls-verify", "--tls-ca-path", str(gw.implicit),
        "--to", "tls2@example.test",
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "STARTTLS" not in out, out
    assert SWAKS_TLS.search(out), out
    assert re.search(r"^<~  220 implicit\.e2e\.test ", out, re.M), out
    assert QUEUED.search(out), out


# -- minimum TLS version on a shared port -------------------------------------


@pytest.mark.parametrize(
    "maximum", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["tls1.0", "tls1.1"]
)
def test_old_client_accepted_by_legacy_connector(gw: Gateway, maximum: ssl.TLSVersion) -> None:
    """A client capped below TLS 1.2 completes STARTTLS on the "1.0" connector."""
    with LineClient(gw.port, source=LEGACY_SOURCE) as client:
        _starttls(client, client_context(maximum=maximum, legacy=True))
        assert client.tls.version() == {
            ssl.TLSVersion.TLSv1: "TLSv1", ssl.TLSVersion.TLSv1_1: "TLSv1.1"
        }[maximum]
        assert client.command("EHLO client.e2e.test").code == 250


@pytest.mark.parametrize(
    "maximum", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["tls1.0", "tls1.1"]
)
def test_old_client_refused_by_strict_connector(gw: Gateway, maximum: ssl.TLSVersion) -> None:
    """The same client fails the handshake on the "1.2" connector sharing the port."""
    with LineClient(gw.port, source="127.0.0.9") as client:
        with pytest.raises(ssl.SSLError):
            _starttls(client, client_context(maximum=maximum, legacy=True))
            client.command("EHLO client.e2e.test")


def _s_client(port: int, source: str, *extra: str) -> subprocess.CompletedProcess[str]:
    # Lines are fed slowly: s_client drops input written before TLS is up.
    script = "sleep 1; printf 'EHLO old.e2e.test\\n'; sleep 0.5; printf 'QUIT\\n'; sleep 0.5"
    feeder = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE)
    try:
        return subprocess.run(
            ["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}",
             "-bind", f"{source}:0", "-tls1", "-cipher", "DEFAULT@SECLEVEL=0", "-crlf",
             "-brief", *extra],
            stdin=feeder.stdout, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        feeder.kill()
        feeder.wait()


def test_openssl_tls1_on_shared_port(gw: Gateway) -> None:
    """
    openssl s_client -tls1 -starttls smtp succeeds (certificate verified) from
    the printers' address and fails with a protocol-version alert from any
    other address on the same port.
    """
    ok = _s_client(gw.port, LEGACY_SOURCE, "-CAfile", str(gw.legacy), "-verify_return_error")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Protocol version: TLSv1\n" in ok.stderr, ok.stderr
    assert "Verification: OK" in ok.stderr, ok.stderr
    assert f"250-legacy.e2e.test Hello [{LEGACY_SOURCE}]" in ok.stdout, ok.stdout

    refused = _s_client(gw.port, "127.0.0.9")
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert "protocol version" in refused.stderr, refused.stderr
    assert "Hello [" not in refused.stdout.split("STARTTLS")[-1], refused.stdout


# -- require_tls and the STARTTLS reset ----------------------------------------


def test_require_tls_refuses_mail_before_starttls(gw: Gateway) -> None:
    """
    On a require_tls connector MAIL before STARTTLS gets 530 5.7.10; after
    STARTTLS and EHLO the same MAIL is accepted.
    """
    with LineClient(gw.port, source=REQUIRE_SOURCE) as client:
        assert client.reply().code == 220
        assert client.command("EHLO client.e2e.test").code == 250
        refused = client.command("MAIL FROM:<device@client.e2e.test>")
        assert (refused.code, refused.text) == (530, "5.7.10 Must issue a STARTTLS command first")
        assert client.command("STARTTLS").code == 220
        client.starttls(client_context())
        assert client.command("EHLO client.e2e.test").code == 250
        ok = client.command("MAIL FROM:<device@client.e2e.test>")
        assert (ok.code, ok.text) == (250, "2.1.0 Sender OK")


def test_starttls_resets_session(gw: Gateway) -> None:
    """
    STARTTLS forgets the greeting and the envelope given before it: MAIL
    right after the handshake needs EHLO again, and after EHLO a RCPT finds
    no sender (the MAIL sent before STARTTLS is gone).
    """
    with LineClient(gw.port) as client:
        assert client.reply().code == 220
        assert client.command("EHLO client.e2e.test").code == 250
        assert client.command("MAIL FROM:<before@client.e2e.test>").code == 250
        assert client.command("STARTTLS").code == 220
        client.starttls(client_context())
        assert client.command("MAIL FROM:<after@client.e2e.test>").code == 503
        ehlo = client.command("EHLO client.e2e.test")
        assert ehlo.code == 250 and "STARTTLS" not in ehlo.lines, ehlo
        rcpt = client.command("RCPT TO:<someone@example.test>")
        assert (rcpt.code, rcpt.text) == (503, "5.5.1 Sender not yet given")


def test_starttls_forgets_plaintext_auth(gw: Gateway) -> None:
    """
    STARTTLS also forgets an AUTH done before it (allow_plaintext_auth): on a
    connector without anonymous submit, MAIL after the handshake gets
    530 5.7.57 until the client authenticates again.
    """
    blob = plain_blob(*DEVICE)
    with LineClient(gw.port, source=PLAIN_AUTH_SOURCE) as client:
        assert client.reply().code == 220
        ehlo = client.command("EHLO client.e2e.test")
        assert "AUTH PLAIN LOGIN" in ehlo.lines and "STARTTLS" in ehlo.lines, ehlo
        assert client.command(f"AUTH PLAIN {blob}").code == 235
        assert client.command("MAIL FROM:<mfp7@example.test>").code == 250
        assert client.command("RSET").code == 250
        assert client.command("STARTTLS").code == 220
        client.starttls(client_context())
        assert client.command("EHLO client.e2e.test").code == 250
        refused = client.command("MAIL FROM:<mfp7@example.test>")
        assert refused.code == 530 and refused.text.startswith("5.7.57 "), refused
        assert client.command(f"AUTH PLAIN {blob}").code == 235
        assert client.command("MAIL FROM:<mfp7@example.test>").code == 250


def test_starttls_injection_discarded(gw: Gateway) -> None:
    """
    Plaintext pipelined after STARTTLS in the same segment (an EHLO and a
    MAIL) is discarded: it gets no reply before or after the handshake, the
    session after TLS has neither greeting nor sender, and the protocol log
    shows the injected commands were never processed.
    """
    with LineClient(gw.port, source="127.0.0.77") as client:
        assert client.reply().code == 220
        assert client.command("EHLO inject.e2e.test").code == 250
        client.send(b"STARTTLS\r\nEHLO evil.e2e.test\r\nMAIL FROM:<evil@injected.example>\r\n")
        assert client.reply().code == 220
        time.sleep(0.3)  # a plaintext reply to the injected commands would be here by now
        client.sock.setblocking(False)
        try:
            leaked = client.sock.recv(4096)
        except BlockingIOError:
            leaked = b""
        client.sock.setblocking(True)
        client.sock.settimeout(15)
        assert leaked == b"", leaked
        client.starttls(client_context())
        # The first reply inside TLS answers this RCPT: no replies to injected commands queued.
        rcpt = client.command("RCPT TO:<someone@example.test>")
        assert (rcpt.code, rcpt.text) == (503, "5.5.2 Send hello first")
        assert client.command("EHLO inject.e2e.test").code == 250
        rcpt = client.command("RCPT TO:<someone@example.test>")
        assert (rcpt.code, rcpt.text) == (503, "5.5.1 Sender not yet given")
        assert client.command("QUIT").code == 221
    output = ""

    def logged_quit() -> bool:
        nonlocal output
        recv = gw.dir / "var" / "log" / "ProtocolLog" / "SmtpReceive"
        output = "".join(p.read_text(errors="replace") for p in sorted(recv.glob("RECV*.LOG")))
        mine = [line for line in output.splitlines() if ",127.0.0.77:" in line]
        return sum(",<,EHLO inject.e2e.test," in line for line in mine) == 2 and any(
            ",-," in line for line in mine)

    # The connector logs verbosely: both real EHLOs appear, the injected lines never do.
    wait_until(logged_quit, 10, what="the session in the protocol log")
    assert "evil" not in output, output[-3000:]
    assert "evil" not in gw.proc.output()


# -- what TLS leaves in the message and the spool --------------------------------


def _received(message: Path) -> str:
    """The first Received header field of a message file, unfolded."""
    head = re.split(r"\r?\n\r?\n", message.read_text(errors="replace"), maxsplit=1)[0]
    unfolded = re.sub(r"\r?\n[ \t]+", " ", head)
    found = re.search(r"^Received: (.*)$", unfolded, re.M)
    assert found, head
    return found.group(1)


def _envelope(gw: Gateway, queue_id: str) -> dict[str, Any]:
    """
    The spooled envelope (JSON) of C{queue_id}, read once it is committed:
    its update C{<id>.upd} when there is one, else the envelope inside the
    entry file C{<id>.msg} (data, envelope, then a 20-octet trailer holding
    the envelope's length).
    """
    queue = gw.dir / "var" / "spool" / "queue"
    path = queue / f"{queue_id}.msg"
    doc: dict[str, Any] = {}

    def readable() -> bool:
        nonlocal doc
        try:
            try:
                doc = json.loads((queue / f"{queue_id}.upd").read_bytes())
                return True
            except FileNotFoundError:
                pass
            raw = path.read_bytes()
            trailer = raw[-20:]
            assert trailer.startswith(b"\n") and trailer.endswith(b" RGWENV1\n"), trailer
            length = int(trailer[1:11])
            doc = json.loads(raw[-20 - length : -20])
        except (FileNotFoundError, ValueError):  # not yet there, or being replaced
            return False
        return True

    wait_until(readable, 10, what=str(path))
    return doc


def test_received_header_names_tls(gw: Gateway) -> None:
    """
    A message received over STARTTLS gets a Received header "with ESMTPS"
    naming the negotiated TLS version and cipher (those swaks reports).
    """
    result = swaks(gw.port, "--tls", "--to", "tls3@example.test")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    found = SWAKS_TLS.search(out)
    assert found, out
    version, cipher = found.groups()
    mail = gw.dir / "var" / "mail"
    wait_until(lambda: maildir_messages(mail, "tls3"), 20, what="delivery to tls3")
    received = _received(maildir_messages(mail, "tls3")[0])
    assert " with ESMTPS id " in received, received
    assert f"(version={version} cipher={cipher})" in received, received


def test_legacy_tls_recorded_in_received_header(gw: Gateway) -> None:
    """A TLS 1.0 session is recorded as such ("version=TLSv1") in the Received header."""
    with LineClient(gw.port, source=LEGACY_SOURCE) as client:
        _starttls(client, client_context(maximum=ssl.TLSVersion.TLSv1, legacy=True))
        negotiated = client.tls.cipher()
        assert negotiated is not None
        cipher = negotiated[0]
        assert client.command("EHLO old.e2e.test").code == 250
        assert client.command("MAIL FROM:<printer@client.e2e.test>").code == 250
        assert client.command("RCPT TO:<tls4@example.test>").code == 250
        assert client.command("DATA").code == 354
        client.send(b"Subject: old printer\r\n\r\nscan\r\n.\r\n")
        assert client.reply().code == 250
    mail = gw.dir / "var" / "mail"
    wait_until(lambda: maildir_messages(mail, "tls4"), 20, what="delivery to tls4")
    received = _received(maildir_messages(mail, "tls4")[0])
    assert " with ESMTPS id " in received, received
    assert f"(version=TLSv1 cipher={cipher})" in received, received


def test_spool_envelope_records_tls(gw: Gateway) -> None:
    """
    The spooled envelope of a message received over TLS records the TLS
    version and cipher (checked on a message its route keeps deferring).
    """
    result = swaks(gw.port, "--tls", "--to", "held@stuck.test")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    tls, queued = SWAKS_TLS.search(out), QUEUED.search(out)
    assert tls and queued, out
    version, cipher = tls.groups()
    doc = _envelope(gw, queued.group(1))
    assert doc["tls"] == {"version": version, "cipher": cipher}, doc


def test_plaintext_message_has_no_tls(gw: Gateway) -> None:
    """Without STARTTLS the envelope records no TLS and the header says plain ESMTP."""
    result = swaks(gw.port, "--to", "plain@stuck.test")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    queued = re.search(r"^<-  250 2\.6\.0 <[^>]+> \[InternalId=([0-9A-Z]+),", out, re.M)
    assert queued, out
    doc = _envelope(gw, queued.group(1))
    assert doc["tls"] is None, doc
    message = gw.dir / "var" / "spool" / "queue" / f"{queued.group(1)}.msg"
    received = _received(message)
    assert " with ESMTP id " in received and "version=" not in received, received
