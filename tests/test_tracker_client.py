# -*- test-case-name: tests.test_tracker_client -*-
"""
Tests for L{meshstream.tracker.client}, in memory: treq's L{StubTreq} serves a
resource (the real tracker API or a stub), a L{Clock} drives the timeouts.
The client against the tracker over real HTTP is in test_tracker_api.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from meshstream.errors import TrackerError, UnknownContent
from meshstream.manifest import Manifest
from meshstream.tracker.client import Credentials, NodeInfo, TrackerClient, split_address

BASE = "http://tracker.test:7070"


def make_manifest(seed: int) -> Manifest:
    roots = tuple(bytes([seed, b]) * 16 for b in range(2))
    return Manifest(size=2048, block_size=1024, sub_block_size=1024, block_roots=roots)


class Canned(Resource):
    """Answers every request with a fixed status and body; records requests."""

    isLeaf = True

    def __init__(self, status: int, body: bytes | Callable[[Request], bytes]) -> None:
        super().__init__()
        self.status = status
        self.body = body
        self.requests: list[tuple[bytes, bytes, bytes]] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.requests.append((request.method, request.uri, request.content.read()))
        request.setResponseCode(self.status)
        return self.body(request) if callable(self.body) else self.body


class Hanging(Resource):
    """Never answers, or sends the start of a body and then stalls."""

    isLeaf = True

    def __init__(self, partial: bytes = b"") -> None:
        super().__init__()
        self.partial = partial

    def render(self, request: Request) -> int:
        if self.partial:
            request.write(self.partial)
        return NOT_DONE_YET


def error(code: str, message: str = "nope") -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class TrackerClientTests(unittest.TestCase):
    def client(self, resource: Resource, **kw: Any) -> TrackerClient:
        self.clock = Clock()
        return TrackerClient(StubTreq(resource), BASE + "/", self.clock, **kw)

    def test_public_key(self) -> None:
        key = Ed25519PrivateKey.generate()
        from meshstream.manifest import public_key_text

        body = json.dumps({"algorithm": "ed25519", "public_key": public_key_text(key.public_key())})
        got = self.successResultOf(self.client(Canned(200, body.encode())).public_key())
        self.assertEqual(got.public_bytes_raw(), key.public_key().public_bytes_raw())

    def test_public_key_malformed(self) -> None:
        for body in (
            b'{"algorithm": "rsa", "public_key": "x"}',
            b'{"algorithm": "ed25519", "public_key": "!!"}',
            b"[]",
        ):
            f = self.failureResultOf(self.client(Canned(200, body)).public_key(), TrackerError)
            self.assertIsNone(f.value.status)

    def test_register_manifest(self) -> None:
        manifest = make_manifest(1)
        signed = manifest.sign(Ed25519PrivateKey.generate())
        resource = Canned(
            201, json.dumps({"content_id": signed.content_id, "manifest": signed.to_dict()}).encode()
        )
        got = self.successResultOf(self.client(resource).register_manifest(manifest))
        self.assertEqual(got, signed)
        ((method, uri, body),) = resource.requests
        self.assertEqual((method, uri), (b"POST", b"/api/v1/manifests"))
        self.assertEqual(Manifest.from_json(body), manifest)

    def test_get_manifest_unknown(self) -> None:
        cid = "ab" * 32
        resource = Canned(404, error("unknown_content"))
        f = self.failureResultOf(self.client(resource).get_manifest(cid), UnknownContent)
        self.assertEqual(str(f.value), cid)
        self.assertEqual(resource.requests[0][1], f"/api/v1/manifests/{cid}".encode())

    def test_get_manifest_bad(self) -> None:
        f = self.failureResultOf(
            self.client(Canned(200, b'{"info": {}}')).get_manifest("ab" * 32), TrackerError
        )
        self.assertIn("bad manifest", str(f.value))

    def test_other_404_is_tracker_error(self) -> None:
        f = self.failureResultOf(
            self.client(Canned(404, error("not_found"))).get_manifest("ab" * 32), TrackerError
        )
        self.assertEqual((f.value.status, f.value.code), (404, "not_found"))

    def test_announce(self) -> None:
        answer = {"interval": 30, "expires_in": 90, "unknown": []}
        resource = Canned(200, json.dumps(answer).encode())
        got = self.successResultOf(self.client(resource).announce("n1", "h:1", ["ab" * 32], {"cpu": 0.5}))
        self.assertEqual(got, answer)
        ((method, uri, body),) = resource.requests
        self.assertEqual((method, uri), (b"POST", b"/api/v1/announce"))
        self.assertEqual(
            json.loads(body),
            {"node_id": "n1", "address": "h:1", "contents": ["ab" * 32], "state": {"cpu": 0.5}},
        )

    def test_nodes(self) -> None:
        nodes = [
            {"node_id": "a", "address": "10.0.0.1:7000", "state": {"cpu": 0.1}, "last_seen": 5},
            {"node_id": "b", "address": "[2001:db8::2]:7001", "state": {}, "last_seen": 6.5},
            {"node_id": "bad", "address": "no-port", "state": {}, "last_seen": 1},
            {"node_id": "bad2", "address": "h:1", "state": [], "last_seen": 1},
            "junk",
        ]
        resource = Canned(200, json.dumps({"content_id": "x", "nodes": nodes}).encode())
        got = self.successResultOf(self.client(resource).nodes("ab" * 32, limit=7, exclude=["me", "you"]))
        self.assertEqual(
            got,
            [
                NodeInfo("a", "10.0.0.1", 7000, {"cpu": 0.1}, 5.0),
                NodeInfo("b", "2001:db8::2", 7001, {}, 6.5),
            ],
        )
        self.assertEqual(
            resource.requests[0][1],
            f"/api/v1/contents/{'ab' * 32}/nodes?limit=7&exclude=me&exclude=you".encode(),
        )

    def test_nodes_malformed(self) -> None:
        self.failureResultOf(self.client(Canned(200, b'{"nodes": 3}')).nodes("ab" * 32), TrackerError)

    def test_leave(self) -> None:
        resource = Canned(200, b"{}")
        self.assertIsNone(self.successResultOf(self.client(resource).leave("n1")))
        self.assertEqual(json.loads(resource.requests[0][2]), {"node_id": "n1"})

    def test_http_error_with_code(self) -> None:
        f = self.failureResultOf(
            self.client(Canned(400, error("bad_request", "node_id bad"))).leave("x"), TrackerError
        )
        self.assertEqual((f.value.status, f.value.code), (400, "bad_request"))
        self.assertIn("node_id bad", str(f.value))

    def test_http_error_not_json(self) -> None:
        f = self.failureResultOf(
            self.client(Canned(502, b"<html>bad gateway</html>")).leave("x"), TrackerError
        )
        self.assertEqual((f.value.status, f.value.code), (502, None))

    def test_success_not_json(self) -> None:
        self.failureResultOf(self.client(Canned(200, b"<html>")).leave("x"), TrackerError)

    def test_body_too_large(self) -> None:
        client = self.client(Canned(200, b"[" + b"1," * 1000 + b"1]"), max_body=100)
        f = self.failureResultOf(client.leave("x"), TrackerError)
        self.assertIn("larger than 100", str(f.value))

    def test_timeout(self) -> None:
        client = self.client(Hanging(), timeout=5)
        d = client.leave("x")
        self.assertNoResult(d)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        f = self.failureResultOf(d, TrackerError)
        self.assertEqual(f.value.code, "timeout")

    def test_timeout_covers_body(self) -> None:
        client = self.client(Hanging(b'{"interval": '), timeout=5)
        d = client.announce("n", "h:1", [], {})
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(self.failureResultOf(d, TrackerError).value.code, "timeout")

    def test_connection_error(self) -> None:
        class Refusing:
            def request(self, method: str, url: str, **kw: Any) -> Deferred[Any]:
                return fail(ConnectionRefusedError())

        client = TrackerClient(Refusing(), BASE, Clock())
        f = self.failureResultOf(client.nodes("ab" * 32), TrackerError)
        self.assertEqual((f.value.status, f.value.code), (None, None))
        self.assertIn("refused", str(f.value))


class _Expiring(Resource):
    """
    A tracker whose tokens are all stale but the last one it handed out;
    logins wait until L{answer_logins}.
    """

    isLeaf = True

    def __init__(self, status: int = 200) -> None:
        super().__init__()
        self.status = status
        self.logins = 0
        self.waiting: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        if request.path == b"/api/v1/login":
            self.waiting.append(request)
            return NOT_DONE_YET
        if request.getHeader("authorization") == f"Bearer t{self.logins}":
            return json.dumps({"user": "alice", "role": "user", "quota_bytes": None}).encode()
        request.setResponseCode(401)
        return json.dumps({"error": {"code": "token_expired", "message": "expired"}}).encode()

    def answer_logins(self) -> None:
        waiting, self.waiting = self.waiting, []
        for request in waiting:
            self.logins += 1
            request.setResponseCode(self.status)
            if self.status == 200:
                request.write(json.dumps({"token": f"t{self.logins}"}).encode())
            else:
                request.write(b'{"error": {"code": "bad_credentials", "message": "no"}}')
            request.finish()


class LoginTests(unittest.TestCase):
    def client(self, tracker: _Expiring) -> tuple[TrackerClient, StubTreq]:
        stub = StubTreq(tracker)
        creds = Credentials("alice", "pw")
        return TrackerClient(stub, BASE, Clock(), credentials=creds, token="stale"), stub

    def test_concurrent_calls_share_one_login(self) -> None:
        """Calls that all find their token expired log in once, together."""
        tracker = _Expiring()
        client, stub = self.client(tracker)
        calls = [client.whoami() for _ in range(3)]
        stub.flush()
        self.assertEqual(len(tracker.waiting), 1)  # three 401s, one login
        tracker.answer_logins()
        stub.flush()
        self.assertEqual([self.successResultOf(d)["user"] for d in calls], ["alice"] * 3)
        self.assertEqual((tracker.logins, client.token), (1, "t1"))
        # Once settled, the next expiry brings the next login.
        tracker.logins += 1  # the tracker forgets t1
        d = client.whoami()
        stub.flush()
        tracker.answer_logins()
        stub.flush()
        self.assertEqual(self.successResultOf(d)["user"], "alice")
        self.assertEqual((tracker.logins, client.token), (3, "t3"))

    def test_failed_login_fails_every_waiter(self) -> None:
        """A login the tracker refuses fails each call that waited for it."""
        tracker = _Expiring(status=401)
        client, stub = self.client(tracker)
        calls = [client.whoami(), client.whoami()]
        stub.flush()
        self.assertEqual(len(tracker.waiting), 1)
        tracker.answer_logins()
        stub.flush()
        for d in calls:
            self.assertEqual(self.failureResultOf(d, TrackerError).value.code, "bad_credentials")


class SplitAddressTests(unittest.SynchronousTestCase):
    def test_split(self) -> None:
        self.assertEqual(split_address("h:1"), ("h", 1))
        self.assertEqual(split_address("[::1]:80"), ("::1", 80))
        for bad in ("h", ":1", "h:0", "h:x", "h:70000"):
            with self.assertRaises(ValueError, msg=bad):
                split_address(bad)
