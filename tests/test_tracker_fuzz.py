# -*- test-case-name: tests.test_tracker_fuzz -*-
"""
Fuzzing the tracker's JSON endpoints with hypothesis, over real HTTP.

The tracker is a real C{twistd meshstream-tracker} process (one per test
class, see L{tests._tracker_process}) on a real SQLite file or PostgreSQL
schema; requests are raw bytes on loopback sockets, so bodies, query strings,
paths, methods, C{Content-Length} and chunking can all be wrong.  For every
request: the status is 4xx (or 2xx for a valid one), never 5xx; a 4xx body is
exactly C{{"error": {"code": ..., "message": ...}}}; a refused request changes
no row of any table; and the tracker logs no error.

About 150 examples per test (a few seconds per database);
C{MESHSTREAM_FUZZ_EXAMPLES=2000} searches deeper.  C{test_*_found} and the
C{@example}s keep what the fuzzing found.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, ClassVar
from urllib.parse import quote_from_bytes

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from meshstream.manifest import Manifest
from meshstream.tracker import auth
from tests._accounts import PASSWORD
from tests._pg import PG_URL, SKIP_PG
from tests._tracker_process import (
    Answer,
    Database,
    TrackerProcess,
    exchange,
    read_all,
    request_bytes,
)
from tests.test_tracker_api import make_manifest

ADMIN = "fuzz-admin"
USER = "fuzz-user"
BIG = 16 * 1024 * 1024  # BoundedRequest.max_body

#: Examples per test; raise it for a deeper search (MESHSTREAM_FUZZ_EXAMPLES=2000).
EXAMPLES = int(os.environ.get("MESHSTREAM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        # The mixin's tests run in two classes (SQLite, PostgreSQL): the same
        # test against two databases, so a saved failing example applies to both.
        HealthCheck.differing_executors,
    ],
)

# -- strategies ----------------------------------------------------------------

#: Text with what trips decoders: controls, non-BMP, lone surrogates.
tricky_text = st.lists(
    st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from('\x00\n"\\/:[]')),
    max_size=30,
).map("".join)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=10**400),
    st.floats(),  # NaN and infinities are written as NaN/Infinity
    tricky_text,
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(tricky_text, children, max_size=5),
    max_leaves=20,
)


def dumps(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8")


@st.composite
def near(draw: st.DrawFn, valid: dict[str, Any], fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """C{valid} with some fields dropped, some replaced (by field-wise or any JSON), maybe an extra one."""
    out: dict[str, Any] = {}
    for name, value in valid.items():
        choice = draw(st.sampled_from(["keep", "keep", "drop", "field", "any"]))
        if choice == "keep":
            out[name] = value
        elif choice == "field":
            out[name] = draw(fields.get(name, json_values))
        elif choice == "any":
            out[name] = draw(json_values)
    if draw(st.booleans()):
        out[draw(tricky_text)] = draw(json_values)
    return out


def bodies(shapes: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    """Bodies for a JSON endpoint: near-valid objects most often, then anything."""
    deep = st.integers(1, 5000)
    return st.one_of(
        shapes.map(dumps),
        shapes.map(dumps),
        shapes.map(lambda v: json.dumps(v).encode("utf-16")),
        json_values.map(dumps),
        st.binary(max_size=300),
        deep.map(lambda n: b"[" * n + b"]" * n),
        deep.map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.sampled_from(
            [
                b"",
                b"1e999",
                b"-1e999",
                b"1" * 5000,
                b"NaN",
                b"-Infinity",
                b"null",
                b"\xef\xbb\xbf{}",
                b'"\\ud800"',
            ]
        ),
    )


#: Where to cut a body into chunks; None: send it with a Content-Length.
cuts = st.none() | st.lists(st.integers(0, 400), max_size=4)

CID = ""  # set at class start-up: a registered content


def manifest(seed: int) -> Manifest:
    return make_manifest(seed, f"fuzz-{seed}")


numbers = st.one_of(st.integers(), st.floats(), st.integers(min_value=10**300, max_value=10**310))
login_shapes = near(
    {"user": USER, "password": "wrong"},
    {"user": st.sampled_from([USER, ADMIN, "x" * 65, "a b", ""]) | tricky_text, "password": tricky_text},
)
leave_shapes = near({"node_id": "fuzz-node"}, {"node_id": tricky_text})
announce_fields: dict[str, st.SearchStrategy[Any]] = {
    "node_id": st.from_regex(r"[A-Za-z0-9._-]{0,66}", fullmatch=True) | tricky_text,
    "address": st.from_regex(r"\[?[0-9a-f.:]{0,12}\]?:-?[0-9]{0,7}", fullmatch=True) | tricky_text,
    "contents": st.lists(st.sampled_from(["ab" * 32, "AB" * 32, "x"]) | tricky_text | numbers, max_size=4),
    "state": st.dictionaries(
        st.sampled_from(["cpu", "memory", "connections", "upload_bps", "upload_capacity_bps", "x"]),
        numbers | st.booleans() | tricky_text,
        max_size=4,
    ),
}
usage_entry_fields: dict[str, st.SearchStrategy[Any]] = {
    "content_id": st.sampled_from(["ab" * 32, "AB" * 32, "x"]) | tricky_text | numbers,
    "from_peers": numbers | tricky_text | st.booleans(),
    "from_servers": numbers,
    "from_origin": numbers | st.just(2**50),
    "uploaded": numbers,
}
reservation_fields: dict[str, st.SearchStrategy[Any]] = {
    "content_id": st.sampled_from(["ab" * 32, "AB" * 32]) | tricky_text,
    "start": numbers | tricky_text,
    "end": numbers | st.just(10**11),
}
#: A manifest is C{{"info": {format, size, block_size, sub_block_size,
#: block_roots (base64)}, "content_id", "name", "origins", "meta"}}.
VALID_MANIFEST = manifest(2).to_dict()
info_fields: dict[str, st.SearchStrategy[Any]] = {
    "format": numbers | st.just(1),
    "size": numbers,
    "block_size": numbers | st.sampled_from([1024, 4096, 2**20]),
    "sub_block_size": numbers | st.sampled_from([512, 1024, 3000]),
    "block_roots": st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()) | tricky_text,
}
manifest_fields: dict[str, st.SearchStrategy[Any]] = {
    "info": near(VALID_MANIFEST["info"], info_fields),
    "content_id": st.from_regex(r"[0-9a-f]{62,66}", fullmatch=True) | tricky_text,
    "name": tricky_text,
    "origins": st.lists(st.sampled_from(["https://o.example/c", "ftp://x", ""]) | tricky_text, max_size=3),
    "meta": st.dictionaries(tricky_text, json_values, max_size=3),
}

# -- the tests -------------------------------------------------------------------


class _FuzzMixin:
    """The fuzz tests, against the tracker (one per class) on C{db_url()}."""

    tracker: ClassVar[TrackerProcess]
    db: ClassVar[Database]
    admin: ClassVar[bytes]
    user: ClassVar[bytes]
    cid: ClassVar[str]
    workdir: ClassVar[str]
    started: ClassVar[bool] = False

    @classmethod
    def db_url(cls, workdir: str) -> str:
        raise NotImplementedError

    @classmethod
    def drop_db(cls) -> None:
        pass

    @classmethod
    def start(cls) -> None:
        """Start this class's tracker, with an admin and a user logged in and one content."""
        cls.started = True
        cls.workdir = tempfile.mkdtemp(prefix="meshstream-fuzz-")
        url = cls.db_url(cls.workdir)
        # Fuzzing logs in wrongly thousands of times from one address: lift
        # the guessing limits (tests/test_tracker_throttle.py tests them).
        many = "1000000000"
        cls.tracker = TrackerProcess(
            url,
            cls.workdir,
            options=[f"--login-failures-per-user={many}", f"--login-failures-per-client={many}"],
        )
        cls.tracker.start()
        health = exchange(cls.tracker.port, request_bytes(b"GET", b"/api/v1/health"))  # migrated
        assert health is not None and health.status == 200, health
        cls.db = Database(url)
        cls.db.add_user(ADMIN, auth.ADMIN)
        cls.db.add_user(USER, auth.USER)
        cls.admin, cls.user = cls.login(ADMIN), cls.login(USER)
        answer = cls.send(b"POST", b"/api/v1/manifests", manifest(1).to_json(), token=cls.admin)
        assert answer is not None and answer.status == 201, answer
        cls.cid = answer.json()["content_id"]

    @classmethod
    def login(cls, name: str) -> bytes:
        body = json.dumps({"user": name, "password": PASSWORD}).encode()
        answer = cls.send(b"POST", b"/api/v1/login", body)
        assert answer is not None and answer.status == 200, answer
        token: str = answer.json()["token"]
        return token.encode("ascii")

    @classmethod
    def send(cls, method: bytes, target: bytes, body: bytes | None = None, **kw: Any) -> Answer | None:
        return exchange(cls.tracker.port, request_bytes(method, target, body, **kw), method.decode("latin-1"))

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.started:
            cls.tracker.stop()
            cls.db.close()
            cls.drop_db()
            shutil.rmtree(cls.workdir, ignore_errors=True)

    def setUp(self) -> None:
        if not type(self).started:
            type(self).start()
        self.mark = len(self.tracker.events)

    def tearDown(self) -> None:
        """The tracker is alive and logged no error while the test ran."""
        tag = uuid.uuid4().hex
        self.send(b"GET", f"/end-of-test/{tag}".encode())
        self.tracker.wait_for(lambda e: tag in str(e.get("path", "")), self.mark)
        levels = {"error", "critical"}
        errors = [e for e in self.tracker.events[self.mark :] if e.get("log_level", {}).get("name") in levels]
        assert not errors, [e.get("text") for e in errors]
        assert self.tracker.alive()

    # -- checks ----------------------------------------------------------------

    def check(self, answer: Answer | None, allowed: set[int], method: bytes = b"POST") -> Answer:
        """A JSON answer with an allowed status (an error has the error shape)."""
        assert answer is not None, "no answer"
        assert answer.status in allowed, (answer.status, answer.body[:300])
        assert answer.headers.get("content-type") == "application/json", answer.headers
        if method == b"HEAD":
            return answer
        doc = answer.json()
        if answer.status >= 400:
            assert set(doc) == {"error"}, doc
            assert set(doc["error"]) == {"code", "message"}, doc
            assert isinstance(doc["error"]["code"], str) and isinstance(doc["error"]["message"], str)
        return answer

    def refused_changes_nothing(
        self,
        allowed: set[int],
        method: bytes,
        target: bytes,
        body: bytes | None = None,
        **kw: Any,
    ) -> Answer:
        before = self.db.counts()
        answer = self.check(self.send(method, target, body, **kw), allowed, method)
        if answer.status >= 400:
            assert self.db.counts() == before, (answer.body, before, self.db.counts())
        return answer

    # -- endpoints -------------------------------------------------------------

    @FUZZ
    @given(bodies(login_shapes), cuts)
    @example(b'{"user": "fuzz-user", "password": "\\ud800"}', None)  # found by this test: a 500
    def test_login(self, body: bytes, cut: list[int] | None) -> None:
        self.refused_changes_nothing({200, 400, 401}, b"POST", b"/api/v1/login", body, cuts=cut)

    @FUZZ
    @given(bodies(near(VALID_MANIFEST, manifest_fields)), cuts)
    def test_manifests(self, body: bytes, cut: list[int] | None) -> None:
        self.refused_changes_nothing(
            {200, 201, 400}, b"POST", b"/api/v1/manifests", body, token=self.admin, cuts=cut
        )

    @FUZZ
    @given(st.data(), cuts)
    def test_announce(self, data: st.DataObject, cut: list[int] | None) -> None:
        valid = {
            "node_id": "fuzz-node",
            "address": "10.0.0.1:7000",
            "contents": [self.cid],
            "state": {"cpu": 0.5},
        }
        body = data.draw(bodies(near(valid, announce_fields)))
        answer = self.refused_changes_nothing(
            {200, 400}, b"POST", b"/api/v1/announce", body, token=self.user, cuts=cut
        )
        if answer.status == 200:
            self.assertEqual(set(answer.json()), {"interval", "expires_in", "unknown", "reservations"})

    def test_announce_found(self) -> None:
        """What the fuzzing found: each was a 500 before its fix."""
        for state in ({"upload_bps": 10**309}, {"cpu": -(10**400)}):
            body = json.dumps(
                {"node_id": "n", "address": "10.0.0.1:1", "contents": [], "state": state}
            ).encode()
            answer = self.refused_changes_nothing({400}, b"POST", b"/api/v1/announce", body, token=self.user)
            self.assertEqual(answer.json()["error"]["code"], "bad_request")

    @FUZZ
    @given(st.data(), cuts)
    def test_usage(self, data: st.DataObject, cut: list[int] | None) -> None:
        entry = {"content_id": self.cid, "from_peers": 1, "from_servers": 0, "from_origin": 2, "uploaded": 3}
        entries = st.lists(near(entry, usage_entry_fields), max_size=3) | st.just([entry])
        valid = {"node_id": "fuzz-node", "seq": 1, "contents": [entry]}
        fields = {"node_id": tricky_text, "seq": numbers | tricky_text, "contents": entries}
        body = data.draw(bodies(near(valid, fields)))
        self.refused_changes_nothing({200, 400}, b"POST", b"/api/v1/usage", body, token=self.user, cuts=cut)

    @FUZZ
    @given(st.data(), cuts)
    def test_reservations(self, data: st.DataObject, cut: list[int] | None) -> None:
        valid = {"content_id": self.cid, "start": 4_000_000_000, "end": 4_000_003_600}
        body = data.draw(bodies(near(valid, reservation_fields)))
        answer = self.refused_changes_nothing(
            {201, 400, 404, 409}, b"POST", b"/api/v1/reservations", body, token=self.user, cuts=cut
        )
        if answer.status == 201:
            rid = answer.json()["id"].encode()
            self.check(self.send(b"DELETE", b"/api/v1/reservations/" + rid, token=self.user), {200})

    @FUZZ
    @given(bodies(leave_shapes), cuts)
    def test_leave(self, body: bytes, cut: list[int] | None) -> None:
        self.refused_changes_nothing({200, 400}, b"POST", b"/api/v1/leave", body, token=self.user, cuts=cut)

    @settings(FUZZ, max_examples=max(10, EXAMPLES // 5))
    @given(bodies(leave_shapes) | st.none(), cuts, st.none() | st.binary(max_size=30))
    def test_logout(self, body: bytes | None, cut: list[int] | None, query: bytes | None) -> None:
        """A valid token is revoked whatever the body and query; it is then refused."""
        token = self.login(USER)
        before = self.db.counts()
        target = b"/api/v1/logout" + (b"" if query is None else b"?" + quote_from_bytes(query).encode())
        answer = self.check(self.send(b"POST", target, body, token=token, cuts=cut), {200})
        self.assertEqual(answer.json(), {})
        self.assertEqual(self.db.counts(), {**before, "tokens": before["tokens"] - 1})
        self.refused_changes_nothing({401}, b"POST", b"/api/v1/logout", body, token=token, cuts=cut)

    @FUZZ
    @given(
        st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b and b"\0" not in b),
        st.sampled_from([b"/api/v1/logout", b"/api/v1/me", b"/api/v1/announce"]),
        st.binary(max_size=100),
    )
    def test_authorization_header(self, value: bytes, target: bytes, body: bytes) -> None:
        """
        Garbage credentials: 401 (a valid token is not guessed), or 400 for a
        value with control characters (invalid in a field, RFC 9110 5.5);
        nothing changes.
        """
        headers = [(b"Authorization", value)]
        allowed = {400} if any((b < 0x20 and b != 0x09) or b == 0x7F for b in value) else {401}
        self.refused_changes_nothing(
            allowed, b"POST" if target != b"/api/v1/me" else b"GET", target, body, headers=headers
        )

    @FUZZ
    @given(
        st.lists(
            st.tuples(
                st.sampled_from([b"limit", b"exclude", b"other", b""]) | st.binary(max_size=6),
                st.from_regex(rb"[-+]?[0-9]{0,12}", fullmatch=True)
                | st.binary(max_size=12)
                | st.just(b"9" * 40),
            ),
            max_size=6,
        ),
        st.integers(0, 1010) | st.just(0),
        st.sampled_from(["known", "unknown", "bad"]) | tricky_text,
    )
    def test_nodes_query(self, pairs: list[tuple[bytes, bytes]], excludes: int, content: str) -> None:
        cid = {"known": self.cid, "unknown": "cd" * 32, "bad": "CD" * 32}.get(content, content)
        pairs = pairs + [(b"exclude", b"n%d" % i) for i in range(excludes if excludes > 900 else 0)]
        query = b"&".join(
            quote_from_bytes(k, safe="").encode() + b"=" + quote_from_bytes(v).encode() for k, v in pairs
        )
        segment = quote_from_bytes(cid.encode("utf-8", "surrogatepass"), safe="").encode()
        target = b"/api/v1/contents/" + segment + b"/nodes?" + query
        answer = self.refused_changes_nothing({200, 400, 404}, b"GET", target, token=self.user)
        if answer.status == 200:
            self.assertLessEqual(len(answer.json()["nodes"]), 200)

    @FUZZ
    @given(
        st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"])
        | st.from_regex(rb"[A-Z]{1,12}", fullmatch=True),
        st.lists(
            st.sampled_from(
                [b"api", b"v1", b"health", b"key", b"me", b"manifests", b"contents", b"nodes", b""]
            )
            | st.binary(max_size=12),
            max_size=6,
        ),
        st.none() | st.binary(max_size=30),
        st.sampled_from(["none", "garbage", "user"]),
        st.none() | st.binary(max_size=200),
    )
    def test_random_requests(
        self, method: bytes, segments: list[bytes], query: bytes | None, token: str, body: bytes | None
    ) -> None:
        """Any method on any path: routed, refused or answered, never 5xx (logout left out: it revokes)."""
        target = b"/" + b"/".join(quote_from_bytes(s, safe="").encode() for s in segments)
        if target.rstrip(b"/").endswith(b"logout"):
            return
        if query is not None:
            target += b"?" + quote_from_bytes(query, safe="=&").encode()
        tokens = {"none": None, "garbage": b"forged", "user": self.user}
        before = self.db.counts()
        answer = self.check(
            self.send(method, target, body, token=tokens[token]), set(range(200, 500)), method
        )
        if answer.status >= 400 or method in (b"GET", b"HEAD"):
            assert self.db.counts() == before

    # -- framing ---------------------------------------------------------------

    @settings(FUZZ, max_examples=max(10, EXAMPLES // 15))
    @given(
        st.integers(BIG + 1, 10**30),
        st.booleans(),
        st.sampled_from([b"/api/v1/announce", b"/api/v1/nowhere"]),
    )
    def test_declared_too_large(self, length: int, expect: bool, target: bytes) -> None:
        """A body declared over the hard cap is refused at once, before it is sent."""
        headers = [b"Content-Length: %d" % length] + ([b"Expect: 100-continue"] if expect else [])
        head = b"\r\n".join([b"POST " + target + b" HTTP/1.1", b"Host: x", *headers]) + b"\r\n\r\n"
        before = self.db.counts()
        raw = read_all(self.tracker.port, head)
        status_line, _, rest = raw.partition(b"\r\n")
        self.assertEqual(status_line, b"HTTP/1.1 413 Content Too Large")
        body = rest.partition(b"\r\n\r\n")[2]
        self.assertEqual(json.loads(body)["error"]["code"], "body_too_large")
        self.assertEqual(self.db.counts(), before)

    def test_body_over_cap_chunked(self) -> None:
        """An endless chunked body is dropped past the hard cap, then refused."""
        body = b" " * (BIG + 1)
        self.refused_changes_nothing(
            {413}, b"POST", b"/api/v1/manifests", body, token=self.admin, cuts=[BIG // 2]
        )

    @FUZZ
    @given(bodies(leave_shapes), st.integers(0, 50), st.booleans())
    def test_lying_content_length(self, body: bytes, shift: int, shorter: bool) -> None:
        """
        A C{Content-Length} shorter than the body: the first answer is about
        its prefix.  Longer, then the client stops sending: no answer at all.
        """
        length = max(0, len(body) - shift - 1) if shorter else len(body) + shift + 1
        head = b"POST /api/v1/leave HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + self.user
        data = head + b"\r\nContent-Length: %d\r\n\r\n" % length + body
        before = self.db.counts()
        answer = exchange(self.tracker.port, data, "POST", half_close=not shorter)
        if shorter:
            self.check(answer, {200, 400})
        else:
            self.assertIsNone(answer)
        if answer is None or answer.status >= 400:
            self.assertEqual(self.db.counts(), before)

    @FUZZ
    @given(st.binary(max_size=400))
    def test_raw_bytes(self, data: bytes) -> None:
        """
        Whatever bytes arrive: no answer, twisted.web's bare 400 for what is
        not HTTP at all, or a JSON answer for what is.
        """
        before = self.db.counts()
        answer = exchange(self.tracker.port, data, half_close=True)
        if answer is not None and answer.body:
            self.check(answer, set(range(200, 500)))
        elif answer is not None:
            self.assertEqual(answer.status, 400)
        self.assertEqual(self.db.counts(), before)

    @FUZZ
    @given(
        st.sampled_from([b"abc", b"-1", b"1, 2", b"9" * 30, b" 5", b"0x10", b""]),
        st.sampled_from([b"chunked", b"gzip", b"chunked, chunked", b"identity"]) | st.none(),
        st.binary(max_size=50),
    )
    def test_broken_framing_headers(self, length: bytes, coding: bytes | None, body: bytes) -> None:
        """Bad C{Content-Length} and C{Transfer-Encoding} values: a 400 of some kind or no answer."""
        head = [b"POST /api/v1/leave HTTP/1.1", b"Host: x", b"Content-Length: " + length]
        if coding is not None:
            head.append(b"Transfer-Encoding: " + coding)
        before = self.db.counts()
        answer = exchange(self.tracker.port, b"\r\n".join(head) + b"\r\n\r\n" + body, "POST", half_close=True)
        if answer is not None:
            self.assertTrue(400 <= answer.status < 500, answer)
        self.assertEqual(self.db.counts(), before)


class SQLiteFuzzTests(_FuzzMixin, unittest.SynchronousTestCase):
    """The fuzz tests against a tracker on SQLite."""

    @classmethod
    def db_url(cls, workdir: str) -> str:
        return f"sqlite:{workdir}/tracker.sqlite"


class PostgresFuzzTests(_FuzzMixin, unittest.SynchronousTestCase):
    """The fuzz tests against a tracker on PostgreSQL (a schema of its own)."""

    skip = SKIP_PG
    schema: ClassVar[str] = ""

    @classmethod
    def db_url(cls, workdir: str) -> str:
        from urllib.parse import quote

        from tests._pg import _connect

        cls.schema = f"fuzz_{uuid.uuid4().hex[:16]}"
        with _connect() as conn:
            conn.execute(f"CREATE SCHEMA {cls.schema}")
        separator = "&" if "?" in PG_URL else "?"
        return f"{PG_URL}{separator}options={quote(f'-csearch_path={cls.schema}')}"

    @classmethod
    def drop_db(cls) -> None:
        from tests._pg import _connect

        if cls.schema:
            with _connect() as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {cls.schema} CASCADE")
