"""
C{relaygw queue list|show ID|retry [ID]|delete ID} (SPEC section 6), like
Postfix's C{mailq} and C{postsuper}, as functions returning C{(exit status,
text)}.

Safe while the gateway runs.  Reading needs no care: entries and their
updates are replaced by rename, never rewritten in place.  Changing does: a
running delivery process (it holds the spool lock) is the only writer of
queued entries, so retry and delete become request files it carries out
(L{relaygw.spool.control}); only when no delivery process runs does the
command change the spool itself, holding the lock meanwhile so that none
starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO, cast

from attrs import evolve

from relaygw._types import ISpoolReactor
from relaygw.cli.commands import Result, load_config
from relaygw.spool.control import (
    Request,
    SpoolLock,
    lock_holder,
    write_request,
)
from relaygw.spool.envelope import Envelope, Recipient
from relaygw.spool.store import DirectorySpool

__all__ = ["queue_delete", "queue_list", "queue_retry", "queue_show"]

#: Headers shown by C{show}, at most (a message is not read beyond them).
_HEADER_LIMIT = 256 * 1024
_POLL = 0.05


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _next(envelope: Envelope) -> str:
    return "at once" if envelope.next_attempt <= 0 else _utc(envelope.next_attempt)


def _attempts(rcpt: Recipient) -> str:
    return f"{rcpt.attempts} attempt{'' if rcpt.attempts == 1 else 's'}"


@contextmanager
def _spool(path: str | None) -> Iterator[DirectorySpool | None]:
    """The configuration's spool; C{None} when it was never created (nothing queued)."""
    root = load_config(path).gateway.spool_dir
    if not (root / "queue").is_dir():
        yield None
        return
    from twisted.internet import reactor

    # Only read, update and remove: the reactor is never run.
    spool = DirectorySpool(root, cast(ISpoolReactor, reactor))
    try:
        yield spool
    finally:
        spool.close()


def _unknown(queue_id: str) -> Result:
    return 1, f"no message {queue_id} in the queue"


def queue_list(path: str | None, *, now: float | None = None) -> Result:
    """
    C{relaygw queue list}: one line per message (queue id, received time
    in UTC, age, size in octets, sender), then one per pending recipient
    (attempts, next attempt, last reply), oldest first.

    @param now: POSIX seconds for the ages (default: the time now).
    @raise ConfigError: the configuration is invalid.
    """
    now = time.time() if now is None else now
    with _spool(path) as spool:
        envelopes = [] if spool is None else spool.entries()
    if not envelopes:
        return 0, "Mail queue is empty"
    lines = [f"{'QUEUE ID':<18}  {'RECEIVED (UTC)':<20}  {'AGE':>6}  {'SIZE':>9}  SENDER"]
    pending = 0
    for e in envelopes:
        lines.append(
            f"{e.id:<18}  {_utc(e.received_at):<20}  {_age(now - e.received_at):>6}"
            f"  {e.size:>9}  <{e.sender}>"
        )
        for r in e.pending:
            pending += 1
            reply = f": {r.last_reply}" if r.last_reply else ""
            lines.append(f"    {r.address}  ({_attempts(r)}, next {_next(e)}){reply}")
    total = sum(e.size for e in envelopes)
    count = len(envelopes)
    lines.append(
        f"-- {count} message{'' if count == 1 else 's'}, {total} octets,"
        f" {pending} pending recipient{'' if pending == 1 else 's'}"
    )
    return 0, "\n".join(lines)


def _headers(data: BinaryIO) -> str:
    lines = []
    read = 0
    for raw in data:
        read += len(raw)
        line = raw.rstrip(b"\r\n")
        if not line or read > _HEADER_LIMIT:
            break
        lines.append(line.decode("utf-8", "replace"))
    return "\n".join(lines)


def queue_show(path: str | None, queue_id: str, *, now: float | None = None) -> Result:
    """
    C{relaygw queue show ID}: the envelope of one message and its headers.

    @return: C{(1, problem)} for an unknown id.
    @raise ConfigError: the configuration is invalid.
    """
    now = time.time() if now is None else now
    with _spool(path) as spool:
        if spool is None:
            return _unknown(queue_id)
        try:
            e = spool.load(queue_id)
            with spool.open_data(queue_id) as data:
                headers = _headers(data)
        except KeyError:
            return _unknown(queue_id)
        except (OSError, ValueError) as error:
            return 1, f"message {queue_id} cannot be read: {error}"
    tls = "(none)" if e.tls is None else f"{e.tls.version} {e.tls.cipher}"
    lines = [
        f"Queue ID:      {e.id}",
        f"Message-ID:    {e.message_id}",
        f"Received:      {_utc(e.received_at)} ({_age(now - e.received_at)} ago)",
        f"Size:          {e.size} octets",
        f"Sender:        <{e.sender}>",
        f"Connector:     {e.connector}",
        f"Client:        {e.client_ip}:{e.client_port}, HELO {e.helo or '(none)'}",
        f"Auth user:     {e.auth_user or '(none)'}",
        f"TLS:           {tls}",
        f"Body:          {e.body}{', SMTPUTF8' if e.smtputf8 else ''}",
        f"Next attempt:  {_next(e) if e.pending else '(none)'}",
        f"Delay warning: {'sent' if e.delay_warned else 'not sent'}",
        "Recipients:",
    ]
    for r in e.recipients:
        reply = f": {r.last_reply}" if r.last_reply else ""
        lines.append(f"  {r.address}  {r.state}, {_attempts(r)}{reply}")
    lines += ["", headers]
    return 0, "\n".join(lines)


def _request(
    spool: DirectorySpool, request: Request, wait: float, done: str, later: str
) -> Result:
    """
    Hand C{request} to the running delivery process; wait up to C{wait}
    seconds for it to be carried out.  C{done} and C{later} are the texts
    for either case, with C{{who}} naming the process.
    """
    pid = lock_holder(spool.root)
    who = "the delivery process" + ("" if pid is None else f" (pid {pid})")
    try:
        file = write_request(spool.root, request, time.time())
    except OSError as error:
        return 1, f"cannot write the request for {who}: {error}"
    deadline = time.monotonic() + wait
    while file.exists():
        if time.monotonic() >= deadline:
            return 0, later.format(who=who)
        time.sleep(_POLL)
    return 0, done.format(who=who)


def _change(path: str | None, queue_id: str | None, direct: Callable[[DirectorySpool], Result],
            request: Request, wait: float, done: str, later: str) -> Result:
    with _spool(path) as spool:
        if spool is None:
            return (0, "Mail queue is empty") if queue_id is None else _unknown(queue_id)
        if queue_id is not None:
            try:
                spool.load(queue_id)
            except KeyError:
                return _unknown(queue_id)
            except ValueError as error:
                return 1, f"message {queue_id} cannot be read: {error}"
        lock = SpoolLock.acquire(spool.root, wait=False)
        if lock is None:
            return _request(spool, request, wait, done, later)
        try:
            return direct(spool)
        finally:
            lock.release()


def queue_retry(path: str | None, queue_id: str | None, *, wait: float = 5.0) -> Result:
    """
    C{relaygw queue retry [ID]}: try one message (or every one) at once.

    A running delivery process is asked to; otherwise the next attempt
    recorded in the spool is set to "at once", for the next start.

    @param wait: seconds to wait for the delivery process to take the request.
    @return: C{(1, problem)} for an unknown id.
    @raise ConfigError: the configuration is invalid.
    """
    what = queue_id or "every message"

    def direct(spool: DirectorySpool) -> Result:
        envelopes = spool.entries() if queue_id is None else [spool.load(queue_id)]
        changed = 0
        for e in envelopes:
            if e.pending and e.next_attempt > 0:
                spool.update(evolve(e, next_attempt=0.0))
                changed += 1
        return 0, (f"{what}: set to be tried at once when delivery starts"
                   f" ({changed} message{'' if changed == 1 else 's'} changed)")

    return _change(path, queue_id, direct, Request("retry", queue_id), wait,
                   f"{what}: retried by {{who}}",
                   f"{what}: retry requested; {{who}} has not taken it yet")


def queue_delete(path: str | None, queue_id: str, *, wait: float = 5.0) -> Result:
    """
    C{relaygw queue delete ID}: remove a message from the queue, without a
    bounce.

    A running delivery process is asked to; it removes a message in flight
    once that attempt ended (whose recipients may meanwhile have been
    delivered).  Otherwise the entry is removed here.

    @param wait: seconds to wait for the delivery process to carry it out.
    @return: C{(1, problem)} for an unknown id.
    @raise ConfigError: the configuration is invalid.
    """

    def direct(spool: DirectorySpool) -> Result:
        spool.remove(queue_id)
        return 0, f"{queue_id}: deleted"

    return _change(path, queue_id, direct, Request("delete", queue_id), wait,
                   f"{queue_id}: deleted by {{who}}",
                   f"{queue_id}: delete requested; {{who}} carries it out when the"
                   " delivery attempt in flight ends")
