# -*- test-case-name: tests.test_coalesce -*-
"""
One operation in flight at a time, shared by everyone who asks while it runs.

A tracker login, a ticket-bringing node lookup and a health check's database
ping all have this shape: when ten callers want a fresh token at once, one
login goes out and the ten share its outcome; once it has settled, the next
caller starts a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class Coalesced(Generic[T]):
    """
    Call C{start} at most once at a time; every caller gets its own
    L{Deferred} of the shared outcome.

    Cancelling a caller's Deferred only takes that caller off the list: the
    operation goes on for the others (and for the next caller, who joins it).
    A caller whose callbacks ask again, once the outcome is known, starts a
    new operation.

    @param start: begins the operation; it may fire (or fail) at once.
    """

    def __init__(self, start: Callable[[], Deferred[T]]) -> None:
        self._start = start
        self._waiting: list[Deferred[T]] = []
        self._running = False

    @property
    def running(self) -> bool:
        """Whether an operation is in flight."""
        return self._running

    @property
    def waiting(self) -> int:
        """How many callers wait for the operation in flight."""
        return len(self._waiting)

    def __call__(self) -> Deferred[T]:
        waiting = self._waiting
        d: Deferred[T] = Deferred(lambda d: waiting.remove(d) if d in waiting else None)
        waiting.append(d)
        if not self._running:
            self._running = True
            try:
                started = self._start()
            except BaseException:
                self._settle(Failure())
            else:
                started.addBoth(self._settle)
        return d

    def _settle(self, result: T | Failure) -> None:
        self._running = False
        everyone, self._waiting = self._waiting, []
        for d in everyone:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
