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

L{start} with C{extended=True} adds the kinds of L{EXTENDED_KINDS}: a PROXY
binding (trusting only L{PROXY_SOURCE}, where a real HAProxy with
C{send-proxy-v2} in front of it connects from) with "Proxied Frontend" and
"Proxied Relay" (the trusted IP as the header gives it), and an implicit-TLS
binding with "Implicit Submission" (anonymous C{submit} only, without
C{accept-authoritative-sender}) and "Implicit Relay"; plus C{kiosk.test}
(authoritative, C{validate_recipients}) and the user karl.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from pathlib import Path

import attrs

from relaygw.auth.usersfile import add_user
from tests.e2e.conftest import gateway_toml
from tests.servers.haproxy import Backend, HAProxy
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
#: Kind -> (connector name, max_recipients) of the C{extended} gateway's
#: further connectors; the "proxied" kinds are reached through HAProxy.
EXTENDED_KINDS = {
    "proxied": ("Proxied Frontend", 5),
    "proxied-relay": ("Proxied Relay", 6),
    "implicit": ("Implicit Submission", 4),
    "implicit-relay": ("Implicit Relay", 6),
}
TRUSTED_IP = "127.0.9.9"
#: The one address the PROXY binding trusts: HAProxy's own source address.
PROXY_SOURCE = "127.0.0.9"
#: The address next to the trusted one: the Default Frontend's.
NEIGHBOUR_IP = "127.0.9.10"
#: (user, password, address); alice is in "Relay Users", bob in no group.
ALICE = ("alice", "Al1ce-Relay-Battery", "alice@example.test")
BOB = ("bob", "B0b-No-Relay-Right", "bob@example.test")
#: The C{extended} gateway's user of the validated domain kiosk.test (no group).
KARL = ("karl", "K4rl-Kiosk-Validated", "karl@kiosk.test")
WRONG_PASSWORD = "not-the-password-9"

OK_RCPT = (250, "2.1.5 Recipient OK")
NO_RELAY = (550, "5.7.54 SMTP; Unable to relay recipient in non-accepted domain")
TOO_MANY = (452, "4.5.3 Too many recipients")
BAD_RCPT = (501, "5.1.3 Bad recipient address syntax")

#: Connections per route: below ScriptedSMTP's listen backlog (socketserver's
#: 5), past which a burst of connects waits for a banner that never comes.
_CONCURRENCY = 3
_PROBE = re.compile(rb"^X-Probe: (\S+)\r?$", re.M)


def _config(admin: int, default_port: int, submission_port: int, inside: int, trap: int,
            extended: dict[str, int] | None = None) -> str:
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
{common}""" + (_extended_config(common, **extended) if extended else "")


def _extended_config(common: str, proxy: int, implicit: int) -> str:
    """The C{extended} gateway's further domain and connectors (L{EXTENDED_KINDS})."""
    limits = {k: n for k, (_, n) in EXTENDED_KINDS.items()}
    proxied = common + f'proxy_protocol = true\ntrusted_proxies = ["{PROXY_SOURCE}"]\n'
    implicit_tls = common.replace('tls = "starttls"', 'tls = "implicit"')
    return f"""
[[accepted_domains]]
domain = "kiosk.test"
route = "inside"
validate_recipients = true

[[connectors]]
name = "{EXTENDED_KINDS['proxied'][0]}"
bindings = ["127.0.0.1:{proxy}"]
remote_ranges = ["127.0.0.0/8"]
allow_plaintext_auth = true
permissions.anonymous = ["submit", "accept-authoritative-sender"]
permissions.authenticated = ["submit", "relay"]
max_recipients = {limits['proxied']}
{proxied}
[[connectors]]
name = "{EXTENDED_KINDS['proxied-relay'][0]}"
bindings = ["127.0.0.1:{proxy}"]
remote_ranges = ["{TRUSTED_IP}"]
permissions.anonymous = ["submit", "relay", "accept-any-sender"]
max_recipients = {limits['proxied-relay']}
{proxied}
[[connectors]]
name = "{EXTENDED_KINDS['implicit'][0]}"
bindings = ["127.0.0.1:{implicit}"]
remote_ranges = ["127.0.0.0/8"]
permissions.anonymous = ["submit"]
permissions.authenticated = ["submit"]
grants = [ {{ group = "Relay Users", rights = ["relay"] }} ]
max_recipients = {limits['implicit']}
{implicit_tls}
[[connectors]]
name = "{EXTENDED_KINDS['implicit-relay'][0]}"
bindings = ["127.0.0.1:{implicit}"]
remote_ranges = ["{TRUSTED_IP}"]
permissions.anonymous = ["submit", "relay", "accept-any-sender"]
max_recipients = {limits['implicit-relay']}
{implicit_tls}"""


@attrs.define
class Setup:
    """The running gateway and its two downstream recorders."""

    gateway: RelaygwProcess
    ports: dict[str, int]
    inside: ScriptedSMTP
    trap: ScriptedSMTP
    #: The HAProxy instances in front of the PROXY binding (C{extended}):
    #: C{"v2"} (send-proxy-v2) and C{"v1"} (send-proxy).
    haproxies: dict[str, HAProxy] = attrs.Factory(dict)

    def connect(self, kind: str, source: str | None = None) -> LineClient:
        """
        A connection to the binding of connector C{kind} (the "proxied"
        kinds through HAProxy, the "implicit" ones over TLS), after its
        220 banner; from the trusted IP for the relay kinds by default.
        """
        if source is None:
            source = TRUSTED_IP if kind.endswith("relay") else "127.0.0.1"
        tls = client_context() if kind.startswith("implicit") else None
        client = LineClient(self.ports[kind], source=source, timeout=15, implicit_tls=tls)
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

    def wait_recipients(self, probe: str, count: int, timeout: float = 60) -> None:
        """
        Wait until C{count} recipients of probe C{probe} arrived downstream,
        over every route (each route delivers its part on its own schedule).
        """
        def arrived() -> int:
            return sum(len(t.accepted) for _, t in self.probes().get(probe, []))

        wait_until(lambda: arrived() >= count, timeout, 0.1,
                   what=f"{count} recipient(s) of {probe} to arrive downstream")  # fmt: skip


def start(workdir: Path, *, extended: bool = False) -> Setup:
    """
    Start the recorders and the gateway (users alice and bob in its users
    file); with C{extended}, also the L{EXTENDED_KINDS} connectors, karl, and
    the two HAProxy instances in front of the PROXY binding.  The port of
    kind C{"proxy-direct"} is that binding itself (no HAProxy).
    """
    inside = ScriptedSMTP(lambda _: None).start()
    trap = ScriptedSMTP(lambda _: None).start()
    default_port, submission_port, admin, proxy, implicit, front, front_v1 = free_ports(7)
    more = {"proxy": proxy, "implicit": implicit} if extended else None
    listening = [default_port, submission_port] + ([proxy, implicit] if extended else [])
    gw = RelaygwProcess(workdir, _config(admin, default_port, submission_port, inside.port,
                                         trap.port, more), ports=listening)
    users = [(ALICE, ["Relay Users"]), (BOB, [])] + ([(KARL, [])] if extended else [])
    for (user, password, address), groups in users:
        add_user(workdir / "users", user, password, [address], groups)
    gw.start()
    ports = {"default": default_port, "submission": submission_port, "relay": default_port}
    setup = Setup(gw, ports, inside, trap)
    if extended:
        ports.update({"proxied": front, "proxied-relay": front, "proxied-v1": front_v1,
                      "proxy-direct": proxy, "implicit": implicit, "implicit-relay": implicit})
        try:
            for version, port in (("v2", front), ("v1", front_v1)):
                # No health check: every connection to the binding is a client's.
                setup.haproxies[version] = HAProxy(
                    workdir / f"haproxy-{version}", port, [Backend(proxy)],
                    proxy=version, check=None, source=PROXY_SOURCE,
                ).start()
        except BaseException:
            stop(setup)
            raise
    return setup


def stop(setup: Setup) -> None:
    """Stop HAProxy and the gateway (by PID), then the recorders; print the gateway's output tail."""
    for haproxy in setup.haproxies.values():
        haproxy.stop()
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
