# -*- test-case-name: tests.test_protocol -*-
"""
The peer wire protocol on a Twisted transport: a thin shell around the pure
codec in L{meshstream.wire.frames}.

One L{PeerProtocol} per TCP/TLS connection, symmetric: both ends say HELLO
first; either end may then request sub blocks (the client side, driven by an
L{IPeerListener}) and serve them (when it was given an L{IContentStore}).
With a ticket checker (an agent's accepting side, see L{meshstream.tickets})
a protocol says HELLO only once the peer's HELLO carried a ticket it
accepts, and then serves only the ticket's content.

Serving is a push producer registered with the transport: when the kernel
buffer is full Twisted pauses us and we stop reading from the store, so a slow
reader never makes us buffer without bound.  An optional L{TokenBucket} shared
by every connection of a node caps its total upload rate.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from meshstream.interfaces import IContentStore
from meshstream.wire import frames as F

HANDSHAKE_TIMEOUT = 10.0
MAX_QUEUED_REQUESTS = 4096

#: A ticket check: (peer node id, ticket bytes) -> the binary content id the
#: peer may ask for, or None for any content; raise to refuse the peer.
TicketChecker = Callable[[str, bytes], "bytes | None"]


class TokenBucket:
    """
    A byte-rate limiter on an injected clock.  C{rate} bytes/s, bursts up to
    C{burst} bytes.  Spending may drive the level negative; a sender then
    waits L{delay} seconds, so large sub blocks never starve behind a small
    burst.
    """

    def __init__(self, rate: float, clock: IReactorTime, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate / 10, 64 * 1024))
        self._clock = clock
        self._level = self.burst
        self._stamp = clock.seconds()

    def _refill(self) -> None:
        now = self._clock.seconds()
        self._level = min(self.burst, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    def delay(self) -> float:
        """Seconds to wait before the next send (0 if it may go now)."""
        self._refill()
        return 0.0 if self._level >= 0 else -self._level / self.rate

    def spend(self, n: int) -> None:
        self._refill()
        self._level -= n


class IPeerListener(Interface):
    """What the downloading side hears from one connection."""

    def peer_ready(peer: PeerProtocol) -> None:
        """HELLO exchanged; requests may be sent."""

    def hashes_received(peer: PeerProtocol, msg: F.Hashes) -> None:
        """A block's leaf list arrived."""

    def data_received(peer: PeerProtocol, msg: F.Data) -> None:
        """A sub block arrived (not yet verified)."""

    def rejected(peer: PeerProtocol, msg: F.Reject) -> None:
        """The peer refused a request."""

    def state_received(peer: PeerProtocol, state: dict[str, Any]) -> None:
        """The peer reported its node state."""

    def rtt_measured(peer: PeerProtocol, rtt: float) -> None:
        """A PING was answered after C{rtt} seconds."""

    def peer_lost(peer: PeerProtocol, reason: str) -> None:
        """The connection is gone (after or before HELLO)."""


@implementer(IPushProducer)
class PeerProtocol(Protocol):
    log = Logger()

    def __init__(
        self,
        node_id: str,
        clock: IReactorTime,
        store: IContentStore | None = None,
        listener: IPeerListener | None = None,
        limiter: TokenBucket | None = None,
        ticket: bytes = b"",
        ticket_checker: TicketChecker | None = None,
        max_frame: int = F.DEFAULT_MAX_FRAME,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        slots: PeerFactory | None = None,
        scope: bytes | None = None,
    ) -> None:
        """
        @param ticket: sent in our HELLO (a peer ticket, see
            L{meshstream.tickets}); empty for none.
        @param ticket_checker: checks the peer's HELLO; what it returns
            becomes L{scope}.
        @param scope: the one content (binary id) this connection serves,
            or None for any held content.
        """
        self.slots = slots
        #: The one content this connection serves (None: any).  Requests
        #: for another content get REJECT C{UNAUTHORIZED}.
        self.scope = scope
        self.node_id = node_id
        self.clock = clock
        self.store = store
        self.listener = listener
        self.limiter = limiter
        self.ticket = ticket
        self.ticket_checker = ticket_checker
        self.decoder = F.FrameDecoder(max_frame)
        self.handshake_timeout = handshake_timeout
        self.peer_id: str | None = None
        self.version: int | None = None
        self.ready: Deferred[PeerProtocol] = Deferred()
        self.bytes_sent = 0
        self.bytes_received = 0
        #: Sub block payload bytes served, by content id (hex): for usage reports.
        self.served: dict[str, int] = {}
        self._queue: deque[tuple[bytes, int, int]] = deque()
        self._hashes_sent: set[tuple[bytes, int]] = set()
        self._paused = False
        self._closing = False
        self._pump_call: IDelayedCall | None = None
        self._handshake_call: IDelayedCall | None = None
        self._pings: dict[int, float] = {}
        self._lost = False

    # -- connection life -------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        if self.slots is not None and not self.slots.acquire(self):
            self.log.info("Refused a peer: all {n} upload slots taken", n=self.slots.max_peers)
            self.slots = None
            self.bye(F.ByeCode.BUSY, "no free upload slot")
            return
        self._handshake_call = self.clock.callLater(self.handshake_timeout, self._handshake_expired)
        if self.ticket_checker is None:
            self._send_hello()
        # else: our HELLO waits for the peer's to pass the ticket check, so
        # a refused peer never sees us ready.

    def _send_hello(self) -> None:
        self.send(F.Hello(node_id=self.node_id, ticket=self.ticket))

    def _handshake_expired(self) -> None:
        self._handshake_call = None
        self.log.warn("No HELLO from {peer} in time", peer=self._peer_name())
        self.bye(F.ByeCode.TIMEOUT, "no HELLO in time")

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._lost = True
        if self.slots is not None:
            self.slots.release(self)
        for call in (self._pump_call, self._handshake_call):
            if call is not None and call.active():
                call.cancel()
        self._pump_call = self._handshake_call = None
        self._queue.clear()
        why = reason.getErrorMessage() if reason is not None else "closed"
        if not self.ready.called:
            self.ready.errback(ConnectionError(f"connection lost before HELLO: {why}"))
        if self.listener is not None:
            self.listener.peer_lost(self, why)

    def bye(self, code: int, reason: str) -> None:
        """Say BYE and close, once."""
        if self._closing or self._lost:
            return
        self._closing = True
        self.send(F.Bye(code, reason))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self) -> None:
        if not self._lost:
            self._closing = True
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _peer_name(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return f"{self.peer_id or '?'}@{peer}"

    # -- sending ---------------------------------------------------------

    def send(self, msg: F.Message) -> None:
        if self._lost:
            return
        frame = F.encode(msg)
        self.bytes_sent += len(frame)
        self.transport.write(frame)  # type: ignore[union-attr]

    def request(self, content_id: bytes, block: int, subs: tuple[int, ...]) -> None:
        self.send(F.Request(content_id, block, subs))

    def cancel(self, content_id: bytes, block: int, subs: tuple[int, ...]) -> None:
        self.send(F.Cancel(content_id, block, subs))

    def ping(self) -> None:
        nonce = int.from_bytes(os.urandom(8), "big")
        self._pings[nonce] = self.clock.seconds()
        if len(self._pings) > 16:
            self._pings.pop(next(iter(self._pings)))
        self.send(F.Ping(nonce))

    # -- receiving -------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.bytes_received += len(data)
        try:
            for msg in self.decoder.iter_feed(data):
                if self._closing or self._lost:
                    return
                self._dispatch(msg)
        except F.ProtocolError as e:
            self.log.warn("Bad frame from {peer}: {error}", peer=self._peer_name(), error=str(e))
            self.bye(F.ByeCode.PROTOCOL_ERROR, str(e))

    def _dispatch(self, msg: F.Message) -> None:
        if isinstance(msg, F.Bye):
            # Also valid before HELLO: a refusal (busy, unauthorized, version).
            self.log.info(
                "Peer {peer} said BYE ({code}): {reason}",
                peer=self._peer_name(),
                code=msg.code,
                reason=msg.reason,
            )
            self._closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self.version is None:
            if not isinstance(msg, F.Hello):
                raise F.ProtocolError(f"expected HELLO, got {type(msg).__name__}")
            self._hello(msg)
            return
        if isinstance(msg, F.Request):
            self._on_request(msg)
        elif isinstance(msg, F.Cancel):
            drop = {(msg.content_id, msg.block, s) for s in msg.subs}
            self._queue = deque(q for q in self._queue if q not in drop)
        elif isinstance(msg, F.Ping):
            self.send(F.Pong(msg.nonce))
        elif isinstance(msg, F.Pong):
            sent = self._pings.pop(msg.nonce, None)
            if sent is not None and self.listener is not None:
                self.listener.rtt_measured(self, self.clock.seconds() - sent)
        elif isinstance(msg, F.Hello):
            raise F.ProtocolError("second HELLO")
        elif self.listener is None:
            if not isinstance(msg, (F.State, F.Have)):
                raise F.ProtocolError(f"unexpected {type(msg).__name__} on a serving connection")
        elif isinstance(msg, F.Data):
            self.listener.data_received(self, msg)
        elif isinstance(msg, F.Hashes):
            self.listener.hashes_received(self, msg)
        elif isinstance(msg, F.Reject):
            self.listener.rejected(self, msg)
        elif isinstance(msg, F.State):
            self.listener.state_received(self, msg.state)

    def _hello(self, msg: F.Hello) -> None:
        version = min(F.PROTOCOL_VERSION, msg.max_version)
        if version < max(F.MIN_PROTOCOL_VERSION, msg.min_version):
            self.bye(F.ByeCode.VERSION_MISMATCH, f"we speak {F.MIN_PROTOCOL_VERSION}..{F.PROTOCOL_VERSION}")
            return
        if self.ticket_checker is not None:
            try:
                allowed = self.ticket_checker(msg.node_id, msg.ticket)
            except Exception as e:
                self.log.warn("Refused {peer}: {error}", peer=msg.node_id, error=str(e))
                self.bye(F.ByeCode.UNAUTHORIZED, str(e))
                return
            if allowed is not None:
                self.scope = allowed
            self._send_hello()
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        self.peer_id = msg.node_id
        self.version = version
        self.ready.callback(self)
        if self.listener is not None:
            self.listener.peer_ready(self)

    # -- serving ---------------------------------------------------------

    def _on_request(self, msg: F.Request) -> None:
        store = self.store
        cid_hex = msg.content_id.hex()
        if store is None:
            self.send(
                F.Reject(msg.content_id, msg.block, F.WHOLE_REQUEST, F.RejectCode.NOT_HELD, "not serving")
            )
            return
        if self.scope is not None and msg.content_id != self.scope:
            self.log.info(
                "Refused a request of {peer} for {cid}: its ticket is for another content",
                peer=self._peer_name(),
                cid=cid_hex[:12],
            )
            self.send(
                F.Reject(
                    msg.content_id,
                    msg.block,
                    F.WHOLE_REQUEST,
                    F.RejectCode.UNAUTHORIZED,
                    "the ticket is for another content",
                )
            )
            return
        if len(self._queue) + len(msg.subs) > MAX_QUEUED_REQUESTS:
            self.send(
                F.Reject(msg.content_id, msg.block, F.WHOLE_REQUEST, F.RejectCode.BUSY, "too many requests")
            )
            return
        for sub in msg.subs:
            if store.has(cid_hex, msg.block, sub):
                self._queue.append((msg.content_id, msg.block, sub))
            else:
                self.send(F.Reject(msg.content_id, msg.block, sub, F.RejectCode.NOT_HELD, "not held"))
        self._schedule_pump()

    def _schedule_pump(self, delay: float = 0.0) -> None:
        if self._pump_call is None and self._queue and not self._paused and not self._lost:
            self._pump_call = self.clock.callLater(delay, self._pump)

    def _pump(self) -> None:
        """Send queued sub blocks until the transport pushes back or the bucket runs dry."""
        self._pump_call = None
        store = self.store
        assert store is not None
        while self._queue and not self._paused and not self._lost:
            if self.limiter is not None:
                wait = self.limiter.delay()
                if wait > 0:
                    self._schedule_pump(wait)
                    return
            cid, block, sub = self._queue.popleft()
            cid_hex = cid.hex()
            try:
                if (cid, block) not in self._hashes_sent:
                    leaves = store.leaves(cid_hex, block)
                    if leaves is None:
                        raise KeyError("no leaves")
                    self.send(F.Hashes(cid, block, tuple(leaves)))
                    self._hashes_sent.add((cid, block))
                data = store.read(cid_hex, block, sub)
            except Exception as e:
                self.log.warn(
                    "Cannot serve {cid} {block}/{sub}: {error}",
                    cid=cid_hex[:12],
                    block=block,
                    sub=sub,
                    error=str(e),
                )
                self.send(F.Reject(cid, block, sub, F.RejectCode.NOT_HELD, "read failed"))
                continue
            header = F.encode_data_header(cid, block, sub, len(data))
            self.bytes_sent += len(header) + len(data)
            self.served[cid_hex] = self.served.get(cid_hex, 0) + len(data)
            if self.limiter is not None:
                self.limiter.spend(len(data))
            self.transport.writeSequence([header, data])  # type: ignore[union-attr]

    # IPushProducer: the transport tells us when its buffer is full.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule_pump()

    def stopProducing(self) -> None:
        self._queue.clear()


class PeerFactory(Factory):
    """
    Builds serving L{PeerProtocol}s for a node; holds what its connections
    share (store, rate limiter, ticket check) and refuses connections past
    C{max_peers} with BYE busy.
    """

    log = Logger()

    def __init__(
        self,
        node_id: str,
        clock: IReactorTime,
        store: IContentStore,
        limiter: TokenBucket | None = None,
        ticket_checker: TicketChecker | None = None,
        max_peers: int = 32,
        max_frame: int = F.DEFAULT_MAX_FRAME,
    ) -> None:
        self.node_id = node_id
        self.clock = clock
        self.store = store
        self.limiter = limiter
        self.ticket_checker = ticket_checker
        self.max_peers = max_peers
        self.max_frame = max_frame
        self.connections: set[PeerProtocol] = set()
        self._closed_bytes_sent = 0
        self._closed_served: dict[str, int] = {}

    def buildProtocol(self, addr: Any) -> PeerProtocol:
        proto = PeerProtocol(
            self.node_id,
            self.clock,
            store=self.store,
            limiter=self.limiter,
            ticket_checker=self.ticket_checker,
            max_frame=self.max_frame,
            slots=self,
        )
        proto.ready.addErrback(lambda _f: None)
        return proto

    def acquire(self, proto: PeerProtocol) -> bool:
        if len(self.connections) >= self.max_peers:
            return False
        self.connections.add(proto)
        return True

    def release(self, proto: PeerProtocol) -> None:
        if proto in self.connections:
            self.connections.discard(proto)
            self._closed_bytes_sent += proto.bytes_sent
            for cid, n in proto.served.items():
                self._closed_served[cid] = self._closed_served.get(cid, 0) + n

    @property
    def bytes_sent(self) -> int:
        """Bytes sent to peers since start, closed connections included."""
        return self._closed_bytes_sent + sum(p.bytes_sent for p in self.connections)

    def served(self) -> dict[str, int]:
        """Sub block payload bytes served since start by content id, closed connections included."""
        total = dict(self._closed_served)
        for proto in self.connections:
            for cid, n in proto.served.items():
                total[cid] = total.get(cid, 0) + n
        return total

    def close_all(self) -> None:
        for proto in list(self.connections):
            proto.bye(F.ByeCode.SHUTTING_DOWN, "node stopping")


class PeerClientFactory(Factory):
    """Builds one downloading L{PeerProtocol} (for C{connectProtocol}-style use)."""

    def __init__(self, proto: PeerProtocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> PeerProtocol:
        return self.proto
