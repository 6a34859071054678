"""
Property-based fuzzing of the ESMTP session and of the configuration loader
(issue 11, "Must show" 3): hypothesis strategies and the properties they
must keep, shared by the bounded CI run (C{tests/test_fuzz.py}) and the long
run (C{bench/fuzz.py}).

Session: random and mutated command sequences (every verb, AUTH PLAIN and
LOGIN exchanges with good and bad credentials, STARTTLS with pipelined
plaintext, BDAT chunks of right and wrong sizes, DATA with odd line ends,
NULs and dots, lines around the 2,000-octet limit), fed in random segments
to a L{tests.fakes.Harness} session on connectors of several shapes, with
the clock advanced while the session waits.  Properties: no traceback
(no C{log_failure} event, no 451 4.3.0), every line written is a reply
whose code and enhanced code come from the reply table, a 250 2.6.0 for
each committed message and no other commit, no spool writer left open, and
the session ends by itself once its timeouts pass (no hang).

Configuration: random TOML documents, and the shipped C{etc/relaygw.toml}
and embedded default mutated structurally (a value replaced, a key removed
or added) and textually (characters inserted, removed, lines dropped).
Property: L{load_text} returns a configuration or raises L{ConfigError}
naming the file, a key path and a problem, never another exception.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import tempfile
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from hypothesis import strategies as st
from twisted.cred.portal import Portal
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher

from relaygw import replies
from relaygw.auth.checker import AddressLookup, DirectoryChecker
from relaygw.auth.realm import UserRealm
from relaygw.config._load import load_text
from relaygw.config._model import AuthThrottle, Grant
from relaygw.errors import ConfigError
from relaygw.replies import Reply
from tests.fakes import Harness, make_connector

REPO = Path(__file__).resolve().parents[1]

__all__ = [
    "COUNTS",
    "check_config",
    "check_session",
    "config_texts",
    "no_hang",
    "sessions",
]

#: Examples run per property, for the reports of bench/fuzz.py.
COUNTS: dict[str, int] = {"session": 0, "config": 0, "smuggling": 0}


class Hang(Exception):
    """An example ran past its time bound."""


@contextmanager
def no_hang(seconds: float) -> Iterator[None]:
    """Fail with L{Hang} (inside the code under test) after C{seconds}."""

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"example still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- the session ---------------------------------------------------------------

def _allowed_codes() -> frozenset[tuple[int, str]]:
    fixed = {(r.code, r.enhanced) for r in vars(replies).values() if isinstance(r, Reply)}
    made = [replies.bye("f"), replies.greeting("b"), replies.helo("f", "1"),
            replies.ehlo("f", "1", ["X"]), replies.queued("<m>", "Q", "f"),
            replies.rate_limited("f"), replies.timeout("f"), replies.auth_challenge(""),
            replies.bdat_ok(1)]
    return frozenset(fixed | {(r.code, r.enhanced) for r in made})


#: (code, enhanced code) of every reply in relaygw/replies.py.
ALLOWED = _allowed_codes()
_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -])(.*)$", re.S)
_ENHANCED = re.compile(rb"^([245]\.[0-9]{1,3}\.[0-9]{1,3}) ")

THROTTLE = AuthThrottle(max_failures=3, window=timedelta(minutes=15),
                        delay=timedelta(seconds=1), max_delay=timedelta(seconds=4))
RELAY = Grant("SMTP Relay Devices", frozenset({"submit", "relay", "accept-any-sender"}))
_USERS = [(b"alice", b"s3cret"), (b"alice", b"wrong"), (b"", b""), (b"nobody", b"x"),
          (b"ALICE", b"s3cret"), (b"al\x00ice", b"s3cret")]


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


_ADDRESSES = st.sampled_from([
    b"<>", b"<a@example.test>", b"<b@elsewhere.test>", b"<@x,@y:c@example.test>",
    b'<"q@uoted"@example.test>', b"<a%b@elsewhere.test@example.test>", b"<a@[127.0.0.1]>",
    b"<a@>", b"<a>", b"<", b">", b"a@example.test", "<\u00e9@\u00e9.test>".encode(),
    b"<alice@example.test>", b"<x@EXAMPLE.TEST.>", b"<a!b@example.test>",
])
_MAIL_PARAMS = st.sampled_from([b"", b" SIZE=100", b" SIZE=99999999999", b" SIZE=-1",
                                b" BODY=8BITMIME", b" BODY=BINARYMIME", b" BODY=7BIT",
                                b" SMTPUTF8", b" AUTH=<>", b" FOO=bar", b" SIZE", b" BODY="])
_VERBS = st.sampled_from([b"HELO", b"EHLO", b"RSET", b"NOOP", b"QUIT", b"VRFY", b"HELP",
                          b"EXPN", b"XYZZY", b"STARTTLS", b"DATA", b"AUTH", b"BDAT",
                          b"mail from:", b"rcpt to:", b"ehlo", b"TURN", b""])
_JUNK_ARGS = st.sampled_from([b"", b"c", b"client.test", b"0", b"10 LAST", b"-1", b"LAST",
                              b"PLAIN", b"LOGIN", b"CRAM-MD5", b"\x00\xff\xfe", b" ",
                              b"x" * 300])
_EOL = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])
_BODY_PIECES = st.sampled_from([b"line", b"\r\n", b"\n", b"\r", b".", b"..", b"\x00",
                                b"\r\n.\r\n", b"\r\n..\r\n", b"Subject: x\r\n",
                                b"Message-ID: <m@x>\r\n", b"\xe9", b"\t", b" ",
                                b"MAIL FROM:<spoof@victim.test>\r\n", b"x" * 3000])


@st.composite
def _auth(draw: st.DrawFn) -> bytes:
    user, password = draw(st.sampled_from(_USERS))
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return b"AUTH PLAIN " + _b64(b"\x00" + user + b"\x00" + password) + b"\r\n"
    if kind == 1:
        return b"AUTH PLAIN\r\n" + _b64(b"\x00" + user + b"\x00" + password) + b"\r\n"
    if kind == 2:
        return b"AUTH LOGIN\r\n" + _b64(user) + b"\r\n" + _b64(password) + b"\r\n"
    if kind == 3:
        return b"AUTH LOGIN " + _b64(user) + b"\r\n" + _b64(password) + b"\r\n"
    if kind == 4:
        return b"AUTH PLAIN\r\n*\r\n"
    if kind == 5:
        return b"AUTH PLAIN " + draw(st.binary(max_size=40)) + b"\r\n"
    return b"AUTH LOGIN\r\n" + draw(st.binary(max_size=20)) + b"\r\n="


@st.composite
def _data(draw: st.DrawFn) -> bytes:
    body = b"".join(draw(st.lists(_BODY_PIECES, max_size=12)))
    end = draw(st.sampled_from([b"\r\n.\r\n", b"\r\n.\r\n", b".\r\n", b"\n.\n", b""]))
    return b"DATA\r\n" + body + end


@st.composite
def _bdat(draw: st.DrawFn) -> bytes:
    content = b"".join(draw(st.lists(_BODY_PIECES, max_size=6)))
    size = len(content) + draw(st.sampled_from([0, 0, 0, -1, 1, 5]))
    last = draw(st.sampled_from([b"", b" LAST", b" last", b" LAST x"]))
    return b"BDAT %d%s\r\n" % (max(size, 0), last) + content


@st.composite
def _transaction(draw: st.DrawFn) -> bytes:
    """A plausible transaction, so that fuzzing reaches the message paths."""
    sender = draw(st.sampled_from([b"<a@elsewhere.test>", b"<>", b"<alice@example.test>"]))
    rcpts = draw(st.lists(st.sampled_from([b"<x@example.test>", b"<y@example.test>",
                                           b"<z@elsewhere.test>"]), min_size=1, max_size=3))
    out = b"MAIL FROM:" + sender + draw(_MAIL_PARAMS) + b"\r\n"
    out += b"".join(b"RCPT TO:" + r + b"\r\n" for r in rcpts)
    if draw(st.booleans()):
        return out + draw(_data())
    return out + b"".join(draw(st.lists(_bdat(), min_size=1, max_size=3)))


@st.composite
def _command(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 14))
    if kind <= 1:
        return b"MAIL FROM:" + draw(_ADDRESSES) + draw(_MAIL_PARAMS) + draw(_EOL)
    if kind <= 3:
        return b"RCPT TO:" + draw(_ADDRESSES) + draw(st.sampled_from([b"", b" NOTIFY=NEVER"])) \
            + draw(_EOL)
    if kind == 4:
        return draw(_auth())
    if kind <= 6:
        return draw(_data())
    if kind == 7:
        return draw(_bdat())
    if kind == 8:
        return b"STARTTLS\r\n" + draw(st.sampled_from([b"", b"MAIL FROM:<a@b.test>\r\n"]))
    if kind == 9:
        return draw(st.binary(max_size=120)) + draw(_EOL)
    if kind == 10:
        n = draw(st.sampled_from([1998, 1999, 2000, 2001, 2002, 5000]))
        prefix = draw(st.sampled_from([b"", b"MAIL FROM:<", b"AUTH PLAIN ", b"EHLO "]))
        return prefix + b"a" * (n - len(prefix)) + draw(_EOL)
    if kind == 11:
        return draw(st.sampled_from([b"EHLO client.test\r\n", b"HELO c\r\n", b"RSET\r\n"]))
    if kind == 12:
        return draw(_VERBS) + b" " + draw(_JUNK_ARGS) + draw(_EOL)
    return draw(_transaction())


@st.composite
def _mutated(draw: st.DrawFn, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 2))
        i = draw(st.integers(0, len(buf)))
        if op == 0:
            buf[i:i] = draw(st.sampled_from([b"\r", b"\n", b"\x00", b".", b"\r\n", b" ", b"\xff"]))
        elif op == 1 and buf:
            del buf[i : i + draw(st.integers(1, 8))]
        elif buf:
            buf[min(i, len(buf) - 1)] = draw(st.integers(0, 255))
    return bytes(buf)


_VALID = (b"EHLO client.test\r\nMAIL FROM:<a@elsewhere.test>\r\nRCPT TO:<x@example.test>\r\n"
          b"DATA\r\nSubject: hi\r\n\r\n.dot\r\nbody\r\n.\r\nMAIL FROM:<>\r\n"
          b"RCPT TO:<y@example.test>\r\nBDAT 6\r\nab\r\ncdBDAT 3 LAST\r\nef\n"
          b"AUTH PLAIN " + _b64(b"\x00alice\x00s3cret") + b"\r\nRSET\r\nQUIT\r\n")

#: Connector shapes: keyword arguments of L{make_connector}.
CONNECTORS = [
    {"allow_plaintext_auth": True},
    {"max_message_size": 4096, "max_recipients": 2, "allow_plaintext_auth": True},
    {"tls": "starttls", "require_tls": True},
    {"tls": "starttls", "permissions_anonymous": frozenset()},
    {"protocol_logging": "verbose", "allow_plaintext_auth": True},
]


@st.composite
def sessions(draw: st.DrawFn) -> dict[str, Any]:
    """One session: the connector shape, the input, its segment sizes, the directory state."""
    if draw(st.integers(0, 3)) == 0:
        data = draw(_mutated(_VALID))
    else:
        hello = draw(st.sampled_from([b"EHLO client.test\r\n"] * 3 + [b"HELO c\r\n", b""]))
        data = hello + b"".join(draw(st.lists(_command(), min_size=1, max_size=25)))
    return {
        "connector": draw(st.integers(0, len(CONNECTORS) - 1)),
        "data": data,
        "cuts": draw(st.lists(st.integers(1, 300), max_size=20)),
        "directory_down": draw(st.booleans()),
    }


def _harness(shape: int, directory_down: bool) -> Harness:
    from tests.test_checker import RecordingDirectory

    values: dict[str, Any] = {"auth_throttle": THROTTLE, "grants": (RELAY,)}
    values.update(CONNECTORS[shape])
    options = object()
    harness = Harness(make_connector(**values), tls_options=lambda c: options)
    directory = RecordingDirectory()
    directory.add("alice", "s3cret", ("alice@example.test",),
                  ("CN=SMTP Relay Devices,OU=Groups,DC=example,DC=test",))
    directory.addresses.add("x@example.test")
    directory.down = directory_down
    factory = harness.factory
    factory.portal = Portal(UserRealm(), [DirectoryChecker(directory, harness.reactor,
                                                           timedelta(minutes=5))])
    factory.addresses = AddressLookup(directory, harness.reactor)
    return harness


def _open(transport: Any) -> bool:
    return bool(transport.connected and not transport.disconnecting)


def _check_lines(written: bytes) -> list[bytes]:
    assert written == b"" or written.endswith(b"\r\n"), written[-200:]
    lines = written.split(b"\r\n")[:-1]
    for line in lines:
        m = _LINE.match(line)
        assert m is not None, line
        code, text = int(m.group(1)), m.group(3)
        enhanced = _ENHANCED.match(text)
        key = (code, enhanced.group(1).decode() if enhanced else "")
        assert key in ALLOWED, line
        assert not line.startswith(b"451 4.3.0"), "an unexpected error was answered"
    return lines


def check_session(case: dict[str, Any]) -> None:
    """Run one fuzzed session and check the properties (module docstring)."""
    COUNTS["session"] += 1
    events = EventLoggingObserver()
    globalLogPublisher.addObserver(events)
    try:
        _run_session(case, events)
    finally:
        globalLogPublisher.removeObserver(events)


def _run_session(case: dict[str, Any], events: EventLoggingObserver) -> None:
    harness = _harness(case["connector"], case["directory_down"])
    session, transport = harness.connect()
    data: bytes = case["data"]
    cuts = case["cuts"] or [len(data) or 1]
    i = k = 0
    with no_hang(10):
        while i < len(data) and _open(transport):
            n = cuts[k % len(cuts)]
            k += 1
            session.dataReceived(data[i : i + n])
            i += n
            if session._waiting:
                harness.reactor.advance(5)  # a throttled AUTH answers later
        # No hang: whatever state it is left in, the session ends by itself
        # once the command and data timeouts have passed.
        for _ in range(4):
            if not _open(transport):
                break
            harness.reactor.advance(601)
        closed = not _open(transport)
        if _open(transport):
            session.connectionLost(None)
    lines = _check_lines(transport.value())
    failures = [e for e in events if "log_failure" in e]
    assert not failures, [e.get("log_format") for e in failures][:3]
    assert closed, "the session did not close after its timeouts"
    queued = sum(1 for line in lines if line.startswith(b"250 2.6.0 "))
    assert queued == len(harness.spool.committed), (queued, len(harness.spool.committed))
    if not session._waiting:
        assert not [w for w in harness.spool.writers if w.state in ("open", "committing")]


# -- the configuration loader ------------------------------------------------

_SAMPLES = {
    "etc/relaygw.toml": (REPO / "etc" / "relaygw.toml").read_text(encoding="utf-8"),
    "default.toml": (REPO / "relaygw" / "config" / "default.toml").read_text(encoding="utf-8"),
}
#: Bare keys, TOML-quoted keys (an unknown key may be any string) and indexes.
_KEY = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*")'
_KEY_PATH = re.compile(rf"^{_KEY}(?:\[\d+\])*(?:\.{_KEY}(?:\[\d+\])*)*$")

_scalars = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["36MiB", "10MB", "0s", "-1s", "5m", "2d", "1e9s", "600/m", "0/m",
                     "127.0.0.1:25", "[::1]:25", "0.0.0.0-255.255.255.255", "::/0",
                     "192.168.0.300", "10.0.0.0/33", "starttls", "implicit", "off", "mx",
                     "smarthost", "maildir", "graph", "active-directory", "ldap", "verbose",
                     "1.0", "1.3", "submit", "relay", "", "var/spool", "/nonexistent/x",
                     "ldaps://dc1.example.test", "*.example.test", "example.test",
                     "internal-relay", "authoritative", "{fqdn}", "\u00e9", "a\u0000b"]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2**31, 25, 65536]),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.datetimes(), st.dates(), st.times(),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
_NAMES = st.sampled_from(["gateway", "dns", "accepted_domains", "directory", "users",
                          "connectors", "routes", "queue", "name", "bindings", "remote_ranges",
                          "tls", "via", "smarthosts", "domain", "route", "hostname",
                          "permissions", "anonymous", "timeouts", "max_message_size",
                          "bogus", "oauth", "graph", "workers"])


def _toml_string(text: str) -> str:
    out = json.dumps(text, ensure_ascii=False)
    return out.replace("\x7f", "\\u007f")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_string(str(k))} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(type(value))


def _toml(document: dict[str, object]) -> str:
    """TOML text of C{document}: every top-level key as one inline value."""
    return "".join(f"{_toml_string(k)} = {_toml_value(v)}\n" for k, v in document.items())


def _paths(value: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


@st.composite
def _structural(draw: st.DrawFn, text: str) -> str:
    document: Any = tomllib.loads(text)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(document)
        path = draw(st.sampled_from(paths))
        parent: Any = document
        for step in path[:-1]:
            parent = parent[step]
        last: Any = path[-1]
        op = draw(st.integers(0, 3))
        if op == 0:
            parent[last] = draw(_values)
        elif op == 1:
            del parent[last]
        elif op == 2 and isinstance(parent, dict):
            parent[draw(_NAMES)] = draw(_values)
        elif isinstance(parent, list):
            parent.append(parent[last])  # a duplicate connector, route, binding...
    return _toml(document)


@st.composite
def _textual(draw: st.DrawFn, text: str) -> str:
    lines = text.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        if op == 0 and lines:
            del lines[i]
        elif op == 1 and lines:
            lines.insert(i, lines[draw(st.integers(0, len(lines) - 1))])
        elif lines:
            line = lines[i]
            j = draw(st.integers(0, len(line)))
            piece = draw(st.sampled_from(['"', "'", "[", "]", "=", "\\", ",", "0", "\n", "#",
                                          "{", "}", "\x00", "\u00e9", "-", ".", "x"]))
            lines[i] = line[:j] + piece + line[j + (op == 3):]
    return "".join(lines)


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    """A configuration text: a mutated sample or a random document."""
    kind = draw(st.integers(0, 4))
    if kind == 4:
        return _toml(draw(st.dictionaries(_NAMES.map(str), _values, max_size=6)))
    sample = draw(st.sampled_from(sorted(_SAMPLES)))
    if kind < 3:
        return draw(_structural(_SAMPLES[sample]))
    return draw(_textual(_SAMPLES[sample]))


_BASE = Path(tempfile.gettempdir()) / "relaygw-fuzz-config-base"


def check_config(text: str) -> None:
    """Load C{text}: a configuration or a well-formed L{ConfigError}, nothing else."""
    COUNTS["config"] += 1
    with no_hang(10):
        try:
            load_text(text, "relaygw.toml", _BASE)
        except ConfigError as e:
            assert e.file == "relaygw.toml", e
            assert e.problem and isinstance(e.problem, str), e
            assert e.key_path == "" or _KEY_PATH.match(e.key_path), repr(e.key_path)
            assert str(e).startswith("relaygw.toml: "), e


# -- SMTP smuggling at the session -------------------------------------------

_SMUGGLED = b"MAIL FROM:<spoof@victim.test>\r\nRCPT TO:<y@example.test>\r\nDATA\r\nevil\r\n"
_MARKER = b"MAIL FROM:<a@elsewhere.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\nmarker\r\n.\r\n"


@st.composite
def smuggling_cases(draw: st.DrawFn) -> dict[str, Any]:
    """A DATA message whose body holds an end-of-data look-alike, then a smuggled MAIL."""
    variant = b"".join(draw(st.lists(st.sampled_from([b"\r", b"\n", b"\x00", b".", b" "]),
                                     min_size=1, max_size=7)))
    return {"variant": variant, "cuts": draw(st.lists(st.integers(1, 40), max_size=8))}


_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def check_smuggling(case: dict[str, Any]) -> None:
    """
    The variant ends the message only where it holds a real CRLF.CRLF; else
    the message is refused with 550 5.6.11 (a bare CR or LF) or committed
    whole, smuggled commands inside; the gateway answers each command once.
    """
    COUNTS["smuggling"] += 1
    variant: bytes = case["variant"]
    body = b"Subject: s\r\n\r\nline" + variant + _SMUGGLED
    if b"\r\n.\r\n" in b"\r\n" + body:
        return  # a real end of data: what follows is the client's own next command
    harness = Harness(make_connector())
    session, transport = harness.connect()
    data = (b"EHLO c\r\nMAIL FROM:<a@elsewhere.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n"
            + body + b".\r\n" + _MARKER + b"QUIT\r\n")
    cuts = case["cuts"] or [len(data)]
    i = k = 0
    with no_hang(10):
        while i < len(data) and _open(transport):
            session.dataReceived(data[i : i + cuts[k % len(cuts)]])
            i += cuts[k % len(cuts)]
            k += 1
    finals = [line for line in _check_lines(transport.value()) if line[3:4] == b" "]
    # Undo the client-side view of dot-stuffing: a line starting with "." loses it.
    refused = _BARE.search(body) is not None
    codes = [line[:3] for line in finals]
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"550" if refused else b"250",
                     b"250", b"250", b"354", b"250", b"221"], finals
    committed = [d for _, d in harness.spool.committed]
    if refused:
        assert finals[5].startswith(b"550 5.6.11 "), finals
        assert len(committed) == 1 and b"marker" in committed[0] and b"spoof" not in committed[0]
    else:
        assert len(committed) == 2, committed
        assert committed[0].endswith(_SMUGGLED), committed[0]
