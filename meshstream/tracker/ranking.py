# -*- test-case-name: tests.test_tracker_ranking -*-
"""
Ranking the nodes that hold a content: who should a downloader try first?

A pure module (no Twisted, no clock, no global randomness): the tracker
passes the time and a L{random.Random}.  Two steps.

B{1. A weight per node} from the state it last announced (claims 36, 38)::

    weight = base × cpu × memory × disk × slots × fresh

  - C{base}: the node's free upload, C{max(0, upload_capacity_bps -
    upload_bps)} in bytes/s.  A node that did not report both fields gets the
    I{median} free upload of the candidates that reported a positive one (1.0
    when none did): unknown is neutral, neither preferred nor shunned.
  - C{cpu}: C{1 - cpu} (C{cpu} is the box's load, 0..1, clamped).
  - C{memory}: 1 up to L{MEMORY_KNEE} (80 % used), then falling linearly to
    0 at 100 %: only memory pressure counts, not a well-used page cache.
  - C{disk}: C{1 / (1 + disk_io_bps / DISK_IO_HALF_BPS)}: a node moving
    L{DISK_IO_HALF_BPS} (100 MiB/s) through its store counts half.
  - C{slots}: with C{upload_slots} reported, the share of upload slots still
    free, C{max(0, 1 - connections / upload_slots)} (a full node would refuse
    us); without it, C{1 / (1 + connections / DEFAULT_UPLOAD_SLOTS)}.
  - C{fresh}: C{1 - STALE_PENALTY × min(1, age / horizon)}, where C{age} is
    how long ago the node announced and C{horizon} how long the tracker
    keeps it listed: a node about to expire counts half.

  A field that is missing, not a number (C{bool} is not a number), not
  finite or negative is unknown, and an unknown field's factor is 1.

B{2. A spread, not a fixed order.}  Handing every downloader the same best
node would pile them all onto one popular seed.  L{spread_nodes} instead
draws the list by weighted random sampling without replacement
(Efraimidis–Spirakis): each node gets the key C{E / weight} with C{E} an
exponential variate, smallest first, which is the same as their
C{u ** (1 / weight)}, largest first.  So the first node is node I{i} with
probability C{weight_i / sum(weights)}, the second is drawn the same way
from the rest, and so on: a node with ten times the weight of each of nine
others comes first for about 10/19 of the downloaders, and everyone gets
some.  Nodes of weight 0 (no free upload, CPU at 100 %, memory full, every
slot taken) are listed after all the others, in random order: a last resort.
Ties (equal keys) go by node id.  L{rank_nodes} is the order without the
spread: weight descending, then node id.

Cost: one pass over the candidates, one random draw each and a partial
sort (C{bench/ranking.py} times it: about 14 ms for 10 000 candidates on the
project's machine, where the old deterministic sort took 11 ms).

B{Candidates, pre-selected by the database.}  A popular content may have
thousands of holders; reading, decoding and weighing them all at every
node-list request would cost milliseconds each.  So each node row keeps
L{rank_columns}, computed when the node announces: its free upload (NULL
when unknown) and its load factor (C{cpu × memory × disk × slots}).  A node
list asks the database for the L{candidate_count} holders with the largest
C{free upload × load factor} (the weight without the time-dependent
C{fresh}) among those whose free upload is known, and the
L{candidate_count} with the best load factor among the others (within each
of the two sorts the order does not depend on the median the unknown ones
get); only those are weighed, from the columns (L{weigh_columns}, with
freshness: the same figures as L{weigh} from their states), and spread as
above (L{spread_candidates}); only the chosen nodes' addresses and states
are read (in the same round trip), and never decoded.
Two consequences, both small: a holder outside its sort's best C{max(4 ×
limit, 64)} is never listed (it would have been drawn rarely: at least 4 ×
limit others weigh more, before freshness, which moves a weight by at most
half), and the neutral base of unknown nodes is the median of the
candidates', not of every holder's, free upload.  With no more holders than
L{candidate_count}, nothing changes.

The database reads the candidates best first by a I{pre-selection key}
(L{preselect_key}: that product, or the load factor alone, per sort) kept
with each holding, which an announce rewrites only when L{key_is_current}
says so: at most one rewrite per node per L{KEY_REFRESH}, and at most
L{REKEY_RATE} a second in all (L{RekeyBudget}, the most changed first), so
which holders are candidates may lag a changed state by that long or, with
many changing nodes, longer (the weights drawn by are always the last
announce's).  Rewriting costs one index entry per content the node holds,
and node states change at every announce.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from random import Random
from statistics import median
from typing import Any, Protocol, TypeVar

#: Memory use (0..1) above which a node's weight falls, to 0 at 1.0.
MEMORY_KNEE = 0.8
#: Store I/O (bytes/s) at which a node's weight is halved.
DISK_IO_HALF_BPS = 100.0 * 2**20
#: Upload slots assumed when a node reports connections but not its slots.
DEFAULT_UPLOAD_SLOTS = 32.0
#: The largest share of its weight a node loses for announcing long ago.
STALE_PENALTY = 0.5

_BIG = 2.0**1000
_log = math.log
_SORT_UP_TO = 2000
_INF = math.inf


class RankedNode(Protocol):
    """What the ranking needs to see of a node record."""

    @property
    def node_id(self) -> str: ...

    @property
    def state(self) -> Mapping[str, object]: ...

    @property
    def last_seen(self) -> float: ...


R = TypeVar("R", bound=RankedNode)


class _Named(Protocol):
    @property
    def node_id(self) -> str: ...


T = TypeVar("T", bound=_Named)


def _number(state: Mapping[str, object], name: str) -> float | None:
    """A reported field as a float, or None when unknown (see the module docstring)."""
    value = state.get(name)
    if type(value) is float:
        return value if 0.0 <= value < _INF else None
    if type(value) is int:
        return float(value) if 0 <= value < _BIG else None
    return None


def free_upload(state: Mapping[str, object]) -> float | None:
    """The spare upload bandwidth a node reported, or None when unknown."""
    capacity = _number(state, "upload_capacity_bps")
    used = _number(state, "upload_bps")
    if capacity is None or used is None:
        return None
    return max(0.0, capacity - used)


def load_factor(state: Mapping[str, object]) -> float:
    """The product of the C{cpu}, C{memory}, C{disk} and C{slots} factors of the module docstring."""
    return _parts(state)[1]


def _parts(state: Mapping[str, object]) -> tuple[float | None, float]:
    """
    C{(free upload or None, load factor)} of one state.

    Written out field by field, without helper calls: it runs for every
    candidate on every node-list request, and this is twice as fast as
    L{free_upload} and L{_number}; the tests check that both agree.
    """
    get: Callable[[str], Any] = state.get
    free = None
    capacity, used = get("upload_capacity_bps"), get("upload_bps")
    t, u = type(capacity), type(used)
    if (t is float or t is int) and (u is float or u is int) and 0 <= capacity < _BIG and 0 <= used < _BIG:
        free = capacity - used if capacity > used else 0.0
    factor = 1.0
    v = get("cpu")
    t = type(v)
    if (t is float or t is int) and 0 <= v < _BIG:
        factor *= 1.0 - (v if v < 1.0 else 1.0)
    v = get("memory")
    t = type(v)
    if (t is float or t is int) and MEMORY_KNEE < v < _BIG:
        factor *= max(0.0, (1.0 - v) / (1.0 - MEMORY_KNEE))
    v = get("disk_io_bps")
    t = type(v)
    if (t is float or t is int) and 0 <= v < _BIG:
        factor /= 1.0 + v / DISK_IO_HALF_BPS
    v = get("connections")
    t = type(v)
    if (t is float or t is int) and 0 <= v < _BIG:
        slots = get("upload_slots")
        t = type(slots)
        if (t is float or t is int) and 0 < slots < _BIG:
            factor *= max(0.0, 1.0 - v / slots)
        else:
            factor /= 1.0 + v / DEFAULT_UPLOAD_SLOTS
    return (None if free is None else float(free)), factor


def freshness(age: float, horizon: float | None) -> float:
    """The C{fresh} factor: 1 for a node that just announced, down to C{1 - STALE_PENALTY}."""
    if horizon is None or horizon <= 0 or not age > 0:
        return 1.0
    return 1.0 - STALE_PENALTY * (age / horizon if age < horizon else 1.0)


def neutral_base(states: Iterable[Mapping[str, object]]) -> float:
    """The base weight of a node whose free upload is unknown: the median positive free upload."""
    known = [f for f in map(free_upload, states) if f is not None and f > 0]
    return float(median(known)) if known else 1.0


def node_weight(
    state: Mapping[str, object],
    unknown_base: float = 1.0,
    age: float = 0.0,
    horizon: float | None = None,
) -> float:
    """
    The weight of one node (see the module docstring); 0 or more.

    @param unknown_base: the base when the node's free upload is unknown
        (L{neutral_base} of the candidates).
    @param age: seconds since the node announced.
    @param horizon: seconds a node stays listed; None for no staleness
        penalty.
    """
    free, factor = _parts(state)
    weight = (unknown_base if free is None else free) * factor * freshness(age, horizon)
    return weight if weight > 0.0 else 0.0


def weigh(nodes: Sequence[RankedNode], now: float | None = None, horizon: float | None = None) -> list[float]:
    """
    The weight of each of C{nodes}, in order: L{node_weight} with the
    candidates' L{neutral_base}, in one pass.

    @param now: the current time, for the staleness penalty (with
        C{horizon}); None for none.
    """
    return weigh_columns([_parts(n.state) for n in nodes], [n.last_seen for n in nodes], now, horizon)


def weigh_columns(
    columns: Sequence[tuple[float | None, float]],
    last_seen: Sequence[float],
    now: float | None = None,
    horizon: float | None = None,
) -> list[float]:
    """
    L{weigh} from each node's L{rank_columns} and C{last_seen} instead of
    its state (the same figures).  (It runs for every candidate of every
    node list: L{freshness} and the median are written out here, which
    halves its cost; the tests check the figures against L{node_weight}.)
    """
    known = sorted([free for free, _ in columns if free is not None and free > 0])
    n = len(known)
    if n == 0:
        unknown_base = 1.0
    elif n % 2:
        unknown_base = known[n // 2]
    else:
        unknown_base = (known[n // 2 - 1] + known[n // 2]) / 2
    stale = now is not None and horizon is not None and horizon > 0
    weights: list[float] = []
    append = weights.append
    for (free, part), seen in zip(columns, last_seen, strict=True):
        if stale:
            age = now - seen  # type: ignore[operator]
            if age > 0:
                part *= 1.0 - STALE_PENALTY * (age / horizon if age < horizon else 1.0)  # type: ignore[operator]
        weight = (unknown_base if free is None else free) * part
        append(weight if weight > 0.0 else 0.0)
    return weights


def rank_nodes(nodes: Iterable[R], now: float | None = None, horizon: float | None = None) -> list[R]:
    """C{nodes} by weight, heaviest first, then by node id: the order without the spread."""
    listed = list(nodes)
    weights = weigh(listed, now, horizon)
    order = sorted(range(len(listed)), key=lambda i: (-weights[i], listed[i].node_id))
    return [listed[i] for i in order]


def spread_nodes(
    nodes: Iterable[R],
    rng: Random,
    limit: int | None = None,
    now: float | None = None,
    horizon: float | None = None,
) -> list[R]:
    """
    Up to C{limit} of C{nodes} (all when None), drawn by weighted random
    sampling without replacement; weight-0 nodes come last.

    @param rng: the randomness (seeded in tests); one C{expovariate} per node.
    """
    listed = list(nodes)
    return _draw(listed, weigh(listed, now, horizon), rng, limit)


class RankedCandidate(Protocol):
    """What L{spread_candidates} needs to see of a candidate."""

    @property
    def node_id(self) -> str: ...

    @property
    def last_seen(self) -> float: ...

    @property
    def rank(self) -> tuple[float | None, float]: ...


C = TypeVar("C", bound=RankedCandidate)


def spread_candidates(
    candidates: Sequence[C],
    rng: Random,
    limit: int | None = None,
    now: float | None = None,
    horizon: float | None = None,
) -> list[C]:
    """L{spread_nodes} weighing by the candidates' stored L{rank_columns} (C{rank}): the same draw."""
    weights = weigh_columns([c.rank for c in candidates], [c.last_seen for c in candidates], now, horizon)
    return _draw(candidates, weights, rng, limit)


def _draw(listed: Sequence[T], weights: Sequence[float], rng: Random, limit: int | None) -> list[T]:
    # One exponential variate per node, in order: rng.expovariate(1.0)
    # written out (the same figures, at half the cost of the call).
    random = rng.random
    drawn: list[tuple[float, str, int]] = []
    last: list[tuple[float, str, int]] = []  # the weight-0 nodes
    for i, (node, weight) in enumerate(zip(listed, weights, strict=True)):
        e = -_log(1.0 - random())
        if weight > 0.0:
            drawn.append((e / weight, node.node_id, i))
        else:
            last.append((e, node.node_id, i))
    if limit is None:
        chosen = sorted(drawn) + sorted(last)
    elif limit < len(drawn):
        # (A sort is the faster of the two up to a few thousand nodes.)
        chosen = heapq.nsmallest(limit, drawn) if len(drawn) > _SORT_UP_TO else sorted(drawn)[:limit]
    else:
        chosen = sorted(drawn) + sorted(last)[: limit - len(drawn)]
    return [listed[k[2]] for k in chosen]


#: Candidates fetched per place in a node list, and the fewest fetched.
CANDIDATES_PER_PLACE = 4
MIN_CANDIDATES = 64


def candidate_count(limit: int) -> int:
    """How many candidates of each sort a node list of C{limit} nodes weighs (see the module docstring)."""
    return max(CANDIDATES_PER_PLACE * limit, MIN_CANDIDATES)


def rank_columns(state: Mapping[str, object]) -> tuple[float | None, float]:
    """
    What a node row keeps for the database's pre-selection and for
    L{weigh_columns}: C{(free upload, or None when unknown; load factor)}.
    """
    return _parts(state)


#: How long the pre-selection key kept with a node's holdings may lag the
#: node's announces at least (see L{key_is_current}), in seconds.
KEY_REFRESH = 300.0
#: The relative change of a pre-selection key that calls for rewriting it.
KEY_TOLERANCE = 0.25
#: How many nodes' kept keys announces rewrite per second at most, and at
#: once after a quiet spell (L{RekeyBudget}); a new node's, or a node's
#: whose kind changed, are written whatever these say.  Rewriting a node's
#: keys costs one index entry per content it holds, about 0.5 ms of SQLite
#: for 10 contents: a 64-announce group took 27 ms instead of 5.6 when every
#: due node was rewritten (bench/RESULTS.md).  20 a second is 1 % of a core;
#: it keeps up with KEY_REFRESH for up to 6 000 nodes whose states keep
#: changing (more whose states drift within the tolerance); beyond that,
#: under a heavy announce load, keys lag longer than L{KEY_REFRESH}.
REKEY_RATE = 20.0
REKEY_BURST = 20


def preselect_key(rank: tuple[float | None, float]) -> tuple[int, float]:
    """
    The pre-selection key of a node's L{rank_columns}: C{(1, free upload ×
    load factor)} when its free upload is known, C{(0, load factor)} when
    not; each sort picks its largest keys.
    """
    free, load = rank
    return (0, load) if free is None else (1, free * load)


def key_change(held: tuple[int, float], new: tuple[int, float]) -> float:
    """
    How far the pre-selection key C{new} is from C{held}: within a sort,
    their difference over the larger (0 when equal, 1 when one is 0);
    2 across sorts.
    """
    if held[0] != new[0]:
        return 2.0
    top = max(abs(new[1]), abs(held[1]))
    return 0.0 if top == 0.0 else abs(new[1] - held[1]) / top


class RekeyBudget:
    """
    A token bucket of key rewrites (L{REKEY_RATE} a second, at most
    L{REKEY_BURST} saved), on the announces' own clock: C{take} is given
    the time of the announces asking.  Not thread-safe.
    """

    def __init__(self, rate: float = REKEY_RATE, burst: int = REKEY_BURST) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at: float | None = None

    def take(self, now: float, wanted: int) -> int:
        """How many of C{wanted} rewrites may happen at C{now} (the tokens are spent)."""
        if self._at is None or now > self._at:
            if self._at is not None:
                self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
            self._at = now
        granted = min(wanted, int(self._tokens))
        self._tokens -= granted
        return granted


def key_is_current(held: tuple[int, float], held_at: float, new: tuple[int, float], now: float) -> bool:
    """
    Whether the pre-selection key C{held}, written at C{held_at}, may stay
    for a node whose key is now C{new}: when they are within
    L{KEY_TOLERANCE} of each other (L{key_change}), or when C{held} is
    younger than L{KEY_REFRESH} (a clock that went back counts as young).
    """
    return key_change(held, new) <= KEY_TOLERANCE or now - held_at < KEY_REFRESH
