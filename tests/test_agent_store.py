"""
Tests for L{meshstream.agent.store} (scrambler, cache, seeds, the agent's
content store) and the small helpers of L{meshstream.agent.session}
(L{BlackList}, L{hint_rate}).
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import threading

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from meshstream.agent.session import BlackList, hint_rate
from meshstream.agent.store import (
    AgentStore,
    CacheEntry,
    IOCounter,
    Scrambler,
    SeedFile,
    StoreError,
    check_sub,
    load_or_create_key,
    verify_seed,
)
from meshstream.interfaces import IContentStore
from meshstream.manifest import Manifest, ManifestError, build_manifest

BLOCK = 4096
SUB = 1024
KEY = bytes(range(32))
CID = "ab" * 32


def make_content(size: int, seed: int = 0) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d/%d" % (seed, i)).digest()
        i += 1
    return bytes(out[:size])


class ScramblerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.s = Scrambler(KEY)
        self.plain = make_content(5000)

    def test_key_size(self) -> None:
        self.assertRaises(ValueError, Scrambler, b"short")
        self.assertRaises(ValueError, Scrambler, KEY + b"x")

    def test_apply_twice_is_identity(self) -> None:
        for offset in (0, 5, 16, 1000, 1 << 33):
            scrambled = self.s.apply(CID, offset, self.plain)
            self.assertNotEqual(scrambled, self.plain)
            self.assertEqual(len(scrambled), len(self.plain))
            self.assertEqual(self.s.apply(CID, offset, scrambled), self.plain)

    def test_documented_counter_layout(self) -> None:
        # AES-256-CTR, counter block = H(cid)[:8] || offset / 16.
        counter = hashlib.sha256(CID.encode()).digest()[:8] + (100).to_bytes(8, "big")
        enc = Cipher(algorithms.AES(KEY), modes.CTR(counter)).encryptor()
        self.assertEqual(self.s.apply(CID, 1600, self.plain), enc.update(self.plain))

    @settings(max_examples=100)
    @given(st.integers(0, 4999), st.integers(0, 300))
    def test_property_unaligned_matches_full_buffer(self, offset: int, length: int) -> None:
        full = self.s.apply(CID, 0, self.plain)
        piece = self.plain[offset : offset + length]
        self.assertEqual(self.s.apply(CID, offset, piece), full[offset : offset + len(piece)])

    def test_depends_on_key_and_content(self) -> None:
        a = self.s.apply(CID, 0, self.plain)
        self.assertNotEqual(a, self.s.apply("cd" * 32, 0, self.plain))
        self.assertNotEqual(a, Scrambler(bytes(32)).apply(CID, 0, self.plain))
        self.assertNotEqual(a[:100], self.s.apply(CID, 16, self.plain)[:100])


class _StoreBase(SynchronousTestCase):
    size = 3 * BLOCK + SUB + 300  # blocks 0-2 full, block 3 has two sub blocks

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.plain = make_content(self.size)
        self.path = os.path.join(self.dir, "content.bin")
        with open(self.path, "wb") as f:
            f.write(self.plain)
        self.manifest, self.leaves = build_manifest(self.path, block_size=BLOCK, sub_block_size=SUB)
        self.g = self.manifest.geometry
        self.scrambler = Scrambler(KEY)
        self.cache_dir = os.path.join(self.dir, "cache")
        os.makedirs(self.cache_dir)

    def sub(self, block: int, sub: int) -> bytes:
        off = self.g.sub_offset(block, sub)
        return self.plain[off : off + self.g.sub_length(block, sub)]

    def entry(self) -> CacheEntry:
        e = CacheEntry(self.cache_dir, self.manifest, self.scrambler)
        self.addCleanup(self._close, e)
        return e

    @staticmethod
    def _close(e: CacheEntry) -> None:
        if not e._idx.closed:
            e.close()

    def write_block(self, e: CacheEntry, block: int, subs: list[int] | None = None) -> list[bool]:
        subs = list(range(self.g.subs_in_block(block))) if subs is None else subs
        return [e.write(block, s, self.sub(block, s), self.leaves[block]) for s in subs]


class CacheEntryTests(_StoreBase):
    def test_write_and_read(self) -> None:
        e = self.entry()
        self.assertEqual(self.write_block(e, 1, [3, 0, 2]), [False, False, False])
        self.assertTrue(e.has_sub(1, 0))
        self.assertFalse(e.has_sub(1, 1))
        self.assertFalse(e.has_block(1))
        self.assertEqual(self.write_block(e, 1, [1]), [True])
        self.assertTrue(e.has_block(1))
        self.assertEqual(e.leaves[1], self.leaves[1])
        self.assertEqual(e.read(1, 2), self.sub(1, 2))
        self.assertEqual(e.read_range(BLOCK, BLOCK), self.plain[BLOCK : 2 * BLOCK])
        self.assertEqual(e.read_range(BLOCK + 7, 1000), self.plain[BLOCK + 7 : BLOCK + 1007])
        self.assertEqual(sorted(e.held_subs()), [(1, s) for s in range(4)])

    def test_short_tail_block(self) -> None:
        e = self.entry()
        self.assertEqual(self.write_block(e, 3), [False, True])
        self.assertEqual(e.read(3, 1), self.plain[-300:])
        self.assertEqual(e.read_range(3 * BLOCK, SUB + 300), self.plain[3 * BLOCK :])
        self.assertRaises(StoreError, e.read_range, 3 * BLOCK, SUB + 301)

    def test_data_file_is_scrambled(self) -> None:
        e = self.entry()
        for b in range(self.g.num_blocks):
            self.write_block(e, b)
        self.assertTrue(e.complete)
        with open(e.data_path, "rb") as f:
            on_disk = f.read()
        self.assertEqual(len(on_disk), self.size)
        self.assertNotEqual(on_disk, self.plain)
        for off in range(0, self.size - 32, 512):
            self.assertNotIn(self.plain[off : off + 32], on_disk)
        self.assertEqual(e.read_range(0, self.size), self.plain)
        self.assertEqual(stat.S_IMODE(os.stat(e.data_path).st_mode), 0o600)

    def test_manifest_written(self) -> None:
        e = self.entry()
        with open(os.path.join(self.cache_dir, e.cid + ".manifest.json"), "rb") as f:
            self.assertEqual(Manifest.from_json(f.read()), self.manifest)

    def test_index_survives_reopen(self) -> None:
        e = self.entry()
        self.write_block(e, 0)
        self.write_block(e, 2)
        self.write_block(e, 1, [0, 1, 2])  # incomplete
        e.close()
        again = self.entry()
        self.assertEqual(sorted(again.leaves), [0, 2])
        self.assertEqual(again.leaves[2], self.leaves[2])
        self.assertFalse(again.has_sub(1, 0))
        self.assertFalse(again.complete)
        self.assertEqual(again.read_range(2 * BLOCK, BLOCK), self.plain[2 * BLOCK : 3 * BLOCK])
        # Finish the download after the restart.
        self.write_block(again, 1)
        self.write_block(again, 3)
        self.assertTrue(again.complete)
        again.close()
        third = self.entry()
        self.assertTrue(third.complete)
        self.assertEqual(third.read_range(0, self.size), self.plain)

    def test_torn_tail_truncated(self) -> None:
        e = self.entry()
        self.write_block(e, 0)
        e.close()
        good = os.path.getsize(e.idx_path)
        self.assertEqual(good, 6 + 4 * 32)
        record = struct.pack(">IH", 1, 4) + b"".join(self.leaves[1])
        for torn in (record[:3], record[:6], record[:-1]):
            with self.subTest(torn=len(torn)):
                with open(e.idx_path, "ab") as f:
                    f.write(torn)
                again = self.entry()
                self.assertEqual(sorted(again.leaves), [0])
                self.assertEqual(os.path.getsize(e.idx_path), good)
                again.close()
        # A record appended after the truncation is read back intact.
        again = self.entry()
        self.write_block(again, 1)
        again.close()
        self.assertEqual(sorted(self.entry().leaves), [0, 1])

    def test_record_not_matching_root_ignored(self) -> None:
        e = self.entry()
        self.write_block(e, 0)
        e.close()
        with open(e.idx_path, "ab") as f:
            bogus = [hashlib.sha256(b"x%d" % i).digest() for i in range(4)]
            f.write(struct.pack(">IH", 1, 4) + b"".join(bogus))  # wrong leaves
            f.write(struct.pack(">IH", 2, 3) + b"".join(self.leaves[2][:3]))  # too few leaves
            f.write(struct.pack(">IH", 99, 4) + b"".join(self.leaves[2]))  # no such block
            f.write(struct.pack(">IH", 2, 4) + b"".join(self.leaves[2]))  # fine
        again = self.entry()
        self.assertEqual(sorted(again.leaves), [0, 2])
        self.assertFalse(again.has_block(1))

    def test_write_failure_marks_nothing(self) -> None:
        e = self.entry()
        self.write_block(e, 0, [0])
        good_fd = e._fd
        ro = os.open(e.data_path, os.O_RDONLY)
        e._fd = ro
        try:
            for sub in (1, 2, 3):
                with self.subTest(sub=sub):
                    self.assertRaises(StoreError, e.write, 0, sub, self.sub(0, sub), self.leaves[0])
                    self.assertFalse(e.has_sub(0, sub))
            self.assertFalse(e.has_block(0))
            self.assertTrue(e.has_sub(0, 0))
        finally:
            e._fd = good_fd
            os.close(ro)
        self.assertEqual(os.path.getsize(e.idx_path), 0)
        # The disk is back: the same writes now complete the block.
        self.assertEqual(self.write_block(e, 0, [1, 2, 3]), [False, False, True])
        self.assertEqual(e.read_range(0, BLOCK), self.plain[:BLOCK])


class SeedTests(_StoreBase):
    def test_verify_seed(self) -> None:
        self.assertEqual(verify_seed(self.path, self.manifest), self.leaves)

    def test_verify_seed_modified(self) -> None:
        with open(self.path, "r+b") as f:
            f.seek(2 * BLOCK + 100)
            f.write(b"\0")
        e = self.assertRaises(ManifestError, verify_seed, self.path, self.manifest)
        self.assertIn("block 2", str(e))

    def test_verify_seed_wrong_size(self) -> None:
        for size in (self.size - 1, self.size + 1, 0):
            with self.subTest(size=size):
                with open(self.path, "wb") as f:
                    f.write((self.plain + b"+")[:size])
                self.assertRaises(ManifestError, verify_seed, self.path, self.manifest)

    def test_seed_file_read(self) -> None:
        seed = SeedFile(self.path, self.manifest, self.leaves)
        self.addCleanup(seed.close)
        self.assertEqual(seed.read(3, 1), self.plain[-300:])
        self.assertEqual(seed.read_range(10, 20), self.plain[10:30])
        os.truncate(self.path, self.size - 10)
        self.assertRaises(StoreError, seed.read, 3, 1)


class _AgentStoreBase(_StoreBase):
    """An agent store in a scratch directory, and the content's id."""

    def setUp(self) -> None:
        super().setUp()
        self.data_dir = os.path.join(self.dir, "agent")
        self.store = AgentStore(self.data_dir, KEY)
        self.addCleanup(self.store.close)
        self.cid = self.manifest.content_id


class AgentStoreTests(_AgentStoreBase):
    def test_interface(self) -> None:
        verifyObject(IContentStore, self.store)

    def test_seed(self) -> None:
        self.store.add_seed(SeedFile(self.path, self.manifest, self.leaves))
        self.assertTrue(self.store.has(self.cid, 0, 3))
        self.assertTrue(self.store.has(self.cid, 3, 1))
        self.assertFalse(self.store.has(self.cid, 3, 2))
        self.assertFalse(self.store.has(self.cid, 4, 0))
        self.assertFalse(self.store.has(self.cid, -1, 0))
        self.assertFalse(self.store.has("00" * 32, 0, 0))
        self.assertEqual(self.store.read(self.cid, 2, 1), self.sub(2, 1))
        self.assertEqual(self.store.leaves(self.cid, 1), self.leaves[1])
        self.assertTrue(self.store.complete(self.cid))
        self.assertEqual(self.store.holdings(), [self.cid])
        self.assertEqual(self.store.manifest(self.cid), self.manifest)
        self.assertIsNone(self.store.manifest("00" * 32))

    def test_cache(self) -> None:
        e = self.store.entry(self.manifest)
        self.assertIs(self.store.entry(self.manifest), e)
        self.write_block(e, 1)
        self.write_block(e, 2, [0])
        self.assertTrue(self.store.has(self.cid, 1, 0))
        self.assertFalse(self.store.has(self.cid, 1, 4))
        self.assertFalse(self.store.has(self.cid, 2, 0))  # only whole blocks are served
        self.assertFalse(self.store.has(self.cid, 0, 0))
        self.assertEqual(self.store.read(self.cid, 1, 3), self.sub(1, 3))
        self.assertEqual(self.store.leaves(self.cid, 1), self.leaves[1])
        self.assertIsNone(self.store.leaves(self.cid, 2))
        self.assertIsNone(self.store.leaves("00" * 32, 0))
        self.assertFalse(self.store.complete(self.cid))
        self.assertEqual(self.store.holdings(), [])
        for b in (0, 2, 3):
            self.write_block(e, b)
        self.assertTrue(self.store.complete(self.cid))
        self.assertEqual(self.store.holdings(), [self.cid])

    def test_load_cache(self) -> None:
        e = self.store.entry(self.manifest)
        self.write_block(e, 0)
        reopened = AgentStore(self.data_dir, KEY)
        self.addCleanup(reopened.close)
        self.assertEqual(reopened.load_cache(), [self.cid])
        self.assertTrue(reopened.has(self.cid, 0, 2))
        self.assertEqual(reopened.read(self.cid, 0, 2), self.sub(0, 2))

    def test_load_cache_untrusted_skipped(self) -> None:
        self.store.entry(self.manifest)
        with open(os.path.join(self.store.cache_dir, "junk.manifest.json"), "wb") as f:
            f.write(b"{broken")
        reopened = AgentStore(self.data_dir, KEY)
        self.addCleanup(reopened.close)

        def distrust(m: Manifest) -> None:
            raise ManifestError("not signed")

        self.assertEqual(reopened.load_cache(distrust), [])
        self.assertEqual(reopened.cache, {})
        self.assertEqual(reopened.load_cache(), [self.cid])

    def test_wrong_box_key_reads_garbage(self) -> None:
        e = self.store.entry(self.manifest)
        self.write_block(e, 0)
        other = AgentStore(self.data_dir, bytes(32))
        self.addCleanup(other.close)
        other.load_cache()
        self.assertNotEqual(other.read(self.cid, 0, 0), self.sub(0, 0))

    def test_check_sub(self) -> None:
        self.assertTrue(check_sub(self.leaves[0], 2, self.sub(0, 2)))
        self.assertFalse(check_sub(self.leaves[0], 1, self.sub(0, 2)))
        self.assertFalse(check_sub(self.leaves[0], 4, self.sub(0, 2)))
        self.assertFalse(check_sub(self.leaves[0], -1, self.sub(0, 2)))


class KeyFileTests(SynchronousTestCase):
    def test_create_then_load(self) -> None:
        path = self.mktemp()
        key = load_or_create_key(path)
        self.assertEqual(len(key), 32)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(load_or_create_key(path), key)
        self.assertNotEqual(load_or_create_key(self.mktemp()), key)

    def test_bad_key_file(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"x" * 31)
        self.assertRaises(StoreError, load_or_create_key, path)


class BlackListTests(SynchronousTestCase):
    def test_backoff_doubles_and_expires(self) -> None:
        clock = Clock()
        bl = BlackList(clock)
        self.assertFalse(bl.barred("n"))
        self.assertEqual(bl.add("n"), 5.0)
        self.assertTrue(bl.barred("n"))
        self.assertFalse(bl.barred("other"))
        clock.advance(4.9)
        self.assertTrue(bl.barred("n"))
        clock.advance(0.2)
        self.assertFalse(bl.barred("n"))
        self.assertEqual(bl.add("n"), 10.0)
        clock.advance(9.9)
        self.assertTrue(bl.barred("n"))
        clock.advance(0.2)
        self.assertFalse(bl.barred("n"))
        self.assertEqual(bl.add("n"), 20.0)
        self.assertEqual([bl.add("n") for _ in range(5)], [40.0, 80.0, 160.0, 300.0, 300.0])
        clock.advance(299)
        self.assertTrue(bl.barred("n"))
        clock.advance(2)
        self.assertFalse(bl.barred("n"))
        self.assertEqual(bl.add("fresh"), 5.0)

    def test_custom_base_and_cap(self) -> None:
        clock = Clock()
        bl = BlackList(clock, base=1.0, cap=3.0)
        self.assertEqual([bl.add("n") for _ in range(4)], [1.0, 2.0, 3.0, 3.0])


class HintRateTests(SynchronousTestCase):
    def test_free_bandwidth(self) -> None:
        self.assertEqual(hint_rate({"upload_capacity_bps": 1000, "upload_bps": 250}), 750.0)
        self.assertEqual(hint_rate({"upload_capacity_bps": 1000.5}), 1000.5)
        self.assertEqual(hint_rate({"upload_capacity_bps": 1000, "upload_bps": None}), 1000.0)

    def test_floor_at_ten_percent(self) -> None:
        self.assertEqual(hint_rate({"upload_capacity_bps": 1000, "upload_bps": 950}), 100.0)
        self.assertEqual(hint_rate({"upload_capacity_bps": 1000, "upload_bps": 5000}), 100.0)

    def test_unknown(self) -> None:
        for state in (
            {},
            {"upload_capacity_bps": 0},
            {"upload_capacity_bps": -5},
            {"upload_capacity_bps": "1000"},
        ):
            with self.subTest(state=state):
                self.assertIsNone(hint_rate(state))


class IOCounterTests(_AgentStoreBase):
    """The store counts the bytes its content files read and write (the node's file I/O)."""

    def test_seed_reads(self) -> None:
        self.store.add_seed(SeedFile(self.path, self.manifest, self.leaves))
        self.assertEqual(self.store.io.total, 0)
        self.store.read(self.cid, 0, 1)
        self.assertEqual(self.store.io.total, SUB)
        self.store.seeds[self.cid].read_range(10, 100)
        self.assertEqual(self.store.io.total, SUB + 100)

    def test_cache_writes_and_reads(self) -> None:
        e = self.store.entry(self.manifest)
        self.write_block(e, 3)
        written = self.g.block_length(3)
        self.assertEqual(self.store.io.total, written)
        self.store.read(self.cid, 3, 1)
        self.assertEqual(self.store.io.total, written + self.g.sub_length(3, 1))

    def test_loaded_cache_counts(self) -> None:
        self.write_block(self.store.entry(self.manifest), 0)
        reopened = AgentStore(self.data_dir, KEY)
        self.addCleanup(reopened.close)
        reopened.load_cache()
        reopened.read(self.cid, 0, 2)
        self.assertEqual(reopened.io.total, SUB)

    def test_threads(self) -> None:
        counter = IOCounter()

        def add() -> None:
            for _ in range(10_000):
                counter.add(3)

        workers = [threading.Thread(target=add) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        self.assertEqual(counter.total, 4 * 10_000 * 3)
