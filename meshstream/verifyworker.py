# -*- test-case-name: tests.test_verifier -*-
"""
The helper process of L{meshstream.verifier}: standard library only, run as
a script (C{python -I -S verifyworker.py SLOT_SIZE SLOTS}) so that it starts
in milliseconds and never imports Twisted.

File descriptors: 0 commands, 1 answers, 2 errors, 3 the shared block arena
(C{SLOTS} slots of C{SLOT_SIZE} bytes), 4 the output file.

Each command asks to check one block held in an arena slot against its
root and, if it matches, to write it at an offset of the output file; the
answer carries the block's leaves.  Commands are answered in order.

    command  <IIQI32s   slot, length, file offset, sub block size, root
    answer   <BI        status, n; then n bytes:
                        0 no match (n = 0), 1 written (n / 32 leaves),
                        2 failed (n bytes of error message)
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import sys

COMMAND = struct.Struct("<IIQI32s")
ANSWER = struct.Struct("<BI")
ARENA_FD = 3
OUTPUT_FD = 4
NO_MATCH, WRITTEN, WRITE_FAILED = 0, 1, 2


def read_exactly(fd: int, n: int) -> bytes | None:
    """C{n} bytes from C{fd}, or None at the end of input."""
    parts = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def check_and_write(arena: memoryview, slot_size: int, command: bytes, output_fd: int = OUTPUT_FD) -> bytes:
    """Carry out one command: the answer to send."""
    slot, length, offset, sub, root = COMMAND.unpack(command)
    if (slot + 1) * slot_size > len(arena) or not 0 < length <= slot_size or sub <= 0:
        message = f"bad command: slot {slot}, length {length}, sub block size {sub}".encode()
        return ANSWER.pack(WRITE_FAILED, len(message)) + message
    data = arena[slot * slot_size : slot * slot_size + length]
    sha256 = hashlib.sha256
    leaves = b"".join([sha256(data[i : i + sub]).digest() for i in range(0, length, sub)])
    if sha256(leaves).digest() != root:
        return ANSWER.pack(NO_MATCH, 0)
    try:
        write_all(output_fd, data, offset)
    except OSError as e:
        message = str(e).encode("utf-8", "replace")
        return ANSWER.pack(WRITE_FAILED, len(message)) + message
    return ANSWER.pack(WRITTEN, len(leaves)) + leaves


def main(argv: list[str]) -> int:
    slot_size, slots = int(argv[1]), int(argv[2])
    arena = memoryview(mmap.mmap(ARENA_FD, slot_size * slots))
    while True:
        command = read_exactly(0, COMMAND.size)
        if command is None:
            return 0
        write_all(1, check_and_write(arena, slot_size, command))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
