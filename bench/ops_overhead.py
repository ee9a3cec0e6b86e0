"""
Per-request cost of the tracker's instrumentation (metrics + request event).

Answers requests through the real L{TrackerHandler} on real
L{ApiRequest} objects (no sockets, no database), with the instrumentation on
and with C{TrackerHandler._observe} replaced by a no-op, and prints the
difference per request.  Logging is set up as twistd with C{--logger
meshstream.logs.json_observer} sets it up (writing to /dev/null), at the
level given.

  /work/venv/bin/python bench/ops_overhead.py [--level info] [-n 20000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.task import Clock
from twisted.logger import globalLogBeginner

from meshstream.logs import json_observer
from meshstream.tracker.api import TrackerAPI, TrackerHandler
from meshstream.tracker.http1 import ApiRequest
from meshstream.tracker.metrics import TrackerMetrics


def make_request(path: bytes) -> ApiRequest:
    return ApiRequest(b"GET", path, {})


def per_request(handler: TrackerHandler, path: bytes, n: int) -> float:
    """Seconds per request, best of 5 rounds of C{n}."""
    best = float("inf")
    for _ in range(5):
        requests = [make_request(path) for _ in range(n)]
        gc.collect()
        start = time.perf_counter()
        for r in requests:
            handler(r)
        best = min(best, (time.perf_counter() - start) / n)
    return best


def timed(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--level", default="info")
    parser.add_argument("-n", type=int, default=20000)
    args = parser.parse_args()
    devnull = open(os.devnull, "w")
    globalLogBeginner.beginLoggingTo([json_observer(devnull, args.level)], redirectStandardIO=False)

    api = TrackerAPI(store=None, signing_key=Ed25519PrivateKey.generate(), clock=Clock())  # type: ignore[arg-type]
    resource = TrackerHandler(api)
    bare = TrackerHandler(api)
    bare._observe = lambda *a, **kw: None  # type: ignore[method-assign]
    results: dict[str, float] = {}
    for name, path in (
        ("ok (GET key, debug event)", b"/api/v1/key"),
        ("refused (401 me, info event)", b"/api/v1/me"),
    ):
        on = per_request(resource, path, args.n)
        off = per_request(bare, path, args.n)
        results[name] = on - off
        print(f"{name:32} {on * 1e6:7.1f} µs with, {off * 1e6:7.1f} µs without: +{(on - off) * 1e6:.1f} µs")
    metrics = TrackerMetrics()
    cost = timed(lambda: metrics.request("contents/{id}/nodes", b"GET", 200, 0.001), args.n)
    print(f"{'TrackerMetrics.request() alone':32} {cost * 1e6:7.2f} µs")
    results["metrics.request"] = cost
    print(
        json.dumps({"level": args.level, "overhead_us": {k: round(v * 1e6, 2) for k, v in results.items()}})
    )


if __name__ == "__main__":
    main()
