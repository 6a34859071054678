"""
The Microsoft Graph route (C{via = "graph"}, issue 9): each message is
POSTed as the base64 of its MIME form (Graph's documented MIME send, body
C{text/plain}) to C{{graph_endpoint}/v1.0/users/{mailbox}/sendMail}, with a
bearer token from the route's L{ITokenSource}.  C{mailbox} is the route's,
or the envelope sender's when the route names none.

Graph sends to the addresses in the message's To, Cc and Bcc headers, not
to an envelope, so the submitted copy is made to name exactly the envelope
recipients of the attempt:

  - an envelope recipient that To and Cc do not name (a blind copy: clients
    remove the Bcc header) is put in the copy's Bcc header, which Exchange
    never shows to the recipients; any Bcc header of the original is
    replaced by that one;
  - a To or Cc address that is not one of them (another route's recipient,
    or one the client never gave in RCPT TO) would get the message from
    Graph past relaygw's relay rules and routing: nothing is submitted and
    every recipient of the attempt fails (5.7.1), the reply naming them.

Graph's answer decides for all recipients alike:

  ============================  ===========================================
  HTTP status                   outcome
  ============================  ===========================================
  2xx (202 Accepted)            delivered
  401                           the token is invalidated and the request
                                sent once more with a new one; a second
                                401 is retried later (4.7.0)
  429                           retried (4.4.5), not before its Retry-After;
                                no message of the route is sent before then
  408, 5xx, no answer           retried (4.4.x); a 503's Retry-After is
                                honoured like a 429's
  400, 403, 404, 413, other 4xx bounced (5.x.x) with Graph's error code and
                                message (cut short)
  ============================  ===========================================

No access token (L{TokenUnavailable}) is retried (4.7.0).  A message whose
base64 exceeds Graph's 4 MB request limit bounces at once (5.3.4).  The
token is sent only in the Authorization header: it is in no event, outcome
or exception.
"""

from __future__ import annotations

import base64
from typing import IO, Any, cast
from urllib.parse import quote, urlsplit

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from relaygw._types import IServeReactor
from relaygw.deliver._http import Body
from relaygw.config._model import Route
from relaygw.deliver import outcome as _o
from relaygw.deliver._graphmime import (
    MAX_RETRY_AFTER,
    RecipientMismatch,
    error_detail,
    parse_retry_after,
    submission,
)
from relaygw.deliver._transaction import DATA_ERRORS
from relaygw.deliver.tlspolicy import load_ca_file
from relaygw.interfaces import IDeliveryTarget, ITokenSource, TokenUnavailable
from relaygw.replies import Reply
from relaygw.spool.envelope import Envelope, Outcome

__all__ = ["GraphTarget", "MAX_REQUEST", "MAX_RETRY_AFTER"]

#: Graph's limit on a request; the sendMail MIME body is base64, so about
#: 3 MiB of message (Microsoft's "Send Outlook messages from another
#: user"/"sendMail" notes: larger messages need an upload session).
MAX_REQUEST = 4 * 1024 * 1024
#: Seconds for one whole request: connecting, TLS, the upload and the answer.
REQUEST_TIMEOUT = 120.0
#: Seconds to connect (HTTPS), within the request's time.
CONNECT_TIMEOUT = 30.0
#: The wait after a 429 that gives no Retry-After.
DEFAULT_RETRY_AFTER = 60.0
#: The most of an error body read.
MAX_ERROR_BODY = 16 * 1024

_NO_SENDER = Reply(
    550, "5.1.7", 'The Graph route sends from the sender\'s mailbox, and the sender is "<>"'
)
_TRUST_UNREADABLE = _o.ROUTE_FILE_UNREADABLE


def _outcome(reply: str, kind: str = "", remote_host: str = "", retry_at: float = 0.0) -> Outcome:
    code = int(reply[:3])
    return Outcome(
        kind=_o.classify(code) if not kind else kind,  # type: ignore[arg-type]
        reply=reply[: _o.MAX_REPLY_CHARS],
        remote_host=remote_host,
        retry_at=retry_at,
    )


_PERMANENT = {
    400: ("554 5.6.0", "Graph refused the message"),
    403: ("550 5.7.1", "Graph refused to send as {mailbox}"),
    404: ("550 5.1.8", "Graph found no mailbox {mailbox}"),
    413: ("552 5.3.4", "Graph refused the message as too large"),
}


class _Collect(Protocol):
    """Collects a response body, keeping at most C{limit} bytes of it."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self._size < self._limit:
            self._chunks.append(data[: self._limit - self._size])
            self._size += len(self._chunks[-1])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):  # type: ignore[no-untyped-call]
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def _reason(exc: BaseException) -> str:
    """A short text for a failed request (Twisted's web errors wrap their causes)."""
    inner = getattr(exc, "reasons", None)
    if inner:
        return "; ".join(
            _reason(f.value) for f in inner if isinstance(f, Failure) and f.value is not None
        )
    if isinstance(exc, (defer.TimeoutError, defer.CancelledError)):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _first_cause(exc: BaseException) -> BaseException:
    inner = getattr(exc, "reasons", None)
    if inner and isinstance(inner[0], Failure) and inner[0].value is not None:
        return _first_cause(inner[0].value)
    return exc


@implementer(IDeliveryTarget)
class GraphTarget:
    """
    Sends each message with one Graph C{sendMail} request (see the module).

    @ivar not_before: POSIX time before which no request is sent (the last
        Retry-After of the route); attempts before it are retried at once,
        without a request.
    """

    _log = Logger()

    def __init__(
        self,
        route: Route,
        *,
        reactor: IServeReactor,
        tokens: ITokenSource,
        agent: IAgent | None = None,
        clock: IReactorTime | None = None,
        timeout: float = REQUEST_TIMEOUT,
        max_request: int = MAX_REQUEST,
    ) -> None:
        """
        @param route: a C{via = "graph"} route.
        @param reactor: TCP, TLS and time for the HTTPS agent.
        @param tokens: the route's access tokens.
        @param agent: replaces the HTTPS agent made from the route's
            C{ca_file} (tests).
        @param clock: time for timeouts and Retry-After; the reactor by default.
        @param timeout: seconds for one whole request.
        @param max_request: the largest base64 body sent.
        """
        self._route = route
        self._reactor = reactor
        self._tokens = tokens
        self._agent = agent
        self._clock: IReactorTime = reactor if clock is None else clock
        self._timeout = timeout
        self._max_request = max_request
        self._host = urlsplit(route.graph_endpoint).hostname or route.graph_endpoint
        self.not_before = 0.0

    def deliver(
        self, envelope: object, recipients: object, open_data: object
    ) -> Deferred[dict[str, Outcome]]:
        """See L{IDeliveryTarget.deliver}."""
        if not isinstance(envelope, Envelope) or not callable(open_data):
            raise TypeError("deliver(Envelope, recipients, open_data) expected")
        if not isinstance(recipients, (list, tuple)) or not all(
            isinstance(r, str) for r in recipients
        ):
            raise TypeError("recipients must be a sequence of str")
        return Deferred.fromCoroutine(self._deliver(envelope, tuple(recipients), open_data))

    async def _deliver(
        self, envelope: Envelope, recipients: tuple[str, ...], open_data: Any
    ) -> dict[str, Outcome]:
        outcome = await self._attempt(envelope, recipients, open_data)
        return {r: outcome for r in recipients}

    async def _attempt(
        self, envelope: Envelope, recipients: tuple[str, ...], open_data: Any
    ) -> Outcome:
        now = self._clock.seconds()
        if now < self.not_before:
            wait = self.not_before - now
            return _outcome(
                f"451 4.4.5 Graph is throttling the route; not tried for another {wait:.0f} s",
                remote_host=self._host,
                retry_at=self.not_before,
            )
        mailbox = self._route.mailbox or envelope.sender
        if not mailbox:
            return _o.local_outcome(_NO_SENDER)
        agent = self._get_agent()
        if agent is None:
            return _o.local_outcome(_TRUST_UNREADABLE)
        try:
            with cast(IO[bytes], open_data()) as src:
                data = src.read()
        except DATA_ERRORS:
            self._log.failure("Cannot read {queue_id} for Graph", queue_id=envelope.id)
            return _o.local_outcome(_o.LOCAL_ERROR)
        try:
            copy = submission(data, recipients)
        except RecipientMismatch as e:
            named = ", ".join(e.extra)
            return _outcome(
                "550 5.7.1 Graph sends to the message's To and Cc headers, which name "
                f"recipients this route was not given: {named}"
            )
        payload = base64.b64encode(copy)
        if len(payload) > self._max_request:
            return _outcome(
                f"552 5.3.4 The message is too large for Microsoft Graph: {len(payload)} "
                f"bytes as base64, the limit is {self._max_request}"
            )
        return await self._send(agent, envelope, mailbox, payload)

    def _get_agent(self) -> IAgent | None:
        if self._agent is None:
            try:
                trust = None if self._route.ca_file is None else load_ca_file(self._route.ca_file)
            except (OSError, ValueError) as error:
                self._log.error(
                    "Route {route}: cannot read ca_file {path}: {error}",
                    route=self._route.name,
                    path=str(self._route.ca_file),
                    error=getattr(error, "strerror", None) or type(error).__name__,
                )
                return None
            pool = HTTPConnectionPool(self._reactor)  # type: ignore[no-untyped-call]
            pool.maxPersistentPerHost = self._route.max_concurrency
            self._agent = cast(
                IAgent,
                Agent(  # type: ignore[no-untyped-call]
                    self._reactor,
                    contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust),  # type: ignore[no-untyped-call]
                    connectTimeout=CONNECT_TIMEOUT,
                    pool=pool,
                ),
            )
        return self._agent

    async def _send(self, agent: IAgent, envelope: Envelope, mailbox: str, payload: bytes) -> Outcome:
        url = f"{self._route.graph_endpoint}/v1.0/users/{quote(mailbox, safe='@+')}/sendMail"
        fields = dict(queue_id=envelope.id, route=self._route.name, mailbox=mailbox)
        for attempt in (1, 2):
            try:
                token = await self._tokens.token()
            except TokenUnavailable as e:
                self._log.warn("No access token for Graph: {reason}", reason=str(e), **fields)
                return _outcome(f"451 4.7.0 No access token for Graph: {e}", remote_host=self._host)
            except Exception:
                self._log.failure(
                    "Token source of route {route} failed", None, LogLevel.error, **fields
                )
                return _outcome("451 4.7.0 No access token for Graph; see the log")
            if not (token and token.isascii() and token.isprintable() and " " not in token):
                # Checked here: an encoding error would carry the token into the log.
                self._log.error("Token source of route {route} gave an unusable token", **fields)
                return _outcome("451 4.7.0 No usable access token for Graph; see the log")
            try:
                code, retry_after, body = await self._post(agent, url, token, payload)
            except Exception as e:
                reason = _reason(e)
                self._log.warn("Graph request for {queue_id} failed: {reason}", reason=reason, **fields)
                local = _o.failure_outcome(_first_cause(e))
                text = local.reply.split(" ", 2)
                return _outcome(
                    f"{text[0]} {text[1]} Graph at {self._host} did not answer: {reason}",
                    remote_host=self._host,
                )
            if 200 <= code < 300:
                return _outcome(f"250 2.0.0 Graph accepted the message (HTTP {code})", remote_host=self._host)
            detail = error_detail(code, body)
            self._log.warn(
                "Graph answered {status} for {queue_id}: {detail}", status=code, detail=detail, **fields
            )
            if code == 401:
                self._tokens.invalidate(token)
                if attempt == 1:
                    continue
                return _outcome(
                    f"451 4.7.0 Graph refused the access token twice ({detail})", remote_host=self._host
                )
            return self._status_outcome(code, retry_after, detail, mailbox)
        raise AssertionError("unreachable")  # pragma: no cover

    def _status_outcome(self, code: int, retry_after: str | None, detail: str, mailbox: str) -> Outcome:
        now = self._clock.seconds()
        if code == 429 or code == 408 or code >= 500:
            wait = parse_retry_after(retry_after, now)
            if wait is None and code == 429:
                wait = DEFAULT_RETRY_AFTER
            retry_at = 0.0
            if wait:
                retry_at = now + wait
                self.not_before = max(self.not_before, retry_at)
            if code == 429:
                text = f"451 4.4.5 Graph throttled the route ({detail}); retry after {wait:.0f} s"
            else:
                text = f"451 4.4.0 Graph answered {detail}"
            return _outcome(text, kind="retry", remote_host=self._host, retry_at=retry_at)
        prefix, what = _PERMANENT.get(code, ("550 5.0.0", "Graph refused the message"))
        return _outcome(f"{prefix} {what.format(mailbox=mailbox)} ({detail})", kind="bounce",
                        remote_host=self._host)

    async def _post(
        self, agent: IAgent, url: str, token: str, payload: bytes
    ) -> tuple[int, str | None, bytes]:
        exchange = Deferred.fromCoroutine(self._exchange(agent, url, token, payload))
        return await exchange.addTimeout(self._timeout, self._clock)

    async def _exchange(
        self, agent: IAgent, url: str, token: str, payload: bytes
    ) -> tuple[int, str | None, bytes]:
        headers = Headers(
            {
                b"Authorization": [b"Bearer " + token.encode("ascii")],
                b"Content-Type": [b"text/plain"],
                b"User-Agent": [b"relaygw"],
            }
        )
        response: IResponse = await agent.request(
            b"POST", url.encode("ascii"), headers, Body(payload)
        )
        collect = _Collect(MAX_ERROR_BODY)
        response.deliverBody(collect)  # type: ignore[no-untyped-call]
        body = await collect.done
        retry_after = (response.headers.getRawHeaders("retry-after") or [None])[-1]
        return response.code, retry_after, body
