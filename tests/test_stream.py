# -*- test-case-name: tests.test_stream -*-
"""
Tests for L{meshstream.agent.stream}.

Three layers: the pure Range parser (examples and a hypothesis property),
the resource over a real L{HTTPChannel} on a L{StringTransport} (no sockets;
plus a few L{DummyRequest} checks), and a handful of end-to-end requests over
loopback TCP with treq.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import treq
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as _global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from meshstream.agent.stream import (
    UNSATISFIABLE,
    BlockProducer,
    StreamResource,
    make_stream_site,
    parse_range,
)
from meshstream.errors import DownloadFailed, TrackerError
from meshstream.interfaces import IStreamProvider, IStreamSource
from meshstream.testing import FakeStreamProvider, FakeStreamSource

reactor: Any = _global_reactor

CONTENT_ID = "0123456789abcdef" * 4
EMPTY_ID = "f" * 64
BLOCK = 1000
# 9 full blocks and a short tenth; every byte depends on its offset, so a
# slice from the wrong place never compares equal.
DATA = bytes((i * 7 + i // 256) % 251 for i in range(9500))
SIZE = len(DATA)


def _fixture(
    errors: dict[str, BaseException] | None = None,
) -> tuple[FakeStreamSource, FakeStreamProvider]:
    source = FakeStreamSource(CONTENT_ID, DATA, BLOCK, mime_type="video/mp2t")
    empty = FakeStreamSource(EMPTY_ID, b"", BLOCK)
    return source, FakeStreamProvider({CONTENT_ID: source, EMPTY_ID: empty}, errors)


# --------------------------------------------------------------------------
# parse_range


class ParseRangeTests(SynchronousTestCase):
    def test_none(self) -> None:
        self.assertIsNone(parse_range(None, 100))

    def test_int_ranges(self) -> None:
        self.assertEqual(parse_range("bytes=0-99", 100), (0, 99))
        self.assertEqual(parse_range("bytes=10-20", 100), (10, 20))
        self.assertEqual(parse_range("bytes=10-", 100), (10, 99))
        self.assertEqual(parse_range("bytes=10-1000", 100), (10, 99))
        self.assertEqual(parse_range("bytes=99-99", 100), (99, 99))
        self.assertEqual(parse_range("BYTES=1-2", 100), (1, 2))
        self.assertEqual(parse_range("bytes=007-008", 100), (7, 8))

    def test_suffix_ranges(self) -> None:
        self.assertEqual(parse_range("bytes=-1", 100), (99, 99))
        self.assertEqual(parse_range("bytes=-30", 100), (70, 99))
        self.assertEqual(parse_range("bytes=-1000", 100), (0, 99))

    def test_unsatisfiable(self) -> None:
        for header, size in [
            ("bytes=100-", 100),
            ("bytes=100-200", 100),
            ("bytes=-0", 100),
            ("bytes=0-", 0),
            ("bytes=-5", 0),
            ("bytes=" + "9" * 5000 + "-", 100),
        ]:
            self.assertIs(parse_range(header, size), UNSATISFIABLE, header)

    def test_ignored(self) -> None:
        for header in [
            "",
            "bytes",
            "bytes=",
            "bytes=5-2",
            "bytes=0-1,4-5",
            "bytes=0-1, -3",
            "items=0-1",
            "bytes=abc",
            "bytes=1-2-3",
            "bytes=-",
            "bytes= 1-2x",
            "bytes=+1-2",
            "bytes=1_0-20",
            "bytes=\u0661-2",
        ]:
            self.assertIsNone(parse_range(header, 100), header)

    def test_empty_list_elements(self) -> None:
        """RFC 9110 5.6.1: empty list elements are ignored."""
        self.assertEqual(parse_range("bytes=1-2,", 100), (1, 2))
        self.assertEqual(parse_range("bytes= , 1-2 ,,", 100), (1, 2))

    @given(
        size=st.integers(min_value=0, max_value=10**18),
        header=st.one_of(
            st.none(),
            st.text(max_size=40),
            st.builds(
                "{}={}".format,
                st.sampled_from(["bytes", "Bytes", "items", "", " bytes"]),
                st.lists(
                    st.builds(
                        "{}{}{}".format,
                        st.one_of(st.just(""), st.integers(0, 10**20).map(str)),
                        st.sampled_from(["-", "", "--", " - "]),
                        st.one_of(st.just(""), st.integers(0, 10**20).map(str)),
                    ),
                    max_size=3,
                ).map(",".join),
            ),
        ),
    )
    def test_result_in_bounds(self, size: int, header: str | None) -> None:
        result = parse_range(header, size)
        if result is None or result is UNSATISFIABLE:
            return
        assert isinstance(result, tuple)
        first, last = result
        self.assertTrue(0 <= first <= last < size, (header, size, result))

    @given(
        size=st.integers(min_value=0, max_value=10**6),
        first=st.integers(0, 2 * 10**6),
        length=st.one_of(st.none(), st.integers(0, 2 * 10**6)),
    )
    def test_int_range_model(self, size: int, first: int, length: int | None) -> None:
        last = None if length is None else first + length
        header = f"bytes={first}-{'' if last is None else last}"
        expected: object
        if first >= size:
            expected = UNSATISFIABLE
        else:
            expected = (first, size - 1 if last is None else min(last, size - 1))
        self.assertEqual(parse_range(header, size), expected)

    @given(size=st.integers(0, 10**6), suffix=st.integers(0, 2 * 10**6))
    def test_suffix_model(self, size: int, suffix: int) -> None:
        expected: object
        if suffix == 0 or size == 0:
            expected = UNSATISFIABLE
        else:
            expected = (max(0, size - suffix), size - 1)
        self.assertEqual(parse_range(f"bytes=-{suffix}", size), expected)


# --------------------------------------------------------------------------
# The resource over HTTPChannel + StringTransport


class _Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()


class _PausingTransport(StringTransportWithDisconnection):
    """Like a socket whose buffer is full after every non-empty write."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if data and self.producer is not None:
            self.producer.pauseProducing()


class _Connection:
    def __init__(self, site: Site, transport: StringTransportWithDisconnection | None = None) -> None:
        self.transport = transport or StringTransportWithDisconnection()
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert protocol is not None
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)
        # Site builds a proxy that picks HTTP/1.1 or HTTP/2; this is the
        # HTTPChannel behind it, which the transport pauses and resumes.
        channel = self.transport.producer
        assert isinstance(channel, HTTPChannel)
        self.channel = channel

    def request(self, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def response(self) -> _Response:
        return _Response(self.transport.value())

    def disconnect(self) -> None:
        self.transport.loseConnection()


class ResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.source, self.provider = _fixture(
            {"e" * 64: DownloadFailed("no peers"), "d" * 64: TrackerError("down", 500)}
        )
        self.site = make_stream_site(self.provider, reactor=MemoryReactorClock())

    def _get(self, path: str = f"/stream/{CONTENT_ID}", method: str = "GET", **headers: str) -> _Response:
        connection = _Connection(self.site)
        connection.request(path, method, {k.replace("_", "-"): v for k, v in headers.items()})
        return connection.response()

    def test_full_get(self) -> None:
        self.source.release_all()
        response = self._get()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, DATA)
        self.assertEqual(response.headers["content-length"], str(SIZE))
        self.assertEqual(response.headers["content-type"], "video/mp2t")
        self.assertEqual(response.headers["accept-ranges"], "bytes")
        self.assertNotIn("content-range", response.headers)
        # One block per read, never the whole range.
        self.assertEqual(self.source.reads, [(b * BLOCK, min(BLOCK, SIZE - b * BLOCK)) for b in range(10)])

    def _check_range(self, header: str, first: int, last: int) -> None:
        response = self._get(Range=header)
        self.assertEqual(response.status, 206, header)
        self.assertEqual(response.headers["content-range"], f"bytes {first}-{last}/{SIZE}")
        self.assertEqual(response.headers["content-length"], str(last - first + 1))
        self.assertEqual(response.body, DATA[first : last + 1])

    def test_ranges(self) -> None:
        self.source.release_all()
        self._check_range("bytes=0-0", 0, 0)
        self._check_range("bytes=1500-3499", 1500, 3499)
        self._check_range("bytes=9000-", 9000, 9499)
        self._check_range("bytes=9000-20000", 9000, 9499)
        self._check_range("bytes=-700", 8800, 9499)
        self._check_range("bytes=-20000", 0, 9499)
        self._check_range("bytes=999-1000", 999, 1000)

    def test_range_crossing_blocks_reads_block_by_block(self) -> None:
        self.source.release_all()
        self._check_range("bytes=1500-3499", 1500, 3499)
        self.assertEqual(self.source.reads, [(1500, 500), (2000, 1000), (3000, 500)])
        self.assertEqual(self.source.waits, [1, 2, 3])

    def test_range_inside_one_block(self) -> None:
        self.source.release(2)
        self._check_range("bytes=2100-2199", 2100, 2199)
        self.assertEqual(self.source.waits, [2])
        self.assertEqual(self.source.reads, [(2100, 100)])

    def test_unsatisfiable(self) -> None:
        for header in ["bytes=9500-", "bytes=10000-10001", "bytes=-0"]:
            response = self._get(Range=header)
            self.assertEqual(response.status, 416, header)
            self.assertEqual(response.headers["content-range"], f"bytes */{SIZE}")
        self.assertEqual(self.source.waits, [])

    def test_unsatisfiable_empty(self) -> None:
        response = self._get(f"/stream/{EMPTY_ID}", Range="bytes=0-")
        self.assertEqual(response.status, 416)
        self.assertEqual(response.headers["content-range"], "bytes */0")

    def test_invalid_range_ignored(self) -> None:
        self.source.release_all()
        for header in ["bytes=5-2", "bytes=0-1,4-5", "items=0-1", "bytes=x-"]:
            response = self._get(Range=header)
            self.assertEqual(response.status, 200, header)
            self.assertEqual(response.body, DATA)

    def test_if_range_ignored(self) -> None:
        self.source.release_all()
        response = self._get(Range="bytes=0-9", If_Range='"whatever"')
        self.assertEqual(response.status, 206)
        self.assertEqual(response.body, DATA[:10])

    def test_head(self) -> None:
        response = self._get(method="HEAD")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-length"], str(SIZE))
        self.assertEqual(response.headers["accept-ranges"], "bytes")
        self.assertEqual(response.body, b"")
        # HEAD does not wait for (nor read) any block.
        self.assertEqual(self.source.waits, [])

    def test_head_range(self) -> None:
        response = self._get(method="HEAD", Range="bytes=-10")
        self.assertEqual(response.status, 206)
        self.assertEqual(response.headers["content-range"], f"bytes 9490-9499/{SIZE}")
        self.assertEqual(response.headers["content-length"], "10")
        self.assertEqual(response.body, b"")

    def test_empty_content(self) -> None:
        response = self._get(f"/stream/{EMPTY_ID}")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-length"], "0")
        self.assertEqual(response.body, b"")

    def test_unknown_content(self) -> None:
        response = self._get("/stream/" + "a" * 64)
        self.assertEqual(response.status, 404)
        self.assertEqual(self.provider.opened, ["a" * 64])

    def test_bad_ids(self) -> None:
        for bad in ["A" * 64, "a" * 63, "a" * 65, "g" * 64, "", "%C3%A9" + "a" * 62]:
            response = self._get("/stream/" + bad)
            self.assertEqual(response.status, 400, bad)
        self.assertEqual(self.provider.opened, [])

    def test_bad_paths(self) -> None:
        for path in ["/stream", f"/stream/{CONTENT_ID}/x", "/", "/other"]:
            response = self._get(path)
            self.assertEqual(response.status, 404, path)
        self.assertEqual(self.provider.opened, [])

    def test_post_not_allowed(self) -> None:
        response = self._get(method="POST")
        self.assertEqual(response.status, 405)
        self.assertEqual(response.headers["allow"], "GET, HEAD")

    def test_download_failed_is_503(self) -> None:
        response = self._get("/stream/" + "e" * 64)
        self.assertEqual(response.status, 503)
        self.assertEqual(response.headers["content-type"], "text/plain; charset=utf-8")

    def test_tracker_error_is_502(self) -> None:
        self.assertEqual(self._get("/stream/" + "d" * 64).status, 502)

    def test_unexpected_error_is_503_and_logged(self) -> None:
        self.provider.errors["c" * 64] = RuntimeError("bug")
        self.assertEqual(self._get("/stream/" + "c" * 64).status, 503)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_waits_block_by_block(self) -> None:
        """Nothing is sent beyond the blocks released so far."""
        connection = _Connection(self.site)
        connection.request(f"/stream/{CONTENT_ID}")
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual(self.source.pending, [0])

        self.source.release(0)
        self.assertEqual(connection.response().body, DATA[:BLOCK])
        self.assertEqual(self.source.pending, [1])

        self.source.release(2)  # out of order: nothing more yet
        self.assertEqual(connection.response().body, DATA[:BLOCK])

        self.source.release(1)  # blocks 1 and 2 go out
        self.assertEqual(connection.response().body, DATA[: 3 * BLOCK])
        self.assertEqual(self.source.pending, [3])

        for block in range(3, 10):
            self.source.release(block)
            self.assertEqual(connection.response().body, DATA[: min(SIZE, (block + 1) * BLOCK)])
        self.assertEqual(connection.response().status, 200)
        self.assertEqual(self.source.pending, [])

    def test_disconnect_cancels_wait(self) -> None:
        connection = _Connection(self.site)
        connection.request(f"/stream/{CONTENT_ID}")
        self.source.release(0)
        self.assertEqual(self.source.pending, [1])
        connection.disconnect()
        self.assertEqual(self.source.cancelled, [1])
        self.assertEqual(self.source.pending, [])
        self.source.release_all()
        self.assertEqual(self.source.reads, [(0, BLOCK)])

    def test_disconnect_while_opening_cancels_open(self) -> None:
        cancelled: list[object] = []
        opening: Deferred[IStreamSource] = Deferred(cancelled.append)

        @implementer(IStreamProvider)
        class Hanging:
            def open(self, content_id: str) -> Deferred[IStreamSource]:
                return opening

        connection = _Connection(make_stream_site(Hanging(), reactor=MemoryReactorClock()))
        connection.request(f"/stream/{CONTENT_ID}")
        connection.disconnect()
        self.assertEqual(cancelled, [opening])
        self.assertIsNone(self.successResultOf(opening))  # the CancelledError was consumed

    def test_failure_mid_stream_aborts(self) -> None:
        connection = _Connection(self.site)
        connection.request(f"/stream/{CONTENT_ID}")
        self.source.release(0)
        self.source.fail(DownloadFailed("every peer left"))
        response = connection.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-length"], str(SIZE))
        self.assertEqual(response.body, DATA[:BLOCK])  # truncated, never wrong
        self.assertTrue(connection.transport.disconnected)  # aborted, not closed cleanly
        self.assertEqual(self.source.reads, [(0, BLOCK)])

    def test_unexpected_wait_failure_aborts_and_logs(self) -> None:
        connection = _Connection(self.site)
        connection.request(f"/stream/{CONTENT_ID}")
        self.source.release(0)
        self.source.fail(RuntimeError("bug in the source"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(connection.response().body, DATA[:BLOCK])
        self.assertTrue(connection.transport.disconnected)

    def test_failure_before_first_byte_is_503(self) -> None:
        connection = _Connection(self.site)
        connection.request(f"/stream/{CONTENT_ID}", headers={"Range": "bytes=10-20"})
        self.source.fail(DownloadFailed("no peers"))
        response = connection.response()
        self.assertEqual(response.status, 503)
        self.assertNotIn("content-range", response.headers)
        self.assertEqual(int(response.headers["content-length"]), len(response.body))
        self.assertEqual(self.source.reads, [])

    def test_short_read_aborts(self) -> None:
        """A source returning fewer bytes than asked is a bug: log it and cut."""
        self.source.release_all()
        honest = self.source.read
        self.source.read = lambda offset, length: honest(offset, length)[: 1 if offset else None]  # type: ignore[method-assign]
        connection = _Connection(self.site)
        connection.request(f"/stream/{CONTENT_ID}")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(connection.response().body, DATA[:BLOCK])
        self.assertTrue(connection.transport.disconnected)

    def test_paused_channel_does_not_read(self) -> None:
        connection = _Connection(self.site)
        connection.request(f"/stream/{CONTENT_ID}")
        self.source.release(0)
        connection.channel.pauseProducing()  # what a full socket buffer does
        self.source.release(1)
        self.assertEqual(self.source.reads, [(0, BLOCK)])
        self.assertEqual(connection.response().body, DATA[:BLOCK])
        connection.channel.resumeProducing()
        self.assertEqual(self.source.reads, [(0, BLOCK), (BLOCK, BLOCK)])
        self.assertEqual(connection.response().body, DATA[: 2 * BLOCK])

    def test_transport_pausing_during_write(self) -> None:
        """Ready blocks are not all read in one go when the transport pushes back."""
        self.source.release_all()
        connection = _Connection(self.site, _PausingTransport())
        connection.request(f"/stream/{CONTENT_ID}")
        self.assertEqual(self.source.reads, [(0, BLOCK)])
        for blocks in range(2, 11):
            connection.channel.resumeProducing()
            self.assertEqual(len(self.source.reads), blocks)
        self.assertEqual(connection.response().body, DATA)


# --------------------------------------------------------------------------
# DummyRequest-level tests of the resource and the producer


class _PushRequest(DummyRequest):
    """A DummyRequest that keeps a push producer instead of pulling it."""

    producer: Any = None
    aborted = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming and self.producer is None
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    @property
    def startedWriting(self) -> bool:
        return bool(self.written)

    def loseConnection(self) -> None:
        self.aborted = True


class DummyRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.source, self.provider = _fixture()
        self.resource = StreamResource(self.provider)

    def test_bad_id(self) -> None:
        request = DummyRequest([b"not-an-id"])
        request.render(self.resource)
        self.assertEqual(request.responseCode, 400)
        self.assertEqual(request.finished, 1)

    def test_unknown(self) -> None:
        request = DummyRequest([b"b" * 64])
        request.render(self.resource)
        self.assertEqual(request.responseCode, 404)

    def test_get(self) -> None:
        self.source.release_all()
        request = _PushRequest([CONTENT_ID.encode()])
        request.render(self.resource)
        self.assertEqual(b"".join(request.written), DATA)
        self.assertEqual(request.finished, 1)
        self.assertIsNone(request.producer)

    def test_producer_paused_does_not_read(self) -> None:
        request = _PushRequest([])
        producer = BlockProducer(request, self.source, 500, 2500)  # type: ignore[arg-type]
        producer.start()
        self.assertIs(request.producer, producer)
        producer.pauseProducing()
        self.source.release(0)
        self.source.release(1)
        self.assertEqual(self.source.reads, [])
        self.assertEqual(request.written, [])
        producer.pauseProducing()
        producer.resumeProducing()
        self.assertEqual(self.source.reads, [(500, 500), (1000, 1000)])
        self.assertEqual(self.source.pending, [2])
        producer.pauseProducing()
        self.source.release(2)
        self.assertEqual(len(self.source.reads), 2)
        producer.resumeProducing()
        self.assertEqual(b"".join(request.written), DATA[500:2500])
        self.assertEqual(request.finished, 1)
        self.assertIsNone(request.producer)
        producer.resumeProducing()  # harmless once done
        producer.stopProducing()

    def test_stop_producing_cancels(self) -> None:
        request = _PushRequest([])
        producer = BlockProducer(request, self.source, 0, SIZE)  # type: ignore[arg-type]
        producer.start()
        producer.stopProducing()
        self.assertEqual(self.source.cancelled, [0])
        producer.resumeProducing()
        self.assertEqual(self.source.pending, [])
        self.assertEqual(request.finished, 0)

    def test_client_gone_notification(self) -> None:
        request = _PushRequest([])
        producer = BlockProducer(request, self.source, 0, SIZE)  # type: ignore[arg-type]
        producer.start()
        request.processingFailed(Failure(ConnectionError("gone")))
        self.assertEqual(self.source.cancelled, [0])

    def test_failure_without_transport_loses_connection(self) -> None:
        request = _PushRequest([])
        producer = BlockProducer(request, self.source, 0, SIZE)  # type: ignore[arg-type]
        producer.start()
        self.source.release(0)
        self.source.fail(DownloadFailed("gone"))
        self.assertTrue(request.aborted)
        self.assertEqual(request.finished, 0)
        self.assertEqual(b"".join(request.written), DATA[:BLOCK])


# --------------------------------------------------------------------------
# Real HTTP over loopback


class _Tracked:
    """Transports of both ends, to close them all before the test ends."""

    def __init__(self) -> None:
        self.transports: list[Any] = []

    def add(self, protocol: Any) -> Any:
        self.transports.append(protocol.transport)
        return protocol

    async def close_all(self) -> None:
        for transport in self.transports:
            if not transport.disconnected:
                transport.abortConnection()
        for _ in range(500):
            if all(transport.disconnected for transport in self.transports):
                return
            await deferLater(reactor, 0.01)
        raise AssertionError("connections still open")


class _TrackingFactory(WrappingFactory):
    """Records the transport of every server-side connection."""

    def __init__(self, wrapped: Site, tracked: _Tracked) -> None:
        super().__init__(wrapped)
        self._tracked = tracked

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        super().registerProtocol(p)
        self._tracked.add(p)


@implementer(IStreamClientEndpoint)
class _TrackingEndpoint:
    def __init__(self, inner: IStreamClientEndpoint, tracked: _Tracked) -> None:
        self._inner = inner
        self._tracked = tracked

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._inner.connect(protocolFactory).addCallback(self._tracked.add)


@implementer(IAgentEndpointFactory)
class _TrackingEndpoints:
    def __init__(self, tracked: _Tracked) -> None:
        self._tracked = tracked

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        inner = TCP4ClientEndpoint(reactor, uri.host.decode("ascii"), uri.port)
        return _TrackingEndpoint(inner, self._tracked)


class LoopbackTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.source, self.provider = _fixture()
        site = make_stream_site(self.provider, reactor=reactor)
        tracked = _Tracked()
        port = reactor.listenTCP(0, _TrackingFactory(site, tracked), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(tracked.close_all)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent.usingEndpointFactory(reactor, _TrackingEndpoints(tracked), pool=pool)
        self.client = treq.client.HTTPClient(agent)
        self.url = f"http://127.0.0.1:{port.getHost().port}/stream/"

    async def _until(self, predicate: Callable[[], bool]) -> None:
        for _ in range(500):
            if predicate():
                return
            await deferLater(reactor, 0.01)
        raise AssertionError("condition never became true")

    async def test_full_get(self) -> None:
        self.source.release_all()
        response = await self.client.get(self.url + CONTENT_ID)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["video/mp2t"])
        self.assertEqual(await response.content(), DATA)

    async def test_range(self) -> None:
        self.source.release_all()
        response = await self.client.get(
            self.url + CONTENT_ID, headers=Headers({"Range": ["bytes=1500-3499"]})
        )
        self.assertEqual(response.code, 206)
        self.assertEqual(response.headers.getRawHeaders("content-range"), [f"bytes 1500-3499/{SIZE}"])
        self.assertEqual(await response.content(), DATA[1500:3500])

    async def test_head(self) -> None:
        response = await self.client.head(self.url + CONTENT_ID)
        self.assertEqual(response.code, 200)
        # The client keeps HEAD's Content-Length as a header (length is 0).
        self.assertEqual(response.headers.getRawHeaders("content-length"), [str(SIZE)])
        self.assertEqual(await response.content(), b"")

    async def test_errors(self) -> None:
        response = await self.client.get(self.url + "a" * 64)
        self.assertEqual(response.code, 404)
        await response.content()
        response = await self.client.get(self.url + "xyz")
        self.assertEqual(response.code, 400)
        await response.content()
        response = await self.client.get(self.url + CONTENT_ID, headers=Headers({"Range": ["bytes=9999-"]}))
        self.assertEqual(response.code, 416)
        await response.content()

    async def test_waits_for_block(self) -> None:
        """A request for block 1 does not complete until block 1 is released."""
        self.source.release(0)
        self.source.release(2)
        getting = self.client.get(self.url + CONTENT_ID, headers=Headers({"Range": ["bytes=1000-1999"]}))
        await self._until(lambda: self.source.pending == [1])
        await deferLater(reactor, 0.05)
        self.assertNoResult(getting)
        self.source.release(1)
        response = await getting
        self.assertEqual(response.code, 206)
        self.assertEqual(await response.content(), DATA[1000:2000])

    async def test_streams_while_downloading(self) -> None:
        for block in range(10):
            reactor.callLater(0.005 * block, self.source.release, block)
        response = await self.client.get(self.url + CONTENT_ID)
        self.assertEqual(await response.content(), DATA)

    async def test_disconnect_cancels_wait(self) -> None:
        getting = self.client.get(self.url + CONTENT_ID)
        await self._until(lambda: self.source.pending == [0])
        getting.cancel()
        failed: list[Failure] = []
        getting.addErrback(failed.append)
        self.assertEqual(len(failed), 1)
        await self._until(lambda: self.source.cancelled == [0])
        self.assertEqual(self.source.pending, [])

    async def test_failure_mid_stream_truncates(self) -> None:
        self.source.release(0)
        self.source.release(1)
        response = await self.client.get(self.url + CONTENT_ID, unbuffered=True)
        self.assertEqual(response.length, SIZE)
        received: list[bytes] = []
        collecting = treq.collect(response, received.append)
        await self._until(lambda: self.source.pending == [2])
        self.source.fail(DownloadFailed("every peer left"))
        outcome: list[Failure] = []
        await collecting.addErrback(outcome.append)
        self.assertEqual(len(outcome), 1)
        self.assertFalse(outcome[0].check(ResponseDone))
        self.assertEqual(b"".join(received), DATA[: 2 * BLOCK])
