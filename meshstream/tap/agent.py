# -*- test-case-name: tests.test_tap -*-
"""
C{twistd meshstream-agent}: options and the service maker.

The only module of the agent that reads the global reactor, inside
L{makeService}.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from meshstream.scheduler.core import DEFAULT_WINDOW

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?(?:/s)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_rate(text: str) -> float:
    """C{"4M"} / C{"512K"} / C{"1048576"} -> bytes per second (K, M, G are binary units)."""
    m = _RATE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise usage.UsageError(f"not a rate: {text!r} (try 4M, 512K or a number of bytes/s)")
    return float(m.group(1)) * _UNITS[m.group(2).upper()]


class Options(usage.Options):
    synopsis = "--tracker URL --user NAME [--password-file FILE] --data-dir DIR [options]"
    longdesc = (
        "Run a meshstream agent: seed local files, serve its cache to peers, and "
        "stream any content at http://127.0.0.1:PORT/stream/<content_id>."
    )

    optParameters: list[list[Any]] = [
        ["tracker", None, None, "Tracker base URL, e.g. http://127.0.0.1:7070."],
        ["tracker-key", None, None, "The tracker's Ed25519 public key (base64) or a file holding it."],
        ["user", None, None, "The tracker account this box logs in as."],
        [
            "password-file",
            None,
            None,
            "File whose first line is the account's password (default: $MESHSTREAM_PASSWORD).",
        ],
        [
            "tracker-ca",
            None,
            None,
            "PEM file of the CAs to trust for an https:// tracker (default: the system's).",
        ],
        ["data-dir", None, "meshstream-agent", "Directory for the cache, box key and node id."],
        [
            "stream",
            None,
            "tcp:7080:interface=127.0.0.1",
            "Endpoint of the local stream server ('' for none).",
        ],
        ["node-id", None, None, "Node id (default: made once and kept in the data dir)."],
        ["advertise", None, None, "host:port peers should dial (default: the tracker sees our address)."],
        ["upload-rate", None, None, "Upload limit for all peers together, e.g. 4M (bytes/s)."],
        ["max-peers", None, 4, "Peers to download from at once.", int],
        ["max-uploads", None, 32, "Peers to serve at once.", int],
        ["window", None, DEFAULT_WINDOW, "Blocks in flight (1 = one block at a time).", int],
        [
            "use-servers",
            None,
            "beside",
            "How downloads use the tracker's content servers: beside (with the peers), "
            "instead (only servers, then the origin) or off (only peers).",
        ],
    ]
    optFlags: list[list[str | None]] = [
        ["server", None, "Announce this agent as a content server (the account needs the server role)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["seeds"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint for the peer server (repeatable; default tcp:7071)."""
        self["listen"].append(description)

    def opt_seed(self, path: str) -> None:
        """A local file to seed (repeatable); its manifest is PATH.manifest.json or fetched by id."""
        self["seeds"].append(path)

    def postOptions(self) -> None:
        if not self["tracker"]:
            raise usage.UsageError("--tracker is required")
        if not self["user"]:
            raise usage.UsageError("--user is required: the tracker authenticates every agent")
        from meshstream.tracker.client import load_credentials

        try:
            self["credentials"] = load_credentials(self["user"], self["password-file"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        _check_tracker_ca(self["tracker"], self["tracker-ca"])
        if not self["listen"]:
            self["listen"] = ["tcp:7071"]
        if self["upload-rate"] is not None:
            self["upload-rate"] = parse_rate(self["upload-rate"])
        for name in ("max-peers", "max-uploads", "window"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        from meshstream.agent.holders import USE_SERVERS

        if self["use-servers"] not in USE_SERVERS:
            raise usage.UsageError(f"--use-servers must be one of {', '.join(USE_SERVERS)}")


def _check_tracker_ca(tracker: str, ca_file: str | None) -> None:
    from meshstream.tls import TLSConfigError, check_tracker_ca

    try:
        check_tracker_ca(tracker, ca_file)
    except TLSConfigError as e:
        raise usage.UsageError(str(e)) from None


def config_from_options(options: Options) -> Any:
    from meshstream.agent.service import AgentConfig

    return AgentConfig(
        tracker=options["tracker"],
        data_dir=options["data-dir"],
        listen=list(options["listen"]),
        stream=options["stream"] or None,
        seeds=list(options["seeds"]),
        node_id=options["node-id"],
        advertise=options["advertise"],
        upload_rate=options["upload-rate"],
        max_peers=options["max-peers"],
        max_uploads=options["max-uploads"],
        tracker_key=options["tracker-key"],
        credentials=options["credentials"],
        tracker_ca=options["tracker-ca"],
        window=options["window"],
        server=bool(options["server"]),
        use_servers=options["use-servers"],
    )


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from meshstream.agent.service import AgentService

    service = AgentService(config_from_options(options), reactor)

    def give_up(_failure: object) -> None:
        # The failure is logged by the service; a daemon that cannot start
        # (tracker unreachable, bad seed, port taken) exits so that its
        # supervisor restarts it, rather than idling half-started.
        if reactor.running:
            reactor.stop()

    service.ready.addErrback(give_up)
    return service
