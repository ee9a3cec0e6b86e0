# -*- test-case-name: tests.test_session -*-
"""
A download session: one content, driven by the pure L{Scheduler}.

The session is the shell around the scheduler: it finds nodes (through an
injected C{find_nodes}), connects to several at once (through an injected
C{connect}), verifies every sub block against the manifest's chained hashes,
writes verified bytes to the scrambled cache, black-lists nodes that fail or
lie, falls back to the origin over HTTP Range when no peer is left, and tells
the local stream server when each block is ready, in order.

Nothing unverified is ever written: a sub block is checked against its leaf,
and a leaf list against the block root from the signed manifest, before the
cache sees a byte.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from attrs import define, field
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meshstream.agent.store import StoreError, check_sub
from meshstream.errors import CheckDeclined, DownloadFailed, QuotaExceeded
from meshstream.interfaces import IStreamSource
from meshstream.manifest import Manifest, leaf_hash, root_hash
from meshstream.scheduler import core as sched
from meshstream.wire import frames as F
from meshstream.wire.protocol import IPeerListener, PeerProtocol

TICK = sched.TICK
PING_EVERY = 2.0
TRACKER_RETRY = 3.0
ORIGIN_GRACE = 6.0
#: Seconds a player may wait for a block before the origin is asked for it.
PLAYBACK_DEADLINE = 3.0
#: Blocks taken from the origin when one misses its deadline (it and the next ones).
RESCUE_AHEAD = 4
#: Sub blocks outstanding per HTTP source: one Range request carries a run of
#: them (a whole block when only HTTP sources serve), so this is room for a few
#: blocks' requests at once (bench/RESULTS.md: 16 -> 64 took 1 GiB from 4.0 s to 3.2 s).
HTTP_PIPELINE = 64


class BlockSink(Protocol):
    """
    Where a session puts verified sub blocks: the scrambled cache
    (L{meshstream.agent.store.CacheEntry}) or a plain output file
    (L{meshstream.fetch.OutputFile}).
    """

    manifest: Manifest
    leaves: dict[int, list[bytes]]

    def has_sub(self, block: int, sub: int) -> bool: ...

    def held_subs(self) -> Iterator[tuple[int, int]]: ...

    def write(self, block: int, sub: int, data: Buffer, leaves: list[bytes]) -> bool: ...

    def store(self, block: int, sub: int, data: Buffer) -> None:
        """Write the bytes only (thread-safe); L{mark} records them."""

    def store_run(self, block: int, first_sub: int, data: Buffer) -> None:
        """Write contiguous sub blocks in one go (thread-safe)."""

    def mark(self, block: int, sub: int, leaves: list[bytes]) -> bool: ...

    def read_range(self, offset: int, length: int) -> bytes: ...


class NodeLike(Protocol):
    node_id: str
    host: str
    port: int
    state: dict[str, Any]


#: connect(node, listener) -> Deferred firing with a PeerProtocol after HELLO.
Connector = Callable[[NodeLike, IPeerListener], "Deferred[PeerProtocol]"]
#: Bytes as they come in: a received frame, or a slice of an HTTP body buffer.
Buffer = bytes | memoryview
#: offload(f, *args) -> Deferred of f(*args) run in a worker thread.
Offload = Callable[..., "Deferred[Any]"]
#: fetch_range(url, first, last) -> Deferred of exactly last - first + 1 bytes.
RangeFetcher = Callable[[str, int, int], "Deferred[memoryview]"]
#: check_block(block, data, root) -> Deferred of the leaves of a whole block
#: from an HTTP source once checked against its root and stored (of None if
#: it does not match), or None to leave the job to the offloaded default
#: (as does a Deferred that fails with CheckDeclined).
BlockChecker = Callable[[int, Buffer, bytes], "Deferred[list[bytes] | None] | None"]


@define
class BlackList:
    """Nodes that failed us, each barred until an exponentially growing deadline."""

    clock: IReactorTime
    base: float = 5.0
    cap: float = 300.0
    _until: dict[str, float] = field(factory=dict)
    _count: dict[str, int] = field(factory=dict)

    def add(self, node_id: str) -> float:
        n = self._count.get(node_id, 0)
        self._count[node_id] = n + 1
        delay = min(self.cap, self.base * 2**n)
        self._until[node_id] = self.clock.seconds() + delay
        return delay

    def barred(self, node_id: str) -> bool:
        return self._until.get(node_id, 0.0) > self.clock.seconds()


def hint_rate(state: dict[str, Any]) -> float | None:
    """The free upload bandwidth a node reported, in bytes/s, if it said."""
    cap = state.get("upload_capacity_bps")
    used = state.get("upload_bps", 0) or 0
    if isinstance(cap, (int, float)) and cap > 0:
        return max(float(cap) - float(used), float(cap) * 0.1)
    return None


@implementer(IPeerListener)
@define(eq=False)
class _PeerLink:
    """Routes one connection's events to the session, tagged with the node."""

    session: DownloadSession
    node: NodeLike

    def peer_ready(self, peer: PeerProtocol) -> None:
        self.session._peer_ready(self.node, peer)

    def hashes_received(self, peer: PeerProtocol, msg: F.Hashes) -> None:
        self.session._hashes(self.node, msg)

    def data_received(self, peer: PeerProtocol, msg: F.Data) -> None:
        self.session._data(self.node, msg)

    def rejected(self, peer: PeerProtocol, msg: F.Reject) -> None:
        self.session._rejected(self.node, msg)

    def state_received(self, peer: PeerProtocol, state: dict[str, Any]) -> None:
        pass

    def rtt_measured(self, peer: PeerProtocol, rtt: float) -> None:
        self.session.scheduler.rtt_measured(self.node.node_id, rtt)

    def peer_lost(self, peer: PeerProtocol, reason: str) -> None:
        self.session._peer_lost(self.node, peer, reason)


@implementer(IStreamSource)
class DownloadSession:
    log = Logger()

    def __init__(
        self,
        entry: BlockSink,
        clock: IReactorTime,
        find_nodes: Callable[[], Deferred[list[Any]]],
        connect: Connector,
        fetch_range: RangeFetcher | None = None,
        max_peers: int = 4,
        pipeline: int = sched.DEFAULT_PIPELINE,
        window: int = sched.DEFAULT_WINDOW,
        on_complete: Callable[[DownloadSession], None] | None = None,
        http_sources: Sequence[str] = (),
        policy: str = "adaptive",
        on_block: Callable[[int], None] | None = None,
        origin_grace: float = ORIGIN_GRACE,
        offload: Offload | None = None,
        deadline: float = PLAYBACK_DEADLINE,
        recycle: Callable[[Buffer], None] | None = None,
        check_block: BlockChecker | None = None,
    ) -> None:
        self.entry = entry
        self.manifest = entry.manifest
        self.content_id = self.manifest.content_id
        self.size = self.manifest.size
        self.block_size = self.manifest.block_size
        self.mime_type = str(self.manifest.meta.get("mime_type") or "application/octet-stream")
        self.clock = clock
        self._find_nodes = find_nodes
        self._connect = connect
        self._fetch_range = fetch_range
        self.max_peers = max_peers
        self._on_complete = on_complete
        self._on_block = on_block
        self.origin_grace = origin_grace
        self._offload = offload
        #: Takes back an HTTP body buffer once a whole block from it is
        #: written (or rejected), for the range fetcher to reuse.
        self._recycle = recycle
        self._check_block = check_block
        #: While a whole HTTP run is being handled, the requests it frees up
        #: are gathered here and sent as few, large Range requests.
        self._http_batch: dict[tuple[str, int], list[int]] | None = None
        self._cid = bytes.fromhex(self.content_id)
        self.scheduler = sched.Scheduler(
            self.manifest.geometry,
            clock,
            pipeline=pipeline,
            window=window,
            have=entry.held_subs(),
            policy=policy,
        )
        self.blacklist = BlackList(clock)
        self.leaves: dict[int, list[bytes]] = dict(entry.leaves)
        self.peers: dict[str, PeerProtocol] = {}
        #: HTTP sources by key: mirrors (cheap, used like peers) and the
        #: manifest's origins (costly: only when nothing else is left).
        self.http: dict[str, str] = {}
        self._mirrors = list(http_sources)
        self._origins = {
            ("origin" if i == 0 else f"origin-{i}"): url for i, url in enumerate(self.manifest.origins)
        }
        self._parked: dict[int, dict[int, tuple[str, Buffer, bytes | None]]] = {}
        self._connecting: set[str] = set()
        self._candidates: list[NodeLike] = []
        self.bytes_by_source: dict[str, int] = {}
        self.rejected_bytes = 0
        self.failure: Failure | None = None
        self.done: Deferred[None] = Deferred()
        self._waiters: dict[int, list[Deferred[None]]] = {}
        self._tick_call: IDelayedCall | None = None
        self._last_lookup = -1e9
        self._lookup: Deferred[None] | None = None
        self._no_peer_since: float | None = None
        self._origin_on = False
        #: Blocks a player is waiting for, with the time it started waiting:
        #: the playback deadlines of streaming mode.
        self._wanted: dict[int, float] = {}
        self.deadline = deadline
        self._stopped = False
        self._last_ping = 0.0

    # -- life ------------------------------------------------------------

    def start(self) -> None:
        self._run(self.scheduler.start())
        if self.scheduler.finished:
            return
        if self._mirrors and self._fetch_range is None:
            raise ValueError("HTTP sources need a fetch_range")
        for url in self._mirrors:
            self.http[url] = url
            self._run(self.scheduler.add_source(url, pipeline=HTTP_PIPELINE, coarse=True))
        self._refresh_nodes()
        self._tick_call = self.clock.callLater(TICK, self._tick)

    def stop(self, reason: str = "stopped") -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._tick_call is not None and self._tick_call.active():
            self._tick_call.cancel()
        self._tick_call = None
        for peer in list(self.peers.values()):
            peer.bye(F.ByeCode.NORMAL, reason)
        if not self.done.called:
            self._fail(DownloadFailed(reason))

    def _fail(self, exc: Exception) -> None:
        self.failure = Failure(exc)
        for waiters in self._waiters.values():
            for d in waiters:
                d.errback(Failure(exc))
        self._waiters.clear()
        if not self.done.called:
            self.done.errback(Failure(exc))
        self.stop(str(exc))

    def _finish(self) -> None:
        self.log.info(
            "Content {cid} complete: {sources}", cid=self.content_id[:12], sources=self.bytes_by_source
        )
        self._stopped = True
        if self._tick_call is not None and self._tick_call.active():
            self._tick_call.cancel()
        for peer in list(self.peers.values()):
            peer.bye(F.ByeCode.NORMAL, "download complete")
        if not self.done.called:
            self.done.callback(None)
        if self._on_complete is not None:
            self._on_complete(self)

    # -- IStreamSource ---------------------------------------------------

    def wait_for_block(self, block: int) -> Deferred[None]:
        if block < self.scheduler.next_block or self.scheduler.finished:
            return succeed(None)
        if self.failure is not None:
            d: Deferred[None] = Deferred()
            d.errback(self.failure)
            return d

        def cancel(d: Deferred[None]) -> None:
            waiters = self._waiters.get(block, [])
            if d in waiters:
                waiters.remove(d)

        d = Deferred(cancel)
        self._waiters.setdefault(block, []).append(d)
        self._wanted.setdefault(block, self.clock.seconds())
        return d

    def read(self, offset: int, length: int) -> bytes:
        return self.entry.read_range(offset, length)

    # -- node management -------------------------------------------------

    def _refresh_nodes(self) -> None:
        if self._lookup is not None or self._stopped:
            return
        self._last_lookup = self.clock.seconds()

        def got(nodes: list[NodeLike]) -> None:
            self._lookup = None
            self._candidates = list(nodes)
            self._connect_more()

        def failed(f: Failure) -> None:
            self._lookup = None
            if isinstance(f.value, QuotaExceeded):  # the user may not download more: no fallback
                self._fail(f.value)
                return
            self.log.warn(
                "Node lookup for {cid} failed: {error}", cid=self.content_id[:12], error=f.getErrorMessage()
            )

        d = self._find_nodes()
        d.addCallbacks(got, failed)
        self._lookup = d  # type: ignore[assignment]

    def _connect_more(self) -> None:
        if self._stopped:
            return
        for node in self._candidates:
            if len(self.peers) + len(self._connecting) >= self.max_peers:
                break
            nid = node.node_id
            if nid in self.peers or nid in self._connecting or self.blacklist.barred(nid):
                continue
            self._connecting.add(nid)
            d = self._connect(node, _PeerLink(self, node))
            d.addErrback(self._connect_failed, node)

    def _connect_failed(self, f: Failure, node: NodeLike) -> None:
        self._connecting.discard(node.node_id)
        delay = self.blacklist.add(node.node_id)
        self.log.info(
            "Black-listed {node} for {delay:.0f}s: cannot connect ({error})",
            node=node.node_id,
            delay=delay,
            error=f.getErrorMessage(),
        )
        self._connect_more()

    def _peer_ready(self, node: NodeLike, peer: PeerProtocol) -> None:
        self._connecting.discard(node.node_id)
        if self._stopped:
            peer.bye(F.ByeCode.NORMAL, "download complete")
            return
        if node.node_id in self.peers:
            peer.bye(F.ByeCode.NORMAL, "already connected")
            return
        self.peers[node.node_id] = peer
        self._no_peer_since = None
        peer.ping()
        self._run(self.scheduler.add_source(node.node_id, hint_rate(node.state)))

    def _peer_lost(self, node: NodeLike, peer: PeerProtocol, reason: str) -> None:
        nid = node.node_id
        if self.peers.get(nid) is not peer:
            return  # never became our peer (a failed connect is _connect_failed's)
        del self.peers[nid]
        if not self._stopped:
            if nid in self.scheduler.sources and not self.scheduler.sources[nid].idle():
                self.blacklist.add(nid)
                self.log.info("Lost {node} mid-block ({reason}); black-listed", node=nid, reason=reason)
            self._run(self.scheduler.remove_source(nid))
            self._connect_more()

    # -- data ------------------------------------------------------------

    def _hashes(self, node: NodeLike, msg: F.Hashes) -> None:
        if msg.content_id != self._cid or not 0 <= msg.block < self.manifest.num_blocks:
            return
        if msg.block in self.leaves:
            return
        leaves = list(msg.leaves)
        if (
            len(leaves) != self.manifest.geometry.subs_in_block(msg.block)
            or root_hash(leaves) != self.manifest.block_roots[msg.block]
        ):
            self.log.warn(
                "{node} sent a wrong hash list for block {block}", node=node.node_id, block=msg.block
            )
            self._drop(node.node_id, "wrong hash list")
            return
        self.leaves[msg.block] = leaves
        if msg.block in self._parked:
            self._release_parked(msg.block)

    def _data(self, node: NodeLike, msg: F.Data) -> None:
        nid = node.node_id
        if msg.content_id != self._cid or not 0 <= msg.block < self.manifest.num_blocks:
            self._drop(nid, "data for something we did not ask")
            return
        if msg.block not in self.leaves:
            # A peer must send the block's hash list before its first sub block.
            self.rejected_bytes += len(msg.data)
            self._run(self.scheduler.failed(nid, msg.block, msg.sub))
            return
        self._verified_or_not(nid, msg.block, msg.sub, msg.data)

    def _verified_or_not(self, source: str, block: int, sub: int, data: Buffer) -> None:
        if check_sub(self.leaves[block], sub, data):
            self._accept(source, block, sub, data)
            return
        self.rejected_bytes += len(data)
        self.log.warn(
            "Sub block {block}/{sub} from {source} failed verification", block=block, sub=sub, source=source
        )
        self._run(self.scheduler.failed(source, block, sub))

    def _accept(
        self,
        source: str,
        block: int,
        sub: int,
        data: Buffer,
        parked: bool = False,
        already_stored: bool = False,
    ) -> None:
        """Store a verified sub block and tell the scheduler (which counts a late copy as duplicated)."""
        if not self.scheduler.is_done(block, sub):
            if not self.entry.has_sub(block, sub):
                try:
                    if already_stored:
                        self.entry.mark(block, sub, self.leaves[block])
                    else:
                        self.entry.write(block, sub, data, self.leaves[block])
                except StoreError as e:
                    self.log.error("Write failed: {error}", error=str(e))
                    self._fail(DownloadFailed(f"cannot store {self.content_id[:12]}: {e}"))
                    return
            self.bytes_by_source[source] = self.bytes_by_source.get(source, 0) + len(data)
        if parked:
            self._run(self.scheduler.confirm(block, sub, len(data)))
        else:
            self._run(self.scheduler.received(source, block, sub, len(data)))

    def _park(self, source: str, block: int, sub: int, data: Buffer, leaf: bytes | None = None) -> None:
        """
        Hold an HTTP-fetched sub block of a block whose leaves are unknown
        until the whole block is here and can be checked against its root.
        """
        self._parked.setdefault(block, {})[sub] = (source, data, leaf)
        self._run(self.scheduler.arrived(source, block, sub, len(data)))
        parked = self._parked.get(block, {})
        g = self.manifest.geometry
        if len(parked) < g.subs_in_block(block) or block in self.leaves:
            return
        leaves = [parked[i][2] or leaf_hash(parked[i][1]) for i in range(g.subs_in_block(block))]
        if root_hash(leaves) == self.manifest.block_roots[block]:
            self.leaves[block] = leaves
            self._release_parked(block, verified=True)
            return
        # Some source sent wrong bytes, but without leaves we cannot tell which:
        # fetch the whole block again and strike every source that took part.
        del self._parked[block]
        self.rejected_bytes += sum(len(d) for _, d, _leaf in parked.values())
        self.log.warn("Block {block} from HTTP sources does not match its root", block=block)
        for sub in sorted(parked):
            self._run(self.scheduler.discard(block, sub, strike=False))
        for source in sorted({src for src, _d, _leaf in parked.values()}):
            self._run(self.scheduler.strike(source))

    def _release_parked(self, block: int, verified: bool = False) -> None:
        """
        The block's leaves are known now: check each parked sub block against
        its own (unless the leaves were just computed from these very bytes),
        store the good ones (in a worker thread when there is one) and
        re-request the bad ones.
        """
        good: list[tuple[int, str, Buffer]] = []
        for sub, (source, data, leaf) in sorted(self._parked.pop(block, {}).items()):
            if verified or (leaf or leaf_hash(data)) == self.leaves[block][sub]:
                good.append((sub, source, data))
            else:
                self.rejected_bytes += len(data)
                self._run(self.scheduler.discard(block, sub, strike=True))
        if not good:
            return
        offload = self._offload or maybeDeferred
        d = offload(_store_all, self.entry, block, [(sub, data) for sub, _src, data in good])

        def stored(_: object) -> None:
            if self._stopped:
                return
            with self._batched_http():
                for sub, source, data in good:
                    self._accept(source, block, sub, data, parked=True, already_stored=True)
                    if self._stopped:
                        return

        d.addCallback(stored)
        d.addErrback(self._store_failed)

    def _rejected(self, node: NodeLike, msg: F.Reject) -> None:
        if msg.content_id != self._cid:
            return
        src = self.scheduler.sources.get(node.node_id)
        if src is None:
            return
        subs = [s for (b, s) in src.inflight if b == msg.block and (msg.sub in (s, F.WHOLE_REQUEST))]
        for s in subs:
            self._run(self.scheduler.failed(node.node_id, msg.block, s, strike=False))
        if msg.code in (F.RejectCode.UNKNOWN_CONTENT, F.RejectCode.NOT_HELD, F.RejectCode.UNAUTHORIZED):
            # It was listed as holding the content but does not (or cannot
            # read it now, or our ticket does not cover it): use others, and
            # retry it after a back-off (with a new ticket by then).
            self._drop(node.node_id, f"rejected: {msg.reason}", F.ByeCode.NORMAL)

    def _drop(self, nid: str, reason: str, code: int = F.ByeCode.PROTOCOL_ERROR) -> None:
        if nid in self.http:
            del self.http[nid]
            self.log.info("Dropping HTTP source {key}: {reason}", key=nid, reason=reason)
            cheap = any(not s.costly for k, s in self.scheduler.sources.items() if k != nid)
            if nid in self._origins and not cheap and not any(k in self.http for k in self._origins):
                self._fail(DownloadFailed(f"the origin failed too: {reason}"))
            elif nid in self.scheduler.sources:
                self._run(self.scheduler.remove_source(nid))
            return
        self.blacklist.add(nid)
        peer = self.peers.get(nid)
        self.log.info("Dropping {node}: {reason}", node=nid, reason=reason)
        if peer is not None:
            peer.bye(code, reason)
        elif nid in self.scheduler.sources:
            self._run(self.scheduler.remove_source(nid))

    # -- HTTP sources ----------------------------------------------------

    def _http_request(self, key: str, block: int, subs: tuple[int, ...]) -> None:
        """One Range request per contiguous run of the requested sub blocks."""
        fetch = self._fetch_range
        assert fetch is not None
        g = self.manifest.geometry
        runs: list[list[int]] = []
        for s_ in sorted(subs):
            if runs and runs[-1][-1] == s_ - 1:
                runs[-1].append(s_)
            else:
                runs.append([s_])
        for run in runs:
            first, last = run[0], run[-1]
            start = g.sub_offset(block, first)
            end = g.sub_offset(block, last) + g.sub_length(block, last) - 1
            d = fetch(self.http[key], start, end)
            d.addCallbacks(
                self._http_got,
                self._http_failed,
                callbackArgs=(key, block, run),
                errbackArgs=(key, block, run),
            )

    def _http_got(self, data: Buffer, key: str, block: int, run: list[int]) -> None:
        if self._stopped or key not in self.http:
            return
        # Hash (and, when the leaves are known, store) the run in a worker
        # thread if we have one: hashlib and pwrite release the GIL, so the
        # reactor keeps receiving while another core checks the bytes.
        leaves = self.leaves.get(block)
        offload = self._offload or maybeDeferred
        g = self.manifest.geometry
        if leaves is None and len(run) == g.subs_in_block(block) and block not in self._parked:
            # A whole block with no hash list: check it against its root and
            # store it in one write, all in the worker; nothing to park.
            # Meanwhile it counts as arrived (the scheduler holds it until
            # confirmed or discarded), so the source's next request goes out
            # now: hashing is off the network's critical path.
            with self._batched_http():
                for sub in run:
                    self._run(self.scheduler.arrived(key, block, sub, g.sub_length(block, sub)))
            root = self.manifest.block_roots[block]
            whole = self._check_block(block, data, root) if self._check_block is not None else None
            if whole is None:
                whole = offload(_check_block_and_store, self.entry, block, data, root)
            else:

                def declined(f: Failure) -> Deferred[list[bytes] | None]:
                    f.trap(CheckDeclined)
                    return offload(_check_block_and_store, self.entry, block, data, root)

                whole.addErrback(declined)
            whole.addCallback(self._http_block_checked, key, block, run, data)
            whole.addErrback(self._store_failed)
            return
        part: Deferred[list[tuple[int, bytes, bool]]] = offload(
            _check_and_store, self.entry, block, run, data, leaves
        )
        part.addCallback(self._http_checked, key, block, run, data, leaves is not None)
        part.addErrback(self._store_failed)

    def _http_block_checked(
        self, leaves: list[bytes] | None, key: str, block: int, run: list[int], data: Buffer
    ) -> None:
        """Back on the reactor with a whole block: stored and its leaves, or None if it did not match."""
        if self._recycle is not None:
            # Written or rejected: nothing reads these bytes any more.
            self._recycle(data)
        if self._stopped:
            return
        g = self.manifest.geometry
        with self._batched_http():
            if leaves is None:
                self.rejected_bytes += g.block_length(block)
                self.log.warn("Block {block} from {source} does not match its root", block=block, source=key)
                for sub in run:
                    self._run(self.scheduler.discard(block, sub, strike=False))
                self._run(self.scheduler.strike(key))
                return
            self.leaves.setdefault(block, leaves)
            for sub in run:
                n = g.sub_length(block, sub)
                if not self.scheduler.is_done(block, sub):
                    try:
                        self.entry.mark(block, sub, leaves)
                    except StoreError as e:
                        self._fail(DownloadFailed(f"cannot store {self.content_id[:12]}: {e}"))
                        return
                    self.bytes_by_source[key] = self.bytes_by_source.get(key, 0) + n
                self._run(self.scheduler.confirm(block, sub, n))
                if self._stopped:
                    return
            if block in self._parked:
                self._release_parked(block)

    def _http_checked(
        self,
        results: list[tuple[int, bytes, bool]],
        key: str,
        block: int,
        run: list[int],
        data: Buffer,
        stored: bool,
    ) -> None:
        """Back on the reactor: each sub block of the run with its leaf and whether it matched."""
        if self._stopped:
            return
        with self._batched_http():
            parked = self._http_results(results, key, block, data, stored)
        if not parked and self._recycle is not None:
            # Every piece was written, dropped or rejected: no view of it is kept.
            self._recycle(data)

    @contextmanager
    def _batched_http(self) -> Iterator[None]:
        outer = self._http_batch is None
        if outer:
            self._http_batch = {}
        self.scheduler.begin_batch()
        try:
            yield
        finally:
            self._run(self.scheduler.end_batch())
            if outer:
                batch, self._http_batch = self._http_batch, None
                for (key, block), subs in (batch or {}).items():
                    if key in self.http and not self._stopped:
                        self._http_request(key, block, tuple(subs))

    def _http_results(
        self, results: list[tuple[int, bytes, bool]], key: str, block: int, data: Buffer, stored: bool
    ) -> bool:
        """Account for an HTTP run's sub blocks; True if some were parked (and so hold on to C{data})."""
        parked = False
        g = self.manifest.geometry
        offset = 0
        for sub, leaf, ok in results:
            n = g.sub_length(block, sub)
            piece = data[offset : offset + n]
            offset += n
            if self.scheduler.is_done(block, sub):
                self._run(self.scheduler.received(key, block, sub, n))
            elif stored and ok:
                self._accept(key, block, sub, piece, already_stored=True)
            elif stored or block in self.leaves:
                if self.leaves[block][sub] == leaf:  # leaves arrived meanwhile
                    self._accept(key, block, sub, piece)
                else:
                    self.rejected_bytes += n
                    self.log.warn(
                        "Sub block {block}/{sub} from {source} failed verification",
                        block=block,
                        sub=sub,
                        source=key,
                    )
                    self._run(self.scheduler.failed(key, block, sub))
            else:
                self._park(key, block, sub, piece, leaf)
                parked = True
            if self._stopped:
                return True
        return parked

    def _store_failed(self, f: Failure) -> None:
        f.trap(StoreError)
        self.log.error("Write failed: {error}", error=f.getErrorMessage())
        self._fail(DownloadFailed(f"cannot store {self.content_id[:12]}: {f.getErrorMessage()}"))

    def _http_failed(self, f: Failure, key: str, block: int, run: list[int]) -> None:
        if self._stopped or key not in self.http:
            return
        self.log.warn(
            "HTTP source {key} failed for block {block}: {error}",
            key=key,
            block=block,
            error=f.getErrorMessage(),
        )
        for sub in run:
            self._run(self.scheduler.failed(key, block, sub))

    def _use_origin(self) -> None:
        if self._origin_on or self._stopped:
            return
        if self._fetch_range is None or not self._origins:
            self._fail(DownloadFailed(f"no source can serve {self.content_id[:12]} and it has no origin"))
            return
        self.log.info("No peers left for {cid}: falling back to the origin", cid=self.content_id[:12])
        self._add_origins()

    def _add_origins(self) -> None:
        self._origin_on = True
        for key, url in self._origins.items():
            self.http[key] = url
            self._run(self.scheduler.add_source(key, costly=True, pipeline=HTTP_PIPELINE, coarse=True))

    def _check_deadlines(self, now: float) -> None:
        """A block a player has waited on too long comes from the origin, peers or not."""
        for block in [b for b in self._wanted if b < self.scheduler.next_block]:
            del self._wanted[block]
        if not self._wanted or self._fetch_range is None or not self._origins:
            return
        block = min(self._wanted)
        if now - self._wanted[block] < self.deadline:
            return
        if not self._origin_on:
            self._add_origins()
        origin = next((k for k in self._origins if k in self.scheduler.sources), None)
        if origin is not None:
            self.log.info("Block {block} missed its playback deadline: asking the origin", block=block)
            self._wanted[block] = now  # once per deadline period
            # The player will want the next ones just as soon: rescue a few.
            for b in range(block, min(block + RESCUE_AHEAD, self.manifest.num_blocks)):
                self._run(self.scheduler.expedite(origin, b))

    # -- the scheduler's commands -----------------------------------------

    def _run(self, commands: list[sched.Command]) -> None:
        for cmd in commands:
            if isinstance(cmd, sched.Request):
                if cmd.source in self.http and self._http_batch is not None:
                    self._http_batch.setdefault((str(cmd.source), cmd.block), []).extend(cmd.subs)
                elif cmd.source in self.http:
                    self._http_request(str(cmd.source), cmd.block, cmd.subs)
                else:
                    peer = self._peer(cmd.source)
                    if peer is not None:
                        peer.request(self._cid, cmd.block, cmd.subs)
            elif isinstance(cmd, sched.Cancel):
                peer = self._peer(cmd.source)
                if peer is not None:
                    peer.cancel(self._cid, cmd.block, cmd.subs)
            elif isinstance(cmd, sched.BlockDone):
                if self._on_block is not None:
                    self._on_block(cmd.block)
                for d in self._waiters.pop(cmd.block, []):
                    d.callback(None)
            elif isinstance(cmd, sched.Drop):
                self._drop(str(cmd.source), cmd.reason)
            elif isinstance(cmd, sched.NeedSources):
                if self._no_peer_since is None:
                    self._no_peer_since = self.clock.seconds()
                self._connect_more()
        if self.scheduler.finished and not self._stopped:
            self._finish()

    def _peer(self, key: Hashable) -> PeerProtocol | None:
        return self.peers.get(str(key))

    def _tick(self) -> None:
        self._tick_call = None
        if self._stopped:
            return
        now = self.clock.seconds()
        self._run(self.scheduler.tick())
        self._check_deadlines(now)
        if self._stopped:
            return
        if now - self._last_ping >= PING_EVERY:
            self._last_ping = now
            for peer in self.peers.values():
                peer.ping()
        cheap = [k for k, src in self.scheduler.sources.items() if not src.costly]
        if len(self.peers) + len(self._connecting) < self.max_peers:
            self._connect_more()
            if now - self._last_lookup >= TRACKER_RETRY:
                self._refresh_nodes()
        if not cheap and not self._connecting:
            if self._no_peer_since is None:
                self._no_peer_since = now
            elif now - self._no_peer_since >= self.origin_grace:
                self._use_origin()
        else:
            self._no_peer_since = None
        if not self._stopped:
            self._tick_call = self.clock.callLater(TICK, self._tick)

    def bytes_by_kind(self) -> dict[str, int]:
        """Verified bytes so far from C{"peers"} and from C{"http"} sources (origins and mirrors)."""
        http = {*self._mirrors, *self._origins}
        by_kind = {"peers": 0, "http": 0}
        for source, n in self.bytes_by_source.items():
            by_kind["http" if source in http else "peers"] += n
        return by_kind

    def status(self) -> dict[str, Any]:
        return {
            "content_id": self.content_id,
            "size": self.size,
            "blocks_done": self.scheduler.next_block,
            "blocks": self.manifest.num_blocks,
            "complete": self.scheduler.finished,
            "failed": self.failure.getErrorMessage() if self.failure is not None else None,
            "peers": sorted(self.peers),
            "bytes_by_source": dict(self.bytes_by_source),
            "rejected_bytes": self.rejected_bytes,
            "duplicated_bytes": self.scheduler.duplicated_bytes,
        }


def _check_and_store(
    sink: BlockSink, block: int, run: list[int], data: Buffer, leaves: list[bytes] | None
) -> list[tuple[int, bytes, bool]]:
    """
    In a worker thread: hash each sub block of an HTTP run; when the block's
    leaves are known, store the ones that match.  Returns (sub, leaf, matched)
    for each; the reactor thread does all the bookkeeping.
    """
    g = sink.manifest.geometry
    out = []
    offset = 0
    for sub in run:
        n = g.sub_length(block, sub)
        piece = data[offset : offset + n]
        offset += n
        leaf = leaf_hash(piece)
        ok = leaves is not None and leaves[sub] == leaf
        if ok:
            sink.store(block, sub, piece)
        out.append((sub, leaf, ok))
    return out


def _store_all(sink: BlockSink, block: int, pieces: list[tuple[int, Buffer]]) -> None:
    """In a worker thread: write verified sub blocks of one block."""
    for sub, data in pieces:
        sink.store(block, sub, data)


def _check_block_and_store(sink: BlockSink, block: int, data: Buffer, root: bytes) -> list[bytes] | None:
    """
    In a worker thread: a whole block from an HTTP source.  Hash its sub
    blocks, check the leaves against the manifest's root, and store the block
    in one write when it matches.  Returns the leaves, or None.
    """
    g = sink.manifest.geometry
    leaves = []
    offset = 0
    for sub in range(g.subs_in_block(block)):
        n = g.sub_length(block, sub)
        leaves.append(leaf_hash(data[offset : offset + n]))
        offset += n
    if root_hash(leaves) != root:
        return None
    sink.store_run(block, 0, data)
    return leaves
