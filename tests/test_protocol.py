"""
Tests for L{meshstream.wire.protocol}: L{PeerProtocol}, L{PeerFactory} and
L{TokenBucket}.

Two harnesses, both without sockets: a single protocol on a L{StringTransport}
(the test plays the peer by feeding frames and decoding what was written),
and two protocols joined by L{connectedServerAndClient}, both on one L{Clock}.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from meshstream import tickets
from meshstream.interfaces import IContentStore
from meshstream.manifest import Geometry, leaf_hash, root_hash
from meshstream.wire import frames as F
from meshstream.wire.protocol import (
    HANDSHAKE_TIMEOUT,
    IPeerListener,
    PeerFactory,
    PeerProtocol,
    TokenBucket,
)

SUB = 1024
GEOMETRY = Geometry(2 * 4 * SUB + 300, 4 * SUB, SUB)  # two full blocks and a 300-byte tail


def make_content(size: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d" % i).digest()
        i += 1
    return bytes(out[:size])


@implementer(IContentStore)
class MemoryStore:
    """One content held in memory; only the blocks in C{held} are served."""

    def __init__(self, data: bytes, geometry: Geometry, held: set[int] | None = None) -> None:
        self.data = data
        self.g = geometry
        self.cid = hashlib.sha256(data).digest()
        self.cid_hex = self.cid.hex()
        self.held = set(range(geometry.num_blocks)) if held is None else held
        self.reads: list[tuple[int, int]] = []

    def sub(self, block: int, sub: int) -> bytes:
        off = self.g.sub_offset(block, sub)
        return self.data[off : off + self.g.sub_length(block, sub)]

    def all_leaves(self, block: int) -> list[bytes]:
        return [leaf_hash(self.sub(block, s)) for s in range(self.g.subs_in_block(block))]

    def has(self, content_id: str, block: int, sub: int) -> bool:
        return (
            content_id == self.cid_hex
            and block in self.held
            and 0 <= block < self.g.num_blocks
            and 0 <= sub < self.g.subs_in_block(block)
        )

    def read(self, content_id: str, block: int, sub: int) -> bytes:
        assert self.has(content_id, block, sub)
        self.reads.append((block, sub))
        return self.sub(block, sub)

    def leaves(self, content_id: str, block: int) -> list[bytes] | None:
        if content_id != self.cid_hex or block not in self.held:
            return None
        return self.all_leaves(block)


@implementer(IPeerListener)
class Listener:
    """
    Records every event and checks what arrives: a leaf list against the
    block root, a sub block against its leaf (as the session does).
    """

    def __init__(self, roots: dict[int, bytes] | None = None) -> None:
        self.roots = roots or {}
        self.events: list[tuple[Any, ...]] = []
        self.leaves: dict[int, list[bytes]] = {}
        self.data: dict[tuple[int, int], bytes] = {}
        self.errors: list[str] = []
        self.rejects: list[F.Reject] = []
        self.rtts: list[float] = []
        self.states: list[dict[str, Any]] = []
        self.lost: list[str] = []
        self.ready = 0

    def peer_ready(self, peer: PeerProtocol) -> None:
        self.ready += 1
        self.events.append(("ready",))

    def hashes_received(self, peer: PeerProtocol, msg: F.Hashes) -> None:
        self.events.append(("hashes", msg.block))
        if root_hash(list(msg.leaves)) != self.roots.get(msg.block):
            self.errors.append(f"bad leaves for block {msg.block}")
        self.leaves[msg.block] = list(msg.leaves)

    def data_received(self, peer: PeerProtocol, msg: F.Data) -> None:
        self.events.append(("data", msg.block, msg.sub))
        leaves = self.leaves.get(msg.block)
        if leaves is None:
            self.errors.append(f"data for block {msg.block} before its leaves")
        elif leaf_hash(msg.data) != leaves[msg.sub]:
            self.errors.append(f"bad data {msg.block}/{msg.sub}")
        else:
            self.data[(msg.block, msg.sub)] = msg.data

    def rejected(self, peer: PeerProtocol, msg: F.Reject) -> None:
        self.events.append(("reject", msg.block, msg.sub))
        self.rejects.append(msg)

    def state_received(self, peer: PeerProtocol, state: dict[str, Any]) -> None:
        self.states.append(state)

    def rtt_measured(self, peer: PeerProtocol, rtt: float) -> None:
        self.rtts.append(rtt)

    def peer_lost(self, peer: PeerProtocol, reason: str) -> None:
        self.lost.append(reason)


def frames(transport: StringTransport) -> list[F.Message]:
    """Decode and clear everything written to C{transport}."""
    out = F.FrameDecoder().feed(transport.value())
    transport.clear()
    return out


class _Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(make_content(GEOMETRY.size), GEOMETRY)
        self.cid = self.store.cid
        self.roots = {b: root_hash(self.store.all_leaves(b)) for b in range(GEOMETRY.num_blocks)}
        self.ready_failures: list[Failure] = []

    def proto(self, node_id: str = "me", **kwargs: Any) -> PeerProtocol:
        p = PeerProtocol(node_id, self.clock, **kwargs)
        p.ready.addErrback(self.ready_failures.append)
        return p

    def on_string(self, proto: PeerProtocol, greet: bool = True) -> StringTransport:
        """Connect C{proto} to a StringTransport; with C{greet}, finish the handshake."""
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertEqual(frames(transport), [F.Hello(node_id=proto.node_id, ticket=proto.ticket)])
        if greet:
            proto.dataReceived(F.encode(F.Hello(node_id="peer")))
            self.assertEqual(proto.version, 1)
        return transport

    def pair(self, server: PeerProtocol, client: PeerProtocol) -> IOPump:
        _client, _server, pump = connectedServerAndClient(lambda: server, lambda: client, clock=self.clock)
        return pump


class HandshakeTests(_Base):
    def test_hello_exchange(self) -> None:
        listener = Listener()
        server = self.proto("server", store=self.store)
        client = self.proto("client", listener=listener)
        self.pair(server, client)
        self.assertEqual((server.version, client.version), (1, 1))
        self.assertEqual((server.peer_id, client.peer_id), ("client", "server"))
        self.assertIs(self.successResultOf(client.ready), client)
        self.assertIs(self.successResultOf(server.ready), server)
        self.assertEqual(listener.ready, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # handshake timers cancelled
        verifyObject(IPeerListener, listener)

    def test_version_negotiated_down(self) -> None:
        p = self.proto()
        transport = self.on_string(p, greet=False)
        p.dataReceived(F.encode(F.Hello(node_id="new", min_version=1, max_version=9)))
        self.assertEqual(p.version, 1)
        self.assertEqual(p.peer_id, "new")
        self.assertFalse(transport.disconnecting)

    def test_version_mismatch(self) -> None:
        p = self.proto()
        transport = self.on_string(p, greet=False)
        p.dataReceived(F.encode(F.Hello(node_id="future", min_version=2, max_version=3)))
        [bye] = frames(transport)
        assert isinstance(bye, F.Bye)
        self.assertEqual(bye.code, F.ByeCode.VERSION_MISMATCH)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(p.version)
        self.assertNoResult(p.ready)

    def test_version_mismatch_over_iosim(self) -> None:
        listener = Listener()
        server = self.proto("server", store=self.store)
        client = self.proto("client", listener=listener)
        self.patch(client, "send", lambda msg: PeerProtocol.send(client, _future_hello(msg)))
        self.pair(server, client)
        self.assertIsNone(server.version)
        self.assertEqual(len(listener.lost), 1)
        # The client accepted the server's HELLO; only the server never got one.
        self.assertEqual(client.version, 1)
        self.assertEqual(len(self.ready_failures), 1)
        self.ready_failures[0].trap(ConnectionError)

    def test_non_hello_first(self) -> None:
        p = self.proto(store=self.store)
        transport = self.on_string(p, greet=False)
        p.dataReceived(F.encode(F.Ping(7)) + F.encode(F.Hello(node_id="late")))
        [bye] = frames(transport)
        self.assertEqual(bye, F.Bye(F.ByeCode.PROTOCOL_ERROR, "expected HELLO, got Ping"))
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(p.version)

    def test_bye_before_hello_closes_quietly(self) -> None:
        listener = Listener()
        p = self.proto(listener=listener)
        transport = self.on_string(p, greet=False)
        p.dataReceived(
            F.encode(F.Bye(F.ByeCode.BUSY, "no free upload slot")) + F.encode(F.Hello(node_id="x"))
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(frames(transport), [])  # no BYE in reply to a BYE
        self.assertIsNone(p.version)
        p.connectionLost(Failure(ConnectionError("closed")))
        self.assertEqual(len(self.ready_failures), 1)
        self.assertEqual(listener.lost, ["closed"])

    def test_busy_refusal_over_iosim(self) -> None:
        factory = PeerFactory("node", self.clock, self.store, max_peers=0)
        listener = Listener()
        client = self.proto("client", listener=listener)
        self.pair(factory.buildProtocol(None), client)
        self.assertIsNone(client.version)
        self.assertEqual(listener.ready, 0)
        self.assertEqual(len(listener.lost), 1)
        self.assertEqual(len(self.ready_failures), 1)

    def test_second_hello(self) -> None:
        p = self.proto(store=self.store)
        transport = self.on_string(p)
        p.dataReceived(F.encode(F.Hello(node_id="again")))
        [bye] = frames(transport)
        assert isinstance(bye, F.Bye)
        self.assertEqual(bye.code, F.ByeCode.PROTOCOL_ERROR)
        self.assertEqual(p.peer_id, "peer")

    def test_handshake_timeout(self) -> None:
        p = self.proto()
        transport = self.on_string(p, greet=False)
        self.clock.advance(HANDSHAKE_TIMEOUT - 0.1)
        self.assertEqual(frames(transport), [])
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        [bye] = frames(transport)
        assert isinstance(bye, F.Bye)
        self.assertEqual(bye.code, F.ByeCode.TIMEOUT)
        self.assertTrue(transport.disconnecting)

    def test_handshake_timeout_configurable_and_cancelled(self) -> None:
        p = self.proto(handshake_timeout=2.0)
        transport = self.on_string(p, greet=False)
        self.clock.advance(2.5)
        self.assertEqual([type(m) for m in frames(transport)], [F.Bye])
        q = self.proto(handshake_timeout=2.0)
        transport = self.on_string(q)
        self.clock.advance(100)
        self.assertEqual(frames(transport), [])
        self.assertFalse(transport.disconnecting)

    def test_ticket_checker_refuses(self) -> None:
        seen: list[tuple[str, bytes]] = []

        def check(node_id: str, ticket: bytes) -> None:
            seen.append((node_id, ticket))
            raise ValueError("ticket expired")

        p = self.proto(store=self.store, ticket_checker=check)
        transport = StringTransport()
        p.makeConnection(transport)
        self.assertEqual(frames(transport), [])  # a checking side says HELLO only after the check
        p.dataReceived(F.encode(F.Hello(node_id="peer", ticket=b"T1")))
        self.assertEqual(seen, [("peer", b"T1")])
        self.assertEqual(frames(transport), [F.Bye(F.ByeCode.UNAUTHORIZED, "ticket expired")])
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(p.version)

    def test_ticket_checker_accepts(self) -> None:
        seen: list[tuple[str, bytes]] = []
        server = self.proto("server", store=self.store, ticket_checker=lambda n, t: seen.append((n, t)))
        client = self.proto("client", listener=Listener(), ticket=b"good ticket")
        self.pair(server, client)
        self.assertEqual(seen, [("client", b"good ticket")])
        self.assertEqual(server.version, 1)

    def test_peer_bye_closes(self) -> None:
        p = self.proto(store=self.store)
        transport = self.on_string(p)
        p.dataReceived(F.encode(F.Bye(F.ByeCode.NORMAL, "done")) + F.encode(F.Request(self.cid, 0, (0,))))
        self.assertTrue(transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(frames(transport), [])  # nothing after the BYE is served

    def test_connection_lost_before_hello(self) -> None:
        listener = Listener()
        p = self.proto(listener=listener)
        self.on_string(p, greet=False)
        p.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(len(self.ready_failures), 1)
        self.assertIn("before HELLO", str(self.ready_failures[0].value))
        self.assertEqual(listener.lost, ["gone"])
        self.assertEqual(self.clock.getDelayedCalls(), [])


def _future_hello(msg: F.Message) -> F.Message:
    if isinstance(msg, F.Hello):
        return F.Hello(node_id=msg.node_id, min_version=2, max_version=3)
    return msg


class ServingTests(_Base):
    def connected(self) -> tuple[PeerProtocol, PeerProtocol, Listener, IOPump]:
        listener = Listener(self.roots)
        server = self.proto("server", store=self.store)
        client = self.proto("client", listener=listener)
        pump = self.pair(server, client)
        return server, client, listener, pump

    def test_request_gets_hashes_then_data(self) -> None:
        _, client, listener, pump = self.connected()
        client.request(self.cid, 0, (0, 1, 2, 3))
        client.request(self.cid, 2, (0,))
        pump.flush()
        self.assertEqual(
            listener.events[1:],
            [
                ("hashes", 0),
                ("data", 0, 0),
                ("data", 0, 1),
                ("data", 0, 2),
                ("data", 0, 3),
                ("hashes", 2),
                ("data", 2, 0),
            ],
        )
        self.assertEqual(listener.errors, [])
        self.assertEqual(listener.data[(2, 0)], self.store.data[2 * 4 * SUB :])
        self.assertEqual(len(listener.data[(2, 0)]), 300)
        self.assertEqual(b"".join(listener.data[(0, s)] for s in range(4)), self.store.data[: 4 * SUB])

    def test_hashes_sent_once_per_block(self) -> None:
        _, client, listener, pump = self.connected()
        client.request(self.cid, 1, (3,))
        pump.flush()
        client.request(self.cid, 1, (0, 2))
        pump.flush()
        self.assertEqual(listener.events[1:], [("hashes", 1), ("data", 1, 3), ("data", 1, 0), ("data", 1, 2)])
        self.assertEqual(listener.errors, [])

    def test_not_held(self) -> None:
        self.store.held = {0}
        _, client, listener, pump = self.connected()
        client.request(self.cid, 1, (0, 2))
        client.request(b"\x07" * 32, 0, (0,))
        client.request(self.cid, 0, (1, 9))
        pump.flush()
        self.assertEqual(
            [(r.content_id, r.block, r.sub, r.code) for r in listener.rejects],
            [
                (self.cid, 1, 0, F.RejectCode.NOT_HELD),
                (self.cid, 1, 2, F.RejectCode.NOT_HELD),
                (b"\x07" * 32, 0, 0, F.RejectCode.NOT_HELD),
                (self.cid, 0, 9, F.RejectCode.NOT_HELD),
            ],
        )
        self.assertEqual(list(listener.data), [(0, 1)])
        self.assertEqual(self.store.reads, [(0, 1)])

    def test_no_store_rejects_whole_request(self) -> None:
        p = self.proto()
        transport = self.on_string(p)
        p.dataReceived(F.encode(F.Request(self.cid, 0, (0, 1))))
        [reject] = frames(transport)
        self.assertEqual(reject, F.Reject(self.cid, 0, F.WHOLE_REQUEST, F.RejectCode.NOT_HELD, "not serving"))

    def test_too_many_requests_busy(self) -> None:
        p = self.proto(store=self.store)
        transport = self.on_string(p)
        # 4096 is the cap; each request names 1024 sub blocks (held or not).
        subs = tuple(range(4)) * 256
        for _ in range(4):
            p.dataReceived(F.encode(F.Request(self.cid, 0, subs)))
        p.dataReceived(F.encode(F.Request(self.cid, 1, (0,))))
        [reject] = frames(transport)
        self.assertEqual(
            reject, F.Reject(self.cid, 1, F.WHOLE_REQUEST, F.RejectCode.BUSY, "too many requests")
        )

    def test_cancel_removes_queued(self) -> None:
        p = self.proto(store=self.store)
        transport = self.on_string(p)
        p.dataReceived(F.encode(F.Request(self.cid, 0, (0, 1, 2, 3))))
        p.dataReceived(F.encode(F.Cancel(self.cid, 0, (1, 2))))
        self.clock.advance(0)
        sent = frames(transport)
        self.assertEqual([type(m) for m in sent], [F.Hashes, F.Data, F.Data])
        self.assertEqual([(m.block, m.sub) for m in sent if isinstance(m, F.Data)], [(0, 0), (0, 3)])
        self.assertEqual(self.store.reads, [(0, 0), (0, 3)])

    def test_cancel_of_other_content_keeps_queue(self) -> None:
        p = self.proto(store=self.store)
        transport = self.on_string(p)
        p.dataReceived(F.encode(F.Request(self.cid, 0, (0, 1))))
        p.dataReceived(F.encode(F.Cancel(b"\x01" * 32, 0, (0, 1))) + F.encode(F.Cancel(self.cid, 1, (0,))))
        self.clock.advance(0)
        self.assertEqual(len([m for m in frames(transport) if isinstance(m, F.Data)]), 2)

    def test_data_frames_match_codec(self) -> None:
        p = self.proto(store=self.store)
        transport = self.on_string(p)
        p.dataReceived(F.encode(F.Request(self.cid, 2, (0,))))
        self.clock.advance(0)
        raw = transport.value()
        expected = F.encode(F.Hashes(self.cid, 2, tuple(self.store.all_leaves(2)))) + F.encode(
            F.Data(self.cid, 2, 0, self.store.sub(2, 0))
        )
        self.assertEqual(raw, expected)
        self.assertEqual(p.bytes_sent, len(F.encode(F.Hello(node_id="me"))) + len(expected))

    def test_oversized_frame(self) -> None:
        p = self.proto(store=self.store, max_frame=1000)
        transport = self.on_string(p)
        p.dataReceived(struct.pack(">IB", 1001, F.Data.TYPE) + b"x" * 10)
        [bye] = frames(transport)
        assert isinstance(bye, F.Bye)
        self.assertEqual(bye.code, F.ByeCode.PROTOCOL_ERROR)
        self.assertIn("exceeds the cap", bye.reason)
        self.assertTrue(transport.disconnecting)
        # More garbage after that: no crash, no second BYE.
        p.dataReceived(b"\xff" * 5000)
        self.assertEqual(frames(transport), [])

    def test_data_on_serving_connection_is_protocol_error(self) -> None:
        p = self.proto(store=self.store)
        transport = self.on_string(p)
        p.dataReceived(F.encode(F.State({"load": 1})) + F.encode(F.Have(self.cid, ((0, 3),))))
        self.assertEqual(frames(transport), [])
        p.dataReceived(F.encode(F.Data(self.cid, 0, 0, b"x")))
        [bye] = frames(transport)
        self.assertEqual(bye, F.Bye(F.ByeCode.PROTOCOL_ERROR, "unexpected Data on a serving connection"))

    def test_state_reaches_listener(self) -> None:
        listener = Listener()
        p = self.proto(listener=listener)
        self.on_string(p)
        p.dataReceived(F.encode(F.State({"upload_bps": 5})))
        self.assertEqual(listener.states, [{"upload_bps": 5}])

    def test_queue_dropped_on_connection_lost(self) -> None:
        p = self.proto(store=self.store)
        transport = self.on_string(p)
        p.dataReceived(F.encode(F.Request(self.cid, 0, (0, 1))))
        p.connectionLost(Failure(ConnectionError("reset")))
        self.clock.advance(1)
        self.assertEqual(frames(transport), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PausingTransport(StringTransport):
    """A transport whose buffer is 'full' after every sub block it is handed."""

    def writeSequence(self, data: Any) -> None:
        super().writeSequence(data)
        assert self.producer is not None
        self.producer.pauseProducing()


class ProducerTests(_Base):
    def test_pause_before_pump(self) -> None:
        p = self.proto(store=self.store)
        transport = self.on_string(p)
        self.assertIs(transport.producer, p)
        self.assertTrue(transport.streaming)
        p.dataReceived(F.encode(F.Request(self.cid, 0, (0, 1, 2))))
        p.pauseProducing()
        self.clock.advance(5)
        self.assertEqual(frames(transport), [])
        p.resumeProducing()
        self.clock.advance(0)
        self.assertEqual(len([m for m in frames(transport) if isinstance(m, F.Data)]), 3)

    def test_pause_mid_stream(self) -> None:
        p = self.proto(store=self.store)
        transport = PausingTransport()
        p.makeConnection(transport)
        p.dataReceived(F.encode(F.Hello(node_id="peer")) + F.encode(F.Request(self.cid, 0, (0, 1, 2, 3))))
        transport.clear()
        got: list[int] = []
        for _ in range(4):
            self.clock.advance(1)
            data = [m for m in frames(transport) if isinstance(m, F.Data)]
            self.assertEqual(len(data), 1)
            self.clock.advance(1)
            self.assertEqual(frames(transport), [], "sent while paused")
            got.append(data[0].sub)
            p.resumeProducing()
        self.assertEqual(got, [0, 1, 2, 3])
        self.clock.advance(1)
        self.assertEqual(frames(transport), [])

    def test_stop_producing_clears_queue(self) -> None:
        p = self.proto(store=self.store)
        transport = self.on_string(p)
        p.dataReceived(F.encode(F.Request(self.cid, 0, (0, 1, 2))))
        p.stopProducing()
        self.clock.advance(1)
        self.assertEqual(frames(transport), [])


class TokenBucketTests(_Base):
    def test_bucket_arithmetic(self) -> None:
        bucket = TokenBucket(1000, self.clock, burst=500)
        self.assertEqual(bucket.delay(), 0.0)
        bucket.spend(1500)
        self.assertAlmostEqual(bucket.delay(), 1.0)
        self.clock.advance(0.25)
        self.assertAlmostEqual(bucket.delay(), 0.75)
        self.clock.advance(0.75)
        self.assertAlmostEqual(bucket.delay(), 0.0)
        self.clock.advance(60)  # refills only up to the burst
        bucket.spend(500)
        self.assertEqual(bucket.delay(), 0.0)
        bucket.spend(100)
        self.assertAlmostEqual(bucket.delay(), 0.1)

    def test_default_burst(self) -> None:
        self.assertEqual(TokenBucket(100, self.clock).burst, 64 * 1024)
        self.assertEqual(TokenBucket(10_000_000, self.clock).burst, 1_000_000)

    def test_bad_rate(self) -> None:
        self.assertRaises(ValueError, TokenBucket, 0, self.clock)
        self.assertRaises(ValueError, TokenBucket, -5, self.clock)

    def serve_limited(
        self, rate: float, burst: float, connections: int, seconds: float
    ) -> list[tuple[float, int]]:
        """Serve many sub blocks over C{connections} sharing one bucket; sample total DATA bytes."""
        bucket = TokenBucket(rate, self.clock, burst=burst)
        big = MemoryStore(make_content(64 * SUB), Geometry(64 * SUB, 4 * SUB, SUB))
        transports = []
        for _ in range(connections):
            p = self.proto(store=big, limiter=bucket)
            t = self.on_string(p)
            for block in range(16):
                p.dataReceived(F.encode(F.Request(big.cid, block, (0, 1, 2, 3))))
            transports.append(t)
        total = 0
        samples = []
        step = 1 / 64  # binary fractions keep the clock arithmetic exact
        for i in range(1, int(seconds / step) + 1):
            self.clock.advance(step)
            for t in transports:
                total += sum(len(m.data) for m in frames(t) if isinstance(m, F.Data))
            samples.append((i * step, total))
        return samples

    def test_limited_server_rate(self) -> None:
        rate = 8 * SUB
        for t, sent in self.serve_limited(rate, burst=0, connections=1, seconds=3.0):
            self.assertLessEqual(abs(sent - rate * t), SUB, t)

    def test_limit_shared_by_connections(self) -> None:
        rate = 8 * SUB
        for t, sent in self.serve_limited(rate, burst=0, connections=3, seconds=2.0):
            self.assertLessEqual(abs(sent - rate * t), SUB, t)

    def test_burst_then_rate(self) -> None:
        rate = 8 * SUB
        samples = self.serve_limited(rate, burst=8 * SUB, connections=1, seconds=2.0)
        _, first = samples[0]
        self.assertGreaterEqual(first, 8 * SUB)
        for t, sent in samples:
            self.assertLessEqual(sent, 8 * SUB + rate * t + SUB)
            self.assertGreaterEqual(sent, 8 * SUB + rate * t - SUB)


class FactoryTests(_Base):
    def connect(self, factory: PeerFactory) -> tuple[PeerProtocol, StringTransport]:
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_max_peers(self) -> None:
        factory = PeerFactory("node", self.clock, self.store, max_peers=2)
        (p1, t1), (p2, t2) = self.connect(factory), self.connect(factory)
        self.assertEqual(frames(t1), [F.Hello(node_id="node")])
        self.assertEqual(frames(t2), [F.Hello(node_id="node")])
        p3, t3 = self.connect(factory)
        [bye] = frames(t3)
        assert isinstance(bye, F.Bye)
        self.assertEqual(bye.code, F.ByeCode.BUSY)
        self.assertTrue(t3.disconnecting)
        self.assertEqual(factory.connections, {p1, p2})
        p3.connectionLost(Failure(ConnectionError()))
        self.assertEqual(factory.connections, {p1, p2})
        # A slot frees up: the next connection is served.
        p1.connectionLost(Failure(ConnectionError()))
        p4, t4 = self.connect(factory)
        self.assertEqual(frames(t4), [F.Hello(node_id="node")])
        self.assertEqual(factory.connections, {p2, p4})

    def test_factory_passes_settings(self) -> None:
        bucket = TokenBucket(1000, self.clock)

        def check(node_id: str, ticket: bytes) -> None:
            pass

        factory = PeerFactory(
            "node", self.clock, self.store, limiter=bucket, ticket_checker=check, max_frame=999
        )
        proto, _ = self.connect(factory)
        self.assertIs(proto.store, self.store)
        self.assertIs(proto.limiter, bucket)
        self.assertIs(proto.ticket_checker, check)
        self.assertEqual(proto.decoder.max_frame, 999)

    def test_close_all(self) -> None:
        factory = PeerFactory("node", self.clock, self.store)
        conns = [self.connect(factory) for _ in range(3)]
        for _, t in conns:
            t.clear()
        factory.close_all()
        for _, t in conns:
            self.assertEqual(frames(t), [F.Bye(F.ByeCode.SHUTTING_DOWN, "node stopping")])
            self.assertTrue(t.disconnecting)

    def test_bytes_sent_includes_closed_connections(self) -> None:
        factory = PeerFactory("node", self.clock, self.store)
        (p1, t1), (p2, t2) = self.connect(factory), self.connect(factory)
        for p in (p1, p2):
            p.dataReceived(F.encode(F.Hello(node_id="peer")) + F.encode(F.Request(self.cid, 0, (0, 1))))
        self.clock.advance(0)
        total = len(t1.value()) + len(t2.value())
        self.assertEqual(factory.bytes_sent, total)
        self.assertGreater(total, 4 * SUB)
        p1.connectionLost(Failure(ConnectionError()))
        self.assertEqual(factory.connections, {p2})
        self.assertEqual(factory.bytes_sent, total)
        p1.connectionLost(Failure(ConnectionError()))  # a second report counts nothing twice
        self.assertEqual(factory.bytes_sent, total)

    def test_factory_serves_over_iosim(self) -> None:
        factory = PeerFactory("node", self.clock, self.store)
        listener = Listener(self.roots)
        client = self.proto("client", listener=listener)
        pump = self.pair(factory.buildProtocol(None), client)
        client.request(self.cid, 1, (0, 1, 2, 3))
        pump.flush()
        self.assertEqual(sorted(listener.data), [(1, s) for s in range(4)])
        self.assertEqual(listener.errors, [])


@implementer(IContentStore)
class TwoContents:
    """Two L{MemoryStore}s behind one store interface."""

    def __init__(self, *stores: MemoryStore) -> None:
        self.stores = {s.cid_hex: s for s in stores}

    def has(self, content_id: str, block: int, sub: int) -> bool:
        s = self.stores.get(content_id)
        return s is not None and s.has(content_id, block, sub)

    def read(self, content_id: str, block: int, sub: int) -> bytes:
        return self.stores[content_id].read(content_id, block, sub)

    def leaves(self, content_id: str, block: int) -> list[bytes] | None:
        s = self.stores.get(content_id)
        return None if s is None else s.leaves(content_id, block)


class TicketTests(_Base):
    """
    A serving factory that checks real tickets (L{tickets.checker} with the
    tracker's key on the test clock), as an agent's does.
    """

    def setUp(self) -> None:
        super().setUp()
        self.tracker_key = Ed25519PrivateKey.generate()
        self.other = MemoryStore(make_content(GEOMETRY.size)[::-1], GEOMETRY)
        self.factory = PeerFactory(
            "server",
            self.clock,
            TwoContents(self.store, self.other),
            ticket_checker=tickets.checker(self.tracker_key.public_key(), self.clock.seconds),
        )

    def ticket(
        self,
        node: str = "client",
        content: bytes | None = None,
        lifetime: int = 300,
        key: Ed25519PrivateKey | None = None,
    ) -> bytes:
        t = tickets.Ticket(
            user="alice",
            node=node,
            content=(content or self.cid).hex(),
            expires=int(self.clock.seconds()) + lifetime,
        )
        return tickets.issue(key or self.tracker_key, t)

    def dial(self, ticket: bytes) -> tuple[PeerProtocol, PeerProtocol, Listener, IOPump]:
        listener = Listener(self.roots)
        server = self.factory.buildProtocol(None)
        client = self.proto("client", listener=listener, ticket=ticket)
        pump = self.pair(server, client)
        return server, client, listener, pump

    def assert_refused(self, ticket: bytes, reason: str) -> None:
        """The server answers a HELLO carrying C{ticket} with BYE UNAUTHORIZED saying C{reason}."""
        server = self.factory.buildProtocol(None)
        transport = StringTransport()
        server.makeConnection(transport)
        self.assertEqual(frames(transport), [])  # no HELLO before the peer's passed
        server.dataReceived(F.encode(F.Hello(node_id="client", ticket=ticket)))
        [bye] = frames(transport)
        assert isinstance(bye, F.Bye)
        self.assertEqual(bye.code, F.ByeCode.UNAUTHORIZED)
        self.assertIn(reason, bye.reason)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(server.version)
        # Frames the refused peer sends after its HELLO are not served.
        server.dataReceived(F.encode(F.Request(self.cid, 0, (0,))))
        self.clock.advance(1)
        self.assertEqual((frames(transport), self.store.reads), ([], []))

    def test_good_ticket_downloads(self) -> None:
        server, client, listener, pump = self.dial(self.ticket())
        self.assertEqual((server.version, server.peer_id, server.scope), (1, "client", self.cid))
        self.assertEqual((client.version, client.peer_id), (1, "server"))
        client.request(self.cid, 1, (0, 1, 2, 3))
        pump.flush()
        self.assertEqual(sorted(listener.data), [(1, s) for s in range(4)])
        self.assertEqual((listener.errors, listener.rejects), ([], []))

    def test_no_ticket(self) -> None:
        self.assert_refused(b"", "no ticket")

    def test_no_ticket_over_iosim(self) -> None:
        """The dialer hears the refusal: no HELLO for it, its connection is gone."""
        server, client, listener, _pump = self.dial(b"")
        self.assertEqual((server.version, client.version), (None, None))
        self.assertEqual((listener.ready, len(listener.lost)), (0, 1))
        self.assertEqual(len(self.ready_failures), 1)
        self.ready_failures[0].trap(ConnectionError)
        self.assertEqual(self.factory.connections, set())

    def test_forged_ticket(self) -> None:
        """Signed by a key that is not the tracker's."""
        self.assert_refused(self.ticket(key=Ed25519PrivateKey.generate()), "not signed by the tracker")

    def test_tampered_ticket(self) -> None:
        """The tracker's signature of one ticket under the payload of another."""
        genuine = self.ticket(content=self.other.cid)
        mine = self.ticket(lifetime=10**6)
        tampered = mine.rsplit(b".", 1)[0] + b"." + genuine.rsplit(b".", 1)[1]
        self.assert_refused(tampered, "not signed by the tracker")

    def test_expired_ticket(self) -> None:
        ticket = self.ticket(lifetime=300)
        self.clock.advance(300 + tickets.CLOCK_SKEW + 1)
        self.assert_refused(ticket, "the ticket expired")

    def test_ticket_of_another_node(self) -> None:
        self.assert_refused(self.ticket(node="someone-else"), "issued to node someone-else, not client")

    def test_malformed_ticket(self) -> None:
        self.assert_refused(b"mt1.x.y", "base64url")
        self.assert_refused(b"\xff" * 5000, "longer than")

    def test_wrong_content(self) -> None:
        """A ticket for one content gets nothing of another the server holds."""
        server, client, listener, pump = self.dial(self.ticket(content=self.other.cid))
        self.assertEqual(server.version, 1)
        client.request(self.cid, 0, (0, 1))
        pump.flush()
        self.assertEqual(
            listener.rejects,
            [
                F.Reject(
                    self.cid,
                    0,
                    F.WHOLE_REQUEST,
                    F.RejectCode.UNAUTHORIZED,
                    "the ticket is for another content",
                )
            ],
        )
        self.assertEqual((self.store.reads, listener.data), ([], {}))
        # The ticket's own content is served on the same connection.
        client.request(self.other.cid, 0, (0,))
        pump.flush()
        self.assertEqual(self.other.reads, [(0, 0)])

    def test_ticket_checked_at_hello_only(self) -> None:
        """A connection made with a valid ticket outlives the ticket."""
        _server, client, listener, pump = self.dial(self.ticket(lifetime=10))
        self.clock.advance(3600)
        client.request(self.cid, 0, (0,))
        pump.flush()
        self.assertEqual(sorted(listener.data), [(0, 0)])

    def test_dialer_scope(self) -> None:
        """A dialing agent's connection serves only the content it dialed for."""
        p = self.proto("dialer", store=TwoContents(self.store, self.other), scope=self.other.cid)
        transport = self.on_string(p)
        p.dataReceived(F.encode(F.Request(self.cid, 0, (0,))))
        [reject] = frames(transport)
        assert isinstance(reject, F.Reject)
        self.assertEqual(reject.code, F.RejectCode.UNAUTHORIZED)
        p.dataReceived(F.encode(F.Request(self.other.cid, 0, (0,))))
        self.clock.advance(0)
        self.assertEqual([type(m) for m in frames(transport)], [F.Hashes, F.Data])


class PingTests(_Base):
    def test_rtt_from_clock(self) -> None:
        listener = Listener()
        p = self.proto(listener=listener)
        transport = self.on_string(p)
        p.ping()
        [ping] = frames(transport)
        assert isinstance(ping, F.Ping)
        self.clock.advance(0.25)
        p.dataReceived(F.encode(F.Pong(ping.nonce + 1)))  # not ours: ignored
        self.assertEqual(listener.rtts, [])
        p.dataReceived(F.encode(F.Pong(ping.nonce)))
        self.assertEqual(listener.rtts, [0.25])
        p.dataReceived(F.encode(F.Pong(ping.nonce)))  # answered once only
        self.assertEqual(listener.rtts, [0.25])

    def test_ping_answered(self) -> None:
        p = self.proto(store=self.store)
        transport = self.on_string(p)
        p.dataReceived(F.encode(F.Ping(0xDEADBEEF)))
        self.assertEqual(frames(transport), [F.Pong(0xDEADBEEF)])

    def test_ping_over_iosim(self) -> None:
        listener = Listener()
        server = self.proto("server", store=self.store)
        client = self.proto("client", listener=listener)
        pump = self.pair(server, client)
        client.ping()
        client.ping()
        pump.flush()
        self.assertEqual(listener.rtts, [0.0, 0.0])

    def test_outstanding_pings_bounded(self) -> None:
        listener = Listener()
        p = self.proto(listener=listener)
        transport = self.on_string(p)
        for _ in range(20):
            p.ping()
        pings = frames(transport)
        self.assertEqual(len(pings), 20)
        self.clock.advance(1)
        for ping in pings:
            assert isinstance(ping, F.Ping)
            p.dataReceived(F.encode(F.Pong(ping.nonce)))
        self.assertEqual(listener.rtts, [1.0] * 16)  # the 4 oldest were forgotten
