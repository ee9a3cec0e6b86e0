"""
Usage, quotas and reservations end to end, with real parts on loopback (see
L{tests.test_integration}): agents report what they downloaded and uploaded,
the tracker's records match the bytes that moved, a user over quota gets a
402 on their stream, and reservations reach the agent with its heartbeat.
"""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from meshstream.agent.service import AgentService
from meshstream.tracker import billing
from meshstream.tracker.client import TrackerClient
from tests.test_integration import Mesh, make_file, reactor


def owner(agent: AgentService) -> str:
    assert agent.config.credentials is not None
    return agent.config.credentials.user


async def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on any more."""
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    return f"http://127.0.0.1:{number}"


class AgentUsageTests(unittest.TestCase):
    timeout = 60

    async def usage(self, mesh: Mesh) -> dict[str, dict[str, int]]:
        """The tracker's usage rows of this month, as {"user content_id": counters}."""
        rows = await mesh.tracker_store.usage(billing.period_of(reactor.seconds()))
        return {
            f"{r.user} {r.content_id}": {k: v for k, v in r.to_dict().items() if k in billing.COUNTERS}
            for r in rows
        }

    def test_download_is_reported(self) -> Deferred[None]:
        """
        A viewer downloads from a seed: the viewer's user is charged the bytes
        from peers, the seed's user credited with the bytes uploaded, once
        each, even when a report had to be sent again.
        """
        return ensureDeferred(self._download_is_reported())

    async def _download_is_reported(self) -> None:
        mesh = Mesh(self)
        await mesh.start_tracker()
        src, data, manifest = await mesh.new_content(2 * 1024 * 1024 + 4321)
        size = len(data)
        cid = manifest.content_id
        seed = await mesh.agent("seed", [mesh.seed_copy("seed", src, manifest)])
        viewer = await mesh.agent("viewer")
        session = await viewer.download(cid)
        await session.done

        # The tracker cannot be reached: the viewer keeps its numbers.
        assert viewer.tracker is not None
        tracker_url = viewer.tracker.base_url
        viewer.tracker.base_url = await closed_port_url()
        await viewer.report_usage()
        first_seq = viewer.usage.seq
        self.assertEqual(
            viewer.usage.pending(), {cid: {**dict.fromkeys(billing.COUNTERS, 0), "from_peers": size}}
        )
        self.assertEqual(await self.usage(mesh), {})
        viewer.tracker.base_url = tracker_url

        # The next heartbeat sends the same report (same seq); the seed reports its uploads.
        await viewer.announce()
        await seed.announce()
        self.assertEqual(viewer.usage.seq, first_seq)
        self.assertEqual(viewer.usage.pending(), {})
        zero = dict.fromkeys(billing.COUNTERS, 0)
        expected = {
            f"{owner(viewer)} {cid}": {**zero, "from_peers": size},
            f"{owner(seed)} {cid}": {**zero, "uploaded": size},
        }
        self.assertEqual(await self.usage(mesh), expected)
        # Nothing new: nothing more is counted, at the next heartbeat or at stop.
        await viewer.announce()
        await viewer.stopService()
        self.assertEqual(await self.usage(mesh), expected)
        standing = viewer.status()["usage"]["tracker"]
        self.assertEqual((standing["used_bytes"], standing["quota_bytes"]), (size, None))

    def test_origin_bytes_and_quota(self) -> Deferred[None]:
        """
        Bytes from the origin are charged as such; once they reach the
        user's quota, the viewer's stream of another content is a 402 with
        the tracker's reason.
        """
        return ensureDeferred(self._origin_bytes_and_quota())

    async def _origin_bytes_and_quota(self) -> None:
        mesh = Mesh(self)
        await mesh.start_tracker()
        origin_dir = os.path.join(mesh.root, "origin")
        os.makedirs(origin_dir)
        first, second = os.path.join(origin_dir, "one.bin"), os.path.join(origin_dir, "two.bin")
        size = len(make_file(first, 1024 * 1024 + 99))
        make_file(second, 300 * 1024)
        mesh.start_origin(origin_dir)
        one = (await mesh.publish(first, origin=True)).content_id
        two = (await mesh.publish(second, origin=True)).content_id
        viewer = await mesh.agent("viewer", stream=True)
        await mesh.tracker_store.update_user(owner(viewer), quota_bytes=size)
        response = await mesh.http.get(mesh.stream_url(viewer, one))
        self.assertEqual(len(await treq.content(response)), size)
        await viewer.announce()  # reports: the tracker learns the user is at the quota
        self.assertEqual(
            await self.usage(mesh),
            {f"{owner(viewer)} {one}": {**dict.fromkeys(billing.COUNTERS, 0), "from_origin": size}},
        )
        response = await mesh.http.get(mesh.stream_url(viewer, two))
        self.assertEqual(response.code, 402)
        reason = (await treq.content(response)).decode()
        self.assertIn("quota", reason)
        self.assertIn(str(size), reason)
        # The refused session is forgotten: the content can be opened again later.
        self.assertNotIn(two, viewer.sessions)

    def test_reservations_reach_the_agent(self) -> Deferred[None]:
        return ensureDeferred(self._reservations())

    async def _reservations(self) -> None:
        mesh = Mesh(self)
        await mesh.start_tracker()
        cid = (await mesh.new_content(64 * 1024))[2].content_id
        viewer = await mesh.agent("viewer", stream=True)
        self.assertEqual(viewer.reservations, [])
        user = TrackerClient(mesh.http, mesh.tracker_url, reactor, credentials=viewer.config.credentials)
        now = int(reactor.seconds())
        reservation = await user.reserve(cid, now + 60, now + 3600)
        await viewer.announce()
        self.assertEqual(viewer.reservations, [reservation])
        assert viewer.stream_port is not None
        status_url = f"http://127.0.0.1:{viewer.stream_port.getHost().port}/status"  # type: ignore[attr-defined]
        status: dict[str, Any] = json.loads(await treq.content(await mesh.http.get(status_url)))
        self.assertEqual(status["reservations"], [reservation])
        await user.cancel_reservation(reservation["id"])
        await viewer.announce()
        self.assertEqual(viewer.reservations, [])
