# -*- test-case-name: tests.test_agent_holders -*-
"""
Where a download finds its sources: the peers the tracker lists, its content
servers (claims 37, 38), or both.

A content server is an agent announced with C{kind: server}; it speaks the
same peer protocol, so to a download session it is one more node.  The
agent's C{--use-servers} picks how the two lists are used:

  - C{beside} (the default): both lookups run at once and the lists are
    interleaved, a peer first (peer, server, peer, server, ...), so that a
    session with four connections uses about two of each when both exist;
    each list keeps the tracker's order.  When one lookup fails the other's
    list is used (and the failure logged); only when both fail does the
    lookup fail.
  - C{instead}: only the content servers (the session still falls back to
    the origin when none is left).
  - C{off}: only the peers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshstream.tracker.client import NodeList

log = Logger()

BESIDE = "beside"
INSTEAD = "instead"
OFF = "off"
USE_SERVERS = (BESIDE, INSTEAD, OFF)

#: How many nodes each lookup asks for.
LOOKUP_LIMIT = 50


class Holder(Protocol):
    """A listed node: what L{interleave} needs to see."""

    @property
    def node_id(self) -> str: ...


class HolderLookups(Protocol):
    """The two lookups of a L{meshstream.tracker.client.TrackerClient}."""

    def nodes_with_ticket(
        self, content_id: str, node: str, limit: int = ..., exclude: Iterable[str] = ...
    ) -> Deferred[NodeList]: ...

    def servers_with_ticket(
        self, content_id: str, node: str, limit: int = ..., exclude: Iterable[str] = ...
    ) -> Deferred[NodeList]: ...


def interleave(peers: Sequence[Any], servers: Sequence[Any]) -> list[Any]:
    """
    C{peers[0], servers[0], peers[1], servers[1], ...}, then the rest of the
    longer list; a node id listed twice is kept at its first place.
    """
    merged: list[Any] = []
    seen: set[str] = set()
    for i in range(max(len(peers), len(servers))):
        for listed in (peers, servers):
            if i < len(listed) and listed[i].node_id not in seen:
                seen.add(listed[i].node_id)
                merged.append(listed[i])
    return merged


def holder_finder(
    tracker: HolderLookups,
    content_id: str,
    use_servers: str,
    node: str,
    exclude: Sequence[str] = (),
    limit: int = LOOKUP_LIMIT,
) -> Callable[[], Deferred[NodeList]]:
    """
    The lookup of a download session for C{use_servers} (one of
    L{USE_SERVERS}), for node C{node}: each call asks the tracker again and
    fires with the nodes and a peer ticket for them (see
    L{meshstream.agent.lookup.TicketedLookup}).  The ticket of either lookup
    will do: both are for this node and content.
    """
    if use_servers not in USE_SERVERS:
        raise ValueError(f"use_servers must be one of {', '.join(USE_SERVERS)}")

    def peers() -> Deferred[NodeList]:
        return tracker.nodes_with_ticket(content_id, node, limit=limit, exclude=exclude)

    def servers() -> Deferred[NodeList]:
        return tracker.servers_with_ticket(content_id, node, limit=limit, exclude=exclude)

    if use_servers == OFF:
        return peers
    if use_servers == INSTEAD:
        return servers

    def both() -> Deferred[NodeList]:
        lookups: Deferred[Any] = DeferredList([peers(), servers()], consumeErrors=True)
        return lookups.addCallback(_combine, content_id)

    return both


def _combine(results: list[tuple[bool, Any]], content_id: str) -> NodeList:
    (peers_ok, peers), (servers_ok, servers) = results
    if not peers_ok and not servers_ok:
        assert isinstance(peers, Failure)
        peers.raiseException()
    for ok, result, what in ((peers_ok, peers, "peer"), (servers_ok, servers, "server")):
        if not ok:
            log.warn(
                "The {what} lookup for {cid} failed: {error}",
                what=what,
                cid=content_id[:12],
                error=result.getErrorMessage(),
            )
    answers: list[NodeList] = [r for ok, r in results if ok]
    with_ticket = [a for a in answers if a.ticket is not None]
    merged = interleave(peers.nodes if peers_ok else [], servers.nodes if servers_ok else [])
    if not with_ticket:
        return NodeList(merged)
    return NodeList(merged, with_ticket[0].ticket, with_ticket[0].expires)
