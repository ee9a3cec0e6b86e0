# -*- test-case-name: tests.test_integration -*-
"""
The agent as a service::

  AgentService
   ├── peer server       (one listening port per --listen endpoint string;
   │                      peers must show a tracker-signed ticket, see meshstream.tickets)
   ├── stream server     (--stream: /stream/<content_id>, /status)
   ├── announce loop     (heartbeat to the tracker: holdings and node state;
   │                      then the usage report; the answer brings the
   │                      user's reservations)
   └── download sessions (one per content being fetched)

Usage: the L{UsageMeter} reads the sessions' verified bytes (from peers, and
from the origin or mirrors) and the peer server's bytes served, per content,
and after each announce the agent reports what grew since the last report
(see L{meshstream.agent.usage}).  Bytes from content servers are reported as
C{from_servers: 0} for now: node lists do not yet say which nodes are content
servers, so their bytes count as C{from_peers}.

With C{server} set the agent announces itself as a content server (claims
37, 38; its tracker account needs the server role).  C{use_servers} says how
downloads use the tracker's content servers: see L{meshstream.agent.holders}.

The node state in each announce (claims 36, 38): C{upload_bps},
C{download_bps} and C{disk_io_bps} (bytes the store read and wrote) averaged
since the previous announce; C{connections} (peers served now) and
C{upload_slots} (C{max_uploads}); the box's C{cpu} (psutil's CPU use since
the previous announce) and C{memory} (share in use); C{upload_capacity_bps}
when an upload rate is set.  All of it is read from counters and
C{/proc}-like sources without waiting.

The reactor is a constructor argument (the tap passes the global one); every
timer runs on it as an L{IReactorTime}.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any

import psutil
from attrs import Factory, define
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.application.service import Service
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredList, fail, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from meshstream import tickets
from meshstream.agent.holders import BESIDE, holder_finder
from meshstream.agent.lookup import TicketedLookup
from meshstream.agent.session import PLAYBACK_DEADLINE, DownloadSession, NodeLike
from meshstream.agent.store import (
    AgentStore,
    SeedFile,
    load_or_create_key,
    verify_seed,
)
from meshstream.agent.stream import StreamResource
from meshstream.agent.usage import Report, UsageMeter
from meshstream.errors import MeshstreamError, QuotaExceeded, TrackerError, UnknownContent
from meshstream.interfaces import IStreamProvider, IStreamSource
from meshstream.manifest import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_SUB_BLOCK_SIZE,
    Manifest,
    ManifestError,
    build_manifest,
    load_public_key,
)
from meshstream.scheduler.core import DEFAULT_WINDOW
from meshstream.sources import fetch_range, make_agent
from meshstream.tracker.client import Credentials, TrackerClient
from meshstream.wire.protocol import IPeerListener, PeerFactory, PeerProtocol, TokenBucket

log = Logger()

CONNECT_TIMEOUT = 5
#: Usage reports sent one after the other at one heartbeat, at most.
MAX_REPORTS_PER_BEAT = 4
DEFAULT_ANNOUNCE_INTERVAL = 30.0
_NODE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@define
class AgentConfig:
    tracker: str
    data_dir: str
    listen: list[str] = Factory(lambda: ["tcp:7071"])
    stream: str | None = "tcp:7080:interface=127.0.0.1"
    seeds: list[str] = Factory(list)
    node_id: str | None = None
    advertise: str | None = None
    upload_rate: float | None = None
    max_peers: int = 4
    max_uploads: int = 32
    tracker_key: str | None = None
    credentials: Credentials | None = None
    tracker_ca: str | None = None
    window: int = DEFAULT_WINDOW
    playback_deadline: float = PLAYBACK_DEADLINE
    #: Announce as a content server (the tracker account needs the server role).
    server: bool = False
    #: How downloads use content servers: "beside" peers, "instead" of them, or "off".
    use_servers: str = BESIDE


#: The tracker roles that may announce a content server.
SERVER_ROLES = frozenset({"server", "admin"})


class RateMeter:
    """The rate of growth of a counter between two readings (bytes/s)."""

    def __init__(self) -> None:
        self._last: tuple[int, float] | None = None
        self.rate = 0.0

    def update(self, total: int, now: float) -> float:
        """Read the counter; return the rate since the previous reading (0 at the first)."""
        if self._last is not None:
            last_total, last_at = self._last
            if now > last_at and total >= last_total:
                self.rate = (total - last_total) / (now - last_at)
        if self._last is None or now > self._last[1]:
            self._last = (total, now)
        return self.rate


def manifest_path_for(path: str) -> str:
    return path + ".manifest.json"


@implementer(IStreamSource)
class CompleteSource:
    """A content held in full (seed or finished cache entry): nothing to wait for."""

    def __init__(self, manifest: Manifest, reader: Any) -> None:
        self.content_id = manifest.content_id
        self.size = manifest.size
        self.block_size = manifest.block_size
        self.mime_type = str(manifest.meta.get("mime_type") or "application/octet-stream")
        self._reader = reader

    def wait_for_block(self, block: int) -> Deferred[None]:
        return succeed(None)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._reader.read_range(offset, length))


class StatusResource(Resource):
    """C{GET /status}: JSON of this agent's sessions and holdings (for the CLI and the demo)."""

    isLeaf = True

    def __init__(self, agent: AgentService) -> None:
        super().__init__()
        self.agent = agent

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.agent.status()).encode()


@implementer(IStreamProvider)
class AgentService(Service):
    def __init__(self, config: AgentConfig, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.node_id = config.node_id or ""
        self.store: AgentStore | None = None
        self.tracker: TrackerClient | None = None
        self.tracker_key: Ed25519PublicKey | None = None
        self.peer_factory: PeerFactory | None = None
        self.peer_ports: list[IListeningPort] = []
        self.stream_port: IListeningPort | None = None
        self.sessions: dict[str, DownloadSession] = {}
        self.ready: Deferred[None] = Deferred()
        self.announce_interval = DEFAULT_ANNOUNCE_INTERVAL
        self._announce_call: IDelayedCall | None = None
        self._opening: dict[str, list[Deferred[Any]]] = {}
        self._upload = RateMeter()
        self._download = RateMeter()
        self._disk_io = RateMeter()
        self._pool: Any = None
        self._tracker_pool: Any = None
        self.http: Any = None
        self.usage = UsageMeter(self.clock)
        #: Not None while a usage report is out: who waits for it to end.
        self._report_waiters: list[Deferred[None]] | None = None
        #: The tracker's last answer to a usage report: C{{"period", "used_bytes", "quota_bytes", ...}}.
        self.usage_standing: dict[str, Any] | None = None
        #: The user's reservations that have not ended, from the last announce answer.
        self.reservations: list[dict[str, Any]] = []

    # -- start and stop --------------------------------------------------

    def startService(self) -> None:
        super().startService()
        d = self._start()
        d.addCallbacks(self.ready.callback, self._start_failed)

    def _start_failed(self, f: Failure) -> None:
        log.failure("Agent failed to start", f)
        self.ready.errback(f)

    @inlineCallbacks
    def _start(self) -> Any:
        cfg = self.config
        os.makedirs(cfg.data_dir, exist_ok=True)
        self.node_id = self.node_id or self._load_node_id()
        self.store = AgentStore(cfg.data_dir, load_or_create_key(os.path.join(cfg.data_dir, "box.key")))
        from meshstream.sources import StoppablePool
        from meshstream.tls import tracker_http

        self._pool = StoppablePool(self.reactor, persistent=True)
        self._agent = make_agent(self.reactor, self._pool)
        self._tracker_pool = StoppablePool(self.reactor, persistent=True)
        self.http = tracker_http(self.reactor, self._tracker_pool, cfg.tracker_ca)
        self.tracker = TrackerClient(
            self.http, cfg.tracker.rstrip("/"), self.clock, credentials=cfg.credentials
        )
        self.tracker_key = yield self._trusted_key()
        if cfg.server:
            yield self._check_server_role()
        self.store.load_cache(self._check_signed)
        for path in cfg.seeds:
            yield self._import_seed(path)
        limiter = TokenBucket(cfg.upload_rate, self.clock) if cfg.upload_rate else None
        assert self.tracker_key is not None
        # Peers must show a ticket the tracker signed for them and a content.
        self.peer_factory = PeerFactory(
            self.node_id,
            self.clock,
            self.store,
            limiter=limiter,
            ticket_checker=tickets.checker(self.tracker_key, self.clock.seconds),
            max_peers=cfg.max_uploads,
        )
        for desc in cfg.listen:
            port = yield serverFromString(self.reactor, desc).listen(self.peer_factory)
            self.peer_ports.append(port)
        if cfg.stream:
            root = Resource()
            root.putChild(b"stream", StreamResource(self))
            root.putChild(b"status", StatusResource(self))
            site = server.Site(root)
            site.displayTracebacks = False
            self.stream_port = yield serverFromString(self.reactor, cfg.stream).listen(site)
        yield self.announce()
        log.info(
            "Agent {node} up: peers on {peers}, stream on {stream}, seeding {n} contents",
            node=self.node_id,
            peers=[_port_of(p) for p in self.peer_ports],
            stream=_port_of(self.stream_port) if self.stream_port else None,
            n=len(self.store.holdings()),
        )

    def _load_node_id(self) -> str:
        path = os.path.join(self.config.data_dir, "node_id")
        try:
            with open(path) as f:
                nid = f.read().strip()
            if _NODE_ID.match(nid):
                return nid
        except FileNotFoundError:
            pass
        nid = uuid.uuid4().hex[:16]
        with open(path, "w") as f:
            f.write(nid + "\n")
        return nid

    @inlineCallbacks
    def _check_server_role(self) -> Any:
        """A content server's account must have the server role: refuse to start otherwise."""
        assert self.tracker is not None
        me = yield self.tracker.whoami()
        role = me.get("role")
        if role not in SERVER_ROLES:
            raise MeshstreamError(
                f"--server needs a tracker account with the server role; {me.get('user')} has {role!r}"
            )

    def _trusted_key(self) -> Deferred[Ed25519PublicKey]:
        given = self.config.tracker_key
        if given:
            data = given.encode()
            if os.path.exists(given):
                with open(given, "rb") as f:
                    data = f.read()
            return succeed(load_public_key(data))
        assert self.tracker is not None
        log.warn("No --tracker-key given: trusting the key the tracker presents (first use)")
        return self.tracker.public_key()

    def _check_signed(self, manifest: Manifest) -> None:
        assert self.tracker_key is not None
        manifest.verify(self.tracker_key)

    @inlineCallbacks
    def _import_seed(self, path: str) -> Any:
        """Make C{path} a seed: find its manifest (beside it, or by content id at the tracker) and verify it."""
        assert self.store is not None and self.tracker is not None
        man_path = manifest_path_for(path)
        if os.path.exists(man_path):
            with open(man_path, "rb") as f:
                manifest = Manifest.from_json(f.read())
            if manifest.signature is None:
                manifest = yield self.tracker.register_manifest(manifest)
        else:
            local, _ = yield threads.deferToThread(
                build_manifest, path, DEFAULT_BLOCK_SIZE, DEFAULT_SUB_BLOCK_SIZE
            )
            manifest = yield self.tracker.get_manifest(local.content_id)
        self._check_signed(manifest)
        leaves = yield threads.deferToThread(verify_seed, path, manifest)
        self.store.add_seed(SeedFile(path, manifest, leaves))
        log.info("Seeding {path} as {cid}", path=path, cid=manifest.content_id)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._announce_call is not None and self._announce_call.active():
            self._announce_call.cancel()
        self._announce_call = None
        for session in list(self.sessions.values()):
            session.stop("agent stopping")
        if self.peer_factory is not None:
            self.peer_factory.close_all()
        ports = [*self.peer_ports, *([self.stream_port] if self.stream_port else [])]
        waits: list[Deferred[Any]] = [maybeDeferred(p.stopListening) for p in ports]
        if self.tracker is not None and self.node_id:
            waits.append(self.tracker.leave(self.node_id).addErrback(lambda _f: None))
            waits.append(self.report_usage())
        stopped: Deferred[Any] = DeferredList(waits, consumeErrors=True)

        def close(_: object) -> Any:
            if self.store is not None:
                self.store.close()
            pools = [p for p in (self._pool, self._tracker_pool) if p is not None]
            return DeferredList([p.closeCachedConnections() for p in pools], consumeErrors=True)

        stopped.addCallback(close)
        return stopped

    # -- tracker heartbeat -------------------------------------------------

    def node_state(self) -> dict[str, Any]:
        """The state to announce (see the module docstring); rates since the last call."""
        now = self.clock.seconds()
        sent = self.peer_factory.bytes_sent if self.peer_factory else 0
        received = sum(sum(s.bytes_by_source.values()) for s in self.sessions.values())
        io = self.store.io.total if self.store else 0
        state: dict[str, Any] = {
            "upload_bps": round(self._upload.update(sent, now), 1),
            "download_bps": round(self._download.update(received, now), 1),
            "disk_io_bps": round(self._disk_io.update(io, now), 1),
            "connections": len(self.peer_factory.connections) if self.peer_factory else 0,
            "upload_slots": self.config.max_uploads,
            "cpu": min(1.0, psutil.cpu_percent(interval=None) / 100.0),
            "memory": min(1.0, psutil.virtual_memory().percent / 100.0),
        }
        if self.config.upload_rate:
            state["upload_capacity_bps"] = float(self.config.upload_rate)
        return state

    def advertised_address(self) -> str:
        if self.config.advertise:
            return self.config.advertise
        port = _port_of(self.peer_ports[0]) if self.peer_ports else 0
        return f":{port}"

    def announce(self) -> Deferred[None]:
        if self._announce_call is not None and self._announce_call.active():
            self._announce_call.cancel()
        self._announce_call = None
        assert self.tracker is not None and self.store is not None
        d: Deferred[Any] = self.tracker.announce(
            self.node_id,
            self.advertised_address(),
            self.store.holdings(),
            self.node_state(),
            kind="server" if self.config.server else None,
        )

        def ok(answer: dict[str, Any]) -> None:
            interval = answer.get("interval")
            if isinstance(interval, (int, float)) and interval > 0:
                self.announce_interval = float(interval)
            reservations = answer.get("reservations")
            if isinstance(reservations, list):
                self.reservations = [r for r in reservations if isinstance(r, dict)]

        def failed(f: Failure) -> None:
            log.warn("Announce failed: {error}", error=f.getErrorMessage())

        def again(_: object) -> None:
            if self.running:
                # Announces may overlap (a finished download announces at
                # once): keep one timer.
                if self._announce_call is not None and self._announce_call.active():
                    self._announce_call.cancel()
                self._announce_call = self.clock.callLater(self.announce_interval, self.announce)

        d.addCallbacks(ok, failed)
        d.addCallback(lambda _: self.report_usage())
        d.addCallback(again)
        return d

    # -- usage reports -----------------------------------------------------

    def _sample_usage(self) -> None:
        """Feed the meter the running totals of the sessions and the peer server."""
        for session in self.sessions.values():
            by_kind = session.bytes_by_kind()
            self.usage.observe(session, session.content_id, "from_peers", by_kind["peers"])
            self.usage.observe(session, session.content_id, "from_origin", by_kind["http"])
        if self.peer_factory is not None:
            for cid, n in self.peer_factory.served().items():
                self.usage.observe(self.peer_factory, cid, "uploaded", n)

    def report_usage(self) -> Deferred[None]:
        """
        Report the bytes counted since the last acknowledged report; never
        fails.  A report that could not be delivered is sent again (same
        C{seq}) next time; one the tracker refuses as malformed is dropped.
        While a report is out, a second call waits for it, then reports what
        is left.
        """
        if self._report_waiters is not None:
            waiting: Deferred[None] = Deferred()
            self._report_waiters.append(waiting)
            return waiting.addCallback(lambda _: self.report_usage())
        self._sample_usage()
        waiters: list[Deferred[None]] = []
        self._report_waiters = waiters

        def finished(_: object) -> None:
            self._report_waiters = None
            for w in waiters:
                w.callback(None)

        return Deferred.fromCoroutine(self._send_reports()).addCallback(finished)

    async def _send_reports(self) -> None:
        for _ in range(MAX_REPORTS_PER_BEAT):
            report = self.usage.next_report()
            if report is None or self.tracker is None:
                return
            try:
                answer = await self.tracker.report_usage(self.node_id, report.seq, report.contents)
            except Exception as e:
                self._report_failed(e, report)
                return
            self.usage.acknowledged(report)
            self.usage_standing = answer

    def _report_failed(self, error: Exception, report: Report) -> None:
        if isinstance(error, TrackerError) and error.status in (400, 413):
            log.error(
                "The tracker refused usage report {seq}; dropping it: {error}",
                seq=report.seq,
                error=str(error),
            )
            self.usage.dropped(report)
        else:
            log.warn(
                "Usage report {seq} failed (will send it again): {error}", seq=report.seq, error=str(error)
            )

    # -- downloads ---------------------------------------------------------

    def open(self, content_id: str) -> Deferred[IStreamSource]:
        """IStreamProvider: a held content, a running session, or a new session."""
        store = self.store
        if store is None:
            return fail(UnknownContent("agent not started"))
        if content_id in store.seeds:
            seed = store.seeds[content_id]
            return succeed(CompleteSource(seed.manifest, seed))
        entry = store.cache.get(content_id)
        if entry is not None and entry.complete:
            return succeed(CompleteSource(entry.manifest, entry))
        if content_id in self.sessions:
            return succeed(self.sessions[content_id])
        return self.download(content_id)

    def download(self, content_id: str, manifest: Manifest | None = None) -> Deferred[Any]:
        """Start (or join) the download of C{content_id}; fires with its session."""
        if content_id in self.sessions:
            return succeed(self.sessions[content_id])
        waiting: Deferred[Any] = Deferred()
        if content_id in self._opening:
            self._opening[content_id].append(waiting)
            return waiting
        self._opening[content_id] = waiters = [waiting]
        assert self.tracker is not None
        got: Deferred[Manifest] = (
            succeed(manifest) if manifest is not None else self.tracker.get_manifest(content_id)
        )

        def start(m: Manifest) -> DownloadSession:
            if m.content_id != content_id:
                raise ManifestError("the tracker sent a manifest for another content")
            self._check_signed(m)
            return self._start_session(m)

        def fan_out(result: object) -> None:
            del self._opening[content_id]
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        got.addCallback(start)
        got.addBoth(fan_out)
        return waiting

    def _start_session(self, manifest: Manifest) -> DownloadSession:
        assert self.store is not None and self.tracker is not None
        cid = manifest.content_id
        find = holder_finder(self.tracker, cid, self.config.use_servers, self.node_id, exclude=[self.node_id])
        lookup = TicketedLookup(self.tracker, cid, self.node_id, self.clock, find=find)

        def connect(node: NodeLike, listener: IPeerListener) -> Deferred[PeerProtocol]:
            return self._connect(node, listener, lookup)

        session = DownloadSession(
            self.store.entry(manifest),
            self.clock,
            lookup.find_nodes,
            connect,
            fetch_range=lambda url, a, b: fetch_range(self._agent, url, a, b, self.clock),
            max_peers=self.config.max_peers,
            window=self.config.window,
            on_complete=self._session_complete,
            deadline=self.config.playback_deadline,
            offload=lambda f, *a: threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), f, *a
            ),
        )
        self.sessions[cid] = session

        def failed(f: Failure) -> None:
            log.warn("Download of {cid} failed: {error}", cid=cid[:12], error=f.getErrorMessage())
            if f.check(QuotaExceeded) and self.sessions.get(cid) is session:
                # Forget it, so that the content can be opened again once
                # the quota allows (its bytes so far stay in the meter).
                self._sample_usage()
                del self.sessions[cid]

        session.done.addErrback(failed)
        session.start()
        return session

    def _session_complete(self, session: DownloadSession) -> None:
        if self.running:
            self.announce()

    def _connect(
        self, node: NodeLike, listener: IPeerListener, lookup: TicketedLookup
    ) -> Deferred[PeerProtocol]:
        """
        Dial C{node} for C{lookup}'s content with a fresh ticket.  The
        connection serves the dialed node that content only (it was listed
        as holding it).
        """
        host = node.host if ":" not in node.host else node.host.replace(":", r"\:")
        endpoint = clientFromString(
            self.reactor, f"tcp:host={host}:port={node.port}:timeout={CONNECT_TIMEOUT}"
        )

        def dial(ticket: bytes) -> Deferred[PeerProtocol]:
            proto = PeerProtocol(
                self.node_id,
                self.clock,
                store=self.store,
                listener=listener,
                ticket=ticket,
                scope=bytes.fromhex(lookup.content_id),
            )
            d = connectProtocol(endpoint, proto)
            d.addCallback(lambda p: p.ready)
            return d

        return lookup.ticket().addCallback(dial)

    def status(self) -> dict[str, Any]:
        store = self.store
        return {
            "node_id": self.node_id,
            "holdings": store.holdings() if store else [],
            "sessions": {cid: s.status() for cid, s in self.sessions.items()},
            "uploaded_bytes": sum(p.bytes_sent for p in self.peer_factory.connections)
            if self.peer_factory
            else 0,
            "reservations": self.reservations,
            "usage": {
                "seq": self.usage.seq,
                "unreported": self.usage.pending(),
                "tracker": self.usage_standing,
            },
        }


def _port_of(port: IListeningPort) -> int:
    return int(port.getHost().port)  # type: ignore[attr-defined]
