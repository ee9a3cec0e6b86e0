"""
Whole blocks checked and written by helper processes over a shared arena:
the helper's command handling in-process, then real helper processes.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.trial import unittest

from meshstream import verifier as V
from meshstream import verifyworker as W
from meshstream.agent.store import StoreError
from meshstream.errors import CheckDeclined

reactor: Any = _reactor
SLOT, SUB = 64 * 1024, 16 * 1024


def root_of(data: bytes, sub: int = SUB) -> tuple[bytes, list[bytes]]:
    leaves = [hashlib.sha256(data[i : i + sub]).digest() for i in range(0, len(data), sub)]
    return hashlib.sha256(b"".join(leaves)).digest(), leaves


class CommandTests(unittest.SynchronousTestCase):
    """The helper's work on one command, run in this process."""

    def setUp(self) -> None:
        self.arena = memoryview(bytearray(3 * SLOT))
        path = self.mktemp()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, self.fd)

    def run_command(
        self, slot: int, length: int, offset: int, root: bytes, sub: int = SUB
    ) -> tuple[int, bytes]:
        answer = W.check_and_write(
            self.arena, SLOT, W.COMMAND.pack(slot, length, offset, sub, root), output_fd=self.fd
        )
        status, n = W.ANSWER.unpack_from(answer)
        self.assertEqual(len(answer), W.ANSWER.size + n)
        return status, answer[W.ANSWER.size :]

    def test_match_is_written(self) -> None:
        data = os.urandom(SLOT - 100)  # a short last block: a short last sub block
        self.arena[SLOT : 2 * SLOT - 100] = data
        root, leaves = root_of(data)
        status, payload = self.run_command(1, len(data), 12345, root)
        self.assertEqual(status, W.WRITTEN)
        self.assertEqual(payload, b"".join(leaves))
        self.assertEqual(os.pread(self.fd, len(data), 12345), data)

    def test_mismatch_is_not_written(self) -> None:
        data = os.urandom(SLOT)
        self.arena[:SLOT] = data
        root, _ = root_of(data)
        self.arena[5] ^= 1
        self.assertEqual(self.run_command(0, SLOT, 0, root), (W.NO_MATCH, b""))
        self.assertEqual(os.fstat(self.fd).st_size, 0)

    def test_bad_commands(self) -> None:
        for slot, length, sub in [(3, SLOT, SUB), (0, SLOT + 1, SUB), (0, 0, SUB), (0, SLOT, 0)]:
            status, payload = self.run_command(slot, length, 0, b"\0" * 32, sub)
            self.assertEqual(status, W.WRITE_FAILED)
            self.assertIn(b"bad command", payload)

    def test_write_failure(self) -> None:
        data = os.urandom(SLOT)
        self.arena[:SLOT] = data
        root, _ = root_of(data)
        ro = os.open(self.mktemp(), os.O_RDONLY | os.O_CREAT, 0o600)
        self.addCleanup(os.close, ro)
        answer = W.check_and_write(self.arena, SLOT, W.COMMAND.pack(0, SLOT, 0, SUB, root), output_fd=ro)
        self.assertEqual(answer[0], W.WRITE_FAILED)
        self.assertIn(b"Bad file descriptor", answer[W.ANSWER.size :])

    def test_read_exactly(self) -> None:
        r, w = os.pipe()
        os.write(w, b"abc")
        os.write(w, b"def")
        os.close(w)
        self.assertEqual(W.read_exactly(r, 5), b"abcde")
        self.assertIsNone(W.read_exactly(r, 5))
        os.close(r)


class ArenaBuffersTests(unittest.SynchronousTestCase):
    def test_slots(self) -> None:
        arena = memoryview(bytearray(2 * SLOT))
        pool = V.ArenaBuffers(arena, SLOT, 2)
        a, b = pool.take(SLOT), pool.take(SLOT)
        self.assertEqual({pool.slot(a), pool.slot(b)}, {0, 1})
        self.assertEqual(pool.free_slots, 0)
        c = pool.take(SLOT)  # no slot left: an ordinary buffer
        self.assertIsInstance(c, bytearray)
        self.assertIsNone(pool.slot(c))
        self.assertIsNone(pool.slot(memoryview(a)))  # only the very object handed out
        a[:3] = b"xyz"
        self.assertEqual(bytes(arena[pool.slot(a) * SLOT :][:3]), b"xyz")  # type: ignore[operator]
        pool.give(a)
        self.assertEqual(pool.free_slots, 1)
        pool.give(a)  # twice: still one slot
        self.assertEqual(pool.free_slots, 1)
        self.assertIsNone(pool.slot(a))
        self.assertIsInstance(pool.take(100), bytearray)  # other sizes: ordinary buffers


class BlockVerifierTests(unittest.TestCase):
    """Real helper processes, spawned by the reactor."""

    timeout = 30

    def setUp(self) -> None:
        if not V.available():
            raise unittest.SkipTest("helper processes need os.memfd_create")
        self.path = os.path.abspath(self.mktemp())
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, self.fd)
        self.verifier = V.BlockVerifier(reactor, self.fd, SLOT, 4, processes=2)
        self.addCleanup(self.verifier.stop)

    def test_blocks_checked_and_written(self) -> Deferred[None]:
        return ensureDeferred(self._blocks())

    async def _blocks(self) -> None:
        blocks = [os.urandom(SLOT) for _ in range(8)]
        expected = []
        for round_ in range(2):  # slots are reused
            ds = []
            bufs = []
            for i in range(4):
                b = round_ * 4 + i
                buf = self.verifier.buffers.take(SLOT)
                buf[:] = blocks[b]
                root, leaves = root_of(blocks[b])
                if b == 5:
                    buf[100] ^= 1  # a liar's block
                    leaves = None
                d = self.verifier.check(buf, b * SLOT, SUB, root)
                assert d is not None
                ds.append(d)
                bufs.append(buf)
                expected.append(leaves)
            got = await gatherResults(ds)
            for buf in bufs:
                self.verifier.buffers.give(buf)
            self.assertEqual(got, expected[-4:])
        with open(self.path, "rb") as f:
            written = f.read()
        for b in range(8):
            want = b"\0" * SLOT if b == 5 else blocks[b]
            self.assertEqual(written[b * SLOT : (b + 1) * SLOT], want, b)

    def test_not_in_the_arena(self) -> None:
        self.assertIsNone(self.verifier.check(bytearray(SLOT), 0, SUB, b"\0" * 32))
        self.assertIsNone(self.verifier.check(memoryview(bytearray(SLOT)), 0, SUB, b"\0" * 32))

    def test_write_error(self) -> Deferred[None]:
        return ensureDeferred(self._write_error())

    async def _write_error(self) -> None:
        ro = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, ro)
        verifier = V.BlockVerifier(reactor, ro, SLOT, 1, processes=1)
        self.addCleanup(verifier.stop)
        buf = verifier.buffers.take(SLOT)
        data = os.urandom(SLOT)
        buf[:] = data
        d = verifier.check(buf, 0, SUB, root_of(data)[0])
        assert d is not None
        with self.assertRaises(StoreError):
            await d

    def test_helper_dies(self) -> Deferred[None]:
        return ensureDeferred(self._dies())

    async def _dies(self) -> None:
        verifier = V.BlockVerifier(reactor, self.fd, SLOT, 2, processes=1)
        worker = verifier._workers[0]
        buf = verifier.buffers.take(SLOT)
        d = verifier.check(buf, 0, SUB, b"\0" * 32)
        assert d is not None and worker.transport is not None
        worker.transport.signalProcess("KILL")
        with self.assertRaises(CheckDeclined) as cm:
            await d
        self.assertIn("verifier process ended", str(cm.exception))
        await worker.ended
        # No helper left: the caller checks blocks itself.
        self.assertIsNone(verifier.check(verifier.buffers.take(SLOT), 0, SUB, b"\0" * 32))
        await verifier.stop()
