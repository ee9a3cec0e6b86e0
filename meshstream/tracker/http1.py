# -*- test-case-name: tests.test_tracker_http1 -*-
"""
The tracker API's HTTP/1.1 server: a lean protocol on httptools (llhttp).

twisted.web parses a request line by line in Python, builds a L{Headers}
object, a L{Request} with its sessions, producers and notifications, and
costs about 50 µs of the reactor's thread per request before a handler
runs; an announce costs the tracker about 190 µs in all, so a quarter of
the tracker went to the HTTP stack (bench/RESULTS.md).  This module parses
with llhttp (C, through httptools: the parser of Node.js), keeps per request
only what the API reads (L{ApiRequest}) and writes each answer in one
C{write}.

What it does of HTTP/1.1, for JSON clients (agents, curl, Prometheus is
served elsewhere):

  - keep-alive by default, C{Connection: close} and HTTP/1.0 (with
    C{Connection: keep-alive}) as RFC 9112 says; C{Date} and
    C{Content-Length} on every answer; HEAD answered without the body;
  - pipelining: requests are answered one at a time, in order; past
    L{MAX_PIPELINE} waiting requests the connection stops being read;
  - bodies by C{Content-Length} or chunked, up to the factory's
    C{max_body}: a larger declared length is refused at once (413, the
    body is not read), a larger chunked body as soon as it passes the cap;
  - C{Expect: 100-continue} gets its interim answer when nothing is ahead
    of the request (and not at all when the body is refused);
  - limits: a request line and headers of L{MAX_HEAD} bytes at most (431),
    a URL of L{MAX_URL} (414); a malformed request gets 400 (C{Connection:
    close}, after the answers to the requests before it);
  - an idle timeout (the factory's C{idle_timeout}, by its clock): a
    connection with no request in flight and no byte received for that long
    is closed, one in the middle of a request answered 408 first;
  - the transport's write buffer as a producer: while a client does not
    read its answers, its connection is not read either.

An upgrade (C{Connection: upgrade}) is not taken: the request is answered
and the connection closed after it; C{CONNECT} is refused with 400.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IAddress, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import parse_qs
from zope.interface import implementer

log = Logger()

KIB = 1024
#: The request target, in bytes: a node list's query may name 1 000 nodes
#: to exclude, of up to 64 characters each (73 000 bytes).
MAX_URL = 80 * KIB
#: Request line plus headers, in bytes.
MAX_HEAD = MAX_URL + 16 * KIB
#: Requests parsed ahead of the one being answered before reading stops.
MAX_PIPELINE = 16
DEFAULT_MAX_BODY = 16 * 1024 * KIB
DEFAULT_IDLE_TIMEOUT = 60.0

#: An answer: status, extra headers (name, value), body.
Response = tuple[int, Iterable[tuple[bytes, bytes]], bytes]
#: Called with what was refused before a handler saw it: method, target,
#: client host, status, error code (for the API's metrics and log).
RefusedHook = Callable[[bytes, bytes, str, int, str], None]

#: Reason phrases; RFC 9110's where Python 3.11 has older ones.
_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus} | {
    413: b"Content Too Large",
    414: b"URI Too Long",
    416: b"Range Not Satisfiable",
    422: b"Unprocessable Content",
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: The headers of a JSON answer (the API's, and this module's refusals).
JSON_HEADERS = ((b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store"))


class ApiRequest:
    """
    One complete request, as the API reads it.

    @ivar method: as sent (C{b"GET"}, ...).
    @ivar uri: the request target as sent (path and query).
    @ivar path: the target's path, still percent-encoded.
    @ivar segments: the path's segments after the leading slash,
        percent-decoded and decoded as UTF-8 (bad bytes replaced), as
        twisted.web's C{postpath}.
    @ivar args: the query's parameters (C{parse_qs}, blank values kept).
    @ivar headers: lowercased name -> value; a repeated header's values are
        joined with C{b", "} (RFC 9110, 5.3).
    @ivar body: the whole body (C{b""} if none).
    @ivar client: the IP address of the peer (C{"127.0.0.1"} for a
        transport without one, as a UNIX socket).
    @ivar principal: who made it, once authenticated (set by the API).
    @ivar gone: set when the connection was lost before the answer.
    """

    __slots__ = (
        "args",
        "body",
        "client",
        "gone",
        "headers",
        "keep_alive",
        "method",
        "path",
        "principal",
        "segments",
        "uri",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        uri: bytes,
        headers: dict[bytes, bytes],
        body: bytes = b"",
        client: str = "127.0.0.1",
        keep_alive: bool = True,
        version: str = "1.1",
    ) -> None:
        self.method = method
        self.uri = uri
        path, _, query = uri.partition(b"?")
        self.path = path
        self.segments = path_segments(path)
        self.args: dict[bytes, list[bytes]] = parse_qs(query, keep_blank_values=1) if query else {}
        self.headers = headers
        self.body = body
        self.client = client
        self.keep_alive = keep_alive
        self.version = version
        self.principal: Any = None
        self.gone = False

    def header(self, name: bytes) -> bytes | None:
        """The value of header C{name} (lowercase), or None."""
        return self.headers.get(name)


class _Refused(Exception):
    """Raised in a parser callback to stop parsing and answer C{status}."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_body(code: str, message: str) -> dict[str, Any]:
    """The shape of every error answer, the API's and this module's."""
    return {"error": {"code": code, "message": message}}


def _error_bytes(code: str, message: str) -> bytes:
    return json.dumps(error_body(code, message)).encode("utf-8")


def path_segments(path: bytes) -> list[str]:
    """
    A path's segments after the leading slash, percent-decoded, then decoded
    as UTF-8 with bad bytes replaced (as twisted.web's C{postpath}).
    """
    if b"%" in path:
        return [unquote_to_bytes(s).decode("utf-8", "replace") for s in path.split(b"/")[1:]]
    return path.decode("utf-8", "replace").split("/")[1:]


@implementer(IPushProducer)
class ApiChannel(Protocol):
    """One HTTP/1.1 connection to the API: see the module docstring."""

    def __init__(self, factory: ApiFactory) -> None:
        self.factory = factory
        self._parser = HttpRequestParser(self)
        self._queue: deque[ApiRequest | bytes] = deque()
        self._current: ApiRequest | None = None
        self._client = "127.0.0.1"
        self._closing = False  # nothing more is read (refused, or last request in)
        self._dispatching = False
        self._read_paused = False
        self._write_paused = False
        self._reading_paused = False  # what the transport was last told
        self._timer: Any = None
        self._last_data = 0.0
        self._reset_message()

    def _reset_message(self) -> None:
        self._url: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._head_size = 0
        self._body_size = 0
        self._in_message = False

    # -- the connection ------------------------------------------------------

    def connectionMade(self) -> None:
        peer: IAddress = self.transport.getPeer()  # type: ignore[union-attr]
        host = getattr(peer, "host", None)
        if isinstance(host, str):
            self._client = host
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.factory.connections.add(self)
        self._last_data = self.factory.clock.seconds()
        self._arm_timer(self.factory.idle_timeout)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        if self._current is not None:
            self._current.gone = True
            self._current = None
        self._queue.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory.connections.discard(self)
        for d in self.factory.lost_waiters.pop(self, []):
            d.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_data = self.factory.clock.seconds()
        try:
            self._parser.feed_data(data)
        except HttpParserCallbackError as e:
            refused = e.__context__
            if isinstance(refused, _Refused):
                self._refuse(refused.status, refused.code, refused.message)
            else:  # a bug of ours in a callback
                log.failure("HTTP parser callback failed", Failure(refused or e))
                self._refuse(500, "internal_error", "the tracker failed to read the request")
        except HttpParserUpgrade:
            last = self._queue[-1] if self._queue else None
            if isinstance(last, ApiRequest) and last.method == b"CONNECT":
                self._queue.pop()
                self._refuse(400, "bad_request", "CONNECT is not supported")
            elif not self._in_message and isinstance(last, ApiRequest):
                # The request is complete: answer it, not taking the upgrade
                # (RFC 9110, 7.8), and read nothing after it.
                last.keep_alive = False
                self._closing = True
            else:
                self._refuse(400, "bad_request", "CONNECT is not supported")
        except HttpParserError as e:
            if str(e) == "Content-Length overflow":  # over 2**64 - 1: over any cap
                self._refuse(413, "body_too_large", self._too_large())
            else:
                self._refuse(400, "bad_request", f"malformed HTTP request: {e}")
        self._dispatch()

    # -- parser callbacks ------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_message()
        self._in_message = True

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._head_size += len(url)
        if self._head_size > MAX_URL:
            raise _Refused(414, "uri_too_long", f"the request target is limited to {MAX_URL} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD:
            raise _Refused(
                431, "headers_too_large", f"the request line and headers are limited to {MAX_HEAD} bytes"
            )
        key = name.lower()
        headers = self._headers
        if key in headers:
            headers[key] += b", " + value
        else:
            headers[key] = value

    def on_headers_complete(self) -> None:
        length = self._headers.get(b"content-length")
        # llhttp has checked the value: digits only, one length.
        if length is not None and int(length) > self.factory.max_body:
            raise _Refused(413, "body_too_large", self._too_large())
        expect = self._headers.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and self._idle():
            self.transport.write(_CONTINUE)  # type: ignore[union-attr]

    def on_body(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size > self.factory.max_body:
            raise _Refused(413, "body_too_large", self._too_large())
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        request = ApiRequest(
            parser.get_method(),
            b"".join(self._url),
            self._headers,
            b"".join(self._body),
            self._client,
            keep_alive,
            parser.get_http_version(),
        )
        self._reset_message()
        self._queue.append(request)
        if not keep_alive:
            self._closing = True  # whatever follows is not read
        elif len(self._queue) >= MAX_PIPELINE:
            self._pause_reading()

    def _too_large(self) -> str:
        return f"the request body is limited to {self.factory.max_body} bytes"

    # -- answering -------------------------------------------------------------

    def _idle(self) -> bool:
        return self._current is None and not self._queue

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Queue a final error answer (after those already due) and read no more."""
        self._closing = True
        method = self._parser.get_method() if self._in_message else b""
        self.factory.refused(method, b"".join(self._url), self._client, status, code)
        body = _error_bytes(code, message)
        self._queue.append(self._head(status, JSON_HEADERS, len(body), b"close") + body)
        self._pause_reading()

    def _dispatch(self) -> None:
        """Hand the next waiting request to the handler, unless one is in flight."""
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._current is None and self._queue and self.transport is not None:
                item = self._queue.popleft()
                if isinstance(item, bytes):  # a refusal: the connection's last answer
                    self.transport.write(item)
                    self.transport.loseConnection()
                    self._queue.clear()
                    return
                self._current = item
                d = self.factory.handler(item)
                d.addCallback(self._respond, item)
                d.addErrback(self._failed, item)
        finally:
            self._dispatching = False
        if self._read_paused and not self._closing and len(self._queue) < MAX_PIPELINE // 2:
            self._resume_reading()

    def _head(
        self, status: int, headers: Iterable[tuple[bytes, bytes]], length: int, connection: bytes | None
    ) -> bytes:
        lines = [
            b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Length: %d\r\n"
            % (status, _REASONS.get(status, b"Unknown"), self.factory.date(), length)
        ]
        for name, value in headers:
            lines.append(b"%s: %s\r\n" % (name, value))
        if connection is not None:
            lines.append(b"Connection: %s\r\n" % connection)
        lines.append(b"\r\n")
        return b"".join(lines)

    def _respond(self, response: Response, request: ApiRequest) -> None:
        if request.gone or self.transport is None:
            return
        status, headers, body = response
        keep_alive = request.keep_alive
        # HTTP/1.1 keeps alive unless told otherwise; HTTP/1.0 must be told.
        connection = b"close" if not keep_alive else b"keep-alive" if request.version == "1.0" else None
        head = self._head(status, headers, len(body), connection)
        self.transport.write(head if request.method == b"HEAD" else head + body)
        self._current = None
        if not keep_alive:
            self._queue.clear()
            self.transport.loseConnection()
            return
        self._dispatch()

    def _failed(self, f: Failure, request: ApiRequest) -> None:
        log.failure(
            "The API handler failed on {method} {uri}", f, method=request.method, uri=request.uri[:200]
        )
        body = _error_bytes("internal_error", "the tracker failed to answer")
        self._respond((500, JSON_HEADERS, body), request)

    # -- flow control ----------------------------------------------------------

    def _pause_reading(self) -> None:
        self._read_paused = True
        self._sync_reading()

    def _resume_reading(self) -> None:
        self._read_paused = False
        self._sync_reading()

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: stop reading requests."""
        self._write_paused = True
        self._sync_reading()

    def resumeProducing(self) -> None:
        self._write_paused = False
        self._sync_reading()

    def _sync_reading(self) -> None:
        """Read from the transport unless too many requests wait or the client does not read."""
        paused = self._read_paused or self._write_paused
        if paused != self._reading_paused and self.transport is not None:
            self._reading_paused = paused
            if paused:
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            else:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    # -- the idle timeout ----------------------------------------------------

    def _arm_timer(self, delay: float) -> None:
        self._timer = self.factory.clock.callLater(delay, self._check_idle)

    def _check_idle(self) -> None:
        """
        Close an idle connection.  Every byte received would otherwise
        reschedule a timer (twisted.web does); instead the timer, when it
        fires, looks at when the last byte came and sleeps again for what is
        left.
        """
        self._timer = None
        if self.transport is None or (self._closing and self._idle()):
            return
        timeout = self.factory.idle_timeout
        left = self._last_data + timeout - self.factory.clock.seconds()
        if left > 0 or not self._idle():
            self._arm_timer(left if left > 0 else timeout)
            return
        if self._in_message:
            self._refuse(408, "request_timeout", f"no byte of the request came for {timeout:g} s")
            self._dispatch()
        else:
            self.transport.loseConnection()


class ApiFactory(Factory):
    """
    Builds an L{ApiChannel} per connection; keeps them, so that stopping can
    drop them all (L{abort_all}).

    @param handler: answers a request: fires with a L{Response}, never fails
        (a failure is logged and answered 500).
    @param refused: told of each request refused before the handler saw it.
    """

    def __init__(
        self,
        handler: Callable[[ApiRequest], Deferred[Response]],
        clock: IReactorTime,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        refused: RefusedHook | None = None,
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.refused: RefusedHook = refused or (lambda *_: None)
        self.connections: set[ApiChannel] = set()
        self.lost_waiters: dict[ApiChannel, list[Deferred[None]]] = {}
        self._date_second = -1
        self._date = b""

    def buildProtocol(self, addr: IAddress | None) -> ApiChannel:
        return ApiChannel(self)

    def date(self) -> bytes:
        """The C{Date} header's value, made once a second."""
        now = int(self.clock.seconds())
        if now != self._date_second:
            self._date_second = now
            self._date = formatdate(now, usegmt=True).encode("ascii")
        return self._date

    def abort_all(self) -> Deferred[Any]:
        """Abort every open connection; fire when all are closed."""
        waiting: list[Deferred[None]] = []
        for channel in list(self.connections):
            d: Deferred[None] = Deferred()
            self.lost_waiters.setdefault(channel, []).append(d)
            waiting.append(d)
            if channel.transport is not None:
                channel.transport.abortConnection()  # type: ignore[attr-defined]
        return DeferredList(waiting, consumeErrors=True)
