"""
The spool as the admin endpoint sees it: counts for the gauges and the
queue health check, and the bounded C{/queue} listing (SPEC section 7).

A spool may hold 100,000 entries, so neither reads every envelope: queue ids
begin with their creation time (L{relaygw.spool.ids}), so the names of the
C{queue/} directory, sorted, are the entries oldest first.  The count is one
directory scan; the oldest message's age reads one envelope; a listing reads
C{limit} envelopes.  All of it runs in the admin thread pool, never on the
reactor, through a read-only L{DirectorySpool} of its own (as C{relaygw
queue list} does), and the counts are cached for L{STATS_TTL} seconds so a
scrape every second costs one scan every few seconds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from relaygw._types import ISpoolReactor
from relaygw.ops._once import Once
from relaygw.spool.commit import ENTRY
from relaygw.spool.envelope import Envelope
from relaygw.spool.ids import is_queue_id
from relaygw.spool.store import DirectorySpool

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "STATS_TTL", "QueueStats", "QueueView", "as_json"]

#: Seconds the counts are reused for.
STATS_TTL = 5.0
#: Messages C{/queue} lists without C{?limit=}, and at most.
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000


@frozen
class QueueStats:
    """
    One count of the spool.

    @ivar count: committed entries.
    @ivar oldest: C{received_at} of the oldest, C{None} when empty.
    @ivar taken: POSIX seconds of the count.
    """

    count: int
    oldest: float | None
    taken: float

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest message has waited (0 when the spool is empty)."""
        return 0.0 if self.oldest is None else max(0.0, now - self.oldest)


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def as_json(envelope: Envelope) -> dict[str, Any]:
    """One C{/queue} object (SPEC section 7); C{received_at} in ISO 8601 UTC."""
    return {
        "id": envelope.id,
        "sender": envelope.sender,
        "size": envelope.size,
        "received_at": _utc(envelope.received_at),
        "recipients": [
            {"address": r.address, "state": r.state, "attempts": r.attempts,
             "last_reply": r.last_reply}
            for r in envelope.recipients
        ],
    }


class QueueView:
    """Counts and lists the spool at C{spool_dir}, in C{pool}."""

    def __init__(self, spool_dir: Path, reactor: ISpoolReactor, pool: ThreadPool) -> None:
        """
        @raise OSError: the spool cannot be opened.
        """
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._pool = pool
        self._spool = DirectorySpool(spool_dir, reactor)
        self._stats: QueueStats | None = None
        self._counting = Once(self._scan, reactor)
        # One listing at a time: each may read MAX_LIMIT envelopes.
        self._listing = DeferredSemaphore(1)

    def cached(self) -> QueueStats | None:
        """The last count, C{None} before the first; never blocks."""
        return self._stats

    def stats(self) -> Deferred[QueueStats]:
        """
        A count at most L{STATS_TTL} seconds old; one scan runs at a time
        and callers meanwhile share it.

        @return: fails with L{OSError} when the spool cannot be read.
        """
        stats = self._stats
        if stats is not None and self._clock.seconds() - stats.taken < STATS_TTL:
            return succeed(stats)
        return self._counting.get()

    def _scan(self) -> Deferred[QueueStats]:
        d = deferToThreadPool(self._reactor, self._pool, self._count, self._clock.seconds())
        return d.addCallback(self._counted)

    def _counted(self, stats: QueueStats) -> QueueStats:
        self._stats = stats
        return stats

    def listing(self, limit: int) -> Deferred[tuple[int, list[dict[str, Any]]]]:
        """
        @return: fires with the number of entries and the first C{limit}
            of them, oldest first, as L{as_json} objects (entries removed
            while being read are left out).
        """
        return self._listing.run(
            deferToThreadPool, self._reactor, self._pool, self._list, limit
        )

    def close(self) -> None:
        """Close the read-only spool."""
        self._spool.close()

    # -- pool threads -------------------------------------------------------

    def _ids(self) -> list[str]:
        ids = []
        with os.scandir(self._spool.prefix) as names:
            for entry in names:
                if entry.name.endswith(ENTRY):
                    queue_id = entry.name[: -len(ENTRY)]
                    if is_queue_id(queue_id):
                        ids.append(queue_id)
        ids.sort()
        return ids

    def _load(self, queue_id: str) -> Envelope | None:
        try:
            return self._spool.load(queue_id)
        except (KeyError, ValueError, OSError):
            return None  # removed meanwhile, or unreadable (recovery's business)

    def _count(self, now: float) -> QueueStats:
        ids = self._ids()
        oldest = None
        # The first few: the oldest may be delivered while we look.
        for queue_id in ids[:10]:
            envelope = self._load(queue_id)
            if envelope is not None:
                oldest = envelope.received_at
                break
        return QueueStats(len(ids), oldest, now)

    def _list(self, limit: int) -> tuple[int, list[dict[str, Any]]]:
        ids = self._ids()
        found = []
        for queue_id in ids[:limit]:
            envelope = self._load(queue_id)
            if envelope is not None:
                found.append(as_json(envelope))
        return len(ids), found

