"""
Users and passwords: the scrypt hashes, bearer headers, the token cache, and
C{meshstream tracker user ...} run as a user would (a child process on a real
SQLite file), then a real tracker accepting the account it made.
"""

from __future__ import annotations

import os
import sys

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from meshstream.errors import TrackerError
from meshstream.tracker import auth
from meshstream.tracker.api import TokenCache
from meshstream.tracker.client import Credentials, TrackerClient
from meshstream.tracker.service import build_tracker_service, load_or_create_key
from tests._accounts import TEST_COST


class PasswordTests(unittest.SynchronousTestCase):
    def test_round_trip(self) -> None:
        stored = auth.hash_password("s3cret", TEST_COST)
        self.assertTrue(stored.startswith("scrypt$ln=4,r=8,p=1$"))
        self.assertTrue(auth.verify_password("s3cret", stored))
        self.assertFalse(auth.verify_password("s3cret ", stored))
        self.assertFalse(auth.verify_password("", stored))

    def test_salted(self) -> None:
        self.assertNotEqual(auth.hash_password("same", TEST_COST), auth.hash_password("same", TEST_COST))

    def test_default_cost_is_memory_hard(self) -> None:
        stored = auth.hash_password("x")
        self.assertTrue(stored.startswith("scrypt$ln=15,r=8,p=1$"))  # 32 MiB
        self.assertTrue(auth.verify_password("x", stored))

    def test_malformed_hashes(self) -> None:
        good = auth.hash_password("x", TEST_COST)
        for bad in (
            "",
            "bcrypt$x$y$z",
            good.replace("ln=4", "ln=40"),  # would cost terabytes
            good.replace("r=8", "r=zz"),
            good + "$extra",
            good.rsplit("$", 1)[0] + "$not base64!",
        ):
            self.assertRaises(auth.PasswordHashError, auth.verify_password, "x", bad)

    def test_dummy_hash_is_valid(self) -> None:
        """The hash checked for unknown users parses and matches nothing."""
        self.assertFalse(auth.verify_password("", auth.DUMMY_HASH))

    def test_parse_bearer(self) -> None:
        token = auth.new_token()
        self.assertEqual(auth.parse_bearer(f"Bearer {token}".encode()), token)
        self.assertEqual(auth.parse_bearer(f"bearer  {token} ".encode()), token)
        for bad in (None, b"", b"Basic dXNlcjpwdw==", b"Bearer", b"Bearer ", b"Bearer " + b"x" * 300):
            self.assertIsNone(auth.parse_bearer(bad))

    def test_user_names(self) -> None:
        for good in ("alice", "a.b-c_d@example.org", "x" * 64):
            self.assertTrue(auth.valid_user_name(good))
        for bad in ("", "x" * 65, "a b", "é", None, 3):
            self.assertFalse(auth.valid_user_name(bad))


class TokenCacheTests(unittest.SynchronousTestCase):
    def test_entries_lapse(self) -> None:
        cache = TokenCache(lifetime=10.0, size=3)
        alice = auth.Principal("alice", auth.USER)
        cache.put("d1", alice, expires=500.0, now=100.0)
        self.assertEqual(cache.get("d1", 109.9), (alice, 500.0))
        self.assertIsNone(cache.get("d1", 110.0))
        self.assertIsNone(cache.get("d1", 100.0))  # gone for good

    def test_forget_and_bound(self) -> None:
        cache = TokenCache(lifetime=10.0, size=3)
        alice, bob = auth.Principal("alice", auth.USER), auth.Principal("bob", auth.USER)
        cache.put("a1", alice, 1e9, 0.0)
        cache.put("a2", alice, 1e9, 0.0)
        cache.put("b1", bob, 1e9, 0.0)
        cache.forget(name="alice")
        self.assertEqual([cache.get(d, 1.0) for d in ("a1", "a2")], [None, None])
        self.assertIsNotNone(cache.get("b1", 1.0))
        cache.forget(digest="b1")
        self.assertIsNone(cache.get("b1", 1.0))
        for i in range(5):  # never more than `size` entries
            cache.put(f"x{i}", bob, 1e9, 0.0)
            self.assertLessEqual(len(cache._entries), 3)


class UserCommandTests(unittest.TestCase):
    """C{meshstream tracker user ...} in a child process, then a tracker on the same file."""

    timeout = 60

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.db = f"sqlite:{os.path.join(self.dir, 'tracker.sqlite')}"
        self.pwfile = os.path.join(self.dir, "pw")
        with open(self.pwfile, "w") as f:
            f.write("first password\n")

    async def run_cli(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "meshstream.cli", "tracker", "user", *args, "--db", self.db],
            env=env
            if env is not None
            else {k: v for k, v in os.environ.items() if k != "MESHSTREAM_PASSWORD"},
        )
        return code, out.decode(), err.decode()

    def test_commands_then_login(self) -> Deferred[None]:
        return ensureDeferred(self._commands_then_login())

    async def _commands_then_login(self) -> None:
        code, out, err = await self.run_cli("add", "alice", "--password-file", self.pwfile)
        self.assertEqual((code, out.strip()), (0, "added user alice"), err)
        code, out, err = await self.run_cli("add", "boss", "--role", "admin", "--generate-password")
        self.assertEqual(code, 0, err)
        generated = out.split("with password ")[1].strip()
        # Refusals, each with a clear message and exit code 1.
        for args, message in (
            (("add", "alice", "--password-file", self.pwfile), "user alice exists"),
            (("add", "bad name!", "--password-file", self.pwfile), "a user name is"),
            (("add", "carol"), "no password"),
            (("add", "carol", "--password-file", "/nonexistent"), "cannot read the password file"),
            (("disable", "nobody"), "no user nobody"),
            (("quota", "alice", "lots"), "a quota is"),
        ):
            code, out, err = await self.run_cli(*args)
            self.assertEqual(code, 1, (args, out, err))
            self.assertIn(message, err)
        self.assertEqual((await self.run_cli("quota", "alice", "1000000"))[0], 0)
        code, out, _ = await self.run_cli("list")
        rows = [line.split() for line in out.splitlines()[1:]]
        self.assertEqual(rows, [["alice", "user", "enabled", "1000000"], ["boss", "admin", "enabled", "-"]])

        # A tracker on that database accepts the accounts the command made.
        key = load_or_create_key(os.path.join(self.dir, "tracker.key"))
        service = build_tracker_service(reactor, ["tcp:0:interface=127.0.0.1"], self.db, key)
        service.startService()
        self.addCleanup(service.stopService)
        (port,) = await service.listening()
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = HTTPClient(Agent(reactor, pool=pool))
        url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]

        def client(name: str, password: str) -> TrackerClient:
            return TrackerClient(http, url, reactor, credentials=Credentials(name, password))

        me = await client("alice", "first password").whoami()
        self.assertEqual(me, {"user": "alice", "role": "user", "quota_bytes": 1_000_000})
        self.assertEqual((await client("boss", generated).whoami())["role"], "admin")

        # passwd (from the environment) replaces the password; disable locks out.
        env = {**os.environ, "MESHSTREAM_PASSWORD": "second password"}
        self.assertEqual((await self.run_cli("passwd", "alice", env=env))[0], 0)
        with self.assertRaises(TrackerError) as e:
            await client("alice", "first password").whoami()
        self.assertEqual(e.exception.code, "bad_credentials")
        await client("alice", "second password").whoami()
        self.assertEqual((await self.run_cli("disable", "alice"))[0], 0)
        with self.assertRaises(TrackerError) as e:
            await client("alice", "second password").whoami()
        self.assertEqual((e.exception.status, e.exception.code), (403, "user_disabled"))
