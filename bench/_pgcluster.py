"""
A throwaway PostgreSQL cluster for the benchmarks, started as .ci/run does.

C{initdb} (trust authentication, UTF-8, no sync) into a temporary directory,
C{pg_ctl start} listening on 127.0.0.1 only with C{fsync=off} and
C{full_page_writes=off} (a benchmark's database is thrown away; SQLite in WAL
mode with C{synchronous=NORMAL} does not sync at commit either), then
C{createdb}.  PostgreSQL refuses to run as root: as root the cluster belongs
to Debian's C{postgres} user and every command runs through C{runuser}.
L{Cluster.stop} stops it (C{-m immediate}) and removes the directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile


class ClusterError(Exception):
    """The cluster could not be started."""


def find_bin(explicit: str | None = None) -> str | None:
    """The directory holding C{initdb} and C{pg_ctl}, or None."""
    candidates = [explicit] if explicit else []
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) for x in p.split("/")[-2].split(".") if x.isdigit()],
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    for c in candidates:
        if (
            c
            and os.access(os.path.join(c, "initdb"), os.X_OK)
            and os.access(os.path.join(c, "pg_ctl"), os.X_OK)
        ):
            return c
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A running throwaway cluster; C{url} names its database."""

    def __init__(
        self, bin_dir: str, parent: str | None = None, settings: dict[str, str] | None = None
    ) -> None:
        self.bin_dir = bin_dir
        self.root = os.geteuid() == 0
        self.dir = tempfile.mkdtemp(prefix="meshstream-pg.", dir=parent)
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "log")
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/bench"
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "fsync": "off",
            "full_page_writes": "off",
            **(settings or {}),
        }
        self.started = False
        if self.root:
            shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        cmd = [os.path.join(self.bin_dir, argv[0]), *argv[1:]]
        if self.root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(
            cmd, cwd=self.dir, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
        )

    def start(self) -> None:
        r = self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        if r.returncode != 0:
            raise ClusterError(f"initdb failed: {r.stderr.strip()[-500:]}")
        options = f"-p {self.port} -k {self.dir} " + " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        r = self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", options, "start")
        if r.returncode != 0:
            tail = ""
            if os.path.exists(self.log):
                with open(self.log) as f:
                    tail = f.read()[-1000:]
            raise ClusterError(f"pg_ctl start failed: {r.stderr.strip()[-500:]} {tail}")
        self.started = True
        r = self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "bench")
        if r.returncode != 0:
            raise ClusterError(f"createdb failed: {r.stderr.strip()[-500:]}")

    def postmaster_pid(self) -> int | None:
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.started:
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)
