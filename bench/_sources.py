"""
Throttled loopback sources for C{bench/multisource.py}.

Everything here listens on 127.0.0.1 only and reuses meshstream's own classes:

- L{PeerSource}: a L{PeerFactory} over an L{AgentStore} holding the content
  as a seed, its upload capped by a L{TokenBucket}.  Behaviours: C{normal};
  C{stall} (accepts, says HELLO, answers PING, never sends HASHES or DATA:
  its bucket never has tokens); C{lie} (a store wrapper flips one bit in every
  sub block it reads, so every DATA fails verification at the receiver).
- L{HTTPSource}: twisted.web's static File (which does Range) behind a
  throttle: L{PacedFactory}, a wrapping factory whose connections drain what
  the site writes through a L{TokenBucket} shared by all of them.  (Twisted's
  ThrottlingFactory keeps one-second books: it sends a whole second's worth at
  full speed, then nothing, which is not a rate a scheduler can measure.)

Every source can be killed (stop listening, abort every connection), as the
benchmark does when a download reaches a given fraction.

Run as a script, C{python bench/_sources.py http FILE} serves FILE without a
throttle on a free port of 127.0.0.1 (printing C{PORT <n>}) until killed: the
raw-speed scenario's fallback when nginx is not installed.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IPushProducer, IReactorTime
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import File
from zope.interface import implementer

from meshstream.agent.store import AgentStore, SeedFile
from meshstream.interfaces import IContentStore
from meshstream.manifest import Manifest
from meshstream.wire.protocol import PeerFactory, TokenBucket

MiB = 1024 * 1024
#: Bucket depth of every throttled source: one default sub block, so a source
#: never runs ahead of its rate and size ÷ Σ rates is a true lower bound.
BURST = 64 * 1024
BEHAVIOURS = ("normal", "stall", "lie")


#: The reactor: IReactorTCP and IReactorTime (zope interfaces do not combine as types).
Reactor = Any


class _NeverBucket(TokenBucket):
    """A limiter that never grants a byte: the stalling source's."""

    def delay(self) -> float:
        return 3600.0


@implementer(IContentStore)
class LyingStore:
    """Serves what C{inner} holds with one bit flipped in every sub block."""

    def __init__(self, inner: IContentStore) -> None:
        self.inner = inner

    def has(self, content_id: str, block: int, sub: int) -> bool:
        return bool(self.inner.has(content_id, block, sub))

    def read(self, content_id: str, block: int, sub: int) -> bytes:
        data = bytearray(self.inner.read(content_id, block, sub))
        if data:
            data[(block * 7919 + sub * 104729) % len(data)] ^= 0x01
        return bytes(data)

    def leaves(self, content_id: str, block: int) -> list[bytes] | None:
        result: list[bytes] | None = self.inner.leaves(content_id, block)
        return result


class Source:
    """What the harness needs of any source."""

    kind = "?"

    def __init__(self, name: str, rate: float | None, behaviour: str = "normal") -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour is one of {BEHAVIOURS}")
        self.name = name
        self.rate = rate  # bytes/s, None = unthrottled
        self.behaviour = behaviour
        self.url = ""
        self.port: IListeningPort | None = None
        self.key = ""
        self.killed_at: float | None = None  # in-order fraction of the fetch when killed
        self._listening = True

    def _stop_listening(self) -> None:
        if self._listening and self.port is not None:
            self._listening = False
            self.port.stopListening()

    def _listen(self, reactor: Reactor, factory: Any) -> None:
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        #: How the fetcher names this source in C{bytes_by_source} ("host:port").
        self.key = f"127.0.0.1:{self.port.getHost().port}"  # type: ignore[union-attr]

    @property
    def honest(self) -> bool:
        return self.behaviour == "normal"

    def describe(self) -> str:
        rate = "unthrottled" if self.rate is None else f"{self.rate / MiB:g} MiB/s"
        extra = "" if self.behaviour == "normal" else f" {self.behaviour}s"
        return f"{self.name} {self.kind} {rate}{extra}"

    def kill(self) -> None:
        """Stop listening and abort every connection, at once."""
        raise NotImplementedError

    def stop(self) -> None:
        """Release everything (after the fetch; the same as kill here)."""
        self.kill()

    @property
    def bytes_sent(self) -> int:
        """Bytes written to the fetcher (payload and framing)."""
        raise NotImplementedError


class PeerSource(Source):
    """A seeding agent's wire side: a PeerFactory with an upload limit."""

    kind = "peer"

    def __init__(
        self,
        reactor: Reactor,
        name: str,
        data_dir: str,
        path: str,
        manifest: Manifest,
        leaves: list[list[bytes]],
        rate: float | None,
        behaviour: str = "normal",
    ) -> None:
        super().__init__(name, rate, behaviour)
        self.agent_store = AgentStore(data_dir, os.urandom(32))
        self.agent_store.add_seed(SeedFile(path, manifest, leaves))
        store: IContentStore = self.agent_store
        limiter: TokenBucket | None = None
        if behaviour == "stall":
            limiter = _NeverBucket(1.0, reactor)
        elif rate is not None:
            limiter = TokenBucket(rate, reactor, burst=BURST)
        if behaviour == "lie":
            store = LyingStore(self.agent_store)
        self.factory = PeerFactory(f"bench-{name}", reactor, store, limiter=limiter)
        self.factory.noisy = False
        self._listen(reactor, self.factory)
        self.url = f"meshstream://{self.key}"
        self._closed = False

    def kill(self) -> None:
        self._stop_listening()
        for proto in list(self.factory.connections):
            proto.abort()

    def stop(self) -> None:
        self.kill()
        if not self._closed:
            self._closed = True
            self.agent_store.close()

    @property
    def bytes_sent(self) -> int:
        return int(self.factory.bytes_sent)


class _QuietSite(Site):
    """A Site that keeps no access log."""

    def log(self, request: Any) -> None:
        pass


class PacedProtocol(ProtocolWrapper):
    """
    A transport between the wrapped protocol and the socket that lets bytes
    through no faster than the factory's L{TokenBucket} allows.

    It keeps what the wrapped protocol wrote in its own buffer and drains it in
    pieces of at most C{CHUNK} bytes as tokens come.  Back pressure is passed
    on like a real transport's: the wrapped protocol's producer is paused while
    more than C{HIGH} bytes wait, and the socket pausing us stops the drain.
    """

    CHUNK = 16 * 1024
    HIGH = 128 * 1024
    factory: PacedFactory

    def __init__(self, factory: PacedFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self._buf: deque[bytes] = deque()
        self._buffered = 0
        self._socket_paused = False
        self._producer: Any = None
        self._streaming = True
        self._producer_paused = False
        self._close_when_drained = False
        self._drain_call: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        # The socket's producer is a separate object: the wrapped protocol
        # calls our own pauseProducing/resumeProducing to pause *reading*
        # (ProtocolWrapper passes those to the socket).
        transport.registerProducer(_SocketSide(self), True)
        super().makeConnection(transport)

    # -- the transport the wrapped protocol sees --------------------------

    def write(self, data: bytes) -> None:
        if data:
            self._buf.append(data)
            self._buffered += len(data)
            self._drain()

    def writeSequence(self, seq: Any) -> None:
        self.write(b"".join(seq))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        self._streaming = streaming
        self._producer_paused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    def loseConnection(self) -> None:
        self.disconnecting = 1
        self._close_when_drained = True
        self._drain()

    # -- pacing ------------------------------------------------------------

    def socket_paused(self, paused: bool) -> None:
        self._socket_paused = paused
        if not paused:
            self._drain()

    def _drain(self) -> None:
        bucket = self.factory.bucket
        while self._drain_call is None and self._buf and not self._socket_paused and self.transport:
            wait = bucket.delay() if bucket is not None else 0.0
            if wait > 0:
                self._drain_call = self.factory.clock.callLater(wait, self._drained_later)
                break
            head = self._buf.popleft()
            if len(head) > self.CHUNK:
                self._buf.appendleft(head[self.CHUNK :])
                head = head[: self.CHUNK]
            self._buffered -= len(head)
            if bucket is not None:
                bucket.spend(len(head))
            self.factory.bytes_written += len(head)
            self.transport.write(head)
        if self._producer is not None:
            if self._buffered > self.HIGH and self._streaming and not self._producer_paused:
                self._producer_paused = True
                self._producer.pauseProducing()
            elif self._buffered <= self.HIGH // 2:
                if self._producer_paused:
                    self._producer_paused = False
                    self._producer.resumeProducing()
                elif not self._streaming and not self._buf:
                    self._producer.resumeProducing()
        if not self._buf and self._close_when_drained and self.transport is not None:
            self._close_when_drained = False
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.transport.loseConnection()

    def _drained_later(self) -> None:
        self._drain_call = None
        self._drain()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        self._buf.clear()
        super().connectionLost(reason)


@implementer(IPushProducer)
class _SocketSide:
    """What the socket pauses and resumes: the drain of a L{PacedProtocol}."""

    def __init__(self, paced: PacedProtocol) -> None:
        self.paced = paced

    def pauseProducing(self) -> None:
        self.paced.socket_paused(True)

    def resumeProducing(self) -> None:
        self.paced.socket_paused(False)

    def stopProducing(self) -> None:
        producer = self.paced._producer
        if producer is not None:
            producer.stopProducing()


class PacedFactory(WrappingFactory[PacedProtocol]):
    """Wraps a factory so that all its connections together send at most C{rate} bytes/s."""

    protocol = PacedProtocol

    def __init__(self, wrapped: Any, rate: float | None, clock: IReactorTime) -> None:
        super().__init__(wrapped)
        self.clock = clock
        self.bucket = TokenBucket(rate, clock, burst=BURST) if rate is not None else None
        self.bytes_written = 0


def http_site(path: str, url_name: str) -> Site:
    """A Site serving the file at C{path} as C{/url_name} (Range requests included)."""
    root = Resource()
    root.putChild(url_name.encode(), File(path, defaultType="application/octet-stream"))
    site = _QuietSite(root)
    site.noisy = False
    return site


class HTTPSource(Source):
    """twisted.web serving the content with Range support, throttled."""

    kind = "http"

    def __init__(
        self,
        reactor: Reactor,
        name: str,
        path: str,
        rate: float | None,
        url_name: str = "content.bin",
    ) -> None:
        super().__init__(name, rate, "normal")
        self.factory = PacedFactory(http_site(path, url_name), rate, reactor)
        self.factory.noisy = False
        self._listen(reactor, self.factory)
        self.url = f"http://{self.key}/{url_name}"

    def kill(self) -> None:
        self._stop_listening()
        for proto in list(self.factory.protocols):
            proto.transport.abortConnection()

    @property
    def bytes_sent(self) -> int:
        return self.factory.bytes_written


def _serve_http(path: str) -> None:
    """Serve C{path} unthrottled on a free loopback port until killed."""
    from twisted.internet import reactor

    site = http_site(path, os.path.basename(path))
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
    print(f"PORT {port.getHost().port}", flush=True)  # type: ignore[attr-defined]
    reactor.run()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "http":
        print("usage: python bench/_sources.py http FILE", file=sys.stderr)
        sys.exit(2)
    _serve_http(sys.argv[2])
