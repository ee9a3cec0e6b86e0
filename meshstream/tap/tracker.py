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

DEFAULT_LISTEN = "tcp:7070"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Run the meshstream tracker (HTTP/JSON API on twisted.web)."

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
        [
            "access-log",
            None,
            "-",
            "HTTP access log: - (in the tracker's log), none, or a file to append to.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to serve the API on (repeatable; default tcp:7070)."""
        self["listen"].append(description)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if not self["announce-interval"] > 0:
            raise usage.UsageError("--announce-interval must be positive")
        if self["expire-after"] < 1:
            raise usage.UsageError("--expire-after must be at least 1")
        if self["access-log"] == "none":
            self["access-log"] = ""
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
        access_log=options["access-log"],
    )

    def give_up(_failure: object) -> None:
        # The store logged why it cannot open; a tracker without its
        # database exits so that its supervisor can restart it.
        if reactor.running:
            reactor.stop()

    reactor.callWhenRunning(lambda: service.ready().addErrback(give_up))
    return service
