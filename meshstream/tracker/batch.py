# -*- test-case-name: tests.test_tracker_batch -*-
"""
Group commit: items submitted while a write runs are written together next.

L{GroupCommit} sits in front of a function that writes a list of items in
one database transaction.  While no write is running, a submitted item is
written at once, alone, so an idle tracker adds no delay; while one runs,
new items wait, and the next write takes all of them (up to C{max_items}).
Under load a transaction carries as many items as arrived during the last
one, which is what lets one SQLite connection, or one PostgreSQL round trip
per statement, keep up with thousands of announces a second.

Each submitter gets its own Deferred, fired only after the write holding its
item has committed, with that item's own result (the write returns one
result, or one exception, per item).  When a whole write of several items
fails (a PostgreSQL deadlock, say), every item is written again alone, so
that one item's trouble fails only its own submitter.

No reactor, no threads here: C{write} returns a Deferred (the store runs it
on adbapi's threads) and everything else happens in its callbacks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

I = TypeVar("I")  # noqa: E741  # an item
R = TypeVar("R")  # one item's result

#: A write: items in, one result (or exception) per item out, in order.
Write = Callable[[Sequence[I]], "Deferred[list[R | BaseException]]"]


class _Entry(Generic[I, R]):
    __slots__ = ("alone", "item", "waiting")

    def __init__(self, item: I) -> None:
        self.item = item
        self.waiting: Deferred[R] = Deferred()
        self.alone = False  # set when its group failed: written alone next


class GroupCommit(Generic[I, R]):
    """
    Writes submitted items in groups, at most C{max_running} writes at once.

    @param write: writes a group of items in one transaction.
    @param max_items: the largest group.
    @param max_running: writes in flight at once (1 for one SQLite connection).
    """

    def __init__(self, write: Write[I, R], max_items: int = 256, max_running: int = 1) -> None:
        if max_items < 1 or max_running < 1:
            raise ValueError("max_items and max_running must be at least 1")
        self._write = write
        self.max_items = max_items
        self.max_running = max_running
        self._pending: deque[_Entry[I, R]] = deque()
        self._running = 0
        #: How many writes ran and how many items they carried (statistics, tests).
        self.groups = 0
        self.items = 0

    @property
    def pending(self) -> int:
        """Items waiting for a write."""
        return len(self._pending)

    def submit(self, item: I) -> Deferred[R]:
        """Queue C{item}; fire with its result once its group has committed."""
        entry: _Entry[I, R] = _Entry(item)
        self._pending.append(entry)
        self._start()
        return entry.waiting

    def _start(self) -> None:
        pending = self._pending
        while pending and self._running < self.max_running:
            group = [pending.popleft()]
            if not group[0].alone:
                while pending and len(group) < self.max_items and not pending[0].alone:
                    group.append(pending.popleft())
            self._running += 1
            self.groups += 1
            self.items += len(group)
            self._run(group)

    def _run(self, group: list[_Entry[I, R]]) -> None:
        try:
            d = self._write([e.item for e in group])
        except Exception:
            d = Deferred()
            d.errback(Failure())

        def written(results: list[R | BaseException]) -> None:
            if len(results) != len(group):
                raise RuntimeError(f"a write of {len(group)} items returned {len(results)} results")
            self._done()
            for entry, result in zip(group, results, strict=True):
                if isinstance(result, BaseException):
                    entry.waiting.errback(Failure(result))
                else:
                    entry.waiting.callback(result)

        def failed(f: Failure) -> None:
            if len(group) > 1:
                # Again, each alone, before anything newer.
                for entry in reversed(group):
                    entry.alone = True
                    self._pending.appendleft(entry)
            else:
                group[0].waiting.errback(f)
            self._done()

        d.addCallbacks(written, failed)
        d.addErrback(self._broken, group)

    def _broken(self, f: Failure, group: list[_Entry[I, R]]) -> None:
        """A write answered nonsense: fail whoever still waits."""
        self._done()
        for entry in group:
            if not entry.waiting.called:
                entry.waiting.errback(f)

    def _done(self) -> None:
        self._running -= 1
        self._start()
