# -*- test-case-name: tests.test_tracker_throttle -*-
"""
Failed logins, counted, so that password guessing is slow and cheap to refuse.

Every login costs the tracker a scrypt check (about 50 ms of a core and
32 MiB); without a limit anyone could guess passwords as fast as the tracker
hashes, and keep it busy doing so.  L{LoginThrottle} counts failed logins in
a sliding window per user name and per client address, and refuses further
attempts (before any hashing) once either count reaches its limit:

    - a user name: C{per_user} failures in C{window} seconds (default 10 in
      5 minutes): slows guessing one account from many addresses;
    - a client address: C{per_client} failures in C{window} seconds
      (default 30): slows one address guessing many accounts.

A refusal says when to try again (the moment the oldest counted failure
leaves the window).  A successful login clears its user name's failures
(not its address's: a guesser who also holds one account gains nothing).
Someone who knows a user name can keep that account refused while guessing
at the limit: the price of slowing guesses per account, kept small by a
short window.  Counts live in the tracker process's memory (each process of
a PostgreSQL-backed cluster counts on its own) and take at most
C{max_keys} entries, the least recently failed dropped first.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

DEFAULT_WINDOW = 300.0
DEFAULT_PER_USER = 10
DEFAULT_PER_CLIENT = 30
DEFAULT_MAX_KEYS = 100_000


@frozen
class LoginLimits:
    """The settings of a L{LoginThrottle} (the tracker's C{--login-*} options)."""

    window: float = DEFAULT_WINDOW
    per_user: int = DEFAULT_PER_USER
    per_client: int = DEFAULT_PER_CLIENT


class LoginThrottle:
    """
    Sliding-window counts of failed logins per user name and client address.

    @param clock: the tracker's clock.
    """

    def __init__(
        self,
        clock: IReactorTime,
        window: float = DEFAULT_WINDOW,
        per_user: int = DEFAULT_PER_USER,
        per_client: int = DEFAULT_PER_CLIENT,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if window <= 0 or per_user < 1 or per_client < 1 or max_keys < 2:
            raise ValueError("window > 0, per_user and per_client >= 1, max_keys >= 2")
        self.clock = clock
        self.window = window
        self.limits = {"user": per_user, "client": per_client}
        self.max_keys = max_keys
        # (kind, key) -> times of the failures still in the window, oldest first;
        # the dict itself is ordered by last failure, least recent first.
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def _recent(self, kind: str, key: str, now: float) -> deque[float] | None:
        times = self._failures.get((kind, key))
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[(kind, key)]
            return None
        return times

    def retry_after(self, user: str, client: str) -> float | None:
        """
        None if a login for C{user} from C{client} may be checked now, else
        how many seconds until it may.
        """
        now = self.clock.seconds()
        wait = 0.0
        for kind, key in (("user", user), ("client", client)):
            times = self._recent(kind, key, now)
            if times is not None and len(times) >= self.limits[kind]:
                # Free again once enough of the oldest have left the window.
                oldest = times[len(times) - self.limits[kind]]
                wait = max(wait, oldest + self.window - now)
        return wait if wait > 0 else None

    def failed(self, user: str, client: str) -> None:
        """Count a failed login (wrong user name or password)."""
        now = self.clock.seconds()
        for kind, key in (("user", user), ("client", client)):
            times = self._recent(kind, key, now)
            if times is None:
                times = self._failures[(kind, key)] = deque()
            else:
                self._failures.move_to_end((kind, key))
            times.append(now)
            # Keep no more than the limit needs (retry_after reads the last ones).
            while len(times) > self.limits[kind]:
                times.popleft()
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, user: str) -> None:
        """A correct password: forget the user name's failures."""
        self._failures.pop(("user", user), None)

    def __len__(self) -> int:
        """How many user names and addresses have failures counted."""
        return len(self._failures)
