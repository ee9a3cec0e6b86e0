"""
The contracts at meshstream's seams.

Each is small on purpose: the pure cores (codec, scheduler, ranking) do not
need them; the shells (agent session, stream server, tracker API) meet each
other only through them, and L{meshstream.testing} ships in-memory fakes.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IStreamSource(Interface):
    """One content as the local stream server sees it."""

    content_id = Attribute("The content id (hex str).")
    size = Attribute("Total size in bytes (int).")
    block_size = Attribute("Block size in bytes (int).")
    mime_type = Attribute("The MIME type to announce (str).")

    def wait_for_block(block: int) -> object:
        """
        Return a Deferred that fires with None once C{block} is verified and
        readable, or fails if the content cannot be completed.  Cancelling the
        Deferred only stops the wait, never the download.
        """

    def read(offset: int, length: int) -> bytes:
        """
        Return C{length} plain bytes at C{offset}; only for bytes inside blocks
        whose wait has fired.  Bounded work: callers read at most one block at a
        time.
        """


class IStreamProvider(Interface):
    """Finds (and starts downloading, if need be) a content by id."""

    def open(content_id: str) -> object:
        """
        Return a Deferred firing with an L{IStreamSource}, or failing with
        L{meshstream.errors.UnknownContent} when no such content exists.
        """


class IContentStore(Interface):
    """Where verified sub blocks live (a seed file or the scrambled cache)."""

    def has(content_id: str, block: int, sub: int) -> bool:
        """Whether that sub block is held and verified."""

    def read(content_id: str, block: int, sub: int) -> bytes:
        """The plain bytes of a held sub block."""

    def leaves(content_id: str, block: int) -> list[bytes] | None:
        """The leaf hash list of a held block, or None."""
