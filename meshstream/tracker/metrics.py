# -*- test-case-name: tests.test_tracker_ops -*-
"""
The tracker's Prometheus metrics.

Each tracker holds its own L{CollectorRegistry} (never the process-wide
one), so that tests and several trackers in one process keep separate
counts.  What it exports::

  meshstream_tracker_requests_total{route,method,status}     counter
  meshstream_tracker_request_duration_seconds{route}          histogram
  meshstream_tracker_logins_total{outcome}                    counter
  meshstream_tracker_announces_total                          counter
  meshstream_tracker_store_errors_total                       counter
  meshstream_tracker_node_keys_rewritten_total                counter
  meshstream_tracker_live_nodes                               gauge
  meshstream_tracker_contents                                 gauge

Label values are bounded: C{route} is a route's pattern (C{contents/{id}/nodes})
or C{unmatched}, never the raw path; C{method} is one of L{METHODS} or
C{other}; C{status} is one of the few statuses the tracker answers; C{outcome}
is C{ok}, C{bad_credentials} or C{disabled}.

Scraping never queries the database: the two gauges hold what the purge timer
last counted (L{TrackerMetrics.set_stats}) and the store-error and
key-rewrite counters read the store's own counts.  L{MetricsResource} serves
the registry as C{GET /metrics} in the Prometheus text format (or
OpenMetrics, if asked for).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

#: Latency buckets, in seconds: a cached answer takes well under a
#: millisecond, a database round trip a few, a login's password check ~50 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

#: Request methods counted under their own name; any other is C{other}.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

#: The C{route} label of a request that matched no route's path.
UNMATCHED = "unmatched"

LOGIN_OK = "ok"
LOGIN_BAD_CREDENTIALS = "bad_credentials"
LOGIN_DISABLED = "disabled"
LOGIN_THROTTLED = "throttled"


def method_label(method: bytes) -> str:
    """A bounded label for a request method."""
    name = method.decode("ascii", "replace")
    return name if name in METHODS else "other"


class _ReadCounter(Collector):
    """A counter whose value is read, at scrape time, from the store."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._name = name
        self._documentation = documentation
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class TrackerMetrics:
    """
    One tracker's metrics.

    @param timer: a monotonic clock in seconds, for request durations (a
        duration is not a time of day: the tracker's injected reactor clock
        stands still in tests, this one does not).
    @param store_errors: reads how many store calls failed so far.
    @param keys_rewritten: reads how many nodes' holdings had their
        pre-selection key rewritten by announces so far.
    """

    def __init__(
        self,
        timer: Callable[[], float] = time.perf_counter,
        store_errors: Callable[[], int] = lambda: 0,
        keys_rewritten: Callable[[], int] = lambda: 0,
    ) -> None:
        self.timer = timer
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "meshstream_tracker_requests",
            "HTTP API requests answered, by route pattern, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "meshstream_tracker_request_duration_seconds",
            "Time from routing an API request to writing its answer.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.logins = Counter(
            "meshstream_tracker_logins",
            "Login attempts with a well-formed body, by outcome (ok, bad_credentials, disabled).",
            ["outcome"],
            registry=registry,
        )
        self.announces = Counter(
            "meshstream_tracker_announces", "Announces accepted and stored.", registry=registry
        )
        self.live_nodes = Gauge(
            "meshstream_tracker_live_nodes",
            "Nodes heard from within their expiry time, as of the last purge.",
            registry=registry,
        )
        self.contents = Gauge(
            "meshstream_tracker_contents",
            "Registered manifests, as of the last purge.",
            registry=registry,
        )
        registry.register(
            _ReadCounter(
                "meshstream_tracker_store_errors",
                "Store calls that failed because of the database (driver errors, lost connections, closed store).",
                store_errors,
            )
        )
        registry.register(
            _ReadCounter(
                "meshstream_tracker_node_keys_rewritten",
                "Nodes whose holdings had their pre-selection key rewritten by an announce (see docs/api.md, Ranking).",
                keys_rewritten,
            )
        )
        # (route, method label, status) -> its counter and histogram children:
        # labels() validates and locks on every call, a dict lookup does not.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        for outcome in (LOGIN_OK, LOGIN_BAD_CREDENTIALS, LOGIN_DISABLED, LOGIN_THROTTLED):
            self.logins.labels(outcome)

    def request(self, route: str, method: bytes, status: int, seconds: float) -> None:
        """Count an answered request and its duration."""
        key = (route, method_label(method), status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(*key), self.latency.labels(route))
            self._children[key] = children
        count, latency = children
        count.inc()
        latency.observe(seconds)

    def login(self, outcome: str) -> None:
        self.logins.labels(outcome).inc()

    def set_stats(self, live_nodes: int, contents: int) -> None:
        """Record what the purge timer counted in the store."""
        self.live_nodes.set(live_nodes)
        self.contents.set(contents)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the format C{accept} asks for: C{(body, content type)}."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class MetricsResource(Resource):
    """
    The root of the metrics listener: C{GET /metrics}, and plain-text 404/405
    for anything else.
    """

    isLeaf = True

    def __init__(self, metrics: TrackerMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found: the metrics are at /metrics\n"
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"use GET\n"
        accept = request.getHeader(b"accept") or b""
        body, content_type = self._metrics.exposition(accept.decode("latin-1"))
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return body
