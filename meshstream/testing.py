"""
In-memory fakes of meshstream's interfaces, for tests here and elsewhere.

Each fake is driven by hand (C{release}, C{fail}, ...) and records what it
was asked, so a test can check both what a caller got and how it asked.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from meshstream.errors import UnknownContent
from meshstream.interfaces import IStreamProvider, IStreamSource

# --------------------------------------------------------------------------
# Stream source and provider (the local stream server's seams)


class UnreadyRead(AssertionError):
    """A caller read bytes of a block that had not been released."""


@implementer(IStreamSource)
class FakeStreamSource:
    """
    An L{IStreamSource} over bytes held in memory, whose blocks become ready
    only when the test says so.

    @ivar released: the blocks made ready with L{release}.
    @ivar waits: every block passed to L{wait_for_block}, in order.
    @ivar cancelled: the blocks whose pending wait was cancelled, in order.
    @ivar reads: every C{(offset, length)} passed to L{read}, in order.
    @ivar failure: the exception given to L{fail}, if any.
    """

    def __init__(
        self,
        content_id: str,
        data: bytes,
        block_size: int,
        mime_type: str = "application/octet-stream",
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.content_id = content_id
        self.data = data
        self.block_size = block_size
        self.mime_type = mime_type
        self.released: set[int] = set()
        self.waits: list[int] = []
        self.cancelled: list[int] = []
        self.reads: list[tuple[int, int]] = []
        self.failure: BaseException | None = None
        self._pending: dict[int, list[Deferred[None]]] = {}

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def block_count(self) -> int:
        return -(-self.size // self.block_size)

    @property
    def pending(self) -> list[int]:
        """The blocks someone is waiting for right now, sorted."""
        return sorted(block for block, waits in self._pending.items() if waits)

    def _check_block(self, block: int) -> None:
        if not 0 <= block < self.block_count:
            raise IndexError(f"no block {block} in {self.block_count} blocks")

    # IStreamSource

    def wait_for_block(self, block: int) -> Deferred[None]:
        self.waits.append(block)
        try:
            self._check_block(block)
        except IndexError as e:
            return fail(e)
        if block in self.released:
            return succeed(None)
        if self.failure is not None:
            return fail(self.failure)

        def cancel(d: Deferred[None]) -> None:
            self._pending[block].remove(d)
            self.cancelled.append(block)

        waiting: Deferred[None] = Deferred(cancel)
        self._pending.setdefault(block, []).append(waiting)
        return waiting

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"read({offset}, {length}) outside {self.size} bytes")
        if length > self.block_size:
            raise AssertionError(f"read({offset}, {length}) is more than one block")
        if length:
            first = offset // self.block_size
            last = (offset + length - 1) // self.block_size
            for block in range(first, last + 1):
                if block not in self.released:
                    raise UnreadyRead(f"read({offset}, {length}) of unreleased block {block}")
        self.reads.append((offset, length))
        return self.data[offset : offset + length]

    # driving it

    def release(self, block: int) -> None:
        """Make C{block} ready and fire the waits for it."""
        self._check_block(block)
        self.released.add(block)
        for waiting in self._pending.pop(block, []):
            waiting.callback(None)

    def release_all(self) -> None:
        """Make every block ready."""
        for block in range(self.block_count):
            self.release(block)

    def fail(self, exc: BaseException) -> None:
        """
        The content cannot be completed: fail every pending wait, and every
        later wait for a block not yet released, with C{exc}.
        """
        self.failure = exc
        pending, self._pending = self._pending, {}
        for waits in pending.values():
            for waiting in waits:
                waiting.errback(exc)


@implementer(IStreamProvider)
class FakeStreamProvider:
    """
    An L{IStreamProvider} over a fixed set of sources.

    @ivar errors: content ids whose C{open} fails with the given exception.
    @ivar opened: every content id passed to L{open}, in order.
    """

    def __init__(
        self,
        sources: dict[str, IStreamSource],
        errors: dict[str, BaseException] | None = None,
    ) -> None:
        self.sources = sources
        self.errors: dict[str, BaseException] = dict(errors or {})
        self.opened: list[str] = []

    def open(self, content_id: str) -> Deferred[IStreamSource]:
        self.opened.append(content_id)
        if content_id in self.errors:
            return fail(self.errors[content_id])
        source = self.sources.get(content_id)
        if source is None:
            return fail(UnknownContent(content_id))
        return succeed(source)
