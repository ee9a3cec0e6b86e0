# -*- test-case-name: tests.test_tracker_http1 -*-
"""
Tests for L{meshstream.tracker.http1}: the API's HTTP/1.1 server on an
in-memory transport and a L{Clock} (the API itself over real sockets is
tests/test_tracker_api.py's and tests/test_tracker_fuzz.py's).
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from meshstream.tracker import http1
from meshstream.tracker.http1 import ApiChannel, ApiFactory, ApiRequest, Response


class Parsed:
    """One answer read back from the transport."""

    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> object:
        return json.loads(self.body)


def parse_answers(data: bytes, head_only: bool = False) -> list[Parsed]:
    """Split a transport's bytes into answers (by their Content-Length)."""
    answers = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, head
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b": ")
            headers[name.lower()] = value
        if status == 100:
            answers.append(Parsed(status, headers, b""))
            continue
        length = 0 if head_only else int(headers[b"content-length"])
        answers.append(Parsed(status, headers, data[:length]))
        data = data[length:]
    return answers


class Harness:
    """A factory whose handler answers each request with what it saw (or waits)."""

    def __init__(self, case: unittest.TestCase, max_body: int = 1000, idle_timeout: float = 60.0) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.seen: list[ApiRequest] = []
        self.waiting: list[Deferred[Response]] = []
        self.hold = False
        self.refused: list[tuple[bytes, bytes, str, int, str]] = []
        self.factory = ApiFactory(
            self.handle,
            self.clock,
            max_body=max_body,
            idle_timeout=idle_timeout,
            refused=lambda *a: self.refused.append(a),
        )
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        self.channel = self.factory.buildProtocol(None)
        assert isinstance(self.channel, ApiChannel)
        self.channel.makeConnection(self.transport)

    def handle(self, request: ApiRequest) -> Deferred[Response]:
        self.seen.append(request)
        if self.hold:
            d: Deferred[Response] = Deferred()
            self.waiting.append(d)
            return d
        return succeed(self.echo(request))

    @staticmethod
    def echo(request: ApiRequest) -> Response:
        body = json.dumps(
            {
                "method": request.method.decode(),
                "segments": request.segments,
                "args": {
                    k.decode("latin-1"): [v.decode("latin-1") for v in vs] for k, vs in request.args.items()
                },
                "body": request.body.decode("latin-1"),
                "client": request.client,
            }
        ).encode()
        return 200, ((b"Content-Type", b"application/json"),), body

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def answers(self, head_only: bool = False) -> list[Parsed]:
        out = parse_answers(self.transport.value(), head_only)
        self.transport.clear()
        return out


def get(path: bytes = b"/api/v1/health", *headers: bytes, version: bytes = b"1.1") -> bytes:
    lines = [b"GET " + path + b" HTTP/" + version, b"Host: t", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def post(path: bytes, body: bytes, *headers: bytes) -> bytes:
    lines = [b"POST " + path + b" HTTP/1.1", b"Host: t", b"Content-Length: %d" % len(body), *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class RequestTests(unittest.SynchronousTestCase):
    def test_what_the_handler_sees(self) -> None:
        h = Harness(self)
        h.send(
            b"GET /api/v1/contents/ab%2Fc/nodes?limit=5&exclude=a&exclude=b&flag=&bare HTTP/1.1\r\n"
            b"Host: t\r\nAuthorization: Bearer x\r\nX-Twice: 1\r\nx-twice: 2\r\n\r\n"
        )
        (request,) = h.seen
        self.assertEqual(request.method, b"GET")
        self.assertEqual(request.path, b"/api/v1/contents/ab%2Fc/nodes")
        self.assertEqual(request.segments, ["api", "v1", "contents", "ab/c", "nodes"])
        # As twisted.web's: a blank value is kept, a name without "=" is not.
        self.assertEqual(request.args, {b"limit": [b"5"], b"exclude": [b"a", b"b"], b"flag": [b""]})
        self.assertEqual(request.header(b"authorization"), b"Bearer x")
        self.assertEqual(request.header(b"x-twice"), b"1, 2")
        self.assertEqual(request.client, "10.1.2.3")
        self.assertIsNone(request.principal)
        (answer,) = h.answers()
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.headers[b"content-type"], b"application/json")
        self.assertEqual(answer.headers[b"date"], b"Tue, 14 Nov 2023 22:13:20 GMT")
        self.assertNotIn(b"connection", answer.headers)
        self.assertFalse(h.transport.disconnecting)

    def test_bad_utf8_path_and_query(self) -> None:
        """Bytes that are not UTF-8 are replaced in segments, kept in args (as twisted.web does)."""
        h = Harness(self)
        h.send(get(b"/a%ff/b?q=%ff%80"))
        (request,) = h.seen
        self.assertEqual(request.segments, ["a\ufffd", "b"])
        self.assertEqual(request.args, {b"q": [b"\xff\x80"]})

    def test_raw_non_ascii_target_refused(self) -> None:
        h = Harness(self)
        h.send(get(b"/a\x80"))
        (answer,) = h.answers()
        self.assertEqual(answer.status, 400)
        self.assertEqual(h.seen, [])

    def test_body_by_length_and_chunked(self) -> None:
        h = Harness(self)
        h.send(post(b"/x", b'{"a": 1}'))
        h.send(
            b"POST /y HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        self.assertEqual([r.body for r in h.seen], [b'{"a": 1}', b"abcde"])
        self.assertEqual([a.status for a in h.answers()], [200, 200])

    def test_split_anywhere(self) -> None:
        """A request fed one byte at a time is the same request."""
        h = Harness(self)
        data = post(b"/api/v1/announce?x=1", b"0123456789", b"Authorization: Bearer t")
        for i in range(len(data)):
            h.send(data[i : i + 1])
        (request,) = h.seen
        self.assertEqual(
            (request.body, request.args, request.header(b"authorization")),
            (b"0123456789", {b"x": [b"1"]}, b"Bearer t"),
        )

    def test_head_has_no_body(self) -> None:
        h = Harness(self)
        h.send(b"HEAD /api/v1/health HTTP/1.1\r\nHost: t\r\n\r\n")
        raw = h.transport.value()
        self.assertTrue(raw.endswith(b"\r\n\r\n"), raw)
        (answer,) = parse_answers(raw, head_only=True)
        self.assertGreater(int(answer.headers[b"content-length"]), 0)


class KeepAliveTests(unittest.SynchronousTestCase):
    def test_pipelined_answers_in_order(self) -> None:
        """Requests sent together are handled one at a time and answered in order."""
        h = Harness(self)
        h.hold = True
        h.send(get(b"/1") + get(b"/2") + get(b"/3"))
        self.assertEqual(len(h.seen), 1)  # the next waits for the first's answer
        h.waiting[0].callback(Harness.echo(h.seen[0]))
        self.assertEqual(len(h.seen), 2)
        h.hold = False
        h.waiting[1].callback(Harness.echo(h.seen[1]))
        answers = h.answers()
        self.assertEqual([a.json()["segments"] for a in answers], [["1"], ["2"], ["3"]])  # type: ignore[index]

    def test_pipeline_bounded(self) -> None:
        """Past MAX_PIPELINE waiting requests the transport is paused, and resumed as they drain."""
        h = Harness(self)
        h.hold = True
        h.send(get() * (http1.MAX_PIPELINE + 1))
        self.assertEqual(h.transport.producerState, "paused")
        while h.waiting:
            d = h.waiting.pop(0)
            d.callback(Harness.echo(h.seen[0]))
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(len(h.answers()), http1.MAX_PIPELINE + 1)

    def test_connection_close(self) -> None:
        """C{Connection: close}: answered with it, then closed; what follows is not read."""
        h = Harness(self)
        h.send(get(b"/1", b"Connection: close") + get(b"/2"))
        self.assertEqual(len(h.seen), 1)
        (answer,) = h.answers()
        self.assertEqual(answer.headers[b"connection"], b"close")
        self.assertTrue(h.transport.disconnecting)

    def test_http10(self) -> None:
        """HTTP/1.0 closes unless asked to keep alive, and says so when it does."""
        h = Harness(self)
        h.send(get(b"/1", b"Connection: keep-alive", version=b"1.0"))
        (answer,) = h.answers()
        self.assertEqual(answer.headers[b"connection"], b"keep-alive")
        self.assertFalse(h.transport.disconnecting)
        h.send(get(b"/2", version=b"1.0"))
        (answer,) = h.answers()
        self.assertEqual(answer.headers[b"connection"], b"close")
        self.assertTrue(h.transport.disconnecting)

    def test_client_gone(self) -> None:
        """A request whose client left is marked gone and its answer dropped."""
        h = Harness(self)
        h.hold = True
        h.send(get(b"/1") + get(b"/2"))
        h.channel.connectionLost()
        self.assertTrue(h.seen[0].gone)
        h.waiting[0].callback(Harness.echo(h.seen[0]))
        self.assertEqual(h.transport.value(), b"")
        self.assertEqual(len(h.seen), 1)
        self.assertEqual(h.factory.connections, set())

    def test_write_buffer_full_stops_reading(self) -> None:
        h = Harness(self)
        h.channel.pauseProducing()
        self.assertEqual(h.transport.producerState, "paused")
        h.channel.resumeProducing()
        self.assertEqual(h.transport.producerState, "producing")


class RefusalTests(unittest.SynchronousTestCase):
    def assert_refused(self, h: Harness, status: int, code: str, answers: int = 1) -> None:
        *before, last = h.answers()
        self.assertEqual(len(before), answers - 1)
        self.assertEqual(last.status, status)
        self.assertEqual(last.headers[b"connection"], b"close")
        self.assertEqual(last.headers[b"content-type"], b"application/json")
        self.assertEqual(last.json()["error"]["code"], code)  # type: ignore[index]
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.refused[-1][3:], (status, code))

    def test_malformed(self) -> None:
        for garbage in (
            b"NOT HTTP\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            b"\x00\x01\x02\r\n\r\n",
        ):
            h = Harness(self)
            h.send(garbage)
            self.assert_refused(h, 400, "bad_request")
            self.assertEqual(h.seen, [])

    def test_malformed_after_good_waits_its_turn(self) -> None:
        """The 400 comes after the answer to the request before it."""
        h = Harness(self)
        h.hold = True
        h.send(get(b"/1") + b"BROKEN\r\n\r\n")
        self.assertEqual(h.transport.value(), b"")
        h.waiting[0].callback(Harness.echo(h.seen[0]))
        self.assert_refused(h, 400, "bad_request", answers=2)

    def test_declared_too_large_not_read(self) -> None:
        h = Harness(self, max_body=10)
        h.send(b"POST /api/v1/announce HTTP/1.1\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
        self.assert_refused(h, 413, "body_too_large")  # and no "100 Continue" first
        self.assertEqual(h.refused[-1][:3], (b"POST", b"/api/v1/announce", "10.1.2.3"))
        self.assertEqual(h.seen, [])

    def test_length_overflow_is_too_large(self) -> None:
        h = Harness(self)
        h.send(b"POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n")
        self.assert_refused(h, 413, "body_too_large")

    def test_chunked_over_cap(self) -> None:
        h = Harness(self, max_body=10)
        h.send(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n")
        self.assertEqual(h.transport.value(), b"")
        h.send(b"8\r\n12345678\r\n")
        self.assert_refused(h, 413, "body_too_large")
        self.assertEqual(h.seen, [])

    def test_at_the_cap_accepted(self) -> None:
        h = Harness(self, max_body=10)
        h.send(post(b"/x", b"x" * 10))
        self.assertEqual([r.body for r in h.seen], [b"x" * 10])

    def test_url_too_long(self) -> None:
        h = Harness(self)
        h.send(get(b"/" + b"a" * http1.MAX_URL))
        self.assert_refused(h, 414, "uri_too_long")

    def test_headers_too_large(self) -> None:
        h = Harness(self)
        h.send(get(b"/", *[b"X-%d: %s" % (i, b"v" * 1000) for i in range(http1.MAX_HEAD // 1000)]))
        self.assert_refused(h, 431, "headers_too_large")

    def test_upgrade_ignored(self) -> None:
        """An Upgrade is not taken: the request is answered, and the connection closed after it."""
        h = Harness(self)
        h.send(get(b"/1", b"Connection: upgrade", b"Upgrade: websocket") + b"\x00websocket bytes")
        (answer,) = h.answers()
        self.assertEqual((answer.status, answer.headers[b"connection"]), (200, b"close"))
        self.assertTrue(h.transport.disconnecting)

    def test_connect_refused(self) -> None:
        h = Harness(self)
        h.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        self.assert_refused(h, 400, "bad_request")
        self.assertEqual(h.seen, [])

    def test_expect_continue(self) -> None:
        h = Harness(self)
        h.send(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        self.assertEqual(h.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        h.transport.clear()
        h.send(b"abc")
        self.assertEqual([r.body for r in h.seen], [b"abc"])


class IdleTimeoutTests(unittest.SynchronousTestCase):
    def test_idle_closed(self) -> None:
        h = Harness(self, idle_timeout=60)
        h.clock.advance(59)
        h.send(get())
        h.answers()
        h.clock.advance(59)
        self.assertFalse(h.transport.disconnecting)  # 59 s since the last byte
        h.clock.advance(1)
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.transport.value(), b"")  # closed quietly

    def test_in_flight_not_timed_out(self) -> None:
        """A request the tracker is slow to answer keeps its connection."""
        h = Harness(self, idle_timeout=60)
        h.hold = True
        h.send(get())
        h.clock.advance(120)
        self.assertFalse(h.transport.disconnecting)
        h.waiting[0].callback(Harness.echo(h.seen[0]))
        self.assertEqual(len(h.answers()), 1)
        h.clock.advance(60)
        self.assertTrue(h.transport.disconnecting)

    def test_stalled_request_408(self) -> None:
        h = Harness(self, idle_timeout=60)
        h.send(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345")
        h.clock.advance(60)
        (answer,) = h.answers()
        self.assertEqual((answer.status, answer.json()["error"]["code"]), (408, "request_timeout"))  # type: ignore[index]
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.seen, [])

    def test_lost_cancels_timer(self) -> None:
        h = Harness(self)
        h.channel.connectionLost()
        self.assertEqual(h.clock.getDelayedCalls(), [])


class FactoryTests(unittest.SynchronousTestCase):
    def test_date_made_once_a_second(self) -> None:
        h = Harness(self)
        first = h.factory.date()
        self.assertIs(h.factory.date(), first)
        h.clock.advance(1)
        self.assertEqual(h.factory.date(), b"Tue, 14 Nov 2023 22:13:21 GMT")

    def test_abort_all(self) -> None:
        h = Harness(self)
        d = h.factory.abort_all()
        self.assertNoResult(d)
        self.assertTrue(h.transport.disconnecting)
        h.channel.connectionLost()
        self.successResultOf(d)
