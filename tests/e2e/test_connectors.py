"""
Connector choice by source address, end to end (SPEC section 2, "Choosing the
receive connector"): clients on several 127.x.y.z source addresses, with
swaks (--local-interface) and smtplib (source_address), against the real
twistd process.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import LOCAL_MAILDIR, Launch, gateway_toml, smtp
from tests.servers.ports import free_ports
from tests.servers.relaygw import BIN

pytestmark = pytest.mark.e2e


def _config(port: int, other_port: int, admin: int, closed: int) -> str:
    return gateway_toml(admin, default_route="elsewhere") + LOCAL_MAILDIR + f"""
[[routes]]
name = "elsewhere"
via = "smarthost"
smarthosts = ["127.0.0.1:{closed}"]
tls = "off"

[[connectors]]
name = "Loopback Wide"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/16"]
banner = "{{fqdn}} wide {{connector}}"
tls = "off"

[[connectors]]
name = "Printer 66"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.66"]
banner = "printer {{connector}}"
tls = "off"

[[connectors]]
name = "Scanners"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.5.1-127.0.5.9"]
banner = "scanners {{connector}}"
tls = "off"
permissions.anonymous = ["submit", "relay"]

[[connectors]]
name = "Switched Off"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.7.0/24"]
banner = "disabled {{connector}}"
enabled = false
tls = "off"

[[connectors]]
name = "Other Port"
bindings = ["127.0.0.1:{other_port}"]
remote_ranges = ["127.0.0.0/8"]
banner = "other port {{connector}}"
tls = "off"
"""


@pytest.fixture(scope="module")
def ports(module_launch: Launch, module_workdir: Path) -> tuple[int, int]:
    """One relaygw with the connectors above for the whole module: (port, other port)."""
    port, other, admin, closed = free_ports(4)
    module_launch(module_workdir, _config(port, other, admin, closed), [port, other])
    return port, other


@pytest.mark.parametrize(
    ("source", "banner"),
    [
        ("127.0.0.1", "220 gw.e2e.test wide Loopback Wide"),
        ("127.0.0.66", "220 printer Printer 66"),
        ("127.0.5.5", "220 scanners Scanners"),
        ("127.0.7.7", "220 gw.e2e.test wide Loopback Wide"),
    ],
)
def test_swaks_banner_per_source(ports: tuple[int, int], source: str, banner: str) -> None:
    """
    swaks from each source address is greeted by the connector whose matching
    range is smallest; a disabled connector's range falls to the wider one.
    """
    port, _ = ports
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--local-interface", source,
         "--quit-after", "CONNECT"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )
    assert f"<-  {banner}\n" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("source", "banner"),
    [
        ("127.0.0.9", b"gw.e2e.test wide Loopback Wide"),
        ("127.0.0.66", b"printer Printer 66"),
        ("127.0.5.9", b"scanners Scanners"),
    ],
)
def test_smtplib_banner_per_source(ports: tuple[int, int], source: str, banner: bytes) -> None:
    """smtplib from each source address gets that connector's banner."""
    port, _ = ports
    client, code, text = smtp(port, source)
    try:
        assert (code, text) == (220, banner)
        code, _ = client.ehlo("client.e2e.test")
        assert code == 250
    finally:
        client.close()


def test_port_restricts_candidates(ports: tuple[int, int]) -> None:
    """
    Only connectors bound to the port the client reached are candidates: the
    printer's address on the other port gets the other port's connector.
    """
    _, other = ports
    client, code, text = smtp(other, "127.0.0.66")
    client.close()
    assert (code, text) == (220, b"other port Other Port")


def test_source_in_no_range_is_closed_without_banner(ports: tuple[int, int]) -> None:
    """A client whose address is in no connector's ranges is disconnected with no byte sent."""
    port, _ = ports
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=("127.200.0.1", 0)) as s:
        s.settimeout(10)
        assert s.recv(1024) == b""


@pytest.mark.parametrize(
    ("source", "reply"),
    [
        ("127.0.0.1", (550, b"5.7.54 SMTP; Unable to relay recipient in non-accepted domain")),
        ("127.0.5.5", (250, b"2.1.5 Recipient OK")),
    ],
)
def test_rights_follow_connector(
    ports: tuple[int, int], source: str, reply: tuple[int, bytes]
) -> None:
    """
    The chosen connector's rights apply: relay to another domain is refused on
    the wide connector and allowed on the scanners' connector that grants relay.
    """
    port, _ = ports
    client, _, _ = smtp(port, source)
    try:
        client.ehlo("client.e2e.test")
        assert client.docmd("MAIL", "FROM:<device@client.e2e.test>")[0] == 250
        assert client.docmd("RCPT", "TO:<bob@elsewhere.test>") == reply
    finally:
        client.close()


def test_specific_binding_beside_wildcard(launch: Launch, workdir: Path) -> None:
    """
    Issue 6: equal ranges on 0.0.0.0:P and 127.0.0.2:P start; a client
    reaching 127.0.0.2:P gets the specific binding's connector, one reaching
    127.0.0.1:P the wildcard's, and C{relaygw which-connector} says the same.
    """
    port, admin, closed = free_ports(3)
    config = _config(port, port, admin, closed).split("[[connectors]]")[0] + f"""
[[connectors]]
name = "Any"
bindings = ["0.0.0.0:{port}"]
remote_ranges = ["127.0.0.0/8"]
banner = "any {{connector}}"
tls = "off"

[[connectors]]
name = "Lo2"
bindings = ["127.0.0.2:{port}"]
remote_ranges = ["127.0.0.0/8"]
banner = "lo2 {{connector}}"
tls = "off"
"""
    gateway = launch(workdir, config, [port])
    for local, name in (("127.0.0.2", "Lo2"), ("127.0.0.1", "Any")):
        client = smtplib.SMTP(timeout=20)
        try:
            assert client.connect(local, port) == (220, f"{name.lower()} {name}".encode())
        finally:
            client.close()
        which = subprocess.run(
            [str(BIN / "relaygw"), "which-connector", "-c", str(gateway.config_path),
             "--local", f"{local}:{port}", "--remote", "127.0.0.9"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert (which.returncode, which.stdout.splitlines()[0]) == (0, name), which.stderr
