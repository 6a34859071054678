"""
MX delivery end to end (issue 7, "Must work" 1): relaygw relays for trusted
devices to Internet domains, looked up in a real dnsmasq; the exchangers are
smtp-sinks on 127.0.0.31-34, all on the route's one port.  A message for a
null-MX domain leaves the queue at once (bounced, never retried).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Launch, gateway_toml, mx_internet, smtp, spool_entries
from tests.servers.dnsmasq import DNSMASQ_MISSING, Dnsmasq, dnsmasq_missing
from tests.servers.ports import free_port, free_ports, wait_until
from tests.servers.sink import SmtpSink

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(dnsmasq_missing(), reason=DNSMASQ_MISSING),
]


def _config(port: int, admin: int, dns: int, mx_port: int) -> str:
    return gateway_toml(admin, default_route="internet") + mx_internet(dns, mx_port) + f"""
[[connectors]]
name = "Devices"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
permissions.anonymous = ["submit", "relay"]
"""


@pytest.fixture(scope="module")
def gateway(
    module_launch: Launch, module_workdir: Path
) -> Iterator[tuple[int, dict[str, SmtpSink], Path]]:
    """relaygw relaying via MX: (SMTP port, sink per exchanger address, workdir)."""
    dns = Dnsmasq(module_workdir / "dns").start()
    mx_port = free_port("127.0.0.32")
    sinks: dict[str, SmtpSink] = {}
    try:
        # 127.0.0.31 (mx1, best preference) stays closed: delivery fails over.
        for host in ("127.0.0.32", "127.0.0.34"):
            sinks[host] = SmtpSink(module_workdir / host, mx_port, host=host, dump=True).start()
        port, admin = free_ports(2)
        module_launch(module_workdir / "gw", _config(port, admin, dns.port, mx_port), [port])
        yield port, sinks, module_workdir / "gw"
    finally:
        for sink in sinks.values():
            sink.stop()
        dns.stop()


def _send(port: int, rcpts: list[str], subject: str) -> None:
    client, code, _ = smtp(port)
    assert code == 220
    client.ehlo("printer.e2e.test")
    refused = client.sendmail(
        "scanner@corp.test", rcpts, f"Subject: {subject}\r\n\r\nvia mx\r\n".encode()
    )
    client.quit()
    assert refused == {}


def _arrived(sink: SmtpSink, subject: str) -> list[bytes]:
    return [m for m in sink.messages() if f"Subject: {subject}".encode() in m]


def test_mx_failover_and_a_fallback(gateway: tuple[int, dict[str, SmtpSink], Path]) -> None:
    """multi.test fails over from the closed mx1 to mx2; aonly.test goes to its A record."""
    port, sinks, gw = gateway
    _send(port, ["alice@multi.test", "bob@aonly.test"], "mx e2e")
    mx2, a_host = sinks["127.0.0.32"], sinks["127.0.0.34"]
    wait_until(lambda: bool(_arrived(mx2, "mx e2e") and _arrived(a_host, "mx e2e")), 30,
               interval=0.1, what="the message at both exchangers")
    [at_mx2] = _arrived(mx2, "mx e2e")
    [at_a] = _arrived(a_host, "mx e2e")
    assert b"<alice@multi.test>" in at_mx2 and b"bob@aonly.test" not in at_mx2
    assert b"<bob@aonly.test>" in at_a and b"alice@multi.test" not in at_a
    wait_until(lambda: not spool_entries(gw / "var" / "spool"), 30, interval=0.1,
               what="the spool to drain")


def test_null_mx_is_not_retried(gateway: tuple[int, dict[str, SmtpSink], Path]) -> None:
    """A null-MX recipient is decided at the first attempt: the entry leaves the spool."""
    port, _, gw = gateway
    _send(port, ["nobody@nullmx.test"], "null mx")
    wait_until(lambda: not spool_entries(gw / "var" / "spool"), 30, interval=0.1,
               what="the null-MX message to leave the spool")
