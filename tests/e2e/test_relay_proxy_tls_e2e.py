"""
The open-relay proof on the connector kinds the battery does not reach,
PROXY-protocol abuse, recipient validation, sender spoofing and Unicode
look-alikes (issue 11, "Must show" 1 and "Also in scope"; SPEC sections 2
and 3), against the real gateway of L{tests.e2e.connector_kinds} started
C{extended}: a PROXY binding behind two real HAProxy instances (send-proxy-v2
and send-proxy), an implicit-TLS binding, and C{kiosk.test} with
C{validate_recipients}.

Every test checks what the two downstream recorders ("inside" for the
accepted domains, "trap" for every other) received, not only the replies:
the battery's forms run through the battery's own checker
(L{tests.e2e.test_relay_battery_e2e.run_and_check}), the other
transactions carry an C{X-Probe} id of their own, and the last test checks
that nothing else at all reached either recorder.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.e2e import connector_kinds as K
from tests.e2e import test_hostile_commands_e2e as H
from tests.e2e.conftest import spool_entries
from tests.e2e.test_relay_battery_e2e import (
    BAD,
    FORMS,
    INSIDE,
    OUTSIDE,
    Context,
    Form,
    _session,
    run_and_check,
)
from tests.servers.haproxy import HAPROXY_MISSING, haproxy_missing
from tests.servers.ports import wait_until
from tests.servers.smtp_clients import LineClient, client_context

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(haproxy_missing(), reason=HAPROXY_MISSING),
]

#: Probe id -> (recorder, envelope recipient) of every message queued here.
QUEUED: dict[str, tuple[str, str]] = {}
#: Probe id -> (recorder, sender, recipients) of the sender tests' messages.
SENT: dict[str, tuple[str, str, list[str]]] = {}
#: Probe id -> what the recorders got, for the hostile-command tests run here
#: (they check their own probes).
HOSTILE: dict[str, list[tuple[str, list[str]]]] = {}
#: Figures for the report: transactions tried and messages checked downstream.
FIGURES = {"transactions": 0, "checked": 0}

NOT_FOUND = (550, "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP "
                  "address lookup")  # fmt: skip
SEND_AS = (550, "5.7.60 SMTP; Client does not have permissions to send as this sender")
BAD_SENDER = (501, "5.1.7 Invalid address")
UNRECOGNIZED = (500, "5.3.3 Unrecognized command")
MAIL_OK = (250, "2.1.0 Sender OK")
QUEUED_TEXT = "Queued mail for delivery"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
KELVIN, LONG_S, DOTTED_I, DOTLESS_I = "\u212a", "\u017f", "\u0130", "\u0131"


def _fullwidth(text: str) -> str:
    return text.translate({c: c + 0xFEE0 for c in range(0x21, 0x7F)})


@pytest.fixture(scope="module")
def setup(relaygw_installed: None, module_workdir: Path) -> Iterator[K.Setup]:
    started = K.start(module_workdir / "gw", extended=True)
    yield started
    print(f"--- figures: {FIGURES} ---")
    K.stop(started)


def _check_forms(setup: K.Setup, ctx: Context, forms: list[Form]) -> None:
    FIGURES["transactions"] += len(forms)
    FIGURES["checked"] += run_and_check(setup, ctx, QUEUED, forms)


# -- 1. the battery on the PROXY and implicit-TLS connectors ---------------------

_N = K.NEIGHBOUR_IP
BATTERY_CONTEXTS = [
    # behind HAProxy (send-proxy-v2): the client's own address decides
    Context("proxied-anonymous", _session("proxied", "ehlo"), relay=False),
    Context("proxied-accepted-sender", _session("proxied", "ehlo"), relay=False,
            sender="postmaster@example.test"),
    Context("proxied-after-rset", _session("proxied", "helo"), relay=False, reset_first=True),
    Context("proxied-after-failed-auth", _session("proxied", "ehlo", "auth-wrong"), relay=False),
    Context("proxied-after-starttls", _session("proxied", "ehlo", "tls"), relay=False),
    Context("proxied-auth-then-starttls", _session("proxied", "ehlo", "auth-alice", "tls"),
            relay=False),
    Context("proxied-neighbour-of-trusted-ip", _session("proxied", "ehlo", source=_N),
            relay=False),
    Context("proxied-v1-anonymous", _session("proxied-v1", "ehlo"), relay=False),
    Context("proxied-v1-neighbour", _session("proxied-v1", "ehlo", source=_N), relay=False),
    Context("proxied-authenticated", _session("proxied", "ehlo", "tls", "auth-alice"),
            relay=True, sender=K.ALICE[2]),
    Context("proxied-relay-anonymous", _session("proxied-relay", "ehlo"), relay=True),
    Context("proxied-relay-after-starttls", _session("proxied-relay", "ehlo", "tls"),
            relay=True, reset_first=True),
    Context("proxied-relay-v1", _session("proxied-v1", "ehlo", source=K.TRUSTED_IP),
            relay=True),
    # implicit TLS (port 465 style)
    Context("implicit-anonymous", _session("implicit", "ehlo"), relay=False),
    Context("implicit-after-rset", _session("implicit", "helo"), relay=False, reset_first=True),
    Context("implicit-after-failed-auth", _session("implicit", "ehlo", "auth-wrong"),
            relay=False),
    Context("implicit-neighbour-of-trusted-ip", _session("implicit", "ehlo", source=_N),
            relay=False),
    Context("implicit-user-without-relay", _session("implicit", "ehlo", "auth-bob"),
            relay=False, sender=K.BOB[2]),
    Context("implicit-relay-user", _session("implicit", "ehlo", "auth-alice"), relay=True,
            sender=K.ALICE[2]),
    Context("implicit-relay-anonymous", _session("implicit-relay", "ehlo"), relay=True),
    Context("implicit-relay-after-failed-auth",
            _session("implicit-relay", "ehlo", "auth-wrong"), relay=True, reset_first=True),
]


@pytest.mark.parametrize("ctx", BATTERY_CONTEXTS, ids=[c.id for c in BATTERY_CONTEXTS])
def test_battery_on_proxy_and_implicit_tls(setup: K.Setup, ctx: Context) -> None:
    """
    The battery's every address form (all its relay-refusal forms among
    them) on the PROXY connectors behind a real HAProxy and on the
    implicit-TLS ones: the SPEC replies, and each queued form delivered once,
    to the route of its routing domain, with the expected envelope.
    """
    _check_forms(setup, ctx, FORMS)


def _ehlo_names_ip(client: LineClient, ip: str) -> None:
    reply = K.ehlo(client)
    assert reply.lines[0].endswith(f"Hello [{ip}]"), reply


#: What a client can type to claim another address: none of it may grant relay.
CLAIMS = [
    "XCLIENT ADDR=127.0.9.9 NAME=trusted.test",
    "XFORWARD ADDR=127.0.9.9",
    "PROXY TCP4 127.0.9.9 127.0.0.1 40000 25",
    "PROXY TCP6 ::ffff:127.0.9.9 ::1 40000 25",
    "PROXY UNKNOWN",
]


@pytest.mark.parametrize("kind", ["default", "submission", "proxied", "proxied-v1", "implicit"])
def test_trusted_ip_never_granted_by_what_a_client_types(setup: K.Setup, kind: str) -> None:
    """
    XCLIENT, XFORWARD and PROXY lines naming the trusted IP get 500 5.3.3,
    an EHLO naming it changes nothing: the session keeps its client's own
    address and connector, a relay attempt gets 550 5.7.54, and only the
    accepted-domain recipient of the session's message reaches a recorder.
    """
    probe = f"claims-{kind}"
    client = setup.connect(kind)
    if kind == "submission":
        K.ehlo(client)
        K.starttls(client)
    _ehlo_names_ip(client, "127.0.0.1")
    for line in CLAIMS:
        assert K.pair(client.command(line)) == UNRECOGNIZED, line
    if kind == "submission":
        assert K.auth_plain(client, *K.BOB[:2])[0] == 235
    sender = K.BOB[2] if kind == "submission" else ""
    for name in ("[127.0.9.9]", "127.0.9.9", "[IPv6:::ffff:127.0.9.9]"):
        reply = client.command(f"EHLO {name}")
        assert reply.code == 250 and reply.lines[0].endswith("Hello [127.0.0.1]"), reply
    assert client.command("HELO [127.0.9.9]").code == 250
    assert K.pair(client.command(f"MAIL FROM:<{sender}>")) == MAIL_OK
    assert K.pair(client.command(f"RCPT TO:<{probe}-helo@outside.test>")) == K.NO_RELAY
    assert client.command("RSET").code == 250
    _ehlo_names_ip(client, "127.0.0.1")
    assert K.pair(client.command(f"MAIL FROM:<{sender}>")) == MAIL_OK
    assert K.pair(client.command(f"RCPT TO:<{probe}@outside.test>")) == K.NO_RELAY
    assert K.pair(client.command(f"RCPT TO:<{probe}@example.test>")) == K.OK_RCPT
    _data(client, probe)
    assert client.command("QUIT").code == 221
    client.close()
    _expect(setup, probe, "inside", sender, [f"{probe}@example.test"])


HOSTILE_TESTS = {
    "starttls-injection": H.test_plaintext_pipelined_after_starttls_is_discarded,
    "plaintext-before-handshake": H.test_plaintext_before_the_handshake_is_not_executed,
    "after-quit": H.test_nothing_after_quit_is_executed,
    "nul-and-8bit": H.test_nul_and_8bit_bytes_in_commands,
    "recipient-limit": H.test_recipient_limit,
}
HOSTILE_CASES = [(test, kind) for test in HOSTILE_TESTS for kind in K.EXTENDED_KINDS
                 if not (test.startswith(("starttls", "plaintext")) and kind.startswith("implicit"))]


@pytest.mark.parametrize(("test", "kind"), HOSTILE_CASES, ids=[f"{t}-{k}" for t, k in HOSTILE_CASES])
def test_hostile_commands_on_the_extended_kinds(setup: K.Setup, test: str, kind: str) -> None:
    """
    The hostile-command tests of L{tests.e2e.test_hostile_commands_e2e} on
    the PROXY (through HAProxy) and implicit-TLS kinds: STARTTLS injection
    (where STARTTLS exists), input after QUIT, NUL and 8-bit bytes in
    commands, the recipient limit; each checks its recorders itself.
    """
    before = set(setup.probes())
    HOSTILE_TESTS[test](setup, kind)
    FIGURES["transactions"] += 1
    for probe, delivered in setup.probes().items():
        if probe not in before:
            HOSTILE[probe] = [(name, t.accepted) for name, t in delivered]
            FIGURES["checked"] += 1


# -- 2. PROXY abuse ----------------------------------------------------------------


def _v2_tcp4(src: str, dst: str, sport: int, dport: int) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


def _relay_attempt(probe: str) -> bytes:
    """A whole relay transaction to the trap, pipelined."""
    return (f"EHLO forger.test\r\nMAIL FROM:<>\r\nRCPT TO:<{probe}@outside.test>\r\n"
            "DATA\r\n").encode() + K.message(probe) + b"QUIT\r\n"


def _read_until_closed(sock: socket.socket, timeout: float = 15) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"still open after {timeout} s, having sent {data!r}") from None
    return data


@pytest.mark.parametrize("source", [K.TRUSTED_IP, "127.0.0.1", K.NEIGHBOUR_IP])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_untrusted_peer_claiming_the_trusted_ip(setup: K.Setup, source: str, version: str) -> None:
    """
    A peer outside trusted_proxies (the trusted relay IP itself among them)
    sending a header that claims 127.0.9.9, then a relay transaction, is
    closed without a byte; the refusal is logged and nothing is relayed.
    """
    probe = f"forged-{version}-{source}"
    port = setup.ports["proxy-direct"]
    header = (f"PROXY TCP4 {K.TRUSTED_IP} 127.0.0.1 40000 {port}\r\n".encode()
              if version == "v1" else _v2_tcp4(K.TRUSTED_IP, "127.0.0.1", 40000, port))
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as sock:
        local = sock.getsockname()
        try:
            sock.sendall(header + _relay_attempt(probe))
        except OSError:
            pass  # closed already: nothing was read either way
        assert _read_until_closed(sock) == b""
    line = f"connection from {local[0]}:{local[1]} to 127.0.0.1:{port} closed without a reply"
    wait_until(lambda: line in setup.gateway.output(), 10, 0.1, "the refusal in the log")
    _nothing_for(setup, probe)


def _forged_v1(port: int) -> bytes:
    return f"PROXY TCP4 {K.TRUSTED_IP} 127.0.0.1 40000 {port}\r\n".encode()


def _second_header_session(setup: K.Setup, kind: str, header: str, probe: str,
                           tls: bool) -> None:
    """
    Behind HAProxy, a client's own PROXY header claiming 127.0.9.9 as its
    first bytes (before the banner; with C{tls}, right after STARTTLS).

    A v1 line is an unknown command (500 5.3.3): the session keeps the
    client's address and connector, a relay attempt is refused and only the
    accepted-domain recipient's message is delivered.  A v2 header begins
    with the protocol's signature C{CRLF CRLF NUL CRLF "QUIT" LF}: three bad
    lines (500 5.3.3) and a QUIT (a bare LF ends a command line), so the
    session ends with 221 and the relay transaction pipelined after it is
    never executed.
    """
    port = setup.ports["proxy-direct"]
    client = LineClient(setup.ports[kind], source="127.0.0.1", timeout=15)
    if tls:
        assert client.reply().code == 220
        K.ehlo(client)
        assert K.pair(client.command("STARTTLS"))[0] == 220
        client.starttls(client_context())
    if header == "v2":
        client.send(_v2_tcp4(K.TRUSTED_IP, "127.0.0.1", 40000, port) + _relay_attempt(probe))
        replies = [client.reply() for _ in range(4 if tls else 5)]
        codes = [r.code for r in replies]
        assert codes == ([] if tls else [220]) + [500, 500, 500, 221], replies
        assert all(K.pair(r) == UNRECOGNIZED for r in replies if r.code == 500)
        try:
            assert client.sock.recv(4096) == b""  # closed: nothing after QUIT ran
        except ConnectionResetError:
            pass
        client.close()
        _nothing_for(setup, probe)
        return
    client.send(_forged_v1(port))
    if not tls:
        banner = client.reply()
        assert banner.code == 220, banner
    assert K.pair(client.reply()) == UNRECOGNIZED
    assert K.pair(client.command("NOOP")) == (250, "2.0.0 OK")
    _ehlo_names_ip(client, "127.0.0.1")
    assert K.pair(client.command("MAIL FROM:<>")) == MAIL_OK
    assert K.pair(client.command(f"RCPT TO:<{probe}@outside.test>")) == K.NO_RELAY
    assert K.pair(client.command(f"RCPT TO:<{probe}@example.test>")) == K.OK_RCPT
    _data(client, probe)
    assert client.command("QUIT").code == 221
    client.close()
    _expect(setup, probe, "inside", "", [f"{probe}@example.test"])


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "after-starttls"])
@pytest.mark.parametrize("kind", ["proxied", "proxied-v1"])
@pytest.mark.parametrize("header", ["v1", "v2"])
def test_second_header_inside_the_session(setup: K.Setup, header: str, kind: str,
                                          tls: bool) -> None:
    """
    A client behind a real HAProxy (send-proxy-v2 and send-proxy) sends its
    own PROXY header claiming the trusted IP: never a new client address,
    nothing relayed (L{_second_header_session}).
    """
    probe = f"second-{header}-{kind}-{'tls' if tls else 'plain'}"
    _second_header_session(setup, kind, header, probe, tls)


def test_header_on_a_binding_without_proxy_protocol(setup: K.Setup) -> None:
    """
    On the Default Frontend's binding (no proxy_protocol), from a client at
    127.0.0.1, a PROXY header claiming 127.0.9.9 -- whose own connector, the
    Anonymous Relay, shares that binding -- is an unknown command: no relay.
    """
    probe = "forged-on-plain-binding"
    client = LineClient(setup.ports["default"], source="127.0.0.1", timeout=15)
    client.send(_forged_v1(setup.ports["default"]))
    assert client.reply().code == 220
    assert K.pair(client.reply()) == UNRECOGNIZED
    _ehlo_names_ip(client, "127.0.0.1")
    assert K.pair(client.command("MAIL FROM:<>")) == MAIL_OK
    assert K.pair(client.command(f"RCPT TO:<{probe}@outside.test>")) == K.NO_RELAY
    assert client.command("QUIT").code == 221
    client.close()
    _nothing_for(setup, probe)


# -- 3. validate_recipients and 6. Unicode look-alikes -------------------------------


def _rcpt(address: str, where: str, what: str, envelope: str | None = None,
          utf8: bool = False, refusal: tuple[int, str] = K.BAD_RCPT) -> Form:
    return Form(what, f"TO:<{address}>", where, address if envelope is None else envelope,
                utf8=utf8, refusal=refusal)


def _unknown(address: str, what: str, utf8: bool = False) -> Form:
    return _rcpt(address, BAD, what, utf8=utf8, refusal=NOT_FOUND)


VALIDATION_FORMS = [
    _rcpt("karl@kiosk.test", INSIDE, "known recipient"),
    _rcpt("KARL@KIOSK.TEST", INSIDE, "known, upper case"),
    _rcpt("Karl@Kiosk.Test.", INSIDE, "known, mixed case, trailing dot"),
    _rcpt("@outside.test:karl@kiosk.test", INSIDE, "known, source route",
          envelope="karl@kiosk.test"),
    _unknown("nobody@kiosk.test", "unknown"),
    _unknown("NOBODY@KIOSK.TEST", "unknown, upper case"),
    _unknown("nobody@kiosk.test.", "unknown, trailing dot"),
    _unknown("karl%outside.test@kiosk.test", "percent hack on a known name"),
    _unknown("nobody%karl@kiosk.test", "percent hack ending in a known name"),
    _unknown("outside.test!karl@kiosk.test", "bang path to a known name"),
    _unknown('"karl"@kiosk.test', "quoted known name (looked up as written)"),
    _unknown('"karl@kiosk.test"@kiosk.test', "quoted known address"),
    _unknown('"nobody"@kiosk.test', "quoted unknown"),
    _unknown("karl.@kiosk.test", "known name, trailing dot in the local part"),
    _unknown("karl+tag@kiosk.test", "subaddress of a known name"),
    _unknown(f"{KELVIN}arl@kiosk.test", "Kelvin sign for k (lower() gives karl)", utf8=True),
    _unknown(f"{KELVIN}ARL@KIOSK.TEST", "Kelvin sign, upper case", utf8=True),
    _unknown("k\u0430rl@kiosk.test", "Cyrillic a in a known name", utf8=True),
    _unknown(f"{_fullwidth('karl')}@kiosk.test", "fullwidth known name", utf8=True),
    _unknown("kar\u217c@kiosk.test", "Roman numeral l (NFKC gives karl)", utf8=True),
    _unknown(f"{LONG_S}arl@kiosk.test", "long s for a letter", utf8=True),
    _rcpt(f"{KELVIN}arl@kiosk.test", BAD, "Kelvin sign without SMTPUTF8"),
    _rcpt("karl@kiosk.test..", BAD, "two trailing dots"),
    _rcpt("karl@kiosk.test@kiosk.test", BAD, "second @"),
    _rcpt("karl@sub.kiosk.test", OUTSIDE, "subdomain of the validated domain"),
    _rcpt("karl@kiosk.test.outside.test", OUTSIDE, "validated domain as a prefix"),
]

#: Domains and local parts with characters whose lower or case fold is ASCII.
LOOKALIKE_FORMS = [
    _rcpt(f"karl@{KELVIN}iosk.test", BAD, "Kelvin sign in a validated domain", utf8=True),
    _rcpt(f"karl@KIOS{KELVIN}.TEST", BAD, "Kelvin sign, upper case domain", utf8=True),
    _rcpt(f"nobody@{KELVIN}iosk.test", BAD, "Kelvin sign, unknown name", utf8=True),
    _rcpt(f"bob@{KELVIN}.corp.test", BAD, "Kelvin sign under a wildcard", utf8=True),
    _rcpt(f"karl@kio{LONG_S}k.test", BAD, "long s in a validated domain", utf8=True),
    _rcpt(f"bob@ho{LONG_S}t.corp.test", BAD, "long s under a wildcard", utf8=True),
    _rcpt(f"karl@k{DOTTED_I}osk.test", BAD, "dotted capital I (lower gives i + dot)",
          utf8=True),
    _rcpt(f"bob@{DOTTED_I}nternal.test", BAD, "dotted capital I in internal-relay", utf8=True),
    _rcpt(f"karl@{_fullwidth('kiosk')}.test", BAD, "fullwidth validated domain", utf8=True),
    _rcpt(f"bob@example.{_fullwidth('TEST')}", BAD, "fullwidth upper-case TLD", utf8=True),
    _rcpt("bob@e\u0301cole.test", BAD, "decomposed e-acute (not NFC)", utf8=True),
    _rcpt(f"karl@{KELVIN}iosk.test", BAD, "Kelvin sign domain without SMTPUTF8"),
    _rcpt(f"karl@k{DOTLESS_I}osk.test", OUTSIDE, "dotless i: another name", utf8=True),
    _rcpt("bob@\u00e9cole.test", OUTSIDE, "NFC e-acute: a real IDN", utf8=True),
    _rcpt("bob@stra\u00dfe.test", OUTSIDE, "sharp s: IDNA 2008 keeps it (xn--strae-oqa)",
          utf8=True),
    _rcpt("bob@B\u00fccher.test", OUTSIDE, "IDN with an ASCII capital", utf8=True),
    _rcpt("bob@xn--kiosk-8fd.test", OUTSIDE, "punycode of the dotted-I look-alike"),
    _rcpt(f"bob{KELVIN}@example.test", INSIDE, "Kelvin sign in a local part, unvalidated",
          utf8=True),
    _rcpt(f"{DOTTED_I}nfo@example.test", INSIDE, "dotted capital I in a local part",
          utf8=True),
    _rcpt(f"{_fullwidth('bob')}@example.test", INSIDE, "fullwidth local part", utf8=True),
    _rcpt(f"bob{KELVIN}@example.test", BAD, "Kelvin local part without SMTPUTF8"),
]

UNICODE_CONTEXTS = [
    Context("unicode-default", _session("default", "ehlo"), relay=False),
    Context("unicode-default-authoritative-sender", _session("default", "ehlo"), relay=False,
            sender="postmaster@kiosk.test"),
    Context("unicode-relay", _session("relay", "ehlo"), relay=True),
    Context("unicode-submission-alice", _session("submission", "ehlo", "tls", "auth-alice"),
            relay=True, sender=K.ALICE[2]),
    Context("unicode-submission-bob", _session("submission", "ehlo", "tls", "auth-bob"),
            relay=False, sender=K.BOB[2]),
    Context("unicode-proxied", _session("proxied", "ehlo"), relay=False),
    Context("unicode-proxied-relay", _session("proxied-relay", "ehlo"), relay=True),
    Context("unicode-implicit", _session("implicit", "ehlo"), relay=False),
    Context("unicode-implicit-relay", _session("implicit-relay", "ehlo"), relay=True,
            reset_first=True),
]


@pytest.mark.parametrize("ctx", UNICODE_CONTEXTS, ids=[c.id for c in UNICODE_CONTEXTS])
def test_validate_recipients_cannot_be_bypassed(setup: K.Setup, ctx: Context) -> None:
    """
    Recipients of the validated kiosk.test: only the users file's address
    karl@kiosk.test (any case, a trailing dot, a source route) is accepted
    and delivered inside; every other form of it (percent hack, bang path,
    quotes, subaddress, Kelvin sign, Cyrillic, fullwidth, Roman numeral,
    long s) gets 550 5.1.10, on every connector, relay right or not.
    """
    _check_forms(setup, attrs.evolve(ctx, id=ctx.id.replace("unicode", "validate")),
                 VALIDATION_FORMS)


@pytest.mark.parametrize("ctx", UNICODE_CONTEXTS, ids=[c.id for c in UNICODE_CONTEXTS])
def test_unicode_lookalikes_never_match_an_accepted_domain(setup: K.Setup, ctx: Context) -> None:
    """
    A domain with a character that lower-cases or folds into ASCII (Kelvin
    sign, long s, dotted capital I, fullwidth letters) or is not
    NFC is refused 501 5.1.3: never matched as an accepted domain by a
    normalisation, never relayed to the name IDNA would give it.  Canonical
    IDNs (dotless i, NFC e-acute) are other domains: refused 550 5.7.54
    without relay, else delivered to the default route as written.  Such
    characters in a local part stay as written, inside the accepted domain.
    """
    _check_forms(setup, ctx, LOOKALIKE_FORMS)


# -- 5. sender spoofing ------------------------------------------------------------


@attrs.frozen
class Sender:
    what: str
    address: str
    reply: tuple[int, str]
    utf8: bool = False


def _spoof(address: str, what: str, utf8: bool = False) -> Sender:
    return Sender(what, address, SEND_AS, utf8)


ACCEPTED_SENDERS = [
    _spoof("bob@example.test", "accepted domain"),
    _spoof("BOB@EXAMPLE.TEST", "accepted domain, upper case"),
    _spoof("bob@Example.Test.", "accepted domain, trailing dot"),
    _spoof("bob@host.corp.test", "wildcard subdomain"),
    _spoof("bob@internal.test", "internal-relay domain"),
    _spoof("karl@kiosk.test", "validated domain, a user's address"),
    _spoof("nobody@kiosk.test", "validated domain, unknown"),
    _spoof('"bob"@example.test', "quoted local part"),
    _spoof('"bob@outside.test"@example.test', "quoted @ in the local part"),
    _spoof("bob%outside.test@example.test", "percent hack"),
    _spoof("outside.test!bob@example.test", "bang path"),
    _spoof("@outside.test:bob@example.test", "source route to accepted"),
    Sender("second @, accepted last", "bob@outside.test@example.test", BAD_SENDER),
    Sender("second @, outside last", "bob@example.test@outside.test", BAD_SENDER),
    Sender("Kelvin sign domain", f"karl@{KELVIN}iosk.test", BAD_SENDER, utf8=True),
    Sender("fullwidth domain", f"bob@{_fullwidth('example')}.test", BAD_SENDER, utf8=True),
    Sender("long s domain", f"bob@example.te{LONG_S}t", BAD_SENDER, utf8=True),
    Sender("foreign sender (control)", "device@outside.test", MAIL_OK),
    Sender("Cyrillic look-alike: a foreign domain", "bob@ex\u0430mple.test", MAIL_OK, utf8=True),
    Sender("null sender", "", MAIL_OK),
]


def _user_senders(own: str, other: str) -> list[Sender]:
    """Senders for a user without accept-any-sender whose address is C{own}."""
    local, domain = own.split("@")
    o_local, o_domain = other.split("@")
    kelvin = local.replace("k", KELVIN)
    forms = [
        Sender("own address", own, MAIL_OK),
        Sender("own address, upper case", own.upper(), MAIL_OK),
        Sender("own address, trailing dot", own + ".", MAIL_OK),
        _spoof(other, "another user's address"),
        _spoof(other.upper(), "another user's, upper case"),
        _spoof(f"{o_local.capitalize()}@{o_domain.title()}.", "another user's, mixed, dot"),
        _spoof(f'"{o_local}"@{o_domain}', "another user's, quoted"),
        _spoof(f'"{own}"@{o_domain}', "own address quoted, in another's domain"),
        _spoof(f"{o_local}%{domain}@{o_domain}", "percent hack"),
        _spoof(f"@{domain}:{other}", "source route via own domain"),
        _spoof(f"{o_local}@outside.test", "foreign domain"),
        Sender("second @, own last", f"{other}@{domain}", BAD_SENDER),
        Sender("second @, own first", f"{own}@{o_domain}", BAD_SENDER),
        _spoof(f"{o_local}{KELVIN}@{o_domain}", "another's with a Kelvin sign", utf8=True),
        Sender("null sender", "", MAIL_OK),
    ]
    if kelvin != local:
        forms += [
            _spoof(f"{kelvin}@{domain}", "own name with the Kelvin sign for k", utf8=True),
            _spoof(f"{kelvin.upper()}@{domain.upper()}", "same, upper case", utf8=True),
        ]
    return forms


SENDER_CASES = {
    "implicit-anonymous": (_session("implicit", "ehlo"), ACCEPTED_SENDERS),
    "submission-bob": (_session("submission", "ehlo", "tls", "auth-bob"),
                       _user_senders(K.BOB[2], K.ALICE[2])),
    "implicit-karl": (_session("implicit", "ehlo", "auth-karl"),
                      _user_senders(K.KARL[2], K.BOB[2])),
    "proxied-karl": (_session("proxied", "ehlo", "tls", "auth-karl"),
                     _user_senders(K.KARL[2], K.ALICE[2])),
    "implicit-alice-relay-right": (_session("implicit", "ehlo", "auth-alice"),
                                   _user_senders(K.ALICE[2], K.BOB[2])),
}


@pytest.mark.parametrize("case", list(SENDER_CASES))
def test_sender_spoofing(setup: K.Setup, case: str) -> None:
    """
    MAIL FROM forms against the SPEC's sender rights: anonymous without
    accept-authoritative-sender may not use an accepted domain in any
    spelling (550 5.7.60); an authenticated user without accept-any-sender
    may use only its own address (any ASCII case, a trailing dot), never
    another user's in case variants, quoted, with a second @ (501 5.1.7) or
    with a Kelvin sign, not even for its own name; look-alike domains are
    refused 501 5.1.7.  Every accepted sender's message is delivered with
    the sender exactly as written; a refused one's never.
    """
    opener, senders = SENDER_CASES[case]
    wrong = []
    with opener(setup) as client:
        for n, s in enumerate(senders):
            probe = f"sender-{case}/{n}"
            utf8 = " SMTPUTF8" if s.utf8 else ""
            got = K.pair(client.command(f"MAIL FROM:<{s.address}>{utf8}"))
            FIGURES["transactions"] += 1
            if got != s.reply:
                wrong.append(f"{s.what} <{s.address}>: {got}, expected {s.reply}")
            if got == MAIL_OK:
                rcpt = f"sender-probe-{n}@example.test"
                assert K.pair(client.command(f"RCPT TO:<{rcpt}>")) == K.OK_RCPT
                _data(client, probe)
                SENT[probe] = ("inside", s.address, [rcpt])
            else:
                assert K.pair(client.command("RCPT TO:<bob@example.test>")) == (
                    503, "5.5.1 Sender not yet given")
            assert client.command("RSET").code == 250
        assert client.command("QUIT").code == 221
    assert not wrong, "\n".join(wrong)
    probes = {p for p in SENT if p.startswith(f"sender-{case}/")}
    setup.wait_delivered(probes)
    seen = setup.probes()
    for probe in probes:
        route, sender, rcpts = SENT[probe]
        got = [(name, t.sender, t.accepted) for name, t in seen[probe]]
        assert got == [(route, sender, rcpts)], (probe, got)
        FIGURES["checked"] += 1


# -- helpers and the final check -----------------------------------------------------


def _data(client: LineClient, probe: str) -> None:
    assert client.command("DATA").code == 354
    client.send(K.message(probe))
    reply = client.reply()
    assert reply.code == 250 and QUEUED_TEXT in reply.text, reply


def _expect(setup: K.Setup, probe: str, route: str, sender: str, rcpts: list[str]) -> None:
    SENT[probe] = (route, sender, rcpts)
    FIGURES["transactions"] += 1
    setup.wait_delivered({probe})
    got = [(name, t.sender, t.accepted) for name, t in setup.probes()[probe]]
    assert got == [(route, sender, rcpts)], got
    FIGURES["checked"] += 1


def _nothing_for(setup: K.Setup, probe: str) -> None:
    """Nothing of C{probe} at either recorder, also once the spool is empty."""
    FIGURES["transactions"] += 1
    spool = setup.gateway.workdir / "var" / "spool"
    wait_until(lambda: not spool_entries(spool), 30, 0.1, what="the spool to drain")
    assert probe not in setup.probes()
    everyone = {a for _, t in setup.downstream() for a in t.accepted + t.refused}
    assert not {a for a in everyone if a.startswith(probe)}


def test_nothing_else_reached_downstream(setup: K.Setup) -> None:
    """
    Once the spool is empty the recorders hold exactly the messages queued
    by this module's tests, each once, with the expected route, sender and
    recipients: no stray message, no DSN, no forged or refused transaction.
    """
    spool = setup.gateway.workdir / "var" / "spool"
    wait_until(lambda: not spool_entries(spool), 60, 0.1, what="the spool to drain")
    seen = setup.probes()
    assert "" not in seen, [t for _, t in seen[""]]
    expected = {p: (r, [e]) for p, (r, e) in QUEUED.items()}
    expected |= {p: (r, rcpts) for p, (r, _, rcpts) in SENT.items() if r}
    assert set(seen) == set(expected) | set(HOSTILE)
    for probe, delivered in seen.items():
        got = [(n, t.accepted) for n, t in delivered]
        assert got == (HOSTILE[probe] if probe in HOSTILE else [expected[probe]]), probe
    assert QUEUED and SENT
    assert setup.gateway.running()
    assert not K.gateway_tracebacks(setup)
    print(f"--- figures: {FIGURES} ---")
