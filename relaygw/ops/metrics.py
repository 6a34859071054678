"""
The Prometheus metrics of SPEC section 7, fed by the log event stream.

L{MetricsObserver} is a twisted.logger observer on the receiving process's
global publisher.  The delivery process's events are re-published there
(L{relaygw.runner.DeliveryProcess}), so one scrape of this process counts
what both processes did.  Which event feeds which metric:

  - C{relaygw_connections_total{connector}}: C{event="receive.disconnect"},
    the one event every session a connector took logs (at its end: a
    session is counted when it closes);
  - C{relaygw_messages_received_total{connector}}: C{event="receive.queued"};
  - C{relaygw_messages_delivered_total}, C{_deferred_total},
    C{_bounced_total} C{{route}}: the scheduler's C{event_id} C{DELIVER},
    C{DEFER}, C{FAIL} (and C{EXPIRE}, bounced too), one per recipient and
    attempt (as the tracking log counts them);
  - C{relaygw_auth_attempts_total{connector,result}}: C{event="auth.result"}
    with C{result} one of C{success}, C{failure}, C{tempfail}, C{throttled};
  - C{relaygw_directory_request_seconds}: C{event="directory.request"}
    (logins and recipient lookups of L{relaygw.auth.directory}, not the
    health check's binds);
  - C{relaygw_queue_messages} and C{relaygw_queue_oldest_age_seconds}: the
    spool, as L{relaygw.ops.queue.QueueView} last counted it (NaN before).

The registry is private (not prometheus_client's global one), so several
gateways in one process, as in the tests, do not share counters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer

from relaygw.config._model import Config
from relaygw.events import is_copy
from relaygw.ops.queue import QueueStats

__all__ = ["AUTH_RESULTS", "CONTENT_TYPE", "Metrics", "MetricsObserver"]

#: The C{result} label values of C{relaygw_auth_attempts_total}.
AUTH_RESULTS = ("success", "failure", "tempfail", "throttled")
#: The content type of the text format L{Metrics.render} writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Directory latency buckets, seconds: a LAN DC answers in milliseconds,
#: the configured timeout (5 s by default) ends the scale.
_DIRECTORY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Scheduler C{event_id} -> counter; an expired recipient is bounced too.
_OUTCOMES = {"DELIVER": "delivered", "DEFER": "deferred", "FAIL": "bounced", "EXPIRE": "bounced"}
_KINDS = ("delivered", "deferred", "bounced")


class _QueueCollector(Collector):
    def __init__(self, stats: Callable[[], QueueStats | None], now: Callable[[], float]) -> None:
        self._stats = stats
        self._now = now

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        count = math.nan if stats is None else float(stats.count)
        age = math.nan if stats is None else stats.oldest_age(self._now())
        yield GaugeMetricFamily("relaygw_queue_messages", "Messages in the spool.", value=count)
        yield GaugeMetricFamily(
            "relaygw_queue_oldest_age_seconds",
            "Age of the oldest message in the spool (0 when it is empty).",
            value=age,
        )


class Metrics:
    """
    The gateway's metrics in their own L{CollectorRegistry}.

    @ivar registry: what L{render} writes.
    """

    def __init__(
        self,
        config: Config,
        *,
        queue_stats: Callable[[], QueueStats | None],
        now: Callable[[], float],
    ) -> None:
        """
        @param config: its connectors and routes get their series at zero,
            so every name and label shows before the first event.
        @param queue_stats: the last queue count (never blocks).
        @param now: POSIX seconds, for the queue's age.
        """
        registry = self.registry = CollectorRegistry()
        self.connections = Counter(
            "relaygw_connections", "Sessions taken by a connector (counted when they end).",
            ["connector"], registry=registry,
        )
        self.received = Counter(
            "relaygw_messages_received", "Messages accepted into the spool.",
            ["connector"], registry=registry,
        )
        self.outcomes = {
            kind: Counter(
                f"relaygw_messages_{kind}", f"Recipients {kind}, per delivery attempt.",
                ["route"], registry=registry,
            )
            for kind in _KINDS
        }
        self.auth = Counter(
            "relaygw_auth_attempts", "AUTH attempts by result.",
            ["connector", "result"], registry=registry,
        )
        self.directory = Histogram(
            "relaygw_directory_request_seconds", "Directory logins and lookups, seconds.",
            buckets=_DIRECTORY_BUCKETS, registry=registry,
        )
        registry.register(_QueueCollector(queue_stats, now))
        self.prime(config)

    def prime(self, config: Config) -> None:
        """Create the zero series of C{config}'s connectors and routes."""
        for connector in config.connectors:
            self.connections.labels(connector.name)
            self.received.labels(connector.name)
            for result in AUTH_RESULTS:
                self.auth.labels(connector.name, result)
        for route in config.routes:
            for counter in self.outcomes.values():
                counter.labels(route.name)

    def render(self) -> bytes:
        """The Prometheus text format of every metric (L{CONTENT_TYPE})."""
        return generate_latest(self.registry)

    def record(self, event: Mapping[str, object]) -> None:
        """Count one log event (see the module docstring for which)."""
        name = event.get("event")
        if name == "receive.disconnect":
            self.connections.labels(_label(event.get("connector"))).inc()
        elif name == "receive.queued":
            self.received.labels(_label(event.get("connector"))).inc()
        elif name == "auth.result":
            result = event.get("result")
            if result in AUTH_RESULTS:
                self.auth.labels(_label(event.get("connector")), str(result)).inc()
        elif name == "directory.request":
            seconds = event.get("seconds")
            if isinstance(seconds, (int, float)):
                self.directory.observe(max(0.0, float(seconds)))
        else:
            kind = _OUTCOMES.get(str(event.get("event_id")))
            if kind is not None:
                self.outcomes[kind].labels(_label(event.get("route"))).inc()


def _label(value: object) -> str:
    return "" if value is None else str(value)


@implementer(ILogObserver)
class MetricsObserver:
    """
    The observer that feeds L{Metrics}; add it to the global log publisher.
    It never raises (a raising observer would be removed by the publisher).
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        #: Events that could not be counted (logging them would feed this
        #: observer again).
        self.errors = 0

    def __call__(self, event: LogEvent) -> None:
        if is_copy(event):  # seen already, on the per-message stream
            return
        try:
            self.metrics.record(event)
        except Exception:
            self.errors += 1
