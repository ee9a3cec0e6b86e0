# -*- test-case-name: tests.test_tracker_ranking -*-
"""
Ranking the nodes that hold a content: who should a downloader try first?

A pure module (no Twisted): it sorts node records by the state each node last
announced.  The sort key, most significant first:

  1. **Free upload**, C{max(0, upload_capacity_bps - upload_bps)}, largest
     first.  It is known only when the node reported both fields; nodes whose
     free upload is unknown come after every node whose free upload is known.
  2. **Connections**, fewest first.  A node that did not report
     C{connections} comes after the nodes (of equal free upload) that did.
  3. **Node id**, ascending, so the order is total and deterministic.

A field is "reported" when it is an C{int} or C{float} (not a C{bool}), finite
and not negative; anything else counts as missing.  The tracker's announce
validator already refuses such values, so this only matters for callers that
feed records from elsewhere.

The tracker's store keeps L{rank_columns} (free upload, connections) beside
each node's state, so that the database can order a content's holders by
the same key and hand back only the best few.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Protocol, TypeVar


class RankedNode(Protocol):
    """What the ranking needs to see of a node record."""

    @property
    def node_id(self) -> str: ...

    @property
    def state(self) -> Mapping[str, object]: ...


R = TypeVar("R", bound=RankedNode)

SortKey = tuple[int, float, int, float, str]


def _number(state: Mapping[str, object], name: str) -> float | None:
    value = state.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return float(value)


def free_upload(state: Mapping[str, object]) -> float | None:
    """The spare upload bandwidth a node reported, or None when unknown."""
    capacity = _number(state, "upload_capacity_bps")
    used = _number(state, "upload_bps")
    if capacity is None or used is None:
        return None
    return max(0.0, capacity - used)


def rank_key(node_id: str, state: Mapping[str, object]) -> SortKey:
    """The sort key of one node (smaller sorts first)."""
    free = free_upload(state)
    connections = _number(state, "connections")
    return (
        0 if free is not None else 1,
        -free if free is not None else 0.0,
        0 if connections is not None else 1,
        connections if connections is not None else 0.0,
        node_id,
    )


def rank_columns(state: Mapping[str, object]) -> tuple[float | None, float | None]:
    """
    C{(free upload, connections)} of a state, None where unknown: the sort
    key without its node id, as a database orders it (NULL = unknown).
    """
    return free_upload(state), _number(state, "connections")


def rank_nodes(nodes: Iterable[R]) -> list[R]:
    """Return C{nodes} best first, by the rule in this module's docstring."""
    return sorted(nodes, key=lambda n: rank_key(n.node_id, n.state))
