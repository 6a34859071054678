"""
The open-relay battery (issue 11, "Must show" 1; SPEC sections 2 and 3):
the address forms of the classic relay testers, each in every session form
(anonymous with the null sender or a foreign or an accepted-domain sender,
HELO, after RSET, after a failed AUTH, after STARTTLS, after a plaintext AUTH
that STARTTLS must forget, from the address next to the trusted one,
authenticated with and without the relay right) on every connector kind
(L{tests.e2e.connector_kinds}: the Default Frontend, Client Submission and
the trusted-IP Anonymous Relay connector), against the real gateway process.

Each form is its own transaction with an C{X-Probe} header.  The test checks
the reply and then what the two downstream recorders received: a form whose
routing domain (the domain after the last C{@} outside quotes, source route
dropped) is not accepted is refused with 550 5.7.54 unless the session may
relay, and then reaches only the "trap" default route; a form inside the
accepted domains reaches only the "inside" route; the envelope recipient
downstream is exactly the expected one; malformed forms get 501 5.1.3.  The
last test checks that nothing else at all (no stray message, no DSN, no
recipient left over from before an RSET) reached either recorder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import attrs
import pytest

from tests.e2e import connector_kinds as K
from tests.e2e.conftest import spool_entries
from tests.servers.ports import wait_until
from tests.servers.smtp_clients import LineClient

pytestmark = pytest.mark.e2e

INSIDE, OUTSIDE, BAD = "inside", "outside", "bad"
#: A recipient given and then reset in the RSET contexts: it must never arrive.
DECOY = "decoy-after-rset@example.test"
#: Probe ids queued so far, with the recorder and recipient each must reach.
QUEUED: dict[str, tuple[str, str]] = {}


@attrs.frozen
class Form:
    """
    One address form.

    @ivar rcpt: the RCPT argument as sent (after C{RCPT }).
    @ivar where: L{INSIDE} (the routing domain is accepted), L{OUTSIDE} or
        L{BAD} (refused on every connector).
    @ivar envelope: the recipient the downstream server must see.
    @ivar strict: an L{INSIDE} form must be accepted (else it may be refused).
    @ivar utf8: MAIL carries SMTPUTF8.
    @ivar refusal: the reply to a L{BAD} form.
    """

    what: str
    rcpt: str
    where: str
    envelope: str = ""
    strict: bool = True
    utf8: bool = False
    refusal: tuple[int, str] = K.BAD_RCPT


def _to(address: str, where: str, envelope: str | None = None, **kw: object) -> Form:
    what = str(kw.pop("what"))
    return Form(what, f"TO:<{address}>", where,
                address if envelope is None else envelope, **kw)  # type: ignore[arg-type]


CYR_A = "\u0430"  # Cyrillic small a, looks like Latin a
FORMS = [
    # -- inside the accepted domains -------------------------------------------
    _to("bob@example.test", INSIDE, what="plain accepted"),
    _to("BOB@EXAMPLE.TEST", INSIDE, what="upper case accepted"),
    _to("Bob@eXaMpLe.TeSt", INSIDE, what="mixed case accepted"),
    _to("bob@example.test.", INSIDE, what="accepted, trailing dot", strict=False),
    _to("bob@host.corp.test", INSIDE, what="wildcard subdomain"),
    _to("bob@Deep.Host.CORP.test", INSIDE, what="wildcard, deeper, mixed case"),
    _to("bob@internal.test", INSIDE, what="internal-relay domain"),
    _to("bob%outside.test@example.test", INSIDE, what="percent hack"),
    _to("bob%outside.test%other.test@example.test", INSIDE, what="double percent hack"),
    _to("outside.test!bob@example.test", INSIDE, what="bang path"),
    _to("outside.test!other.test!bob@example.test", INSIDE, what="two-hop bang path"),
    _to('"bob@outside.test"@example.test', INSIDE, what="quoted local part holding @"),
    _to('"bob%outside.test"@example.test', INSIDE, what="quoted percent hack"),
    _to('"bob\\"@outside.test"@example.test', INSIDE, what="quoted, escaped quote and @"),
    _to('"@outside.test:bob"@example.test', INSIDE, what="quoted source route"),
    _to("@outside.test:bob@example.test", INSIDE, "bob@example.test",
        what="source route to accepted"),
    _to("@outside.test,@other.test:bob@example.test", INSIDE, "bob@example.test",
        what="two-hop source route to accepted"),
    Form("unbracketed accepted", "TO:bob@example.test", INSIDE, "bob@example.test"),
    Form("space after colon", "TO: <bob@example.test>", INSIDE, "bob@example.test"),
    # -- outside: refused unless the session may relay -------------------------
    _to("bob@outside.test", OUTSIDE, what="plain outside"),
    _to("bob@Outside.Test", OUTSIDE, what="outside, mixed case"),
    _to("BOB@OUTSIDE.TEST", OUTSIDE, what="outside, upper case"),
    _to("bob@outside.test.", OUTSIDE, what="outside, trailing dot"),
    _to("bob@[127.0.0.1]", OUTSIDE, what="IPv4 literal"),
    _to("bob@[192.0.2.25]", OUTSIDE, what="IPv4 literal, remote"),
    _to("bob@[IPv6:::1]", OUTSIDE, what="IPv6 literal"),
    _to("@example.test:bob@outside.test", OUTSIDE, "bob@outside.test",
        what="source route via accepted"),
    _to("@example.test,@host.corp.test:bob@outside.test", OUTSIDE, "bob@outside.test",
        what="two-hop source route via accepted"),
    _to('"bob@example.test"@outside.test', OUTSIDE, what="quoted accepted, outside last"),
    _to("bob%example.test@outside.test", OUTSIDE, what="percent hack, outside last"),
    _to("example.test!bob@outside.test", OUTSIDE, what="bang path, outside last"),
    _to("bob@example.test.outside.test", OUTSIDE, what="accepted domain as a prefix"),
    _to("bob@outside-example.test", OUTSIDE, what="accepted domain as a suffix"),
    _to("bob@corp.test", OUTSIDE, what="parent of a wildcard domain"),
    _to("bob@evilcorp.test", OUTSIDE, what="wildcard suffix without a dot"),
    _to("bob@internal.test.outside.test", OUTSIDE, what="internal-relay as a prefix"),
    Form("unbracketed outside", "TO:bob@outside.test", OUTSIDE, "bob@outside.test"),
    _to(f"bob@ex{CYR_A}mple.test", OUTSIDE, what="Cyrillic a look-alike", utf8=True),
    _to("bob@example.t\u0435st", OUTSIDE, what="Cyrillic e in the TLD", utf8=True),
    _to("bob@" + f"ex{CYR_A}mple".encode("idna").decode() + ".test", OUTSIDE,
        what="punycode of the look-alike"),
    _to("bob@xn--example-.test", OUTSIDE, what="punycode prefix on accepted name"),
    # -- malformed: refused on every connector ---------------------------------
    _to("bob@outside.test@example.test", BAD, what="second @, accepted last"),
    _to("bob@example.test@outside.test", BAD, what="second @, outside last"),
    _to("bob@@example.test", BAD, what="doubled @"),
    _to("bob%outside.test", BAD, what="percent hack without a domain"),
    _to("outside.test!bob", BAD, what="bang path without a domain"),
    _to("outside!bob", BAD, what="short bang path"),
    _to('"bob@outside.test"', BAD, what="quoted @ without a domain"),
    _to("bob@", BAD, what="empty domain"),
    _to("@example.test:bob", BAD, what="source route without a domain"),
    _to("bob@.example.test", BAD, what="empty label"),
    _to("bob@example..test", BAD, what="empty inner label"),
    _to("bob@example.test..", BAD, what="two trailing dots"),
    _to("bob@[127.0.0.1].example.test", BAD, what="literal before accepted"),
    _to("bob@[127.0.0.256]", BAD, what="bad IPv4 literal"),
    Form("nested brackets", "TO:<<bob@outside.test>@example.test>", BAD,
         refusal=(501, "5.5.4 Invalid arguments")),
    _to(f"bob@ex{CYR_A}mple.test", BAD, what="look-alike without SMTPUTF8"),
    _to("bob@example\u3002test", BAD, what="ideographic full stop", utf8=True),
    # IDNA maps these to the accepted name: refused, never relayed under it
    _to(f"bob@{'example'.translate({c: c + 0xFEE0 for c in range(0x61, 0x7B)})}.test",
        BAD, what="fullwidth look-alike", utf8=True),
    _to("bob@example.te\u017ft", BAD, what="long s look-alike (IDNA maps it to s)",
        utf8=True),
    _to("bob@\u212a.corp.test", BAD, what="Kelvin sign (lower() gives k)", utf8=True),
    _to("bob@example.test\u00ad", BAD, what="soft hyphen", utf8=True),
    _to("bob@exa\u200bmple.test", BAD, what="zero-width space", utf8=True),
    Form("null recipient", "TO:<>", BAD),
    Form("no TO:", "<bob@example.test>", BAD, refusal=(501, "5.5.4 Invalid arguments")),
    Form("path then junk", "TO:<bob@outside.test>@example.test", BAD,
         refusal=(501, "5.5.4 Invalid arguments")),
    Form("two paths", "TO:<bob@example.test> <bob@outside.test>", BAD,
         refusal=(501, "5.5.4 Invalid arguments")),
]


@attrs.frozen
class Context:
    """
    A session form: how the session is opened and what it may do.

    @ivar open: opens the session up to its first MAIL.
    @ivar relay: the session holds the relay right.
    @ivar mail_refusal: the reply every MAIL gets, when the session may not send.
    @ivar sender: the reverse path of each MAIL.
    @ivar reset_first: give, then RSET, a decoy transaction before each form.
    """

    id: str
    open: Callable[[K.Setup], LineClient]
    relay: bool
    sender: str = ""
    mail_refusal: tuple[int, str] | None = None
    reset_first: bool = False


def _session(kind: str, *steps: str, source: str | None = None) -> Callable[[K.Setup], LineClient]:
    """
    A session opener: connect to C{kind} and run C{steps} in order:
    C{ehlo}, C{helo}, C{tls}, C{auth-alice}, C{auth-bob}, C{auth-wrong}
    (and C{auth-karl} on the C{extended} gateway).
    """

    def open_(setup: K.Setup) -> LineClient:
        client = setup.connect(kind, source)
        for step in steps:
            if step == "ehlo":
                K.ehlo(client)
            elif step == "helo":
                assert client.command("HELO relay-tester.example").code == 250
            elif step == "tls":
                K.starttls(client)
            elif step in ("auth-alice", "auth-bob", "auth-karl"):
                user, password, _ = {"auth-alice": K.ALICE, "auth-bob": K.BOB,
                                     "auth-karl": K.KARL}[step]
                assert K.auth_plain(client, user, password) == (235, "2.7.0 Authentication successful")
            elif step == "auth-wrong":
                assert K.auth_plain(client, K.ALICE[0], K.WRONG_PASSWORD) == (
                    535, "5.7.3 Authentication unsuccessful")
            else:
                raise AssertionError(step)
        return client

    return open_


NOT_AUTHENTICATED = (530, "5.7.57 SMTP; Client was not authenticated to send anonymous mail "
                          "during MAIL FROM")  # fmt: skip
MUST_STARTTLS = (530, "5.7.10 Must issue a STARTTLS command first")
CONTEXTS = [
    # Default Frontend: anonymous submission to accepted domains only
    Context("default-anonymous", _session("default", "ehlo"), relay=False),
    Context("default-helo-foreign-sender", _session("default", "helo"), relay=False,
            sender="device@sender.test"),
    Context("default-accepted-sender", _session("default", "ehlo"), relay=False,
            sender="postmaster@example.test"),
    Context("default-after-rset", _session("default", "ehlo"), relay=False, reset_first=True),
    Context("default-after-failed-auth", _session("default", "ehlo", "auth-wrong"), relay=False),
    Context("default-after-starttls", _session("default", "ehlo", "tls"), relay=False),
    Context("default-auth-then-starttls", _session("default", "ehlo", "auth-alice", "tls"),
            relay=False),
    Context("default-failed-auth-over-tls", _session("default", "ehlo", "tls", "auth-wrong"),
            relay=False),
    Context("default-neighbour-of-trusted-ip", _session("default", "ehlo", source=K.NEIGHBOUR_IP),
            relay=False),
    Context("default-authenticated", _session("default", "ehlo", "tls", "auth-alice"), relay=True,
            sender=K.ALICE[2]),
    # Client Submission: nothing anonymous, relay for "Relay Users" only
    Context("submission-no-tls", _session("submission", "ehlo"), relay=False,
            mail_refusal=MUST_STARTTLS),
    Context("submission-anonymous-tls", _session("submission", "ehlo", "tls"), relay=False,
            mail_refusal=NOT_AUTHENTICATED),
    Context("submission-after-failed-auth", _session("submission", "ehlo", "tls", "auth-wrong"),
            relay=False, mail_refusal=NOT_AUTHENTICATED),
    Context("submission-user-without-relay", _session("submission", "ehlo", "tls", "auth-bob"),
            relay=False, sender=K.BOB[2]),
    Context("submission-relay-user", _session("submission", "ehlo", "tls", "auth-alice"),
            relay=True, sender=K.ALICE[2]),
    Context("submission-relay-user-after-rset",
            _session("submission", "ehlo", "tls", "auth-alice"), relay=True, reset_first=True),
    # Anonymous Relay: the trusted IP may relay anywhere
    Context("relay-anonymous", _session("relay", "ehlo"), relay=True),
    Context("relay-helo-foreign-sender", _session("relay", "helo"), relay=True,
            sender="scanner@outside.test"),
    Context("relay-after-starttls", _session("relay", "ehlo", "tls"), relay=True),
    Context("relay-after-failed-auth", _session("relay", "ehlo", "tls", "auth-wrong"),
            relay=True, reset_first=True),
]


@pytest.fixture(scope="module")
def setup(relaygw_installed: None, module_workdir: Path) -> Iterator[K.Setup]:
    started = K.start(module_workdir / "gw")
    yield started
    K.stop(started)


@attrs.frozen
class Outcome:
    form: Form
    probe: str
    mail: tuple[int, str]
    rcpt: tuple[int, str]
    data: tuple[int, str] | None


def _run(setup: K.Setup, ctx: Context, forms: Sequence[Form] = FORMS) -> list[Outcome]:
    """Every form in one session of C{ctx}, one transaction each."""
    outcomes = []
    with ctx.open(setup) as client:
        for n, form in enumerate(forms):
            probe = f"{ctx.id}/{n}"
            utf8 = " SMTPUTF8" if form.utf8 else ""
            if ctx.reset_first:
                assert K.pair(client.command(f"MAIL FROM:<{ctx.sender}>")) == (250, "2.1.0 Sender OK")
                assert K.pair(client.command(f"RCPT TO:<{DECOY}>")) == K.OK_RCPT
                assert K.pair(client.command("RSET")) == (250, "2.0.0 Resetting")
            mail = K.pair(client.command(f"MAIL FROM:<{ctx.sender}>{utf8}"))
            rcpt = K.pair(client.command(f"RCPT {form.rcpt}"))
            data = None
            if rcpt[0] == 250:
                assert client.command("DATA").code == 354
                client.send(K.message(probe))
                data = K.pair(client.reply())
            outcomes.append(Outcome(form, probe, mail, rcpt, data))
            # RSET's 250 also keeps the bad-command count from closing the session.
            assert K.pair(client.command("RSET")) == (250, "2.0.0 Resetting")
        assert client.command("QUIT").code == 221
    return outcomes


def _judge(ctx: Context, o: Outcome) -> str | None:
    """What is wrong with the replies of one outcome (C{None}: nothing)."""
    form = o.form
    if ctx.mail_refusal is not None:
        if o.mail != ctx.mail_refusal or o.rcpt != (503, "5.5.1 Sender not yet given"):
            return f"MAIL {o.mail}, RCPT {o.rcpt}; expected MAIL {ctx.mail_refusal}"
        return None
    if o.mail != (250, "2.1.0 Sender OK"):
        return f"MAIL refused {o.mail}"
    queued = o.data is not None and o.data[0] == 250 and "Queued mail for delivery" in o.data[1]
    if o.rcpt[0] == 250 and not queued:
        return f"RCPT accepted but DATA got {o.data}"
    if form.where == BAD:
        return None if o.rcpt == form.refusal else f"RCPT {o.rcpt}, expected {form.refusal}"
    if form.where == OUTSIDE and not ctx.relay:
        return None if o.rcpt == K.NO_RELAY else f"RCPT {o.rcpt}, expected {K.NO_RELAY}"
    if form.where == INSIDE and not form.strict and o.rcpt[0] >= 500:
        return None
    return None if o.rcpt == K.OK_RCPT else f"RCPT {o.rcpt}, expected {K.OK_RCPT}"


def _route(form: Form) -> str:
    """The recorder a form may reach: "inside" for the accepted domains, else "trap"."""
    return "inside" if form.where == INSIDE else "trap"


@pytest.mark.parametrize("ctx", CONTEXTS, ids=[c.id for c in CONTEXTS])
def test_relay_battery(setup: K.Setup, ctx: Context) -> None:
    """
    Every address form in one session form: the SPEC reply, and each
    accepted form delivered exactly once, to the route of its routing
    domain only, with the expected envelope recipient.
    """
    run_and_check(setup, ctx, QUEUED)


def run_and_check(setup: K.Setup, ctx: Context, queued_so_far: dict[str, tuple[str, str]],
                  forms: Sequence[Form] = FORMS) -> int:
    """
    Run C{forms} in one session of C{ctx} and check the replies and the
    recorders (also for the other modules' connector kinds); each queued
    probe is added to C{queued_so_far}.

    @return: the number of messages checked at the recorders.
    """
    outcomes = _run(setup, ctx, forms)
    problems = [f"{o.form.what} <{o.form.rcpt}>: {p}"
                for o in outcomes if (p := _judge(ctx, o)) is not None]
    queued = {o.probe: o for o in outcomes if o.data is not None and o.data[0] == 250}
    for probe, o in queued.items():
        queued_so_far[probe] = (_route(o.form), o.form.envelope)
    if queued:
        setup.wait_delivered(set(queued))
    seen = setup.probes()
    for probe, o in queued.items():
        where = _route(o.form)
        got = [(name, txn.accepted) for name, txn in seen.get(probe, [])]
        if got != [(where, [o.form.envelope])]:
            problems.append(f"{o.form.what} <{o.form.rcpt}>: downstream got {got}, "
                            f"expected [({where!r}, [{o.form.envelope!r}])]")
    assert not problems, f"{len(problems)} problem(s) in {ctx.id}:\n" + "\n".join(problems)
    assert not K.gateway_tracebacks(setup)
    return len(queued)


def test_forms_and_contexts_cover_the_issue() -> None:
    """The battery is as large as issue 11 asks: 30+ forms, every connector kind."""
    assert len(FORMS) >= 30
    assert {f.where for f in FORMS} == {INSIDE, OUTSIDE, BAD}
    kinds = {c.id.split("-")[0] for c in CONTEXTS}
    assert kinds == set(K.KINDS)


def test_nothing_else_reached_downstream(setup: K.Setup) -> None:
    """
    Once the spool is empty, the recorders hold exactly the queued probes:
    no message without a probe id (a DSN, a stray), no probe twice, and the
    recipient reset by RSET nowhere.
    """
    spool = setup.gateway.workdir / "var" / "spool"
    wait_until(lambda: not spool_entries(spool), 60, 0.1, what="the spool to drain")
    seen = setup.probes()
    assert "" not in seen, [txn for _, txn in seen[""]]
    assert set(seen) == set(QUEUED)
    for probe, delivered in seen.items():
        assert len(delivered) == 1, (probe, delivered)
        name, txn = delivered[0]
        assert (name, txn.accepted) == (QUEUED[probe][0], [QUEUED[probe][1]]), probe
    everyone = [a for _, txn in setup.downstream() for a in txn.accepted + txn.refused]
    assert DECOY not in everyone
    assert QUEUED, "no probe was queued at all"
