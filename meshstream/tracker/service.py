# -*- test-case-name: tests.test_tracker_api -*-
"""
The tracker as a service tree::

  TrackerService (MultiService)
   ├── TimerService: purge expired nodes every announce interval (and
   │   count what is left for the metrics)
   ├── StreamServerEndpointService per --listen string, serving the API
   │   (meshstream.tracker.http1's ApiFactory)
   └── StreamServerEndpointService per --metrics-listen string, serving
       GET /metrics

Starting it runs the store migrations (requests wait for them); stopping it
stops listening, drops open HTTP connections, waits for the purge in flight
and closes the database pool.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, fail, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Site
from zope.interface import implementer

from meshstream.tracker.api import DEFAULT_MANIFEST_LIMIT, DEFAULT_TICKET_TTL, TrackerAPI, format_address
from meshstream.tracker.http1 import ApiFactory
from meshstream.tracker.metrics import MetricsResource
from meshstream.tracker.store import TrackerStore, open_store
from meshstream.tracker.throttle import LoginLimits, LoginThrottle

log = Logger()

HTTP_IDLE_TIMEOUT = 60  # seconds before an idle HTTP connection is closed


class TrackerKeyError(Exception):
    """The tracker's signing key file cannot be used."""


def load_or_create_key(path: str) -> Ed25519PrivateKey:
    """
    Load the Ed25519 signing key (PKCS8 PEM, unencrypted) at C{path}.

    If there is no file, create one with mode 0600.  Blocking: call it at
    start-up, before the reactor runs.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        log.info("Created a new tracker key in {path}", path=path)
        return key
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise TrackerKeyError(f"cannot read the tracker key {path}: {e}") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise TrackerKeyError(f"{path} is not an Ed25519 private key")
    return loaded


@implementer(IStreamServerEndpoint)
class _RecordingEndpoint:
    """Wraps an endpoint to hand its listening port to whoever waits for it."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self._endpoint = endpoint
        self._waiters: list[Deferred[IListeningPort]] = []
        self._result: IListeningPort | Failure | None = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        d = self._endpoint.listen(protocolFactory)

        def record(result: IListeningPort | Failure) -> IListeningPort | Failure:
            self._result = result
            waiting, self._waiters = self._waiters, []
            for w in waiting:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)
            return result

        return d.addBoth(record)

    def port(self) -> Deferred[IListeningPort]:
        if isinstance(self._result, Failure):
            return fail(self._result)
        d: Deferred[IListeningPort] = Deferred()
        if self._result is None:
            self._waiters.append(d)
        else:
            d.callback(self._result)
        return d


class _QuietSite(Site):
    """
    A site without twisted.web's access log: the metrics listener's scrapes
    are not worth a line each.
    """

    def log(self, request: http.Request) -> None:
        pass


class _ConnectionTracker(WrappingFactory):
    """Keeps the open connections, so that stopping can drop them all."""

    def __init__(self, wrappedFactory: IProtocolFactory) -> None:
        super().__init__(wrappedFactory)
        self._lost: dict[ProtocolWrapper, list[Deferred[None]]] = {}

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        for d in self._lost.pop(p, []):
            d.callback(None)

    def abort_all(self) -> Deferred[Any]:
        """Abort every open connection; fire when all are closed."""
        waiting: list[Deferred[None]] = []
        for p in list(self.protocols):
            d: Deferred[None] = Deferred()
            self._lost.setdefault(p, []).append(d)
            waiting.append(d)
            if p.transport is not None:
                p.transport.abortConnection()
        return DeferredList(waiting, consumeErrors=True)


def make_api_factory(api: TrackerAPI, reactor: Any, max_body: int = DEFAULT_MANIFEST_LIMIT) -> ApiFactory:
    """
    The API's HTTP server: bodies up to C{max_body} (the largest any route
    takes: a manifest), an idle timeout by the reactor's clock, refusals
    counted and logged by the API.
    """
    handler = api.handler()
    return ApiFactory(
        handler, reactor, max_body=max_body, idle_timeout=HTTP_IDLE_TIMEOUT, refused=handler.refused_early
    )


class TrackerService(MultiService):
    """
    The tracker: HTTP listeners, the expiry timer and the store.

    @param reactor: for the listening endpoints.
    @param api: the request handlers (they hold the store and the clock).
    @param listen: endpoint description strings, e.g. C{tcp:7070}.
    @param clock: drives the expiry timer; defaults to C{reactor}.
    @param metrics_listen: endpoint description strings to serve C{GET
        /metrics} on (and nothing else), e.g. C{tcp:9107:interface=127.0.0.1}.
    """

    def __init__(
        self,
        reactor: Any,
        api: TrackerAPI,
        listen: Sequence[str],
        clock: IReactorTime | None = None,
        metrics_listen: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.api = api
        self.store: TrackerStore = api.store
        self._ready: Deferred[int | None] | None = None
        self.http = make_api_factory(api, reactor)
        self._endpoints: list[_RecordingEndpoint] = []
        for description in listen:
            endpoint = _RecordingEndpoint(serverFromString(reactor, description))
            self._endpoints.append(endpoint)
            StreamServerEndpointService(endpoint, self.http).setServiceParent(self)
        metrics_site = _QuietSite(MetricsResource(api.metrics), timeout=HTTP_IDLE_TIMEOUT, reactor=reactor)
        metrics_site.displayTracebacks = False
        self._metrics_connections = _ConnectionTracker(metrics_site)
        self._metrics_endpoints: list[_RecordingEndpoint] = []
        for description in metrics_listen:
            endpoint = _RecordingEndpoint(serverFromString(reactor, description))
            self._metrics_endpoints.append(endpoint)
            StreamServerEndpointService(endpoint, self._metrics_connections).setServiceParent(self)
        timer = TimerService(api.announce_interval, self._purge)
        timer.clock = clock if clock is not None else reactor
        timer.setServiceParent(self)

    def _purge(self) -> Deferred[None]:
        d = self.api.purge_expired()

        def failed(f: Failure) -> None:
            log.failure("Purging expired nodes failed", f)

        def count(_: None) -> Deferred[None]:
            return self.api.refresh_stats().addErrback(
                lambda f: log.failure("Counting nodes and contents for the metrics failed", f)
            )

        return d.addCallbacks(lambda _: None, failed).addCallback(count)

    def privilegedStartService(self) -> None:
        # Migrate first, so requests queue behind the schema.
        self._start_store()
        super().privilegedStartService()

    def startService(self) -> None:
        self._start_store()
        super().startService()

    def _start_store(self) -> None:
        if self._ready is not None:
            return

        def failed(f: Failure) -> None:
            # Logged here, and handled: later calls (ready(), requests) fail
            # with it on their own, and a Deferred left holding it would be
            # reported again as "Unhandled error in Deferred".
            log.failure("The tracker database could not be opened", f)

        self._ready = self.store.start().addErrback(failed)
        self._log_listening()

    def _log_listening(self) -> None:
        """Log each listening address once it listens (a port of 0 gets one at random)."""
        for listener, endpoints in (("api", self._endpoints), ("metrics", self._metrics_endpoints)):
            for endpoint in endpoints:

                def listening(port: IListeningPort, listener: str = listener) -> None:
                    address = port.getHost()
                    host, number = getattr(address, "host", None), getattr(address, "port", None)
                    shown = str(address) if host is None or number is None else format_address(host, number)
                    log.info(
                        "Serving {listener} requests on {address}",
                        listener=listener,
                        address=shown,
                        host=host,
                        port=number,
                    )

                # A failure to listen is StreamServerEndpointService's to report.
                endpoint.port().addCallbacks(listening, lambda f: None)

    def ready(self) -> Deferred[int]:
        """Fire with the schema version once the store is migrated."""
        return self.store.schema_version()

    def listening(self) -> Deferred[list[IListeningPort]]:
        """Fire with the listening ports, in C{listen} order."""
        return gatherResults([e.port() for e in self._endpoints], consumeErrors=True)

    def metrics_listening(self) -> Deferred[list[IListeningPort]]:
        """Fire with the metrics listeners' ports, in C{metrics_listen} order."""
        return gatherResults([e.port() for e in self._metrics_endpoints], consumeErrors=True)

    def stopService(self) -> Deferred[None]:
        d: Deferred[Any] = Deferred.fromCoroutine(self._stop())
        return d

    async def _stop(self) -> None:
        try:
            await super().stopService()
        finally:
            await self.http.abort_all()
            await self._metrics_connections.abort_all()
            self.store.close()


def build_tracker_service(
    reactor: Any,
    listen: Sequence[str],
    db_url: str,
    signing_key: Ed25519PrivateKey,
    announce_interval: float = 30.0,
    expire_after: int = 3,
    clock: IReactorTime | None = None,
    ticket_ttl: float = DEFAULT_TICKET_TTL,
    metrics_listen: Sequence[str] = (),
    login_limits: LoginLimits | None = None,
    log_requests: bool = False,
) -> TrackerService:
    """
    Put a tracker together from its settings.

    C{clock} (default: C{reactor}) is the tracker's only source of time: the
    API's C{last_seen} and expiry, and the purge timer.  Tests pass a
    L{twisted.internet.task.Clock} while C{reactor} does the networking.
    C{login_limits}: how failed logins are throttled (default: L{LoginLimits}'s).
    C{log_requests}: log an event for every successful request too (see
    L{meshstream.tracker.api.TrackerHandler}).
    """
    time = clock if clock is not None else reactor
    limits = login_limits if login_limits is not None else LoginLimits()
    store = open_store(db_url, reactor)
    api = TrackerAPI(
        store,
        signing_key,
        time,
        announce_interval=announce_interval,
        expire_after=expire_after,
        ticket_ttl=ticket_ttl,
        login_throttle=LoginThrottle(
            time, window=limits.window, per_user=limits.per_user, per_client=limits.per_client
        ),
        log_requests=log_requests,
    )
    return TrackerService(reactor, api, listen, clock=time, metrics_listen=metrics_listen)
