# -*- test-case-name: tests.test_stream -*-
"""
The agent's local stream server: a player opens
C{http://127.0.0.1:PORT/stream/<content_id>} and gets the content's bytes,
even while the content is still downloading.

Three small pieces:

  - L{parse_range}: a pure function from a C{Range} header and a size to the
    byte range to serve (or L{UNSATISFIABLE}, or L{None} for "the whole
    thing").
  - L{StreamResource}: the twisted.web shell.  It checks the content id, asks
    the L{IStreamProvider} for an L{IStreamSource}, maps failures to status
    codes and writes the headers.
  - L{BlockProducer}: an L{IPushProducer} that sends the body one block at a
    time, waiting on L{IStreamSource.wait_for_block} before every read.

The body is never longer or different from what C{Content-Length} announced:
if the content cannot be completed after the headers were sent, the
connection is aborted so the player sees a truncated response.
"""

from __future__ import annotations

import enum
import re

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from meshstream.errors import MeshstreamError, QuotaExceeded, TrackerError, UnknownContent
from meshstream.interfaces import IStreamProvider, IStreamSource

__all__ = [
    "UNSATISFIABLE",
    "BlockProducer",
    "StreamResource",
    "Unsatisfiable",
    "make_stream_site",
    "parse_range",
]

_log = Logger()

_CONTENT_ID = re.compile(rb"[0-9a-f]{64}")


# --------------------------------------------------------------------------
# Range parsing (pure)


class Unsatisfiable(enum.Enum):
    """The type of L{UNSATISFIABLE}, the "answer 416" result of L{parse_range}."""

    UNSATISFIABLE = "unsatisfiable"


UNSATISFIABLE = Unsatisfiable.UNSATISFIABLE

# int-range = first-pos "-" [ last-pos ] / suffix-range = "-" suffix-length
_INT_RANGE = re.compile(r"([0-9]+)-([0-9]*)", re.ASCII)
_SUFFIX_RANGE = re.compile(r"-([0-9]+)", re.ASCII)
_OWS = " \t"

# Positions with more digits than this saturate at 10**19: larger than any
# size we serve, and int() is never asked to parse thousands of digits
# (which would raise ValueError since Python 3.11).
_MAX_DIGITS = 19
_SATURATED = 10**_MAX_DIGITS


def _position(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    if len(digits) > _MAX_DIGITS:
        return _SATURATED
    return int(digits)


def parse_range(header: str | None, size: int) -> tuple[int, int] | Unsatisfiable | None:
    """
    Interpret a C{Range} request header (RFC 9110, section 14.2) for a
    representation of C{size} bytes (0 <= size < 10**19).

    @return: C{(first, last)}, both inclusive with C{0 <= first <= last <
        size}, for a single satisfiable byte range (answer 206);
        L{UNSATISFIABLE} when the one range does not overlap the content
        (answer 416), which is always the case when C{size} is 0 (RFC 9110
        would allow a non-empty suffix range there, but a 206 cannot describe
        an empty range); L{None} when there is no header, or it is
        syntactically invalid, names another unit, or asks for several ranges:
        the caller then ignores it and serves the whole content (answer 200),
        as the RFC allows.  Never raises.
    """
    if header is None:
        return None
    unit, sep, range_set = header.strip(_OWS).partition("=")
    if not sep or unit.lower() != "bytes":
        return None
    # range-set = 1#range-spec; a recipient ignores empty list elements.
    specs = [spec.strip(_OWS) for spec in range_set.split(",")]
    specs = [spec for spec in specs if spec]
    if len(specs) != 1:
        return None
    spec = specs[0]

    match = _INT_RANGE.fullmatch(spec)
    if match is not None:
        first = _position(match.group(1))
        last = _position(match.group(2)) if match.group(2) else None
        if last is not None and last < first:
            return None  # invalid range-spec: ignore the header
        if first >= size:
            return UNSATISFIABLE
        if last is None or last >= size:
            last = size - 1
        return (first, last)

    match = _SUFFIX_RANGE.fullmatch(spec)
    if match is not None:
        length = _position(match.group(1))
        if length == 0 or size == 0:
            return UNSATISFIABLE
        return (max(0, size - length), size - 1)

    return None


# --------------------------------------------------------------------------
# Body delivery


def _abort_connection(request: Request) -> None:
    """Drop the connection under C{request} without finishing the response."""
    transport = getattr(request, "transport", None)
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        request.loseConnection()


def _log_unexpected(reason: Failure) -> None:
    """The last errback of our chains: a bug in an errback must not vanish."""
    _log.failure("Unexpected error in the stream server", failure=reason)


def _quota_message(reason: Failure) -> str:
    return f"Download quota exceeded: {reason.getErrorMessage()}"


def _send_error(request: Request, code: int, message: str) -> None:
    """Answer C{request} with a short text body (dropped for HEAD)."""
    body = (message + "\n").encode("utf-8")
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % (len(body),))
    request.write(body)
    request.finish()


@implementer(IPushProducer)
class BlockProducer:
    """
    Write bytes C{[start, end)} of C{source} to C{request}, one block per
    step, each only after C{source.wait_for_block} for it has fired.

    The headers must already be set.  At most one wait is outstanding; while
    paused, nothing is read or written (a block that becomes ready while we
    are paused is read after C{resumeProducing}).  A block whose wait fires
    synchronously is handled in the same loop rather than by recursion; with
    a real transport, the first big write pauses us anyway, so one reactor
    turn sends about one block.
    """

    def __init__(self, request: Request, source: IStreamSource, start: int, end: int) -> None:
        self._request = request
        self._source = source
        self._block_size: int = source.block_size
        self._offset = start
        self._end = end
        self._paused = False
        self._done = False
        self._pumping = False
        self._wait: Deferred[object] | None = None
        self._ready: int | None = None

    @property
    def offset(self) -> int:
        """The offset in the content of the next byte to send."""
        return self._offset

    def start(self) -> None:
        """Register with the request and begin."""
        self._request.notifyFinish().addErrback(self._connection_lost)
        self._request.registerProducer(self, True)
        self._pump()

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._done:
            return
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        """Stop for good: the consumer is gone.  Cancelling only stops the wait."""
        if self._done:
            return
        self._done = True
        self._cancel_wait()

    # internals

    def _cancel_wait(self) -> None:
        wait, self._wait = self._wait, None
        if wait is not None:
            wait.cancel()

    def _connection_lost(self, reason: Failure) -> None:
        if not self._done:
            _log.debug(
                "Player went away from {content_id} at {offset}",
                content_id=self._source.content_id,
                offset=self._offset,
            )
        self.stopProducing()

    def _pump(self) -> None:
        if self._pumping:
            return  # the running loop will pick the new state up
        self._pumping = True
        try:
            self._loop()
        except Exception:
            _log.failure(
                "Streaming {content_id} failed at {offset}",
                content_id=self._source.content_id,
                offset=self._offset,
            )
            self._fail()
        finally:
            self._pumping = False

    def _loop(self) -> None:
        while not self._done and not self._paused and self._wait is None:
            if self._offset >= self._end:
                self._finish()
                return
            block = self._offset // self._block_size
            if self._ready == block:
                self._ready = None
                self._write_block(block)
                continue
            wait = maybeDeferred(self._source.wait_for_block, block)
            self._wait = wait
            # May run synchronously, clearing self._wait: the loop goes on.
            wait.addCallbacks(
                self._block_ready,
                self._wait_failed,
                callbackArgs=(block,),
                errbackArgs=(block,),
            ).addErrback(_log_unexpected)

    def _write_block(self, block: int) -> None:
        stop = min(self._end, (block + 1) * self._block_size)
        length = stop - self._offset
        data = self._source.read(self._offset, length)
        if len(data) != length:
            raise ValueError(f"read({self._offset}, {length}) returned {len(data)} bytes")
        self._offset = stop
        self._request.write(data)  # may pause us synchronously

    def _block_ready(self, _: object, block: int) -> None:
        if self._wait is None or self._done:
            return  # stopped (and the source fired instead of failing)
        self._wait = None
        self._ready = block
        self._pump()

    def _wait_failed(self, reason: Failure, block: int) -> None:
        if self._done:
            if not reason.check(CancelledError):
                _log.debug("Wait failed after stop: {reason}", reason=reason)
            return
        self._wait = None
        if reason.check(MeshstreamError):
            _log.warn(
                "Cannot stream block {block} of {content_id}: {reason}",
                block=block,
                content_id=self._source.content_id,
                reason=reason.getErrorMessage(),
            )
        else:
            _log.failure(
                "Waiting for block {block} of {content_id} failed",
                failure=reason,
                block=block,
                content_id=self._source.content_id,
            )
        self._fail(reason)

    def _finish(self) -> None:
        self._done = True
        self._request.unregisterProducer()
        self._request.finish()

    def _fail(self, reason: Failure | None = None) -> None:
        """
        Give up.  Before the headers went out we can still say 503 (402 when
        the tracker refused for the user's quota); after that the only
        honest thing is to cut the connection short.
        """
        if self._done:
            return
        self._done = True
        self._cancel_wait()
        self._request.unregisterProducer()
        if not getattr(self._request, "startedWriting", True):
            self._request.responseHeaders.removeHeader(b"content-range")
            if reason is not None and reason.check(QuotaExceeded):
                _send_error(self._request, 402, _quota_message(reason))
            else:
                _send_error(self._request, 503, "The content cannot be streamed now.")
        else:
            _abort_connection(self._request)


# --------------------------------------------------------------------------
# The resource


class _Response:
    """One request's life from C{provider.open} to handing over the body."""

    def __init__(self, request: Request, send_body: bool) -> None:
        self._request = request
        self._send_body = send_body
        self._gone = False
        self._opening: Deferred[object] | None = None
        request.notifyFinish().addErrback(self._connection_lost)

    def start(self, provider: IStreamProvider, content_id: str) -> None:
        opening = maybeDeferred(provider.open, content_id)
        self._opening = opening
        opening.addCallback(self._opened)
        opening.addErrback(self._open_failed, content_id)
        opening.addErrback(_log_unexpected)

    def _connection_lost(self, reason: Failure) -> None:
        self._gone = True
        opening, self._opening = self._opening, None
        if opening is not None:
            # The provider may keep downloading; we only stop waiting.
            opening.cancel()

    def _opened(self, result: object) -> None:
        self._opening = None
        if self._gone:
            return
        source = IStreamSource(result)
        request = self._request
        size: int = source.size
        request.setHeader(b"accept-ranges", b"bytes")

        # If-Range is ignored: we have no validators (ETag/Last-Modified) to
        # compare with, and a content id names immutable bytes anyway.
        headers = request.requestHeaders.getRawHeaders(b"range")
        header = headers[0].decode("latin-1") if headers and len(headers) == 1 else None
        wanted = parse_range(header, size)
        if wanted is UNSATISFIABLE:
            request.setHeader(b"content-range", b"bytes */%d" % (size,))
            _send_error(request, 416, "Range not satisfiable.")
            return
        if wanted is None:
            start, end = 0, size
        else:
            first, last = wanted
            start, end = first, last + 1
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (first, last, size))
        mime_type: str = source.mime_type
        request.setHeader(b"content-type", mime_type.encode("latin-1", "replace"))
        request.setHeader(b"content-length", b"%d" % (end - start,))
        if not self._send_body or start == end:
            request.finish()
            return
        BlockProducer(request, source, start, end).start()

    def _open_failed(self, reason: Failure, content_id: str) -> None:
        self._opening = None
        if self._gone:
            if not reason.check(CancelledError):
                _log.info(
                    "Opening {content_id} failed after the player left: {reason}",
                    content_id=content_id,
                    reason=reason.getErrorMessage(),
                )
            return
        if reason.check(UnknownContent):
            _send_error(self._request, 404, "No such content.")
            return
        if reason.check(QuotaExceeded):
            code, message = 402, _quota_message(reason)
        elif reason.check(TrackerError):
            code, message = 502, "The tracker could not be asked about this content."
        else:
            code, message = 503, "The content cannot be streamed now."
        if reason.check(MeshstreamError):
            _log.warn(
                "Cannot open {content_id}: {reason}",
                content_id=content_id,
                reason=reason.getErrorMessage(),
            )
        else:
            _log.failure("Cannot open {content_id}", failure=reason, content_id=content_id)
        if getattr(self._request, "startedWriting", False):  # pragma: no cover
            _abort_connection(self._request)
        else:
            _send_error(self._request, code, message)


class StreamResource(Resource):
    """
    The C{/stream} resource: C{GET} and C{HEAD} of C{/stream/<content_id>},
    where the content id is 64 lowercase hex digits.
    """

    isLeaf = True

    def __init__(self, provider: IStreamProvider) -> None:
        super().__init__()
        self._provider = provider

    def render(self, request: Request) -> int:
        # Answer other methods ourselves: twisted.web's own 405 page is built
        # with a deprecated class and is HTML.
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            _send_error(request, 405, "Only GET and HEAD are allowed here.")
            return NOT_DONE_YET
        result: int = super().render(request)
        return result

    def render_GET(self, request: Request) -> int:
        return self._render(request, send_body=True)

    def render_HEAD(self, request: Request) -> int:
        return self._render(request, send_body=False)

    def _render(self, request: Request, send_body: bool) -> int:
        postpath = request.postpath or []
        if len(postpath) != 1:
            _send_error(request, 404, "Not found: use /stream/<content id>.")
            return NOT_DONE_YET
        if _CONTENT_ID.fullmatch(postpath[0]) is None:
            _send_error(request, 400, "A content id is 64 lowercase hex digits.")
            return NOT_DONE_YET
        _Response(request, send_body).start(self._provider, postpath[0].decode("ascii"))
        return NOT_DONE_YET


class _Root(Resource):
    """The site's root: nothing but C{/stream}."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()

    def render(self, request: Request) -> bytes:
        return notFound().render(request)


def make_stream_site(provider: IStreamProvider, *, reactor: IReactorTime | None = None) -> Site:
    """
    A L{Site} with a L{StreamResource} at C{/stream/}.

    @param reactor: passed on to L{Site} (for its log clock and timeouts);
        L{None} lets twisted.web pick the global one.
    """
    root = _Root()
    root.putChild(b"stream", StreamResource(provider))
    site = Site(root, reactor=reactor)
    site.displayTracebacks = False
    return site
