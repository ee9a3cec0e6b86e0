# -*- test-case-name: tests.test_tracker_catalog -*-
"""
The content catalogue (the seed's "meta information database", claim 35):
what of a manifest the tracker indexes for listing and search, as pure
functions.

A manifest's C{meta} object is whatever its publisher wrote; the tracker
copies into its C{contents} table only the values that pass the checks here
(a string title of at most L{MAX_TITLE} characters, a C{type/subtype} MIME
type, a finite duration, an integer bitrate, ...).  A value that does not
pass is simply not indexed: the manifest itself is accepted and served
unchanged.

Search is a case-insensitive substring match on the title and the name.
Both sides are folded here, in Python (L{fold}: NFKC, case fold, NFKC), and
the database only runs C{LIKE} with an explicit escape character on the
folded text, so SQLite and PostgreSQL match exactly the same rows (SQLite's
own C{LOWER} and C{LIKE} fold ASCII only; PostgreSQL's depend on the
database's locale).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from attrs import frozen

MAX_TITLE = 256
MAX_MIME = 127
MAX_DURATION = 1e9  # seconds: about 31 years
MAX_BITRATE = 10**12  # bits per second
MAX_QUERY = 256

#: The C{LIKE} escape character of every catalogue pattern.
LIKE_ESCAPE = "!"

# RFC 6838 restricted names, lower case (MIME types compare case-insensitively).
_MIME_NAME = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
MIME_RE = re.compile(rf"{_MIME_NAME}/{_MIME_NAME}\Z")
MIME_PREFIX_RE = re.compile(r"[a-z0-9!#$&^_.+/-]{1,127}\Z")

#: Separates the folded title from the folded name in the search key; a
#: query may not contain it, so no match straddles the two.
_KEY_SEPARATOR = "\n"


def _unsafe(ch: str) -> bool:
    """Control characters and lone surrogates (which neither database stores)."""
    return unicodedata.category(ch) in ("Cc", "Cs")


def clean_text(value: object, limit: int) -> str | None:
    """
    C{value} stripped, if it is a string of 1 to C{limit} characters without
    control characters or lone surrogates; None otherwise.
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not 0 < len(text) <= limit or any(_unsafe(ch) for ch in text):
        return None
    return text


def safe_name(name: str) -> str:
    """A manifest name with its control characters and lone surrogates replaced by U+FFFD."""
    return "".join("\ufffd" if _unsafe(ch) else ch for ch in name)


def clean_mime(value: object) -> str | None:
    """C{type/subtype} in lower case (parameters dropped), or None."""
    if not isinstance(value, str) or len(value) > 1024:
        return None
    essence = value.partition(";")[0].strip().lower()
    return essence if MIME_RE.match(essence) else None


def clean_duration(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    duration = float(value)
    return duration if math.isfinite(duration) and 0 <= duration <= MAX_DURATION else None


def clean_bitrate(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        return None
    return value if 0 < value <= MAX_BITRATE else None


def fold(text: str) -> str:
    """
    The caseless form both the search key and the query are compared in.

    NFKC before the case fold too: compatibility characters such as
    U+210C (black-letter H) normalise to upper-case ASCII, which SQLite's
    C{LIKE} would then match caselessly and PostgreSQL's would not.
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def search_key(title: str | None, name: str) -> str:
    return fold(title or "") + _KEY_SEPARATOR + fold(name)


def like_escape(text: str) -> str:
    """C{text} with C{LIKE}'s wildcards (and the escape character) taken literally."""
    e = LIKE_ESCAPE
    return text.replace(e, e + e).replace("%", e + "%").replace("_", e + "_")


def contains_pattern(query: str) -> str:
    """The C{LIKE} pattern for a substring search of C{query} in a search key."""
    return "%" + like_escape(fold(query)) + "%"


def prefix_pattern(prefix: str) -> str:
    """The C{LIKE} pattern for MIME types starting with C{prefix}."""
    return like_escape(prefix.lower()) + "%"


def valid_query(text: str) -> bool:
    return 0 < len(text) <= MAX_QUERY and not any(_unsafe(ch) for ch in text)


@frozen
class ContentEntry:
    """A content's row in the catalogue, as extracted from its manifest."""

    content_id: str
    name: str
    size: int
    title: str | None = None
    mime_type: str | None = None
    duration: float | None = None
    bitrate: int | None = None

    @property
    def search_key(self) -> str:
        return search_key(self.title, self.name)


def entry_for(content_id: str, name: str, size: int, meta: Mapping[str, Any]) -> ContentEntry:
    """Index what can be indexed of a manifest's name, size and C{meta}."""
    return ContentEntry(
        content_id=content_id,
        name=safe_name(name),
        size=size,
        title=clean_text(meta.get("title"), MAX_TITLE),
        mime_type=clean_mime(meta.get("mime_type")),
        duration=clean_duration(meta.get("duration")),
        bitrate=clean_bitrate(meta.get("bitrate")),
    )


def entry_from_document(content_id: str, doc: object) -> ContentEntry | None:
    """
    The entry of a stored manifest's decoded JSON (for manifests registered
    before the catalogue existed); None if it is not a manifest document.
    """
    if not isinstance(doc, dict):
        return None
    info = doc.get("info")
    size = info.get("size") if isinstance(info, dict) else None
    name, meta = doc.get("name", ""), doc.get("meta", {})
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return None
    if not isinstance(name, str) or not isinstance(meta, dict):
        return None
    return entry_for(content_id, name, size, meta)


@frozen
class ContentInfo:
    """A content as the catalogue lists it: its entry, when it was registered, and its live holders."""

    content_id: str
    name: str
    size: int
    title: str | None
    mime_type: str | None
    duration: float | None
    bitrate: int | None
    created: float
    nodes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "content_id": self.content_id,
            "title": self.title,
            "name": self.name,
            "mime_type": self.mime_type,
            "size": self.size,
            "duration": self.duration,
            "bitrate": self.bitrate,
            "created": self.created,
            "nodes": self.nodes,
        }

    @classmethod
    def from_dict(cls, doc: object) -> ContentInfo:
        """Parse one entry of a tracker answer; ValueError if it is malformed."""
        if not isinstance(doc, dict):
            raise ValueError("a content entry is an object")

        def get(key: str, kinds: tuple[type, ...], optional: bool = False) -> Any:
            value = doc.get(key)
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"content entry field {key!r} is malformed")
            return value

        duration = get("duration", (int, float), optional=True)
        return cls(
            content_id=get("content_id", (str,)),
            name=get("name", (str,)),
            size=get("size", (int,)),
            title=get("title", (str,), optional=True),
            mime_type=get("mime_type", (str,), optional=True),
            duration=None if duration is None else float(duration),
            bitrate=get("bitrate", (int,), optional=True),
            created=float(get("created", (int, float))),
            nodes=get("nodes", (int,)),
        )


def _row_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _row_int(value: Any) -> int | None:
    return None if value is None else int(value)


def info_from_row(row: tuple[Any, ...]) -> ContentInfo:
    """A L{ContentInfo} from C{(content_id, title, name, mime_type, size, duration, bitrate, created, nodes)}."""
    content_id, title, name, mime_type, size, duration, bitrate, created, nodes = row
    return ContentInfo(
        content_id=str(content_id),
        name=str(name),
        size=int(size),
        title=None if title is None else str(title),
        mime_type=None if mime_type is None else str(mime_type),
        duration=_row_float(duration),
        bitrate=_row_int(bitrate),
        created=float(created),
        nodes=int(nodes),
    )
