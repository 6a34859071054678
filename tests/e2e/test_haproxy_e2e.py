"""
PROXY protocol behind a real HAProxy, end to end (issue 8, "Must work" 5 and
the HAProxy tests; SPEC sections 2 and 7).

Two C{twistd -n relaygw} gateways (C{gw1}, C{gw2}) serve the module, each
with PROXY connectors on its SMTP port that trust only 127.0.0.9 (the
address HAProxy connects from, C{source 127.0.0.9}):

  - "Wide" (127.0.0.0/8), "Printer 66" (127.0.0.66), "Scanners"
    (127.0.5.1-127.0.5.9) and "Proxy Itself" (127.0.0.9), banners naming the
    gateway and the connector;
  - an implicit-TLS port with "TLS Wide" and "TLS Printer" (127.0.0.66).

One HAProxy (C{send-proxy-v2}, an SMTP banner check whose connections carry
v2 LOCAL headers) spreads clients over both; a second one checks C{GET
/health} on the admin ports, for the fail-over test.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from attrs import frozen

from tests.e2e.conftest import LOCAL_MAILDIR, Launch, gateway_toml, smtp
from tests.servers.haproxy import (
    HAPROXY_MISSING,
    Backend,
    HAProxy,
    haproxy_binary,
    haproxy_missing,
)
from tests.servers.ports import free_ports, wait_until
from tests.servers.relaygw import RelaygwProcess
from tests.servers.smtp_clients import LineClient

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(haproxy_missing(), reason=HAPROXY_MISSING),
]

PROXY_SOURCE = "127.0.0.9"
HEADER_TIMEOUT = 10.0
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _config(name: str, port: int, tls_port: int, admin: int) -> str:
    trust = f'proxy_protocol = true\ntrusted_proxies = ["{PROXY_SOURCE}"]\n'
    proxied = trust + 'tls = "off"\n'
    starttls = trust + 'tls = "starttls"\n'
    implicit = trust + 'tls = "implicit"\n'
    return gateway_toml(admin, hostname=f"{name}.e2e.test") + LOCAL_MAILDIR + f"""
[[connectors]]
name = "Wide"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
banner = "{{fqdn}} wide {{connector}}"
{proxied}
[[connectors]]
name = "Printer 66"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.66"]
banner = "{{fqdn}} printer {{connector}}"
{starttls}
[[connectors]]
name = "Scanners"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.5.1-127.0.5.9"]
banner = "{{fqdn}} scanners {{connector}}"
{proxied}
[[connectors]]
name = "Proxy Itself"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["{PROXY_SOURCE}"]
banner = "{{fqdn}} proxy {{connector}}"
{proxied}
[[connectors]]
name = "TLS Wide"
bindings = ["127.0.0.1:{tls_port}"]
remote_ranges = ["127.0.0.0/8"]
banner = "{{fqdn}} tls {{connector}}"
{implicit}
[[connectors]]
name = "TLS Printer"
bindings = ["127.0.0.1:{tls_port}"]
remote_ranges = ["127.0.0.66"]
banner = "{{fqdn}} tls {{connector}}"
{implicit}"""


@frozen
class Gateway:
    name: str
    port: int
    tls_port: int
    admin: int
    proc: RelaygwProcess


@frozen
class Pool:
    """The module's two gateways and the HAProxy with the SMTP check in front of them."""

    gateways: tuple[Gateway, Gateway]
    haproxy: HAProxy
    workdir: Path


@pytest.fixture(scope="module")
def pool(module_launch: Launch, module_workdir: Path) -> Iterator[Pool]:
    gateways = []
    for name in ("gw1", "gw2"):
        port, tls_port, admin = free_ports(3)
        proc = module_launch(
            module_workdir / name, _config(name, port, tls_port, admin), [port, tls_port]
        )
        gateways.append(Gateway(name, port, tls_port, admin, proc))
    front = free_ports(1)[0]
    haproxy = HAProxy(
        module_workdir / "haproxy-smtp", front, [Backend(g.port) for g in gateways],
        proxy="v2", check="smtp", source=PROXY_SOURCE,
    ).start()
    try:
        haproxy.wait_for("b1", "UP")
        haproxy.wait_for("b2", "UP")
        yield Pool((gateways[0], gateways[1]), haproxy, module_workdir)
    finally:
        haproxy.stop()
        print(f"--- haproxy log ---\n{haproxy.log()[-4000:]}")


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the peer sends until it closes; fails when it stays open past C{timeout}."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data
    except socket.timeout:
        raise AssertionError(f"still open after {timeout} s, having sent {data!r}") from None


def _connect(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def _banner(port: int, source: str) -> str:
    client, code, text = smtp(port, source)
    try:
        assert code == 220, (code, text)
        code, reply = client.ehlo("client.e2e.test")
        assert code == 250, reply
        fqdn = text.decode().split(" ")[0]
        assert reply.decode().startswith(fqdn), (text, reply)
        return text.decode()
    finally:
        client.close()


@pytest.mark.parametrize(
    ("source", "kind", "connector"),
    [
        ("127.0.0.1", "wide", "Wide"),
        ("127.0.0.66", "printer", "Printer 66"),
        ("127.0.5.5", "scanners", "Scanners"),
        ("127.1.2.3", "wide", "Wide"),
    ],
)
def test_client_gets_its_own_connector_through_haproxy(
    pool: Pool, source: str, kind: str, connector: str
) -> None:
    """
    Through HAProxy (send-proxy-v2, round robin), each client is served by
    the connector of its own address on both gateways, not by the proxy's.
    """
    seen = set()
    for _ in range(4):
        text = _banner(pool.haproxy.front_port, source)
        fqdn, rest = text.split(" ", 1)
        assert rest == f"{kind} {connector}", text
        seen.add(fqdn)
    assert seen == {"gw1.e2e.test", "gw2.e2e.test"}


def test_starttls_through_haproxy(pool: Pool) -> None:
    """STARTTLS on a PROXY port: TLS runs under the connector chosen by the header's source."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with LineClient(pool.haproxy.front_port, source="127.0.0.66") as client:
        banner = client.reply()
        assert banner.code == 220 and banner.text.endswith(" printer Printer 66"), banner
        assert client.command("EHLO client.e2e.test").code == 250
        assert client.command("STARTTLS").code == 220
        client.starttls(context)
        ehlo = client.command("EHLO client.e2e.test")
        assert ehlo.code == 250, ehlo
        assert ehlo.lines[0].startswith(banner.text.split(" ")[0]), ehlo
        assert "127.0.0.66" in ehlo.lines[0], ehlo
        assert client.tls.version() in ("TLSv1.2", "TLSv1.3")


def test_v1_header_through_haproxy(pool: Pool) -> None:
    """
    With send-proxy (v1, text) the client's address arrives too; HAProxy's
    SMTP checks then carry its own addresses, served by "Proxy Itself".
    """
    front = free_ports(1)[0]
    gateways = pool.gateways
    v1 = HAProxy(
        pool.workdir / "haproxy-v1", front, [Backend(g.port) for g in gateways],
        proxy="v1", check="smtp", source=PROXY_SOURCE,
    ).start()
    try:
        v1.wait_for("b1", "UP")
        v1.wait_for("b2", "UP")
        banners = {_banner(front, "127.0.5.9") for _ in range(4)}
        assert banners == {
            "gw1.e2e.test scanners Scanners", "gw2.e2e.test scanners Scanners"
        }
    finally:
        v1.stop()


def test_haproxy_health_checks_are_local_headers(pool: Pool) -> None:
    """
    HAProxy's SMTP checks (v2 LOCAL headers) keep both servers UP: they are
    served as connections from the proxy itself, by "Proxy Itself".
    """
    assert pool.haproxy.states() == {"b1": "UP", "b2": "UP"}
    sock = _connect(pool.gateways[0].port, PROXY_SOURCE)
    with sock:
        sock.sendall(V2_SIGNATURE + b"\x20\x00\x00\x00" + b"QUIT\r\n")
        data = _read_until_closed(sock, 10)
    assert data.startswith(b"220 gw1.e2e.test proxy Proxy Itself\r\n221 "), data


def test_untrusted_direct_connection_closed_without_a_byte(pool: Pool) -> None:
    """A client reaching a PROXY port directly (not from 127.0.0.9) is closed, nothing sent, logged."""
    gateway = pool.gateways[0]
    sock = _connect(gateway.port, "127.0.0.66")
    with sock:
        local = sock.getsockname()
        sock.sendall(b"PROXY TCP4 127.0.0.9 127.0.0.1 1 25\r\nEHLO x\r\n")
        assert _read_until_closed(sock, 10) == b""
    line = f"connection from {local[0]}:{local[1]} to 127.0.0.1:{gateway.port} closed without a reply"
    wait_until(lambda: line in gateway.proc.output(), 10, 0.1, "the refusal in the log")


def test_trusted_peer_without_header_closed_after_timeout(pool: Pool) -> None:
    """The trusted proxy's connection without a header is closed after 10 s, nothing sent."""
    sock = _connect(pool.gateways[1].port, PROXY_SOURCE)
    with sock:
        sock.sendall(b"PROXY TCP4 127.0.0.66")  # never completed
        assert _read_until_closed(sock, HEADER_TIMEOUT + 10) == b""
    # Logged by whichever receiving process held the connection (a worker's
    # events reach the gateway's log a pipe hop later).
    wait_until(lambda: "no complete PROXY header within 10 s" in pool.gateways[1].proc.output(),
               10, 0.1, "the timeout in the log")


def test_implicit_tls_after_the_header(pool: Pool) -> None:
    """
    On an implicit-TLS PROXY port the header comes first and TLS after it,
    even with the ClientHello in the same segment as the header; the
    connector is the header source's.
    """
    gateway = pool.gateways[0]
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=False)
    header = V2_SIGNATURE + b"\x21\x11" + struct.pack(
        "!H4s4sHH", 12, socket.inet_aton("127.0.0.66"), socket.inet_aton("127.0.0.1"),
        40000, gateway.tls_port,
    )
    sock = _connect(gateway.tls_port, PROXY_SOURCE)
    with sock:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        sock.sendall(header + outgoing.read())
        banner = b""
        for _ in range(100):
            data = sock.recv(65536)
            assert data, f"closed during TLS; got {banner!r}"
            incoming.write(data)
            try:
                if not banner:
                    tls.do_handshake()
                banner += tls.read(65536)
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                sock.sendall(outgoing.read())
            if banner.endswith(b"\r\n"):
                break
    assert banner == b"220 gw1.e2e.test tls TLS Printer\r\n"
    assert tls.version() in ("TLSv1.2", "TLSv1.3")


# -- fail-over on /health -------------------------------------------------------


def _health(admin: int) -> int | None:
    """The status of C{GET /health}, or C{None} when the gateway serves none."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/health", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return None if error.code == 404 else error.code
    except OSError:
        return None


class _ReadOnly:
    """
    A directory made read-only for the gateway: a read-only bind mount as
    root (permission bits do not stop root), permission bits otherwise.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mounted = False

    def __enter__(self) -> _ReadOnly:
        if os.geteuid() == 0:
            subprocess.run(["mount", "--bind", str(self.path), str(self.path)], check=True)
            self._mounted = True
            subprocess.run(
                ["mount", "-o", "remount,bind,ro", str(self.path)], check=True
            )
        else:
            for p in [self.path, *self.path.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._mounted:
            subprocess.run(["umount", str(self.path)], check=False)
        else:
            for p in [self.path, *self.path.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o755)


def test_read_only_spool_fails_health_and_haproxy_moves_sessions(pool: Pool) -> None:
    """
    With one gateway's spool read-only its /health answers 503, HAProxy
    (option httpchk GET /health on the admin port) takes it out, and new
    sessions all go to the other gateway; back to writable, it returns.
    """
    gw1, gw2 = pool.gateways
    if _health(gw1.admin) is None or _health(gw2.admin) is None:
        pytest.xfail("the gateways serve no GET /health on admin_listen yet (issue 8 item 3)")
    front = free_ports(1)[0]
    checked = HAProxy(
        pool.workdir / "haproxy-http", front,
        [Backend(gw1.port, gw1.admin), Backend(gw2.port, gw2.admin)],
        proxy="v2", check="http", source=PROXY_SOURCE,
    ).start()
    try:
        checked.wait_for("b1", "UP")
        checked.wait_for("b2", "UP")
        spool = gw1.proc.workdir / "var" / "spool"
        with _ReadOnly(spool):
            wait_until(lambda: _health(gw1.admin) == 503, 20, 0.2, "gw1's /health to fail")
            checked.wait_for("b1", "DOWN")
            banners = [_banner(front, "127.0.0.66") for _ in range(6)]
            assert banners == ["gw2.e2e.test printer Printer 66"] * 6
        wait_until(lambda: _health(gw1.admin) == 200, 20, 0.2, "gw1's /health to recover")
        checked.wait_for("b1", "UP")
        seen = {_banner(front, "127.0.0.66").split(" ")[0] for _ in range(4)}
        assert seen == {"gw1.e2e.test", "gw2.e2e.test"}
    finally:
        checked.stop()
        print(f"--- haproxy (http check) log ---\n{checked.log()[-4000:]}")


def test_sample_haproxy_cfg_is_valid() -> None:
    """etc/haproxy.cfg passes haproxy's own configuration check (samples cannot rot)."""
    sample = Path(__file__).resolve().parents[2] / "etc" / "haproxy.cfg"
    checked = subprocess.run(
        [haproxy_binary() or "haproxy", "-c", "-f", str(sample)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
