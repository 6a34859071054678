"""
AUTH throttling and the guarded login a session runs for each AUTH.

Failures are counted per client IP and per user name (lower-cased) in a
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

Log events (C{event="auth.result"}) carry C{result} (C{success},
C{failure}, C{tempfail}, C{throttled}) with C{connector}, C{session_id},
C{peer} and C{auth_user}; never the password or the SASL payload.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from relaygw import replies
from relaygw.auth.realm import IAuthenticatedUser
from relaygw.auth.sasl import Credentials
from relaygw.auth.user import AuthenticatedUser
from relaygw.config._model import AuthThrottle
from relaygw.interfaces import DirectoryUnavailable
from relaygw.replies import Reply

__all__ = ["LoginResult", "Throttle", "guarded_login"]


@frozen
class _Count:
    start: float
    failures: int


class Throttle:
    """
    Failure counters of one connector.

    @ivar settings: the connector's C{auth_throttle}.
    """

    def __init__(self, settings: AuthThrottle, clock: IReactorTime, max_keys: int = 100_000) -> None:
        self.settings = settings
        self._clock = clock
        self._max = max_keys
        self._counts: OrderedDict[str, _Count] = OrderedDict()
        #: Told C{("failure" | "success", ip, username)} of each outcome
        #: here, for the other receiving processes (L{relaygw.session.peers}).
        self.on_change: Callable[[str, str, str], None] | None = None

    @staticmethod
    def _keys(ip: str, username: str) -> tuple[str, str]:
        return f"ip:{ip}", f"user:{username.lower()}"

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

    def failure(self, ip: str, username: str) -> float:
        """
        Count one failure for C{ip} and C{username}.

        @return: the delay, in seconds, before answering it.
        """
        self._count(ip, username)
        if self.on_change is not None:
            self.on_change("failure", ip, username)
        return self.delay(self.failures(ip, username))

    def success(self, ip: str, username: str) -> None:
        """A success clears the IP's and the user's counts."""
        self._clear(ip, username)
        if self.on_change is not None:
            self.on_change("success", ip, username)

    def record(self, outcome: str, ip: str, username: str) -> None:
        """An outcome (C{"failure"} or C{"success"}) in another receiving process."""
        if outcome == "failure":
            self._count(ip, username)
        elif outcome == "success":
            self._clear(ip, username)

    def _count(self, ip: str, username: str) -> None:
        now = self._clock.seconds()
        for key in self._keys(ip, username):
            held = self._failures(key, now)
            start = self._counts[key].start if held else now
            self._counts[key] = _Count(start, held + 1)
            self._counts.move_to_end(key)
        self._trim(now)

    def _clear(self, ip: str, username: str) -> None:
        for key in self._keys(ip, username):
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
    if throttle.blocked(ip, name):
        result = LoginResult(replies.AUTH_FAILED, None, "throttled")
        wait = throttle.failure(ip, name)
        reason = "too many failures"
    else:
        try:
            _, avatar, _ = await portal.login(credentials, None, IAuthenticatedUser)
        except UnauthorizedLogin as error:
            result = LoginResult(replies.AUTH_FAILED, None, "failure")
            wait = throttle.failure(ip, name)
            reason = str(error)
        except DirectoryUnavailable as error:
            result, wait, reason = LoginResult(replies.AUTH_TEMPFAIL, None, "tempfail"), 0.0, str(error)
        except Exception:
            _log.failure("AUTH check failed unexpectedly for {auth_user}", auth_user=shown, **fields)
            result, wait, reason = LoginResult(replies.AUTH_TEMPFAIL, None, "tempfail"), 0.0, "error"
        else:
            throttle.success(ip, name)
            user = avatar if isinstance(avatar, AuthenticatedUser) else None
            if user is None:
                result = LoginResult(replies.AUTH_TEMPFAIL, None, "tempfail")
            else:
                result = LoginResult(replies.AUTH_OK, user, "success")
            wait, reason = 0.0, ""
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
