"""
AUTH guessing spread over many connections, source addresses and login
names (issue 11): at most C{max_failures} wrong passwords reach the
directory per throttled IP, user name or account, however many AUTHs
arrive at once and under whichever of an account's names.

The unit tests drive L{relaygw.auth.throttle.guarded_login} through a real
twisted.cred portal and L{DirectoryChecker} on a L{Clock}, over the
recording IDirectory fake (held answers play a directory that has not
answered yet).  The last test runs L{LDAPDirectory} against a real slapd
behind a proxy that swallows the answer to the user bind: the bind is not
sent a second time to the next server.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from relaygw import replies
from relaygw.auth.checker import DirectoryChecker
from relaygw.auth.realm import UserRealm
from relaygw.auth.sasl import Credentials
from relaygw.auth.throttle import Attempt, LoginResult, Throttle, guarded_login
from relaygw.config._model import AuthThrottle
from relaygw.interfaces import DirectoryUnavailable, IAccountGate
from relaygw.session.peers import PeerLimits
from tests.servers import slapd as S
from tests.servers.dirtest import DirectoryTestCase, settings, unavailable
from tests.test_checker import RecordingDirectory

M = 3
SETTINGS = AuthThrottle(max_failures=M, window=timedelta(minutes=10),
                        delay=timedelta(0), max_delay=timedelta(0))  # fmt: skip
ACCOUNT = "CN=alice,CN=Users,DC=corp,DC=test"
ALIASES = ("alice", "CORP\\alice", "alice@corp.test", "alice.smith@example.test")


class Gateway:
    """One connector's throttle and portal over the recording directory."""

    def __init__(self, settings: AuthThrottle = SETTINGS, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.directory = RecordingDirectory()
        self.directory.hold = True
        self.directory.add(ACCOUNT, "right")
        self.directory.add("bob", "bobpw")
        for alias in ALIASES:
            self.directory.accounts[alias.casefold()] = ACCOUNT
        self.throttle = Throttle(settings, self.clock)
        self.portal = Portal(UserRealm(), [DirectoryChecker(self.directory, self.clock)])

    def login(self, user: str, password: str, ip: str) -> Deferred[LoginResult]:
        credentials = Credentials(user.encode(), password.encode(), ip, "C")
        return guarded_login(self.portal, self.throttle, credentials, self.clock, {}, 60.0)

    def asked(self, what: str = "authenticate") -> int:
        return sum(1 for call, _ in self.directory.calls if call == what)

    def answer_all(self, value: Any) -> int:
        """Answer every held directory call (and those they let in) with C{value}."""
        answered = 0
        while self.directory.held:
            d = self.directory.held.pop(0)
            if isinstance(value, Exception):
                d.errback(value)
            else:
                d.callback(value)
            answered += 1
        return answered


def fired(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (not with a failure)."""
    box: list[Any] = []

    def keep(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(keep)
    assert box, "not fired"
    assert not isinstance(box[0], Failure), box[0]
    return box[0]


def ip(i: int) -> str:
    return f"127.0.{i // 250}.{i % 250 + 1}"


def outcomes(results: list[Deferred[LoginResult]]) -> list[str]:
    return [fired(d).result for d in results]


def test_parallel_guesses_for_one_user_reach_the_directory_max_failures_times() -> None:
    """
    Twenty wrong passwords for one user arriving at once from twenty source
    addresses: only max_failures (3) are checked while the rest wait; when
    those fail, the rest are 535 throttled without asking.
    """
    gw = Gateway()
    results = [gw.login("printer", "wrong", ip(i)) for i in range(20)]
    assert gw.asked() == M
    assert gw.throttle.in_flight("user:printer") == M
    gw.answer_all(UnauthorizedLogin("wrong password"))
    assert gw.asked() == M
    assert sorted(outcomes(results)) == ["failure"] * M + ["throttled"] * (20 - M)
    assert all(fired(d).reply == replies.AUTH_FAILED for d in results)
    assert gw.throttle.in_flight("user:printer") == 0


def test_parallel_logins_with_the_right_password_wait_and_all_succeed() -> None:
    """
    Ten logins with the right password at once from one address: at most
    max_failures are in the directory at a time, none is refused.
    """
    gw = Gateway()
    results = [gw.login("bob", "bobpw", "192.0.2.7") for _ in range(10)]
    seen = 0
    while gw.directory.held:
        assert len(gw.directory.held) <= M
        gw.directory.held.pop(0).callback(gw.directory.users["bob"][1])
        seen += 1
    assert seen == 10
    assert outcomes(results) == ["success"] * 10
    assert gw.throttle.in_flight("ip:192.0.2.7") == 0


def test_tempfail_settles_without_counting() -> None:
    """
    A directory that does not answer (454) counts no failure, and the logins
    waiting behind its checks get 454 at once rather than wait for a
    timeout each; the next login is checked again.
    """
    gw = Gateway()
    results = [gw.login("printer", "whatever", ip(i)) for i in range(7)]
    assert gw.asked() == M
    assert gw.answer_all(DirectoryUnavailable("down")) == M
    assert outcomes(results) == ["tempfail"] * 7
    assert all(fired(d).reply == replies.AUTH_TEMPFAIL for d in results)
    assert gw.throttle.failures(ip(0), "printer") == 0
    assert gw.throttle.in_flight("user:printer") == 0
    later = gw.login("printer", "whatever", ip(8))
    assert gw.asked() == M + 1 and not later.called


def test_only_an_unanswered_check_fails_the_waiting() -> None:
    """
    With max_failures = 1: a check refused as busy (its account's checks in
    flight) lets the login waiting behind it in; a check the directory did
    not answer gives the one waiting behind it 454.
    """
    throttle = Throttle(AuthThrottle(max_failures=1, delay=timedelta(0),
                                     max_delay=timedelta(0)), Clock())  # fmt: skip
    other = fired(throttle.admit("192.0.2.1", "alice"))
    assert other.admit("CN=alice")
    busy = fired(throttle.admit("192.0.2.2", "CORP\\alice"))
    waiting = throttle.admit("192.0.2.2", "bob")
    assert not waiting.called
    assert not busy.admit("CN=alice") and busy.refused == "busy"
    busy.tempfail()
    let_in = fired(waiting)
    assert isinstance(let_in, Attempt)
    behind = throttle.admit("192.0.2.2", "carol")
    let_in.tempfail(unavailable=True)
    failures: list[Failure] = []
    behind.addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(DirectoryUnavailable)
    other.success()
    assert throttle.in_flight("ip:192.0.2.2") == throttle.in_flight("account:cn=alice") == 0


def test_guesses_over_the_aliases_of_one_account_bind_max_failures_times() -> None:
    """
    Five wrong passwords under each of four names of one account, each from
    its own address, one after another: the account is bound only
    max_failures times; then even its right password is 535 unbound, until
    the window has passed.
    """
    gw = Gateway()
    gw.directory.hold = False
    n = 0
    for alias in ALIASES:
        for _ in range(5):
            d = gw.login(alias, "wrong", ip(n))
            n += 1
            assert fired(d).reply == replies.AUTH_FAILED
    assert gw.asked("bind") == M
    assert fired(gw.login("alice@corp.test", "right", ip(n))).result == "throttled"
    assert gw.asked("bind") == M
    gw.clock.advance(SETTINGS.window.total_seconds())
    assert fired(gw.login("ALICE@corp.test", "right", ip(n + 1))).result == "success"
    assert gw.asked("bind") == M + 1


def test_parallel_guesses_over_the_aliases_are_bound_max_failures_times() -> None:
    """
    Two wrong passwords under each of four names at once (eight sources):
    three reach the bind, the other five get 454 (the account's checks are
    in flight), and afterwards every name of the account is throttled.
    """
    gw = Gateway()
    results = [gw.login(alias, "wrong", ip(i * 2 + k))
               for i, alias in enumerate(ALIASES) for k in range(2)]  # fmt: skip
    assert gw.asked("bind") == M
    assert gw.throttle.in_flight("account:" + ACCOUNT.lower()) == M
    gw.answer_all(UnauthorizedLogin("wrong password"))
    assert sorted(outcomes(results)) == ["failure"] * M + ["tempfail"] * (8 - M)
    for alias in ALIASES:
        assert fired(gw.login(alias, "wrong", "198.51.100.1")).reply == (
            replies.AUTH_FAILED)
    assert gw.asked("bind") == M
    assert gw.throttle.in_flight("account:" + ACCOUNT.lower()) == 0


def test_a_cancelled_wait_leaves_nothing_in_flight() -> None:
    """A login cancelled while it waits is never checked, and nothing stays counted."""
    gw = Gateway()
    results = [gw.login("bob", "bobpw", "192.0.2.8") for _ in range(M + 1)]
    results[-1].cancel()
    failures: list[Failure] = []
    results[-1].addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(CancelledError)
    gw.answer_all(gw.directory.users["bob"][1])
    assert gw.asked() == M
    assert gw.throttle.in_flight("ip:192.0.2.8") == gw.throttle.in_flight("user:bob") == 0


def test_an_attempt_is_an_account_gate_settled_once() -> None:
    """The attempt provides IAccountGate; a failover asks again and counts once."""
    throttle = Throttle(SETTINGS, Clock())
    attempt = fired(throttle.admit("192.0.2.1", "u"))
    assert isinstance(attempt, Attempt)
    assert verifyObject(IAccountGate, attempt)
    assert attempt.admit("CN=U") and attempt.admit("cn=u")
    assert throttle.in_flight("account:cn=u") == 1
    attempt.failure()
    attempt.failure()  # settled already: not counted twice
    attempt.success()
    assert throttle.failures("192.0.2.1", "u") == 1
    assert throttle.in_flight("account:cn=u") == throttle.in_flight("ip:192.0.2.1") == 0


# -- receiving processes -----------------------------------------------------------


class Processes:
    """
    The gateway process (C{procs[0]}, which decides admissions) and its
    workers, each with its own directory fake and throttle for connector
    "C", joined as L{relaygw.workers} joins them: a worker's line goes up
    its pipe to the gateway, which applies it and relays what is for every
    process down the others' pipes; the gateway's own lines go down every
    pipe.  Lines wait in the pipes until L{pump} (one hop each) or L{settle}.
    """

    def __init__(self, n: int, settings: AuthThrottle = SETTINGS) -> None:
        self.clock = Clock()
        self.procs = [Gateway(settings, self.clock) for _ in range(n)]
        self.up: list[deque[bytes]] = [deque() for _ in range(n)]
        self.down: list[deque[bytes]] = [deque() for _ in range(n)]
        self.lines = 0
        self.peers: list[PeerLimits] = []
        for i, proc in enumerate(self.procs):
            send = self._broadcast if i == 0 else self.up[i].append
            peers = PeerLimits(100 + i, send, self._lookup(proc), decides=i == 0)
            peers.attach("C", proc.throttle)
            self.peers.append(peers)

    @staticmethod
    def _lookup(proc: Gateway) -> Any:
        return lambda kind, name: proc.throttle if name == "C" else None

    def _broadcast(self, line: bytes, besides: int = 0) -> None:
        for i in range(1, len(self.procs)):
            if i != besides:
                self.down[i].append(line)

    def pump(self) -> None:
        """Every line now in a pipe crosses it (those it causes wait for the next pump)."""
        ups = [list(q) for q in self.up]
        downs = [list(q) for q in self.down]
        for q in (*self.up, *self.down):
            q.clear()
        for i, lines in enumerate(ups):
            for line in lines:
                self.lines += 1
                if self.peers[0].apply(line):
                    self._broadcast(line, besides=i)
        for i, lines in enumerate(downs):
            for line in lines:
                self.lines += 1
                self.peers[i].apply(line)

    def settle(self) -> None:
        for _ in range(1000):
            if not any(self.up) and not any(self.down):
                return
            self.pump()
        raise AssertionError("the pipes never emptied")

    def asked(self, what: str = "authenticate") -> int:
        return sum(proc.asked(what) for proc in self.procs)

    def answer_all(self, value: Any) -> int:
        """Answer every held directory call, in every process, until none is left."""
        answered = 0
        while True:
            self.settle()
            now = sum(proc.answer_all(value) for proc in self.procs)
            if not now:
                return answered
            answered += now


def test_guesses_spread_over_three_processes_reach_the_directory_max_failures_times() -> None:
    """
    The strict bound across receiving processes: 20 wrong passwords for one
    user at once in each of three processes (60 sources) make exactly
    max_failures checks in all, however the pipes interleave; the other 57
    are 535 unasked; the failures are counted in every process.
    """
    ps = Processes(3)
    results = [proc.login("printer", "wrong", ip(k * 20 + i))
               for i in range(20) for k, proc in enumerate(ps.procs)]  # fmt: skip
    assert ps.asked() <= M  # the gateway's own, decided at once
    ps.pump()  # the workers' asks reach the gateway ...
    ps.pump()  # ... and its answers them
    assert ps.asked() == M
    assert ps.procs[0].throttle.in_flight("user:printer") == M
    assert ps.answer_all(UnauthorizedLogin("wrong password")) == M
    assert ps.asked() == M
    assert sorted(outcomes(results)) == ["failure"] * M + ["throttled"] * (60 - M)
    assert all(proc.throttle.blocked("198.51.100.1", "printer") for proc in ps.procs)
    assert ps.procs[0].throttle.in_flight("user:printer") == 0
    print(f"3 processes, 60 guesses: {ps.asked()} checks, {ps.lines} pipe lines")


def test_a_right_password_gets_in_once_the_checks_settle() -> None:
    """
    Wrong passwords for bob in the gateway and one worker and his right
    password in the other are in flight (max_failures of them), while bob's
    right password waits in the first worker: the success clears bob's
    counts in every process and lets the waiting login in, which succeeds
    though the two wrong ones failed meanwhile.  After a burst has
    throttled bob, his right password gets in once the window has passed.
    """
    ps = Processes(3)
    g, w1, w2 = ps.procs
    wrong = [g.login("bob", "wrong", ip(1)), w1.login("bob", "wrong", ip(2))]
    right = w2.login("bob", "bobpw", ip(3))
    ps.settle()
    waiting = w1.login("bob", "bobpw", ip(4))
    ps.settle()
    assert ps.asked() == M and not waiting.called
    w2.directory.held.pop(0).callback(w2.directory.users["bob"][1])
    ps.settle()
    assert fired(right).result == "success"
    assert all(proc.throttle.failures(ip(9), "bob") == 0 for proc in ps.procs)
    assert ps.asked() == M + 1  # let in
    g.directory.held.pop(0).errback(UnauthorizedLogin("wrong password"))
    w1.directory.held.pop(0).errback(UnauthorizedLogin("wrong password"))
    ps.settle()
    assert outcomes(wrong) == ["failure", "failure"] and not waiting.called
    w1.directory.held.pop(0).callback(w1.directory.users["bob"][1])
    ps.settle()
    assert fired(waiting).result == "success"

    burst = [proc.login("bob", "wrong", ip(20 + k * 10 + i))
             for i in range(10) for k, proc in enumerate(ps.procs)]  # fmt: skip
    ps.answer_all(UnauthorizedLogin("wrong password"))
    assert set(outcomes(burst)) <= {"failure", "throttled"}
    assert fired(w1.login("bob", "bobpw", ip(90))).result == "throttled"
    ps.clock.advance(SETTINGS.window.total_seconds())
    for proc in ps.procs:
        proc.directory.hold = False
    late = w2.login("bob", "bobpw", ip(91))
    ps.settle()
    assert fired(late).result == "success"


def test_guesses_over_an_accounts_names_in_several_processes_bind_max_failures_times() -> None:
    """
    Four names of one account, two guesses each, in each of three processes
    at once: the account is bound max_failures times in all (the account
    gate of a worker asks the gateway); the others get 454 or 535.
    """
    ps = Processes(3)
    results = [proc.login(alias, "wrong", ip(n * 10 + k * 3 + i))
               for n, alias in enumerate(ALIASES) for k, proc in enumerate(ps.procs)
               for i in range(2)]  # fmt: skip
    ps.settle()
    assert ps.asked("bind") == M
    assert ps.procs[0].throttle.in_flight("account:" + ACCOUNT.lower()) == M
    ps.answer_all(UnauthorizedLogin("wrong password"))
    assert ps.asked("bind") == M
    got = outcomes(results)
    assert got.count("failure") == M and set(got) <= {"failure", "tempfail", "throttled"}
    for proc in ps.procs:
        later = proc.login("alice.smith@example.test", "right", "198.51.100.1")
        ps.settle()
        assert fired(later).reply == replies.AUTH_FAILED
    assert ps.asked("bind") == M
    assert ps.procs[0].throttle.in_flight("account:" + ACCOUNT.lower()) == 0


def test_a_worker_that_ends_takes_its_checks_and_waits_with_it() -> None:
    """
    A worker's three checks in flight hold "scan" for everybody, and its
    further logins wait at the gateway; once the gateway says the worker
    ended (forget), another process's login for "scan" is checked, and the
    dead worker's waits are never admitted.
    """
    ps = Processes(3)
    g, w1, w2 = ps.procs
    for i in range(M + 2):
        w1.login("scan", "wrong", ip(i))
    ps.settle()
    assert w1.asked() == M
    later = w2.login("scan", "wrong", ip(50))
    ps.settle()
    assert not later.called and w2.asked() == 0
    ps.up[1].clear()  # the worker died: what it wrote last is lost with it
    forget = PeerLimits.forget_message(ps.peers[1].origin)
    ps.peers[0].apply(forget)
    ps._broadcast(forget, besides=1)
    ps.settle()
    assert w2.asked() == 1
    assert g.throttle.in_flight("user:scan") == 1  # w2's check only
    w2.answer_all(UnauthorizedLogin("wrong password"))
    ps.settle()
    assert fired(later).result == "failure"
    assert g.throttle.in_flight("user:scan") == 0 and w1.asked() == M


def test_a_login_given_up_before_its_answer_leaves_nothing_in_flight() -> None:
    """
    A worker's login cancelled while the gateway has not answered yet (the
    client went away): the gateway's "go" is handed back at once, never
    checked; nothing stays in flight.
    """
    ps = Processes(2)
    g, w = ps.procs
    d = w.login("bob", "bobpw", ip(1))
    d.cancel()
    d.addErrback(lambda failure: None)
    ps.settle()
    assert w.asked() == 0
    assert g.throttle.in_flight("user:bob") == g.throttle.in_flight(f"ip:{ip(1)}") == 0


def test_an_ask_for_a_connector_the_gateway_lacks_is_tempfailed() -> None:
    """During a reload the gateway may not know a worker's connector yet: 454, never a hang."""
    ps = Processes(2)
    g, w = ps.procs
    ps.peers[0]._lookup = lambda kind, name: None
    d = w.login("bob", "bobpw", ip(1))
    ps.settle()
    assert fired(d).reply == replies.AUTH_TEMPFAIL and w.asked() == 0


def test_asks_left_unanswered_when_the_gateway_is_gone_are_tempfailed() -> None:
    """
    The gateway process died (the worker's stdin ended: close): the logins
    waiting for its answer get 454, an account gate waiting for it says no
    (a directory thread would wait for good), and so do later asks.
    """
    ps = Processes(2)
    w = ps.procs[1]
    admitted = w.login("alice", "wrong", ip(2))
    ps.pump()
    ps.pump()  # admitted: the directory found her account and asks about it
    assert w.asked() == 1 and len(ps.up[1]) == 1
    waiting = w.login("bob", "bobpw", ip(1))
    ps.up[1].clear()  # the gateway never read them
    ps.peers[1].close()
    assert fired(waiting).reply == replies.AUTH_TEMPFAIL
    assert fired(admitted).reply == replies.AUTH_TEMPFAIL
    assert fired(w.login("carol", "pw", ip(3))).reply == replies.AUTH_TEMPFAIL
    assert w.asked("bind") == 0


def test_an_ask_before_the_gateway_made_the_throttle_makes_it() -> None:
    """The gateway's lookup makes the connector's throttle on a worker's first ask."""
    made: list[Throttle] = []

    def lookup(kind: str, name: str) -> Throttle:
        if not made:
            made.append(Throttle(SETTINGS, Clock()))
        return made[0]

    out: list[bytes] = []
    gateway = PeerLimits(1, out.append, lookup, decides=True)
    assert gateway.apply(b'[2, "C", "a", "check", "7", "ip:10.0.0.1", "user:x"]') is False
    assert made and made[0].in_flight("user:x") == 1
    assert out == [b'[1, "C", "g", "2", "7", "go"]']
    gateway.apply(b'[2, "C", "e", "ip:10.0.0.1", "user:x"]')
    assert made[0].in_flight("user:x") == made[0].in_flight("ip:10.0.0.1") == 0


# -- failover at the user bind, against a real slapd ---------------------------------


class BindAnswerSwallower:
    """
    A plain-LDAP proxy (no TLS) that forwards everything but drops the
    server's answers once a connection has sent its second BindRequest (the
    first is the service account's, the second the user's): the user bind
    reaches slapd and gets no verdict back.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            upstream = socket.create_connection(self._target, timeout=5)
            swallow = threading.Event()
            for args in ((client, upstream, swallow, True), (upstream, client, swallow, False)):
                t = threading.Thread(target=self._pump, args=args, daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, source: socket.socket, sink: socket.socket, swallow: threading.Event,
              requests: bool) -> None:  # fmt: skip
        source.settimeout(0.1)
        buffer, binds = b"", 0
        try:
            while not self._stop.is_set():
                try:
                    data = source.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                if requests:
                    buffer += data
                    while (message := _ldap_message(buffer)) is not None:
                        buffer = buffer[len(message):]
                        binds += _is_bind(message)
                        if binds >= 2:
                            swallow.set()
                elif swallow.is_set():
                    continue
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._listener.close()


def _ldap_message(buffer: bytes) -> bytes | None:
    """The first whole BER LDAPMessage in C{buffer}, or C{None}."""
    if len(buffer) < 2:
        return None
    first = buffer[1]
    if first < 0x80:
        length, header = first, 2
    else:
        n = first & 0x7F
        if len(buffer) < 2 + n:
            return None
        length, header = int.from_bytes(buffer[2:2 + n], "big"), 2 + n
    return buffer[:header + length] if len(buffer) >= header + length else None


def _is_bind(message: bytes) -> bool:
    """Whether the LDAPMessage's protocolOp is a BindRequest ([APPLICATION 0], 0x60)."""
    at = 2 if message[1] < 0x80 else 2 + (message[1] & 0x7F)
    at += 2 + message[at + 1]  # messageID INTEGER
    return message[at] == 0x60


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S.Slapd]:
    unavailable(S.slapd_unavailable())
    server = S.start_slapd(tmp_path_factory.mktemp("guess-slapd"))
    yield server
    server.stop()


class BindFailoverTests(DirectoryTestCase):
    @pytest.fixture(autouse=True)
    def _servers(self, slapd: S.Slapd) -> None:
        self.slapd = slapd

    def binds(self, uid: str) -> int:
        log = (self.slapd.directory / "slapd.log").read_text(errors="replace")
        return log.count(f'BIND dn="{S.user_dn(uid)}" method=128')

    async def test_an_unanswered_user_bind_is_not_sent_to_the_next_server(self) -> None:
        """
        The first server gets the user bind and never answers it: 454
        (DirectoryUnavailable) after the timeout, and the second server (the
        same slapd, directly) is not asked to bind the user again.
        """
        proxy = BindAnswerSwallower(("127.0.0.1", int(self.slapd.ldap_url.rsplit(":", 1)[1])))
        self.addCleanup(proxy.stop)
        config = settings("ldap", (f"ldap://127.0.0.1:{proxy.port}", self.slapd.ldap_url),
                          base_dn=S.BASE_DN, bind_dn=S.SERVICE_DN, ca_file=self.slapd.ca_file,
                          start_tls=False, timeout=1)  # fmt: skip
        directory = self.directory(config, S.SERVICE_PASSWORD)
        before = self.binds("carol")
        with pytest.raises(DirectoryUnavailable) as caught:
            await directory.authenticate("carol", "wrong-guess")
        assert "not retried" in str(caught.value)
        deadline = time.monotonic() + 5
        while self.binds("carol") - before < 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # slapd writes its log asynchronously
        time.sleep(0.3)
        assert self.binds("carol") - before == 1
        # The same directory still fails over before the bind: a dead first
        # server is skipped and the right password logs in.
        proxy.stop()
        user = await directory.authenticate("carol", "carolpw")
        assert user.name == "carol"


def test_many_waiters_let_in_by_one_settle() -> None:
    """
    Three slow checks from one address hold 2,000 logins back; once the
    directory answers at once (as a cached login settles within the call),
    one settle lets them all through, one after another (a loop, not a
    call stack as deep as the waiters).
    """
    gw = Gateway()
    bob = gw.directory.users["bob"][1]
    results = [gw.login("bob", "bobpw", "192.0.2.9") for _ in range(2003)]
    assert len(gw.directory.held) == M
    gw.directory.hold = False
    gw.directory.held.pop(0).callback(bob)
    assert sum(d.called for d in results) == 2003 - (M - 1)
    gw.answer_all(bob)
    assert outcomes(results) == ["success"] * 2003
    assert gw.throttle.in_flight("ip:192.0.2.9") == 0
