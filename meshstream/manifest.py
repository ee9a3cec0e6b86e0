# -*- test-case-name: tests.test_manifest -*-
"""
Manifests: what a content is, how it is cut up, and how every byte is checked.

A content of ``size`` bytes is cut into blocks of ``block_size`` bytes (the
unit of in-order delivery) and every block into sub blocks of
``sub_block_size`` bytes (the unit of request and verification).  The last
block and the last sub block may be short.

Hashes are chained so that the manifest stays small::

    leaf(b, s)  = SHA-256(sub block s of block b)
    root(b)     = SHA-256(leaf(b, 0) || leaf(b, 1) || ... )

The manifest carries only the block roots (32 bytes per block, base64: about
43 KiB per GiB with 1 MiB blocks).  A peer sends a block's leaf list (the
HASHES message) before the first sub block of that block; the receiver checks
the list against the root and then every sub block against its leaf.

The content id is the SHA-256 of the canonical JSON of the *info* part
(format version, size, geometry, roots), so it names the bytes and how they
are cut, not the file name or where the origin lives.  The tracker signs the
whole document (info, name, origins, metadata) with Ed25519.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO

from attrs import evolve, field, frozen
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

FORMAT_VERSION = 1
DIGEST_SIZE = 32

DEFAULT_BLOCK_SIZE = 1024 * 1024
DEFAULT_SUB_BLOCK_SIZE = 64 * 1024

MIN_SUB_BLOCK_SIZE = 1024
MAX_SUB_BLOCK_SIZE = 1024 * 1024
MAX_SUBS_PER_BLOCK = 1024
MAX_BLOCK_SIZE = 64 * 1024 * 1024
MAX_CONTENT_SIZE = 1 << 44  # 16 TiB
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
MAX_ORIGINS = 16
MAX_NAME = 255


class ManifestError(ValueError):
    """A manifest is malformed, inconsistent, or its signature does not hold."""


def leaf_hash(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def root_hash(leaves: Sequence[bytes]) -> bytes:
    return hashlib.sha256(b"".join(leaves)).digest()


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def check_geometry(size: int, block_size: int, sub_block_size: int) -> None:
    """Raise L{ManifestError} unless the sizes describe a content we can carry."""
    for name, value in (
        ("size", size),
        ("block_size", block_size),
        ("sub_block_size", sub_block_size),
    ):
        if type(value) is not int:
            raise ManifestError(f"{name} must be an integer")
    if not 0 <= size <= MAX_CONTENT_SIZE:
        raise ManifestError(f"size must be between 0 and {MAX_CONTENT_SIZE}")
    if not MIN_SUB_BLOCK_SIZE <= sub_block_size <= MAX_SUB_BLOCK_SIZE:
        raise ManifestError(f"sub_block_size must be between {MIN_SUB_BLOCK_SIZE} and {MAX_SUB_BLOCK_SIZE}")
    if sub_block_size % 16:
        raise ManifestError("sub_block_size must be a multiple of 16")
    if block_size % sub_block_size or not 0 < block_size <= MAX_BLOCK_SIZE:
        raise ManifestError(f"block_size must be a multiple of sub_block_size and at most {MAX_BLOCK_SIZE}")
    if block_size // sub_block_size > MAX_SUBS_PER_BLOCK:
        raise ManifestError(f"a block may hold at most {MAX_SUBS_PER_BLOCK} sub blocks")


@frozen
class Geometry:
    """How a content of C{size} bytes is cut into blocks and sub blocks."""

    size: int
    block_size: int = DEFAULT_BLOCK_SIZE
    sub_block_size: int = DEFAULT_SUB_BLOCK_SIZE
    # Derived once: these are asked per sub block on the download's hot path
    # (a 1 GiB fetch asks about 10^5 times).  Every block before the last
    # is whole, and so is every sub block in it.
    _num_blocks: int = field(init=False, eq=False, repr=False)
    _subs_per_block: int = field(init=False, eq=False, repr=False)
    _last: int = field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        check_geometry(self.size, self.block_size, self.sub_block_size)
        num_blocks = -(-self.size // self.block_size)
        object.__setattr__(self, "_num_blocks", num_blocks)
        object.__setattr__(self, "_subs_per_block", self.block_size // self.sub_block_size)
        object.__setattr__(self, "_last", num_blocks - 1)

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def subs_per_block(self) -> int:
        return self._subs_per_block

    def block_offset(self, block: int) -> int:
        return block * self.block_size

    def block_length(self, block: int) -> int:
        if 0 <= block < self._last:
            return self.block_size
        self._check_block(block)
        return min(self.block_size, self.size - block * self.block_size)

    def subs_in_block(self, block: int) -> int:
        if 0 <= block < self._last:
            return self._subs_per_block
        return -(-self.block_length(block) // self.sub_block_size)

    def sub_offset(self, block: int, sub: int) -> int:
        return block * self.block_size + sub * self.sub_block_size

    def sub_length(self, block: int, sub: int) -> int:
        if 0 <= block < self._last and 0 <= sub < self._subs_per_block:
            return self.sub_block_size
        n = self.subs_in_block(block)
        if not 0 <= sub < n:
            raise IndexError(f"block {block} has no sub block {sub}")
        return min(self.sub_block_size, self.block_length(block) - sub * self.sub_block_size)

    def _check_block(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"no block {block} (content has {self.num_blocks})")


def _geometry(inst: Manifest) -> Geometry:
    return Geometry(inst.size, inst.block_size, inst.sub_block_size)


def _check_origins(origins: Iterable[str]) -> tuple[str, ...]:
    out = tuple(origins)
    if len(out) > MAX_ORIGINS:
        raise ManifestError(f"at most {MAX_ORIGINS} origins")
    for url in out:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ManifestError("origins must be http:// or https:// URLs")
        if len(url) > 2048:
            raise ManifestError("origin URL too long")
    return out


@frozen
class Manifest:
    """A content's description. Build with L{build_manifest} or L{Manifest.from_json}."""

    size: int
    block_size: int
    sub_block_size: int
    block_roots: tuple[bytes, ...]
    name: str = ""
    origins: tuple[str, ...] = ()
    meta: dict[str, Any] = field(factory=dict, hash=False)
    signature: bytes | None = None
    geometry: Geometry = field(init=False, eq=False, hash=False, repr=False)
    content_id: str = field(init=False, eq=False, hash=False, repr=False)

    def __attrs_post_init__(self) -> None:
        try:
            geometry = _geometry(self)
        except ManifestError:
            raise
        if len(self.block_roots) != geometry.num_blocks:
            raise ManifestError(f"{geometry.num_blocks} blocks but {len(self.block_roots)} roots")
        if any(len(r) != DIGEST_SIZE for r in self.block_roots):
            raise ManifestError("every block root is 32 bytes")
        if not isinstance(self.name, str) or len(self.name) > MAX_NAME:
            raise ManifestError(f"name must be a string of at most {MAX_NAME} characters")
        _check_origins(self.origins)
        object.__setattr__(self, "geometry", geometry)
        object.__setattr__(self, "content_id", hashlib.sha256(canonical_json(self._info())).hexdigest())

    @property
    def num_blocks(self) -> int:
        return self.geometry.num_blocks

    def _info(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "size": self.size,
            "block_size": self.block_size,
            "sub_block_size": self.sub_block_size,
            "block_roots": base64.b64encode(b"".join(self.block_roots)).decode("ascii"),
        }

    def _unsigned(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "info": self._info(),
            "content_id": self.content_id,
            "name": self.name,
            "origins": list(self.origins),
            "meta": self.meta,
        }
        return doc

    def signed_bytes(self) -> bytes:
        """The bytes a signature covers: everything but the signature."""
        return canonical_json(self._unsigned())

    def to_dict(self) -> dict[str, Any]:
        doc = self._unsigned()
        if self.signature is not None:
            doc["signature"] = base64.b64encode(self.signature).decode("ascii")
        return doc

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

    def with_origins(self, origins: Iterable[str]) -> Manifest:
        return evolve(self, origins=_check_origins(origins), signature=None)

    def sign(self, key: Ed25519PrivateKey) -> Manifest:
        unsigned = evolve(self, signature=None)
        return evolve(unsigned, signature=key.sign(unsigned.signed_bytes()))

    def verify(self, key: Ed25519PublicKey) -> None:
        """Raise L{ManifestError} unless this manifest carries C{key}'s signature."""
        if self.signature is None:
            raise ManifestError("manifest is not signed")
        try:
            key.verify(self.signature, self.signed_bytes())
        except InvalidSignature:
            raise ManifestError("manifest signature does not match the tracker key") from None

    @classmethod
    def from_dict(cls, doc: object) -> Manifest:
        if not isinstance(doc, dict):
            raise ManifestError("a manifest is a JSON object")
        info = doc.get("info")
        if not isinstance(info, dict):
            raise ManifestError("manifest has no info object")
        if info.get("format") != FORMAT_VERSION:
            raise ManifestError(f"unsupported manifest format {info.get('format')!r}")
        size, bsize, ssize = info.get("size"), info.get("block_size"), info.get("sub_block_size")
        check_geometry(size, bsize, ssize)  # type: ignore[arg-type]
        assert isinstance(size, int) and isinstance(bsize, int) and isinstance(ssize, int)
        roots_b64 = info.get("block_roots")
        if not isinstance(roots_b64, str):
            raise ManifestError("block_roots must be a base64 string")
        try:
            raw = base64.b64decode(roots_b64, validate=True)
        except ValueError:
            raise ManifestError("block_roots is not valid base64") from None
        if len(raw) % DIGEST_SIZE:
            raise ManifestError("block_roots length is not a multiple of 32")
        roots = tuple(raw[i : i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE))
        name = doc.get("name", "")
        origins = doc.get("origins", [])
        meta = doc.get("meta", {})
        if not isinstance(origins, list):
            raise ManifestError("origins must be a list")
        if not isinstance(meta, dict):
            raise ManifestError("meta must be an object")
        sig = doc.get("signature")
        signature: bytes | None = None
        if sig is not None:
            if not isinstance(sig, str):
                raise ManifestError("signature must be a base64 string")
            try:
                signature = base64.b64decode(sig, validate=True)
            except ValueError:
                raise ManifestError("signature is not valid base64") from None
        manifest = cls(
            size=size,
            block_size=bsize,
            sub_block_size=ssize,
            block_roots=roots,
            name=name,
            origins=tuple(origins),
            meta=meta,
            signature=signature,
        )
        claimed = doc.get("content_id")
        if claimed is not None and claimed != manifest.content_id:
            raise ManifestError("content_id does not match the manifest info")
        return manifest

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError("manifest too large")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"manifest is not valid JSON: {e}") from None
        return cls.from_dict(doc)


class BlockHasher:
    """
    Incrementally hash a byte stream into per-block leaf lists and roots.

    Feed it any chunking of the content; it yields (block, leaves) as each
    block completes, so a caller can keep the leaves (a seeder needs them to
    answer with HASHES) or just the roots.
    """

    def __init__(self, geometry: Geometry) -> None:
        self._g = geometry
        self._block = 0
        self._sub = 0
        self._pending = bytearray()
        self._leaves: list[bytes] = []
        self._done = geometry.num_blocks == 0

    def update(self, data: bytes | memoryview) -> Iterator[tuple[int, list[bytes]]]:
        view = memoryview(data)
        while view and not self._done:
            need = self._g.sub_length(self._block, self._sub) - len(self._pending)
            if not self._pending and len(view) >= need:
                self._leaves.append(leaf_hash(view[:need]))
                view = view[need:]
            else:
                take = min(need, len(view))
                self._pending += view[:take]
                view = view[take:]
                if take < need:
                    break
                self._leaves.append(leaf_hash(self._pending))
                self._pending.clear()
            self._sub += 1
            if self._sub == self._g.subs_in_block(self._block):
                yield self._block, self._leaves
                self._leaves = []
                self._sub = 0
                self._block += 1
                self._done = self._block == self._g.num_blocks
        if view:
            raise ManifestError("more data than the content size")

    def finished(self) -> bool:
        return self._done


def hash_file(f: BinaryIO, geometry: Geometry, chunk: int = 4 * 1024 * 1024) -> list[list[bytes]]:
    """Return every block's leaf list; raise L{ManifestError} if the size is wrong."""
    hasher = BlockHasher(geometry)
    leaves: list[list[bytes]] = []
    while True:
        data = f.read(chunk)
        if not data:
            break
        for _, block_leaves in hasher.update(data):
            leaves.append(block_leaves)
    if not hasher.finished():
        raise ManifestError("file is shorter than the content size")
    return leaves


def build_manifest(
    path: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    sub_block_size: int = DEFAULT_SUB_BLOCK_SIZE,
    origins: Sequence[str] = (),
    name: str | None = None,
    meta: dict[str, Any] | None = None,
) -> tuple[Manifest, list[list[bytes]]]:
    """Hash the file at C{path} (blocking: call it from a thread in a daemon)."""
    size = os.path.getsize(path)
    geometry = Geometry(size, block_size, sub_block_size)
    with open(path, "rb") as f:
        leaves = hash_file(f, geometry)
    manifest = Manifest(
        size=size,
        block_size=block_size,
        sub_block_size=sub_block_size,
        block_roots=tuple(root_hash(lv) for lv in leaves),
        name=name if name is not None else os.path.basename(path),
        origins=tuple(origins),
        meta=meta or {},
    )
    return manifest, leaves


def load_public_key(data: bytes) -> Ed25519PublicKey:
    """Parse a tracker key given as base64 of the 32 raw bytes or as PEM."""
    from cryptography.hazmat.primitives import serialization

    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
            if not isinstance(key, Ed25519PublicKey):
                raise ManifestError("not an Ed25519 public key")
            return key
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except ManifestError:
        raise
    except ValueError as e:
        raise ManifestError(f"bad tracker public key: {e}") from None


def public_key_text(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")
