"""
The lean Range client: answers checked strictly, bodies read into reusable
buffers, keep-alive and pipelined connections.

Most tests drive one end of a socket pair by hand (the client's connections
registered with a L{MemoryReactorClock}, whose clock times them out); the
last ones talk to a real twisted.web server on loopback.
"""

from __future__ import annotations

import os
import select
import socket
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.web.server import Site
from twisted.web.static import File

from meshstream.errors import SourceError
from meshstream.rangeclient import (
    CONNECTIONS_PER_HOST,
    HTTP_TIMEOUT,
    PIPELINE_DEPTH,
    WARM_UP,
    BufferPool,
    RangeClient,
    _Target,
    check_head,
)

reactor: Any = _reactor
URL = "http://127.0.0.1:8080/c.bin"
DATA = bytes(range(256)) * 4


def answer(first: int, last: int, body: bytes | None = None, extra: bytes = b"") -> bytes:
    body = DATA[first : last + 1] if body is None else body
    return (
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\nContent-Length: %d\r\n%s\r\n"
        % (first, last, len(DATA), len(body), extra)
    ) + body


class BufferPoolTests(unittest.SynchronousTestCase):
    def test_reuse_by_size(self) -> None:
        pool = BufferPool(keep=1)
        a = pool.take(10)
        self.assertEqual(len(a), 10)
        pool.give(memoryview(a))
        self.assertIs(pool.take(10), a)
        self.assertIsNot(pool.take(10), a)
        self.assertEqual(len(pool.take(5)), 5)

    def test_given_twice_handed_out_once(self) -> None:
        pool = BufferPool()
        a = pool.take(10)
        pool.give(a)
        pool.give(memoryview(a))
        self.assertIs(pool.take(10), a)
        self.assertIsNot(pool.take(10), a)

    def test_keeps_at_most_keep(self) -> None:
        pool = BufferPool(keep=2)
        bufs = [pool.take(4) for _ in range(3)]
        for b in bufs:
            pool.give(b)
        self.assertEqual(
            {id(pool.take(4)) for _ in range(3)} & {id(b) for b in bufs}, {id(bufs[0]), id(bufs[1])}
        )

    def test_ignores_bytes(self) -> None:
        pool = BufferPool()
        pool.give(b"0123")
        pool.give(memoryview(b"0123"))
        self.assertIsInstance(pool.take(4), bytearray)


class TargetTests(unittest.SynchronousTestCase):
    def test_request_head(self) -> None:
        t = _Target("http://user:pw@[::1]:8080/a/b.bin?x=1")
        self.assertEqual((t.host, t.port), ("::1", 8080))
        self.assertEqual(
            t.request_head, b"GET /a/b.bin?x=1 HTTP/1.1\r\nHost: [::1]:8080\r\nAccept-Encoding: identity\r\n"
        )
        t = _Target("http://example.com")
        self.assertEqual((t.host, t.port), ("example.com", 80))
        self.assertTrue(t.request_head.startswith(b"GET / HTTP/1.1\r\nHost: example.com\r\n"))
        for bad in ("https://example.com/x", "http:///x", "ftp://h/x"):
            self.assertRaises(ValueError, _Target, bad)


class CheckHeadTests(unittest.SynchronousTestCase):
    def head(self, *lines: str) -> bytes:
        return "\r\n".join(lines).encode()

    def test_partial_content(self) -> None:
        h = self.head("HTTP/1.1 206 Partial Content", "Content-Range: bytes 10-19/100", "Content-Length: 10")
        self.assertEqual(check_head(h, URL, 10, 19), (False, True))

    def test_whole_content(self) -> None:
        h = self.head("HTTP/1.1 200 OK", "content-length: 100", "Connection: close")
        self.assertEqual(check_head(h, URL, 0, 99), (False, False))

    def test_http_1_0(self) -> None:
        h = self.head("HTTP/1.0 206 Partial Content", "Content-Range: bytes 0-9/*", "Content-Length: 10")
        self.assertEqual(check_head(h, URL, 0, 9), (False, False))
        self.assertEqual(check_head(h + b"\r\nConnection: Keep-Alive", URL, 0, 9), (False, True))

    def test_informational(self) -> None:
        self.assertEqual(check_head(b"HTTP/1.1 100 Continue", URL, 0, 9), (True, True))

    def test_refused(self) -> None:
        cases = {
            "no HTTP status line": ["ICY 200 OK"],
            "HTTP 404": ["HTTP/1.1 404 Not Found", "Content-Length: 10"],
            "HTTP 101": ["HTTP/1.1 101 Switching Protocols"],
            "HTTP 200": ["HTTP/1.1 200 OK", "Content-Length: 10"],  # asked from byte 10
            "range b'bytes 0-9/100'": [
                "HTTP/1.1 206 P",
                "Content-Range: bytes 0-9/100",
                "Content-Length: 10",
            ],
            "range b''": ["HTTP/1.1 206 P", "Content-Length: 10"],
            "'chunked' body": [
                "HTTP/1.1 206 P",
                "Content-Range: bytes 10-19/100",
                "Transfer-Encoding: chunked",
            ],
            "no single Content-Length": [
                "HTTP/1.1 206 P",
                "Content-Range: bytes 10-19/100",
                "Content-Length: 10",
                "Content-Length: 11",
            ],
            "body of 11 bytes": ["HTTP/1.1 206 P", "Content-Range: bytes 10-19/100", "Content-Length: 11"],
            "malformed header": ["HTTP/1.1 206 P", " folded: x", "Content-Length: 10"],
        }
        for message, lines in cases.items():
            with self.assertRaises(SourceError, msg=message) as cm:
                check_head(self.head(*lines), URL, 10, 19)
            self.assertIn(message, str(cm.exception))


class _Pair:
    """A RangeClient whose sockets are socket pairs the test plays the server on."""

    def __init__(self, test: unittest.SynchronousTestCase, **kw: Any) -> None:
        kw.setdefault("depth", 4)  # pipelining is what most tests look at
        self.reactor = MemoryReactorClock()
        self.servers: list[socket.socket] = []
        self.client = RangeClient(self.reactor, open_socket=self._open, **kw)
        test.addCleanup(self.close)

    def _open(self, family: int, address: tuple[Any, ...]) -> socket.socket:
        assert address == ("127.0.0.1", 8080), address
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.settimeout(1.0)
        self.servers.append(theirs)
        return ours

    def close(self) -> None:
        self.client.close()
        for s in self.servers:
            s.close()

    def connections(self) -> list[Any]:
        return sorted(self.reactor.readers | self.reactor.writers, key=lambda c: c.fileno())

    def connect(self) -> None:
        """Every connection attempt succeeds: requests go out."""
        for conn in list(self.reactor.writers):
            conn.doWrite()

    def requests(self, server: int = -1) -> list[bytes]:
        data = self.servers[server].recv(65536)
        return [r for r in data.split(b"\r\n\r\n") if r]

    def reply(self, data: bytes, server: int = -1) -> None:
        self.servers[server].sendall(data)
        self.pump()

    def pump(self) -> None:
        for _ in range(10):
            for conn in list(self.reactor.readers):
                conn.doRead()


class RangeClientTests(unittest.SynchronousTestCase):
    def test_normal_body(self) -> None:
        p = _Pair(self)
        d = p.client.fetch(URL, 10, 209)
        self.assertNoResult(d)
        p.connect()
        [req] = p.requests()
        self.assertEqual(
            req.split(b"\r\n"),
            [
                b"GET /c.bin HTTP/1.1",
                b"Host: 127.0.0.1:8080",
                b"Accept-Encoding: identity",
                b"Range: bytes=10-209",
            ],
        )
        p.reply(answer(10, 209)[:50])
        self.assertNoResult(d)
        p.reply(answer(10, 209)[50:])
        body = self.successResultOf(d)
        self.assertIsInstance(body, memoryview)
        self.assertEqual(bytes(body), DATA[10:210])

    def test_body_in_many_pieces(self) -> None:
        p = _Pair(self)
        d = p.client.fetch(URL, 0, 999)
        p.connect()
        p.requests()
        data = answer(0, 999)
        for i in range(0, len(data), 7):
            p.reply(data[i : i + 7])
        self.assertEqual(bytes(self.successResultOf(d)), DATA[:1000])

    def test_whole_content_with_200(self) -> None:
        p = _Pair(self)
        d = p.client.fetch(URL, 0, len(DATA) - 1)
        p.connect()
        p.requests()
        p.reply(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(DATA) + DATA)
        self.assertEqual(bytes(self.successResultOf(d)), DATA)

    def test_short_body_then_close(self) -> None:
        p = _Pair(self)
        d = p.client.fetch(URL, 10, 19)
        p.connect()
        p.requests()
        p.servers[0].sendall(answer(10, 19)[:-5])
        p.servers[0].close()
        p.pump()
        f = self.failureResultOf(d, SourceError)
        self.assertIn("sent 5 of 10 bytes, then closed", f.getErrorMessage())
        self.assertEqual(p.connections(), [])

    def test_close_before_the_head_retries_once(self) -> None:
        """A keep-alive connection the server closed: the request goes out again on a new one, once."""
        p = _Pair(self)
        d = p.client.fetch(URL, 10, 19)
        p.connect()
        p.requests()
        p.servers[0].close()
        p.pump()
        self.assertNoResult(d)
        self.assertEqual(len(p.servers), 2)
        p.connect()
        p.requests()
        p.servers[1].close()
        p.pump()
        self.assertIn(
            "connection lost before an answer", self.failureResultOf(d, SourceError).getErrorMessage()
        )

    def test_more_bytes_announced_than_asked(self) -> None:
        p = _Pair(self)
        d = p.client.fetch(URL, 10, 19)
        p.connect()
        p.requests()
        p.reply(answer(10, 19, DATA[10:30]).replace(b"bytes 10-29/", b"bytes 10-19/"))
        self.assertIn("body of 20 bytes, 10 asked", self.failureResultOf(d, SourceError).getErrorMessage())

    def test_more_bytes_sent_than_announced(self) -> None:
        """Never more than asked is taken: the surplus spoils the next answer, which fails."""
        p = _Pair(self, connections=1)
        d1 = p.client.fetch(URL, 10, 19)
        d2 = p.client.fetch(URL, 20, 29)
        p.connect()
        self.assertEqual(len(p.requests()), 2)
        p.reply(answer(10, 19) + b"surplus" + answer(20, 29))
        self.assertEqual(bytes(self.successResultOf(d1)), DATA[10:20])
        self.assertIn("no HTTP status line", self.failureResultOf(d2, SourceError).getErrorMessage())

    def test_bytes_nobody_asked_for(self) -> None:
        p = _Pair(self)
        d = p.client.fetch(URL, 10, 19)
        p.connect()
        p.requests()
        p.reply(answer(10, 19) + b"HTTP/1.1 206 Partial Content\r\n")
        self.successResultOf(d)
        self.assertEqual(p.connections(), [])
        # The next request gets a new connection.
        d = p.client.fetch(URL, 20, 29)
        p.connect()
        p.requests()
        p.reply(answer(20, 29))
        self.assertEqual(bytes(self.successResultOf(d)), DATA[20:30])
        self.assertEqual(len(p.servers), 2)

    def test_wrong_content_range(self) -> None:
        """A wrong answer fails its request; one pipelined behind it is sent again elsewhere."""
        p = _Pair(self, connections=1)
        d1 = p.client.fetch(URL, 10, 19)
        d2 = p.client.fetch(URL, 20, 29)
        p.connect()
        p.requests()
        p.reply(answer(11, 20))
        self.assertIn(
            "answered range b'bytes 11-20/1024'", self.failureResultOf(d1, SourceError).getErrorMessage()
        )
        self.assertNoResult(d2)
        p.connect()
        self.assertEqual(p.requests(1), [p.client._targets[URL].request_head + b"Range: bytes=20-29"])
        p.reply(answer(20, 29), 1)
        self.assertEqual(bytes(self.successResultOf(d2)), DATA[20:30])

    def test_not_206(self) -> None:
        p = _Pair(self)
        d = p.client.fetch(URL, 10, 19)
        p.connect()
        p.requests()
        p.reply(b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\r\n")
        self.assertIn("answered HTTP 416", self.failureResultOf(d, SourceError).getErrorMessage())
        d = p.client.fetch(URL, 10, 19)
        p.connect()
        p.requests()
        p.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + DATA)
        self.assertIn("answered HTTP 200", self.failureResultOf(d, SourceError).getErrorMessage())

    def test_chunked_refused(self) -> None:
        p = _Pair(self)
        d = p.client.fetch(URL, 10, 19)
        p.connect()
        p.requests()
        p.reply(
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-19/1024\r\n"
            b"Transfer-Encoding: chunked\r\n\r\na\r\n" + DATA[10:20] + b"\r\n0\r\n\r\n"
        )
        self.assertIn("'chunked' body", self.failureResultOf(d, SourceError).getErrorMessage())
        self.assertEqual(p.connections(), [])

    def test_head_too_long(self) -> None:
        p = _Pair(self)
        d = p.client.fetch(URL, 10, 19)
        p.connect()
        p.requests()
        p.reply(b"HTTP/1.1 206 Partial Content\r\n" + b"X-Padding: 0123456789abcdef\r\n" * 4000)
        self.assertIn("head over", self.failureResultOf(d, SourceError).getErrorMessage())

    def test_informational_head_skipped(self) -> None:
        p = _Pair(self)
        d = p.client.fetch(URL, 10, 19)
        p.connect()
        p.requests()
        p.reply(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(10, 19))
        self.assertEqual(bytes(self.successResultOf(d)), DATA[10:20])

    def test_keep_alive_and_pipelining(self) -> None:
        """Requests go out back to back on one connection, answers come in order, the connection stays."""
        p = _Pair(self, connections=1, depth=4)
        ds = [p.client.fetch(URL, i * 100, i * 100 + 99) for i in range(6)]
        p.connect()
        self.assertEqual(len(p.servers), 1)
        self.assertEqual(
            [r.rsplit(b"=", 1)[1] for r in p.requests()], [b"0-99", b"100-199", b"200-299", b"300-399"]
        )
        # All four answers in one go: the bodies are split out exactly.
        p.reply(b"".join(answer(i * 100, i * 100 + 99) for i in range(4)))
        for i in range(4):
            self.assertEqual(bytes(self.successResultOf(ds[i])), DATA[i * 100 : i * 100 + 100])
        # Room again: the last two went out on the same connection.
        self.assertEqual([r.rsplit(b"=", 1)[1] for r in p.requests()], [b"400-499", b"500-599"])
        p.reply(answer(400, 499) + answer(500, 599))
        self.assertEqual(bytes(self.successResultOf(ds[5])), DATA[500:600])
        d = p.client.fetch(URL, 0, 9)
        p.requests()
        p.reply(answer(0, 9))
        self.assertEqual(bytes(self.successResultOf(d)), DATA[:10])
        self.assertEqual(len(p.servers), 1)
        self.assertEqual(len(p.connections()), 1)

    def test_one_connection_then_more_when_answers_lag(self) -> None:
        """
        By default: no pipelining, one connection per host while bodies are
        there as soon as their heads; another one once heads keep coming
        without their bodies (after each connection's warm-up), up to
        CONNECTIONS_PER_HOST.
        """
        p = _Pair(self, depth=PIPELINE_DEPTH)
        ds = [p.client.fetch(URL, i * 10, i * 10 + 9) for i in range(60)]
        self.assertEqual(len(p.servers), 1)

        def serve_all(late: bool) -> int:
            """Answer what every connection was asked, the body with its head or after it."""
            p.connect()
            asked = []
            for server in range(len(p.servers)):
                if select.select([p.servers[server]], [], [], 0)[0]:
                    [request] = p.requests(server)
                    first = int(request.rsplit(b"=", 1)[1].split(b"-")[0])
                    asked.append((server, answer(first, first + 9)))
            for server, data in asked:
                p.reply(data[:-10] if late else data, server)
            for server, data in asked:
                if late:
                    p.reply(data[-10:], server)
            return len(asked)

        # Bodies there with their heads: one connection, whatever came late
        # during its warm-up.
        for late in [True] * WARM_UP + [False] * 5:
            self.assertEqual(serve_all(late), 1)
        self.assertEqual(len(p.servers), 1)
        # Heads without their bodies, again and again: a second connection.
        for _ in range(4):
            self.assertEqual(serve_all(True), 1)
        self.assertEqual(len(p.servers), 2)
        # And more while it lasts, never more than the most.
        served = 5 + WARM_UP + 4
        while served < len(ds):
            served += serve_all(True)
        self.assertEqual(len(p.servers), CONNECTIONS_PER_HOST)
        self.assertEqual(
            [bytes(self.successResultOf(d)) for d in ds], [DATA[i * 10 : i * 10 + 10] for i in range(60)]
        )

    def test_spread_over_connections(self) -> None:
        p = _Pair(self, connections=2, start_connections=2, depth=2)
        ds = [p.client.fetch(URL, i, i) for i in range(5)]
        self.assertEqual(len(p.servers), 2)
        p.connect()
        self.assertEqual([len(p.requests(i)) for i in (0, 1)], [2, 2])
        p.reply(answer(0, 0) + answer(2, 2), 0)
        self.assertEqual([r.rsplit(b"=", 1)[1] for r in p.requests(0)], [b"4-4"])
        p.reply(answer(1, 1) + answer(3, 3), 1)
        p.reply(answer(4, 4), 0)
        self.assertEqual([bytes(self.successResultOf(d)) for d in ds], [DATA[i : i + 1] for i in range(5)])

    def test_connection_close_header(self) -> None:
        """A server that says close gets no more requests on that connection; the queued one goes elsewhere."""
        p = _Pair(self, connections=1)
        d1 = p.client.fetch(URL, 10, 19)
        d2 = p.client.fetch(URL, 20, 29)
        p.connect()
        p.requests()
        p.reply(answer(10, 19, extra=b"Connection: close\r\n"))
        self.assertEqual(bytes(self.successResultOf(d1)), DATA[10:20])
        self.assertNoResult(d2)
        self.assertEqual(len(p.servers), 2)
        p.connect()
        p.requests(1)
        p.reply(answer(20, 29), 1)
        self.assertEqual(bytes(self.successResultOf(d2)), DATA[20:30])

    def test_timeout(self) -> None:
        p = _Pair(self, connections=1, timeout=5.0)
        d1 = p.client.fetch(URL, 10, 19)
        p.reactor.advance(2)
        d2 = p.client.fetch(URL, 20, 29)
        p.connect()
        p.requests()
        p.reply(answer(10, 19)[:-3])
        p.reactor.advance(3)
        self.assertIn("timed out after 5s", self.failureResultOf(d1, SourceError).getErrorMessage())
        # The one behind it is sent again on a new connection, with its own deadline.
        self.assertNoResult(d2)
        p.connect()
        p.requests(1)
        p.reactor.advance(1.5)
        self.assertNoResult(d2)
        p.reactor.advance(0.5)
        self.failureResultOf(d2, SourceError)
        self.assertEqual(p.reactor.getDelayedCalls(), [])

    def test_default_timeout(self) -> None:
        p = _Pair(self)
        d = p.client.fetch(URL, 10, 19)
        p.connect()
        p.reactor.advance(HTTP_TIMEOUT - 0.1)
        self.assertNoResult(d)
        p.reactor.advance(0.1)
        self.failureResultOf(d, SourceError)

    def test_connect_timeout(self) -> None:
        p = _Pair(self, connect_timeout=2.0)
        d = p.client.fetch(URL, 10, 19)
        p.reactor.advance(2)
        self.assertIn("cannot connect", self.failureResultOf(d, SourceError).getErrorMessage())
        self.assertEqual(p.connections(), [])

    def test_cancel(self) -> None:
        p = _Pair(self, connections=1)
        d1 = p.client.fetch(URL, 10, 19)
        d2 = p.client.fetch(URL, 20, 29)
        p.connect()
        p.requests()
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        p.connect()
        p.reply(answer(20, 29), 1)
        self.assertEqual(bytes(self.successResultOf(d2)), DATA[20:30])

    def test_close(self) -> None:
        p = _Pair(self, connections=1, depth=1)
        d1 = p.client.fetch(URL, 10, 19)
        d2 = p.client.fetch(URL, 20, 29)
        p.client.close()
        self.failureResultOf(d1, SourceError)
        self.failureResultOf(d2, SourceError)
        self.assertEqual(p.connections(), [])
        self.assertEqual(p.reactor.getDelayedCalls(), [])

    def test_buffers_recycled(self) -> None:
        p = _Pair(self)
        d = p.client.fetch(URL, 10, 19)
        p.connect()
        p.requests()
        p.reply(answer(10, 19))
        body = self.successResultOf(d)
        p.client.release(body)
        d = p.client.fetch(URL, 20, 29)
        p.requests()
        p.reply(answer(20, 29))
        again = self.successResultOf(d)
        self.assertIs(again.obj, body.obj)
        self.assertEqual(bytes(again), DATA[20:30])

    def test_bad_urls(self) -> None:
        p = _Pair(self)
        for url in ("https://127.0.0.1/x", "http:///x"):
            self.failureResultOf(p.client.fetch(url, 0, 1), SourceError)
        self.assertRaises(ValueError, p.client.fetch, URL, 5, 4)
        self.assertRaises(ValueError, RangeClient, p.reactor, depth=0)


class _Counting(Site):
    """A twisted.web site that counts its connections."""

    connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)


class _PipelinedRangeServer(Protocol):
    """
    A minimal HTTP/1.1 Range server that answers pipelined requests in order
    (twisted.web's static.File stalls on them, hence this one).
    """

    def __init__(self, data: bytes, log: list[int]) -> None:
        self.data = data
        self.log = log
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        n = 0
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            rng = [line for line in head.split(b"\r\n") if line.lower().startswith(b"range: bytes=")]
            first, last = (int(x) for x in rng[0].split(b"=")[1].split(b"-"))
            body = self.data[first : last + 1]
            self.transport.write(  # type: ignore[union-attr]
                b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\nContent-Length: %d\r\n\r\n"
                % (first, last, len(self.data), len(body))
                + body
            )
            n += 1
        self.log.append(n)


class RealServerTests(unittest.TestCase):
    """Against real servers on loopback, with the real reactor."""

    timeout = 30

    def setUp(self) -> None:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        self.data = os.urandom(3 * 1024 * 1024 + 17)
        with open(os.path.join(d, "c.bin"), "wb") as f:
            f.write(self.data)
        self.site = _Counting(File(d))
        port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    def client(self, **kw: Any) -> RangeClient:
        client = RangeClient(reactor, **kw)
        self.addCleanup(client.close)
        return client

    def ranges(self, step: int) -> list[tuple[int, int]]:
        return [(a, min(a + step, len(self.data)) - 1) for a in range(0, len(self.data), step)]

    def test_keep_alive(self) -> Deferred[None]:
        """twisted.web's static.File: many ranges over at most C{connections} kept-alive connections."""
        return ensureDeferred(self._keep_alive())

    async def _keep_alive(self) -> None:
        client = self.client(connections=2, start_connections=2)
        url = f"http://127.0.0.1:{self.port}/c.bin"
        bodies = await gatherResults([client.fetch(url, a, b) for a, b in self.ranges(100_000)])
        self.assertEqual(b"".join(bytes(b) for b in bodies), self.data)
        bodies = await gatherResults([client.fetch(url, a, b) for a, b in self.ranges(1_000_000)])
        self.assertEqual(b"".join(bytes(b) for b in bodies), self.data)
        self.assertEqual(self.site.connections, 2)

    def test_pipelined(self) -> Deferred[None]:
        return ensureDeferred(self._pipelined())

    async def _pipelined(self) -> None:
        from twisted.internet.protocol import Factory

        log: list[int] = []
        conns: list[_PipelinedRangeServer] = []

        def server() -> _PipelinedRangeServer:
            conns.append(_PipelinedRangeServer(self.data, log))
            return conns[-1]

        factory = Factory.forProtocol(server)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = self.client(connections=1, depth=4)
        url = f"http://127.0.0.1:{port.getHost().port}/c.bin"
        bodies = await gatherResults([client.fetch(url, a, b) for a, b in self.ranges(256 * 1024)])
        self.assertEqual(b"".join(bytes(b) for b in bodies), self.data)
        # One connection, and several requests did arrive together.
        self.assertEqual(len(conns), 1)
        self.assertEqual(sum(log), len(self.ranges(256 * 1024)))
        self.assertGreater(max(log), 1)

    def test_host_name(self) -> Deferred[None]:
        return ensureDeferred(self._host_name())

    async def _host_name(self) -> None:
        client = self.client()
        body = await client.fetch(f"http://localhost:{self.port}/c.bin", 5, 1000)
        self.assertEqual(bytes(body), self.data[5:1001])

    def test_missing_file(self) -> Deferred[None]:
        return ensureDeferred(self._missing())

    async def _missing(self) -> None:
        client = self.client()
        with self.assertRaises(SourceError) as cm:
            await client.fetch(f"http://127.0.0.1:{self.port}/nothing.bin", 0, 9)
        self.assertIn("answered HTTP 404", str(cm.exception))

    def test_connection_refused(self) -> Deferred[None]:
        return ensureDeferred(self._refused())

    async def _refused(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        client = self.client()
        with self.assertRaises(SourceError) as cm:
            await client.fetch(f"http://127.0.0.1:{port}/c.bin", 0, 9)
        self.assertIn("cannot connect", str(cm.exception))
