# -*- test-case-name: tests.test_lookup -*-
"""
Node lookups for one content, and the peer ticket they bring.

The tracker answers a node lookup with the nodes and a short-lived ticket
(L{meshstream.tickets}) that lets this node fetch the content from them.  A
L{TicketedLookup} keeps the newest ticket: a download session's
C{find_nodes} is L{TicketedLookup.find_nodes}, and its C{connect} asks
L{TicketedLookup.ticket} for the ticket to put in HELLO, which makes a new
lookup first when the ticket held is past half its lifetime (so a ticket
presented is never close to its expiry), sharing one lookup between
connections that ask at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from meshstream.coalesce import Coalesced
from meshstream.tracker.client import NodeInfo, NodeList


class NodeSource(Protocol):
    """What L{TicketedLookup} needs of a L{meshstream.tracker.client.TrackerClient}."""

    def nodes_with_ticket(
        self, content_id: str, node: str, limit: int = 50, exclude: Iterable[str] = ()
    ) -> Deferred[NodeList]: ...


class TicketedLookup:
    """
    Looks up the nodes of C{content_id} for node C{node_id} and keeps the
    ticket of the latest answer.

    @param clock: this node's clock; a ticket's age is measured on it from
        when the answer arrived, so a skew between this clock and the
        tracker's shortens or lengthens the estimated lifetime, not more.
    """

    def __init__(
        self,
        tracker: NodeSource,
        content_id: str,
        node_id: str,
        clock: IReactorTime,
        limit: int = 50,
        find: Callable[[], Deferred[NodeList]] | None = None,
    ) -> None:
        """
        @param find: the lookup to run (by default the tracker's node list
            for C{node_id}; the agent passes one that may also ask for
            content servers, see L{meshstream.agent.holders}).
        """
        self._tracker = tracker
        self.content_id = content_id
        self.node_id = node_id
        self._clock = clock
        self.limit = limit
        self._find = find
        self._ticket: bytes | None = None
        self._got_at = 0.0
        self._expires = 0.0
        self._renew: Coalesced[bytes] = Coalesced(
            lambda: self.find_nodes().addCallback(lambda _: self._ticket or b"")
        )

    def find_nodes(self) -> Deferred[list[Any]]:
        """A lookup: fires with the nodes (this one left out), keeping the ticket."""
        if self._find is not None:
            d = self._find()
        else:
            d = self._tracker.nodes_with_ticket(
                self.content_id, self.node_id, limit=self.limit, exclude=[self.node_id]
            )
        return d.addCallback(self._got)

    def _got(self, answer: NodeList) -> list[NodeInfo]:
        if answer.ticket is not None and answer.expires is not None:
            self._ticket = answer.ticket
            self._got_at = self._clock.seconds()
            self._expires = answer.expires
        return answer.nodes

    def fresh(self) -> bool:
        """Whether the ticket held is younger than half its lifetime."""
        if self._ticket is None:
            return False
        return self._clock.seconds() < self._got_at + (self._expires - self._got_at) / 2

    def ticket(self) -> Deferred[bytes]:
        """
        A ticket to present: the one held if fresh, else the one a new
        lookup brings (whatever its age), or empty if the tracker gives
        none.  Fails if that lookup fails.
        """
        if self.fresh():
            assert self._ticket is not None
            return succeed(self._ticket)
        return self._renew()
