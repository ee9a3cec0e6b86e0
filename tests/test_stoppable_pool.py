"""
Tests for L{meshstream.sources.StoppablePool}, over real loopback HTTP: a
request still under way when the pool is closed must not leave its
connection cached (trial would also report the pool's timer as a dirty
reactor).
"""

from __future__ import annotations

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from meshstream.sources import StoppablePool


class _Held(Resource):
    """Answers only when told to."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.arrived: Deferred[Request] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def render_GET(self, request: Request) -> int:
        # Hear when the server's side of the connection closes.
        channel = request.channel
        lost = channel.connectionLost

        def connection_lost(reason: object) -> None:
            lost(reason)
            self.closed.callback(None)

        channel.connectionLost = connection_lost
        self.arrived.callback(request)
        return NOT_DONE_YET


class StoppablePoolTests(unittest.TestCase):
    timeout = 10

    async def test_late_connection_closed(self) -> None:
        """A connection that comes back after the pool was closed is closed."""
        pool = StoppablePool(reactor, persistent=True)
        resource = _Held()
        site = Site(resource)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/".encode()
        answer = Agent(reactor, pool=pool).request(b"GET", url)
        request = await resource.arrived
        await pool.closeCachedConnections()
        request.write(b"late")
        request.finish()
        self.assertEqual(await treq.content(await answer), b"late")
        await resource.closed  # the client closed it (else: a timeout here)
        self.assertEqual(len(pool._connections), 0)

    async def test_still_usable_before_close(self) -> None:
        """Before it is closed the pool keeps connections like any other."""
        pool = StoppablePool(reactor, persistent=True)
        resource = _Held()
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/".encode()
        answer = Agent(reactor, pool=pool).request(b"GET", url)
        request = await resource.arrived
        request.write(b"x")
        request.finish()
        self.assertEqual(await treq.content(await answer), b"x")
        # The connection went back into the pool: a cached connection, with
        # its timer, until the pool is closed.
        self.assertEqual(len(pool._connections), 1)
        await pool.closeCachedConnections()
        self.assertEqual(len(pool._connections), 0)
