"""
Multi-source download benchmark: C{python bench/multisource.py}.

Starts real throttled sources on 127.0.0.1 (seeding peers with an upload
limit, twisted.web HTTP mirrors with a throttle, an HTTP origin), downloads
with C{meshstream fetch --progress json} in a subprocess, checks the SHA-256
of what it wrote, and prints one table row per scenario and mode:

    scenario, mode, seconds, MiB/s, ratio to the ideal, duplicated %, last 1 %

followed by a last line holding one JSON object with every figure.  See
bench/README.md for what the columns mean and the caveats.

The throttled sources run in this process (one reactor, cheap: pread + send
at tens of MiB/s); the fetch runs in its own process.  The raw-speed scenario
uses nginx (or, without nginx, twisted.web in separate processes) and compares
with aria2c when it is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _sources import HTTPSource, MiB, PeerSource, Source

from meshstream.manifest import Manifest, build_manifest

DEFAULT_SIZE = 64 * MiB
DEFAULT_RAW_SIZE = 1024 * MiB
QUICK_SIZE = 16 * MiB
QUICK_RAW_SIZE = 256 * MiB
HETERO = (1.0, 2.0, 4.0, 8.0)
EQUAL = (4.0, 4.0, 4.0, 4.0)
EIGHT = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.5, 8.0)
BAD_SOURCE_RATE = 4.0  # MiB/s of the extra lying source (the staller sends nothing)
ORIGIN_RATE = 8.0  # MiB/s of the HTTP origin
ORIGIN_KILL_AT = 0.5  # every peer dies here in the origin scenario
GOALS = {"ratio": 1.05, "ratio_stall": 1.10, "dup_pct": 2.0, "last_pct": 2.0}
FETCH_TIMEOUT_MIN = 60.0


# -- scenario description -------------------------------------------------


@dataclass
class SourceSpec:
    rate: float | None  # MiB/s, None = unthrottled
    kind: str = "peer"  # "peer" or "http"
    behaviour: str = "normal"  # "normal", "stall", "lie"
    kill_at: float | None = None  # in-order fraction at which the harness kills it

    @property
    def honest(self) -> bool:
        return self.behaviour == "normal"


@dataclass
class Scenario:
    name: str
    mode: str
    sources: list[SourceSpec]
    size: int
    fetch_args: list[str] = field(default_factory=list)
    origin_rate: float | None = None  # MiB/s; None = no origin in the manifest
    goals: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.mode}"


def ideal_seconds(sc: Scenario, kills: dict[int, float]) -> float | None:
    """
    size ÷ Σ rates of the honest sources alive, piecewise over the kill
    fractions (C{kills}: source index -> fraction at which it was actually
    killed; planned fraction when the kill never happened).  The origin counts
    only when no honest source is alive.
    """
    if any(s.rate is None for s in sc.sources if s.honest):
        return None
    points = sorted({0.0, 1.0, *(min(max(f, 0.0), 1.0) for f in kills.values())})
    total = 0.0
    for lo, hi in itertools.pairwise(points):
        if hi <= lo:
            continue
        alive = sum(
            s.rate or 0.0 for i, s in enumerate(sc.sources) if s.honest and (i not in kills or kills[i] >= hi)
        )
        if alive <= 0:
            alive = sc.origin_rate or 0.0
        if alive <= 0:
            return None
        total += (hi - lo) * sc.size / (alive * MiB)
    return total


def specs(rates: Sequence[float], http: int = 0, kills: Sequence[tuple[str, float]] = ()) -> list[SourceSpec]:
    """Sources for C{rates}; the first C{http} of them are HTTP mirrors."""
    out = [SourceSpec(r, "http" if i < http else "peer") for i, r in enumerate(rates)]
    for who, frac in kills:
        for i in _resolve(who, rates):
            out[i].kill_at = frac
    return out


def _resolve(who: str, rates: Sequence[float]) -> list[int]:
    if who == "fastest":
        return [max(range(len(rates)), key=lambda i: rates[i])]
    if who == "slowest":
        return [min(range(len(rates)), key=lambda i: rates[i])]
    if who == "all":
        return list(range(len(rates)))
    i = int(who)
    if not 0 <= i < len(rates):
        raise ValueError(f"no source {i} (there are {len(rates)})")
    return [i]


def default_scenarios(size: int) -> list[Scenario]:
    g = GOALS
    normal = {"ratio": g["ratio"], "dup_pct": g["dup_pct"], "last_pct": g["last_pct"]}
    het = specs(HETERO)
    return [
        Scenario("heterogeneous", "windowed", het, size, goals=normal),
        Scenario("heterogeneous", "static", specs(HETERO), size, ["--policy", "static"]),
        Scenario("heterogeneous", "faithful W=1", specs(HETERO), size, ["--window", "1"]),
        Scenario("equal 4x4", "windowed", specs(EQUAL), size, goals={"dup_pct": g["dup_pct"]}),
        Scenario("8 sources", "windowed", specs(EIGHT), size, goals={"dup_pct": g["dup_pct"]}),
        Scenario(
            "fastest dies@25%", "windowed", specs(HETERO, kills=[("fastest", 0.25)]), size, goals=normal
        ),
        Scenario(
            "one stalls",
            "windowed",
            [*specs(HETERO), SourceSpec(BAD_SOURCE_RATE, behaviour="stall")],
            size,
            goals={"ratio": g["ratio_stall"], "dup_pct": g["dup_pct"]},
        ),
        Scenario(
            "one lies",
            "windowed",
            [*specs(HETERO), SourceSpec(BAD_SOURCE_RATE, behaviour="lie")],
            size,
            goals={"dup_pct": g["dup_pct"]},
        ),
        Scenario(
            "all peers die",
            "windowed",
            specs(HETERO, kills=[("all", ORIGIN_KILL_AT)]),
            size,
            origin_rate=ORIGIN_RATE,
        ),
    ]


# -- results --------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    mode: str
    size: int
    ok: bool = False
    seconds: float | None = None  # as the fetch measured itself (done line)
    wall_seconds: float | None = None  # spawn to exit, as seen from here
    ideal_seconds: float | None = None
    duplicated_bytes: int | None = None
    rejected_bytes: int | None = None
    last_pct: float | None = None
    sha256_ok: bool | None = None
    exit_code: int | None = None
    error: str | None = None
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    kills: dict[str, float] = field(default_factory=dict)
    goals: dict[str, float] = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mib_s(self) -> float | None:
        t = self.seconds
        return self.size / MiB / t if t else None

    @property
    def ratio(self) -> float | None:
        if self.seconds is None or not self.ideal_seconds:
            return None
        return self.seconds / self.ideal_seconds

    @property
    def dup_pct(self) -> float | None:
        if self.duplicated_bytes is None or not self.size:
            return None
        return 100.0 * self.duplicated_bytes / self.size

    def check_goals(self) -> None:
        self.missed = []
        if not self.ok:
            self.missed.append("failed")
            return
        checks = {"ratio": self.ratio, "dup_pct": self.dup_pct, "last_pct": self.last_pct}
        for name, limit in self.goals.items():
            value = checks.get(name)
            if value is not None and value > limit:
                self.missed.append(f"{name}>{limit:g}")

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None, n: int = 3) -> float | None:
            return None if x is None else round(x, n)

        return {
            "scenario": self.scenario,
            "mode": self.mode,
            "ok": self.ok,
            "size": self.size,
            "seconds": r(self.seconds),
            "wall_seconds": r(self.wall_seconds),
            "mib_s": r(self.mib_s, 2),
            "ideal_seconds": r(self.ideal_seconds),
            "ratio_to_ideal": r(self.ratio),
            "duplicated_bytes": self.duplicated_bytes,
            "duplicated_pct": r(self.dup_pct),
            "rejected_bytes": self.rejected_bytes,
            "last_pct_ratio": r(self.last_pct, 2),
            "sha256_ok": self.sha256_ok,
            "exit_code": self.exit_code,
            "error": self.error,
            "sources": self.sources,
            "bytes_by_source": self.bytes_by_source,
            "kills": {k: round(v, 4) for k, v in self.kills.items()},
            "goals": self.goals,
            "missed_goals": self.missed,
            **self.extra,
        }


def last_pct_ratio(progress: list[tuple[float, int]], size: int) -> float | None:
    """
    Time of the last 1 % ÷ average time per 1 %.  Blocks are delivered
    whole, so "the last 1 %" is measured from the last progress line at or
    below 99 % of the size; its duration is scaled to 1 % of the bytes.
    """
    if not progress or progress[-1][1] < size or size <= 0:
        return None
    t_end = progress[-1][0]
    if t_end <= 0:
        return None
    start_t, start_b = 0.0, 0
    for t, b in progress:
        if b <= 0.99 * size:
            start_t, start_b = t, b
        else:
            break
    tail_pct = 100.0 * (size - start_b) / size
    if tail_pct <= 0:
        return None
    return ((t_end - start_t) / tail_pct) / (t_end / 100.0)


# -- running the fetch -----------------------------------------------------


class FetchProcess(ProcessProtocol):
    """Reads C{--progress json} lines; calls C{on_progress(bytes, size)} for each."""

    def __init__(self, on_progress: Callable[[int, int], None]) -> None:
        self.on_progress = on_progress
        self.progress: list[tuple[float, int]] = []
        self.done: dict[str, Any] | None = None
        self.stderr = bytearray()
        self.junk: list[str] = []
        self._buf = b""
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            obj = json.loads(line)
        except ValueError:
            if len(self.junk) < 20:
                self.junk.append(line.decode(errors="replace")[:200])
            return
        if not isinstance(obj, dict):
            return
        if obj.get("done"):
            self.done = obj
        elif "bytes" in obj:
            self.progress.append((float(obj.get("t", 0.0)), int(obj["bytes"])))
            self.on_progress(int(obj["bytes"]), int(obj.get("size", 0)))

    def errReceived(self, data: bytes) -> None:
        if len(self.stderr) < 256 * 1024:
            self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        if self._buf:
            self._line(self._buf)
            self._buf = b""
        if reason.check(ProcessDone):
            code = 0
        elif isinstance(reason.value, ProcessTerminated):
            v = reason.value
            code = v.exitCode if v.exitCode is not None else -(v.signal or 1)
        else:
            code = -1
        self.ended.callback(code)


def fetch_command(args: argparse.Namespace) -> list[str]:
    if args.fetch_cmd:
        return args.fetch_cmd.split()
    script = os.path.join(os.path.dirname(sys.executable), "meshstream")
    if os.path.exists(script):
        return [script, "fetch"]
    return [sys.executable, "-m", "meshstream.cli", "fetch"]


async def run_fetch(
    reactor: Any,
    cmd: list[str],
    timeout: float,
    on_progress: Callable[[int, int], None],
) -> tuple[FetchProcess, int, float]:
    proto = FetchProcess(on_progress)
    start = time.monotonic()
    proc = reactor.spawnProcess(proto, cmd[0], cmd, env=dict(os.environ))

    def too_long() -> None:
        try:
            proc.signalProcess("KILL")
        except Exception:
            pass

    guard = reactor.callLater(timeout, too_long)
    code = await proto.ended
    wall = time.monotonic() - start
    if guard.active():
        guard.cancel()
    elif code != 0:
        proto.stderr += f"\n[bench] killed after {timeout:.0f}s\n".encode()
    return proto, code, wall


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


# -- content ---------------------------------------------------------------


@dataclass
class Content:
    path: str
    manifest: Manifest
    leaves: list[list[bytes]]
    sha256: str


def make_content(directory: str, name: str, size: int, seed: int) -> Content:
    path = os.path.join(directory, name)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 64 * MiB)
            f.write(rng.randbytes(n))
            left -= n
    manifest, leaves = build_manifest(path, name=name)
    return Content(path, manifest, leaves, sha256_file(path))


# -- one throttled scenario -------------------------------------------------


async def run_scenario(
    reactor: Any, args: argparse.Namespace, sc: Scenario, content: Content, workdir: str
) -> Result:
    res = Result(sc.name, sc.mode, sc.size, goals=dict(sc.goals))
    sdir = tempfile.mkdtemp(prefix="sc-", dir=workdir)
    sources: list[Source] = []
    origin: HTTPSource | None = None
    kills: dict[int, float] = {}
    try:
        for i, spec in enumerate(sc.sources):
            rate = spec.rate * MiB if spec.rate is not None else None
            if spec.kind == "http":
                sources.append(HTTPSource(reactor, f"s{i}", content.path, rate))
            else:
                sources.append(
                    PeerSource(
                        reactor,
                        f"s{i}",
                        os.path.join(sdir, f"s{i}"),
                        content.path,
                        content.manifest,
                        content.leaves,
                        rate,
                        spec.behaviour,
                    )
                )
        manifest = content.manifest
        if sc.origin_rate is not None:
            origin = HTTPSource(reactor, "origin", content.path, sc.origin_rate * MiB)
            manifest = manifest.with_origins([origin.url])
        res.sources = [s.describe() + f" {s.url}" for s in sources]
        if origin is not None:
            res.sources.append(origin.describe() + f" {origin.url} (origin)")
        man_path = os.path.join(sdir, "manifest.json")
        with open(man_path, "wb") as f:
            f.write(manifest.to_json())
        out = os.path.join(sdir, "out.bin")
        cmd = [*fetch_command(args), "--manifest", man_path, "-o", out, "--progress", "json"]
        for s in sources:
            cmd += ["--source", s.url]
        cmd += sc.fetch_args + args.fetch_extra

        def on_progress(done: int, size: int) -> None:
            frac = done / sc.size if sc.size else 1.0
            for i, spec in enumerate(sc.sources):
                if spec.kill_at is not None and i not in kills and frac >= spec.kill_at:
                    kills[i] = frac
                    sources[i].killed_at = frac
                    sources[i].kill()

        planned = ideal_seconds(sc, {i: s.kill_at for i, s in enumerate(sc.sources) if s.kill_at is not None})
        timeout = max(FETCH_TIMEOUT_MIN, 10 * (planned or 0.0))
        if args.verbose:
            print(f"  $ {' '.join(cmd)}", file=sys.stderr)
        proto, code, wall = await run_fetch(reactor, cmd, timeout, on_progress)
        fill_result(res, proto, code, wall, out, content.sha256)
        for i, spec in enumerate(sc.sources):
            if spec.kill_at is not None and i not in kills:
                kills[i] = spec.kill_at  # never reached; the ideal keeps the plan
        res.kills = {sources[i].name: f for i, f in kills.items()}
        res.ideal_seconds = ideal_seconds(sc, kills)
        res.extra["sent_by_source"] = {s.name: s.bytes_sent for s in sources}
        if origin is not None:
            res.extra["sent_by_source"]["origin"] = origin.bytes_sent
        key_names = {s.key: s.name for s in sources} | {s.url: s.name for s in sources}
        if origin is not None:
            key_names[origin.key] = key_names[origin.url] = "origin"
        res.extra["source_names"] = key_names
    except Exception as e:
        res.ok = False
        res.error = f"harness: {type(e).__name__}: {e}"
    finally:
        for s in sources:
            s.stop()
        if origin is not None:
            origin.stop()
        if not args.keep:
            shutil.rmtree(sdir, ignore_errors=True)
    res.check_goals()
    return res


def fill_result(res: Result, proto: FetchProcess, code: int, wall: float, out: str, sha: str) -> None:
    res.exit_code = code
    res.wall_seconds = wall
    done = proto.done or {}
    res.seconds = done.get("seconds") if isinstance(done.get("seconds"), (int, float)) else None
    if res.seconds is None and proto.progress and code == 0:
        res.seconds = proto.progress[-1][0]
    res.duplicated_bytes = done.get("duplicated_bytes")
    res.rejected_bytes = done.get("rejected_bytes")
    res.bytes_by_source = dict(done.get("bytes_by_source") or {})
    res.last_pct = last_pct_ratio(proto.progress, res.size)
    res.sha256_ok = os.path.exists(out) and sha256_file(out) == sha
    errors = []
    if code != 0:
        errors.append(f"exit {code}")
    if proto.done is None:
        errors.append("no done line")
    elif not done.get("ok"):
        errors.append(f"done.ok false: {done.get('error')}")
    if not res.sha256_ok:
        errors.append("SHA-256 mismatch" if os.path.exists(out) else "no output file")
    tail = proto.stderr.decode(errors="replace").strip()
    if errors and tail:
        errors.append("stderr: " + " | ".join(tail.splitlines()[-3:])[:400])
    if proto.junk:
        res.extra["non_json_stdout"] = proto.junk[:5]
    res.ok = not errors
    res.error = "; ".join(errors) or None


# -- raw speed: unthrottled mirrors, 1 GiB in tmpfs -------------------------


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


class Mirrors:
    """Four unthrottled HTTP servers of one file: nginx, else twisted.web processes."""

    def __init__(self, directory: str, path: str, n: int, prefer_nginx: bool = True) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []
        self.kind = ""
        name = os.path.basename(path)
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if prefer_nginx and nginx:
            self._nginx(nginx, directory, name, n)
        else:
            self._twisted(path, n)

    def _nginx(self, nginx: str, directory: str, name: str, n: int) -> None:
        prefix = tempfile.mkdtemp(prefix="nginx-", dir=directory)
        # nginx workers run as an unprivileged user: they must reach the file.
        for d in (os.path.dirname(directory), directory):
            os.chmod(d, 0o755)
        os.chmod(os.path.join(directory, name), 0o644)
        ports = free_ports(n)
        listen = "\n".join(f"        listen 127.0.0.1:{p};" for p in ports)
        temp = " ".join(
            f"{k}_temp_path {prefix}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = f"""
daemon off;
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    {temp}
    server {{
{listen}
        root {directory};
        location / {{ }}
    }}
}}
"""
        conf_path = os.path.join(prefix, "nginx.conf")
        with open(conf_path, "w") as f:
            f.write(conf)
        log = open(os.path.join(prefix, "stderr.log"), "wb")
        proc = subprocess.Popen(
            [nginx, "-p", prefix, "-c", conf_path, "-e", f"{prefix}/error.log"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        self.kind = "nginx"
        for p in ports:
            wait_port(p)
        self.urls = [f"http://127.0.0.1:{p}/{name}" for p in ports]

    def _twisted(self, path: str, n: int) -> None:
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sources.py")
        self.kind = "twisted.web processes"
        for _ in range(n):
            proc = subprocess.Popen(
                [sys.executable, here, "http", path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
            self.procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline().decode().split()
            if len(line) != 2 or line[0] != "PORT":
                raise RuntimeError("twisted.web mirror did not start")
            self.urls.append(f"http://127.0.0.1:{line[1]}/{os.path.basename(path)}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _run_meshstream(
    reactor: Any,
    args: argparse.Namespace,
    rdir: str,
    mirrors: Mirrors,
    size: int,
    content: Content,
    man_path: str,
) -> Result:
    out = os.path.join(rdir, "out-meshstream.bin")
    cmd = [*fetch_command(args), "--manifest", man_path, "-o", out, "--progress", "json"]
    for url in mirrors.urls:
        cmd += ["--source", url]
    cmd += args.fetch_extra
    mode = f"meshstream, 4 {mirrors.kind}"
    res = Result("raw 4 unthrottled", mode, size)
    res.sources = list(mirrors.urls)
    if args.verbose:
        print(f"  $ {' '.join(cmd)}", file=sys.stderr)
    proto, code, wall = await run_fetch(
        reactor, cmd, max(FETCH_TIMEOUT_MIN, size / MiB / 5), lambda b, s: None
    )
    fill_result(res, proto, code, wall, out, content.sha256)
    res.goals = {"dup_pct": GOALS["dup_pct"], "last_pct": GOALS["last_pct"]}
    if os.path.exists(out):
        os.unlink(out)
    return res


def write_metalink(path: str, content: Content, urls: list[str], out_name: str) -> None:
    """
    A Metalink 4 file (RFC 5854) naming C{urls} and a SHA-256 per block of
    C{content}: aria2c then checks every block as it arrives, the work
    meshstream does with its manifest.
    """
    piece = content.manifest.block_size
    hashes = []
    with open(content.path, "rb") as f:
        while chunk := f.read(piece):
            hashes.append(hashlib.sha256(chunk).hexdigest())
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<metalink xmlns="urn:ietf:params:xml:ns:metalink">',
        f'  <file name="{out_name}">',
        f"    <size>{content.manifest.size}</size>",
        f'    <pieces length="{piece}" type="sha-256">',
        *(f"      <hash>{h}</hash>" for h in hashes),
        "    </pieces>",
        *(f"    <url>{u}</url>" for u in urls),
        "  </file>",
        "</metalink>",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


async def _run_aria(
    reactor: Any,
    aria: str,
    rdir: str,
    mirrors: Mirrors,
    size: int,
    sha256: str,
    metalink: str | None = None,
) -> Result:
    """
    aria2c on the same mirrors; with C{metalink}, from that file, checking
    each block's SHA-256 as it arrives (C{--realtime-chunk-checksum}).
    """
    mode = f"aria2c -x4 -s4, 4 {mirrors.kind}"
    if metalink is not None:
        mode = f"aria2c -x4 -s4 + SHA-256 per block, 4 {mirrors.kind}"
    ares = Result("raw 4 unthrottled", mode, size)
    aout = "out-aria2c.bin"
    where = [*mirrors.urls] if metalink is None else ["-M", metalink, "--realtime-chunk-checksum=true"]
    acmd = [
        aria,
        "-x4",
        "-s4",
        "-k1M",
        "--file-allocation=none",
        "--no-conf",
        "--allow-overwrite=true",
        "--auto-file-renaming=false",
        "--summary-interval=0",
        "--console-log-level=warn",
        "-d",
        rdir,
        "-o",
        aout,
        *where,
    ]
    ares.sources = list(mirrors.urls)
    start = time.monotonic()
    aproc = await _spawn_simple(reactor, acmd)
    ares.wall_seconds = ares.seconds = time.monotonic() - start
    ares.exit_code = aproc
    apath = os.path.join(rdir, aout)
    ares.sha256_ok = os.path.exists(apath) and sha256_file(apath) == sha256
    ares.ok = aproc == 0 and bool(ares.sha256_ok)
    if not ares.ok:
        ares.error = f"aria2c exit {aproc}, sha256_ok={ares.sha256_ok}"
    if os.path.exists(apath):
        os.unlink(apath)
    return ares


def _faster(best: Result | None, new: Result) -> Result:
    """The better of two runs: a successful one, then the shorter."""
    if best is None or (new.ok and (new.wall_seconds or math.inf) < (best.wall_seconds or math.inf)):
        return new
    return best


def compile_package() -> None:
    """
    Byte-compile meshstream's modules, as an installed package has them:
    an editable install run with C{PYTHONDONTWRITEBYTECODE} (as CI shells
    are) would otherwise compile them at every start, 30 ms of the raw
    fetch's wall time that no installed copy pays.
    """
    import compileall

    import meshstream

    compileall.compile_dir(os.path.dirname(meshstream.__file__), quiet=1)


async def run_raw(reactor: Any, args: argparse.Namespace, workdir: str) -> list[Result]:
    size = args.raw_size
    if not args.fetch_cmd:
        compile_package()
    rdir = tempfile.mkdtemp(prefix="raw-", dir=workdir)
    results: list[Result] = []
    mirrors: Mirrors | None = None
    try:
        content = make_content(rdir, "raw.bin", size, seed=2)
        mirrors = Mirrors(rdir, content.path, 4, prefer_nginx=not args.no_nginx)
        man_path = os.path.join(rdir, "raw.manifest.json")
        with open(man_path, "wb") as f:
            f.write(content.manifest.to_json())
        # aria2c runs first and meshstream second, then both again, and the
        # faster of each pair counts: the first download after writing the
        # 1 GiB content pays for the kernel settling its memory, whoever it is.
        with_aria = shutil.which("aria2c")
        ares: Result | None = None
        vres: Result | None = None
        res: Result | None = None
        metalink = os.path.join(rdir, "raw.meta4")
        if with_aria:
            write_metalink(metalink, content, mirrors.urls, "out-aria2c.bin")
        for _round in range(2):
            if with_aria:
                a = await _run_aria(reactor, with_aria, rdir, mirrors, size, content.sha256)
                ares = _faster(ares, a)
                v = await _run_aria(reactor, with_aria, rdir, mirrors, size, content.sha256, metalink)
                vres = _faster(vres, v)
            m = await _run_meshstream(reactor, args, rdir, mirrors, size, content, man_path)
            if res is None or (m.ok and (m.wall_seconds or math.inf) < (res.wall_seconds or math.inf)):
                res = m
        assert res is not None
        results.append(res)
        if ares is not None:
            results.append(ares)
            # Raw speed compares wall clocks: aria2c has no self-reported time.
            ms, ar = res.wall_seconds, ares.wall_seconds
            if res.ok and ares.ok and ms and ar:
                res.extra["vs_aria2c"] = round(ar / ms, 3)
                if ar / ms < 1.0:
                    res.missed.append("slower than aria2c")
        if vres is not None:
            results.append(vres)
            ms, ar = res.wall_seconds, vres.wall_seconds
            if res.ok and vres.ok and ms and ar:
                res.extra["vs_aria2c_verifying"] = round(ar / ms, 3)
        res.extra["raw_speed_mib_s_wall"] = (
            round(size / MiB / res.wall_seconds, 1) if res.wall_seconds else None
        )
    except Exception as e:
        res = Result("raw 4 unthrottled", "meshstream", size, error=f"harness: {type(e).__name__}: {e}")
        results.append(res)
    finally:
        if mirrors is not None:
            mirrors.stop()
        if not args.keep:
            shutil.rmtree(rdir, ignore_errors=True)
    for r in results:
        missed = [m for m in r.missed if m == "slower than aria2c"]
        r.check_goals()
        r.missed += missed
    return results


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[int] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        v = reason.value
        code = getattr(v, "exitCode", None)
        self.ended.callback(int(code) if code is not None else -1)


async def _spawn_simple(reactor: Any, cmd: list[str]) -> int:
    proto = _Collect()
    reactor.spawnProcess(proto, cmd[0], cmd, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"})
    return await proto.ended


# -- the table -------------------------------------------------------------


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[Result]) -> str:
    head = ["scenario", "mode", "seconds", "MiB/s", "ratio", "dup %", "last 1%", "ideal s", "sha256", "goals"]
    rows = [head]
    for r in results:
        raw = r.scenario.startswith("raw")
        secs = r.wall_seconds if raw else r.seconds
        mibs = (r.size / MiB / secs) if secs else None
        ratio = f"{r.extra['vs_aria2c']:.2f}xA" if raw and "vs_aria2c" in r.extra else fmt(r.ratio, ".3f")
        if raw and "vs_aria2c_verifying" in r.extra:
            ratio += f" {r.extra['vs_aria2c_verifying']:.2f}xV"
        rows.append(
            [
                r.scenario,
                r.mode,
                fmt(secs, ".2f") + ("w" if raw else ""),
                fmt(mibs, ".1f"),
                ratio,
                fmt(r.dup_pct, ".2f"),
                fmt(r.last_pct, ".2f"),
                fmt(r.ideal_seconds, ".2f"),
                {True: "ok", False: "BAD", None: "-"}[r.sha256_ok],
                "ok" if not r.missed else ",".join(r.missed),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        cells[-1] = row[-1]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- command line ----------------------------------------------------------


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1024, "m": MiB, "g": 1024 * MiB}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of MiB/s: {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates are positive MiB/s")
    return rates


def parse_kill(text: str) -> tuple[str, float]:
    who, sep, frac = text.partition("@")
    try:
        f = float(frac)
    except ValueError:
        f = -1.0
    if not sep or not 0.0 <= f < 1.0 or not (who in ("fastest", "slowest", "all") or who.isdigit()):
        raise argparse.ArgumentTypeError(
            "--kill is SOURCE@FRACTION: SOURCE an index, fastest, slowest or all"
        )
    return who, f


SCENARIO_NAMES = (
    "heterogeneous",
    "equal",
    "eight",
    "dies",
    "stall",
    "lie",
    "origin",
    "raw",
)
_ALIASES = {
    "heterogeneous": ("heterogeneous",),
    "equal": ("equal 4x4",),
    "eight": ("8 sources",),
    "dies": ("fastest dies@25%",),
    "stall": ("one stalls",),
    "lie": ("one lies",),
    "origin": ("all peers die",),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/multisource.py",
        description="Multi-source benchmark of `meshstream fetch` on loopback.",
    )
    p.add_argument(
        "--rates", type=parse_rates, help="MiB/s per source, e.g. 1,2,4,8: runs one custom scenario"
    )
    p.add_argument("--size", type=parse_size, help="content size of the throttled scenarios (default 64M)")
    p.add_argument("--raw-size", type=parse_size, help="content size of the raw-speed scenario (default 1G)")
    p.add_argument(
        "--kill",
        type=parse_kill,
        action="append",
        default=[],
        help="SOURCE@FRACTION (repeatable), custom scenario",
    )
    p.add_argument(
        "--http", type=int, default=0, help="make the first N sources HTTP mirrors (custom scenario)"
    )
    p.add_argument("--stall", type=int, default=0, help="add N stalling peers (custom scenario)")
    p.add_argument("--lie", type=int, default=0, help="add N lying peers (custom scenario)")
    p.add_argument("--origin", type=float, help="origin MiB/s in the manifest (custom; default 8 if all die)")
    p.add_argument("--policy", choices=("adaptive", "static"), help="custom scenario: fetch policy")
    p.add_argument("--window", type=int, help="custom scenario: fetch --window")
    p.add_argument("--scenario", action="append", choices=SCENARIO_NAMES, help="run only these (repeatable)")
    p.add_argument("--quick", action="store_true", help="16 MiB throttled, 256 MiB raw")
    p.add_argument("--no-raw", action="store_true", help="skip the raw-speed scenario")
    p.add_argument("--no-nginx", action="store_true", help="raw speed from twisted.web processes, not nginx")
    p.add_argument("--fetch-cmd", help="command to run instead of `meshstream fetch` (split on spaces)")
    p.add_argument(
        "--fetch-arg", dest="fetch_extra", action="append", default=[], help="extra fetch argument"
    )
    p.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def plan(args: argparse.Namespace) -> tuple[list[Scenario], bool]:
    size = args.size or (QUICK_SIZE if args.quick else DEFAULT_SIZE)
    custom = args.rates is not None or args.kill or args.http or args.stall or args.lie
    if custom:
        rates = args.rates or list(HETERO)
        if args.http > len(rates):
            raise SystemExit(f"--http {args.http}: only {len(rates)} sources")
        try:
            srcs = specs(rates, args.http, args.kill)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        srcs += [SourceSpec(BAD_SOURCE_RATE, behaviour="stall") for _ in range(args.stall)]
        srcs += [SourceSpec(BAD_SOURCE_RATE, behaviour="lie") for _ in range(args.lie)]
        extra: list[str] = []
        mode = "windowed"
        if args.policy:
            extra += ["--policy", args.policy]
            mode = args.policy if args.policy == "static" else mode
        if args.window:
            extra += ["--window", str(args.window)]
            mode += f" W={args.window}"
        origin = args.origin
        if origin is None and all(s.kill_at is not None for s in srcs if s.behaviour == "normal"):
            origin = ORIGIN_RATE
        if origin is not None and origin <= 0:
            origin = None
        goals = {"dup_pct": GOALS["dup_pct"], "last_pct": GOALS["last_pct"]}
        return [Scenario("custom", mode, srcs, size, extra, origin, goals)], False
    scenarios = default_scenarios(size)
    if args.window:
        for sc in scenarios:
            if "--window" not in sc.fetch_args:
                sc.fetch_args += ["--window", str(args.window)]
                sc.mode += f" W={args.window}"
    want_raw = not args.no_raw
    if args.scenario:
        names = {n for key in args.scenario for n in _ALIASES.get(key, ())}
        scenarios = [sc for sc in scenarios if sc.name in names]
        want_raw = "raw" in args.scenario and not args.no_raw
    return scenarios, want_raw


async def main(reactor: Any, args: argparse.Namespace) -> list[Result]:
    scenarios, want_raw = plan(args)
    args.raw_size = args.raw_size or (QUICK_RAW_SIZE if args.quick else DEFAULT_RAW_SIZE)
    workdir = tempfile.mkdtemp(prefix="meshstream-bench-", dir=args.workdir)
    results: list[Result] = []
    try:
        contents: dict[int, Content] = {}
        for sc in scenarios:
            if sc.size not in contents:
                contents[sc.size] = make_content(workdir, f"content-{sc.size}.bin", sc.size, seed=1)
            desc = ", ".join(
                f"{s.rate:g}"
                + ("h" if s.kind == "http" else "")
                + (s.behaviour[0] if s.behaviour != "normal" else "")
                for s in sc.sources
            )
            print(f"# {sc.name} [{sc.mode}] sources MiB/s: {desc}", file=sys.stderr, flush=True)
            res = await run_scenario(reactor, args, sc, contents[sc.size], workdir)
            results.append(res)
            print(f"#   -> {table([res]).splitlines()[-1]}", file=sys.stderr, flush=True)
            if res.error:
                print(f"#   error: {res.error}", file=sys.stderr, flush=True)
        if want_raw:
            print(
                f"# raw speed: {args.raw_size // MiB} MiB, 4 unthrottled mirrors", file=sys.stderr, flush=True
            )
            results += await run_raw(reactor, args, workdir)
    finally:
        if args.keep:
            print(f"# work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def summary(results: list[Result], wall: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "benchmark": "multisource",
        "wall_seconds": round(wall, 1),
        "goals": GOALS,
        "scenarios": {},
    }
    for r in results:
        out["scenarios"][f"{r.scenario}/{r.mode}"] = r.to_json()
    raw = [r for r in results if r.scenario.startswith("raw")]
    if raw:
        ms = raw[0]
        ar = next((r for r in raw[1:] if "SHA-256" not in r.mode), None)
        va = next((r for r in raw[1:] if "SHA-256" in r.mode), None)
        out["raw_speed"] = {
            "meshstream_mib_s": round(ms.size / MiB / ms.wall_seconds, 1)
            if ms.ok and ms.wall_seconds
            else None,
            "meshstream_self_reported_mib_s": round(ms.mib_s, 1) if ms.ok and ms.mib_s else None,
            "aria2c_mib_s": round(ar.size / MiB / ar.wall_seconds, 1)
            if ar is not None and ar.ok and ar.wall_seconds
            else None,
            "ratio_meshstream_to_aria2c": ms.extra.get("vs_aria2c"),
            "aria2c_verifying_mib_s": round(va.size / MiB / va.wall_seconds, 1)
            if va is not None and va.ok and va.wall_seconds
            else None,
            "ratio_meshstream_to_aria2c_verifying": ms.extra.get("vs_aria2c_verifying"),
        }
    return out


def run(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    results: list[Result] = []
    start = time.monotonic()

    def go(reactor: Any) -> Deferred[None]:
        async def body() -> None:
            results.extend(await main(reactor, args))

        return ensureDeferred(body())

    try:
        task.react(go)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    print(table(results))
    print(json.dumps(summary(results, time.monotonic() - start), sort_keys=False))
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(run())
