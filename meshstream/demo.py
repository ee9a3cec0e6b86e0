# -*- test-case-name: tests.test_demo -*-
"""
C{meshstream demo}: the whole system on loopback, as a user would run it.

Every daemon is a separate C{twistd} process started from the same plugins
a user runs (C{meshstream-tracker}, C{meshstream-agent}, and C{twistd web}
as the HTTP origin).  The demo publishes a file, starts seeding agents with
different upload limits, streams the file through a viewer agent's local
stream URL (stopping the fastest seed half-way, unless told not to), checks
the SHA-256 of what it streamed, prints who delivered what, and stops
everything it started.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

TWISTD = [
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
]
START_TIMEOUT = 30.0
STREAM_TIMEOUT = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemons:
    """The processes the demo started; all are stopped, whatever happens."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str]) -> None:
        log = open(os.path.join(self.workdir, f"{name}.log"), "wb")
        self.procs[name] = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        log.close()

    def stop(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None and not getattr(proc, "_stopped_on_purpose", False):
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}; see {name}.log:\n{self.tail(name)}"
                )

    def tail(self, name: str, lines: int = 20) -> str:
        try:
            with open(os.path.join(self.workdir, f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def _bar(done: int, total: int, rate: float, width: int = 32) -> str:
    frac = done / total if total else 1.0
    fill = int(frac * width)
    return (
        f"\r  [{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}%  "
        f"{done / 2**20:7.1f}/{total / 2**20:.1f} MiB  {rate / 2**20:6.2f} MiB/s"
    )


def run_demo(args: argparse.Namespace) -> int:
    from twisted.internet import task

    workdir = tempfile.mkdtemp(prefix="meshstream-demo-")
    daemons = Daemons(workdir)
    outcome: list[int] = []

    def main(reactor: Any) -> Any:
        from twisted.internet.defer import ensureDeferred

        return ensureDeferred(_demo(reactor, args, workdir, daemons, outcome))

    try:
        task.react(main)
    except SystemExit:
        pass
    finally:
        daemons.stop_all()
        if args.keep:
            print(f"  work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return outcome[0] if outcome else 1


async def _get_json(treq: Any, url: str) -> Any:
    response = await treq.get(url)
    if response.code != 200:
        raise RuntimeError(f"{url}: HTTP {response.code}")
    return json.loads(await treq.content(response))


async def _wait_for(
    reactor: Any, daemons: Daemons, what: str, probe: Any, timeout: float = START_TIMEOUT
) -> Any:
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    while True:
        daemons.check_alive()
        try:
            result = await probe()
            if result:
                return result
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.2, lambda: None)


def _add_account(db: str, name: str, role: str, password_file: str) -> None:
    """C{meshstream tracker user add} in a child process (blocking)."""
    subprocess.run(
        [sys.executable, "-m", "meshstream.cli", "tracker", "user", "add", name,
         "--role", role, "--db", db, "--password-file", password_file],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


async def _demo(
    reactor: Any, args: argparse.Namespace, workdir: str, daemons: Daemons, outcome: list[int]
) -> None:
    import treq
    from twisted.internet import threads

    from meshstream.manifest import build_manifest, public_key_text
    from meshstream.tracker.client import Credentials, TrackerClient

    try:
        rates = [r.strip() for r in args.rates.split(",") if r.strip()]
        if len(rates) < 3:
            raise RuntimeError("the demo wants at least three seeding agents (--rates)")
        # 1. The content and the origin that holds it.
        origin_dir = os.path.join(workdir, "origin")
        os.makedirs(origin_dir)
        if args.file:
            path = os.path.join(origin_dir, os.path.basename(args.file))
            shutil.copyfile(args.file, path)
        else:
            path = os.path.join(origin_dir, "demo.bin")
            with open(path, "wb") as f:
                left = args.size
                while left:
                    chunk = min(left, 4 * 2**20)
                    f.write(os.urandom(chunk))
                    left -= chunk
        size = os.path.getsize(path)
        with open(path, "rb") as src:
            want = hashlib.file_digest(src, "sha256").hexdigest()
        print(f"meshstream demo: {os.path.basename(path)}, {size / 2**20:.1f} MiB, sha256 {want[:16]}…")

        # The tracker's accounts, made with the admin command before it runs:
        # a publisher, and one user per box, all with one random password.
        db = f"sqlite:{os.path.join(workdir, 'tracker.sqlite')}"
        password_file = os.path.join(workdir, "password")
        password = secrets.token_urlsafe(16)
        with open(os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as secret:
            secret.write(password.encode("ascii") + b"\n")
        box_names = [f"seed-{i}" for i in range(1, len(rates) + 1)] + ["viewer"]
        for account, role in [("publisher", "server"), *((n, "user") for n in box_names)]:
            await threads.deferToThread(_add_account, db, account, role, password_file)

        origin_port, tracker_port = free_port(), free_port()
        origin_url = f"http://127.0.0.1:{origin_port}/{os.path.basename(path)}"
        daemons.start(
            "origin", ["web", "--path", origin_dir, "--listen", f"tcp:{origin_port}:interface=127.0.0.1"]
        )
        tracker_url = f"http://127.0.0.1:{tracker_port}"
        daemons.start(
            "tracker",
            [
                "meshstream-tracker",
                "--listen",
                f"tcp:{tracker_port}:interface=127.0.0.1",
                "--db",
                db,
                "--key",
                os.path.join(workdir, "tracker.key"),
                "--announce-interval",
                "2",
            ],
        )
        await _wait_for(
            reactor, daemons, "the tracker", lambda: _get_json(treq, tracker_url + "/api/v1/health")
        )
        await _wait_for(
            reactor, daemons, "the origin", lambda: treq.head(origin_url).addCallback(lambda r: r.code == 200)
        )
        print(f"  tracker  {tracker_url}   origin  {origin_url}")

        # 2. Publish: hash, register, keep the signed manifest beside the seed copies.
        tracker = TrackerClient(treq, tracker_url, reactor, credentials=Credentials("publisher", password))
        key = public_key_text(await tracker.public_key())
        manifest, _ = await threads.deferToThread(
            build_manifest, path, origins=[origin_url], meta={"mime_type": "application/octet-stream"}
        )
        manifest = await tracker.register_manifest(manifest)
        cid = manifest.content_id
        print(f"  published {cid}")

        # 3. Seeding agents, each with its own copy and upload limit.
        names = []
        for i, rate in enumerate(rates, 1):
            name = f"seed-{i}"
            names.append(name)
            home = os.path.join(workdir, name)
            os.makedirs(home)
            copy = os.path.join(home, os.path.basename(path))
            shutil.copyfile(path, copy)
            with open(copy + ".manifest.json", "wb") as f:
                f.write(manifest.to_json())
            port = free_port()
            daemons.start(
                name,
                [
                    "meshstream-agent",
                    "--tracker", tracker_url,
                    "--tracker-key", key,
                    "--node-id", name,
                    "--user", name,
                    "--password-file", password_file,
                    "--data-dir", os.path.join(home, "data"),
                    "--listen", f"tcp:{port}:interface=127.0.0.1",
                    "--advertise", f"127.0.0.1:{port}",
                    "--stream", "",
                    "--seed", copy,
                    "--upload-rate", rate,
                ],
            )  # fmt: skip

        async def seeds_listed() -> bool:
            return len(await tracker.nodes(cid)) >= len(names)

        await _wait_for(reactor, daemons, "the seeds to announce", seeds_listed)
        print(
            f"  {len(names)} seeding agents up: "
            + ", ".join(f"{n} at {r}iB/s" for n, r in zip(names, rates, strict=True))
        )

        # 4. The viewer: streams through its local stream server.
        stream_port, viewer_port = free_port(), free_port()
        daemons.start(
            "viewer",
            [
                "meshstream-agent",
                "--tracker", tracker_url,
                "--tracker-key", key,
                "--node-id", "viewer",
                "--user", "viewer",
                "--password-file", password_file,
                "--data-dir", os.path.join(workdir, "viewer"),
                "--listen", f"tcp:{viewer_port}:interface=127.0.0.1",
                "--advertise", f"127.0.0.1:{viewer_port}",
                "--stream", f"tcp:{stream_port}:interface=127.0.0.1",
            ],
        )  # fmt: skip
        base = f"http://127.0.0.1:{stream_port}"
        await _wait_for(reactor, daemons, "the viewer", lambda: _get_json(treq, base + "/status"))
        url = f"{base}/stream/{cid}"
        print(f"  streaming {url}")

        digest = hashlib.sha256()
        got = 0
        started = time.monotonic()
        killed: list[str] = []
        shown = [0.0]
        from meshstream.tap.agent import parse_rate

        fastest = max(zip(names, rates, strict=True), key=lambda nr: parse_rate(nr[1]))[0]

        def collect(data: bytes) -> None:
            nonlocal got
            digest.update(data)
            got += len(data)
            now = time.monotonic()
            if now - shown[0] >= 0.25 or got == size:
                shown[0] = now
                sys.stdout.write(_bar(got, size, got / max(now - started, 1e-6)))
                sys.stdout.flush()
            if args.kill_at and not killed and got >= args.kill_at * size:
                killed.append(fastest)
                daemons.procs[fastest]._stopped_on_purpose = True  # type: ignore[attr-defined]
                reactor.callInThread(daemons.stop, fastest)

        response = await treq.get(url, unbuffered=True)
        if response.code != 200:
            raise RuntimeError(f"stream answered HTTP {response.code}")
        await treq.collect(response, collect).addTimeout(STREAM_TIMEOUT, reactor)
        elapsed = time.monotonic() - started
        print()
        status = await _get_json(treq, base + "/status")
        session = status["sessions"].get(cid, {})
        by_source: dict[str, int] = session.get("bytes_by_source", {})
        ok = got == size and digest.hexdigest() == want

        print()
        print(f"  {'source':<10} {'upload limit':>12} {'bytes':>12} {'share':>7}  note")
        limit = dict(zip(names, rates, strict=True))
        for name in [*names, "origin"]:
            n = by_source.get(name, 0)
            note = f"stopped at {args.kill_at:.0%}" if name in killed else ""
            print(f"  {name:<10} {limit.get(name, '-'):>12} {n:>12} {n / max(size, 1):>7.1%}  {note}")
        print(f"  {'total':<10} {'':>12} {sum(by_source.values()):>12} {'':>7}")
        print()
        print(f"  streamed {got} bytes in {elapsed:.2f}s ({got / elapsed / 2**20:.2f} MiB/s)")
        print(f"  sha256 of the stream {digest.hexdigest()}")
        print(f"  sha256 of the file   {want}")
        print(f"  {'OK: the stream is byte-identical to the file' if ok else 'FAILED: the stream differs'}")
        outcome.append(0 if ok else 1)
    except Exception as e:
        print(f"\nmeshstream demo failed: {e}", file=sys.stderr)
        for name in daemons.procs:
            tail = daemons.tail(name, 8)
            if "Traceback" in tail or "rror" in tail:
                print(f"--- {name}.log ---\n{tail}", file=sys.stderr)
        outcome.append(1)
