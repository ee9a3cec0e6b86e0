"""
The load generator of C{bench/tracker_load.py}, run as its own process.

C{python bench/_loadgen.py SPEC.json} reads a spec (below), drives the
tracker at C{host:port} over keep-alive HTTP/1.1 and prints one JSON object:
per workload the requests completed in the measurement window, errors and
where it wrote the latencies (an C{array("d")} of seconds, native order).

It is a plain C{selectors} (epoll) loop over non-blocking sockets, no HTTP
library: a request is one C{send} of bytes built from a template, a
response is found by C{Content-Length}.  Each connection has at most one
request in flight (no pipelining: twisted.web answers a connection's
requests one after the other anyway, and a real agent waits for its answer).
That costs about 20-30 µs of CPU per request here, a fraction of what the
tracker spends, and it reports its own CPU time so the caller can say so.

Two kinds of workload, any number of each in one process:

  - closed loop (C{"rate": null}): C{conns} connections, each sending its
    next request as soon as the previous answer is in: the tracker's
    throughput at that concurrency;
  - open loop (C{"rate": R}): requests due every 1/R seconds, sent on an
    idle one of C{conns} connections (or queued here until one is idle);
    latency counts from when a request was due, so a slow tracker cannot
    hide its queue behind the generator's (no coordinated omission).

Spec keys: C{host}, C{port}, C{warmup} and C{duration} (seconds), C{token}
(None or a bearer token: sent as C{Authorization: Bearer ...}), C{seed},
C{nodes} (how many node ids exist), C{contents} (the content ids, in fill
order), C{out} (a path prefix for the latency files) and C{workloads}, each
C{{"op": "announce" | "nodes" | "health", "conns": N, "rate": R or null}}.

The dataset is the one L{holdings} describes, shared with the fill.
"""

from __future__ import annotations

import errno
import json
import os
import random
import selectors
import socket
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

#: Contents per node and nodes per content group (see L{holdings}).
CONTENTS_PER_NODE = 10

#: One response in this many per workload is parsed and checked.
CHECK_EVERY = 64

#: Open loop: stop queueing (count as "overflow") past this many seconds of backlog.
MAX_BACKLOG_SECONDS = 2.0


def groups_for(n_contents: int) -> int:
    return max(1, n_contents // CONTENTS_PER_NODE)


def holdings(node: int, n_contents: int) -> range:
    """
    The indexes of the contents node number C{node} holds: group
    C{node mod G} of G = C{n_contents / 10} groups of 10 contents.  With
    100 000 nodes and 1 000 contents every node holds 10 contents and every
    content is held by 1 000 nodes.
    """
    g = node % groups_for(n_contents)
    return range(g * CONTENTS_PER_NODE, min(n_contents, (g + 1) * CONTENTS_PER_NODE))


def node_id(node: int) -> str:
    return f"node-{node:06d}"


def node_address(node: int) -> str:
    return f"10.{(node >> 16) & 255}.{(node >> 8) & 255}.{node & 255}:7000"


def node_state(rng: random.Random) -> dict[str, int]:
    """A plausible announce state; one node in ten reports no upload figures."""
    state = {"connections": rng.randrange(0, 64), "cpu": 0, "memory": 0}
    if rng.random() >= 0.1:
        capacity = rng.randrange(1_000_000, 100_000_000)
        state["upload_capacity_bps"] = capacity
        state["upload_bps"] = rng.randrange(0, capacity)
    return state


# -- requests -----------------------------------------------------------------


class Requests:
    """Builds request bytes for each operation, cheaply (templates, pre-encoded lists)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        host = f"{spec['host']}:{spec['port']}"
        self.rng = random.Random(spec.get("seed", 1))
        self.n_nodes: int = spec["nodes"]
        self.contents: list[str] = spec["contents"]
        n = len(self.contents)
        auth = f"Authorization: Bearer {spec['token']}\r\n" if spec.get("token") else ""
        self._head_get = "GET {path} HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "\r\n"
        self._head_post = (
            "POST {path} HTTP/1.1\r\nHost: "
            + host
            + "\r\n"
            + auth
            + "Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
        self._lists = [json.dumps([self.contents[i] for i in holdings(g, n)]) for g in range(groups_for(n))]
        self._health = self._head_get.format(path="/api/v1/health").encode()
        self._nodes = [
            self._head_get.format(path=f"/api/v1/contents/{c}/nodes?limit=50").encode() for c in self.contents
        ]

    def make(self, op: str) -> bytes:
        if op == "announce":
            rng = self.rng
            node = rng.randrange(self.n_nodes)
            body = (
                f'{{"node_id": "{node_id(node)}", "address": "{node_address(node)}",'
                f' "contents": {self._lists[node % len(self._lists)]},'
                f' "state": {json.dumps(node_state(rng))}}}'
            ).encode()
            head = self._head_post.format(path="/api/v1/announce", length=len(body)).encode()
            return head + body
        if op == "nodes":
            return self._nodes[self.rng.randrange(len(self._nodes))]
        if op == "health":
            return self._health
        raise ValueError(f"unknown op {op!r}")


def check_body(op: str, body: bytes) -> bool:
    """Is a 200 answer what the dataset says it should be?"""
    try:
        obj = json.loads(body)
    except ValueError:
        return False
    if op == "announce":
        return bool(obj.get("unknown") == [] and obj.get("interval"))
    if op == "nodes":
        nodes = obj.get("nodes")
        return isinstance(nodes, list) and len(nodes) == 50
    return bool(obj.get("status") == "ok")


# -- the loop -----------------------------------------------------------------


class Workload:
    def __init__(self, index: int, op: str, conns: int, rate: float | None) -> None:
        self.index = index
        self.op = op
        self.conns = conns
        self.rate = rate
        self.latencies = array("d")
        self.completed = 0
        self.errors: dict[str, int] = {}
        self.bad_bodies = 0
        self.checked = 0
        self.overflow = 0
        self.backlog_max = 0
        self.queue: deque[float] = deque()  # open loop: due times waiting for a connection
        self.idle: list[Conn] = []
        self.next_due = 0.0
        self.seen = 0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class Conn:
    __slots__ = ("buf", "sock", "started", "workload")

    def __init__(self, sock: socket.socket, workload: Workload) -> None:
        self.sock = sock
        self.workload = workload
        self.buf = b""
        self.started = 0.0  # when the request in flight was due (open) or sent (closed)


def connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def run(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["host"], int(spec["port"])
    warmup, duration = float(spec["warmup"]), float(spec["duration"])
    requests = Requests(spec)
    sel = selectors.DefaultSelector()
    workloads = [
        Workload(i, w["op"], int(w["conns"]), w.get("rate")) for i, w in enumerate(spec["workloads"])
    ]
    clock = time.perf_counter
    start = clock()
    measure_from = start + warmup
    end = measure_from + duration
    measuring = False
    cpu0 = os.times()

    def send(conn: Conn, started: float) -> None:
        conn.started = started
        data = requests.make(conn.workload.op)
        try:
            sent = conn.sock.send(data)
        except OSError as e:
            fail(conn, f"send: {errno.errorcode.get(e.errno or 0, e)}")
            return
        if sent != len(data):  # never for requests this small on loopback
            conn.sock.setblocking(True)
            conn.sock.sendall(data[sent:])
            conn.sock.setblocking(False)

    def fail(conn: Conn, what: str) -> None:
        w = conn.workload
        if measuring:
            w.error(what)
        sel.unregister(conn.sock)
        conn.sock.close()
        fresh = Conn(connect(host, port), w)
        sel.register(fresh.sock, selectors.EVENT_READ, fresh)
        next_request(fresh)

    def next_request(conn: Conn) -> None:
        w = conn.workload
        if w.rate is None:
            send(conn, clock())
        elif w.queue:
            send(conn, w.queue.popleft())
        else:
            w.idle.append(conn)

    def answered(conn: Conn, status: int, body: bytes, now: float) -> None:
        w = conn.workload
        if measuring and now <= end:
            if status == 200:
                w.completed += 1
                w.latencies.append(now - conn.started)
                w.seen += 1
                if w.seen % CHECK_EVERY == 0:
                    w.checked += 1
                    if not check_body(w.op, body):
                        w.bad_bodies += 1
            else:
                w.error(str(status))
        next_request(conn)

    for w in workloads:
        for _ in range(w.conns):
            conn = Conn(connect(host, port), w)
            sel.register(conn.sock, selectors.EVENT_READ, conn)
            w.idle.append(conn)
        if w.rate is None:
            idle, w.idle = w.idle, []
            for conn in idle:
                send(conn, clock())
        else:
            w.next_due = clock()
    open_loops = [w for w in workloads if w.rate is not None]

    on_read: Callable[[Conn], None]

    def read(conn: Conn) -> None:
        try:
            data = conn.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as e:
            fail(conn, f"recv: {errno.errorcode.get(e.errno or 0, e)}")
            return
        if not data:
            fail(conn, "closed")
            return
        buf = conn.buf + data if conn.buf else data
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                break
            head = buf[:head_end]
            i = head.lower().find(b"\r\ncontent-length:")
            if i < 0:
                fail(conn, "no content-length")
                return
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17 : j if j >= 0 else len(head)])
            total = head_end + 4 + length
            if len(buf) < total:
                break
            status = int(head[9:12])
            body = buf[head_end + 4 : total]
            buf = buf[total:]
            conn.buf = buf
            answered(conn, status, body, clock())
            if buf:  # nothing is pipelined: extra bytes mean a confused stream
                fail(conn, "extra bytes")
                return
            return
        conn.buf = buf

    on_read = read

    while True:
        now = clock()
        if not measuring and now >= measure_from:
            measuring = True
            cpu0 = os.times()
        if now >= end:
            break
        timeout = end - now
        for w in open_loops:
            assert w.rate is not None
            step = 1.0 / w.rate
            while w.next_due <= now:
                if len(w.queue) > w.rate * MAX_BACKLOG_SECONDS:
                    if measuring:
                        w.overflow += 1
                elif w.idle:
                    send(w.idle.pop(), w.next_due)
                else:
                    w.queue.append(w.next_due)
                w.next_due += step
            if measuring:
                w.backlog_max = max(w.backlog_max, len(w.queue))
            timeout = min(timeout, w.next_due - now)
        for key, _events in sel.select(max(0.0, timeout)):
            on_read(key.data)
    cpu1 = os.times()
    out = spec["out"]
    result: dict[str, Any] = {
        "cpu_seconds": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 3),
        "window_seconds": duration,
        "workloads": [],
    }
    for w in workloads:
        path = f"{out}.w{w.index}.lat"
        with open(path, "wb") as f:
            w.latencies.tofile(f)
        result["workloads"].append(
            {
                "op": w.op,
                "conns": w.conns,
                "rate": w.rate,
                "completed": w.completed,
                "errors": w.errors,
                "checked": w.checked,
                "bad_bodies": w.bad_bodies,
                "overflow": w.overflow,
                "backlog_max": w.backlog_max,
                "latency_file": path,
            }
        )
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return result


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    print(json.dumps(run(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
