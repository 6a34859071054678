"""
One gateway with every connector kind of the SPEC (section 2, connectors and
rights), for the open-relay battery and the hostile-command tests (issue 11):

  - C{default}: "Default Frontend", the Exchange-style anonymous connector
    (127.0.0.0/8): anonymous clients may submit to the accepted domains only;
    AUTH (also in plaintext here) gives C{relay};
  - C{submission}: "Client Submission", STARTTLS required, nothing
    anonymous; authenticated users may submit, members of "Relay Users"
    may also relay;
  - C{relay}: "Anonymous Relay", the trusted-IP connector (127.0.9.9 only,
    sharing the Default Frontend's binding: the smaller range wins), whose
    anonymous clients may relay anywhere.

Accepted domains: C{example.test} and C{*.corp.test} (authoritative) and
C{internal.test} (internal relay), all routed to the "inside" smarthost;
every other domain goes to the default route, the "trap" smarthost.  Both
are L{ScriptedSMTP} recorders, so the tests check the envelopes a real
downstream server received, not only the gateway's replies.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from pathlib import Path

import attrs

from relaygw.auth.usersfile import add_user
from tests.e2e.conftest import gateway_toml
from tests.servers.ports import free_ports, wait_until
from tests.servers.relaygw import RelaygwProcess
from tests.servers.scripted_smtp import ScriptedSMTP, Transaction
from tests.servers.smtp_clients import LineClient, Reply, client_context, plain_blob

#: Connector kind -> (connector name, max_recipients).
KINDS = {
    "default": ("Default Frontend", 5),
    "submission": ("Client Submission", 4),
    "relay": ("Anonymous Relay", 6),
}
TRUSTED_IP = "127.0.9.9"
#: The address next to the trusted one: the Default Frontend's.
NEIGHBOUR_IP = "127.0.9.10"
#: (user, password, address); alice is in "Relay Users", bob in no group.
ALICE = ("alice", "Al1ce-Relay-Battery", "alice@example.test")
BOB = ("bob", "B0b-No-Relay-Right", "bob@example.test")
WRONG_PASSWORD = "not-the-password-9"

OK_RCPT = (250, "2.1.5 Recipient OK")
NO_RELAY = (550, "5.7.54 SMTP; Unable to relay recipient in non-accepted domain")
TOO_MANY = (452, "4.5.3 Too many recipients")
BAD_RCPT = (501, "5.1.3 Bad recipient address syntax")

#: Connections per route: below ScriptedSMTP's listen backlog (socketserver's
#: 5), past which a burst of connects waits for a banner that never comes.
_CONCURRENCY = 3
_PROBE = re.compile(rb"^X-Probe: (\S+)\r?$", re.M)


def _config(admin: int, default_port: int, submission_port: int, inside: int, trap: int) -> str:
    limits = {k: n for k, (_, n) in KINDS.items()}
    common = """message_rate_limit = "100000/m"
max_connections_per_ip = 200
auth_throttle = { max_failures = 1000, window = "1s", delay = "0s", max_delay = "0s" }
certificate = "tls/gw.pem"
tls = "starttls"
"""
    return gateway_toml(admin, default_route="trap") + f"""
[users]
file = "users"

[[accepted_domains]]
domain = "example.test"
route = "inside"

[[accepted_domains]]
domain = "*.corp.test"
route = "inside"

[[accepted_domains]]
domain = "internal.test"
type = "internal-relay"
route = "inside"

[[routes]]
name = "inside"
via = "smarthost"
smarthosts = ["127.0.0.1:{inside}"]
tls = "off"
max_concurrency = {_CONCURRENCY}

[[routes]]
name = "trap"
via = "smarthost"
smarthosts = ["127.0.0.1:{trap}"]
tls = "off"
max_concurrency = {_CONCURRENCY}

[[connectors]]
name = "{KINDS['default'][0]}"
bindings = ["127.0.0.1:{default_port}"]
remote_ranges = ["127.0.0.0/8"]
allow_plaintext_auth = true
permissions.anonymous = ["submit", "accept-authoritative-sender"]
permissions.authenticated = ["submit", "relay"]
max_recipients = {limits['default']}
{common}
[[connectors]]
name = "{KINDS['submission'][0]}"
bindings = ["127.0.0.1:{submission_port}"]
remote_ranges = ["127.0.0.0/8"]
require_tls = true
permissions.anonymous = []
permissions.authenticated = ["submit"]
grants = [ {{ group = "Relay Users", rights = ["relay"] }} ]
max_recipients = {limits['submission']}
{common}
[[connectors]]
name = "{KINDS['relay'][0]}"
bindings = ["127.0.0.1:{default_port}"]
remote_ranges = ["{TRUSTED_IP}"]
permissions.anonymous = ["submit", "relay", "accept-any-sender"]
max_recipients = {limits['relay']}
{common}"""


@attrs.define
class Setup:
    """The running gateway and its two downstream recorders."""

    gateway: RelaygwProcess
    ports: dict[str, int]
    inside: ScriptedSMTP
    trap: ScriptedSMTP

    def connect(self, kind: str, source: str | None = None) -> LineClient:
        """A connection to the binding of connector C{kind}, after its 220 banner."""
        if source is None:
            source = TRUSTED_IP if kind == "relay" else "127.0.0.1"
        client = LineClient(self.ports[kind], source=source, timeout=15)
        banner = client.reply()
        assert banner.code == 220, banner
        return client

    def downstream(self) -> Iterator[tuple[str, Transaction]]:
        """Every transaction the recorders completed: C{("inside"|"trap", txn)}."""
        for name, server in (("inside", self.inside), ("trap", self.trap)):
            for txn in server.transactions():
                if txn.data is not None:
                    yield name, txn

    def probes(self) -> dict[str, list[tuple[str, Transaction]]]:
        """Downstream transactions by their C{X-Probe} id (C{""}: without one)."""
        found: dict[str, list[tuple[str, Transaction]]] = {}
        for name, txn in self.downstream():
            assert txn.data is not None
            match = _PROBE.search(txn.data)
            key = match.group(1).decode() if match else ""
            found.setdefault(key, []).append((name, txn))
        return found

    def wait_delivered(self, ids: set[str], timeout: float = 60) -> None:
        """Wait until a message with each probe id reached a recorder."""
        wait_until(lambda: ids <= set(self.probes()), timeout, 0.1,
                   what=f"{len(ids)} probe(s) to arrive downstream")  # fmt: skip


def start(workdir: Path) -> Setup:
    """Start the recorders and the gateway (users alice and bob in its users file)."""
    inside = ScriptedSMTP(lambda _: None).start()
    trap = ScriptedSMTP(lambda _: None).start()
    default_port, submission_port, admin = free_ports(3)
    gw = RelaygwProcess(workdir, _config(admin, default_port, submission_port, inside.port,
                                         trap.port), ports=[default_port, submission_port])
    for (user, password, address), groups in ((ALICE, ["Relay Users"]), (BOB, [])):
        add_user(workdir / "users", user, password, [address], groups)
    gw.start()
    ports = {"default": default_port, "submission": submission_port, "relay": default_port}
    return Setup(gw, ports, inside, trap)


def stop(setup: Setup) -> None:
    """Stop the gateway (by PID), then the recorders; print the gateway's output tail."""
    setup.gateway.stop(timeout=10)
    setup.inside.stop()
    setup.trap.stop()
    lines = setup.gateway.output().splitlines()
    print(f"--- twistd output, last {min(len(lines), 80)} lines ---")
    print("\n".join(lines[-80:]))


# -- dialogue helpers ----------------------------------------------------------


def pair(reply: Reply) -> tuple[int, str]:
    return reply.code, reply.text


def ehlo(client: LineClient, name: str = "relay-tester.example") -> Reply:
    reply = client.command(f"EHLO {name}")
    assert reply.code == 250, reply
    return reply


def starttls(client: LineClient, context: ssl.SSLContext | None = None) -> None:
    """STARTTLS (220), the handshake, and EHLO again."""
    reply = client.command("STARTTLS")
    assert pair(reply) == (220, "2.0.0 SMTP server ready"), reply
    client.starttls(context or client_context())
    ehlo(client)


def auth_plain(client: LineClient, user: str, password: str) -> tuple[int, str]:
    return pair(client.command(f"AUTH PLAIN {plain_blob(user, password)}"))


def message(probe: str, extra: str = "") -> bytes:
    """A small message carrying C{X-Probe: probe}, dot-terminated."""
    return (
        "From: tester@sender.test\r\nTo: undisclosed-recipients:;\r\n"
        f"Subject: relay probe {probe}\r\nX-Probe: {probe}\r\n{extra}\r\n"
        "probe body\r\n.\r\n"
    ).encode()


def gateway_tracebacks(setup: Setup) -> list[str]:
    """Lines of the gateway's output that show an unexpected exception."""
    return [line for line in setup.gateway.output().splitlines()
            if "Traceback" in line or "Unhandled" in line or "unexpected error" in line]
