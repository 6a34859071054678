"""
AUTH throttling and the guarded login a session runs for each AUTH.

Failures are counted per client IP and per user name (case-folded) in a
window that starts at the first failure and lasts C{window}.  Once either
count reaches C{max_failures}, AUTH is answered 535 without asking the
directory, so a misconfigured printer cannot lock the Active Directory
account it uses; throttled attempts count as failures.  The reply to a
failed (or throttled) AUTH is delayed by C{delay * 2 ** (failures - 1)},
capped at C{max_delay} and at the session's command timeout, where
C{failures} is the larger of the two counts.  Only that reply waits: the
session's later commands are answered at once.
A success clears both counts.  Memory is bounded: at most C{max_keys}
counters, expired ones dropped first, then the oldest.

Checks in flight count against the limit too (L{Throttle.admit}): a login
waits while failures plus checks in flight reach C{max_failures} for its
IP or user name, so N AUTHs arriving at once from N connections cannot all
reach the directory before the first failure is counted; waiting, not
refusing, because those in flight may succeed.  A tempfail (454) settles
its check without counting; when the directory did not answer, the logins
waiting behind that check get 454 at once instead of a timeout each.  The directory tells the throttle which
account (DN) a login name means before it binds (L{Attempt.admit}, the
L{IAccountGate}): failures are counted per account as well, a throttled
account is refused without a bind, and a check for an account whose
checks in flight would exceed the limit (guesses spread over its login
names at once) is answered 454 rather than waited for, since the
directory's thread would wait with it.

With receiving workers (L{relaygw.session.peers}) one throttle decides
every admission: the gateway (twistd) process's.  A worker asks it over
its pipe (L{Throttle.ask}: one round trip per check and per account, the
only cost the workers add to AUTH) and tells it the end of each check
after its outcome; the gateway applies the asks and ends in the one order
it reads them, so the bound is strict however many processes the guesses
are spread over: at most C{max_failures} checks per IP, user name and
account begin before the failures stop them.

Log events (C{event="auth.result"}) carry C{result} (C{success},
C{failure}, C{tempfail}, C{throttled}) with C{connector}, C{session_id},
C{peer} and C{auth_user}; never the password or the SASL payload.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import attrs
from attrs import evolve, frozen
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from relaygw import replies
from relaygw.auth.realm import IAuthenticatedUser
from relaygw.auth.sasl import Credentials
from relaygw.auth.user import AuthenticatedUser
from relaygw.config._model import AuthThrottle
from relaygw.interfaces import DirectoryUnavailable, IAccountGate
from relaygw.replies import Reply

__all__ = ["Attempt", "LoginResult", "Throttle", "guarded_login"]


@frozen
class _Count:
    start: float
    failures: int


#: An admission's verdict: C{"go"} (counted in flight), C{"blocked"} (the IP
#: or user has C{max_failures} failures: 535 unasked), C{"unavailable"} (a
#: check waited for got no answer: 454); for an account C{"go"},
#: C{"throttled"} or C{"busy"}.
Verdict = str
#: In a receiving worker: asks the gateway process to admit a check
#: (C{"check"}, its IP and user keys) or an account (C{"account"}, its key).
Ask = Callable[[str, tuple[str, ...]], "Deferred[Verdict]"]


@attrs.define(eq=False)
class _Waiter:
    keys: tuple[str, ...]
    result: Deferred[Verdict]
    #: The process that asked (its pid), 0 for this one.
    origin: int = 0


class Throttle:
    """
    Failure counters of one connector, and the checks in flight.

    @ivar settings: the connector's C{auth_throttle}.
    """

    def __init__(self, settings: AuthThrottle, clock: IReactorTime, max_keys: int = 100_000) -> None:
        self.settings = settings
        self._clock = clock
        self._max = max_keys
        self._counts: OrderedDict[str, _Count] = OrderedDict()
        #: Checks in flight per key (in the deciding process: every process's;
        #: none in a worker); C{_remote}: a worker's share of them (origin ->
        #: key -> checks), for L{remote_end} and L{forget}.
        self._pending: dict[str, int] = {}
        self._remote: dict[int, dict[str, int]] = {}
        #: Logins waiting for a check in flight on the key to settle.
        self._waiting: dict[str, deque[_Waiter]] = {}
        #: Waiters to try again, and whether that is being done (a loop, not
        #: a recursion: a waiter let in may settle at once, a cached login).
        self._woken: deque[_Waiter] = deque()
        self._waking = False
        #: Told C{("failure" | "success", ip, username, account)} of each
        #: outcome here, for the other receiving processes, and in a worker
        #: C{("end" | "end-unavailable", *keys)} of each check it was
        #: admitted to, for the gateway (L{relaygw.session.peers}).
        self.on_change: Callable[..., None] | None = None
        #: In a receiving worker: the gateway process decides admissions.
        self.ask: Ask | None = None

    @staticmethod
    def _keys(ip: str, username: str) -> tuple[str, str]:
        return f"ip:{ip}", f"user:{username.casefold()}"

    @staticmethod
    def _account(account: str) -> str:
        return f"account:{account.lower()}" if account else ""

    def _failures(self, key: str, now: float) -> int:
        count = self._counts.get(key)
        if count is None:
            return 0
        if now - count.start >= self.settings.window.total_seconds():
            del self._counts[key]
            return 0
        return count.failures

    def failures(self, ip: str, username: str) -> int:
        """The larger of the IP's and the user's failure counts in their windows."""
        now = self._clock.seconds()
        return max(self._failures(key, now) for key in self._keys(ip, username))

    def blocked(self, ip: str, username: str) -> bool:
        """Whether AUTH from C{ip} or as C{username} is answered 535 without a check."""
        return self.failures(ip, username) >= self.settings.max_failures

    def in_flight(self, key: str) -> int:
        """
        Checks in flight for C{key} (C{ip:...}, C{user:...}, C{account:...})
        that this throttle admitted: with receiving workers, the gateway
        process's counts every process's, a worker's none.
        """
        return self._pending.get(key, 0)

    def admit(self, ip: str, username: str) -> Deferred[Attempt | None]:
        """
        Ask to check a login: failures and checks in flight together stay
        within C{max_failures} per IP, user name and account, so that however
        many logins arrive at once, at most C{max_failures} wrong passwords
        reach the directory before the counts stop them.

        @return: a Deferred firing with C{None} when the IP or the user has
            C{max_failures} failures (answer 535 unasked), else with the
            L{Attempt} to settle once the check is done: at once, or when
            enough of the checks in flight have settled; failing with
            L{DirectoryUnavailable} when a check it waited for got no answer.
        """
        keys = self._keys(ip, username)
        if self.ask is None:
            verdict = self.decide(keys)
        elif self.blocked(ip, username):  # known here already: no need to ask
            verdict = succeed("blocked")
        else:
            verdict = self.ask("check", keys)
        return verdict.addCallback(self._attempt, ip, username)

    def _attempt(self, verdict: Verdict, ip: str, username: str) -> Attempt | None:
        if verdict == "go":
            return Attempt(self, ip, username)
        if verdict == "blocked":
            return None
        raise DirectoryUnavailable("the directory did not answer a check made meanwhile")

    def decide(self, keys: tuple[str, ...], origin: int = 0) -> Deferred[Verdict]:
        """
        Admit a check for C{keys} (an IP's and a user's), here or for the
        receiving worker C{origin}: see L{admit}.  Cancelling the Deferred
        gives up the wait.
        """
        waiter = _Waiter(keys, Deferred(), origin)
        self._try(waiter)
        return waiter.result

    def _try(self, waiter: _Waiter) -> None:
        now = self._clock.seconds()
        limit = self.settings.max_failures
        failures = [(key, self._failures(key, now)) for key in waiter.keys]
        if any(count >= limit for _, count in failures):
            waiter.result.callback("blocked")
            return
        for key, count in failures:
            if count + self.in_flight(key) >= limit:
                # Those in flight may still succeed (and clear the counts):
                # wait for them rather than refuse a right password.
                self._waiting.setdefault(key, deque()).append(waiter)
                return
        self._begin(waiter.keys, waiter.origin)
        waiter.result.callback("go")

    def decide_account(self, key: str, origin: int = 0) -> Verdict:
        """C{"go"} (counted in flight), C{"throttled"} or C{"busy"} for an account key."""
        now = self._clock.seconds()
        failures = self._failures(key, now)
        if failures >= self.settings.max_failures:
            return "throttled"
        if failures + self.in_flight(key) >= self.settings.max_failures:
            return "busy"
        self._begin((key,), origin)
        return "go"

    def _begin(self, keys: tuple[str, ...], origin: int = 0) -> None:
        for key in keys:
            self._pending[key] = self._pending.get(key, 0) + 1
        if origin:
            held = self._remote.setdefault(origin, {})
            for key in keys:
                held[key] = held.get(key, 0) + 1

    def _end(self, keys: tuple[str, ...], unavailable: bool = False) -> None:
        if self.ask is not None:  # a worker: the gateway process counted it
            if self.on_change is not None:
                self.on_change("end-unavailable" if unavailable else "end", *keys)
            return
        self._release(keys, unavailable)

    def _release(self, keys: tuple[str, ...], unavailable: bool = False) -> None:
        for key in keys:
            left = self._pending.get(key, 0) - 1
            if left > 0:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)
            waiters = self._waiting.pop(key, ())
            if not unavailable:
                self._woken.extend(waiters)
                continue
            # The directory just failed to answer: the logins waiting behind
            # that check get 454 now rather than a timeout each, in turn.
            for waiter in waiters:
                if not waiter.result.called:
                    waiter.result.callback("unavailable")
        if self._waking:
            return  # a waiter let in settled at once: the loop below takes the rest
        self._waking = True
        try:
            while self._woken:
                waiter = self._woken.popleft()
                if not waiter.result.called:  # not cancelled meanwhile
                    self._try(waiter)
        finally:
            self._waking = False

    def failure(self, ip: str, username: str, account: str = "") -> float:
        """
        Count one failure for C{ip} and C{username} (and the account, a
        directory DN, when known).

        @return: the delay, in seconds, before answering it.
        """
        self._count(ip, username, account)
        if self.on_change is not None:
            self.on_change("failure", ip, username, account)
        return self.delay(self.failures(ip, username))

    def success(self, ip: str, username: str, account: str = "") -> None:
        """A success clears the IP's, the user's and the account's counts."""
        self._clear(ip, username, account)
        if self.on_change is not None:
            self.on_change("success", ip, username, account)

    def record(self, outcome: str, ip: str, username: str, account: str = "") -> None:
        """An outcome (C{"failure"} or C{"success"}) in another receiving process."""
        if outcome == "failure":
            self._count(ip, username, account)
        elif outcome == "success":
            self._clear(ip, username, account)

    def remote_end(self, origin: int, keys: list[str], unavailable: bool = False) -> None:
        """The receiving worker C{origin} settled a check it was admitted to for C{keys}."""
        held = self._remote.get(origin, {})
        for key in keys:
            if held.get(key, 0) > 0:  # else begun before a reload, or forgotten
                held[key] -= 1
                if not held[key]:
                    del held[key]
                self._release((key,), unavailable)

    def forget(self, origin: int) -> None:
        """The receiving worker C{origin} ended: its checks in flight and its waits went with it."""
        for queue in list(self._waiting.values()):
            for waiter in list(queue):
                if waiter.origin == origin and not waiter.result.called:
                    waiter.result.cancel()
        for key, count in self._remote.pop(origin, {}).items():
            for _ in range(count):
                self._release((key,))

    def _all_keys(self, ip: str, username: str, account: str) -> tuple[str, ...]:
        keys = self._keys(ip, username)
        return (*keys, self._account(account)) if account else keys

    def _count(self, ip: str, username: str, account: str = "") -> None:
        now = self._clock.seconds()
        for key in self._all_keys(ip, username, account):
            held = self._failures(key, now)
            start = self._counts[key].start if held else now
            self._counts[key] = _Count(start, held + 1)
            self._counts.move_to_end(key)
        self._trim(now)

    def _clear(self, ip: str, username: str, account: str = "") -> None:
        for key in self._all_keys(ip, username, account):
            self._counts.pop(key, None)

    def delay(self, failures: int) -> float:
        """C{delay * 2 ** (failures - 1)} seconds, capped at C{max_delay}; 0 without failures."""
        if failures <= 0:
            return 0.0
        s = self.settings
        cap = s.max_delay.total_seconds()
        # Past 64 doublings the cap has long been reached; avoid huge floats.
        return min(s.delay.total_seconds() * 2.0 ** min(failures - 1, 64), cap)

    def _trim(self, now: float) -> None:
        if len(self._counts) <= self._max:
            return
        window = self.settings.window.total_seconds()
        for key in [k for k, c in self._counts.items() if now - c.start >= window]:
            del self._counts[key]
        while len(self._counts) > self._max:
            self._counts.popitem(last=False)


@implementer(IAccountGate)
class Attempt:
    """
    One login being checked, counted in flight until it is settled (once)
    by L{failure}, L{success} or L{tempfail}.  It is also the directory's
    L{IAccountGate}: the account a login name resolves to is counted in
    flight too, and refused when throttled.

    @ivar refused: C{None}, or why L{admit} said no: C{"throttled"} (the
        account has C{max_failures} failures) or C{"busy"} (with the checks
        in flight for it, more would exceed C{max_failures}).
    """

    def __init__(self, throttle: Throttle, ip: str, username: str) -> None:
        self._throttle = throttle
        self._ip = ip
        self._username = username
        self._keys: tuple[str, ...] = throttle._keys(ip, username)
        self._account = ""
        self.refused: str | None = None
        self._settled = False

    def admit(self, account: str) -> bool | Deferred[bool]:
        """
        See L{IAccountGate.admit}; idempotent for one account (a failover
        asks again).  In a receiving worker the gateway process decides: a
        Deferred.
        """
        throttle = self._throttle
        key = throttle._account(account)
        if self._settled or not key:
            return False
        if key == throttle._account(self._account):
            return True
        if self._account:  # another server found another entry: count that one instead
            throttle._end((self._keys[-1],))
            self._keys, self._account = self._keys[:-1], ""
        if throttle.ask is None:
            return self._admitted(throttle.decide_account(key), account, key)
        return throttle.ask("account", (key,)).addCallback(self._admitted, account, key)

    def _admitted(self, verdict: Verdict, account: str, key: str) -> bool:
        if verdict != "go":
            self.refused = verdict
            return False
        if self._settled:  # given up meanwhile: the account leaves the flight at once
            self._throttle._end((key,))
            return False
        self._keys, self._account = (*self._keys, key), account
        return True

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        return True

    def failure(self) -> float:
        """A wrong password (or a refusal): counted, then the check leaves the flight."""
        if not self._settle():
            return 0.0
        wait = self._throttle.failure(self._ip, self._username, self._account)
        self._throttle._end(self._keys)
        return wait

    def success(self) -> None:
        """The login succeeded: the counts are cleared."""
        if self._settle():
            self._throttle.success(self._ip, self._username, self._account)
            self._throttle._end(self._keys)

    def tempfail(self, unavailable: bool = False) -> None:
        """
        No verdict (454): nothing counted.  C{unavailable}: the directory
        did not answer, and the logins waiting behind this check get 454 too.
        """
        if self._settle():
            self._throttle._end(self._keys, unavailable)


@frozen
class LoginResult:
    """
    The outcome of one AUTH.

    @ivar reply: 235, 535 or 454.
    @ivar user: the user on success, else C{None}.
    @ivar result: C{success}, C{failure}, C{tempfail} or C{throttled}.
    """

    reply: Reply
    user: AuthenticatedUser | None
    result: str


_log = Logger(namespace="relaygw.auth")


def guarded_login(
    portal: Portal,
    throttle: Throttle,
    credentials: Credentials,
    clock: IReactorTime,
    fields: dict[str, Any],
    max_wait: float,
) -> Deferred[LoginResult]:
    """
    Run one AUTH through the throttle and the portal.

    @param fields: log fields of the session (C{connector}, C{session_id}, C{peer}).
    @param max_wait: the longest delay in seconds (the connector's command
        timeout: the throttle slows a guesser, it must not hold a connection).
    @return: a Deferred firing (after the throttle delay, on C{clock}) with
        the L{LoginResult}; it never fails.
    """
    return Deferred.fromCoroutine(_login(portal, throttle, credentials, clock, fields, max_wait))


async def _login(
    portal: Portal,
    throttle: Throttle,
    credentials: Credentials,
    clock: IReactorTime,
    fields: dict[str, Any],
    max_wait: float,
) -> LoginResult:
    ip = credentials.client_ip
    name = credentials.username.decode("utf-8", "replace")
    shown = name if len(name) <= 256 and "\x00" not in name else name[:64] + "..."
    result, wait, reason = await _decide(portal, throttle, credentials, ip, name, shown, fields)
    wait = min(wait, max_wait)
    if result.result == "success":
        _log.info("AUTH by {auth_user} from {peer} succeeded", event="auth.result",
                  result="success", auth_user=shown, **fields)
    else:
        _log.warn("AUTH by {auth_user} from {peer}: {result} ({reason})", event="auth.result",
                  result=result.result, reason=reason, auth_user=shown, delay=wait, **fields)
    if wait > 0:
        await deferLater(clock, wait, lambda: None)
    return result


_TEMPFAIL = LoginResult(replies.AUTH_TEMPFAIL, None, "tempfail")


async def _decide(
    portal: Portal,
    throttle: Throttle,
    credentials: Credentials,
    ip: str,
    name: str,
    shown: str,
    fields: dict[str, Any],
) -> tuple[LoginResult, float, str]:
    """The result, its delay in seconds and the reason logged for a failure."""
    try:
        attempt = await throttle.admit(ip, name)
    except DirectoryUnavailable as error:
        return _TEMPFAIL, 0.0, str(error)
    if attempt is None:
        wait = throttle.failure(ip, name)
        return LoginResult(replies.AUTH_FAILED, None, "throttled"), wait, "too many failures"
    # Settled whatever happens (a cancelled login included): a check left in
    # flight would hold its IP and user name for good.
    try:
        _, avatar, _ = await portal.login(evolve(credentials, gate=attempt), None,
                                          IAuthenticatedUser)
    except UnauthorizedLogin as error:
        if attempt.refused == "busy":
            attempt.tempfail()
            return _TEMPFAIL, 0.0, "other checks of this account in flight"
        wait = attempt.failure()
        if attempt.refused == "throttled":
            return (LoginResult(replies.AUTH_FAILED, None, "throttled"), wait,
                    "too many failures for the account")
        return LoginResult(replies.AUTH_FAILED, None, "failure"), wait, str(error)
    except DirectoryUnavailable as error:
        attempt.tempfail(unavailable=True)
        return _TEMPFAIL, 0.0, str(error)
    except Exception:
        attempt.tempfail()
        _log.failure("AUTH check failed unexpectedly for {auth_user}", auth_user=shown, **fields)
        return _TEMPFAIL, 0.0, "error"
    else:
        attempt.success()
        if not isinstance(avatar, AuthenticatedUser):
            return _TEMPFAIL, 0.0, "not a user"
        return LoginResult(replies.AUTH_OK, avatar, "success"), 0.0, ""
    finally:
        attempt.tempfail()  # no-op once settled above
