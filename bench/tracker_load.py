"""
Tracker load benchmark: C{python bench/tracker_load.py}.

For each store (SQLite, then PostgreSQL in a throwaway cluster of its own)
it creates two accounts with C{meshstream tracker user add} (C{bench-admin},
an admin, registers the manifests; C{bench}, a user, owns every node and is
the load generator's login), starts the tracker as its own process
(C{twistd -n --logger meshstream.logs.json_observer meshstream-tracker} on
127.0.0.1, at the default C{info} log level), logs in, registers the
dataset's manifests over HTTP, fills the store directly (100 000 nodes
x 10 contents = 1 000 000 holdings, in a few seconds: one C{executemany}
transaction on SQLite, C{COPY} on PostgreSQL), then drives it from a
separate load-generating process (C{bench/_loadgen.py}) over keep-alive
HTTP/1.1 on loopback, phase by phase:

  - C{health}: C{GET /api/v1/health} flat out: the HTTP stack's ceiling
    (no database), the baseline of the "vs HTTP" column;
  - C{announce}: C{POST /api/v1/announce} flat out from C{--announce-conns}
    connections (a random known node re-announcing its 10 contents);
  - C{nodes}: C{GET /api/v1/contents/ID/nodes?limit=50} flat out from
    C{--nodes-conns} connections (a random content, 1 000 holders);
  - C{lookup}: node lists alone at C{--nodes-rate} (open loop: latency
    counts from when a request was due);
  - C{mixed}: node lists at C{--nodes-rate} while announces come at the
    rate the dataset's nodes would send them (100 000 / 30 s = 3 333/s).

It prints a table (requests/s, p50/p99 latency per operation and store, CPU
of the tracker, the database server and the load generator, ratios to the
goals and to the HTTP ceiling), a goals table and a last line holding one
JSON object.  Progress (C{# ...} lines) goes to stderr.  See
bench/README.md.

Goals (issue 4): >= 5 000 announces/s flat out and node-list p99 <= 10 ms,
from one tracker process; the p99 is judged in the lookup phase and, as a
stricter test, in the mixed phase.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import zlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The tracker measured (and the manifests built here) are this checkout's.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _loadgen import holdings, node_address, node_id, node_state
from _pgcluster import Cluster, ClusterError, find_bin, free_port

from meshstream.manifest import Manifest
from meshstream.tracker.ranking import KEY_REFRESH, preselect_key, rank_columns
from meshstream.tracker.store import holdings_digest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

GOALS = {"announce_rps": 5000.0, "nodes_p99_ms": 10.0}
#: The accounts (see the module docstring) and their password.
ADMIN_USER = "bench-admin"
AGENT_USER = "bench"
BENCH_PASSWORD = "bench-password-not-secret"
DEFAULT_NODES = 100_000
DEFAULT_CONTENTS = 1_000
ANNOUNCE_INTERVAL = 30.0  # the tracker's default; sets the mixed phase's announce rate
STORES = ("sqlite", "postgresql")
PHASES = ("health", "announce", "nodes", "lookup", "mixed")


# -- the tracker process ---------------------------------------------------------


def child_env(root: str = ROOT) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class Tracker:
    """C{twistd -n meshstream-tracker} in a subprocess, listening on 127.0.0.1."""

    def __init__(
        self, workdir: str, label: str, db_url: str, extra: Sequence[str] = (), root: str = ROOT
    ) -> None:
        self.root = root
        self.port = free_port()
        self.log = os.path.join(workdir, f"tracker-{label}.log")
        self.key = os.path.join(workdir, "tracker.key")
        # JSON lines on stdout at the default info level, as a deployment
        # runs it (a tree without meshstream/logs.py: twistd's text log).
        self.json_log = os.path.exists(os.path.join(root, "meshstream", "logs.py"))
        logging = ["--logger=meshstream.logs.json_observer"] if self.json_log else ["--logfile", self.log]
        self.cmd = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            *logging,
            "meshstream-tracker",
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--db",
            db_url,
            "--key",
            self.key,
            "--announce-interval",
            str(ANNOUNCE_INTERVAL),
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.token: str | None = None  # sent with request() when set

    def start(self, timeout: float = 60.0) -> None:
        env = child_env(self.root)
        env["MESHSTREAM_LOG_LEVEL"] = "info"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log if self.json_log else None,
                cwd=self.root,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the tracker exited ({self.proc.returncode}); see {self.log}")
            try:
                status, _ = self.request("GET", "/api/v1/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the tracker did not answer in {timeout:.0f} s; see {self.log}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=self.headers())
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def login(self, user: str) -> str | None:
        """C{POST /login} as C{user}; its token (None from a tracker without accounts)."""
        body = json.dumps({"user": user, "password": BENCH_PASSWORD}).encode()
        status, answer = self.request("POST", "/api/v1/login", body)
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"login as {user}: {status} {answer[:200]!r}")
        return str(json.loads(answer)["token"])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def create_accounts(db_url: str, root: str) -> bool:
    """
    C{meshstream tracker user add} the bench's two accounts on C{db_url}
    (this migrates the database, as a tracker would); False for a tree
    without accounts.
    """
    if not os.path.exists(os.path.join(root, "meshstream", "tracker", "admin.py")):
        return False
    env = child_env(root)
    env["MESHSTREAM_PASSWORD"] = BENCH_PASSWORD
    for name, role in ((ADMIN_USER, "admin"), (AGENT_USER, "user")):
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from meshstream.cli import main; sys.exit(main())",
                "tracker",
                "user",
                "add",
                name,
                "--role",
                role,
                "--db",
                db_url,
            ],
            env=env,
            cwd=root,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return True


def obtain_token(tracker: Tracker, args: argparse.Namespace) -> str | None:
    """
    The bearer token the load generator sends (C{Authorization: Bearer ...}):
    C{--token}, or the C{bench} user's, logged in (the tracker is up and the
    dataset is filled when this is called).
    """
    token: str | None = args.token
    if token is None:
        token = tracker.login(AGENT_USER)
    return token


# -- the dataset -----------------------------------------------------------------


def bench_manifest(i: int) -> Manifest:
    roots = tuple(hashlib.sha256(f"bench-{i}-{b}".encode()).digest() for b in range(3))
    return Manifest(
        size=3 * 1024 * 1024 - 100,
        block_size=1024 * 1024,
        sub_block_size=64 * 1024,
        block_roots=roots,
        name=f"bench-{i}.bin",
    )


def register_manifests(tracker: Tracker, n: int) -> list[str]:
    """POST C{n} manifests over one keep-alive connection; return their content ids."""
    conn = http.client.HTTPConnection("127.0.0.1", tracker.port, timeout=30)
    ids: list[str] = []
    try:
        for i in range(n):
            conn.request(
                "POST", "/api/v1/manifests", body=bench_manifest(i).to_json(), headers=tracker.headers()
            )
            resp = conn.getresponse()
            body = resp.read()
            if resp.status not in (200, 201):
                raise RuntimeError(f"registering manifest {i}: {resp.status} {body[:200]!r}")
            ids.append(json.loads(body)["content_id"])
    finally:
        conn.close()
    return ids


def node_rows(n_nodes: int, content_ids: Sequence[str], now: float, seed: int) -> Iterator[tuple[Any, ...]]:
    """
    Rows of C{nodes} as the tracker's own announces would leave them: state
    JSON, rank columns and holdings digest computed by the tracker's code.
    """
    rng = random.Random(seed)
    # The ages of the pre-selection keys the holdings carry, as in a
    # tracker that has run for a while: spread over KEY_REFRESH, so that
    # announces rewrite keys at the steady rate (drawn apart from the
    # states, which stay those of earlier runs).
    ages = random.Random(seed + 1)
    n = len(content_ids)
    for i in range(n_nodes):
        state = node_state(rng)
        held = [content_ids[c] for c in holdings(i, n)]
        rank = rank_columns(state)
        yield (
            node_id(i),
            node_address(i),
            json.dumps(state, sort_keys=True),
            now,
            *rank,
            holdings_digest(held),
            AGENT_USER,
            "peer",
            *preselect_key(rank),
            now - ages.uniform(0.0, KEY_REFRESH),
        )


def holding_rows(
    n_nodes: int, content_ids: Sequence[str], keys: Sequence[tuple[Any, ...]] | None = None
) -> Iterator[tuple[Any, ...]]:
    """
    Rows of C{holdings}: C{(node_id, content_id)}, and with C{keys} (one
    C{(kind, held_known, held_rank)} per node) those three too.
    """
    n = len(content_ids)
    for i in range(n_nodes):
        nid = node_id(i)
        extra = () if keys is None else keys[i]
        for c in holdings(i, n):
            yield (nid, content_ids[c], *extra)


NODE_COLUMNS = (
    "node_id",
    "address",
    "state",
    "last_seen",
    "rank_free",
    "rank_load",
    "holdings_digest",
    "owner",
    "kind",
    "held_known",
    "held_rank",
    "held_at",
)


def present(rows: Iterator[tuple[Any, ...]], have: set[str]) -> tuple[list[str], Iterator[tuple[Any, ...]]]:
    """
    The columns of L{NODE_COLUMNS} the schema has, and C{rows} cut to them
    (so that an older tracker, C{--tracker-root}, can be filled too).
    """
    keep = [i for i, c in enumerate(NODE_COLUMNS) if c in have]
    return [NODE_COLUMNS[i] for i in keep], (tuple(row[i] for i in keep) for row in rows)


def fill_rows(
    n_nodes: int, content_ids: Sequence[str], now: float, have: set[str]
) -> tuple[list[str], Iterator[tuple[Any, ...]], list[str], Iterator[tuple[Any, ...]]]:
    """
    The columns and rows of C{nodes} (L{present}) and of C{holdings}, whose
    rows carry their node's kind and pre-selection key when the schema has
    them (C{held_rank}, schema 7).
    """
    full = list(node_rows(n_nodes, content_ids, now, seed=7))
    columns, rows = present(iter(full), have)
    if "held_rank" not in have:
        return columns, rows, ["node_id", "content_id"], holding_rows(n_nodes, content_ids)
    at = [NODE_COLUMNS.index(c) for c in ("kind", "held_known", "held_rank")]
    keys = [tuple(row[i] for i in at) for row in full]
    holding_columns = ["node_id", "content_id", "kind", "rank_known", "rank"]
    return columns, rows, holding_columns, holding_rows(n_nodes, content_ids, keys)


def fill_sqlite(path: str, n_nodes: int, content_ids: Sequence[str], now: float) -> None:
    """One transaction of C{executemany}; the tracker (idle) has the file open too."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        have = {str(r[1]) for r in conn.execute("PRAGMA table_info(nodes)")}
        columns, rows, holding_columns, holdings_ = fill_rows(n_nodes, content_ids, now, have)
        conn.execute("BEGIN IMMEDIATE")
        for table, names, values in (("nodes", columns, rows), ("holdings", holding_columns, holdings_)):
            marks = ", ".join("?" * len(names))
            conn.executemany(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks})", values)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def fill_postgres(url: str, n_nodes: int, content_ids: Sequence[str], now: float) -> None:
    """C{COPY} both tables, then C{VACUUM ANALYZE} (as autovacuum would, later)."""
    import psycopg

    with psycopg.connect(url) as conn:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_name = 'nodes' AND table_schema = current_schema()"
            )
            have = {str(r[0]) for r in cur.fetchall()}
            columns, rows, holding_columns, holdings_ = fill_rows(n_nodes, content_ids, now, have)
            for table, names, values in (("nodes", columns, rows), ("holdings", holding_columns, holdings_)):
                with cur.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN") as copy:
                    for row in values:
                        copy.write_row(row)
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE nodes")
        conn.execute("VACUUM ANALYZE holdings")


# -- CPU accounting ----------------------------------------------------------------


def proc_cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def tree_pids(pid: int | None) -> list[int]:
    if pid is None:
        return []
    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return []


@dataclass
class CpuSample:
    wall: float
    tracker: float
    db: float
    machine_busy: float

    @classmethod
    def take(cls, tracker_pid: int, db_pids: Sequence[int]) -> CpuSample:
        m = psutil.cpu_times()
        busy = sum(m) - m.idle - getattr(m, "iowait", 0.0)
        return cls(time.monotonic(), proc_cpu([tracker_pid]), proc_cpu(db_pids), busy)


# -- phases ------------------------------------------------------------------------


@dataclass
class OpResult:
    store: str
    phase: str
    op: str
    load: str
    closed: bool
    completed: int = 0
    rps: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    checked: int = 0
    bad_bodies: int = 0
    overflow: int = 0
    backlog_max: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "load": self.load,
            "completed": self.completed,
            "rps": round(self.rps, 1),
            "p50_ms": _r(self.p50_ms),
            "p90_ms": _r(self.p90_ms),
            "p99_ms": _r(self.p99_ms),
            "p999_ms": _r(self.p999_ms),
            "max_ms": _r(self.max_ms),
            "errors": self.errors,
            "checked": self.checked,
            "bad_bodies": self.bad_bodies,
            "overflow": self.overflow,
            "backlog_max": self.backlog_max,
        }


@dataclass
class PhaseResult:
    store: str
    phase: str
    seconds: float
    ops: list[OpResult]
    cpu_tracker: float | None = None  # fraction of one core
    cpu_db: float | None = None
    cpu_loadgen: float | None = None
    cpu_machine: float | None = None  # fraction of all cores
    cpu_other: float | None = None  # everything else on the machine, fraction of one core
    loadgen_us_per_request: float | None = None
    tracker_us_per_request: float | None = None  # tracker CPU ÷ requests answered, all ops
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "cpu_tracker": _r(self.cpu_tracker),
            "cpu_db": _r(self.cpu_db),
            "cpu_loadgen": _r(self.cpu_loadgen),
            "cpu_machine": _r(self.cpu_machine),
            "cpu_other": _r(self.cpu_other),
            "loadgen_us_per_request": _r(self.loadgen_us_per_request, 1),
            "tracker_us_per_request": _r(self.tracker_us_per_request, 1),
            "error": self.error,
            "ops": {o.op: o.to_json() for o in self.ops},
        }


def _r(x: float | None, n: int = 3) -> float | None:
    return None if x is None else round(x, n)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values (q in 0..100)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def phase_workloads(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    if name == "health":
        return [{"op": "health", "conns": args.health_conns, "rate": None}]
    if name == "announce":
        return [{"op": "announce", "conns": args.announce_conns, "rate": None}]
    if name == "nodes":
        return [{"op": "nodes", "conns": args.nodes_conns, "rate": None}]
    if name == "lookup":
        return [{"op": "nodes", "conns": args.nodes_conns, "rate": args.nodes_rate}]
    if name == "mixed":
        return [
            {"op": "announce", "conns": args.announce_conns, "rate": args.mixed_announce_rate},
            {"op": "nodes", "conns": args.nodes_conns, "rate": args.nodes_rate},
        ]
    raise ValueError(name)


def split(workloads: list[dict[str, Any]], procs: int) -> list[list[dict[str, Any]]]:
    """Share connections and rates between C{procs} generator processes."""
    out: list[list[dict[str, Any]]] = []
    for p in range(procs):
        mine = []
        for w in workloads:
            conns = w["conns"] // procs + (1 if p < w["conns"] % procs else 0)
            if conns == 0:
                continue
            rate = None if w["rate"] is None else w["rate"] * conns / w["conns"]
            mine.append({**w, "conns": conns, "rate": rate})
        out.append(mine)
    return out


def py_spy_path() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.path.exists(beside) else shutil.which("py-spy") or "py-spy"


def run_phase(
    store: str,
    name: str,
    tracker: Tracker,
    db_pids: Sequence[int],
    dataset: dict[str, Any],
    args: argparse.Namespace,
    workdir: str,
) -> PhaseResult:
    workloads = phase_workloads(name, args)
    duration = args.health_duration if name == "health" else args.duration
    slug = store.replace(" ", "-")
    procs: list[subprocess.Popen[bytes]] = []
    spy: subprocess.Popen[bytes] | None = None
    try:
        for p, mine in enumerate(split(workloads, args.loadgen_procs)):
            spec = {
                "host": "127.0.0.1",
                "port": tracker.port,
                "warmup": args.warmup,
                "duration": duration,
                "token": dataset["token"],
                "seed": zlib.crc32(f"{store.split()[0]}/{name}/{p}".encode()),  # the same for a baseline
                "nodes": dataset["nodes"],
                "contents": dataset["contents"],
                "out": os.path.join(workdir, f"lat-{slug}-{name}-{p}"),
                "workloads": mine,
            }
            spec_path = os.path.join(workdir, f"spec-{slug}-{name}-{p}.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            procs.append(
                subprocess.Popen(
                    [sys.executable, os.path.join(HERE, "_loadgen.py"), spec_path],
                    stdout=subprocess.PIPE,
                    env=child_env(),
                )
            )
        if args.py_spy and name in ("health", "announce", "nodes", "lookup", "mixed"):
            spy_out = os.path.join(args.py_spy, f"{slug}-{name}.txt")
            spy = subprocess.Popen(
                [
                    py_spy_path(),
                    "record",
                    "--pid",
                    str(tracker.pid),
                    "--duration",
                    str(max(1, int(duration - 1))),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--threads",
                    "--output",
                    spy_out,
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        # CPU is sampled inside the generators' measurement window.
        time.sleep(args.warmup + 0.3)
        before = CpuSample.take(tracker.pid, db_pids)
        time.sleep(max(0.5, duration - 0.6))
        after = CpuSample.take(tracker.pid, db_pids)
        outputs = []
        for proc in procs:
            out, _ = proc.communicate(timeout=duration + args.warmup + 60)
            if proc.returncode != 0:
                return PhaseResult(
                    store, name, duration, [], error=f"load generator exited {proc.returncode}"
                )
            outputs.append(json.loads(out.decode().strip().splitlines()[-1]))
        if spy is not None:
            spy.wait(timeout=60)
    finally:
        for proc in [*procs, *([spy] if spy is not None else [])]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = after.wall - before.wall
    result = PhaseResult(
        store,
        name,
        duration,
        [],
        cpu_tracker=(after.tracker - before.tracker) / wall,
        cpu_db=(after.db - before.db) / wall if db_pids else None,
        cpu_machine=(after.machine_busy - before.machine_busy) / wall / (psutil.cpu_count() or 1),
    )
    gen_cpu = sum(o["cpu_seconds"] for o in outputs)
    result.cpu_loadgen = gen_cpu / duration
    assert result.cpu_machine is not None and result.cpu_tracker is not None
    result.cpu_other = max(
        0.0,
        result.cpu_machine * (psutil.cpu_count() or 1)
        - result.cpu_tracker
        - (result.cpu_db or 0.0)
        - result.cpu_loadgen,
    )
    for w in workloads:
        op = OpResult(
            store,
            name,
            w["op"],
            f"{w['conns']} conns" if w["rate"] is None else f"{w['rate']:g}/s",
            w["rate"] is None,
        )
        lat = array("d")
        for o in outputs:
            for ow in o["workloads"]:
                if ow["op"] != w["op"]:
                    continue
                op.completed += ow["completed"]
                op.checked += ow["checked"]
                op.bad_bodies += ow["bad_bodies"]
                op.overflow += ow["overflow"]
                op.backlog_max += ow["backlog_max"]
                for k, v in ow["errors"].items():
                    op.errors[k] = op.errors.get(k, 0) + v
                with open(ow["latency_file"], "rb") as f:
                    lat.frombytes(f.read())
                os.unlink(ow["latency_file"])
        values = sorted(lat)
        op.rps = op.completed / duration
        for attr, q in (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("p999_ms", 99.9), ("max_ms", 100)):
            v = percentile(values, q)
            setattr(op, attr, None if v is None else v * 1000.0)
        result.ops.append(op)
    total = sum(o.completed for o in result.ops)
    result.loadgen_us_per_request = gen_cpu / total * 1e6 if total else None
    if total and result.cpu_tracker is not None:
        result.tracker_us_per_request = result.cpu_tracker * duration / total * 1e6
    return result


# -- one store ---------------------------------------------------------------------


@dataclass
class StoreRun:
    store: str  # the engine
    baseline: bool = False  # the --baseline tracker, not this checkout's
    skipped: str | None = None
    error: str | None = None
    register_seconds: float | None = None
    fill_seconds: float | None = None
    phases: list[PhaseResult] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.store} base" if self.baseline else self.store

    def op(self, phase: str, op: str) -> OpResult | None:
        for p in self.phases:
            if p.phase == phase:
                for o in p.ops:
                    if o.op == op:
                        return o
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "error": self.error,
            "register_seconds": _r(self.register_seconds, 2),
            "fill_seconds": _r(self.fill_seconds, 2),
            "phases": {p.phase: p.to_json() for p in self.phases},
        }


def say(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


def run_store(store: str, args: argparse.Namespace, workdir: str, baseline: str | None = None) -> StoreRun:
    """
    One store's run: this checkout's tracker, or with C{baseline} (a source
    tree) that tracker.
    """
    run = StoreRun(store, baseline is not None)
    label = run.name
    cluster: Cluster | None = None
    tracker: Tracker | None = None
    try:
        if store == "sqlite":
            db_url = f"sqlite:{os.path.join(workdir, label.replace(' ', '-') + '.sqlite')}"
        else:
            bin_dir = find_bin(args.pg_bin)
            if bin_dir is None:
                run.skipped = (
                    "no PostgreSQL binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH"
                )
                say(f"postgresql: skipped: {run.skipped}")
                return run
            say(f"postgresql: starting a throwaway cluster ({bin_dir})")
            cluster = Cluster(bin_dir)  # in /tmp: the postgres user cannot enter workdir
            cluster.start()
            db_url = cluster.url
        root = baseline or args.tracker_root or ROOT
        accounts = create_accounts(db_url, root)
        tracker = Tracker(workdir, label.replace(" ", "-"), db_url, args.tracker_arg, root)
        say(f"{label}: starting the tracker on 127.0.0.1:{tracker.port}")
        tracker.start()
        if accounts:
            tracker.token = tracker.login(ADMIN_USER)
        t0 = time.monotonic()
        contents = register_manifests(tracker, args.contents)
        run.register_seconds = time.monotonic() - t0
        say(f"{label}: {len(contents)} manifests registered over HTTP in {run.register_seconds:.1f} s")
        t0 = time.monotonic()
        now = time.time()
        if store == "sqlite":
            fill_sqlite(db_url.removeprefix("sqlite:"), args.nodes, contents, now)
        else:
            fill_postgres(db_url, args.nodes, contents, now)
        run.fill_seconds = time.monotonic() - t0
        say(
            f"{label}: filled {args.nodes} nodes x 10 contents"
            f" ({args.nodes * 10} holdings) in {run.fill_seconds:.1f} s"
        )
        dataset = {"nodes": args.nodes, "contents": contents, "token": obtain_token(tracker, args)}
        db_pids = tree_pids(cluster.postmaster_pid()) if cluster is not None else []
        for name in args.phase or PHASES:
            say(f"{label}: phase {name}")
            res = run_phase(label, name, tracker, db_pids, dataset, args, workdir)
            run.phases.append(res)
            for line in table([res]).splitlines()[2:]:
                say(f"  {line}")
            if res.error:
                say(f"  error: {res.error}")
    except (ClusterError, RuntimeError, OSError, subprocess.SubprocessError) as e:
        run.error = f"{type(e).__name__}: {e}"
        say(f"{label}: {run.error}")
    finally:
        if tracker is not None:
            tracker.stop()
        if cluster is not None:
            cluster.stop()
    return run


# -- output ------------------------------------------------------------------------


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def goal_ratio(o: OpResult) -> tuple[str, bool | None]:
    """ours ÷ goal for the rows a goal is about, and whether it is met."""
    if o.phase == "announce" and o.op == "announce":
        r = o.rps / GOALS["announce_rps"]
        return f"{r:.2f} (≥1)", r >= 1.0
    if o.phase in ("lookup", "mixed") and o.op == "nodes" and o.p99_ms is not None:
        r = o.p99_ms / GOALS["nodes_p99_ms"]
        return f"{r:.2f} (≤1)", r <= 1.0
    return "-", None


def table(
    phases: list[PhaseResult],
    health: dict[str, float] | None = None,
    base: dict[tuple[str, str, str], OpResult] | None = None,
) -> str:
    """
    The results table.  C{health}: store name -> its health req/s;
    C{base}: (store, phase, op) of this checkout's runs -> the baseline's result.
    """
    head = [
        "store",
        "phase",
        "op",
        "load",
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "trk µs/req",
        "cpu trk",
        "cpu db",
        "cpu gen",
        "cpu other",
        "vs goal",
        "vs HTTP",
        "vs base",
    ]
    rows = [head]
    for p in phases:
        for o in p.ops:
            errors = sum(o.errors.values()) + o.bad_bodies + o.overflow
            ceiling = (health or {}).get(p.store)
            vs_http = f"{o.rps / ceiling:.2f}" if ceiling and o.closed and o.op != "health" else "-"
            b = (base or {}).get((p.store, p.phase, o.op))
            vs_base = "-"
            if b is not None and o.closed and b.rps:
                vs_base = f"{o.rps / b.rps:.2f}"
            elif b is not None and not o.closed and b.p99_ms and o.p99_ms:
                vs_base = f"{b.p99_ms / o.p99_ms:.2f}"
            rows.append(
                [
                    p.store,
                    p.phase,
                    o.op,
                    o.load,
                    fmt(o.rps, ".0f"),
                    fmt(o.p50_ms, ".2f"),
                    fmt(o.p99_ms, ".2f"),
                    fmt(o.max_ms, ".1f"),
                    str(errors),
                    fmt(p.tracker_us_per_request, ".0f"),
                    pct(p.cpu_tracker),
                    pct(p.cpu_db),
                    pct(p.cpu_loadgen),
                    pct(p.cpu_other),
                    goal_ratio(o)[0],
                    vs_http,
                    vs_base,
                ]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for n, r in enumerate(rows):
        cells = [c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def health_rps(runs: list[StoreRun]) -> dict[str, float]:
    out = {}
    for r in runs:
        h = r.op("health", "health")
        if h is not None and h.rps:
            out[r.name] = h.rps
    return out


def baseline_ops(runs: list[StoreRun]) -> dict[tuple[str, str, str], OpResult]:
    """(store, phase, op) of this checkout's runs -> the baseline's result for it."""
    out = {}
    for r in runs:
        if r.baseline:
            for p in r.phases:
                for o in p.ops:
                    out[(r.store, p.phase, o.op)] = o
    return out


GOAL_ROWS = (
    ("announce", "announce", "announces/s flat out ≥ 5000"),
    ("lookup", "nodes", "node-list p99 ≤ 10 ms, alone"),
    ("mixed", "nodes", "node-list p99 ≤ 10 ms, mixed"),
)


def goals_table(runs: list[StoreRun]) -> str:
    width = max(len(label) for _, _, label in GOAL_ROWS) + 2
    lines = ["goal".ljust(width) + "".join(f"{r.name:>17}" for r in runs)]
    for phase, op, label in GOAL_ROWS:
        cells = [label.ljust(width)]
        for r in runs:
            o = r.op(phase, op)
            value = None if o is None else (o.rps if phase == "announce" else o.p99_ms)
            if o is None or value is None:
                cells.append(f"{'-':>17}")
            else:
                text = f"{value:.0f}" if phase == "announce" else f"{value:.2f}"
                verdict = "ok" if goal_ratio(o)[1] else "NO"
                cells.append(f"{text} {verdict}".rjust(17))
        lines.append("".join(cells))
    return "\n".join(lines)


def summary(runs: list[StoreRun], args: argparse.Namespace, wall: float) -> dict[str, Any]:
    met: dict[str, dict[str, bool | None]] = {}
    for r in runs:
        met[r.name] = {}
        for phase, op, _ in GOAL_ROWS:
            o = r.op(phase, op)
            key = "announce_rps" if phase == "announce" else f"nodes_p99_ms_{phase}"
            met[r.name][key] = None if o is None else goal_ratio(o)[1]
    return {
        "benchmark": "tracker_load",
        "wall_seconds": round(wall, 1),
        "goals": GOALS,
        "goals_met": met,
        "dataset": {"nodes": args.nodes, "contents": args.contents, "holdings": args.nodes * 10},
        "settings": {
            "duration": args.duration,
            "warmup": args.warmup,
            "announce_conns": args.announce_conns,
            "nodes_conns": args.nodes_conns,
            "health_conns": args.health_conns,
            "mixed_announce_rate": args.mixed_announce_rate,
            "nodes_rate": args.nodes_rate,
            "loadgen_procs": args.loadgen_procs,
            "accounts": {"admin": ADMIN_USER, "agent": AGENT_USER},
            "tracker_args": args.tracker_arg,
            "tracker_root": args.tracker_root,
            "baseline": args.baseline,
            "cpus": psutil.cpu_count(),
        },
        "stores": {r.name: r.to_json() for r in runs},
    }


# -- command line ------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/tracker_load.py",
        description="Load benchmark of the tracker (announces and node lists) on SQLite and PostgreSQL.",
    )
    p.add_argument("--store", action="append", choices=STORES, help="only these stores (repeatable)")
    p.add_argument("--phase", action="append", choices=PHASES, help="only these phases (repeatable)")
    p.add_argument("--nodes", type=int, default=DEFAULT_NODES, help="nodes in the store (default 100000)")
    p.add_argument(
        "--contents", type=int, default=DEFAULT_CONTENTS, help="contents; each node holds 10 (default 1000)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per phase (default 10)")
    p.add_argument("--health-duration", type=float, default=5.0, help="seconds of the health phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring (default 2)")
    p.add_argument("--announce-conns", type=int, default=64, help="announce connections (default 64)")
    p.add_argument("--nodes-conns", type=int, default=16, help="node-list connections (default 16)")
    p.add_argument("--health-conns", type=int, default=32, help="health connections (default 32)")
    p.add_argument(
        "--mixed-announce-rate",
        type=float,
        help="announces/s in the mixed phase (default: nodes / 30 s interval)",
    )
    p.add_argument(
        "--nodes-rate",
        type=float,
        default=200.0,
        help="node lists/s in the lookup and mixed phases (default 200)",
    )
    p.add_argument("--loadgen-procs", type=int, default=1, help="load-generating processes (default 1)")
    p.add_argument(
        "--token", help="send Authorization: Bearer TOKEN with every request (default: log in as bench)"
    )
    p.add_argument(
        "--tracker-arg", action="append", default=[], help="extra argument for the tracker (repeatable)"
    )
    p.add_argument(
        "--baseline",
        metavar="REF",
        help="also run the tracker of git REF (e.g. the commit before the optimisations), each store"
        " just before this checkout's; adds the vs base column",
    )
    p.add_argument(
        "--tracker-root",
        metavar="DIR",
        help="run the tracker from this source tree (e.g. a baseline commit's `git archive`), not this checkout",
    )
    p.add_argument(
        "--pg-bin", help="directory of initdb and pg_ctl (default: newest /usr/lib/postgresql/*/bin)"
    )
    p.add_argument("--py-spy", metavar="DIR", help="record py-spy profiles (raw) of the tracker into DIR")
    p.add_argument("--quick", action="store_true", help="10 000 nodes, 100 contents, 4-second phases")
    p.add_argument("--workdir", help="where the databases and logs go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    return p


def export_baseline(ref: str, workdir: str) -> str:
    """C{git archive REF} of this repository, unpacked into C{workdir}; its path."""
    into = os.path.join(workdir, "baseline-src")
    os.makedirs(into)
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(
            f"--baseline {ref}: git archive failed: {archive.stderr.decode(errors='replace').strip()}"
        )
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    say(f"baseline: {ref} unpacked in {into}")
    return into


def run(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.nodes, args.contents, args.duration, args.health_duration = 10_000, 100, 4.0, 3.0
    if args.mixed_announce_rate is None:
        args.mixed_announce_rate = round(args.nodes / ANNOUNCE_INTERVAL)
    if args.py_spy:
        os.makedirs(args.py_spy, exist_ok=True)
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="meshstream-load-", dir=args.workdir)
    runs: list[StoreRun] = []
    try:
        baseline = export_baseline(args.baseline, workdir) if args.baseline else None
        for store in args.store or STORES:
            if baseline is not None:
                runs.append(run_store(store, args, workdir, baseline))
            runs.append(run_store(store, args, workdir))
    finally:
        if args.keep:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    phases = [p for r in runs for p in r.phases]
    print(table(phases, health_rps(runs), baseline_ops(runs)))
    print()
    print(goals_table(runs))
    for r in runs:
        if r.skipped:
            print(f"{r.name}: skipped: {r.skipped}")
        if r.error:
            print(f"{r.name}: error: {r.error}")
    print(json.dumps(summary(runs, args, time.monotonic() - start)))
    failed = any(r.error for r in runs) or any(p.error for p in phases)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run())
