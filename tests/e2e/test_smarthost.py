"""
The smarthost route end to end (issue 2, "Must work" 6): an accepted domain
routed via smarthost to a real smtp-sink on loopback; with the first listed
smarthost's port closed, the message still arrives through the second.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import Launch, Sinks, gateway_toml, smtp, spool_entries
from tests.servers.ports import free_ports, wait_until
from tests.servers.sink import SmtpSink

pytestmark = pytest.mark.e2e


def _config(port: int, admin: int, sink: int, closed: int) -> str:
    return gateway_toml(admin) + f"""
[[accepted_domains]]
domain = "hub.test"
route = "hub"

[[accepted_domains]]
domain = "failover.test"
route = "failover"

[[routes]]
name = "hub"
via = "smarthost"
smarthosts = ["127.0.0.1:{sink}"]
tls = "off"

[[routes]]
name = "failover"
via = "smarthost"
smarthosts = ["127.0.0.1:{closed}", "127.0.0.1:{sink}"]
tls = "off"

[[connectors]]
name = "Internal"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
"""


@pytest.fixture(scope="module")
def hub(
    module_launch: Launch, module_sinks: Sinks, module_workdir: Path
) -> tuple[int, SmtpSink, Path]:
    """relaygw with two smarthost routes to one smtp-sink: (SMTP port, sink, workdir)."""
    sink = module_sinks(module_workdir / "sink")
    port, admin, closed = free_ports(3)
    module_launch(module_workdir / "gw", _config(port, admin, sink.port, closed), [port])
    return port, sink, module_workdir / "gw"


def _send(port: int, rcpt: str, subject: str) -> None:
    client, code, _ = smtp(port)
    assert code == 220
    client.ehlo("client.e2e.test")
    refused = client.sendmail(
        "sender@client.e2e.test", [rcpt], f"Subject: {subject}\r\n\r\nvia smarthost\r\n".encode()
    )
    client.quit()
    assert refused == {}


def _arrived(sink: SmtpSink, rcpt: str, subject: str) -> bool:
    return any(
        f"Subject: {subject}".encode() in m and f"<{rcpt}>".encode() in m for m in sink.messages()
    )


def test_smarthost_delivers(hub: tuple[int, SmtpSink, Path]) -> None:
    """A message for a domain routed via smarthost arrives at the smarthost and leaves the spool."""
    port, sink, gw = hub
    _send(port, "carol@hub.test", "smarthost plain")
    wait_until(lambda: _arrived(sink, "carol@hub.test", "smarthost plain"), 30, interval=0.1,
               what="the message at smtp-sink")
    [dumped] = [m for m in sink.messages() if b"Subject: smarthost plain" in m]
    assert b"X-Mail-Args: <sender@client.e2e.test>" in dumped
    assert b"by gw.e2e.test" in dumped  # relaygw's own Received header
    wait_until(lambda: not spool_entries(gw / "var" / "spool"), 30, interval=0.1,
               what="the spool to drain")


def test_smarthost_failover_to_second_host(hub: tuple[int, SmtpSink, Path]) -> None:
    """With the first listed smarthost's port closed, the message arrives through the second."""
    port, sink, _ = hub
    _send(port, "dave@failover.test", "smarthost failover")
    wait_until(lambda: _arrived(sink, "dave@failover.test", "smarthost failover"), 30,
               interval=0.1, what="the message at the second smarthost")
