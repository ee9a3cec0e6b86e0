"""
Content servers end to end (claims 37, 38), with real parts on loopback: a
tracker on real SQLite, a content server agent (an account with the server
role, C{server=True}, i.e. C{twistd meshstream-agent --server}), a peer agent
and viewers downloading with C{--use-servers instead|off|beside}.  Also the
node state the agent reports, and L{RateMeter}.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial import unittest

from meshstream.agent.service import AgentConfig, AgentService, RateMeter
from meshstream.errors import MeshstreamError
from meshstream.tracker import auth
from meshstream.tracker.client import TrackerClient
from tests._accounts import make_user
from tests.test_integration import LOOPBACK, Mesh, reactor

STATE_FIELDS = {
    "upload_bps",
    "download_bps",
    "disk_io_bps",
    "connections",
    "upload_slots",
    "cpu",
    "memory",
    "upload_capacity_bps",
}


async def start_agent(
    mesh: Mesh,
    name: str,
    seeds: list[str] | None = None,
    role: str = auth.USER,
    server: bool = False,
    use_servers: str = "beside",
    upload_rate: float | None = None,
) -> AgentService:
    """An agent whose account has C{role}; C{ready} may fail (the caller awaits it)."""
    config = AgentConfig(
        tracker=mesh.tracker_url,
        data_dir=os.path.join(mesh.root, name, "data"),
        listen=[LOOPBACK],
        stream=None,
        seeds=seeds or [],
        node_id=name,
        upload_rate=upload_rate,
        tracker_key=mesh.key,
        credentials=await make_user(mesh.tracker_store, f"owner-of-{name}", role),
        server=server,
        use_servers=use_servers,
    )
    agent = AgentService(config, reactor)
    agent.startService()
    mesh.case.addCleanup(lambda: agent.stopService() if agent.running else None)
    return agent


class ContentServerTests(unittest.TestCase):
    timeout = 60

    def test_use_servers(self) -> Deferred[None]:
        """
        One content held by a content server and by a peer: a viewer with
        C{instead} gets every byte from the server, one with C{off} none,
        one with C{beside} from both.
        """
        return ensureDeferred(self._use_servers())

    async def _use_servers(self) -> None:
        mesh = Mesh(self)
        await mesh.start_tracker()
        src, data, manifest = await mesh.new_content(3 * 1024 * 1024 + 4321)
        cid = manifest.content_id
        rate = 3 * 2**20
        cdn = await start_agent(
            mesh, "cdn", [mesh.seed_copy("cdn", src, manifest)], auth.SERVER, True, upload_rate=rate
        )
        peer = await start_agent(mesh, "peer", [mesh.seed_copy("peer", src, manifest)], upload_rate=rate)
        await cdn.ready
        await peer.ready
        # The tracker lists each where it belongs.
        client = TrackerClient(mesh.http, mesh.tracker_url, reactor, credentials=mesh.publisher)
        self.assertEqual([n.node_id for n in await client.servers(cid)], ["cdn"])
        self.assertEqual([n.node_id for n in await client.nodes(cid)], ["peer"])

        async def download(name: str, mode: str) -> dict[str, int]:
            viewer = await start_agent(mesh, name, use_servers=mode)
            await viewer.ready
            session = await viewer.download(cid)
            await session.done
            assert viewer.store is not None
            self.assertEqual(viewer.store.cache[cid].read_range(0, len(data)), data)
            by_source: dict[str, int] = session.bytes_by_source
            self.assertEqual(sum(by_source.values()), len(data))
            return by_source

        self.assertEqual(await download("viewer-instead", "instead"), {"cdn": len(data)})
        off = await download("viewer-off", "off")
        self.assertNotIn("cdn", off)
        self.assertGreater(off.get("peer", 0), 0)
        beside = await download("viewer-beside", "beside")
        self.assertGreater(beside.get("cdn", 0), 0)
        self.assertGreater(sum(n for source, n in beside.items() if source != "cdn"), 0)

        # The server reports its state: everything it measures, with the
        # bytes it uploaded and read from its store since the last announce.
        await cdn.announce()
        (listed,) = await client.servers(cid)
        self.assertEqual(set(listed.state), STATE_FIELDS)
        self.assertEqual(listed.state["upload_slots"], 32)
        self.assertEqual(listed.state["upload_capacity_bps"], rate)
        self.assertGreater(listed.state["upload_bps"], 0)
        self.assertGreater(listed.state["disk_io_bps"], 0)
        self.assertTrue(0 <= listed.state["cpu"] <= 1 and 0 < listed.state["memory"] <= 1)

    def test_server_needs_the_server_role(self) -> Deferred[None]:
        """C{--server} with a user account: the agent refuses to start, and is not listed."""
        return ensureDeferred(self._needs_role())

    async def _needs_role(self) -> None:
        mesh = Mesh(self)
        await mesh.start_tracker()
        agent = await start_agent(mesh, "fake-cdn", role=auth.USER, server=True)
        with self.assertRaises(MeshstreamError) as e:
            await agent.ready
        self.assertIn("server role", str(e.exception))
        self.assertEqual(await mesh.tracker_store.count_nodes(), 0)
        self.flushLoggedErrors(MeshstreamError)


class RateMeterTests(unittest.SynchronousTestCase):
    def test_rate_between_readings(self) -> None:
        meter = RateMeter()
        self.assertEqual(meter.update(500, 10.0), 0.0)  # the first reading has no rate
        self.assertEqual(meter.update(1500, 12.0), 500.0)
        self.assertEqual(meter.update(1500, 12.0), 500.0)  # no time passed: keep the last rate
        self.assertEqual(meter.update(1500, 14.0), 0.0)

    def test_counter_reset_is_not_negative(self) -> None:
        meter = RateMeter()
        meter.update(1000, 1.0)
        self.assertEqual(meter.update(10, 2.0), 0.0)
        self.assertEqual(meter.update(110, 3.0), 100.0)

    def test_clock_step_back(self) -> None:
        meter = RateMeter()
        meter.update(0, 10.0)
        meter.update(100, 11.0)
        self.assertEqual(meter.update(200, 5.0), 100.0)
        self.assertEqual(meter.update(300, 12.0), 200.0)
