# -*- test-case-name: tests.test_agent_usage -*-
"""
The agent's usage meter: what it downloaded and uploaded, per content, since
its last report to the tracker (C{POST /api/v1/usage}; see docs/api.md).

The agent's parts keep I{running totals} (a download session its bytes by
source, the peer server its bytes served by content); L{UsageMeter.observe}
turns them into deltas.  A total is remembered per source object (weakly: a
session that goes away takes its entry along), so totals of different
sessions of one content never mix.

Reports and retries: L{UsageMeter.next_report} hands out one report at a
time and hands the I{same} report (same C{seq}, same numbers) out again until
it is L{acknowledged <UsageMeter.acknowledged>}: a report whose answer was
lost is sent again and the tracker, which counts each C{seq} of a node once,
does not count it twice.  Meanwhile new bytes wait in the next report.  A
report the tracker refuses for good (a 400) is L{dropped <UsageMeter.dropped>}.

C{seq}: the tracker wants it to grow from report to report of a node, across
agent restarts too.  The meter does not persist it: a new report takes
C{max(previous seq + 1, now in milliseconds)}, which grows across restarts as
long as the clock does not go back and reports are less frequent than one per
millisecond.  (A clock set back by an hour makes the tracker ignore that
node's reports for an hour.)
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

#: The counters of a report, as the tracker names them.
KINDS = ("from_peers", "from_servers", "from_origin", "uploaded")
#: Contents in one report (the tracker's limit).
MAX_ENTRIES = 10_000


@frozen
class Report:
    """One usage report: its C{seq} and, per content id, the counters (see L{KINDS})."""

    seq: int
    contents: dict[str, dict[str, int]]


class UsageMeter:
    """Running totals in, reports out (see the module docstring)."""

    def __init__(self, clock: IReactorTime, max_entries: int = MAX_ENTRIES) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._seen: WeakKeyDictionary[object, dict[tuple[str, str], int]] = WeakKeyDictionary()
        self._pending: dict[str, dict[str, int]] = {}
        self._unacknowledged: Report | None = None
        self.seq = 0

    def observe(self, source: object, content_id: str, kind: str, total: int) -> None:
        """
        C{source}'s running total of C{kind} bytes for C{content_id} is now
        C{total}; what it grew by since the last call is added to the next
        report.  A total lower than the last one (a counter that started
        over) adds nothing; what it grows by from there does.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown usage kind {kind!r}")
        seen = self._seen.setdefault(source, {})
        last = seen.get((content_id, kind), 0)
        seen[(content_id, kind)] = total
        if total > last:
            counts = self._pending.setdefault(content_id, dict.fromkeys(KINDS, 0))
            counts[kind] += total - last

    def pending(self) -> dict[str, dict[str, int]]:
        """What is not yet acknowledged: the report out, if any, plus what waits for the next one."""
        out: dict[str, dict[str, int]] = {}
        sources = [self._pending]
        if self._unacknowledged is not None:
            sources.append(self._unacknowledged.contents)
        for contents in sources:
            for cid, counts in contents.items():
                into = out.setdefault(cid, dict.fromkeys(KINDS, 0))
                for kind, n in counts.items():
                    into[kind] += n
        return out

    def next_report(self) -> Report | None:
        """The report to send now (the unacknowledged one first), or None if there is nothing to say."""
        if self._unacknowledged is not None:
            return self._unacknowledged
        if not self._pending:
            return None
        taken = list(self._pending)[: self._max_entries]
        contents = {cid: self._pending.pop(cid) for cid in taken}
        self.seq = max(self.seq + 1, int(self._clock.seconds() * 1000))
        self._unacknowledged = Report(self.seq, contents)
        return self._unacknowledged

    def acknowledged(self, report: Report) -> None:
        """The tracker answered C{report} (counted, or already counted before)."""
        if report is self._unacknowledged:
            self._unacknowledged = None

    def dropped(self, report: Report) -> None:
        """The tracker refused C{report} for good: its numbers are lost."""
        self.acknowledged(report)
