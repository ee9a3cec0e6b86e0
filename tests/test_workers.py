"""The worker pool for hashing and writing off the reactor thread."""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.trial import unittest

from meshstream.workers import WorkerPool

reactor: Any = _reactor


class WorkerPoolTests(unittest.TestCase):
    def pool(self, size: int) -> WorkerPool:
        pool = WorkerPool(reactor, size=size)
        self.addCleanup(pool.stop)
        return pool

    def test_results_on_the_reactor_thread(self) -> Deferred[None]:
        return ensureDeferred(self._results())

    async def _results(self) -> None:
        pool = self.pool(2)
        main = threading.get_ident()
        ran_in: list[int] = []
        fired_in: list[int] = []

        def work(x: int) -> int:
            ran_in.append(threading.get_ident())
            return x * x

        ds = [pool.run(work, i) for i in range(20)]
        for d in ds:
            d.addCallback(lambda r: fired_in.append(threading.get_ident()) or r)
        self.assertEqual(await gatherResults(ds), [i * i for i in range(20)])
        self.assertNotIn(main, ran_in)
        self.assertEqual(set(fired_in), {main})

    def test_failure(self) -> Deferred[None]:
        return ensureDeferred(self._failure())

    async def _failure(self) -> None:
        pool = self.pool(1)

        def boom() -> None:
            raise ValueError("boom")

        with self.assertRaises(ValueError):
            await pool.run(boom)
        self.assertEqual(await pool.run(len, b"abc"), 3)

    def test_stop(self) -> None:
        pool = WorkerPool(reactor, size=3)
        threads = list(pool._threads)
        pool.stop()
        pool.stop()
        self.assertFalse(any(t.is_alive() for t in threads))
        self.assertRaises(RuntimeError, pool.run, len, b"")
        self.assertRaises(ValueError, WorkerPool, reactor, 0)
