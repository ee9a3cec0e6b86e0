# -*- test-case-name: tests.test_fetch -*-
"""
HTTP sources: plain Range requests to any server that supports them (the
origin, a mirror, nginx, twisted.web).

This is the hot path of an HTTP download, so it talks to
L{twisted.web.client.Agent} directly (treq's URL handling costs more than the
transfer at loopback speeds) and reads the body straight into one buffer of
the expected size: no list of chunks, no join, and never more bytes than asked
for.

The answer is checked before it is used: a 206 whose Content-Range matches
what was asked (or a 200 when the whole content was asked), exactly the bytes
asked for, within a timeout.  Verification against the manifest is the
caller's job, as for peers.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from meshstream.errors import SourceError

__all__ = ["HTTP_TIMEOUT", "SourceError", "fetch_range", "make_agent"]

HTTP_TIMEOUT = 30.0
_CONTENT_RANGE = re.compile(rb"^bytes (\d+)-(\d+)/(\d+|\*)$")


class _Body(Protocol):
    """Collects exactly C{want} bytes into one preallocated buffer."""

    def __init__(self, url: str, want: int, done: Deferred[memoryview]) -> None:
        self.url = url
        self.buf = bytearray(want)
        self.n = 0
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        end = self.n + len(data)
        if end > len(self.buf):
            self.transport.stopProducing()  # type: ignore[union-attr]
            if not self.done.called:
                self.done.errback(SourceError(f"{self.url} sent more than the {len(self.buf)} bytes asked"))
            return
        self.buf[self.n : end] = data
        self.n = end

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone) and self.n == len(self.buf):
            self.done.callback(memoryview(self.buf))
        elif reason.check(ResponseDone):
            self.done.errback(SourceError(f"{self.url} sent {self.n} bytes, {len(self.buf)} expected"))
        else:
            self.done.errback(reason)


def fetch_range(
    agent: IAgent,
    url: str,
    first: int,
    last: int,
    clock: IReactorTime,
    timeout: float = HTTP_TIMEOUT,
) -> Deferred[memoryview]:
    """Fetch bytes C{first}..C{last} (inclusive) of C{url}: a buffer of exactly that many bytes."""
    want = last - first + 1
    headers = Headers({b"range": [b"bytes=%d-%d" % (first, last)]})
    d: Deferred[Any] = agent.request(b"GET", url.encode("ascii"), headers)

    def check(response: Any) -> Deferred[memoryview]:
        code = response.code
        if code == 206:
            cr = (response.headers.getRawHeaders(b"content-range") or [b""])[0]
            m = _CONTENT_RANGE.match(cr)
            if not m or int(m.group(1)) != first or int(m.group(2)) != last:
                response.deliverBody(_Discard())
                raise SourceError(f"{url} answered range {cr!r} for bytes {first}-{last}")
        elif code != 200 or first != 0:
            response.deliverBody(_Discard())
            raise SourceError(f"{url} answered HTTP {code} to a range request")
        body: Deferred[memoryview] = Deferred()
        response.deliverBody(_Body(url, want, body))
        return body

    d.addCallback(check)
    d.addTimeout(timeout, clock)
    return d


class _Discard(Protocol):
    """Reads and drops a body we will not use, so the connection can be reused or closed."""

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        pass


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """
    Endpoints for an L{Agent}, made once per (scheme, host, port).

    Agent's default factory builds a new endpoint (IDNA-encoding the host)
    for every request; for a downloader issuing thousands of Range requests to
    the same few mirrors that is measurable overhead.  HTTPS uses
    L{optionsForClientTLS}, so certificates are verified as usual.
    """

    def __init__(self, reactor: Any, connect_timeout: float = 10.0) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            host = uri.host.decode("ascii")
            endpoint = _BigReads(HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout))
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
            elif uri.scheme != b"http":
                raise SourceError(f"unsupported URL scheme {uri.scheme!r}")
            self._cache[key] = endpoint
        return endpoint


#: Bytes a connection reads per system call (Twisted's default is 64 KiB): a
#: mirror's body arrives in a quarter as many reads, and as many trips through
#: Twisted's HTTP parser (bench/RESULTS.md).
READ_SIZE = 256 * 1024


@implementer(IStreamClientEndpoint)
class _BigReads:
    """Wraps a TCP endpoint so its connections read L{READ_SIZE} bytes at a time."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        d: Deferred[IProtocol] = self._endpoint.connect(factory)

        def bigger(proto: IProtocol) -> IProtocol:
            transport = getattr(proto, "transport", None)
            if transport is not None and hasattr(transport, "bufferSize"):
                transport.bufferSize = READ_SIZE
            return proto

        return d.addCallback(bigger)


class StoppablePool(HTTPConnectionPool):
    """
    A persistent connection pool that stays empty once closed.

    L{HTTPConnectionPool.closeCachedConnections} closes the idle connections
    it holds, but a request still under way puts its connection back into
    the pool when its answer is done, where it waits (with a timer) for a
    next request that never comes: a service that stops with a request in
    flight would leave an open connection behind.  Once
    L{closeCachedConnections} has been called, this pool closes such
    connections instead.
    """

    stopped = False

    def closeCachedConnections(self) -> Deferred[None]:
        self.stopped = True
        d: Deferred[None] = super().closeCachedConnections()
        return d

    def _putConnection(self, key: Any, connection: Any) -> None:
        if self.stopped:
            connection.transport.loseConnection()
            return
        super()._putConnection(key, connection)


def make_agent(reactor: Any, pool: HTTPConnectionPool) -> Agent:
    """An Agent for Range requests, with cached endpoints."""
    return Agent.usingEndpointFactory(reactor, CachedEndpoints(reactor), pool=pool)
