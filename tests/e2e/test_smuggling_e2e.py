"""
SMTP smuggling end to end (issue 11, "Must show" 2): a real gateway takes
each end-of-data variant of the SMTP smuggling research (DATA and BDAT, with
and without BODY=BINARYMIME) from a raw socket client and relays what it
accepts through a smarthost route to a deliberately lenient receiver, one
that ends the data at any of those variants and reads what follows as
commands (the receivers the attack fools).

For each variant, the message carries a smuggled second
C{MAIL FROM/RCPT TO/DATA} in its body.  The variant is either refused with
550 5.6.11 (bare CR or LF outside BINARYMIME, SPEC section 3) and then never
arrives downstream at all, or accepted and arrives downstream as exactly one
message holding the smuggled text as content; the smuggled sender never
opens a transaction, at the gateway (its replies are counted) or downstream.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.e2e.conftest import HOST, Launch, gateway_toml, spool_entries
from tests.servers.ports import free_ports, wait_until
from tests.servers.scripted_smtp import LENIENT_END, ScriptedSMTP, Transaction

pytestmark = pytest.mark.e2e

SENDER = "sender@outside.test"
RCPT = "user@remote.test"
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_FINAL = re.compile(rb"^(\d{3}) ")


def _config(port: int, admin: int, relay: int) -> str:
    return gateway_toml(admin) + f"""
[[accepted_domains]]
domain = "remote.test"
route = "hub"

[[routes]]
name = "hub"
via = "smarthost"
smarthosts = ["127.0.0.1:{relay}"]
tls = "off"

[[connectors]]
name = "Devices"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
"""


@attrs.frozen
class Gateway:
    port: int
    relay: ScriptedSMTP
    spool: Path


@pytest.fixture(scope="module")
def gateway(module_launch: Launch, module_workdir: Path) -> Iterator[Gateway]:
    relay = ScriptedSMTP(lambda address: None, lenient=True).start()
    try:
        port, admin = free_ports(2)
        module_launch(module_workdir / "gw", _config(port, admin, relay.port), [port])
        yield Gateway(port, relay, module_workdir / "gw" / "var" / "spool")
    finally:
        relay.stop()


def _smuggled(tag: str) -> bytes:
    return (f"MAIL FROM:<spoof-{tag}@victim.test>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n"
            f"Subject: smuggled {tag}\r\n\r\nevil\r\n").encode()


def _body(tag: str, variant: bytes) -> bytes:
    return (f"Subject: smuggle {tag}\r\nFrom: <{SENDER}>\r\n\r\nline one".encode()
            + variant + _smuggled(tag) + b"last line\r\n")


#: (id, end-of-data variant); each goes once by DATA, once by BDAT, once by BDAT BINARYMIME.
VARIANTS = [
    ("lf-dot-lf", b"\n.\n"),
    ("lf-dot-crlf", b"\n.\r\n"),
    ("cr-dot-cr", b"\r.\r"),
    ("cr-dot-crlf", b"\r.\r\n"),
    ("crlf-dot-lf", b"\r\n.\n"),
    ("crlf-dot-cr", b"\r\n.\r"),
    ("crlf-dot-cr-crlf", b"\r\n.\r\r\n"),
    ("crlf-nul-dot-crlf", b"\r\n\x00.\r\n"),
    ("crlf-dot-nul-crlf", b"\r\n.\x00\r\n"),
    ("crlf-nul-dot-nul-crlf", b"\r\n\x00.\x00\r\n"),
    ("lf-nul-dot-nul-lf", b"\n\x00.\x00\n"),
    ("crlf-dot-space-crlf", b"\r\n. \r\n"),
    ("crlf-dot-crlf", b"\r\n.\r\n"),  # a real end in DATA, so DATA sends it stuffed
]


def _session(mode: str, tag: str, variant: bytes) -> tuple[bytes, list[bytes], bool]:
    """
    (what the client sends, the final reply codes it must get, whether the
    gateway must refuse the message).
    """
    body = _body(tag, variant)
    wire = f"EHLO client.e2e.test\r\nMAIL FROM:<{SENDER}>".encode()
    if mode == "bdat-binarymime":
        wire += b" BODY=BINARYMIME"
    wire += f"\r\nRCPT TO:<{RCPT}>\r\n".encode()
    codes = [b"220", b"250", b"250", b"250"]
    checked = mode != "bdat-binarymime"
    refuse = checked and _BARE.search(body) is not None
    if mode == "data":
        sent = body.replace(b"\r\n.\r\n", b"\r\n..\r\n")  # the client's own stuffing
        wire += b"DATA\r\n" + sent + b".\r\n"
        codes += [b"354", b"550" if refuse else b"250"]
    else:
        # Two chunks cut inside the variant: the edge must not matter either.
        cut = body.index(b"line one") + len(b"line one") + len(variant) // 2 + 1
        first, last = body[:cut], body[cut:]
        wire += b"BDAT %d\r\n%sBDAT %d LAST\r\n%s" % (len(first), first, len(last), last)
        if checked and _BARE.search(first.removesuffix(b"\r")):
            # A refused chunk ends the transaction (RFC 3030 section 4.2):
            # the LAST chunk finds no MAIL.  (A CR ending the chunk is
            # judged by the next one.)
            codes += [b"550", b"503"]
        else:
            codes += [b"250", b"550" if refuse else b"250"]
    marker = f"Subject: marker {tag}\r\n\r\nafter\r\n".encode()
    wire += (f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode() + marker
             + b".\r\nQUIT\r\n")
    return wire, codes + [b"250", b"250", b"354", b"250", b"221"], refuse


def _talk(port: int, wire: bytes) -> list[bytes]:
    """Send C{wire} at once (PIPELINING), read to the close; the final reply lines."""
    with socket.create_connection((HOST, port), timeout=20) as sock:
        sock.sendall(wire)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return [line for line in received.split(b"\r\n") if _FINAL.match(line)]


def _mentions(txn: Transaction, text: bytes) -> bool:
    return text in (txn.data or b"")


CASES = [(mode, name, v) for mode in ("data", "bdat", "bdat-binarymime") for name, v in VARIANTS]


@pytest.mark.parametrize(("mode", "name", "variant"), CASES,
                         ids=[f"{m}-{n}" for m, n, _ in CASES])
def test_end_of_data_variant(gateway: Gateway, mode: str, name: str, variant: bytes) -> None:
    """
    Refused with 550 5.6.11 and never delivered, or delivered downstream as
    one message with the smuggled commands inside it; never two messages.
    """
    tag = f"{mode}-{name}"
    wire, expected, refuse = _session(mode, tag, variant)
    finals = _talk(gateway.port, wire)
    # Every command the client sent got exactly one final reply: the gateway
    # never read the smuggled MAIL/RCPT/DATA as commands.
    assert [line[:3] for line in finals] == expected, finals
    verdict = [line for line in finals[4:7] if line.startswith((b"250 2.6.0 ", b"550 "))]
    assert verdict and verdict[0].startswith(b"550 5.6.11 " if refuse else b"250 2.6.0 "), finals

    def arrived() -> bool:
        got = gateway.relay.transactions()
        return (any(_mentions(t, f"Subject: marker {tag}".encode()) for t in got)
                and not spool_entries(gateway.spool))

    wait_until(arrived, 30, 0.05, f"the marker message of {tag} downstream, spool empty")
    transactions = gateway.relay.transactions()
    assert not [t for t in transactions if t.sender.startswith("spoof-")], \
        "a smuggled MAIL FROM opened a transaction downstream"
    mine = [t for t in transactions if _mentions(t, f"smuggle {tag}".encode())
            or _mentions(t, f"smuggled {tag}".encode())]
    if refuse:
        assert mine == [], "a refused message arrived downstream"
        return
    assert len(mine) == 1, [t.data for t in mine]
    (txn,) = mine
    assert (txn.sender, txn.accepted) == (SENDER, [RCPT])
    assert txn.raw is not None and txn.data is not None
    assert _BARE.search(txn.raw) is None, txn.raw
    # The lenient receiver found no end before the real one, and the
    # smuggled commands are content, up to the last line.
    assert LENIENT_END.search(b"\r\n" + txn.raw + b".\r\n").end() == len(txn.raw) + 5
    assert txn.data.endswith(_smuggled(tag) + b"last line\r\n"), txn.data
    assert b"line one" in txn.data
