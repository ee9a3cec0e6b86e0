"""
A tracker in a child process, for tests driven from synchronous code.

L{TrackerProcess} runs C{twistd -n --logger meshstream.logs.json_observer
meshstream-tracker} on a loopback port chosen by the kernel, reads its JSON
log lines on a thread (so the pipe never fills) and learns its ports from its
own C{Serving ... requests on ...} events.  L{exchange} sends raw bytes and
parses the answer with L{http.client}, so that tests can send what no HTTP
client library would (lying C{Content-Length}, odd methods, broken chunks).
L{Database} counts rows and adds users behind the tracker's back.

Everything blocks, with timeouts; nothing sleeps.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

from attrs import frozen

from meshstream.tracker import auth
from tests._accounts import PASSWORD, hashed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The tables a refused request must not change.
DATA_TABLES = ("manifests", "nodes", "holdings", "users", "tokens", "usage", "usage_reports", "reservations")
TIMEOUT = 30.0

Event = dict[str, Any]


class TrackerExited(Exception):
    """The tracker process ended (or never said what it listens on)."""


class TrackerProcess:
    """C{twistd meshstream-tracker} in a child process, with its log events."""

    def __init__(self, db_url: str, workdir: str, level: str = "debug", options: Sequence[str] = ()) -> None:
        self.db_url = db_url
        self.options = list(options)
        self.workdir = workdir
        self.level = level
        self.events: list[Event] = []
        self.port = 0
        self.metrics_port = 0
        self._cond = threading.Condition()
        self._eof = False
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": REPO, "MESHSTREAM_LOG_LEVEL": self.level}
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "--logger=meshstream.logs.json_observer",
            "meshstream-tracker",
            "--listen=tcp:0:interface=127.0.0.1",
            "--metrics-listen=tcp:0:interface=127.0.0.1",
            f"--db={self.db_url}",
            f"--key={os.path.join(self.workdir, 'tracker.key')}",
            *self.options,
        ]
        with open(os.path.join(self.workdir, "stderr"), "wb") as stderr:
            self._process = subprocess.Popen(
                argv, cwd=self.workdir, env=env, stdout=subprocess.PIPE, stderr=stderr
            )
        atexit.register(self.stop)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = self._listening("api")
        self.metrics_port = self._listening("metrics")

    def _listening(self, listener: str) -> int:
        event = self.wait_for(lambda e: e.get("listener") == listener and "port" in e)
        return int(event["port"])

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"text": line.decode("utf-8", "replace"), "unparsed": True}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Event], bool], start: int = 0) -> Event:
        """The first event from index C{start} on that C{predicate} accepts; wait for it if need be."""
        found: list[Event] = []

        def ready() -> bool:
            for event in self.events[start:]:
                if predicate(event):
                    found.append(event)
                    return True
            return self._eof

        with self._cond:
            if not self._cond.wait_for(ready, TIMEOUT) or not found:
                raise TrackerExited(self._why())
        return found[0]

    def _why(self) -> str:
        try:
            with open(os.path.join(self.workdir, "stderr"), "rb") as f:
                stderr = f.read().decode("utf-8", "replace")
        except OSError:
            stderr = ""
        tail = "\n".join(str(e.get("text", e)) for e in self.events[-20:])
        return f"no such event from the tracker (exited: {self._eof})\n{tail}\n{stderr}"

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._reader is not None:
            self._reader.join(TIMEOUT)


@frozen
class Answer:
    """An HTTP answer as L{http.client} parsed it."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(port: int, data: bytes, method: str = "GET", half_close: bool = False) -> Answer | None:
    """
    Send C{data} on a fresh connection and read one answer; None if the
    tracker closed the connection without one.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # it may answer (413) and close before reading everything
        response = http.client.HTTPResponse(sock, method=method)
        try:
            response.begin()
            body = response.read()
        except (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionError):
            return None
        return Answer(response.status, response.msg, body)


def read_all(port: int, data: bytes) -> bytes:
    """Send C{data}, then read until the tracker closes the connection."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def chunked(body: bytes, cuts: Sequence[int]) -> bytes:
    """C{body} in the chunked transfer coding, cut at C{cuts}."""
    out = []
    edges = [0, *sorted({c for c in cuts if 0 < c < len(body)}), len(body)]
    for a, b in pairwise(edges):
        if b > a:
            out.append(b"%x\r\n%s\r\n" % (b - a, body[a:b]))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def request_bytes(
    method: bytes,
    target: bytes,
    body: bytes | None = None,
    token: bytes | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
    cuts: Sequence[int] | None = None,
) -> bytes:
    """
    One HTTP/1.1 request; the body with a C{Content-Length}, or chunked at
    C{cuts} if given.
    """
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    if token is not None:
        lines.append(b"Authorization: Bearer " + token)
    lines += [name + b": " + value for name, value in headers]
    payload = b""
    if body is not None:
        if cuts is None:
            lines.append(b"Content-Length: %d" % len(body))
            payload = body
        else:
            lines.append(b"Transfer-Encoding: chunked")
            payload = chunked(body, cuts)
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


class Database:
    """The tracker's database, seen from the test (SQLite file or PostgreSQL URL)."""

    def __init__(self, db_url: str) -> None:
        self._conn: Any
        if db_url.startswith("sqlite:"):
            self._conn = sqlite3.connect(db_url[len("sqlite:") :], isolation_level=None, timeout=TIMEOUT)
            self._mark = "?"
        else:
            import psycopg

            self._conn = psycopg.connect(db_url, autocommit=True, connect_timeout=10)
            self._mark = "%s"

    def execute(self, statement: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        cursor = self._conn.execute(statement.replace("?", self._mark), tuple(params))
        return list(cursor.fetchall()) if cursor.description else []

    def counts(self) -> dict[str, int]:
        """Rows per data table."""
        return {t: int(self.execute(f"SELECT COUNT(*) FROM {t}")[0][0]) for t in DATA_TABLES}

    def add_user(self, name: str, role: str, password: str = PASSWORD) -> None:
        """A user with a cheap password hash (see L{tests._accounts})."""
        assert role in auth.ROLES
        self.execute(
            "INSERT INTO users (name, password, role, disabled, quota_bytes, created) VALUES (?, ?, ?, 0, NULL, 0)",
            (name, hashed(password), role),
        )

    def close(self) -> None:
        self._conn.close()
