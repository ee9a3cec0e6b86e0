"""
Tests for L{meshstream.manifest}: geometry, hashing, content ids, JSON, signatures.

Leaves and roots are recomputed here with plain C{hashlib} from the file
bytes, so the tests check the documented hash chain, not the code against
itself.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from typing import Any

from attrs import evolve
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshstream.manifest import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_SUB_BLOCK_SIZE,
    MAX_MANIFEST_BYTES,
    BlockHasher,
    Geometry,
    Manifest,
    ManifestError,
    build_manifest,
    hash_file,
    load_public_key,
    public_key_text,
)

BLOCK = 4096
SUB = 1024


def content(size: int, seed: int = 1) -> bytes:
    """Deterministic, non-repeating bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


def expected_leaves(data: bytes, block: int = BLOCK, sub: int = SUB) -> list[list[bytes]]:
    """The leaf lists, computed straight from the definition."""
    blocks = []
    for b in range(0, len(data), block):
        chunk = data[b : b + block]
        blocks.append([hashlib.sha256(chunk[s : s + sub]).digest() for s in range(0, len(chunk), sub)])
    return blocks


def expected_content_id(size: int, block: int, sub: int, roots: list[bytes]) -> str:
    info = {
        "format": 1,
        "size": size,
        "block_size": block,
        "sub_block_size": sub,
        "block_roots": base64.b64encode(b"".join(roots)).decode("ascii"),
    }
    return hashlib.sha256(json.dumps(info, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _TempFiles(SynchronousTestCase):
    def write_file(self, data: bytes, name: str = "content.bin") -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def build(self, data: bytes, **kwargs: Any) -> tuple[Manifest, list[list[bytes]]]:
        return build_manifest(self.write_file(data), block_size=BLOCK, sub_block_size=SUB, **kwargs)


class BuildManifestTests(_TempFiles):
    def check_size(self, size: int, blocks: int, subs_last: int) -> None:
        data = content(size)
        manifest, leaves = self.build(data)
        want = expected_leaves(data)
        self.assertEqual(leaves, want)
        self.assertEqual(manifest.size, size)
        self.assertEqual(manifest.num_blocks, blocks)
        self.assertEqual(len(leaves), blocks)
        if blocks:
            self.assertEqual(len(leaves[-1]), subs_last)
            self.assertEqual(manifest.geometry.subs_in_block(blocks - 1), subs_last)
        self.assertEqual(list(manifest.block_roots), [hashlib.sha256(b"".join(lv)).digest() for lv in want])
        self.assertEqual(
            manifest.content_id,
            expected_content_id(size, BLOCK, SUB, [hashlib.sha256(b"".join(lv)).digest() for lv in want]),
        )
        self.assertEqual(manifest.name, "content.bin")

    def test_empty(self) -> None:
        self.check_size(0, 0, 0)

    def test_one_byte(self) -> None:
        self.check_size(1, 1, 1)

    def test_one_sub_block(self) -> None:
        self.check_size(SUB, 1, 1)

    def test_one_block(self) -> None:
        self.check_size(BLOCK, 1, 4)

    def test_one_block_plus_one(self) -> None:
        self.check_size(BLOCK + 1, 2, 1)

    def test_several_blocks_short_tail(self) -> None:
        self.check_size(3 * BLOCK + SUB + 476, 4, 2)

    def test_name_origins_meta(self) -> None:
        manifest, _ = self.build(
            b"abc", name="film.mp4", origins=["https://o.example/f"], meta={"mime_type": "video/mp4"}
        )
        self.assertEqual(manifest.name, "film.mp4")
        self.assertEqual(manifest.origins, ("https://o.example/f",))
        self.assertEqual(manifest.meta, {"mime_type": "video/mp4"})

    def test_hash_file_short_file(self) -> None:
        e = self.assertRaises(ManifestError, hash_file, io.BytesIO(b"x" * 100), Geometry(101, BLOCK, SUB))
        self.assertIn("shorter", str(e))

    def test_hash_file_long_file(self) -> None:
        self.assertRaises(ManifestError, hash_file, io.BytesIO(b"x" * 102), Geometry(101, BLOCK, SUB))


class ContentIdTests(_TempFiles):
    def test_stable(self) -> None:
        data = content(2 * BLOCK + 5)
        a, _ = self.build(data)
        b, _ = self.build(data)
        self.assertEqual(a.content_id, b.content_id)
        self.assertEqual(len(a.content_id), 64)
        int(a.content_id, 16)

    def test_independent_of_name_origins_meta(self) -> None:
        data = content(BLOCK + 5)
        a, _ = self.build(data, name="a")
        b, _ = self.build(data, name="something else", origins=["http://x/y"], meta={"k": 1})
        self.assertEqual(a.content_id, b.content_id)
        self.assertEqual(a.with_origins(["https://z/w"]).content_id, a.content_id)

    def test_changes_with_any_byte(self) -> None:
        data = content(2 * BLOCK + 5)
        base, _ = self.build(data)
        for pos in (0, SUB, BLOCK + 7, len(data) - 1):
            changed = bytearray(data)
            changed[pos] ^= 1
            other, _ = self.build(bytes(changed))
            self.assertNotEqual(other.content_id, base.content_id, pos)

    def test_changes_with_geometry(self) -> None:
        path = self.write_file(content(BLOCK * 2))
        a, _ = build_manifest(path, block_size=BLOCK, sub_block_size=SUB)
        b, _ = build_manifest(path, block_size=BLOCK, sub_block_size=2 * SUB)
        self.assertNotEqual(a.content_id, b.content_id)


class GeometryTests(SynchronousTestCase):
    def test_arithmetic(self) -> None:
        g = Geometry(10000, BLOCK, SUB)
        self.assertEqual(g.num_blocks, 3)
        self.assertEqual(g.subs_per_block, 4)
        self.assertEqual([g.block_offset(b) for b in range(3)], [0, 4096, 8192])
        self.assertEqual([g.block_length(b) for b in range(3)], [4096, 4096, 1808])
        self.assertEqual([g.subs_in_block(b) for b in range(3)], [4, 4, 2])
        self.assertEqual(g.sub_offset(2, 1), 9216)
        self.assertEqual(g.sub_length(2, 0), 1024)
        self.assertEqual(g.sub_length(2, 1), 784)
        self.assertEqual(g.sub_length(1, 3), 1024)

    def test_out_of_range(self) -> None:
        g = Geometry(10000, BLOCK, SUB)
        self.assertRaises(IndexError, g.block_length, 3)
        self.assertRaises(IndexError, g.block_length, -1)
        self.assertRaises(IndexError, g.sub_length, 2, 2)
        self.assertRaises(IndexError, g.sub_length, 0, 4)
        self.assertRaises(IndexError, g.sub_length, 0, -1)

    def test_empty(self) -> None:
        g = Geometry(0, BLOCK, SUB)
        self.assertEqual(g.num_blocks, 0)
        self.assertRaises(IndexError, g.block_length, 0)

    def test_defaults(self) -> None:
        g = Geometry(1 << 30)
        self.assertEqual((g.block_size, g.sub_block_size), (DEFAULT_BLOCK_SIZE, DEFAULT_SUB_BLOCK_SIZE))
        self.assertEqual(g.num_blocks, 1024)
        self.assertEqual(g.subs_per_block, 16)

    def test_derived_values_follow_evolve(self) -> None:
        g = evolve(Geometry(10000, BLOCK, SUB), size=20000)
        self.assertEqual(g.num_blocks, 5)
        self.assertEqual([g.block_length(b) for b in (3, 4)], [4096, 20000 - 4 * 4096])
        self.assertEqual(g, Geometry(20000, BLOCK, SUB))
        self.assertEqual(repr(g), "Geometry(size=20000, block_size=4096, sub_block_size=1024)")

    def test_invalid(self) -> None:
        for args in [
            (-1, BLOCK, SUB),
            ((1 << 44) + 1, BLOCK, SUB),
            (10.0, BLOCK, SUB),
            (True, BLOCK, SUB),
            (10, BLOCK, 1000),  # below the minimum sub block
            (10, BLOCK, 1032),  # not a multiple of 16
            (10, 5000, SUB),  # block not a multiple of sub
            (10, 0, SUB),
            (10, 2048 * SUB, SUB),  # 2048 subs per block
            (10, 65 * 1024 * 1024, 1024 * 1024),  # block over 64 MiB
            (10, 2 * 1024 * 1024 + 32, 2 * 1024 * 1024 + 16),  # sub over 1 MiB
        ]:
            with self.subTest(args=args):
                self.assertRaises(ManifestError, Geometry, *args)

    @given(st.integers(0, 50 * BLOCK), st.sampled_from([(BLOCK, SUB), (BLOCK, BLOCK), (3 * 1024, 1024)]))
    def test_property_subs_tile_the_content(self, size: int, geo: tuple[int, int]) -> None:
        g = Geometry(size, *geo)
        pos = 0
        for b in range(g.num_blocks):
            self.assertEqual(g.block_offset(b), pos)
            for s in range(g.subs_in_block(b)):
                self.assertEqual(g.sub_offset(b, s), pos)
                length = g.sub_length(b, s)
                self.assertTrue(0 < length <= g.sub_block_size)
                pos += length
        self.assertEqual(pos, size)


def dummy_manifest(**kwargs: Any) -> Manifest:
    fields: dict[str, Any] = {
        "size": 3 * BLOCK - 10,
        "block_size": BLOCK,
        "sub_block_size": SUB,
        "block_roots": (b"\1" * 32, b"\2" * 32, b"\3" * 32),
        "name": "name.bin",
        "origins": ("https://origin.example/name.bin",),
        "meta": {"mime_type": "video/mp4"},
    }
    fields.update(kwargs)
    return Manifest(**fields)


class JsonTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        m = dummy_manifest()
        back = Manifest.from_json(m.to_json())
        self.assertEqual(back, m)
        self.assertEqual(back.content_id, m.content_id)
        self.assertEqual(back.to_json(), m.to_json())
        self.assertEqual(Manifest.from_json(m.to_json().decode()), m)

    def test_round_trip_signed(self) -> None:
        key = Ed25519PrivateKey.generate()
        m = dummy_manifest().sign(key)
        back = Manifest.from_json(m.to_json())
        self.assertEqual(back, m)
        back.verify(key.public_key())

    def test_round_trip_empty_content(self) -> None:
        m = dummy_manifest(size=0, block_roots=())
        self.assertEqual(Manifest.from_json(m.to_json()), m)

    def doc(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(dummy_manifest().to_json())
        return result

    def assertRejected(self, doc: object, fragment: str = "") -> None:
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        e = self.assertRaises(ManifestError, Manifest.from_json, data)
        self.assertIn(fragment, str(e))

    def test_bad_json(self) -> None:
        self.assertRejected(b"{", "not valid JSON")
        self.assertRejected(b"\xff\xfe\x00", "not valid JSON")
        self.assertRejected(b"", "not valid JSON")

    def test_not_an_object(self) -> None:
        self.assertRejected([1, 2], "JSON object")
        self.assertRejected({"info": "x"}, "no info")
        self.assertRejected({}, "no info")

    def test_format(self) -> None:
        doc = self.doc()
        doc["info"]["format"] = 2
        self.assertRejected(doc, "unsupported manifest format")

    def test_wrong_types(self) -> None:
        for key, value in [
            ("size", "12278"),
            ("size", 12278.0),
            ("size", None),
            ("block_size", [BLOCK]),
            ("sub_block_size", True),
        ]:
            with self.subTest(key=key, value=value):
                doc = self.doc()
                doc["info"][key] = value
                self.assertRejected(doc, "must be an integer")
        for path, value, fragment in [
            (("info", "block_roots"), 5, "base64 string"),
            (("origins",), "https://x/y", "origins must be a list"),
            (("origins",), [5], "origins must be"),
            (("origins",), ["ftp://x/y"], "origins must be"),
            (("meta",), [], "meta must be an object"),
            (("name",), 7, "name must be"),
            (("name",), "n" * 256, "name must be"),
            (("signature",), 5, "signature must be"),
        ]:
            with self.subTest(path=path, value=value):
                doc = self.doc()
                target = doc
                for part in path[:-1]:
                    target = target[part]
                target[path[-1]] = value
                self.assertRejected(doc, fragment)

    def test_bad_base64(self) -> None:
        doc = self.doc()
        doc["info"]["block_roots"] = "not base64!!"
        self.assertRejected(doc, "not valid base64")
        doc = self.doc()
        doc["signature"] = "***"
        self.assertRejected(doc, "signature is not valid base64")

    def test_root_bytes_not_multiple_of_32(self) -> None:
        doc = self.doc()
        doc["info"]["block_roots"] = base64.b64encode(b"x" * 95).decode()
        doc.pop("content_id")
        self.assertRejected(doc, "multiple of 32")

    def test_wrong_root_count(self) -> None:
        for n in (2, 4):
            doc = self.doc()
            doc["info"]["block_roots"] = base64.b64encode(b"x" * 32 * n).decode()
            doc.pop("content_id")
            self.assertRejected(doc, f"3 blocks but {n} roots")

    def test_mismatched_content_id(self) -> None:
        doc = self.doc()
        doc["content_id"] = "00" * 32
        self.assertRejected(doc, "content_id does not match")
        # A changed root with the old content id is caught the same way.
        doc = self.doc()
        doc["info"]["block_roots"] = base64.b64encode(b"\1" * 32 + b"\2" * 32 + b"\4" * 32).decode()
        self.assertRejected(doc, "content_id does not match")

    def test_content_id_optional(self) -> None:
        doc = self.doc()
        doc.pop("content_id")
        self.assertEqual(Manifest.from_json(json.dumps(doc)), dummy_manifest())

    def test_bad_geometry(self) -> None:
        for block, sub, fragment in [
            (5000, SUB, "multiple of sub_block_size"),
            (2048 * SUB, SUB, "at most 1024 sub blocks"),
            (2 * 1040 + 8, 1048 - 4, "multiple of 16"),
            (BLOCK, 512, "sub_block_size must be between"),
        ]:
            with self.subTest(block=block, sub=sub):
                doc = self.doc()
                doc["info"]["block_size"] = block
                doc["info"]["sub_block_size"] = sub
                self.assertRejected(doc, fragment)

    def test_oversized(self) -> None:
        doc = self.doc()
        doc["meta"] = {"pad": "x" * MAX_MANIFEST_BYTES}
        self.assertRejected(json.dumps(doc).encode(), "too large")
        self.assertRejected(b" " * (MAX_MANIFEST_BYTES + 1), "too large")

    def test_gigabyte_manifest_is_small(self) -> None:
        roots = tuple(hashlib.sha256(b"%d" % i).digest() for i in range(1024))
        m = Manifest(
            size=1 << 30,
            block_size=DEFAULT_BLOCK_SIZE,
            sub_block_size=DEFAULT_SUB_BLOCK_SIZE,
            block_roots=roots,
        )
        self.assertLessEqual(len(m.to_json()), 64 * 1024)
        signed = evolve(m, name="n" * 255, origins=("https://origin.example/" + "p" * 100,)).sign(
            Ed25519PrivateKey.generate()
        )
        self.assertLessEqual(len(signed.to_json()), 64 * 1024)


class SignatureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.pub = self.key.public_key()
        self.signed = dummy_manifest().sign(self.key)

    def test_verify(self) -> None:
        self.signed.verify(self.pub)
        self.assertEqual(len(self.signed.signature or b""), 64)

    def test_unsigned(self) -> None:
        e = self.assertRaises(ManifestError, dummy_manifest().verify, self.pub)
        self.assertIn("not signed", str(e))

    def test_wrong_key(self) -> None:
        self.assertRaises(ManifestError, self.signed.verify, Ed25519PrivateKey.generate().public_key())

    def test_resign_replaces_signature(self) -> None:
        other = Ed25519PrivateKey.generate()
        resigned = self.signed.sign(other)
        resigned.verify(other.public_key())
        self.assertRaises(ManifestError, resigned.verify, self.pub)

    def test_tampering_breaks_verify(self) -> None:
        tamperings: list[dict[str, Any]] = [
            {"name": "other.bin"},
            {"origins": ("https://evil.example/name.bin",)},
            {"origins": ()},
            {"meta": {"mime_type": "text/html"}},
            {"block_roots": (b"\1" * 32, b"\2" * 32, b"\4" * 32)},
            {"size": 3 * BLOCK - 11},
            {"signature": b"\0" * 64},
            {"signature": b"short"},
        ]
        for changes in tamperings:
            with self.subTest(changes=changes):
                tampered = evolve(self.signed, **changes)
                self.assertRaises(ManifestError, tampered.verify, self.pub)
                # Also after a trip through JSON, as a client would see it.
                back = Manifest.from_json(tampered.to_json())
                self.assertRaises(ManifestError, back.verify, self.pub)

    def test_tampered_json_document(self) -> None:
        doc = json.loads(self.signed.to_json())
        doc["name"] = "x"
        self.assertRaises(ManifestError, Manifest.from_json(json.dumps(doc)).verify, self.pub)

    def test_with_origins_drops_signature(self) -> None:
        moved = self.signed.with_origins(["https://new.example/f"])
        self.assertIsNone(moved.signature)
        self.assertRaises(ManifestError, moved.verify, self.pub)

    def test_public_key_text_round_trip(self) -> None:
        text = public_key_text(self.pub)
        self.signed.verify(load_public_key(text.encode()))
        self.assertRaises(ManifestError, load_public_key, b"not a key")


class BlockHasherTests(SynchronousTestCase):
    @settings(max_examples=150)
    @given(st.integers(0, 5 * BLOCK + 700), st.lists(st.integers(0, 6 * BLOCK), max_size=25))
    def test_property_any_chunking(self, size: int, cuts: list[int]) -> None:
        data = content(size, seed=size)
        g = Geometry(size, BLOCK, SUB)
        hasher = BlockHasher(g)
        got: list[tuple[int, list[bytes]]] = []
        points = sorted({min(c, size) for c in cuts})
        start = 0
        for p in [*points, size]:
            got.extend((b, list(lv)) for b, lv in hasher.update(data[start:p]))
            start = p
        self.assertTrue(hasher.finished())
        self.assertEqual([b for b, _ in got], list(range(g.num_blocks)))
        self.assertEqual([lv for _, lv in got], expected_leaves(data))

    def test_too_much_data(self) -> None:
        hasher = BlockHasher(Geometry(10, BLOCK, SUB))
        self.assertEqual(list(hasher.update(b"x" * 4)), [])
        self.assertRaises(ManifestError, list, hasher.update(b"x" * 7))

    def test_empty_content(self) -> None:
        hasher = BlockHasher(Geometry(0, BLOCK, SUB))
        self.assertTrue(hasher.finished())
        self.assertEqual(list(hasher.update(b"")), [])
        self.assertRaises(ManifestError, list, hasher.update(b"x"))
