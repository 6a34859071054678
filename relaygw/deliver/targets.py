"""
The delivery targets (L{IDeliveryTarget}) of the route kinds:
C{maildir}, C{smarthost}, C{mx} and C{graph} (SPEC section 4; the last two
in L{relaygw.deliver.mx} and L{relaygw.deliver.graph}).

Each C{deliver} returns a Deferred firing with one L{Outcome} per recipient
and never fails.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import IO, Sequence, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names.common import ResolverBase
from zope.interface import implementer

from relaygw._types import IServeReactor
from relaygw.config._model import Route
from relaygw.deliver import outcome as _o
from relaygw.deliver.connections import ConnectionCache, deliver_to_host
from relaygw.deliver.graph import GraphTarget
from relaygw.deliver.mx import MXTarget
from relaygw.deliver.oauth import token_source
from relaygw.deliver.routefiles import RouteFiles
from relaygw.deliver.smtpclient import (
    DATA_ERRORS,
    ClientAuth,
    ClientTimeouts,
    DataOpener,
    OutboundMessage,
    SendLog,
    TLSOptionsFactory,
    TransactionResult,
    check_tls_mode,
)
from relaygw.interfaces import IDeliveryTarget, IProtocolLog, ITokenSource, TokenUnavailable
from relaygw.route.router import split_address
from relaygw.spool.envelope import Envelope, Outcome

__all__ = ["MaildirTarget", "SmarthostTarget", "build_target", "mailbox_name"]

_CHUNK = 64 * 1024
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_MAX_NAME_OCTETS = 255


def mailbox_name(address: str) -> str | None:
    """
    The Maildir folder name for a recipient: its local part unquoted
    (quotes and backslash escapes removed) and lower-cased.

    @return: the name, or C{None} when it is not one safe path component
        (empty, holds C{"/"}, NUL or another control character, starts with
        C{"."} -- which covers C{"."} and C{".."} -- or is too long).
    """
    local = split_address(address)[0]
    chars: list[str] = []
    i = 0
    while i < len(local):
        c = local[i]
        if c == "\\" and i + 1 < len(local):
            i += 1
            chars.append(local[i])
        elif c != '"':
            chars.append(c)
        i += 1
    name = "".join(chars).lower()
    if (
        not name
        or name.startswith(".")
        or "/" in name
        or any(not c.isprintable() for c in name)
        or len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_OCTETS
    ):
        return None
    return name


def _narrow(
    envelope: object, recipients: object, open_data: object
) -> tuple[Envelope, tuple[str, ...], DataOpener]:
    """The arguments of L{IDeliveryTarget.deliver} with their contract's types."""
    if not isinstance(envelope, Envelope) or not callable(open_data):
        raise TypeError("deliver(Envelope, recipients, open_data) expected")
    if not isinstance(recipients, (list, tuple)) or not all(
        isinstance(r, str) for r in recipients
    ):
        raise TypeError("recipients must be a sequence of str")
    return envelope, tuple(recipients), cast(DataOpener, open_data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path) -> None:
    """Create C{path} and missing parents; fsync each parent that gained an entry."""
    if path.is_dir():
        return
    _ensure_dir(path.parent)
    try:
        path.mkdir(mode=_DIR_MODE)
    except FileExistsError:
        return
    _fsync_dir(path.parent)


@implementer(IDeliveryTarget)
class MaildirTarget:
    """
    Writes each recipient's copy to C{<root>/<local-part>/new/} (maildir(5)):
    into C{tmp/} first, fsynced, then renamed into C{new/}, and C{new/}
    fsynced, so a reader never sees a partial message.  Lines end in LF,
    as Maildir readers expect; the spool's CRLF is converted.

    Recipients sharing a mailbox get one copy.  The writes are synchronous
    in the reactor thread, as the spool's are.
    """

    _log = Logger()

    def __init__(self, root: Path, clock: IReactorTime) -> None:
        """
        @param root: the Maildir root (C{route.maildir}).
        @param clock: gives the time in unique file names.
        """
        self._root = root
        self._clock = clock
        host = socket.gethostname() or "localhost"
        self._host = host.replace("/", "\\057").replace(":", "\\072")
        self._count = 0

    def deliver(
        self, envelope: object, recipients: object, open_data: object
    ) -> Deferred[dict[str, Outcome]]:
        """See L{IDeliveryTarget.deliver}."""
        envelope, recipients, open_data = _narrow(envelope, recipients, open_data)
        outcomes: dict[str, Outcome] = {}
        done: dict[str, Outcome] = {}
        for rcpt in recipients:
            name = mailbox_name(rcpt)
            if name is None:
                self._log.warn(
                    "Refusing unsafe Maildir name for {recipient}",
                    queue_id=envelope.id,
                    recipient=rcpt,
                )
                outcomes[rcpt] = _o.local_outcome(_o.BAD_MAILBOX)
                continue
            if name not in done:
                done[name] = self._write(envelope.id, name, open_data)
            outcomes[rcpt] = done[name]
        return succeed(outcomes)

    def _unique(self) -> str:
        now = self._clock.seconds()
        self._count += 1
        return (
            f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}"
            f"Q{self._count}R{secrets.token_hex(8)}.{self._host}"
        )

    def _write(self, queue_id: str, name: str, open_data: DataOpener) -> Outcome:
        box = self._root / name
        tmp: Path | None = None
        try:
            for sub in ("tmp", "new", "cur"):
                _ensure_dir(box / sub)
            unique = self._unique()
            tmp = box / "tmp" / unique
            with open_data() as src:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
                with os.fdopen(fd, "wb") as dst:
                    _copy_lf(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
            os.rename(tmp, box / "new" / unique)
            tmp = None
            _fsync_dir(box / "new")
        except DATA_ERRORS:
            self._log.failure(
                "Maildir delivery to {mailbox} failed", queue_id=queue_id, mailbox=name
            )
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return _o.local_outcome(_o.MAILBOX_WRITE_FAILED)
        return _o.local_outcome(_o.DELIVERED_MAILDIR)


def _copy_lf(src: IO[bytes], dst: IO[bytes]) -> None:
    """Copy in chunks, turning CRLF into LF (a CR split from its LF is held back)."""
    held = b""
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            break
        data = held + chunk
        held = b"\r" if data.endswith(b"\r") else b""
        if held:
            data = data[:-1]
        dst.write(data.replace(b"\r\n", b"\n"))
    if held:
        dst.write(held)


@implementer(IDeliveryTarget)
class SmarthostTarget:
    """
    Hands the message to C{route.smarthosts}, tried in order: a host that
    cannot be reached, or refuses before taking the transaction (4xx at
    greeting, EHLO or MAIL; TLS required but missing; a certificate that
    does not verify; AUTH refused), passes it on to the next one.  The
    recipients' outcomes come from the host that took the transaction, or
    from the last host tried.  Connections are reused
    (L{relaygw.deliver.connections}).

    The route's files are read as L{RouteFiles} says; until they are, every
    recipient is retried.

    With C{auth = "xoauth2"} each host is sent a token of the route's
    L{ITokenSource}; no token is a retry of every recipient, and a host
    that refuses the token (5xx to AUTH) is tried once more, at once, with
    a fresh one (it may have expired or been revoked).
    """

    _log = Logger()

    def __init__(
        self,
        route: Route,
        *,
        reactor: IServeReactor,
        helo: str,
        timeouts: ClientTimeouts = ClientTimeouts(),
        tls_options: TLSOptionsFactory | None = None,
        send_log: SendLog | None = None,
        tokens: ITokenSource | None = None,
    ) -> None:
        """
        @param route: a C{via = "smarthost"} route.
        @param reactor: TCP, time and name resolution.
        @param helo: the name to send in EHLO (C{gateway.hostname}).
        @param tls_options: overrides the TLS options the route's C{tls} and
            C{ca_file} give (tests).
        @param tokens: the access tokens of an C{auth = "xoauth2"} route;
            by default, built from C{route.oauth}.
        """
        self._route = route
        self._tls = check_tls_mode(route.tls)
        self._reactor = reactor
        self._helo = helo
        self._timeouts = timeouts
        self._files = RouteFiles(route, self._tls, tls_options)
        self._cache = ConnectionCache(reactor)
        self._send_log = send_log
        if tokens is None and route.auth == "xoauth2":
            tokens = token_source(route, reactor)
        self._tokens = tokens

    def deliver(
        self, envelope: object, recipients: object, open_data: object
    ) -> Deferred[dict[str, Outcome]]:
        """See L{IDeliveryTarget.deliver}."""
        envelope, recipients, open_data = _narrow(envelope, recipients, open_data)
        if not self._files.ready():
            later = _o.local_outcome(_o.ROUTE_FILE_UNREADABLE)
            return succeed({r: later for r in recipients})
        return Deferred.fromCoroutine(self._deliver(envelope, recipients, open_data))

    async def _deliver(
        self, envelope: Envelope, recipients: Sequence[str], open_data: DataOpener
    ) -> dict[str, Outcome]:
        message = OutboundMessage.of(envelope, recipients, open_data)
        last: TransactionResult | None = None
        refreshed = False
        for host in self._route.smarthosts:
            while True:
                auth = self._files.auth
                if self._tokens is not None:
                    try:
                        token = await self._tokens.token()
                    except TokenUnavailable as e:
                        # The source logged why; the message is safe to keep.
                        later = Outcome("retry", f"{_o.TOKEN_UNAVAILABLE} ({e})")
                        return {r: later for r in recipients}
                    auth = ClientAuth(self._route.auth_user, token, "xoauth2")
                last = await deliver_to_host(
                    self._reactor,
                    host,
                    message,
                    helo=self._helo,
                    tls=self._tls,
                    timeouts=self._timeouts,
                    tls_options=self._files.tls_options,
                    auth=auth,
                    cache=self._cache,
                    send_log=self._send_log,
                )
                if self._tokens is None or not last.auth_refused or refreshed:
                    break
                refreshed = True
                self._tokens.invalidate(token)
            if not last.failover:
                return last.outcomes
            self._log.info(
                "Smarthost {host} did not take {queue_id}: {reply}",
                queue_id=envelope.id,
                route=self._route.name,
                host=last.host,
                reply=next(iter(last.outcomes.values())).reply if last.outcomes else "",
            )
        if last is None:
            failed = _o.local_outcome(_o.CONNECTION_FAILED)
            return {r: failed for r in recipients}
        return last.outcomes


def build_target(
    route: Route,
    *,
    reactor: IServeReactor,
    resolver: ResolverBase | None,
    helo: str,
    protocol_log: IProtocolLog | None = None,
) -> IDeliveryTarget:
    """
    The target for C{route}, by C{route.via}.

    @param resolver: the delivery process's one resolver (C{mx} routes).
    @param protocol_log: the SmtpSend protocol log, written for a route
        with C{protocol_logging = "verbose"}.
    @raise ValueError: a maildir route without C{maildir}, an mx route
        without a resolver, a graph route without C{oauth}.
    """
    if route.via == "maildir":
        if route.maildir is None:
            raise ValueError(f"route {route.name!r} has no maildir")
        return MaildirTarget(route.maildir, reactor)
    if route.via == "graph":
        return GraphTarget(route, reactor=reactor, tokens=token_source(route, reactor))
    send_log = None
    if protocol_log is not None and route.protocol_logging == "verbose":
        send_log = SendLog(protocol_log, route.name)
    if route.via == "smarthost":
        return SmarthostTarget(route, reactor=reactor, helo=helo, send_log=send_log)
    if resolver is None:
        raise ValueError(f"route {route.name!r} needs a DNS resolver")
    return MXTarget(route, reactor=reactor, resolver=resolver, helo=helo, send_log=send_log)
