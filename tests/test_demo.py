"""The README's first command: ``meshstream demo`` runs real twistd daemons and verifies the stream."""

from __future__ import annotations

import os
import sys

import psutil
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest


def demo_processes() -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "meshstream-demo-" in cmdline and "twistd" in cmdline:
            found.append(cmdline)
    return found


class DemoTests(unittest.TestCase):
    timeout = 120

    def test_demo_streams_and_cleans_up(self) -> Deferred[None]:
        return ensureDeferred(self._demo())

    async def _demo(self) -> None:
        before = demo_processes()
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "meshstream.cli", "demo", "--size", "6M", "--rates", "1M,2M,4M", "--kill-at", "0.5"],
            env=os.environ,
        )
        text = out.decode()
        self.assertEqual(code, 0, text + err.decode())
        self.assertIn("OK: the stream is byte-identical to the file", text)
        lines = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  seed-")}
        self.assertEqual(set(lines), {"seed-1", "seed-2", "seed-3"})
        total = next(line for line in text.splitlines() if line.strip().startswith("total")).split()
        self.assertEqual(int(total[1]), 6 * 1024 * 1024)
        self.assertIn("stopped at 50%", lines["seed-3"][-3] + " " + " ".join(lines["seed-3"][-2:]))
        self.assertEqual(demo_processes(), before, "the demo left daemons running")
