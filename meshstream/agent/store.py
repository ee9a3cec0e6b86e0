# -*- test-case-name: tests.test_agent_store -*-
"""
What an agent holds: seed files (read in place, verified once) and the cache
(downloaded content, scrambled at rest).

Cache layout, per content, under C{<data dir>/cache/}::

    <cid>.manifest.json   the signed manifest
    <cid>.data            the content, AES-256-CTR with the box key
    <cid>.idx             append-only log: one record per verified block
                          (u32 block, u16 n, n x 32-byte leaves)

A block's record is appended only after all its sub blocks were verified and
written, so after a crash the log never claims a block whose bytes were not
handed to the OS; a torn last record is ignored.  (Durability across a power
cut would need an fsync per block; not done yet.)

The counter block for CTR is C{H(cid)[:8] || offset / 16}, so any 16-byte
aligned run of the file can be read or written alone.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
from collections.abc import Callable, Iterator

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.logger import Logger
from zope.interface import implementer

from meshstream.interfaces import IContentStore
from meshstream.manifest import Manifest, ManifestError, leaf_hash, root_hash

_REC = struct.Struct(">IH")

#: Raises ManifestError unless a manifest is signed by the configured tracker.
TrustCheck = Callable[[Manifest], None]
log = Logger()


class StoreError(Exception):
    """The store cannot do what was asked (disk full, bad file, ...)."""


class IOCounter:
    """
    Bytes read from and written to content files: the file I/O a node
    reports to the tracker.  Thread-safe: cache writes run in worker threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._total += n

    @property
    def total(self) -> int:
        return self._total


class Scrambler:
    """AES-256-CTR keyed by the box key; position-addressable."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the box key is 32 bytes")
        self._key = key

    def apply(self, content_id: str, offset: int, data: bytes | memoryview) -> bytes:
        """Scramble or unscramble (CTR is its own inverse) C{data} found at C{offset}."""
        skip = offset % 16
        counter = (int.from_bytes(hashlib.sha256(content_id.encode()).digest()[:8], "big") << 64) | (
            offset // 16
        )
        enc = Cipher(algorithms.AES(self._key), modes.CTR(counter.to_bytes(16, "big"))).encryptor()
        if skip:
            enc.update(b"\0" * skip)
        return enc.update(data)


def load_or_create_key(path: str) -> bytes:
    """The box key: 32 random bytes in a 0600 file, made on first use."""
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) != 32:
            raise StoreError(f"{path} is not a 32-byte key")
        return key
    except FileNotFoundError:
        key = os.urandom(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key


class SeedFile:
    """A plain local file serving as the source of a content."""

    #: Counts the bytes read (set by L{AgentStore.add_seed}).
    io: IOCounter | None = None

    def __init__(self, path: str, manifest: Manifest, leaves: list[list[bytes]]) -> None:
        self.path = path
        self.manifest = manifest
        self.leaves = leaves
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, block: int, sub: int) -> bytes:
        g = self.manifest.geometry
        n = g.sub_length(block, sub)
        data = os.pread(self._fd, n, g.sub_offset(block, sub))
        if self.io is not None:
            self.io.add(len(data))
        if len(data) != n:
            raise StoreError(f"{self.path} is shorter than its manifest says")
        return data

    def read_range(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if self.io is not None:
            self.io.add(len(data))
        return data

    def close(self) -> None:
        os.close(self._fd)


def verify_seed(path: str, manifest: Manifest) -> list[list[bytes]]:
    """Hash the file (blocking: run in a thread) and check it against the manifest."""
    from meshstream.manifest import hash_file

    if os.path.getsize(path) != manifest.size:
        raise ManifestError(f"{path} is {os.path.getsize(path)} bytes, the manifest says {manifest.size}")
    with open(path, "rb") as f:
        leaves = hash_file(f, manifest.geometry)
    for b, lv in enumerate(leaves):
        if root_hash(lv) != manifest.block_roots[b]:
            raise ManifestError(f"{path}: block {b} does not match the manifest")
    return leaves


class SubBlockFile:
    """
    Which sub blocks of a content a file holds, block by block: the
    bookkeeping shared by the scrambled cache and C{meshstream fetch}'s plain
    output.  Subclasses write the bytes (L{store}, safe in a worker thread)
    and may log each completed block (L{_block_done}).
    """

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        #: Leaf lists of the complete blocks.
        self.leaves: dict[int, list[bytes]] = {}
        self._subs: dict[int, set[int]] = {}

    @property
    def complete(self) -> bool:
        return len(self.leaves) == self.manifest.num_blocks

    def has_block(self, block: int) -> bool:
        return block in self.leaves

    def has_sub(self, block: int, sub: int) -> bool:
        return block in self.leaves or sub in self._subs.get(block, ())

    def held_subs(self) -> Iterator[tuple[int, int]]:
        g = self.manifest.geometry
        for b in self.leaves:
            for s in range(g.subs_in_block(b)):
                yield (b, s)

    def write(self, block: int, sub: int, data: bytes | memoryview, leaves: list[bytes]) -> bool:
        """
        Store one verified sub block; return True when that completed its
        block.  Raises L{StoreError} when the disk refuses; nothing is marked
        held in that case.
        """
        self.store(block, sub, data)
        return self.mark(block, sub, leaves)

    def store(self, block: int, sub: int, data: bytes | memoryview) -> None:
        """Write one verified sub block's bytes; safe to call from a worker thread."""
        self._write_at(self.manifest.geometry.sub_offset(block, sub), data)

    def store_run(self, block: int, first_sub: int, data: bytes | memoryview) -> None:
        """Write verified contiguous sub blocks from C{first_sub} on, in one write."""
        self._write_at(self.manifest.geometry.sub_offset(block, first_sub), data)

    def _write_at(self, offset: int, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def mark(self, block: int, sub: int, leaves: list[bytes]) -> bool:
        """Record a stored sub block as held; True when that completed its block."""
        done = self._subs.setdefault(block, set())
        done.add(sub)
        if len(done) < self.manifest.geometry.subs_in_block(block):
            return False
        del self._subs[block]
        self._block_done(block, leaves)
        self.leaves[block] = leaves
        return True

    def _block_done(self, block: int, leaves: list[bytes]) -> None:
        """Every sub block of C{block} is stored (before it counts as held)."""


class CacheEntry(SubBlockFile):
    """One content in the scrambled cache, complete or not."""

    def __init__(
        self, directory: str, manifest: Manifest, scrambler: Scrambler, io: IOCounter | None = None
    ) -> None:
        super().__init__(manifest)
        self.io = io
        self.cid = manifest.content_id
        self._scrambler = scrambler
        base = os.path.join(directory, self.cid)
        self.data_path = base + ".data"
        self.idx_path = base + ".idx"
        man_path = base + ".manifest.json"
        if not os.path.exists(man_path):
            tmp = man_path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(manifest.to_json())
            os.replace(tmp, man_path)
        self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._load_index()
        self._idx = open(self.idx_path, "ab")

    def _load_index(self) -> None:
        try:
            with open(self.idx_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        good = 0
        for block, lv in self._records(raw):
            if 0 <= block < self.manifest.num_blocks and root_hash(lv) == self.manifest.block_roots[block]:
                self.leaves[block] = lv
            good = self._offset
        if good != len(raw):
            log.warn("Cache index {path} had a torn tail; truncated", path=self.idx_path)
            with open(self.idx_path, "r+b") as f:
                f.truncate(good)

    def _records(self, raw: bytes) -> Iterator[tuple[int, list[bytes]]]:
        self._offset = 0
        while self._offset + _REC.size <= len(raw):
            block, n = _REC.unpack_from(raw, self._offset)
            end = self._offset + _REC.size + 32 * n
            if end > len(raw):
                return
            body = raw[self._offset + _REC.size : end]
            self._offset = end
            yield block, [body[i : i + 32] for i in range(0, len(body), 32)]

    def _write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Scramble and write verified bytes; safe to call from a worker thread."""
        try:
            n = os.pwrite(self._fd, self._scrambler.apply(self.cid, offset, data), offset)
            if self.io is not None:
                self.io.add(n)
            if n != len(data):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as e:
            raise StoreError(f"cannot write {self.data_path}: {e.strerror or e}") from e

    def _block_done(self, block: int, leaves: list[bytes]) -> None:
        """Log the block's leaves: from now on a restart finds it held."""
        try:
            self._idx.write(_REC.pack(block, len(leaves)) + b"".join(leaves))
            self._idx.flush()
        except OSError as e:
            raise StoreError(f"cannot write {self.idx_path}: {e.strerror or e}") from e

    def read(self, block: int, sub: int) -> bytes:
        g = self.manifest.geometry
        return self.read_range(g.sub_offset(block, sub), g.sub_length(block, sub))

    def read_range(self, offset: int, length: int) -> bytes:
        raw = os.pread(self._fd, length, offset)
        if self.io is not None:
            self.io.add(len(raw))
        if len(raw) != length:
            raise StoreError(f"{self.data_path} is short")
        return self._scrambler.apply(self.cid, offset, raw)

    def close(self) -> None:
        self._idx.close()
        os.close(self._fd)


@implementer(IContentStore)
class AgentStore:
    """Everything this agent can serve: seeds first, then the cache."""

    def __init__(self, data_dir: str, box_key: bytes) -> None:
        self.cache_dir = os.path.join(data_dir, "cache")
        os.makedirs(self.cache_dir, exist_ok=True)
        self.scrambler = Scrambler(box_key)
        self.seeds: dict[str, SeedFile] = {}
        self.cache: dict[str, CacheEntry] = {}
        #: Bytes read and written in content files (seeds and cache).
        self.io = IOCounter()

    def load_cache(self, trusted: TrustCheck | None = None) -> list[str]:
        """Open every cached content found on disk; return their ids."""
        found = []
        for name in sorted(os.listdir(self.cache_dir)):
            if not name.endswith(".manifest.json"):
                continue
            try:
                with open(os.path.join(self.cache_dir, name), "rb") as f:
                    manifest = Manifest.from_json(f.read())
                if trusted is not None:
                    trusted(manifest)
            except (OSError, ManifestError) as e:
                log.warn("Skipping cached {name}: {error}", name=name, error=str(e))
                continue
            self.cache[manifest.content_id] = CacheEntry(self.cache_dir, manifest, self.scrambler, io=self.io)
            found.append(manifest.content_id)
        return found

    def add_seed(self, seed: SeedFile) -> None:
        seed.io = self.io
        self.seeds[seed.manifest.content_id] = seed

    def entry(self, manifest: Manifest) -> CacheEntry:
        cid = manifest.content_id
        if cid not in self.cache:
            self.cache[cid] = CacheEntry(self.cache_dir, manifest, self.scrambler, io=self.io)
        return self.cache[cid]

    def manifest(self, content_id: str) -> Manifest | None:
        if content_id in self.seeds:
            return self.seeds[content_id].manifest
        if content_id in self.cache:
            return self.cache[content_id].manifest
        return None

    def complete(self, content_id: str) -> bool:
        return content_id in self.seeds or (content_id in self.cache and self.cache[content_id].complete)

    def holdings(self) -> list[str]:
        """Contents this node can serve in full."""
        return sorted(set(self.seeds) | {c for c, e in self.cache.items() if e.complete})

    # IContentStore
    def has(self, content_id: str, block: int, sub: int) -> bool:
        if content_id in self.seeds:
            g = self.seeds[content_id].manifest.geometry
            return 0 <= block < g.num_blocks and 0 <= sub < g.subs_in_block(block)
        entry = self.cache.get(content_id)
        if entry is None or not entry.has_block(block):
            return False
        return 0 <= sub < entry.manifest.geometry.subs_in_block(block)

    def read(self, content_id: str, block: int, sub: int) -> bytes:
        if content_id in self.seeds:
            return self.seeds[content_id].read(block, sub)
        return self.cache[content_id].read(block, sub)

    def leaves(self, content_id: str, block: int) -> list[bytes] | None:
        if content_id in self.seeds:
            return self.seeds[content_id].leaves[block]
        entry = self.cache.get(content_id)
        return entry.leaves.get(block) if entry is not None else None

    def close(self) -> None:
        for seed in self.seeds.values():
            seed.close()
        for entry in self.cache.values():
            entry.close()


def check_sub(leaves: list[bytes], sub: int, data: bytes | memoryview) -> bool:
    return 0 <= sub < len(leaves) and leaf_hash(data) == leaves[sub]
