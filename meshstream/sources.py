# -*- test-case-name: tests.test_sources -*-
"""
HTTP sources: plain Range requests to any server that supports them (the
origin, a mirror, nginx, twisted.web), through treq.

The answer is checked before it is used: a 206 whose Content-Range matches
what was asked (or a 200 when the whole content was asked), no more bytes
than asked, within a timeout.  Verification against the manifest is the
caller's job, as for peers.
"""

from __future__ import annotations

import re
from typing import Any

import treq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from meshstream.errors import MeshstreamError

HTTP_TIMEOUT = 30.0
_CONTENT_RANGE = re.compile(rb"^bytes (\d+)-(\d+)/(\d+|\*)$")


class SourceError(MeshstreamError):
    """An HTTP source answered with something other than the bytes asked for."""


def fetch_range(
    url: str,
    first: int,
    last: int,
    clock: IReactorTime,
    http: Any = None,
    timeout: float = HTTP_TIMEOUT,
) -> Deferred[bytes]:
    """Fetch bytes C{first}..C{last} (inclusive) of C{url}."""
    client = http if http is not None else treq
    want = last - first + 1
    d: Deferred[Any] = client.get(url, headers={b"Range": f"bytes={first}-{last}".encode()})

    def check(response: Any) -> Deferred[bytes]:
        code = response.code
        if code == 206:
            cr = response.headers.getRawHeaders(b"content-range", [b""])[0]
            m = _CONTENT_RANGE.match(cr)
            if not m or int(m.group(1)) != first or int(m.group(2)) != last:
                raise SourceError(f"{url} answered range {cr!r} for bytes {first}-{last}")
        elif code != 200 or first != 0:
            raise SourceError(f"{url} answered HTTP {code} to a range request")
        length = response.length
        if isinstance(length, int) and length > want and code == 206:
            raise SourceError(f"{url} sent {length} bytes for a {want}-byte range")
        body: Deferred[bytes] = treq.content(response)
        return body

    def size(data: bytes) -> bytes:
        if len(data) != want:
            raise SourceError(f"{url} sent {len(data)} bytes, {want} expected")
        return data

    d.addCallback(check)
    d.addCallback(size)
    d.addTimeout(timeout, clock)
    return d
