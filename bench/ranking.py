"""
How long the tracker takes to rank the holders of one content.

    /work/venv/bin/python bench/ranking.py                 # 10 000 candidates
    /work/venv/bin/python bench/ranking.py --nodes 1000 --runs 200
    /work/venv/bin/python bench/ranking.py --store         # also the SQLite lookup

Times, over C{--runs} runs, C{spread_nodes} (weights + weighted sampling, the
first 50 and the first 200 of the draw, and the whole list) and, for
comparison, C{rank_nodes} (the same weights, sorted without the spread).
With C{--store} it also times the store's C{nodes_for} on a temporary SQLite
file holding that many live nodes, which is what a node-list request costs
besides the ranking (the query and decoding every node's state JSON).
Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshstream.tracker.ranking import rank_nodes, spread_nodes
from meshstream.tracker.store import NodeRecord

NOW = 1_000_000.0
HORIZON = 90.0


def make_records(n: int, rng: random.Random) -> list[NodeRecord]:
    """Nodes with every state field, as agents announce them; a tenth report no capacity."""
    records = []
    for i in range(n):
        state: dict[str, Any] = {
            "upload_bps": round(rng.uniform(0, 8e6), 1),
            "download_bps": round(rng.uniform(0, 2e7), 1),
            "disk_io_bps": round(rng.uniform(0, 5e7), 1),
            "connections": rng.randint(0, 32),
            "upload_slots": 32,
            "cpu": rng.random(),
            "memory": rng.random(),
        }
        if i % 10:
            state["upload_capacity_bps"] = 1e7
        records.append(
            NodeRecord(
                f"node-{i:05d}",
                f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:7071",
                state,
                NOW - rng.uniform(0, HORIZON),
            )
        )
    return records


def timed(fn: Callable[[], object], runs: int) -> dict[str, float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 2),
        "max_ms": round(samples[-1], 2),
    }


async def store_timing(reactor: Any, records: list[NodeRecord], runs: int) -> dict[str, float]:
    """C{nodes_for} on a temporary SQLite file holding C{records}."""
    from meshstream.manifest import Manifest
    from meshstream.tracker.store import open_store

    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:{os.path.join(tmp, 'tracker.sqlite')}", reactor)
        await store.start()
        roots = (b"\x01" * 32,)
        cid = Manifest(size=100, block_size=1024, sub_block_size=1024, block_roots=roots).content_id
        await store.add_manifest(cid, "{}", NOW)
        for r in records:
            await store.announce(r.node_id, r.address, r.state, r.last_seen, [cid])
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            await store.nodes_for(cid, NOW - HORIZON)
            samples.append((time.perf_counter() - start) * 1000)
        store.close()
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 2),
    }


async def run(reactor: Any, args: argparse.Namespace) -> None:
    records = make_records(args.nodes, random.Random(1))
    rng = random.Random(2)
    out: dict[str, Any] = {"nodes": args.nodes, "runs": args.runs}
    for label, limit in (("spread_50", 50), ("spread_200", 200), ("spread_all", None)):
        out[label] = timed(lambda limit=limit: spread_nodes(records, rng, limit, NOW, HORIZON), args.runs)
    out["rank_all"] = timed(lambda: rank_nodes(records, NOW, HORIZON), args.runs)
    if args.store:
        out["sqlite_nodes_for"] = await store_timing(reactor, records, args.runs)
    for key, value in out.items():
        print(f"# {key}: {value}", file=sys.stderr)
    print(json.dumps(out))


def main() -> None:
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--store", action="store_true", help="also time the SQLite lookup")
    args = parser.parse_args()
    task.react(lambda reactor: ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
