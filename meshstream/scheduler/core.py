# -*- test-case-name: tests.test_scheduler -*-
"""
The download scheduler: a pure state machine, events in and commands out.

No sockets, no reactor: time comes from an injected L{IReactorTime} (only its
C{seconds()} is read), and every event method returns the list of commands
the caller must carry out (L{Request}, L{Cancel}, L{Drop}, L{BlockDone},
L{NeedSources}).

Valuation index (claims 4, 5, 11)
    Each source has an estimated delivery rate C{v} in bytes/s: before any
    sub block has arrived, the rate the tracker reported for the node (its free
    upload bandwidth, the C{hint}); afterwards an EWMA (weight C{ALPHA}) of
    measured rates.  A sub block of C{n} bytes is estimated to cost
    C{rtt + n / v} seconds on that source.

Distribution (claims 2, 4)
    When a block enters the window its sub blocks are shared out over the
    usable sources in proportion to C{v} (largest remainders), each source
    keeping at most C{pipeline} requests outstanding so RTT never caps its
    throughput; the rest of its share waits in its queue.

Redistribution (claims 6, 7, 8, 14, 16, 28)
    When a source F has nothing queued or in flight while others still have
    queued work, S = the slowest source with queued (not yet requested) sub
    blocks.  If S would need longer for its queue than F needs for one more sub
    block, F takes C{max(1, round(r * vF / (vF + vS)))} of S's C{r} queued sub
    blocks (from the end of S's queue).  When nothing is queued anywhere but a
    sub block is still in flight on a source much slower than F, F duplicates
    it (endgame); the first verified copy wins and the other is cancelled.

Sources without hash lists
    HTTP sources send no leaf list, so their sub blocks cannot be checked one
    by one until a block's leaves are known: the session reports them with
    L{Scheduler.arrived} (counted for the source's rate, its pipeline freed,
    the sub block held), then L{Scheduler.confirm} or L{Scheduler.discard}
    once the whole block was checked against its root.

Policies
    C{adaptive} (the default) is all of the above; C{static} splits every
    block equally over the sources and never redistributes: the baseline
    the benchmark compares against.

Faults (claims 9, 13, 15)
    A lost or stalled source gives its work back; a sub block that fails
    verification is requested elsewhere and its sender gets a strike;
    C{max_strikes} strikes drop the source.  Sources marked costly (the
    origin) are only given work when no other source is usable.

This is the foundation's version of the policy; its seams (events and
commands) are the ones the full scheduler keeps.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator

from attrs import define, field, frozen
from twisted.internet.interfaces import IReactorTime

from meshstream.manifest import Geometry

ALPHA = 0.3
#: How often the session should call L{Scheduler.tick}, in seconds.
TICK = 0.25
DEFAULT_PIPELINE = 4
#: Blocks in flight.  Chosen from bench/multisource.py (bench/RESULTS.md):
#: W=1 (the seed's faithful mode) idles at every block boundary (ratio 1.4 to
#: the ideal), W=2 starves fast sources among many; W=8 and W=16 meet every
#: throttled-scenario goal, and W=16 is 20 % faster on unthrottled HTTP
#: mirrors (each gets whole blocks, so more blocks keep all of them busy).
DEFAULT_WINDOW = 16
DEFAULT_HINT_RATE = 1024 * 1024.0
MIN_STALL_TIMEOUT = 5.0
ENDGAME_FACTOR = 2.0
#: A source counts as overdue only past this much silence, whatever its rate:
#: at loopback speeds a sub block takes well under a millisecond, and reactor
#: jitter alone would otherwise trigger duplicates.
OVERDUE_FLOOR = 0.25
#: A sub block this much past its estimated arrival counts as late in the endgame.
LATE_SLACK = 0.05

SubId = tuple[int, int]  # (block, sub)


@frozen
class Request:
    source: Hashable
    block: int
    subs: tuple[int, ...]


@frozen
class Cancel:
    source: Hashable
    block: int
    subs: tuple[int, ...]


@frozen
class Drop:
    """Disconnect the source and black-list it."""

    source: Hashable
    reason: str


@frozen
class BlockDone:
    """Block C{block} is verified; blocks are announced strictly in order."""

    block: int


@frozen
class NeedSources:
    """No usable source is left for the remaining work."""

    reason: str


Command = Request | Cancel | Drop | BlockDone | NeedSources


class SubQueue:
    """
    An ordered queue of sub block ids with O(1) membership and removal
    (a deque plus a set; removed entries are skipped lazily when popped).
    The scheduler asks "is X queued anywhere?" on every arrival, so a plain
    deque's linear scans made large windows quadratic.
    """

    __slots__ = ("_items", "_live")

    def __init__(self, items: Iterable[SubId] = ()) -> None:
        self._items: deque[SubId] = deque()
        self._live: set[SubId] = set()
        self.extend(items)

    def __len__(self) -> int:
        return len(self._live)

    def __bool__(self) -> bool:
        return bool(self._live)

    def __contains__(self, sid: object) -> bool:
        return sid in self._live

    def __iter__(self) -> Iterator[SubId]:
        seen: set[SubId] = set()
        for sid in self._items:
            if sid in self._live and sid not in seen:
                seen.add(sid)
                yield sid

    def append(self, sid: SubId) -> None:
        if sid not in self._live:
            self._live.add(sid)
            self._items.append(sid)

    def appendleft(self, sid: SubId) -> None:
        if sid not in self._live:
            self._live.add(sid)
            self._items.appendleft(sid)

    def extend(self, sids: Iterable[SubId]) -> None:
        for sid in sids:
            self.append(sid)

    def discard(self, sid: SubId) -> None:
        self._live.discard(sid)

    def popleft(self) -> SubId:
        return self._take(self._items.popleft)

    def pop(self) -> SubId:
        return self._take(self._items.pop)

    def _take(self, pop: Callable[[], SubId]) -> SubId:
        while True:
            sid = pop()
            if sid in self._live:
                self._live.remove(sid)
                return sid

    def clear(self) -> None:
        self._items.clear()
        self._live.clear()


@define
class SourceState:
    key: Hashable
    hint: float
    costly: bool = False
    pipeline: int = DEFAULT_PIPELINE
    coarse: bool = False  # sends no hash lists (HTTP): whole blocks suit it best
    rate: float | None = None  # the valuation index: measured, lowered by overdue silences
    measured: float | None = None  # EWMA of delivered rate only
    rtt: float = 0.0
    queue: SubQueue = field(factory=SubQueue)
    inflight: dict[SubId, float] = field(factory=dict)
    busy_since: float | None = None
    last_progress: float = 0.0
    bytes: int = 0
    strikes: int = 0
    subs_done: int = 0
    lost_races: int = 0  # endgame races lost in a row, with nothing delivered between

    @property
    def speed(self) -> float:
        return self.rate if self.rate is not None else self.hint

    def idle(self) -> bool:
        return not self.queue and not self.inflight


class Scheduler:
    def __init__(
        self,
        geometry: Geometry,
        clock: IReactorTime,
        pipeline: int = DEFAULT_PIPELINE,
        window: int = DEFAULT_WINDOW,
        max_strikes: int = 3,
        have: Iterable[SubId] = (),
        policy: str = "adaptive",
    ) -> None:
        if pipeline < 1 or window < 1:
            raise ValueError("pipeline and window must be at least 1")
        if policy not in ("adaptive", "static"):
            raise ValueError("policy is 'adaptive' or 'static'")
        self.adaptive = policy == "adaptive"
        self.g = geometry
        self.clock = clock
        self.pipeline = pipeline
        self.window = window
        self.max_strikes = max_strikes
        self.sources: dict[Hashable, SourceState] = {}
        self._done: set[SubId] = set(have)
        self._missing: dict[int, int] = {}
        self._next_block = 0  # first block not yet announced done
        self._opened = 0  # blocks [_next_block, _opened) are in the window
        self._pool = SubQueue()  # work no source holds
        self._parked: dict[SubId, Hashable] = {}  # arrived, awaiting verification
        self._batch_depth = 0
        self.duplicated_bytes = 0

    # -- queries ---------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._next_block >= self.g.num_blocks

    @property
    def next_block(self) -> int:
        return self._next_block

    def is_done(self, block: int, sub: int) -> bool:
        return (block, sub) in self._done

    def usable(self) -> list[SourceState]:
        cheap = [s for s in self.sources.values() if not s.costly]
        return cheap or list(self.sources.values())

    # -- events ----------------------------------------------------------

    def start(self) -> list[Command]:
        out: list[Command] = []
        self._advance(out)
        return out

    def add_source(
        self,
        key: Hashable,
        hint: float | None = None,
        costly: bool = False,
        pipeline: int | None = None,
        coarse: bool = False,
    ) -> list[Command]:
        now = self.clock.seconds()
        old = self.sources.get(key)
        if old is not None:  # a reconnect under the same key: its old work goes back
            self._give_back(old)
        self.sources[key] = SourceState(
            key,
            hint if hint and hint > 0 else DEFAULT_HINT_RATE,
            costly,
            pipeline=pipeline or self.pipeline,
            coarse=coarse,
            last_progress=now,
        )
        out: list[Command] = []
        # Share out again everything queued but not yet requested, so that a
        # source joining late gets its part of the blocks already in the
        # window (and a cheap source back takes the work off costly ones).
        queued: list[SubId] = []
        for s in self.sources.values():
            queued.extend(s.queue)
            s.queue.clear()
        by_block: dict[int, list[SubId]] = {}
        for sid in sorted(set(queued)):
            by_block.setdefault(sid[0], []).append(sid)
        for subs in by_block.values():
            self._distribute(subs, out)
        self._assign_pool(out)
        self._balance(out)
        self._fill(out)
        return out

    def remove_source(self, key: Hashable) -> list[Command]:
        src = self.sources.pop(key, None)
        out: list[Command] = []
        if src is None:
            return out
        self._give_back(src)
        self._assign_pool(out)
        self._fill(out)
        self._check_starved(out)
        return out

    def rtt_measured(self, key: Hashable, rtt: float) -> None:
        src = self.sources.get(key)
        if src is not None and rtt >= 0:
            src.rtt = rtt if src.rtt == 0 else (1 - ALPHA) * src.rtt + ALPHA * rtt

    def received(self, key: Hashable, block: int, sub: int, nbytes: int) -> list[Command]:
        """A sub block from C{key} arrived I{and verified}."""
        src = self._arrival(key, (block, sub), nbytes)
        return self._complete((block, sub), src, nbytes)

    def arrived(self, key: Hashable, block: int, sub: int, nbytes: int) -> list[Command]:
        """
        A sub block from C{key} arrived but cannot be verified yet (its block's
        leaves are unknown: an HTTP source sends no hash list).  It counts for
        the source's rate and frees its pipeline; L{confirm} or L{discard} it
        once the block can be checked as a whole.
        """
        sid = (block, sub)
        self._arrival(key, sid, nbytes)
        out: list[Command] = []
        if sid in self._done or sid in self._parked:
            return out
        self._parked[sid] = key
        for other in self.sources.values():
            other.queue.discard(sid)
        self._pool.discard(sid)
        self._settle(out)
        return out

    def confirm(self, block: int, sub: int, nbytes: int) -> list[Command]:
        """A parked sub block verified."""
        key = self._parked.pop((block, sub), None)
        return self._complete((block, sub), self.sources.get(key) if key is not None else None, nbytes)

    def discard(self, block: int, sub: int, strike: bool = True) -> list[Command]:
        """A parked sub block failed verification: fetch it again, strike its sender."""
        sid = (block, sub)
        key = self._parked.pop(sid, None)
        out: list[Command] = []
        if key is None or sid in self._done:
            return out
        self._pool.appendleft(sid)
        return self._after_fault(key, strike, out)

    def expedite(self, key: Hashable, block: int) -> list[Command]:
        """
        Block C{block} is about to miss its playback deadline: source C{key}
        (typically the costly origin) takes every sub block of it that is not
        done yet: queued ones move to it, in-flight ones are duplicated on it
        (first verified copy wins, as in the endgame).
        """
        src = self.sources.get(key)
        out: list[Command] = []
        if src is None or not self._opened > block >= self._next_block:
            return out
        late = []
        for sub in range(self.g.subs_in_block(block)):
            sid = (block, sub)
            if sid in self._done or sid in self._parked or sid in src.inflight:
                continue
            for other in self.sources.values():
                other.queue.discard(sid)
            self._pool.discard(sid)
            late.append(sid)
        for sid in reversed(late):  # at the head of its queue, in order
            src.queue.appendleft(sid)
        self._fill(out)
        return out

    def begin_batch(self) -> None:
        """
        Several events are coming at once (a whole HTTP run, a whole block
        verified): do only their bookkeeping until L{end_batch}, which then
        advances, balances and fills once and returns the commands.
        """
        self._batch_depth += 1

    def end_batch(self) -> list[Command]:
        self._batch_depth -= 1
        out: list[Command] = []
        if self._batch_depth == 0:
            self._settle(out)
        return out

    def _settle(self, out: list[Command]) -> None:
        """After events: deliver finished blocks, rebalance, top pipelines up (unless batching)."""
        if self._batch_depth:
            return
        self._advance(out)
        self._balance(out)
        self._fill(out)

    def strike(self, key: Hashable) -> list[Command]:
        """C{key} sent something wrong; at C{max_strikes} it is dropped."""
        src = self.sources.get(key)
        if src is None:
            return []
        src.strikes += 1
        if src.strikes < self.max_strikes:
            return []
        return [Drop(key, f"{src.strikes} strikes"), *self.remove_source(key)]

    def _arrival(self, key: Hashable, sid: SubId, nbytes: int) -> SourceState | None:
        """Bookkeeping for bytes that came in from C{key}: rate, progress, in-flight set."""
        now = self.clock.seconds()
        src = self.sources.get(key)
        if src is not None:
            sent = src.inflight.pop(sid, None)
            src.queue.discard(sid)
            src.bytes += nbytes
            src.subs_done += 1
            src.lost_races = 0
            start = src.busy_since if src.busy_since is not None else sent
            if start is not None and now > start:
                sample = nbytes / (now - start)
                src.rate = sample if src.rate is None else (1 - ALPHA) * src.rate + ALPHA * sample
                src.measured = sample if src.measured is None else (1 - ALPHA) * src.measured + ALPHA * sample
            src.busy_since = now if src.inflight else None
            src.last_progress = now
        return src

    def _complete(self, sid: SubId, src: SourceState | None, nbytes: int) -> list[Command]:
        out: list[Command] = []
        block, sub = sid
        self._parked.pop(sid, None)
        if sid in self._done:
            if src is not None:
                self.duplicated_bytes += nbytes
            return out
        self._done.add(sid)
        # First copy wins: cancel any duplicate elsewhere.  A loser that has
        # delivered nothing for longer than it should have is measured by
        # that silence, so a stalling source stops getting new shares.
        for other in list(self.sources.values()):
            if other is not src and sid in other.inflight:
                del other.inflight[sid]
                self._note_silence(other)
                out.append(Cancel(other.key, block, (sub,)))
                other.lost_races += 1
                silent = self.clock.seconds() - other.last_progress
                if other.lost_races >= self.max_strikes and silent >= MIN_STALL_TIMEOUT / 2:
                    # It keeps losing races and has delivered nothing for a
                    # while: not slow but stalled.  Free its slot for another
                    # node (its in-flight work went to the others already).
                    out.append(Drop(other.key, f"stalled: lost {other.lost_races} races in a row"))
                    out.extend(self.remove_source(other.key))
            other.queue.discard(sid)
        self._pool.discard(sid)
        self._missing[block] -= 1
        self._settle(out)
        return out

    def failed(self, key: Hashable, block: int, sub: int, strike: bool = True) -> list[Command]:
        """A sub block from C{key} failed verification (or was refused)."""
        out: list[Command] = []
        src = self.sources.get(key)
        sid = (block, sub)
        if src is None:
            return out
        src.inflight.pop(sid, None)
        if src.busy_since is not None and not src.inflight:
            src.busy_since = None
        if sid not in self._done and not self._held_elsewhere(sid, src):
            self._pool.appendleft(sid)
        return self._after_fault(key, strike, out)

    def _after_fault(self, key: Hashable, strike: bool, out: list[Command]) -> list[Command]:
        """A sub block from C{key} went back to the pool: strike C{key}, give the work to others."""
        src = self.sources.get(key)
        if strike:
            out.extend(self.strike(key))
            if key not in self.sources:
                return out
        self._assign_pool(out, avoid=src)  # prefer others for the returned sub block
        self._fill(out)
        self._check_starved(out)
        return out

    def tick(self) -> list[Command]:
        """
        Call a few times a second (see L{TICK}): drops stalled sources, and
        looks again at idle ones, since with time passing a sub block in
        flight elsewhere may have become overdue and worth duplicating.
        """
        out: list[Command] = []
        now = self.clock.seconds()
        for src in list(self.sources.values()):
            if not src.inflight:
                src.last_progress = now
                continue
            if now - src.last_progress > self.stall_timeout(src):
                out.append(Drop(src.key, f"stalled for {now - src.last_progress:.1f}s"))
                out.extend(self.remove_source(src.key))
            elif src.queue and self._speed(src) < src.speed:
                # Overdue: what it has not started goes to the others now;
                # what it has in flight is left to the endgame.
                self._note_silence(src)
                self._pool.extend(src.queue)
                src.queue.clear()
        self._assign_pool(out)
        self._balance(out)
        self._fill(out)
        return out

    def stall_timeout(self, src: SourceState) -> float:
        """
        Time without a verified sub block after which C{src} is stalled: four
        times what its full pipeline should take at its estimated rate, and
        never under L{MIN_STALL_TIMEOUT}.
        """
        rate = src.measured if src.measured is not None else src.hint
        expected = src.rtt + self.g.sub_block_size / max(rate, 1.0)
        return max(MIN_STALL_TIMEOUT, 4 * expected * src.pipeline)

    # -- internals -------------------------------------------------------

    def _held_elsewhere(self, sid: SubId, but: SourceState) -> bool:
        return any(sid in s.inflight or sid in s.queue for s in self.sources.values() if s is not but)

    def _give_back(self, src: SourceState) -> None:
        for sid in list(src.inflight) + list(src.queue):
            if sid not in self._done and not self._held_elsewhere(sid, src):
                self._pool.append(sid)
        src.inflight.clear()
        src.queue.clear()

    def _advance(self, out: list[Command]) -> None:
        while self._next_block < self._opened and self._missing.get(self._next_block) == 0:
            del self._missing[self._next_block]
            out.append(BlockDone(self._next_block))
            self._next_block += 1
        while self._opened < self.g.num_blocks and self._opened < self._next_block + self.window:
            b = self._opened
            self._opened += 1
            subs = [(b, s) for s in range(self.g.subs_in_block(b)) if (b, s) not in self._done]
            self._missing[b] = len(subs)
            if not subs:
                self._advance(out)
                return
            self._distribute(subs, out)

    def _note_silence(self, src: SourceState) -> None:
        """Fold an overdue source's silence into its measured rate (see L{_speed})."""
        v = self._speed(src, force=True)
        if v < src.speed:
            src.rate = v

    def _speed(self, src: SourceState, force: bool = False) -> float:
        """
        The source's estimated rate, discounted while it is overdue: a source
        that has sent nothing for much longer than one sub block should take
        is worth at most a sub block per time waited, so a stalling source
        stops receiving new work (and becomes "the slowest") long before its
        stall timeout drops it.
        """
        v = src.speed
        if src.inflight or force:
            waited = self.clock.seconds() - src.last_progress
            if waited > max(OVERDUE_FLOOR, 2 * (src.rtt + self.g.sub_block_size / max(v, 1.0))):
                v = min(v, self.g.sub_block_size / waited)
        return v

    def _weight(self, src: SourceState) -> float:
        """
        The valuation index used to share work: the estimated rate (1 for all
        under the static policy).  A source that has lost an endgame race
        without ever delivering a sub block gets no new work until it does.
        """
        if not self.adaptive:
            return 1.0
        if src.subs_done == 0 and src.lost_races > 0:
            return 0.0
        return self._speed(src)

    def _distribute(self, subs: list[SubId], out: list[Command]) -> None:
        targets = self.usable()
        if not targets:
            self._pool.extend(subs)
            self._check_starved(out)
            return
        if self.adaptive and len(targets) > 1 and all(s.coarse for s in targets):
            # Only sources without hash lists (HTTP): their sub blocks are
            # checked a whole block at a time anyway, and each request costs,
            # so a block goes whole to the source that would finish it first.
            # Over the window the shares are still in proportion to speed.
            def finish(s: SourceState) -> float:
                work = len(s.queue) + len(s.inflight) + len(subs)
                return work * self.g.sub_block_size / max(self._weight(s), 1.0)

            min(targets, key=finish).queue.extend(subs)
            self._fill(out)
            return
        weights = [self._weight(s) for s in targets]
        total = sum(weights)
        if total <= 0:  # nobody has earned work: share equally
            weights = [1.0] * len(targets)
            total = float(len(targets))
        exact = [len(subs) * w / total for w in weights]
        counts = [int(x) for x in exact]
        left = len(subs) - sum(counts)
        by_remainder = sorted(range(len(targets)), key=lambda i: exact[i] - counts[i], reverse=True)
        for i in by_remainder[:left]:
            counts[i] += 1
        # Fastest sources take the earliest sub blocks.
        order = sorted(range(len(targets)), key=lambda i: -weights[i])
        it = iter(subs)
        for i in order:
            for _ in range(counts[i]):
                targets[i].queue.append(next(it))
        self._fill(out)

    def _assign_pool(self, out: list[Command], avoid: SourceState | None = None) -> None:
        if not self._pool:
            return
        targets = [s for s in self.usable() if s is not avoid] or self.usable()
        if not targets:
            return
        pool = [sid for sid in self._pool if sid not in self._done]
        self._pool.clear()
        weight = {id(s): self._weight(s) for s in targets}
        total = sum(weight.values())
        if total <= 0:  # nobody has earned work: share equally
            weight = {id(s): 1.0 for s in targets}
            total = float(len(targets))
        i = 0
        for src in sorted(targets, key=lambda s: -weight[id(s)]):
            n = round(len(pool) * weight[id(src)] / total)
            src.queue.extend(pool[i : i + n])
            i += n
        if i < len(pool):
            max(targets, key=lambda s: weight[id(s)]).queue.extend(pool[i:])

    def _balance(self, out: list[Command]) -> None:
        """Claim 8: idle sources take over part of the slowest source's queue."""
        if not self.adaptive:
            return
        usable = self.usable()
        for f in sorted(usable, key=lambda s: -self._speed(s)):
            if not f.idle():
                continue
            loaded = [s for s in usable if s is not f and s.queue]
            if loaded:
                slow = min(loaded, key=self._speed)
                vf, vs = self._speed(f), self._speed(slow)
                r = len(slow.queue)
                size = self.g.sub_block_size
                slow_finish = (r + len(slow.inflight)) * size / max(vs, 1.0)
                fast_one = f.rtt + size / max(vf, 1.0)
                if slow_finish > fast_one:
                    k = max(1, round(r * vf / (vf + vs)))
                    for _ in range(min(k, r)):
                        f.queue.appendleft(slow.queue.pop())
                continue
            self._endgame(f, usable, out)

    def _endgame(self, f: SourceState, usable: list[SourceState], out: list[Command]) -> None:
        now = self.clock.seconds()
        best: tuple[float, SourceState, SubId] | None = None
        for s in usable:
            if s is f or not s.inflight or self._speed(s) * ENDGAME_FACTOR > self._speed(f):
                continue
            # A source serves its requests in order: the k-th one in flight
            # is due k + 1 sub block times after the source began the first.
            per_sub = self.g.sub_block_size / max(s.speed, 1.0)
            ordered = sorted(s.inflight.items(), key=lambda item: item[1])
            base = max(s.busy_since if s.busy_since is not None else now, ordered[0][1] + s.rtt)
            for k, (sid, _sent) in enumerate(ordered):
                if any(sid in o.inflight for o in usable if o is not s):
                    continue
                eta = base + (k + 1) * per_sub
                if eta + LATE_SLACK <= now:
                    # Late: the estimate was wrong (an unmeasured hint, a
                    # stall in the making), so when it comes is unknown:
                    # the best one to duplicate.
                    eta = math.inf
                if best is None or eta > best[0]:
                    best = (eta, s, sid)
        if best is not None and best[0] - now > f.rtt + self.g.sub_block_size / max(self._speed(f), 1.0):
            f.queue.append(best[2])

    def _fill(self, out: list[Command]) -> None:
        """Top every source's pipeline up from its queue."""
        now = self.clock.seconds()
        for src in self.sources.values():
            batch: dict[int, list[int]] = {}
            if not src.inflight:
                src.last_progress = now
            while src.queue and len(src.inflight) < src.pipeline:
                sid = src.queue.popleft()
                if sid in self._done or sid in src.inflight:
                    continue
                src.inflight[sid] = now
                batch.setdefault(sid[0], []).append(sid[1])
            if batch and src.busy_since is None:
                src.busy_since = now
            for block, subs in batch.items():
                out.append(Request(src.key, block, tuple(subs)))

    def _check_starved(self, out: list[Command]) -> None:
        if self.finished:
            return
        if not self.sources and (self._pool or self._missing):
            if not any(isinstance(c, NeedSources) for c in out):
                out.append(NeedSources("no source left"))
