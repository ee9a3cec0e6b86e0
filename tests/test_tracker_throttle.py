"""
Tests for L{meshstream.tracker.throttle}: the counts with a L{Clock}, then
the login endpoint refusing guesses over real HTTP (SQLite; the counts do
not touch the database).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial import unittest

from meshstream.tap import tracker as tap
from meshstream.tracker import auth
from meshstream.tracker.service import build_tracker_service, load_or_create_key
from meshstream.tracker.throttle import LoginLimits, LoginThrottle
from tests._accounts import PASSWORD, make_user
from tests.test_tracker_api import _TrackerHTTPMixin, temp_path


class LoginThrottleTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.throttle = LoginThrottle(self.clock, window=60, per_user=3, per_client=5)

    def fail(self, user: str, client: str, times: int = 1) -> None:  # type: ignore[override]
        for _ in range(times):
            self.throttle.failed(user, client)

    def test_per_user(self) -> None:
        """A user name is refused after its limit of failures, from any address."""
        self.fail("alice", "10.0.0.1", 2)
        self.assertIsNone(self.throttle.retry_after("alice", "10.0.0.2"))
        self.clock.advance(10)
        self.fail("alice", "10.0.0.2")
        self.assertEqual(self.throttle.retry_after("alice", "10.0.0.3"), 50)
        self.assertIsNone(self.throttle.retry_after("bob", "10.0.0.3"))

    def test_window_slides(self) -> None:
        """Refused until the oldest counted failure is older than the window."""
        self.fail("alice", "a")
        self.clock.advance(30)
        self.fail("alice", "a", 2)
        self.clock.advance(29.5)
        self.assertEqual(self.throttle.retry_after("alice", "a"), 0.5)
        self.clock.advance(0.5)
        self.assertIsNone(self.throttle.retry_after("alice", "a"))  # two left in the window
        self.fail("alice", "a")
        self.assertEqual(self.throttle.retry_after("alice", "a"), 30)

    def test_per_client(self) -> None:
        """An address guessing many names is refused for every name."""
        for i in range(5):
            self.fail(f"user{i}", "10.9.9.9")
        self.assertEqual(self.throttle.retry_after("someone-else", "10.9.9.9"), 60)
        self.assertIsNone(self.throttle.retry_after("someone-else", "10.9.9.8"))

    def test_success_clears_the_user(self) -> None:
        """A correct password clears its user name's failures, not its address's."""
        self.fail("alice", "a", 2)
        self.fail("bob", "a", 2)
        self.throttle.succeeded("alice")
        self.fail("alice", "a", 2)
        self.assertIsNone(self.throttle.retry_after("alice", "b"))
        self.assertIsNotNone(self.throttle.retry_after("carol", "a"))  # 6 failures from "a"

    def test_memory_bounded(self) -> None:
        """At most max_keys names and addresses are kept, the least recently failed dropped first."""
        throttle = LoginThrottle(self.clock, window=60, per_user=1, per_client=1, max_keys=10)
        for i in range(100):
            self.clock.advance(0.1)
            throttle.failed(f"u{i}", f"c{i}")
        self.assertEqual(len(throttle), 10)
        self.assertIsNotNone(throttle.retry_after("u99", "x"))  # kept
        self.assertIsNotNone(throttle.retry_after("x", "c95"))  # kept
        self.assertIsNone(throttle.retry_after("u0", "c0"))  # dropped
        self.clock.advance(60)
        self.assertIsNone(throttle.retry_after("u99", "c99"))
        self.assertEqual(len(throttle), 8)  # those two, looked at and found stale, are gone

    def test_bad_limits(self) -> None:
        for kw in ({"window": 0}, {"per_user": 0}, {"per_client": 0}, {"max_keys": 1}):
            with self.assertRaises(ValueError):
                LoginThrottle(self.clock, **kw)  # type: ignore[arg-type]


class _ThrottleHTTPMixin:
    """The login endpoint under guessing; the tracker is L{_TrackerHTTPMixin}'s (borrowed)."""

    setUp = _TrackerHTTPMixin.setUp
    request = _TrackerHTTPMixin.request

    service: Any
    clock: Clock

    async def login(self, name: str, password: str) -> tuple[int, Any, Any]:
        body = json.dumps({"user": name, "password": password}).encode()
        result: tuple[int, Any, Any] = await self.request("POST", "/api/v1/login", body, token=None)
        return result

    def count_hashing(self) -> list[object]:
        """The password checks the tracker runs from now on."""
        api = self.service.api
        blocking = api._blocking
        calls: list[object] = []

        def counted(f: Any, *args: Any) -> Deferred[Any]:
            calls.append(f)
            result: Deferred[Any] = blocking(f, *args)
            return result

        api._blocking = counted
        return calls

    async def test_guessing_is_refused(self) -> None:
        """
        After ten wrong passwords for a user, even the right one gets 429
        with Retry-After, without any hashing, until the window has passed.
        """
        assert isinstance(self, unittest.TestCase)
        await make_user(self.service.store, "alice", auth.USER)
        hashing = self.count_hashing()
        for _ in range(10):
            status, doc, _ = await self.login("alice", "guess")
            self.assertEqual((status, doc["error"]["code"]), (401, "bad_credentials"))
        self.assertEqual(len(hashing), 10)
        status, doc, headers = await self.login("alice", PASSWORD)
        self.assertEqual((status, doc["error"]["code"]), (429, "too_many_attempts"))
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"300"])
        self.assertEqual(len(hashing), 10)  # refused before hashing
        self.clock.advance(300)
        status, doc, _ = await self.login("alice", PASSWORD)
        self.assertEqual((status, doc["user"]), (200, "alice"))
        metrics = self.service.api.metrics
        self.assertEqual(metrics.logins.labels("throttled")._value.get(), 1)

    async def test_many_names_from_one_address(self) -> None:
        """Thirty failed names from one address: the address is refused for any name."""
        assert isinstance(self, unittest.TestCase)
        await make_user(self.service.store, "bob", auth.USER)
        for i in range(30):
            status, _, _ = await self.login(f"nobody{i}", "guess")
            self.assertEqual(status, 401)
        status, doc, _ = await self.login("bob", PASSWORD)
        self.assertEqual((status, doc["error"]["code"]), (429, "too_many_attempts"))


class ThrottleHTTPTests(_ThrottleHTTPMixin, unittest.TestCase):
    """On SQLite (the counts are in memory, the same with any store)."""

    def db_url(self) -> str:
        return f"sqlite:{temp_path(self)}"


class LoginOptionTests(unittest.TestCase):
    def test_defaults_and_given(self) -> None:
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(
            (
                options["login-window"],
                options["login-failures-per-user"],
                options["login-failures-per-client"],
            ),
            (300.0, 10, 30),
        )
        options = tap.Options()
        options.parseOptions(["--login-window=60", "--login-failures-per-client=500"])
        self.assertEqual((options["login-window"], options["login-failures-per-client"]), (60.0, 500))
        for bad in (
            ["--login-window=0"],
            ["--login-failures-per-user=0"],
            ["--login-failures-per-client=-1"],
            ["--login-failures-per-user=many"],
        ):
            with self.assertRaises(usage.UsageError):
                tap.Options().parseOptions(bad)

    def test_reach_the_api(self) -> None:
        base = temp_path(self)
        os.makedirs(base)
        key = load_or_create_key(os.path.join(base, "t.key"))
        service = build_tracker_service(
            reactor, [], f"sqlite:{base}/t.sqlite", key, login_limits=LoginLimits(60.0, 2, 3)
        )
        self.addCleanup(service.store.close)
        throttle = service.api.login_throttle
        self.assertEqual((throttle.window, throttle.limits), (60.0, {"user": 2, "client": 3}))
