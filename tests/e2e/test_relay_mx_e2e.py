"""
The open-relay proof on a gateway whose default route is C{via = "mx"}
(issue 11, "Must show" 1; SPEC sections 3 and 4): exchangers looked up in a
real dnsmasq point at loopback recorders, so a relay slip would be a real
delivery, not a reply.

  - C{mxtrap.test}: not accepted; its MX C{mx.mxtrap.test} is 127.0.0.41;
  - C{mxinside.test}: accepted, routed to the "inside" smarthost; its
    public MX (127.0.0.42) must never see its mail;
  - a recorder on 127.0.0.1 at the MX port, the target of the IP literal
    C{[127.0.0.1]}.

Connectors: the "Default Frontend" (127.0.0.0/8, anonymous submit, no
relay) and the trusted-IP "Anonymous Relay" (127.0.9.9).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.e2e import connector_kinds as K
from tests.e2e.conftest import gateway_toml, mx_internet, spool_entries
from tests.servers.dnsmasq import DNSMASQ_MISSING, Dnsmasq, dnsmasq_missing
from tests.servers.ports import free_port, free_ports, wait_until
from tests.servers.relaygw import RelaygwProcess
from tests.servers.scripted_smtp import ScriptedSMTP, Transaction
from tests.servers.smtp_clients import LineClient

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(dnsmasq_missing(), reason=DNSMASQ_MISSING),
]

MX_TRAP, MX_INSIDE, LITERAL = "127.0.0.41", "127.0.0.42", "127.0.0.1"
RECORDS = (
    ("mx-host", "mxtrap.test,mx.mxtrap.test,10"),
    ("host-record", f"mx.mxtrap.test,{MX_TRAP}"),
    ("mx-host", "mxinside.test,mx.mxinside.test,10"),
    ("host-record", f"mx.mxinside.test,{MX_INSIDE}"),
    # straße.test in IDNA 2008; IDNA 2003 would give strasse.test instead.
    ("mx-host", "xn--strae-oqa.test,mx.mxtrap.test,10"),
    ("mx-host", "strasse.test,mx.mxinside.test,10"),
)
SENDER = "scanner@mxinside.test"
_PROBE = re.compile(rb"^X-Probe: (\S+)\r?$", re.M)
QUEUED_TEXT = "Queued mail for delivery"
#: Probe id -> (recorder, recipients) of every message queued here.
QUEUED: dict[str, tuple[str, list[str]]] = {}
FIGURES = {"transactions": 0, "checked": 0}


def _config(admin: int, port: int, dns: int, mx_port: int, inside: int) -> str:
    common = 'tls = "off"\nmessage_rate_limit = "100000/m"\n'
    return gateway_toml(admin, default_route="internet") + mx_internet(dns, mx_port) + f"""
[[accepted_domains]]
domain = "mxinside.test"
route = "inside"

[[routes]]
name = "inside"
via = "smarthost"
smarthosts = ["127.0.0.1:{inside}"]
tls = "off"

[[connectors]]
name = "Default Frontend"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
permissions.anonymous = ["submit", "accept-authoritative-sender"]
{common}
[[connectors]]
name = "Anonymous Relay"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["{K.TRUSTED_IP}"]
permissions.anonymous = ["submit", "relay", "accept-any-sender"]
{common}"""


@attrs.define
class MXSetup:
    gateway: RelaygwProcess
    port: int
    recorders: dict[str, ScriptedSMTP]

    def probes(self) -> dict[str, list[tuple[str, Transaction]]]:
        """Delivered messages by X-Probe id (DSNs, from C{<>}, left out)."""
        found: dict[str, list[tuple[str, Transaction]]] = {}
        for name, server in self.recorders.items():
            for txn in server.transactions():
                if txn.data is not None and txn.sender:
                    match = _PROBE.search(txn.data)
                    key = match.group(1).decode() if match else ""
                    found.setdefault(key, []).append((name, txn))
        return found

    def everyone(self) -> set[str]:
        """Every recipient any recorder was offered (accepted or not)."""
        return {a for s in self.recorders.values() for t in s.transactions()
                for a in t.accepted + t.refused}  # fmt: skip

    def drained(self) -> None:
        spool = self.gateway.workdir / "var" / "spool"
        wait_until(lambda: not spool_entries(spool), 60, 0.1, what="the spool to drain")


def _recorders_on_one_port() -> tuple[int, dict[str, ScriptedSMTP]]:
    """The three MX-side recorders, all on one port (the route has one)."""
    for _ in range(5):
        port, started = free_port(MX_TRAP), {}
        try:
            for name, host in (("mx-trap", MX_TRAP), ("mx-inside", MX_INSIDE),
                               ("literal", LITERAL)):  # fmt: skip
                started[name] = ScriptedSMTP(lambda _: None, host=host, port=port).start()
            return port, started
        except OSError:
            for server in started.values():
                server.stop()
    raise RuntimeError("no port free on all three loopback addresses")


@pytest.fixture(scope="module")
def mx(relaygw_installed: None, module_workdir: Path) -> Iterator[MXSetup]:
    dns = Dnsmasq(module_workdir / "dns", extra=RECORDS).start()
    mx_port, recorders = _recorders_on_one_port()
    recorders["inside"] = ScriptedSMTP(lambda _: None).start()
    port, admin = free_ports(2)
    gw = RelaygwProcess(module_workdir / "gw",
                        _config(admin, port, dns.port, mx_port, recorders["inside"].port),
                        ports=[port])
    try:
        gw.start()
        yield MXSetup(gw, port, recorders)
    finally:
        gw.stop(timeout=10)
        for server in recorders.values():
            server.stop()
        dns.stop()
        print(f"--- figures: {FIGURES} ---")
        print("\n".join(gw.output().splitlines()[-60:]))


def _session(mx: MXSetup, source: str) -> LineClient:
    client = LineClient(mx.port, source=source, timeout=15)
    assert client.reply().code == 220
    K.ehlo(client)
    return client


def _send(client: LineClient, rcpt: str, probe: str, utf8: bool = False) -> tuple[int, str]:
    """One transaction to C{rcpt}; the RCPT reply (the message queued when 250)."""
    FIGURES["transactions"] += 1
    assert K.pair(client.command(f"MAIL FROM:<{SENDER}>{' SMTPUTF8' if utf8 else ''}"))[0] == 250
    rcpt_reply = K.pair(client.command(f"RCPT TO:<{rcpt}>"))
    if rcpt_reply[0] == 250:
        assert client.command("DATA").code == 354
        client.send(K.message(probe))
        reply = client.reply()
        assert reply.code == 250 and QUEUED_TEXT in reply.text, reply
    assert client.command("RSET").code == 250
    return rcpt_reply


#: Relay attempts towards the MX trap (and the literal), each refused without relay.
REFUSED = [
    "bob@mxtrap.test",
    "BOB@MXTRAP.TEST",
    "bob@mxtrap.test.",
    "bob@mx.mxtrap.test",
    "@mxinside.test:bob@mxtrap.test",
    '"bob@mxinside.test"@mxtrap.test',
    "bob%mxinside.test@mxtrap.test",
    "mxinside.test!bob@mxtrap.test",
    "bob@mxinside.test.mxtrap.test",
    f"bob@[{MX_TRAP}]",
    f"bob@[{LITERAL}]",
    "bob@[IPv6:::1]",
    f"bob@[IPv6:::ffff:{LITERAL}]",
]


def test_anonymous_relay_to_an_mx_domain_is_refused(mx: MXSetup) -> None:
    """
    On the anonymous connector every relay form towards a domain whose MX is
    a loopback recorder (and towards IP literals of the recorders) is
    refused 550 5.7.54; once the spool is empty no MX-side recorder was
    even offered a recipient.  The same session's accepted-domain message
    reaches the inside smarthost, never that domain's public MX.
    """
    with _session(mx, "127.0.0.1") as client:
        wrong = [(r, got) for n, r in enumerate(REFUSED)
                 if (got := _send(client, r, f"anon-mx/{n}")) != K.NO_RELAY]
        assert _send(client, "bob@mxinside.test", "anon-inside") == K.OK_RCPT
        assert client.command("QUIT").code == 221
    assert not wrong, wrong
    QUEUED["anon-inside"] = ("inside", ["bob@mxinside.test"])
    mx.drained()
    wait_until(lambda: "anon-inside" in mx.probes(), 30, 0.1, what="the inside message")
    assert [(n, t.accepted) for n, t in mx.probes()["anon-inside"]] == [
        ("inside", ["bob@mxinside.test"])]
    FIGURES["checked"] += 1
    for name in ("mx-trap", "mx-inside", "literal"):
        assert mx.recorders[name].transactions() == [], name


def test_relay_right_reaches_the_mx(mx: MXSetup) -> None:
    """
    The control: the trusted IP (relay right) reaches mxtrap.test's MX
    through dnsmasq, so the refusals above are the policy, not a broken
    route.
    """
    with _session(mx, K.TRUSTED_IP) as client:
        assert _send(client, "bob@mxtrap.test", "relay-mx") == K.OK_RCPT
        assert client.command("QUIT").code == 221
    QUEUED["relay-mx"] = ("mx-trap", ["bob@mxtrap.test"])
    wait_until(lambda: "relay-mx" in mx.probes(), 30, 0.1, what="the message at the MX")
    assert [(n, t.accepted) for n, t in mx.probes()["relay-mx"]] == [
        ("mx-trap", ["bob@mxtrap.test"])]
    FIGURES["checked"] += 1


def test_ip_literal_is_never_delivered_to_the_literal(mx: MXSetup) -> None:
    """
    With the relay right, C{user@[127.0.0.1]} and the MX host's literal are
    accepted at RCPT (the route decides), then bounced (5.4.4: the mx route
    has no C{ip_literals}): the recorders on those addresses get nothing,
    and the sender's DSN reaches the inside smarthost.
    """
    literals = [f"literal@[{LITERAL}]", f"literal@[{MX_TRAP}]", f"literal@[IPv6:::ffff:{LITERAL}]"]
    with _session(mx, K.TRUSTED_IP) as client:
        for n, rcpt in enumerate(literals):
            assert _send(client, rcpt, f"literal/{n}") == K.OK_RCPT, rcpt
        assert client.command("QUIT").code == 221
    mx.drained()

    def dsns() -> list[Transaction]:
        return [t for t in mx.recorders["inside"].transactions()
                if t.data is not None and t.sender == "" and t.accepted == [SENDER]
                and b"literal@[" in t.data]  # fmt: skip

    wait_until(lambda: len(dsns()) == len(literals), 30, 0.1, what="a DSN per literal")
    for dsn in dsns():
        assert dsn.data is not None and b"5.4.4" in dsn.data, dsn.data
    FIGURES["checked"] += len(literals)
    assert mx.recorders["literal"].transactions() == []
    assert not {a for a in mx.everyone() if a.startswith("literal@")}


def _fullwidth(text: str) -> str:
    return text.translate({c: c + 0xFEE0 for c in range(0x61, 0x7B)})


LOOKALIKES = [
    f"bob@{_fullwidth('mxinside')}.test",
    f"bob@{_fullwidth('mxinside').upper()}.test",
    "bob@mxin\u017fide.test",
    f"bob@{_fullwidth('mxtrap')}.test",
    "bob@mxtrap.te\u017ft",
]


def test_lookalikes_never_reach_the_name_idna_gives(mx: MXSetup) -> None:
    """
    Names that IDNA (the MX lookup's encoding) maps to mxinside.test or
    mxtrap.test -- fullwidth letters in either case, a long s -- are refused
    501 5.1.3 even with the relay right: the accepted domain's mail never
    goes by the Internet route to its public MX, and nothing reaches the
    MX-side recorders under a look-alike name.
    """
    with _session(mx, K.TRUSTED_IP) as client:
        got = [(r, _send(client, r, f"lookalike/{n}", utf8=True))
               for n, r in enumerate(LOOKALIKES)]
        assert client.command("QUIT").code == 221
    assert [g for _, g in got] == [K.BAD_RCPT] * len(LOOKALIKES), got
    mx.drained()
    assert not [p for p in mx.probes() if p.startswith("lookalike/")]
    assert mx.recorders["mx-inside"].transactions() == []


def test_idn_goes_to_its_idna2008_name(mx: MXSetup) -> None:
    """
    A canonical IDN with a sharp s is relayed to the MX of its IDNA 2008
    name (xn--strae-oqa.test, the mxtrap recorder), never to the MX of the
    name IDNA 2003 maps it to (strasse.test, the mxinside recorder).
    """
    with _session(mx, K.TRUSTED_IP) as client:
        assert _send(client, "bob@stra\u00dfe.test", "idn-sharp-s", utf8=True) == K.OK_RCPT
        assert client.command("QUIT").code == 221
    QUEUED["idn-sharp-s"] = ("mx-trap", ["bob@stra\u00dfe.test"])
    wait_until(lambda: "idn-sharp-s" in mx.probes(), 30, 0.1, what="the IDN message at its MX")
    assert [(n, t.accepted) for n, t in mx.probes()["idn-sharp-s"]] == [
        ("mx-trap", ["bob@stra\u00dfe.test"])]
    FIGURES["checked"] += 1


def test_nothing_else_reached_downstream(mx: MXSetup) -> None:
    """Once the spool is empty: the queued probes only, each once; the public MX of the accepted domain saw nothing."""
    mx.drained()
    seen = {p: d for p, d in mx.probes().items() if p}
    assert {p: [(n, t.accepted) for n, t in d] for p, d in seen.items()} == {
        p: [(r, rcpts)] for p, (r, rcpts) in QUEUED.items()}
    assert mx.recorders["mx-inside"].transactions() == []
    assert mx.recorders["literal"].transactions() == []
    tracebacks = [line for line in mx.gateway.output().splitlines()
                  if "Traceback" in line or "Unhandled" in line]  # fmt: skip
    assert not tracebacks
