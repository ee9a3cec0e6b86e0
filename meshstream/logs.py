# -*- test-case-name: tests.test_logs -*-
"""
JSON logs for the daemons, for C{twistd --logger}.

twistd calls a log observer factory named on its command line with no
arguments::

  MESHSTREAM_LOG_LEVEL=info twistd -n --logger meshstream.logs.json_observer \\
      meshstream-tracker --listen tcp:7070 ...

L{json_observer} writes one event per line to standard output (so that
systemd's journal, or any log shipper, takes it as is), in twisted.logger's
own JSON format (L{twisted.logger.eventAsJSON}: every field of the event,
C{log_namespace}, C{log_level}, C{log_time}, C{log_format} and the event's
own fields, a failure as C{log_failure}), plus C{text}, the event formatted
as twistd would print it (with the traceback, for a failure).  L{twisted.logger.eventsFromJSONLogFile} reads such
a file back (with C{recordSeparator=""}).

C{MESHSTREAM_LOG_LEVEL} (C{debug}, C{info}, C{warn}, C{error} or
C{critical}; default C{info}) drops the events below that level.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    eventAsText,
)

LEVEL_VARIABLE = "MESHSTREAM_LOG_LEVEL"
DEFAULT_LEVEL = "info"


def parse_level(name: str) -> LogLevel:
    """The L{LogLevel} called C{name} (case-insensitive); ValueError for others."""
    try:
        return LogLevel.levelWithName(name.strip().lower())
    except InvalidLogLevelError:
        names = ", ".join(level.name for level in LogLevel.iterconstants())
        raise ValueError(f"{LEVEL_VARIABLE}={name!r} is not a log level ({names})") from None


def event_as_json_line(event: LogEvent) -> str:
    """
    C{event} as one line of JSON: twisted.logger's serialisation, plus
    C{text} (the formatted message, with a failure's traceback).
    """
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    return eventAsJSON({**event, "text": text}) + "\n"


def json_observer(out: IO[Any] | None = None, level: str | None = None) -> ILogObserver:
    """
    An observer writing the events at C{level} or above to C{out} as JSON
    lines.

    @param out: default: standard output.
    @param level: default: C{$MESHSTREAM_LOG_LEVEL}, else C{info}.
    """
    if level is None:
        level = os.environ.get(LEVEL_VARIABLE, DEFAULT_LEVEL)
    minimum = parse_level(level)
    writer = FileLogObserver(out if out is not None else sys.stdout, event_as_json_line)
    return FilteringLogObserver(writer, [LogLevelFilterPredicate(minimum)])
