# -*- test-case-name: tests.test_logs -*-
"""
L{meshstream.logs}: JSON log lines, and twistd writing them for a running
tracker (a real C{twistd meshstream-tracker} process, see
L{tests._tracker_process}).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile

from twisted.logger import Logger, LogLevel, eventsFromJSONLogFile
from twisted.trial import unittest

from meshstream.logs import LEVEL_VARIABLE, json_observer, parse_level
from tests._tracker_process import TrackerProcess, exchange, request_bytes


class JSONObserverTests(unittest.SynchronousTestCase):
    def log_to(self, level: str | None = None) -> tuple[Logger, io.StringIO]:
        out = io.StringIO()
        return Logger(namespace="meshstream.test", observer=json_observer(out, level)), out

    def test_one_json_object_per_line(self) -> None:
        log, out = self.log_to()
        log.info(
            "Refused {method} {path}: {status} {code}", method="GET", path="/x", status=404, code="not_found"
        )
        log.warn("Second {n}", n=2)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        event = json.loads(lines[0])
        self.assertEqual(event["log_namespace"], "meshstream.test")
        self.assertEqual(event["log_level"]["name"], "info")
        self.assertEqual(event["log_format"], "Refused {method} {path}: {status} {code}")
        self.assertEqual((event["method"], event["status"], event["code"]), ("GET", 404, "not_found"))
        self.assertEqual(event["text"], "Refused GET /x: 404 not_found")
        self.assertIsInstance(event["log_time"], float)

    def test_twisted_reads_it_back(self) -> None:
        log, out = self.log_to()
        log.info("Hello {user}", user="alice")
        (event,) = eventsFromJSONLogFile(io.StringIO(out.getvalue()), recordSeparator="")
        self.assertEqual((event["user"], event["log_level"]), ("alice", LogLevel.info))

    def test_failure_has_its_traceback(self) -> None:
        log, out = self.log_to()
        try:
            raise RuntimeError("disk on fire")
        except RuntimeError:
            log.failure("Unhandled error in {route}", route="announce")
        event = json.loads(out.getvalue())
        self.assertEqual(event["log_level"]["name"], "critical")
        self.assertEqual(event["route"], "announce")
        self.assertIn("Traceback", event["text"])
        self.assertIn("RuntimeError: disk on fire", event["text"])

    def test_level(self) -> None:
        log, out = self.log_to("warn")
        log.info("dropped")
        log.error("kept")
        self.assertEqual([json.loads(line)["text"] for line in out.getvalue().splitlines()], ["kept"])
        log, out = self.log_to()  # info by default
        log.debug("dropped")
        self.assertEqual(out.getvalue(), "")

    def test_level_from_environment(self) -> None:
        self.patch(os, "environ", {**os.environ, LEVEL_VARIABLE: "DEBUG"})
        log, out = self.log_to()
        log.debug("kept")
        self.assertEqual(json.loads(out.getvalue())["text"], "kept")

    def test_bad_level(self) -> None:
        self.assertEqual(parse_level(" Error "), LogLevel.error)
        with self.assertRaises(ValueError) as e:
            parse_level("loud")
        self.assertIn(LEVEL_VARIABLE, str(e.exception))


class TwistdJSONLogsTests(unittest.SynchronousTestCase):
    """C{twistd --logger meshstream.logs.json_observer meshstream-tracker} logs requests as JSON."""

    def test_request_events(self) -> None:
        workdir = tempfile.mkdtemp(prefix="meshstream-logs-")
        self.addCleanup(shutil.rmtree, workdir, True)
        tracker = TrackerProcess(f"sqlite:{workdir}/tracker.sqlite", workdir, level="info")
        tracker.start()
        self.addCleanup(tracker.stop)
        start = len(tracker.events)
        body = json.dumps({"user": "mallory", "password": "guess"}).encode()
        answer = exchange(tracker.port, request_bytes(b"POST", b"/api/v1/login", body))
        assert answer is not None
        self.assertEqual(answer.status, 401)
        attempt = tracker.wait_for(lambda e: e.get("code") == "bad_credentials" and "route" not in e, start)
        self.assertEqual(attempt["log_namespace"], "meshstream.tracker.api")
        self.assertEqual((attempt["user"], attempt["client"]), ("mallory", "127.0.0.1"))
        self.assertEqual(attempt["text"], "Failed login for mallory from 127.0.0.1")
        refused = tracker.wait_for(lambda e: e.get("route") == "login", start)
        self.assertEqual(refused["log_level"]["name"], "info")
        self.assertEqual(
            {k: refused[k] for k in ("method", "path", "status", "code", "user", "client")},
            {
                "method": "POST",
                "path": "/api/v1/login",
                "status": 401,
                "code": "bad_credentials",
                "user": None,
                "client": "127.0.0.1",
            },
        )
        self.assertGreater(refused["duration"], 0)
        # At info level, successful requests (debug) are not written.
        exchange(tracker.port, request_bytes(b"GET", b"/api/v1/key"))
        exchange(tracker.port, request_bytes(b"GET", b"/api/v1/nothing"))
        tracker.wait_for(lambda e: e.get("path") == "/api/v1/nothing", start)
        self.assertEqual([e for e in tracker.events if e.get("route") == "key"], [])

    def test_log_requests(self) -> None:
        """With C{--log-requests} at debug level, successful requests are written too."""
        workdir = tempfile.mkdtemp(prefix="meshstream-logs-")
        self.addCleanup(shutil.rmtree, workdir, True)
        tracker = TrackerProcess(
            f"sqlite:{workdir}/tracker.sqlite", workdir, level="debug", options=["--log-requests"]
        )
        tracker.start()
        self.addCleanup(tracker.stop)
        start = len(tracker.events)
        answer = exchange(tracker.port, request_bytes(b"GET", b"/api/v1/key"))
        assert answer is not None
        self.assertEqual(answer.status, 200)
        event = tracker.wait_for(lambda e: e.get("route") == "key", start)
        self.assertEqual((event["log_level"]["name"], event["status"], event["code"]), ("debug", 200, None))
        self.assertEqual(event["text"], "GET /api/v1/key: 200")
