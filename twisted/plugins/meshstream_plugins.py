"""twistd plugins for meshstream.

This file only names things: the real modules (Options + makeService) are
imported when the subcommand runs, so importing it never touches the reactor.
"""

from twisted.application.service import ServiceMaker

meshstreamTracker = ServiceMaker(
    "meshstream tracker",
    "meshstream.tap.tracker",
    "The meshstream connection control server (tracker).",
    "meshstream-tracker",
)

meshstreamAgent = ServiceMaker(
    "meshstream agent",
    "meshstream.tap.agent",
    "The meshstream agent: seeds, serves peers, downloads and streams.",
    "meshstream-agent",
)
