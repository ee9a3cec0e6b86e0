"""
Tests for L{meshstream.scheduler.core}: the pure download scheduler.

Most tests drive the scheduler with L{Sim}, a tiny deterministic network: each
source serves the sub blocks requested from it one after another, first come
first served, at a fixed byte rate, and the simulation advances a L{Clock} to
the moment each one would finish and reports it with C{received} (or
C{failed}, for a source that sends garbage).  A few tests drive the events by
hand where the exact moment matters.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshstream.manifest import Geometry
from meshstream.scheduler import core as S

SUB = 1024

SubId = tuple[int, int]


class Sim:
    """
    Sources with scripted byte rates serving a L{S.Scheduler}.

    Every command the scheduler returns is carried out (requests queue at the
    source, cancels remove a sub block from it, drops disconnect it) and
    checked against invariants the scheduler promises: at most C{pipeline}
    sub blocks outstanding per source, the scheduler's idea of what is in
    flight equal to what the source is actually working on, and (when the
    window is 1) never two blocks in flight at once.
    """

    def __init__(
        self,
        test: SynchronousTestCase,
        geometry: Geometry,
        pipeline: int = S.DEFAULT_PIPELINE,
        window: int = S.DEFAULT_WINDOW,
        max_strikes: int = 3,
        have: Iterable[SubId] = (),
    ) -> None:
        self.test = test
        self.g = geometry
        self.clock = Clock()
        self.sched = S.Scheduler(
            geometry, self.clock, pipeline=pipeline, window=window, max_strikes=max_strikes, have=have
        )
        self.rates: dict[Hashable, float] = {}
        self.corrupt: set[Hashable] = set()
        self.pending: dict[Hashable, deque[SubId]] = {}
        self.head_start: dict[Hashable, float] = {}
        self.requested: list[tuple[float, Hashable, SubId]] = []
        self.cancels: list[S.Cancel] = []
        self.drops: list[S.Drop] = []
        self.done: list[int] = []
        self.need: list[S.NeedSources] = []
        self.delivered: dict[SubId, Hashable] = {}
        self.delivered_at: dict[SubId, float] = {}
        self.failures: list[tuple[Hashable, SubId]] = []
        self.finished_at: float | None = None

    # -- setup -----------------------------------------------------------

    def add(self, key: Hashable, rate: float, hint: float | None = None, costly: bool = False) -> None:
        self.rates[key] = rate
        self.pending[key] = deque()
        self.apply(self.sched.add_source(key, hint=hint, costly=costly))

    def remove(self, key: Hashable) -> None:
        self.pending.pop(key, None)
        self.rates.pop(key, None)
        self.apply(self.sched.remove_source(key))

    def start(self) -> None:
        self.apply(self.sched.start())

    # -- carrying out commands -------------------------------------------

    def apply(self, commands: list[S.Command]) -> None:
        now = self.clock.seconds()
        for cmd in commands:
            if isinstance(cmd, S.Request):
                self.test.assertIn(cmd.source, self.pending, "request to an unknown source")
                queue = self.pending[cmd.source]
                for sub in cmd.subs:
                    sid = (cmd.block, sub)
                    self.test.assertNotIn(sid, queue, "the same sub block requested twice from one source")
                    self.test.assertNotIn(sid, self.delivered, "a delivered sub block requested again")
                    if not queue:
                        self.head_start[cmd.source] = now
                    queue.append(sid)
                    self.requested.append((now, cmd.source, sid))
            elif isinstance(cmd, S.Cancel):
                self.cancels.append(cmd)
                queue = self.pending.get(cmd.source, deque())
                for sub in cmd.subs:
                    sid = (cmd.block, sub)
                    if queue and queue[0] == sid:
                        self.head_start[cmd.source] = now
                    if sid in queue:
                        queue.remove(sid)
            elif isinstance(cmd, S.Drop):
                self.drops.append(cmd)
                self.pending.pop(cmd.source, None)
                self.rates.pop(cmd.source, None)
            elif isinstance(cmd, S.BlockDone):
                for s in range(self.g.subs_in_block(cmd.block)):
                    self.test.assertTrue(self.sched.is_done(cmd.block, s))
                self.done.append(cmd.block)
                if cmd.block == self.g.num_blocks - 1:
                    self.finished_at = now
            elif isinstance(cmd, S.NeedSources):
                self.need.append(cmd)
        self.check()

    def check(self) -> None:
        blocks: set[int] = set()
        for key, src in self.sched.sources.items():
            self.test.assertLessEqual(len(src.inflight), self.sched.pipeline)
            self.test.assertEqual(set(src.inflight), set(self.pending.get(key, ())), key)
            blocks.update(b for b, _ in src.inflight)
        for key, queue in self.pending.items():
            self.test.assertLessEqual(len(queue), self.sched.pipeline, key)
        if self.sched.window == 1:
            self.test.assertLessEqual(len(blocks), 1, "two blocks in flight with window 1")

    # -- time ------------------------------------------------------------

    def next_completion(self) -> tuple[float, Hashable] | None:
        best: tuple[float, Hashable] | None = None
        for key, queue in self.pending.items():
            rate = self.rates[key]
            if not queue or rate <= 0:
                continue
            b, s = queue[0]
            t = self.head_start[key] + self.g.sub_length(b, s) / rate
            if best is None or t < best[0]:
                best = (t, key)
        return best

    def step(self, until: float | None = None) -> bool:
        """Deliver the next finished sub block (not after C{until}); False if none."""
        nxt = self.next_completion()
        if nxt is None or (until is not None and nxt[0] > until):
            if until is not None and until > self.clock.seconds():
                self.clock.advance(until - self.clock.seconds())
            return False
        t, key = nxt
        self.clock.advance(max(0.0, t - self.clock.seconds()))
        sid = self.pending[key].popleft()
        self.head_start[key] = self.clock.seconds()
        n = self.g.sub_length(*sid)
        if key in self.corrupt:
            self.failures.append((key, sid))
            self.apply(self.sched.failed(key, *sid))
        else:
            self.delivered.setdefault(sid, key)
            self.delivered_at.setdefault(sid, self.clock.seconds())
            self.apply(self.sched.received(key, sid[0], sid[1], n))
        return True

    def run(self, limit: float = 10_000.0, tick: bool = True) -> None:
        """Run until nothing is left to deliver, calling C{tick()} every S.TICK simulated seconds, as the session does."""
        next_tick = self.clock.seconds() + S.TICK
        while self.clock.seconds() < limit:
            if tick:
                if self.step(until=next_tick):
                    continue
                if self.clock.seconds() >= next_tick:
                    self.apply(self.sched.tick())
                    next_tick += S.TICK
                if self.next_completion() is None and not self._stalled_work():
                    return
            elif not self.step():
                return
        self.test.fail(f"simulation still running at t={limit}")

    def _stalled_work(self) -> bool:
        return any(q and self.rates.get(k, 0) <= 0 for k, q in self.pending.items())

    # -- queries ---------------------------------------------------------

    def assigned(self, key: Hashable, block: int | None = None) -> int:
        """Sub blocks the scheduler holds for C{key}: queued plus in flight."""
        src = self.sched.sources[key]
        sids = list(src.queue) + list(src.inflight)
        return sum(1 for b, _ in sids if block is None or b == block)

    def requested_from(self, key: Hashable) -> list[SubId]:
        return [sid for _, k, sid in self.requested if k == key]

    def assert_complete(self) -> None:
        self.test.assertTrue(self.sched.finished)
        self.test.assertEqual(self.done, list(range(self.g.num_blocks)))
        self.test.assertEqual(
            set(self.delivered),
            {(b, s) for b in range(self.g.num_blocks) for s in range(self.g.subs_in_block(b))},
        )


def geometry(blocks: int, subs: int, tail: int = 0) -> Geometry:
    """C{blocks} blocks of C{subs} sub blocks of 1 KiB, plus C{tail} bytes."""
    return Geometry(blocks * subs * SUB + tail, subs * SUB, SUB)


class DistributionTests(SynchronousTestCase):
    def test_initial_split_follows_hints(self) -> None:
        sim = Sim(self, geometry(1, 16), window=1)
        sim.add("a", rate=1000, hint=1000)
        sim.add("b", rate=3000, hint=3000)
        sim.start()
        self.assertAlmostEqual(sim.assigned("a"), 4, delta=1)
        self.assertAlmostEqual(sim.assigned("b"), 12, delta=1)
        self.assertEqual(sim.assigned("a") + sim.assigned("b"), 16)
        # Fastest takes the earliest sub blocks.
        self.assertIn((0, 0), sim.sched.sources["b"].inflight)

    def test_initial_split_three_sources(self) -> None:
        sim = Sim(self, geometry(1, 60), window=1, pipeline=2)
        for key, hint in (("a", 1000.0), ("b", 2000.0), ("c", 3000.0)):
            sim.add(key, rate=hint, hint=hint)
        sim.start()
        self.assertEqual([sim.assigned(k) for k in "abc"], [10, 20, 30])

    def test_split_follows_measured_rates(self) -> None:
        # The hints have it backwards; after block 0 the measured rates rule.
        sim = Sim(self, geometry(3, 16), window=1, pipeline=2)
        sim.add("a", rate=1000, hint=3000)
        sim.add("b", rate=3000, hint=1000)
        sim.start()
        self.assertAlmostEqual(sim.assigned("a", 0), 12, delta=1)
        while not sim.done:
            self.assertTrue(sim.step())
        self.assertAlmostEqual(sim.sched.sources["a"].speed, 1000, delta=1)
        self.assertAlmostEqual(sim.sched.sources["b"].speed, 3000, delta=1)
        self.assertAlmostEqual(sim.assigned("a", 1), 4, delta=1)
        self.assertAlmostEqual(sim.assigned("b", 1), 12, delta=1)
        sim.run()
        sim.assert_complete()

    def test_pipeline_depth_respected(self) -> None:
        for pipeline in (1, 3):
            with self.subTest(pipeline=pipeline):
                sim = Sim(self, geometry(4, 8), pipeline=pipeline)
                for key, rate in (("a", 500.0), ("b", 4000.0), ("c", 1500.0)):
                    sim.add(key, rate=rate)
                sim.start()
                self.assertEqual([len(sim.sched.sources[k].inflight) for k in "abc"], [pipeline] * 3)
                sim.run()  # Sim.check asserts the depth after every event
                sim.assert_complete()

    def test_no_sources_needs_sources(self) -> None:
        sim = Sim(self, geometry(2, 4))
        sim.start()
        self.assertTrue(sim.need)
        self.assertEqual(sim.requested, [])
        sim.add("late", rate=4000)
        self.assertEqual(len(sim.requested_from("late")), S.DEFAULT_PIPELINE)
        sim.run()
        sim.assert_complete()


class RedistributionTests(SynchronousTestCase):
    def test_idle_fast_source_takes_share_of_slowest_queue(self) -> None:
        # Equal hints give each half; "fast" really runs 5x faster.
        sim = Sim(self, geometry(1, 32), window=1, pipeline=2)
        sim.add("fast", rate=5000, hint=1000)
        sim.add("slow", rate=1000, hint=1000)
        sim.start()
        self.assertEqual((sim.assigned("fast"), sim.assigned("slow")), (16, 16))
        fast, slow = sim.sched.sources["fast"], sim.sched.sources["slow"]
        while True:
            nxt = sim.next_completion()
            assert nxt is not None
            if nxt[1] == "fast" and len(fast.inflight) == 1 and not fast.queue:
                break
            sim.step()
        r = len(slow.queue)
        vf, vs = fast.speed, slow.speed
        self.assertAlmostEqual(vf, 5000, delta=1)
        self.assertAlmostEqual(vs, 1000, delta=1)
        expected = max(1, round(r * vf / (vf + vs)))
        self.assertEqual(r, 11)
        self.assertEqual(expected, 9)
        taken = list(slow.queue)[r - expected :]
        sim.step()  # fast delivers its last sub block and goes idle
        self.assertEqual(len(slow.queue), r - expected)
        self.assertEqual(sorted(list(fast.queue) + list(fast.inflight)), sorted(taken))
        # Taken from the end of the slow queue, kept in order.
        self.assertEqual(set(fast.inflight), set(taken[:2]))
        sim.run()
        sim.assert_complete()

    def test_new_source_takes_share_of_loaded_source(self) -> None:
        sim = Sim(self, geometry(1, 16), window=1, pipeline=4)
        sim.add("slow", rate=1000, hint=1000)
        sim.start()
        self.assertEqual(len(sim.sched.sources["slow"].queue), 12)
        sim.add("fast", rate=3000, hint=3000)
        self.assertEqual(sim.assigned("fast"), round(12 * 3000 / 4000))
        self.assertEqual(len(sim.sched.sources["slow"].queue), 12 - 9)
        self.assertEqual(len(sim.requested_from("fast")), 4)
        sim.run()
        sim.assert_complete()

    def test_takes_at_least_one(self) -> None:
        # r * vF / (vF + vS) = 0.4 rounds to 0, but F still takes one.
        sim = Sim(self, geometry(1, 2), window=1, pipeline=1)
        sim.add("s", rate=3000, hint=3000)
        sim.start()
        self.assertEqual(len(sim.sched.sources["s"].queue), 1)
        sim.add("f", rate=2000, hint=2000)
        self.assertEqual(sim.requested_from("f"), [(0, 1)])
        self.assertEqual(len(sim.sched.sources["s"].queue), 0)

    def test_no_steal_when_slow_source_finishes_sooner(self) -> None:
        sim = Sim(self, geometry(1, 2), window=1, pipeline=1)
        sim.add("s", rate=100_000, hint=100_000)
        sim.start()
        sim.add("f", rate=1000, hint=1000)
        self.assertEqual(sim.requested_from("f"), [])
        self.assertEqual(len(sim.sched.sources["s"].queue), 1)


class OrderingTests(SynchronousTestCase):
    def test_blocks_announced_in_order_once(self) -> None:
        sim = Sim(self, geometry(12, 8, tail=1500), window=3, pipeline=3)
        for key, rate in (("a", 700.0), ("b", 9000.0), ("c", 2500.0), ("d", 300.0)):
            sim.add(key, rate=rate)
        sim.start()
        sim.run()
        sim.assert_complete()  # done == [0, 1, ..., 12]: in order, each once
        self.assertEqual(sim.sched.next_block, 13)

    def test_window_one_never_two_blocks_in_flight(self) -> None:
        sim = Sim(self, geometry(6, 8), window=1, pipeline=4)
        for key, rate in (("a", 1000.0), ("b", 5000.0), ("c", 200.0)):
            sim.add(key, rate=rate)
        sim.start()
        sim.run()  # Sim.check asserts the window after every event
        sim.assert_complete()
        first_request: dict[int, float] = {}
        for t, _k, (b, _s) in sim.requested:
            first_request.setdefault(b, t)
        # Block b+1 is first requested only once block b is complete.
        done_at = {b: max(t for sid, t in sim.delivered_at.items() if sid[0] == b) for b in range(6)}
        for b in range(1, 6):
            self.assertGreaterEqual(first_request[b], done_at[b - 1])

    def test_window_limits_open_blocks(self) -> None:
        sim = Sim(self, geometry(10, 4), window=2, pipeline=8)
        sim.add("a", rate=1000)
        sim.start()
        self.assertEqual({b for b, _ in sim.requested_from("a")}, {0, 1})


class FaultTests(SynchronousTestCase):
    def test_remove_source_gives_work_to_others(self) -> None:
        sim = Sim(self, geometry(6, 8), window=2, pipeline=3)
        for key, rate in (("a", 2000.0), ("b", 2000.0), ("c", 2000.0)):
            sim.add(key, rate=rate)
        sim.start()
        for _ in range(5):
            sim.step()
        held = set(sim.sched.sources["b"].queue) | set(sim.sched.sources["b"].inflight)
        self.assertTrue(held)
        removed_at = sim.clock.seconds()
        sim.remove("b")
        self.assertNotIn("b", sim.sched.sources)
        taken = {
            sid for k in "ac" for sid in set(sim.sched.sources[k].queue) | set(sim.sched.sources[k].inflight)
        }
        self.assertTrue(held <= taken)
        sim.run()
        sim.assert_complete()
        self.assertFalse([1 for t, k, _ in sim.requested if k == "b" and t > removed_at])
        self.assertEqual(sim.need, [])

    def test_remove_last_source_needs_sources(self) -> None:
        sim = Sim(self, geometry(2, 4))
        sim.add("a", rate=1000)
        sim.start()
        sim.step()
        sim.remove("a")
        self.assertEqual(len(sim.need), 1)
        sim.add("b", rate=1000)
        sim.run()
        sim.assert_complete()

    def test_remove_unknown_source(self) -> None:
        sim = Sim(self, geometry(1, 4))
        self.assertEqual(sim.sched.remove_source("nobody"), [])

    def test_failed_sub_block_goes_elsewhere(self) -> None:
        sim = Sim(self, geometry(1, 4), window=1, pipeline=4)
        sim.add("a", rate=1000, hint=1000)
        sim.add("b", rate=1000, hint=1000)
        sim.start()
        sid = next(iter(sim.sched.sources["a"].inflight))
        sim.pending["a"].remove(sid)
        sim.apply(sim.sched.failed("a", *sid))
        self.assertEqual(sim.sched.sources["a"].strikes, 1)
        self.assertIn(sid, set(sim.sched.sources["b"].inflight) | set(sim.sched.sources["b"].queue))
        self.assertIn(sid, sim.requested_from("b"))
        sim.run()
        sim.assert_complete()

    def test_refusal_without_strike(self) -> None:
        sim = Sim(self, geometry(1, 4), window=1, pipeline=4)
        sim.add("a", rate=1000)
        sim.add("b", rate=1000)
        sim.start()
        for _ in range(5):
            sid = next(iter(sim.sched.sources["a"].inflight), None)
            if sid is None:
                break
            sim.pending["a"].remove(sid)
            sim.apply(sim.sched.failed("a", *sid, strike=False))
        self.assertEqual(sim.drops, [])
        self.assertEqual(sim.sched.sources["a"].strikes, 0)

    def test_strikes_drop_a_lying_source(self) -> None:
        sim = Sim(self, geometry(4, 8), window=2, pipeline=2, max_strikes=3)
        sim.add("liar", rate=8000)
        sim.add("honest", rate=2000)
        sim.corrupt.add("liar")
        sim.start()
        sim.run()
        sim.assert_complete()
        self.assertEqual(sim.drops, [S.Drop("liar", "3 strikes")])
        self.assertEqual(len(sim.failures), 3)
        self.assertNotIn("liar", sim.sched.sources)
        self.assertEqual(set(sim.delivered.values()), {"honest"})

    def test_failed_from_unknown_source(self) -> None:
        sim = Sim(self, geometry(1, 4))
        self.assertEqual(sim.sched.failed("nobody", 0, 0), [])

    def test_tick_drops_stalled_source(self) -> None:
        sim = Sim(self, geometry(2, 8), window=2, pipeline=2)
        sim.add("dead", rate=0, hint=100_000)
        sim.add("live", rate=1000, hint=1000)
        sim.start()
        dead = sim.sched.sources["dead"]
        held = set(dead.inflight) | set(dead.queue)
        self.assertTrue(held)
        self.assertEqual(sim.sched.stall_timeout(dead), S.MIN_STALL_TIMEOUT)
        for second in range(1, 6):
            sim.step(until=float(second))
            sim.apply(sim.sched.tick())
            self.assertEqual(sim.drops, [], second)
        sim.step(until=6.0)
        sim.apply(sim.sched.tick())
        self.assertEqual([d.source for d in sim.drops], ["dead"])
        self.assertNotIn("dead", sim.sched.sources)
        live = sim.sched.sources["live"]
        self.assertTrue(held <= set(live.queue) | set(live.inflight) | set(sim.delivered))
        sim.run()
        sim.assert_complete()

    def test_tick_keeps_slow_but_moving_source(self) -> None:
        sim = Sim(self, geometry(1, 8), window=1, pipeline=2)
        sim.add("slow", rate=300, hint=300)  # 3.4 s per sub block
        sim.start()
        sim.run()
        sim.assert_complete()
        self.assertEqual(sim.drops, [])

    def test_stall_timeout_scales_with_rate(self) -> None:
        sim = Sim(self, geometry(1, 8), pipeline=4)
        sim.add("slow", rate=100, hint=100)
        src = sim.sched.sources["slow"]
        self.assertAlmostEqual(sim.sched.stall_timeout(src), 4 * 4 * 1024 / 100)
        sim.sched.rtt_measured("slow", 1.0)
        self.assertAlmostEqual(sim.sched.stall_timeout(src), 4 * 4 * (1.0 + 1024 / 100))


class CostlyTests(SynchronousTestCase):
    def test_costly_idle_while_cheap_source_exists(self) -> None:
        sim = Sim(self, geometry(4, 4), pipeline=2)
        sim.add("origin", rate=100_000, hint=100_000, costly=True)
        sim.add("peer", rate=1000, hint=1000)
        sim.start()
        sim.run()
        sim.assert_complete()
        self.assertEqual(sim.requested_from("origin"), [])

    def test_costly_used_when_no_cheap_source_left(self) -> None:
        sim = Sim(self, geometry(4, 4), pipeline=2)
        sim.add("origin", rate=10_000, hint=10_000, costly=True)
        sim.add("peer", rate=1000, hint=1000)
        sim.start()
        sim.step()
        self.assertEqual(sim.requested_from("origin"), [])
        sim.remove("peer")
        self.assertEqual(sim.need, [])
        self.assertTrue(sim.requested_from("origin"))
        # A cheap source comes back: the origin's queue moves to it.
        sim.add("peer2", rate=1000, hint=1000)
        self.assertEqual(len(sim.sched.sources["origin"].queue), 0)
        before = len(sim.requested_from("origin"))
        sim.run()
        sim.assert_complete()
        self.assertEqual(len(sim.requested_from("origin")), before)

    def test_costly_only_source_gets_work(self) -> None:
        sim = Sim(self, geometry(2, 4))
        sim.add("origin", rate=1000, costly=True)
        sim.start()
        sim.run()
        sim.assert_complete()
        self.assertEqual(sim.need, [])


class EndgameTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sched = S.Scheduler(geometry(1, 2), self.clock, pipeline=4, window=1)

    def test_duplicate_on_much_faster_idle_source(self) -> None:
        self.sched.add_source("slow", hint=10_000)
        self.sched.add_source("fast", hint=10_000)
        out = self.sched.start()
        self.assertEqual(out, [S.Request("slow", 0, (0,)), S.Request("fast", 0, (1,))])
        self.clock.advance(0.01)
        out = self.sched.received("fast", 0, 1, SUB)
        # Nothing queued anywhere; the slow source's sub block is duplicated.
        self.assertEqual(out, [S.Request("fast", 0, (0,))])
        self.clock.advance(0.01)
        out = self.sched.received("fast", 0, 0, SUB)
        self.assertEqual(out, [S.Cancel("slow", 0, (0,)), S.BlockDone(0)])
        self.assertTrue(self.sched.finished)
        self.assertEqual(self.sched.sources["slow"].inflight, {})
        # The cancelled copy arrives anyway: counted as waste, nothing else.
        self.clock.advance(0.05)
        self.assertEqual(self.sched.received("slow", 0, 0, SUB), [])
        self.assertEqual(self.sched.duplicated_bytes, SUB)

    def test_slow_copy_first_wins(self) -> None:
        self.sched.add_source("slow", hint=10_000)
        self.sched.add_source("fast", hint=10_000)
        self.sched.start()
        self.clock.advance(0.01)
        self.sched.received("fast", 0, 1, SUB)
        self.clock.advance(0.001)
        out = self.sched.received("slow", 0, 0, SUB)
        self.assertEqual(out, [S.Cancel("fast", 0, (0,)), S.BlockDone(0)])
        self.assertEqual(self.sched.received("fast", 0, 0, SUB), [])
        self.assertEqual(self.sched.duplicated_bytes, SUB)

    def test_no_duplicate_when_not_much_slower(self) -> None:
        self.sched.add_source("a", hint=10_000)
        self.sched.add_source("b", hint=10_000)
        self.sched.start()
        self.clock.advance(1024 / 15_000)  # b measures 15 kB/s: under twice a's 10 kB/s
        self.assertEqual(self.sched.received("b", 0, 1, SUB), [])

    def test_endgame_in_simulation(self) -> None:
        # "fast" is new and under-reported; once it has measured itself the
        # slow source's in-flight sub blocks are all fetched again, sooner.
        sim = Sim(self, geometry(1, 8), window=1, pipeline=4)
        sim.add("slow", rate=5000, hint=5000)
        sim.add("fast", rate=50_000, hint=5000)
        sim.start()
        self.assertEqual(sim.assigned("slow"), 4)
        sim.run()
        sim.assert_complete()
        self.assertEqual(len(sim.cancels), 4)
        self.assertTrue(all(c.source == "slow" for c in sim.cancels))
        self.assertEqual(set(sim.delivered.values()), {"fast"})
        # Sooner than the slow source could deliver even its first sub block.
        assert sim.finished_at is not None
        self.assertLess(sim.finished_at, 1024 / 5000)


class ResumeTests(SynchronousTestCase):
    def test_only_missing_sub_blocks_requested(self) -> None:
        have = {(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (3, 1)}
        sim = Sim(self, geometry(4, 4), window=2, pipeline=2, have=have)
        sim.add("a", rate=1000)
        sim.add("b", rate=3000)
        sim.start()
        self.assertEqual(sim.done, [0])
        sim.run()
        self.assertTrue(sim.sched.finished)
        self.assertEqual(sim.done, [0, 1, 2, 3])
        wanted = {(b, s) for b in range(4) for s in range(4)} - have
        requested = [sid for _, _, sid in sim.requested]
        self.assertEqual(set(requested), wanted)
        # Each missing sub block is asked once, except endgame copies: those
        # go to another source than the first request, at most one each.
        first: dict[SubId, Hashable] = {}
        for _, key, sid in sim.requested:
            if sid in first:
                self.assertNotEqual(first[sid], key)
            first.setdefault(sid, key)
        self.assertLessEqual(len(requested) - len(wanted), 1)

    def test_everything_held(self) -> None:
        g = geometry(3, 2)
        sched = S.Scheduler(g, Clock(), have={(b, s) for b in range(3) for s in range(2)})
        self.assertEqual(sched.start(), [S.BlockDone(0), S.BlockDone(1), S.BlockDone(2)])
        self.assertTrue(sched.finished)


class ThroughputTests(SynchronousTestCase):
    def test_rates_1_2_4_8_near_ideal(self) -> None:
        unit = 10 * 1024.0
        sim = Sim(self, geometry(16, 16))
        for i, mult in enumerate((1, 2, 4, 8)):
            sim.add(f"s{i}", rate=mult * unit)
        sim.start()
        sim.run(tick=False)
        sim.assert_complete()
        ideal = sim.g.size / (15 * unit)
        assert sim.finished_at is not None
        self.assertLessEqual(sim.finished_at, 1.15 * ideal)

    def test_bad_parameters(self) -> None:
        self.assertRaises(ValueError, S.Scheduler, geometry(1, 1), Clock(), pipeline=0)
        self.assertRaises(ValueError, S.Scheduler, geometry(1, 1), Clock(), window=0)


class ParkingTests(SynchronousTestCase):
    """Sub blocks that arrive before their block can be verified (HTTP sources)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sched = S.Scheduler(geometry(2, 2), self.clock, pipeline=2, window=1)
        self.first = self.sched.add_source("http", hint=1000.0)
        self.first += self.sched.start()

    def test_arrived_frees_the_pipeline_but_is_not_done(self) -> None:
        self.assertEqual(self.first, [S.Request("http", 0, (0, 1))])
        self.clock.advance(1)
        self.assertEqual(self.sched.arrived("http", 0, 0, 1024), [])
        self.assertEqual(self.sched.sources["http"].inflight, {(0, 1): 0.0})
        self.assertFalse(self.sched.is_done(0, 0))
        self.assertEqual(self.sched.arrived("http", 0, 1, 1024), [])
        self.assertEqual(self.sched.confirm(0, 0, 1024), [])
        self.assertEqual(self.sched.confirm(0, 1, 1024), [S.BlockDone(0), S.Request("http", 1, (0, 1))])

    def test_discard_refetches_and_strikes(self) -> None:
        self.sched.arrived("http", 0, 0, 1024)
        self.sched.arrived("http", 0, 1, 1024)
        self.assertEqual(self.sched.discard(0, 0, strike=False), [S.Request("http", 0, (0,))])
        self.assertEqual(self.sched.sources["http"].strikes, 0)
        out = self.sched.discard(0, 1, strike=True)
        self.assertEqual(self.sched.sources["http"].strikes, 1)
        self.assertEqual(out, [S.Request("http", 0, (1,))])
        self.sched.strike("http")
        out = self.sched.strike("http")
        self.assertEqual(out[0], S.Drop("http", "3 strikes"))
        self.assertNotIn("http", self.sched.sources)
        self.assertIn(S.NeedSources("no source left"), out)

    def test_discard_unknown_is_a_no_op(self) -> None:
        self.assertEqual(self.sched.discard(1, 1), [])


class StaticPolicyTests(SynchronousTestCase):
    def test_equal_split_and_no_redistribution(self) -> None:
        sim = Sim(self, geometry(4, 8), pipeline=8, window=1)
        sched = S.Scheduler(sim.g, sim.clock, pipeline=8, window=1, policy="static")
        sim.sched = sched
        sim.add("slow", rate=1000, hint=1000)
        sim.add("fast", rate=8000, hint=8000)
        sim.start()
        first = [r for r in sim.requested if r[2][0] == 0]
        self.assertEqual(sum(1 for r in first if r[1] == "slow"), 4)
        self.assertEqual(sum(1 for r in first if r[1] == "fast"), 4)
        sim.run(tick=False)
        sim.assert_complete()
        # Every block is split 4/4 whatever the speeds: the slow source sets the pace.
        slow = sum(1 for r in sim.requested if r[1] == "slow")
        self.assertEqual(slow, 16)
        self.assertRaises(ValueError, S.Scheduler, sim.g, sim.clock, policy="greedy")


class StallTests(SynchronousTestCase):
    """A source that accepts requests and never sends (the benchmark's 'one stalls')."""

    M = 1 << 20

    def run_with(self, stall: bool, window: int = S.DEFAULT_WINDOW) -> Sim:
        sim = Sim(self, Geometry(64 * self.M, self.M, 64 * 1024), window=window)
        for key, mult in (("a", 1), ("b", 2), ("c", 4), ("d", 8)):
            sim.add(key, rate=mult * self.M)
        if stall:
            sim.add("stall", rate=0)
        sim.start()
        sim.run()
        sim.assert_complete()
        return sim

    def test_stalled_source_costs_little(self) -> None:
        ideal = 64 / 15
        sim = self.run_with(stall=True)
        assert sim.finished_at is not None
        self.assertLess(sim.finished_at / ideal, 1.10)
        self.assertNotIn("stall", set(sim.delivered.values()))
        # It lost its races: after its first two pipelines, nothing more.
        asked = [sid for _, key, sid in sim.requested if key == "stall"]
        self.assertLessEqual(len(asked), 2 * S.DEFAULT_PIPELINE)

    def test_without_stall_near_ideal(self) -> None:
        sim = self.run_with(stall=False)
        assert sim.finished_at is not None
        self.assertLess(sim.finished_at / (64 / 15), 1.02)

    def test_tick_duplicates_an_overdue_sub_block(self) -> None:
        # Nothing arrives any more, so only tick() can notice the lateness.
        sim = Sim(self, geometry(1, 4), window=1, pipeline=4)
        sim.add("stuck", rate=0, hint=1000)
        sim.add("fast", rate=100_000, hint=1000)
        sim.start()
        stuck = set(sim.sched.sources["stuck"].inflight)
        self.assertTrue(stuck)
        sim.run()
        sim.assert_complete()
        self.assertEqual({S.Cancel("stuck", 0, (s,)) for _, s in stuck}, set(sim.cancels))
        self.assertEqual(sim.sched.sources["stuck"].lost_races, len(stuck))
        self.assertEqual(sim.sched._weight(sim.sched.sources["stuck"]), 0.0)


class LateJoinTests(SynchronousTestCase):
    def test_queued_work_is_shared_with_a_late_source(self) -> None:
        sim = Sim(self, geometry(2, 8), window=2, pipeline=2)
        sched = S.Scheduler(sim.g, sim.clock, pipeline=2, window=2, policy="static")
        sim.sched = sched
        sim.add("first", rate=1000)
        sim.start()
        self.assertEqual(len(sched.sources["first"].queue) + len(sched.sources["first"].inflight), 16)
        sim.add("late", rate=1000)
        first, late = sched.sources["first"], sched.sources["late"]
        # Everything not yet requested is split equally again.
        self.assertEqual(len(first.queue) + len(first.inflight), 2 + 7)
        self.assertEqual(len(late.queue) + len(late.inflight), 7)
        sim.run(tick=False)
        sim.assert_complete()


class ExpediteTests(SynchronousTestCase):
    def test_origin_takes_a_late_block(self) -> None:
        clock = Clock()
        sched = S.Scheduler(geometry(2, 4), clock, pipeline=2, window=2)
        sched.add_source("peer", hint=1000.0)
        first = sched.start()
        self.assertEqual(first, [S.Request("peer", 0, (0, 1))])
        # The costly origin joins: while the peer lives it gets nothing...
        self.assertEqual(sched.add_source("origin", costly=True, pipeline=8), [])
        # ...until block 0 is late: its queued sub blocks move, in-flight ones are duplicated.
        out = sched.expedite("origin", 0)
        self.assertEqual(out, [S.Request("origin", 0, (0, 1, 2, 3))])
        self.assertEqual(len(sched.sources["peer"].queue), 4)  # block 1 stays with the peer
        out = sched.received("origin", 0, 0, 1024)
        self.assertIn(S.Cancel("peer", 0, (0,)), out)
        self.assertEqual(sched.expedite("origin", 1), [S.Request("origin", 1, (0, 1, 2, 3))])
        self.assertEqual(len(sched.sources["peer"].queue), 0)
        self.assertEqual(sched.expedite("nobody", 0), [])
        self.assertEqual(sched.expedite("origin", 5), [])
