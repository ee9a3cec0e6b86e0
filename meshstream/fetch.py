# -*- test-case-name: tests.test_fetch -*-
"""
C{meshstream fetch}: download one content from a pool of sources into a file.

    meshstream fetch (CONTENT_ID | --manifest FILE) [--source URL]... [--tracker URL] -o OUT

Sources are peers (C{meshstream://host:port}), HTTP servers with Range
support (C{http://...}, used like peers), the peers the tracker lists, and,
only when nothing else is left, the origins named in the manifest.  Every sub
block is verified before it is written; the output is written to
C{OUT.part} and renamed to C{OUT} only once complete, so C{OUT} never holds an
unverified byte.

With C{--tracker}, every node lookup also brings a peer ticket
(L{meshstream.tickets}) that fetch presents to every peer; agents refuse
peers without one, so C{meshstream://} sources without C{--tracker} work only
with peers that do not check tickets (the benchmarks' sources).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from attrs import field, frozen

from meshstream.agent.store import StoreError, SubBlockFile
from meshstream.errors import MeshstreamError
from meshstream.manifest import Manifest, ManifestError, load_public_key
from meshstream.scheduler.core import DEFAULT_WINDOW

if TYPE_CHECKING:
    from meshstream.tracker.client import Credentials


class OutputFile(SubBlockFile):
    """A plain file as a session's sink: verified sub blocks land at their offsets."""

    def __init__(self, path: str, manifest: Manifest) -> None:
        super().__init__(manifest)
        self.path = path
        self.part = path + ".part"
        self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def _write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write verified bytes; safe to call from a worker thread."""
        try:
            if os.pwrite(self._fd, data, offset) != len(data):
                raise OSError("short write")
        except OSError as e:
            raise StoreError(f"cannot write {self.part}: {e}") from e

    def read_range(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def fileno(self) -> int:
        """The descriptor of C{OUT.part}, for helpers that write verified blocks to it."""
        return self._fd

    def finish(self) -> None:
        """All verified: make the file whole (size, durability) and give it its name."""
        os.ftruncate(self._fd, self.manifest.size)
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self.part, self.path)

    def abandon(self) -> None:
        os.close(self._fd)


@frozen
class PeerAddress:
    """A peer given on the command line, shaped like a tracker's node entry."""

    host: str
    port: int
    state: dict[str, Any] = field(factory=dict)

    @property
    def node_id(self) -> str:
        return f"{self.host}:{self.port}"


def parse_source(url: str) -> PeerAddress | str:
    """C{meshstream://host:port} -> a peer; C{http(s)://...} -> the URL itself."""
    parts = urlsplit(url)
    if parts.scheme == "meshstream":
        if not parts.hostname or not parts.port:
            raise ValueError(f"a peer source is meshstream://HOST:PORT, not {url!r}")
        return PeerAddress(parts.hostname, parts.port)
    if parts.scheme in ("http", "https") and parts.hostname:
        return url
    raise ValueError(f"unknown source {url!r}: use meshstream://HOST:PORT or an http(s):// URL")


def add_login_arguments(p: argparse.ArgumentParser) -> None:
    """C{--user} and C{--password-file}: the tracker account to log in as."""
    p.add_argument("--user", help="tracker account to log in as")
    p.add_argument(
        "--password-file", help="file whose first line is the password (default: $MESHSTREAM_PASSWORD)"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("content_id", nargs="?", help="content id (needs --tracker)")
    p.add_argument("--manifest", help="a manifest file (signed or not) instead of a content id")
    p.add_argument("--source", action="append", default=[], help="meshstream://HOST:PORT or http(s):// URL")
    p.add_argument("--tracker", help="tracker base URL: manifest by id, and more peers")
    p.add_argument("--tracker-key", help="the tracker's public key (base64) or a file holding it")
    add_login_arguments(p)
    p.add_argument("--tracker-ca", help="PEM file of the CAs to trust for an https:// tracker")
    p.add_argument("-o", "--output", required=True, help="where to write the content")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="blocks in flight (1 = faithful mode)")
    p.add_argument("--pipeline", type=int, default=4, help="sub block requests outstanding per peer")
    p.add_argument("--max-peers", type=int, default=4, help="peers from the tracker to use at once")
    p.add_argument("--policy", choices=["adaptive", "static"], default="adaptive")
    p.add_argument(
        "--verify-processes",
        type=int,
        help="helper processes checking whole blocks from HTTP sources (default: one per CPU"
        " but one, at least 1, at most 4; 0: worker threads)",
    )
    p.add_argument("--progress", choices=["bar", "json", "none"], default="bar")
    p.add_argument(
        "--origin-grace", type=float, default=1.0, help="seconds without any source before using the origin"
    )


def _fail(message: str) -> int:
    print(f"meshstream fetch: {message}", file=sys.stderr)
    return 1


def run_fetch(args: argparse.Namespace) -> int:
    if bool(args.content_id) == bool(args.manifest):
        print("meshstream fetch: give a CONTENT_ID or --manifest FILE (one of them)", file=sys.stderr)
        return 2
    if args.content_id and not args.tracker:
        print("meshstream fetch: a CONTENT_ID needs --tracker", file=sys.stderr)
        return 2
    if args.window < 1 or args.pipeline < 1 or args.max_peers < 1:
        print("meshstream fetch: --window, --pipeline and --max-peers are at least 1", file=sys.stderr)
        return 2
    if args.verify_processes is not None and args.verify_processes < 0:
        print("meshstream fetch: --verify-processes is at least 0", file=sys.stderr)
        return 2
    try:
        credentials = None
        if args.user or args.password_file:
            # The tracker client (and twisted.web) only when logging in: a
            # fetch from mirrors starts without them.
            from meshstream.tracker.client import load_credentials

            credentials = load_credentials(args.user, args.password_file)
        if args.tracker_ca is not None:
            from meshstream.tls import check_tracker_ca

            check_tracker_ca(args.tracker, args.tracker_ca)
        sources = [parse_source(u) for u in args.source]
        key = None
        if args.tracker_key:
            data = args.tracker_key.encode()
            if os.path.exists(args.tracker_key):
                with open(args.tracker_key, "rb") as f:
                    data = f.read()
            key = load_public_key(data)
        manifest = None
        if args.manifest:
            with open(args.manifest, "rb") as f:
                manifest = Manifest.from_json(f.read())
            if key is not None:
                manifest.verify(key)
    except (ValueError, OSError, MeshstreamError) as e:
        print(f"meshstream fetch: {e}", file=sys.stderr)
        return 2

    from twisted.internet import task

    outcome: list[int] = []

    def main(reactor: Any) -> Any:
        from twisted.internet.defer import ensureDeferred

        return ensureDeferred(_fetch(reactor, args, manifest, key, sources, credentials, outcome))

    try:
        task.react(main)
    except SystemExit:
        pass
    return outcome[0] if outcome else 1


async def _fetch(
    reactor: Any,
    args: argparse.Namespace,
    manifest: Manifest | None,
    key: Any,
    sources: list[PeerAddress | str],
    credentials: Credentials | None,
    outcome: list[int],
) -> None:
    from twisted.internet.defer import Deferred

    from meshstream.agent.session import DownloadSession
    from meshstream.rangeclient import RangeClient
    from meshstream.wire.protocol import PeerProtocol
    from meshstream.workers import WorkerPool

    # Modules and classes live as long as the process: keep them out of
    # every garbage collection from now on (collections walking them took
    # 5-10 % of the reactor thread's time on a 1 GiB fetch).
    gc.freeze()

    # Plain http:// mirrors and origins go through the lean range client
    # (made once the block size is known); https:// ones and the tracker
    # through twisted.web's Agent, made only when needed (importing it is a
    # tenth of the start-up).
    ranges: RangeClient | None = None
    verifier: Any = None
    web: dict[str, Any] = {}
    # Hashing and writing verified blocks: a thread per core (at least two,
    # so one can write while another hashes), at most four.
    workers = WorkerPool(reactor, size=min(4, max(2, os.cpu_count() or 2)))

    def agent() -> Any:
        if not web:
            from meshstream.sources import StoppablePool, make_agent

            pool = StoppablePool(reactor, persistent=True)
            pool.maxPersistentPerHost = 32
            web["pool"] = pool
            web["agent"] = make_agent(reactor, pool)
        return web["agent"]

    def fetch_range(url: str, first: int, last: int) -> Deferred[memoryview]:
        if url.startswith("http://") and ranges is not None:
            return ranges.fetch(url, first, last)
        from meshstream.sources import fetch_range as agent_fetch_range

        return agent_fetch_range(agent(), url, first, last, reactor)

    tracker = None
    tracker_pool: Any = None
    if args.tracker:
        from meshstream.sources import StoppablePool
        from meshstream.tls import tracker_http
        from meshstream.tracker.client import TrackerClient

        # A pool of its own: see L{tracker_http}.
        tracker_pool = StoppablePool(reactor, persistent=True)
        http = tracker_http(reactor, tracker_pool, args.tracker_ca)
        tracker = TrackerClient(http, args.tracker, reactor, credentials=credentials)
    node_id = "fetch-" + uuid.uuid4().hex[:8]
    sink: OutputFile | None = None
    try:
        if manifest is None:
            assert tracker is not None
            if key is None:
                print("meshstream fetch: no --tracker-key: trusting the tracker's key", file=sys.stderr)
                key = await tracker.public_key()
            manifest = await tracker.get_manifest(args.content_id)
            if manifest.content_id != args.content_id:
                raise ManifestError("the tracker sent a manifest for another content")
            manifest.verify(key)
        peers = [s for s in sources if isinstance(s, PeerAddress)]
        mirrors = [s for s in sources if isinstance(s, str)]
        cid = manifest.content_id

        lookup = None
        if tracker is not None:
            from meshstream.agent.lookup import TicketedLookup

            lookup = TicketedLookup(tracker, cid, node_id, reactor)

        def find_nodes() -> Deferred[list[Any]]:
            if lookup is None:
                return Deferred.fromCoroutine(_const(list(peers)))
            d = lookup.find_nodes()
            d.addCallback(lambda listed: [*peers, *listed])
            return d

        def connect(node: Any, listener: Any) -> Deferred[PeerProtocol]:
            # With a tracker every peer (listed or given) gets its ticket;
            # without one, peers that check tickets refuse us.
            host = node.host.replace(":", r"\:")
            from twisted.internet.endpoints import clientFromString, connectProtocol

            endpoint = clientFromString(reactor, f"tcp:host={host}:port={node.port}:timeout=5")

            def dial(ticket: bytes) -> Deferred[PeerProtocol]:
                proto = PeerProtocol(node_id, reactor, listener=listener, ticket=ticket)
                d = connectProtocol(endpoint, proto)
                d.addCallback(lambda p: p.ready)
                return d

            if lookup is None:
                return dial(b"")
            return lookup.ticket().addCallback(dial)

        sink = OutputFile(args.output, manifest)
        if mirrors or manifest.origins:
            verifier = _start_verifier(reactor, args, sink, manifest)
        ranges = RangeClient(reactor, buffers=verifier.buffers if verifier is not None else None)
        g = manifest.geometry

        def check_block(block: int, data: Any, root: bytes) -> Any:
            if verifier is None:
                return None
            return verifier.check(data, g.block_offset(block), g.sub_block_size, root)

        progress = Progress(args.progress, manifest.size, manifest.block_size)
        session = DownloadSession(
            sink,
            reactor,
            find_nodes,
            connect,
            fetch_range=fetch_range,
            max_peers=max(args.max_peers, len(peers)),
            pipeline=args.pipeline,
            window=args.window,
            http_sources=mirrors,
            policy=args.policy,
            on_block=progress.block,
            origin_grace=args.origin_grace,
            offload=workers.run,
            recycle=ranges.release,
            check_block=check_block,
        )
        progress.by_source = session.bytes_by_source
        session.start()
        try:
            await session.done
        finally:
            progress.finish(session.status())
        sink.finish()
        sink = None
        outcome.append(0)
    except Exception as e:
        if sink is not None:
            sink.abandon()
        reason = str(e) or type(e).__name__
        if args.progress == "json":
            print(json.dumps({"done": True, "ok": False, "error": reason}), flush=True)
        outcome.append(_fail(reason))
    finally:
        workers.stop()
        if ranges is not None:
            ranges.close()
        if verifier is not None:
            await verifier.stop()
        if web:
            await web["pool"].closeCachedConnections()
        if tracker_pool is not None:
            await tracker_pool.closeCachedConnections()


def _start_verifier(reactor: Any, args: argparse.Namespace, sink: OutputFile, manifest: Manifest) -> Any:
    """
    Helper processes that check and write whole blocks from HTTP sources
    (L{meshstream.verifier}), or None where they cannot run or are not wanted.
    """
    from meshstream import verifier

    processes = args.verify_processes
    if processes is None:
        # The reactor keeps a core busy receiving: the others check.  On two
        # cores one helper was faster than two (bench/RESULTS.md).
        processes = min(4, max(1, (os.cpu_count() or 1) - 1))
    # Room for every block of the window, and a few more in flight.
    slots = min(args.window + 8, verifier.MAX_ARENA // manifest.block_size)
    if processes < 1 or slots < 2 or not verifier.available():
        return None
    try:
        return verifier.BlockVerifier(reactor, sink.fileno(), manifest.block_size, slots, processes)
    except OSError as e:
        print(f"meshstream fetch: checking blocks in threads ({e})", file=sys.stderr)
        return None


async def _const(value: Any) -> Any:
    return value


def _short(source: str) -> str:
    """A source's name for the progress bar: host:port for URLs, as is otherwise."""
    parts = urlsplit(source)
    return parts.netloc or source


class Progress:
    """A progress bar on stderr, or JSON lines on stdout for scripts and benchmarks."""

    def __init__(self, mode: str, size: int, block_size: int) -> None:
        self.mode = mode
        self.size = size
        self.block_size = block_size
        self.started = time.monotonic()
        self._shown = 0.0
        #: Bytes per source so far (the session's own dict, read as it grows).
        self.by_source: dict[str, int] = {}

    def block(self, block: int) -> None:
        done = min(self.size, (block + 1) * self.block_size)
        now = time.monotonic()
        t = now - self.started
        if self.mode == "json":
            print(json.dumps({"t": round(t, 6), "bytes": done, "size": self.size}), flush=True)
        elif self.mode == "bar" and (now - self._shown >= 0.2 or done == self.size):
            self._shown = now
            frac = done / self.size if self.size else 1.0
            fill = int(frac * 30)
            rate = done / t / 2**20 if t > 0 else 0.0
            total = sum(self.by_source.values()) or 1
            shares = " ".join(
                f"{_short(name)}:{n / total:.0%}"
                for name, n in sorted(self.by_source.items(), key=lambda kv: -kv[1])[:4]
            )
            sys.stderr.write(
                f"\r[{'#' * fill}{'.' * (30 - fill)}] {frac:6.1%} {done / 2**20:8.1f} MiB"
                f" {rate:7.2f} MiB/s  {shares}\033[K"
            )
            sys.stderr.flush()

    def finish(self, status: dict[str, Any]) -> None:
        seconds = time.monotonic() - self.started
        ok = bool(status.get("complete"))
        if self.mode == "json":
            print(
                json.dumps(
                    {
                        "done": True,
                        "ok": ok,
                        "seconds": round(seconds, 6),
                        "bytes": self.size if ok else None,
                        "bytes_by_source": status.get("bytes_by_source", {}),
                        "duplicated_bytes": status.get("duplicated_bytes", 0),
                        "rejected_bytes": status.get("rejected_bytes", 0),
                        "error": status.get("failed"),
                    }
                ),
                flush=True,
            )
        elif self.mode == "bar":
            sys.stderr.write("\n")
            by_source = status.get("bytes_by_source", {})
            total = sum(by_source.values()) or 1
            for name, n in sorted(by_source.items(), key=lambda kv: -kv[1]):
                sys.stderr.write(f"  {name:<40} {n / 2**20:9.1f} MiB {n / total:6.1%}\n")
            if ok:
                sys.stderr.write(
                    f"  {self.size / 2**20:.1f} MiB in {seconds:.2f}s"
                    f" ({self.size / max(seconds, 1e-9) / 2**20:.2f} MiB/s), verified\n"
                )
