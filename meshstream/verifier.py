# -*- test-case-name: tests.test_verifier -*-
"""
Whole blocks from HTTP sources checked against their roots and written to
the output file by helper processes, for C{meshstream fetch} from fast
mirrors.

Why processes: hashing (hashlib) and writing (C{os.pwrite}) release the
GIL, but a block is 16 of them, and each time a worker thread takes the GIL
back it queues behind the reactor thread, which holds it for all its
Python work.  On the 1 GiB benchmark the worker threads spent about three
times the CPU the hashing and writing need, and the reactor thread stalled
behind them (bench/RESULTS.md).  A helper process has its own interpreter.

How, without copying a byte: the range client receives a whole block
straight into a slot of a shared memory arena (L{ArenaBuffers}, a memfd);
a helper (L{meshstream.verifyworker}, standard library only) hashes the
slot's sub blocks, checks them against the block's root from the manifest
and, only if they match, writes the block to the output file with one
pwrite.  So C{OUT.part} still receives verified bytes only.  The reactor
thread writes a 52-byte command to a pipe and reads the leaves back.

Linux only (C{os.memfd_create}).  Blocks that are not in the arena (a short
last block, or when every slot is taken) are left to the caller, who checks
them in worker threads as before.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshstream import verifyworker as W
from meshstream.agent.store import StoreError
from meshstream.errors import CheckDeclined
from meshstream.rangeclient import BufferPool

#: The most memory the arena may take (its pages are only used once written).
MAX_ARENA = 256 * 1024 * 1024


def available() -> bool:
    """Whether helper processes can be used here."""
    return hasattr(os, "memfd_create")


class ArenaBuffers(BufferPool):
    """
    Body buffers of one size from the shared arena (others as usual).

    A buffer is a memoryview of one slot; it is known by identity, so its
    user must hand back that very object (as L{RangeClient.fetch} returns
    it and the session recycles it).
    """

    def __init__(self, arena: memoryview, slot_size: int, slots: int) -> None:
        super().__init__()
        self.arena = arena
        self.slot_size = slot_size
        self._free_slots = list(range(slots - 1, -1, -1))
        self._taken: dict[int, tuple[int, memoryview]] = {}

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def take(self, size: int) -> bytearray | memoryview:
        if size == self.slot_size and self._free_slots:
            slot = self._free_slots.pop()
            view = self.arena[slot * size : (slot + 1) * size]
            self._taken[id(view)] = (slot, view)
            return view
        return super().take(size)

    def slot(self, data: object) -> int | None:
        """The slot C{data} is, if it is one."""
        entry = self._taken.get(id(data))
        return entry[0] if entry is not None and entry[1] is data else None

    def give(self, data: bytearray | memoryview | bytes) -> None:
        entry = self._taken.get(id(data))
        if entry is not None and entry[1] is data:
            del self._taken[id(data)]
            self._free_slots.append(entry[0])
            return
        super().give(data)


class BlockVerifier:
    """
    Helper processes checking and writing whole blocks held in the arena.

    @param output_fd: the file verified blocks are written to (each at the
        offset given with it).
    @param slot_size: the block size; C{slots} blocks fit in the arena.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        output_fd: int,
        slot_size: int,
        slots: int,
        processes: int = 2,
        executable: str = sys.executable,
    ) -> None:
        if not available():
            raise OSError("helper processes need os.memfd_create (Linux)")
        if slots < 1 or processes < 1:
            raise ValueError("at least one slot and one process")
        fd = os.memfd_create("meshstream-blocks", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, slot_size * slots)
            self._mmap = mmap.mmap(fd, slot_size * slots)
            self.buffers = ArenaBuffers(memoryview(self._mmap), slot_size, slots)
            args = [executable, "-I", "-S", W.__file__, str(slot_size), str(slots)]
            self._workers = []
            for _ in range(processes):
                worker = _Worker()
                reactor.spawnProcess(
                    worker,
                    executable,
                    args,
                    env=dict(os.environ),
                    childFDs={0: "w", 1: "r", 2: 2, W.ARENA_FD: fd, W.OUTPUT_FD: output_fd},
                )
                self._workers.append(worker)
        finally:
            os.close(fd)

    def check(
        self, data: bytes | memoryview, offset: int, sub_size: int, root: bytes
    ) -> Deferred[list[bytes] | None] | None:
        """
        Check C{data} (a buffer from L{buffers}) against C{root}, then write
        it at C{offset}: a Deferred of its leaves, or of None if it does not
        match; it fails with L{StoreError} if the write failed.  None (no
        Deferred) when C{data} is not in the arena or no helper is left, and
        a failure with L{CheckDeclined} if its helper died before answering:
        either way the caller does the job itself.
        """
        slot = self.buffers.slot(data)
        live = [w for w in self._workers if w.alive]
        if slot is None or not live:
            return None
        worker = min(live, key=lambda w: len(w.waiting))
        return worker.send(W.COMMAND.pack(slot, len(data), offset, sub_size, root))

    def stop(self) -> Deferred[None]:
        """Let the helpers finish what they were given and exit."""
        for w in self._workers:
            if w.alive and w.transport is not None:
                w.transport.closeStdin()
        d = gatherResults([w.ended for w in self._workers])
        return d.addCallback(lambda _: None)


class _Worker(ProcessProtocol):
    """One helper process: commands out, answers in, in order."""

    def __init__(self) -> None:
        self.waiting: deque[Deferred[list[bytes] | None]] = deque()
        self.alive = True
        self.ended: Deferred[None] = Deferred()
        self._buf = bytearray()

    def send(self, command: bytes) -> Deferred[list[bytes] | None]:
        d: Deferred[list[bytes] | None] = Deferred()
        self.waiting.append(d)
        assert self.transport is not None
        self.transport.write(command)
        return d

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._buf += data
        buf = self._buf
        size = W.ANSWER.size
        while len(buf) >= size:
            status, n = W.ANSWER.unpack_from(buf)
            if len(buf) < size + n:
                return
            payload = bytes(buf[size : size + n])
            del buf[: size + n]
            if not self.waiting:
                BlockVerifier.log.error("A verifier process answered nothing asked")
                continue
            d = self.waiting.popleft()
            if status == W.WRITTEN:
                d.callback([payload[i : i + 32] for i in range(0, n, 32)])
            elif status == W.NO_MATCH:
                d.callback(None)
            else:
                d.errback(Failure(StoreError(payload.decode("utf-8", "replace"))))

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        waiting, self.waiting = self.waiting, deque()
        if waiting:
            BlockVerifier.log.warn(
                "A verifier process ended with {n} blocks to check: {why}",
                n=len(waiting),
                why=reason.getErrorMessage(),
            )
        for d in waiting:
            d.errback(Failure(CheckDeclined(f"a verifier process ended: {reason.getErrorMessage()}")))
        self.ended.callback(None)
