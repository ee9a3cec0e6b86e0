# -*- test-case-name: tests.test_workers -*-
"""
A few worker threads for CPU- and disk-bound work the reactor must not do
(hashing and writing verified blocks), with as little reactor-thread work
per call as possible.

Twisted's reactor thread pool (C{deferToThreadPool}) runs each call through
its coordinator and a context-carrying wrapper, a dozen Python calls and a
condition variable per hand-off; at a thousand blocks a second that is
measurable on the reactor thread (bench/RESULTS.md).  Here a call is one
C{SimpleQueue.put} and its answer one C{callFromThread}.  The functions run
must release the GIL for their heavy part (hashlib and C{os.pwrite} do),
or the threads buy nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

_STOP = object()


class WorkerPool:
    """
    C{size} threads taking calls in order from one queue.

    @param reactor: an L{IReactorThreads} (only C{callFromThread} is used).
    """

    def __init__(self, reactor: Any, size: int = 2, name: str = "meshstream-worker") -> None:
        if size < 1:
            raise ValueError("a worker pool has at least one thread")
        self._reactor = reactor
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(size)
        ]
        self._stopped = False
        for t in self._threads:
            t.start()

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """C{f(*args)} in a worker: a Deferred firing on the reactor thread with its result or failure."""
        if self._stopped:
            raise RuntimeError("the worker pool is stopped")
        d: Deferred[Any] = Deferred()
        self._queue.put((d, f, args))
        return d

    def stop(self) -> None:
        """Let the calls queued so far finish, then end the threads (waits for them)."""
        if self._stopped:
            return
        self._stopped = True
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join()

    def _work(self) -> None:
        call_from_thread = self._reactor.callFromThread
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            d, f, args = item
            try:
                result = f(*args)
            except BaseException:
                call_from_thread(d.errback, Failure())
            else:
                call_from_thread(d.callback, result)
