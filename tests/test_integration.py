"""
End-to-end tests on loopback with real parts: a tracker on real SQLite,
agents with real peer sockets and throttled uploads, a viewer streaming
through its real local HTTP stream server, twisted.web as the HTTP origin, and
ffprobe reading the stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from typing import Any

import treq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site
from twisted.web.static import File

from meshstream import tickets
from meshstream.agent.service import AgentConfig, AgentService, manifest_path_for
from meshstream.manifest import Manifest, build_manifest, public_key_text
from meshstream.tracker import auth
from meshstream.tracker.client import TrackerClient
from meshstream.tracker.service import build_tracker_service, load_or_create_key
from meshstream.wire import frames as F
from tests._accounts import make_user

reactor: Any = _reactor
LOOPBACK = "tcp:0:interface=127.0.0.1"
BLOCK = 256 * 1024
SUB = 16 * 1024


class Mesh:
    """A tracker, an origin and agents on loopback, all torn down by the test's cleanups."""

    def __init__(self, case: unittest.TestCase) -> None:
        self.case = case
        self.root = os.path.abspath(case.mktemp())
        os.makedirs(self.root)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.tracker_url = ""
        self.key = ""
        self.origin_url = ""

    async def start_tracker(self) -> None:
        key = load_or_create_key(os.path.join(self.root, "tracker.key"))
        service = build_tracker_service(
            reactor, [LOOPBACK], f"sqlite:{os.path.join(self.root, 'tracker.sqlite')}", key
        )
        service.startService()
        self.case.addCleanup(service.stopService)
        await service.ready()
        self.tracker_store = service.store
        self.publisher = await make_user(service.store, "publisher", auth.SERVER)
        (port,) = await service.listening()
        self.tracker_url = f"http://127.0.0.1:{port.getHost().port}"
        self.key = public_key_text(key.public_key())

    def start_origin(self, directory: str) -> None:
        port = reactor.listenTCP(0, Site(File(directory)), interface="127.0.0.1")
        self.case.addCleanup(port.stopListening)
        self.origin_url = f"http://127.0.0.1:{port.getHost().port}/"

    async def new_content(self, size: int) -> tuple[str, bytes, Manifest]:
        """A file of C{size} random bytes, C{content.bin} in the mesh's directory, published."""
        src = os.path.join(self.root, "content.bin")
        data = make_file(src, size)
        return src, data, await self.publish(src)

    async def publish(self, path: str, origin: bool = False) -> Manifest:
        origins = [self.origin_url + os.path.basename(path)] if origin else []
        manifest, _ = build_manifest(path, BLOCK, SUB, origins=origins, meta={"mime_type": "video/mp4"})
        client = TrackerClient(self.http, self.tracker_url, reactor, credentials=self.publisher)
        signed: Manifest = await client.register_manifest(manifest)
        return signed

    def seed_copy(self, name: str, path: str, manifest: Manifest) -> str:
        home = os.path.join(self.root, name)
        os.makedirs(home, exist_ok=True)
        copy = os.path.join(home, os.path.basename(path))
        shutil.copyfile(path, copy)
        with open(manifest_path_for(copy), "wb") as f:
            f.write(manifest.to_json())
        return copy

    async def agent(
        self,
        name: str,
        seeds: list[str] | None = None,
        upload_rate: float | None = None,
        stream: bool = False,
        playback_deadline: float = 3.0,
    ) -> AgentService:
        config = AgentConfig(
            tracker=self.tracker_url,
            data_dir=os.path.join(self.root, name, "data"),
            listen=[LOOPBACK],
            stream=LOOPBACK if stream else None,
            seeds=seeds or [],
            node_id=name,
            upload_rate=upload_rate,
            tracker_key=self.key,
            credentials=await make_user(self.tracker_store, f"owner-of-{name}"),
            playback_deadline=playback_deadline,
        )
        agent = AgentService(config, reactor)
        agent.startService()
        self.case.addCleanup(lambda: agent.stopService() if agent.running else None)
        await agent.ready
        return agent

    def stream_url(self, viewer: AgentService, cid: str) -> str:
        assert viewer.stream_port is not None
        return f"http://127.0.0.1:{viewer.stream_port.getHost().port}/stream/{cid}"  # type: ignore[attr-defined]


class RawPeer(Protocol):
    """
    A hand-driven peer: sends some frames on connect, collects what comes
    back, and hangs up once C{enough} is true of it (or the other side does).
    """

    def __init__(self, send: list[F.Message], enough: Any) -> None:
        self.to_send = send
        self.enough = enough
        self.decoder = F.FrameDecoder()
        self.got: list[F.Message] = []
        self.done: Deferred[list[F.Message]] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"".join(F.encode(m) for m in self.to_send))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.got += self.decoder.feed(data)
        if self.enough(self.got):
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.got)


async def raw_exchange(agent: AgentService, send: list[F.Message], enough: Any = None) -> list[F.Message]:
    """Talk to C{agent}'s peer port as a hand-driven peer; what it answered."""
    port = agent.peer_ports[0].getHost().port  # type: ignore[attr-defined]
    peer = RawPeer(send, enough or (lambda got: False))
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), peer)
    peer.done.addTimeout(10, reactor)
    return await peer.done


def make_file(path: str, size: int) -> bytes:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


class MeshTests(unittest.TestCase):
    timeout = 60

    def test_seed_stopped_mid_download(self) -> Deferred[None]:
        """
        Three throttled seeds; the fastest is stopped when 40 % has been
        streamed; the viewer still streams every byte, verified, and the
        bytes came from all three seeds.
        """
        return ensureDeferred(self._seed_stopped())

    async def _seed_stopped(self) -> None:
        mesh = Mesh(self)
        await mesh.start_tracker()
        src, data, manifest = await mesh.new_content(6 * 1024 * 1024 + 12345)
        cid = manifest.content_id
        seeds = {}
        for name, rate in (("seed-a", 1.5), ("seed-b", 2.0), ("seed-c", 4.0)):
            copy = mesh.seed_copy(name, src, manifest)
            seeds[name] = await mesh.agent(name, [copy], upload_rate=rate * 2**20)
        viewer = await mesh.agent("viewer", stream=True)

        got = bytearray()
        stopped: list[Deferred[Any]] = []

        def collect(chunk: bytes) -> None:
            got.extend(chunk)
            if not stopped and len(got) >= 0.4 * len(data):
                stopped.append(seeds["seed-c"].stopService())

        response = await mesh.http.get(mesh.stream_url(viewer, cid), unbuffered=True)
        self.assertEqual(response.code, 200)
        await treq.collect(response, collect)
        await stopped[0]
        self.assertEqual(len(got), len(data))
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(data).digest())
        session = viewer.sessions[cid]
        by_source = session.bytes_by_source
        self.assertEqual(set(by_source), {"seed-a", "seed-b", "seed-c"})
        self.assertEqual(sum(by_source.values()), len(data))
        self.assertLess(by_source["seed-c"], len(data))
        self.assertNotIn("seed-c", session.peers)
        # The finished content is now held and announced by the viewer.
        await session.done
        self.assertIn(cid, viewer.store.holdings())  # type: ignore[union-attr]

    def test_lying_seed_is_caught(self) -> Deferred[None]:
        """
        A seed whose file changed after it was verified sends wrong bytes: the
        viewer rejects every one, black-lists it, and streams the true content
        from the honest seeds.
        """
        return ensureDeferred(self._liar())

    async def _liar(self) -> None:
        mesh = Mesh(self)
        await mesh.start_tracker()
        src, data, manifest = await mesh.new_content(3 * 1024 * 1024)
        cid = manifest.content_id
        for name in ("honest-1", "honest-2"):
            await mesh.agent(name, [mesh.seed_copy(name, src, manifest)], upload_rate=3 * 2**20)
        liar_copy = mesh.seed_copy("liar", src, manifest)
        await mesh.agent("liar", [liar_copy])  # unthrottled: it would win every race
        with open(liar_copy, "r+b") as f:  # the file changes under the running seed
            f.write(bytes(b ^ 0xFF for b in data))
        viewer = await mesh.agent("viewer", stream=True)

        response = await mesh.http.get(mesh.stream_url(viewer, cid))
        body = await treq.content(response)
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(data).digest())
        session = viewer.sessions[cid]
        self.assertGreater(session.rejected_bytes, 0)
        self.assertNotIn("liar", session.bytes_by_source)
        self.assertTrue(session.blacklist.barred("liar"))
        # The cache holds exactly the true bytes (read back through the scrambler).
        entry = viewer.store.cache[cid]  # type: ignore[union-attr]
        self.assertEqual(entry.read_range(0, len(data)), data)
        # ...and the file on disk is scrambled, not the plain content.
        with open(entry.data_path, "rb") as f:
            self.assertNotEqual(f.read(SUB), data[:SUB])

    def test_origin_fallback_when_no_peer(self) -> Deferred[None]:
        """No seed at all: the viewer falls back to the origin (twisted.web) by HTTP Range."""
        return ensureDeferred(self._origin())

    async def _origin(self) -> None:
        mesh = Mesh(self)
        await mesh.start_tracker()
        origin_dir = os.path.join(mesh.root, "origin")
        os.makedirs(origin_dir)
        src = os.path.join(origin_dir, "movie.bin")
        data = make_file(src, 1024 * 1024 + 777)
        mesh.start_origin(origin_dir)
        manifest = await mesh.publish(src, origin=True)
        viewer = await mesh.agent("viewer", stream=True)
        response = await mesh.http.get(mesh.stream_url(viewer, manifest.content_id))
        body = await treq.content(response)
        self.assertEqual(body, data)
        self.assertEqual(viewer.sessions[manifest.content_id].bytes_by_source, {"origin": len(data)})

    def test_playback_deadline_brings_in_the_origin(self) -> Deferred[None]:
        """
        The only seed is far too slow for the player: blocks the player waits
        on past the deadline come from the origin, while the seed keeps
        serving the rest.
        """
        return ensureDeferred(self._deadline())

    async def _deadline(self) -> None:
        mesh = Mesh(self)
        await mesh.start_tracker()
        origin_dir = os.path.join(mesh.root, "origin")
        os.makedirs(origin_dir)
        src = os.path.join(origin_dir, "movie.bin")
        data = make_file(src, 2 * 1024 * 1024)
        mesh.start_origin(origin_dir)
        manifest = await mesh.publish(src, origin=True)
        await mesh.agent("slow-seed", [mesh.seed_copy("slow-seed", src, manifest)], upload_rate=128 * 1024)
        viewer = await mesh.agent("viewer", stream=True, playback_deadline=0.5)
        response = await mesh.http.get(mesh.stream_url(viewer, manifest.content_id))
        body = await treq.content(response)
        self.assertEqual(body, data)
        by_source = viewer.sessions[manifest.content_id].bytes_by_source
        # At 128 KiB/s the seed alone would need 16 s; the origin took the late blocks.
        self.assertGreater(by_source.get("origin", 0), len(data) // 2)
        self.assertGreater(by_source.get("slow-seed", 0), 0)
        self.assertEqual(sum(by_source.values()), len(data))

    def test_fetch_by_content_id_through_the_tracker(self) -> Deferred[None]:
        """`meshstream fetch CONTENT_ID --tracker URL --tracker-key KEY` finds the seeds itself."""
        return ensureDeferred(self._fetch_by_id())

    async def _fetch_by_id(self) -> None:
        mesh = Mesh(self)
        await mesh.start_tracker()
        src, data, manifest = await mesh.new_content(3 * 1024 * 1024 + 5)
        for name in ("seed-1", "seed-2"):
            await mesh.agent(name, [mesh.seed_copy(name, src, manifest)], upload_rate=4 * 2**20)
        out = os.path.join(mesh.root, "fetched.bin")
        viewer = await make_user(mesh.tracker_store, "viewer")
        argv = ["-m", "meshstream.cli", "fetch", manifest.content_id, "--tracker", mesh.tracker_url]
        argv += ["--user", viewer.user]
        env = {**os.environ, "MESHSTREAM_PASSWORD": viewer.password}
        stdout, stderr, code = await getProcessOutputAndValue(
            sys.executable,
            [*argv, "--tracker-key", mesh.key, "-o", out, "--progress", "json"],
            env=env,
        )
        self.assertEqual(code, 0, stderr)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), data)
        final = json.loads(stdout.decode().splitlines()[-1])
        self.assertEqual(set(final["bytes_by_source"]), {"seed-1", "seed-2"})
        # A wrong tracker key: the manifest is refused and nothing is written.
        other = public_key_text(load_or_create_key(os.path.join(mesh.root, "other.key")).public_key())
        os.unlink(out)
        stdout, stderr, code = await getProcessOutputAndValue(
            sys.executable, [*argv, "--tracker-key", other, "-o", out], env=env
        )
        self.assertEqual(code, 1)
        self.assertIn(b"signature", stderr)
        self.assertFalse(os.path.exists(out))

    def test_serving_agent_checks_tickets(self) -> Deferred[None]:
        """
        A real seed refuses peers without a valid ticket (none, forged,
        expired, another node's) and serves another content's ticket holder nothing,
        while a viewer agent with its own tickets downloads everything.
        """
        return ensureDeferred(self._tickets())

    async def _tickets(self) -> None:
        mesh = Mesh(self)
        await mesh.start_tracker()
        src, data, manifest = await mesh.new_content(2 * 1024 * 1024 + 99)
        other_src = os.path.join(mesh.root, "other.bin")
        make_file(other_src, 1000)
        other = await mesh.publish(other_src)
        cid = manifest.content_id
        seed = await mesh.agent("seed", [mesh.seed_copy("seed", src, manifest)])
        # An intruder with an account gets a genuine ticket, for the other content.
        intruder = TrackerClient(
            mesh.http, mesh.tracker_url, reactor, credentials=await make_user(mesh.tracker_store, "intruder")
        )
        genuine = (await intruder.nodes_with_ticket(other.content_id, "intruder")).ticket
        assert genuine is not None
        forged = tickets.issue(
            Ed25519PrivateKey.generate(),
            tickets.Ticket(user="intruder", node="intruder", content=cid, expires=2**40),
        )
        tracker_key = load_or_create_key(os.path.join(mesh.root, "tracker.key"))
        expired = tickets.issue(
            tracker_key,
            tickets.Ticket(
                user="intruder", node="intruder", content=cid, expires=int(reactor.seconds()) - 60
            ),
        )
        request = F.Request(bytes.fromhex(cid), 0, (0, 1))
        for ticket, node, reason in (
            (b"", "intruder", "no ticket"),
            (forged, "intruder", "not signed by the tracker"),
            (expired, "intruder", "the ticket expired"),
            (genuine, "someone-else", "issued to node intruder"),
        ):
            got = await raw_exchange(seed, [F.Hello(node_id=node, ticket=ticket), request])
            self.assertEqual(len(got), 1, got)  # no HELLO, no data: just the refusal
            (bye,) = got
            assert isinstance(bye, F.Bye)
            self.assertEqual(bye.code, F.ByeCode.UNAUTHORIZED)
            self.assertIn(reason, bye.reason)
        # The genuine ticket lets the intruder in, but only for its content.
        got = await raw_exchange(
            seed,
            [F.Hello(node_id="intruder", ticket=genuine), request],
            enough=lambda got: any(isinstance(m, F.Reject) for m in got),
        )
        self.assertEqual([type(m) for m in got], [F.Hello, F.Reject])
        reject = got[1]
        assert isinstance(reject, F.Reject)
        self.assertEqual((reject.code, reject.sub), (F.RejectCode.UNAUTHORIZED, F.WHOLE_REQUEST))
        # A viewer agent presents its own tickets and gets every byte from the seed.
        viewer = await mesh.agent("viewer", stream=True)
        response = await mesh.http.get(mesh.stream_url(viewer, cid))
        self.assertEqual(await treq.content(response), data)
        self.assertEqual(viewer.sessions[cid].bytes_by_source, {"seed": len(data)})

    def test_unknown_content_is_404(self) -> Deferred[None]:
        return ensureDeferred(self._unknown())

    async def _unknown(self) -> None:
        mesh = Mesh(self)
        await mesh.start_tracker()
        viewer = await mesh.agent("viewer", stream=True)
        response = await mesh.http.get(mesh.stream_url(viewer, "ab" * 32))
        self.assertEqual(response.code, 404)
        await treq.content(response)
        response = await mesh.http.get(mesh.stream_url(viewer, "ab" * 32).rsplit("/", 1)[0] + "/../status")
        await treq.content(response)


FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")


class FFprobeTests(unittest.TestCase):
    timeout = 60
    if not (FFMPEG and FFPROBE):
        skip = "ffmpeg/ffprobe not installed (Debian package ffmpeg)"

    def test_ffprobe_reads_the_stream(self) -> Deferred[None]:
        """A real media file made by ffmpeg, seeded, streamed to a viewer and read by ffprobe."""
        return ensureDeferred(self._ffprobe())

    async def _ffprobe(self) -> None:
        mesh = Mesh(self)
        await mesh.start_tracker()
        src = os.path.join(mesh.root, "clip.mp4")
        out, err, code = await getProcessOutputAndValue(
            FFMPEG or "ffmpeg",
            [
                "-hide_banner", "-loglevel", "error", "-f", "lavfi",
                "-i", "testsrc=duration=3:size=320x240:rate=25",
                "-c:v", "mpeg4", "-q:v", "3", "-movflags", "+faststart", "-y", src,
            ],
            env=os.environ,
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        manifest = await mesh.publish(src)
        await mesh.agent("seed", [mesh.seed_copy("seed", src, manifest)], upload_rate=2 * 2**20)
        viewer = await mesh.agent("viewer", stream=True)
        url = mesh.stream_url(viewer, manifest.content_id)
        out, err, code = await getProcessOutputAndValue(
            FFPROBE or "ffprobe",
            ["-v", "error", "-print_format", "json", "-show_format", "-show_streams", url],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        probe = json.loads(out)
        self.assertEqual(probe["streams"][0]["codec_name"], "mpeg4")
        self.assertEqual((probe["streams"][0]["width"], probe["streams"][0]["height"]), (320, 240))
        self.assertAlmostEqual(float(probe["format"]["duration"]), 3.0, delta=0.2)
        await deferLater(reactor, 0, lambda: None)
