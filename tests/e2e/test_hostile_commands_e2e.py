"""
Hostile commands on every connector kind (issue 11, "Also in scope"; SPEC
section 3), against the real gateway process of L{tests.e2e.connector_kinds}
and its two downstream recorders:

  - STARTTLS command injection (CVE-2011-0411 style): plaintext pipelined
    after STARTTLS in the same packet is discarded, never executed after the
    handshake; plaintext sent after the 220 but before the handshake breaks
    the handshake and is not executed either;
  - input after QUIT, in the same packet and after the 221: never executed;
  - NUL bytes and 8-bit bytes in commands: the SPEC's refusals, the session
    goes on, and nothing with them reaches a downstream server;
  - the recipient limit: exactly C{max_recipients} accepted and delivered,
    the next ones 452 4.5.3, refused recipients not counted, and the count
    per transaction.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import connector_kinds as K
from tests.servers.smtp_clients import LineClient, client_context

pytestmark = pytest.mark.e2e

KINDS = list(K.KINDS)
QUEUED_TEXT = "Queued mail for delivery"
NEED_HELO = (503, "5.5.2 Send hello first")
NEED_MAIL = (503, "5.5.1 Sender not yet given")
UNRECOGNIZED = (500, "5.3.3 Unrecognized command")
INVALID_ARGS = (501, "5.5.4 Invalid arguments")
BAD_SENDER = (501, "5.1.7 Invalid address")


@pytest.fixture(scope="module")
def setup(relaygw_installed: None, module_workdir: Path) -> Iterator[K.Setup]:
    started = K.start(module_workdir / "gw")
    yield started
    K.stop(started)


def _sender(kind: str) -> str:
    return K.BOB[2] if kind == "submission" else ""


def _ready(setup: K.Setup, kind: str, helo: bytes = b"EHLO client.example") -> LineClient:
    """A session of C{kind} that may send MAIL (the submission one as bob, over TLS)."""
    client = setup.connect(kind)
    client.send(helo + b"\r\n")
    assert client.reply().code == 250
    if kind == "submission":
        assert client.command("STARTTLS").code == 220
        client.starttls(client_context())
        client.send(helo + b"\r\n")  # the name after TLS is the one Received shows
        assert client.reply().code == 250
        assert K.auth_plain(client, *K.BOB[:2]) == (235, "2.7.0 Authentication successful")
    return client


def _eof(client: LineClient) -> bool:
    """Whether the server closed the connection with nothing more to read."""
    try:
        return client.sock.recv(4096) == b"" and not client.pending()
    except (ConnectionResetError, ssl.SSLError):
        return not client.pending()


def _queue(client: LineClient, sender: str, rcpt: str, probe: str) -> None:
    assert K.pair(client.command(f"MAIL FROM:<{sender}>")) == (250, "2.1.0 Sender OK")
    assert K.pair(client.command(f"RCPT TO:<{rcpt}>")) == K.OK_RCPT
    assert client.command("DATA").code == 354
    client.send(K.message(probe))
    reply = client.reply()
    assert reply.code == 250 and QUEUED_TEXT in reply.text, reply


# -- STARTTLS command injection ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_plaintext_pipelined_after_starttls_is_discarded(setup: K.Setup, kind: str) -> None:
    """
    C{STARTTLS} followed in the same packet by EHLO, MAIL, RCPT, DATA and a
    message: only 220 is answered; after the handshake the first reply
    answers the client's own first command, the session has no greeting and
    no sender, and the injected message never reaches a recorder.  A real
    message over the same TLS session is delivered (the control).
    """
    probe, control = f"injected-{kind}", f"after-tls-{kind}"
    client = setup.connect(kind)
    K.ehlo(client)
    client.send(
        b"STARTTLS\r\nEHLO injected.example\r\nMAIL FROM:<>\r\n"
        b"RCPT TO:<injected@outside.test>\r\nRCPT TO:<injected@example.test>\r\n"
        b"DATA\r\n" + K.message(probe)
    )
    assert K.pair(client.reply()) == (220, "2.0.0 SMTP server ready")
    client.starttls(client_context())  # asserts that no other plaintext reply came
    assert K.pair(client.command("RCPT TO:<bob@example.test>")) == NEED_HELO
    assert K.pair(client.command("MAIL FROM:<>")) == NEED_HELO
    ehlo = K.ehlo(client)
    assert "STARTTLS" not in ehlo.lines
    assert K.pair(client.command("RCPT TO:<bob@example.test>")) == NEED_MAIL
    if kind == "submission":
        assert K.auth_plain(client, *K.BOB[:2])[0] == 235
    _queue(client, _sender(kind), f"control-{kind}@example.test", control)
    assert client.command("QUIT").code == 221
    client.close()
    setup.wait_delivered({control})
    seen = setup.probes()
    assert probe not in seen
    assert [t.accepted for _, t in seen[control]] == [[f"control-{kind}@example.test"]]
    everyone = {a for _, t in setup.downstream() for a in t.accepted}
    assert not everyone & {"injected@outside.test", "injected@example.test"}


@pytest.mark.parametrize("kind", KINDS)
def test_plaintext_before_the_handshake_is_not_executed(setup: K.Setup, kind: str) -> None:
    """
    Plaintext sent after the 220 to STARTTLS, before the handshake, is read
    as TLS: the handshake fails and nothing is executed; the gateway keeps
    serving (a new session on the same connector queues a message).
    """
    client = setup.connect(kind)
    K.ehlo(client)
    assert client.command("STARTTLS").code == 220
    client.send(b"MAIL FROM:<>\r\nRCPT TO:<preshake@outside.test>\r\nDATA\r\n"
                + K.message(f"preshake-{kind}"))
    with pytest.raises((ssl.SSLError, OSError)):
        client.starttls(client_context())
        client.command("NOOP")
    client.close()
    with _ready(setup, kind) as again:
        _queue(again, _sender(kind), f"preshake-control-{kind}@example.test",
               f"preshake-control-{kind}")
    setup.wait_delivered({f"preshake-control-{kind}"})
    assert f"preshake-{kind}" not in setup.probes()
    assert not K.gateway_tracebacks(setup)


# -- input after QUIT ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_after_quit_is_executed(setup: K.Setup, kind: str) -> None:
    """
    One packet with a whole transaction, QUIT, and a second transaction:
    the first is queued and delivered, 221 is the last reply, the connection
    closes and the second transaction never reaches a recorder; bytes sent
    after the 221 get no answer either.
    """
    before, after = f"before-quit-{kind}", f"after-quit-{kind}"
    client = _ready(setup, kind)
    sender = _sender(kind)
    client.send(
        f"MAIL FROM:<{sender}>\r\nRCPT TO:<{before}@example.test>\r\nDATA\r\n".encode()
        + K.message(before)
        + f"QUIT\r\nMAIL FROM:<{sender}>\r\nRCPT TO:<{after}@example.test>\r\nDATA\r\n".encode()
        + K.message(after)
    )
    replies = [K.pair(client.reply()) for _ in range(5)]
    assert replies[:3] == [(250, "2.1.0 Sender OK"), K.OK_RCPT, (354, replies[2][1])]
    assert replies[3][0] == 250 and QUEUED_TEXT in replies[3][1], replies
    assert replies[4][0] == 221, replies
    try:
        client.send(b"RSET\r\nMAIL FROM:<>\r\nNOOP\r\n")
    except OSError:
        pass  # the gateway may have closed already: nothing was executed either way
    assert _eof(client)
    client.close()
    setup.wait_delivered({before})
    assert after not in setup.probes()
    everyone = {a for _, t in setup.downstream() for a in t.accepted}
    assert f"{after}@example.test" not in everyone


# -- NUL and 8-bit bytes in commands -------------------------------------------

#: (command line as sent, whether it needs a MAIL first, the reply)
HOSTILE = [
    (b"\x00", False, UNRECOGNIZED),
    (b"\x00\x00\x00EHLO client.example", False, UNRECOGNIZED),
    (b"MA\x00IL FROM:<>", False, UNRECOGNIZED),
    (b"NOOP\x00", False, UNRECOGNIZED),
    (b"\xff\xfe\xfd\xfc", False, UNRECOGNIZED),
    (b"RCPT\xa0TO:<bob@example.test>", False, UNRECOGNIZED),
    (b"\xc0\xafMAIL FROM:<>", False, UNRECOGNIZED),
    (b"AUTH \x00PLAIN", False, (504, "5.7.4 Unrecognized authentication type")),
    (b"MAIL FROM:<a\x00b@sender.test>", False, BAD_SENDER),
    (b"MAIL FROM:<sender@sender.test\x00@example.test>", False, BAD_SENDER),
    (b"MAIL FROM:<s\xe9nder@sender.test>", False, BAD_SENDER),
    (b"MAIL FROM:<>\x00", False, INVALID_ARGS),
    (b"MAIL FROM:<> BODY=8BITMIME\x00", False, INVALID_ARGS),
    (b"MAIL FROM:<> SIZE=10\xff", False, INVALID_ARGS),
    (b"RCPT TO:<bob@example.test\x00@outside.test>", True, K.BAD_RCPT),
    (b"RCPT TO:<bob@outside.test\x00@example.test>", True, K.BAD_RCPT),
    (b"RCPT TO:<bob\x00@example.test>", True, K.BAD_RCPT),
    (b"RCPT TO:<\x00@example.test>", True, K.BAD_RCPT),
    (b"RCPT TO:<bob@example.test>\x00", True, INVALID_ARGS),
    (b"RCPT TO:<bob@example.test> \x00", True, INVALID_ARGS),
    (b"RCPT TO:<bob@example.test> NOTIFY=\x00", True, INVALID_ARGS),
    (b"RCPT TO:<b\xe9b@example.test>", True, K.BAD_RCPT),
    (b"RCPT TO:<bob@ex\xe4mple.test>", True, K.BAD_RCPT),
    (b"RCPT TO:<bob@example.test\xff>", True, K.BAD_RCPT),
    (b"RCPT TO:<\xc3\xa9@example.test>", True, K.BAD_RCPT),  # UTF-8 without SMTPUTF8
    (b"RCPT TO:<bob@example.test\xc2\x85>", True, K.BAD_RCPT),  # NEL, a C1 control
    (b"RCPT TO:<bob@example.test\xed\xa0\x80>", True, K.BAD_RCPT),  # an encoded surrogate
]
#: The greeting name the NUL/8-bit sessions use: it lands in Received.
HOSTILE_HELO = b"EHLO hostile\x00name\xff\xfe.example"


@pytest.mark.parametrize("kind", KINDS)
def test_nul_and_8bit_bytes_in_commands(setup: K.Setup, kind: str) -> None:
    """
    Each hostile line gets its SPEC refusal and the session goes on (NOOP
    250 after each); every recipient carrying a NUL or 8-bit byte is refused,
    so none reaches a recorder; a message from the session, greeted with a
    name holding NUL and 8-bit bytes, is delivered with a Received header
    free of both.
    """
    probe = f"hostile-{kind}"
    client = _ready(setup, kind, helo=HOSTILE_HELO)
    sender = _sender(kind)
    wrong = []
    for line, needs_mail, expected in HOSTILE:
        if line.startswith(b"AUTH") and kind == "submission":
            expected = (503, "5.5.1 Already authenticated")  # bob is logged in there
        if needs_mail:
            assert K.pair(client.command(f"MAIL FROM:<{sender}>")) == (250, "2.1.0 Sender OK")
        client.send(line + b"\r\n")
        got = K.pair(client.reply())
        if got != expected:
            wrong.append((line, got, expected))
        assert K.pair(client.command("NOOP")) == (250, "2.0.0 OK"), line
        if needs_mail:
            assert client.command("RSET").code == 250
    # SMTPUTF8 allows UTF-8, never undecodable bytes or controls.
    assert K.pair(client.command(f"MAIL FROM:<{sender}> SMTPUTF8")) == (250, "2.1.0 Sender OK")
    for line in (b"RCPT TO:<b\xe9b@example.test>", b"RCPT TO:<bob@example.test\xc2\x85>",
                 b"RCPT TO:<b\x00b@example.test>"):  # fmt: skip
        client.send(line + b"\r\n")
        got = K.pair(client.reply())
        if got != K.BAD_RCPT:
            wrong.append((line, got, K.BAD_RCPT))
    assert client.command("RSET").code == 250
    assert not wrong, wrong
    _queue(client, sender, f"{probe}@example.test", probe)
    assert client.command("QUIT").code == 221
    client.close()
    setup.wait_delivered({probe})
    (name, txn), = setup.probes()[probe]
    assert txn.accepted == [f"{probe}@example.test"]
    assert txn.data is not None
    head = txn.data.split(b"\r\n\r\n", 1)[0]
    received = [h for h in head.split(b"\r\nX-")[0].split(b"\r\n") if h]
    assert any(h.startswith(b"Received: from hostile?name") for h in received), head
    assert b"\x00" not in txn.data and all(b < 0x80 for b in head), head
    everyone = [a for _, t in setup.downstream() for a in t.accepted + t.refused]
    # The hostile recipients as a recorder would decode them: the extended
    # gateway (test_relay_proxy_tls_e2e) also carries legitimate SMTPUTF8 ones.
    sent = {line[len(b"RCPT TO:<"):].partition(b">")[0].decode("utf-8", "replace")
            for line, _, _ in HOSTILE if line.startswith(b"RCPT TO:<")}
    sent = {a for a in sent if not a.isascii() or not a.isprintable()}
    assert not [a for a in everyone if "\ufffd" in a or not a.isprintable() or a in sent]
    assert not K.gateway_tracebacks(setup)


# -- recipient limit -----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_recipient_limit(setup: K.Setup, kind: str) -> None:
    """
    MAIL, limit + 2 recipients (with refused outside ones between them on
    the connectors without relay) and DATA pipelined in one packet: exactly
    C{max_recipients} get 250, every further one 452 4.5.3, refused ones do
    not count; downstream the message has exactly those recipients.  The
    next transaction of the session may again have C{max_recipients}.
    """
    limit = (K.KINDS | K.EXTENDED_KINDS)[kind][1]
    relay = kind.endswith("relay")
    probe = f"limit-{kind}"
    wanted = [f"{probe}-{n}@{'outside.test' if relay and n % 2 else 'example.test'}"
              for n in range(limit)]
    refused = [] if relay else [f"{probe}-refused@outside.test"]
    over = [f"{probe}-over-{n}@example.test" for n in range(2)]
    order = wanted[:1] + refused + wanted[1:] + over
    client = _ready(setup, kind)
    sender = _sender(kind)
    client.send(f"MAIL FROM:<{sender}>\r\n".encode()
                + b"".join(f"RCPT TO:<{a}>\r\n".encode() for a in order) + b"DATA\r\n")
    assert K.pair(client.reply()) == (250, "2.1.0 Sender OK")
    got = {a: K.pair(client.reply()) for a in order}
    expected = {a: K.OK_RCPT for a in wanted} | {a: K.NO_RELAY for a in refused} | {
        a: K.TOO_MANY for a in over}
    assert got == expected
    assert client.reply().code == 354
    client.send(K.message(probe))
    reply = client.reply()
    assert reply.code == 250 and QUEUED_TEXT in reply.text, reply
    # The limit is per transaction.
    again = [f"{probe}-again-{n}@example.test" for n in range(limit)]
    assert K.pair(client.command(f"MAIL FROM:<{sender}>")) == (250, "2.1.0 Sender OK")
    assert [K.pair(client.command(f"RCPT TO:<{a}>")) for a in again] == [K.OK_RCPT] * limit
    assert K.pair(client.command(f"RCPT TO:<{probe}-again-over@example.test>")) == K.TOO_MANY
    assert client.command("RSET").code == 250
    assert client.command("QUIT").code == 221
    client.close()
    setup.wait_recipients(probe, len(wanted))
    delivered = setup.probes()[probe]
    routes = {name: sorted(t.accepted) for name, t in delivered}
    assert sorted(a for r in routes.values() for a in r) == sorted(wanted)
    assert routes.get("trap", []) == sorted(a for a in wanted if a.endswith("@outside.test"))
    everyone = {a for _, t in setup.downstream() for a in t.accepted}
    assert not everyone & set(over + refused + again)


def test_gateway_still_serves(setup: K.Setup) -> None:
    """After every hostile session the gateway is up, with no traceback in its output."""
    assert setup.gateway.running()
    with socket.create_connection(("127.0.0.1", setup.ports["default"]), timeout=10) as s:
        assert s.recv(4096).startswith(b"220 ")
    assert not K.gateway_tracebacks(setup)
