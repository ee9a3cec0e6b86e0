# -*- test-case-name: tests.test_tracker_api -*-
"""
C{twistd meshstream-tracker}: options and the service maker.

This is the only module of the tracker that reads the global reactor, and it
does so inside L{makeService}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from meshstream.tracker.store import StoreError, parse_db_url
from meshstream.tracker.throttle import DEFAULT_PER_CLIENT, DEFAULT_PER_USER, DEFAULT_WINDOW, LoginLimits

DEFAULT_LISTEN = "tcp:7070"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Run the meshstream tracker (HTTP/JSON API on twisted.web)."

    optFlags: list[list[Any]] = [
        [
            "log-requests",
            None,
            "Log every answered request, successful ones too (at debug level); "
            "refused and failed requests are always logged.",
        ],
    ]
    optParameters: list[list[Any]] = [
        [
            "db",
            None,
            "sqlite:meshstream-tracker.sqlite",
            "Database URL: sqlite:PATH or postgresql://USER:PASSWORD@HOST:PORT/DBNAME.",
        ],
        [
            "key",
            None,
            "meshstream-tracker.key",
            "Ed25519 signing key (PKCS8 PEM); created with mode 0600 if missing.",
        ],
        ["announce-interval", None, 30.0, "Seconds between a node's announces.", float],
        [
            "expire-after",
            None,
            3,
            "Missed announces after which a node is dropped.",
            int,
        ],
        ["ticket-ttl", None, 300.0, "Seconds a peer ticket stays valid.", float],
        [
            "login-window",
            None,
            DEFAULT_WINDOW,
            "Seconds over which failed logins are counted (see --login-failures-*).",
            float,
        ],
        [
            "login-failures-per-user",
            None,
            DEFAULT_PER_USER,
            "Failed logins for one user name in the window after which it is refused (429).",
            int,
        ],
        [
            "login-failures-per-client",
            None,
            DEFAULT_PER_CLIENT,
            "Failed logins from one client address in the window after which it is refused "
            "(behind a reverse proxy every client has the proxy's address: raise it).",
            int,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["metrics-listen"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to serve the API on (repeatable; default tcp:7070)."""
        self["listen"].append(description)

    def opt_metrics_listen(self, description: str) -> None:
        """
        Endpoint to serve Prometheus metrics (GET /metrics) on, e.g.
        tcp:9107:interface=127.0.0.1 (repeatable; default: none).
        """
        self["metrics-listen"].append(description)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if not self["announce-interval"] > 0:
            raise usage.UsageError("--announce-interval must be positive")
        if self["expire-after"] < 1:
            raise usage.UsageError("--expire-after must be at least 1")
        if not self["ticket-ttl"] > 0:
            raise usage.UsageError("--ticket-ttl must be positive")
        if not self["login-window"] > 0:
            raise usage.UsageError("--login-window must be positive")
        if self["login-failures-per-user"] < 1 or self["login-failures-per-client"] < 1:
            raise usage.UsageError("--login-failures-per-user and --login-failures-per-client are at least 1")
        try:
            parse_db_url(self["db"])
        except StoreError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from meshstream.tracker.service import build_tracker_service, load_or_create_key

    key = load_or_create_key(options["key"])
    service = build_tracker_service(
        reactor,
        options["listen"],
        options["db"],
        key,
        announce_interval=options["announce-interval"],
        expire_after=options["expire-after"],
        ticket_ttl=options["ticket-ttl"],
        metrics_listen=options["metrics-listen"],
        log_requests=bool(options["log-requests"]),
        login_limits=LoginLimits(
            options["login-window"],
            options["login-failures-per-user"],
            options["login-failures-per-client"],
        ),
    )

    def give_up(_failure: object) -> None:
        # The store logged why it cannot open; a tracker without its
        # database exits so that its supervisor can restart it.
        if reactor.running:
            reactor.stop()

    reactor.callWhenRunning(lambda: service.ready().addErrback(give_up))
    return service
