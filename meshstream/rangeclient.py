# -*- test-case-name: tests.test_rangeclient -*-
"""
A lean HTTP/1.1 client for Range requests to plain C{http://} sources.

C{meshstream fetch} from fast mirrors is bound by the CPU of its reactor
thread (bench/RESULTS.md).  Through L{twisted.web.client.Agent} a 1 MiB body
costs a C{bytes} object per read, a copy into the body buffer, a trip
through the line parser per read, and a handful of Deferreds per request.
This client does one thing: it sends C{GET} with a C{Range} header on
keep-alive connections (one per host unless answers lag, see
L{CONNECTIONS_PER_HOST}; requests may be pipelined) and reads each body
with C{recv_into} straight into a reusable buffer of exactly the size asked
(L{BufferPool}).  Only the response head goes through an intermediate
buffer.

Every connection is a non-blocking socket registered with the reactor as
an L{IReadDescriptor} / L{IWriteDescriptor} (L{IReactorFDSet}), the
documented way of giving the reactor a file descriptor of one's own.
C{https://} sources keep L{meshstream.sources.fetch_range} (Agent and TLS).

What a source answers is checked before a byte is handed over, as strictly
as L{meshstream.sources.fetch_range} does:

  - status 206 with a C{Content-Range} of exactly the bytes asked, or 200
    when the whole content was asked;
  - a C{Content-Length} equal to the bytes asked (no chunked or
    close-delimited bodies); never more bytes than asked are read for a
    response, so a source that sends more corrupts the next response head,
    which fails that request;
  - a timeout per request (from the call, as C{Deferred.addTimeout} did);
  - connection errors and bad answers fail with L{SourceError}; the
    connection is then closed and the requests pipelined behind the failed
    one are sent again on a fresh connection, once.  A request nothing was
    received for when a server closes a keep-alive connection is retried
    the same way.

Verifying the bytes against the manifest is the caller's job, as for peers.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import re
import socket
import struct
import termios
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IReadDescriptor,
    IResolutionReceiver,
    IWriteDescriptor,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meshstream.errors import SourceError

HTTP_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
#: Connections per (host, port): at most this many.  It starts with one,
#: and opens another only while requests wait and answers keep finding the
#: connection empty-handed: when a response head is read and less than
#: L{AHEAD_BYTES} of its body (or the whole body) is already there, the
#: server (or the path to it) is what we wait for, and another connection
#: hides that wait.  When the body is always there before we look, we are
#: what the bytes wait for, and one connection serves the blocks one after
#: the other so that they complete in order: on loopback, six connections
#: per mirror took 1.46 s at best and 2.08 s in the median where one took
#: 1.34 s and 1.60 s (bench/RESULTS.md).  "The rule" is an EWMA (weight 0.2)
#: over 0.5: about four late heads in a row.
CONNECTIONS_PER_HOST = 6
AHEAD_BYTES = 128 * 1024
#: Answers on a new connection that do not count: TCP is still opening its
#: window, so their bodies lag whatever the server's speed.
WARM_UP = 2
#: Requests outstanding per connection.  Pipelining (over 1) is off by
#: default: twisted.web's static.File (Twisted 26.10) stops in the middle of
#: the second of two pipelined answers when the first was a multiple of
#: 64 KiB long, and more connections hide round trips as well.
PIPELINE_DEPTH = 1
#: Bytes read at once while a response head is awaited; what follows the
#: head in them is copied into the body buffer.
HEAD_READ = 16 * 1024
#: The longest response head accepted.
MAX_HEAD = 64 * 1024
#: Reads per readiness event before other sockets get their turn.
READS_PER_EVENT = 8

_CONTENT_RANGE = re.compile(rb"^bytes (\d+)-(\d+)/(\d+|\*)$")
_STATUS = re.compile(rb"^HTTP/1\.([01]) (\d{3})(?: .*)?$")


class BufferPool:
    """
    Body buffers for reuse, by size.

    A fresh 1 MiB C{bytearray} is zero-filled and page-faulted in for every
    block (0.5 s of the reactor thread per GiB, bench/RESULTS.md); a
    recycled one costs nothing.  Buffers come back through L{give} once
    their user is done with them (after the verified bytes were written);
    one never given back is simply garbage-collected.  Not thread-safe: take
    and give on the reactor thread.
    """

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._free: dict[int, list[bytearray]] = {}

    def take(self, size: int) -> bytearray | memoryview:
        """A buffer of exactly C{size} bytes (its contents are garbage)."""
        free = self._free.get(size)
        return free.pop() if free else bytearray(size)

    def give(self, data: bytearray | memoryview | bytes) -> None:
        """Take back a buffer from L{take} (or a memoryview of one): its user must hold no view of it."""
        buf = data.obj if isinstance(data, memoryview) else data
        if not isinstance(buf, bytearray):
            return
        free = self._free.setdefault(len(buf), [])
        if len(free) < self.keep and not any(b is buf for b in free):
            free.append(buf)


class _Target:
    """A parsed C{http://} URL: where to connect and what to send."""

    __slots__ = ("host", "port", "request_head", "url")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http:// URL: {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
        netloc = parts.netloc.rpartition("@")[2]
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        #: Everything but the Range header and the blank line.
        self.request_head = (
            f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\nAccept-Encoding: identity\r\n".encode("ascii")
        )


class _Request:
    """One Range request, from the call to its answer."""

    __slots__ = (
        "buf",
        "buffers",
        "conn",
        "deferred",
        "done",
        "first",
        "got",
        "head",
        "last",
        "retried",
        "target",
        "timer",
        "view",
        "want",
    )

    def __init__(self, target: _Target, first: int, last: int, buffers: BufferPool) -> None:
        self.target = target
        self.first = first
        self.last = last
        self.want = last - first + 1
        self.buffers = buffers
        self.buf = buf = buffers.take(self.want)
        # The very object handed over is the one given back (see ArenaBuffers).
        self.view = buf if isinstance(buf, memoryview) else memoryview(buf)
        self.got = -1  # -1: no head yet; then body bytes received
        self.conn: _Connection | None = None
        self.retried = False
        self.done = False
        self.timer: IDelayedCall | None = None
        self.deferred: Deferred[memoryview] = Deferred(self._cancel)
        self.head = target.request_head + b"Range: bytes=%d-%d\r\n\r\n" % (first, last)

    def _cancel(self, d: Deferred[memoryview]) -> None:
        # The Deferred fails with CancelledError by itself; only clean up.
        self.done = True
        self._stop_timer()
        if self.conn is not None:
            self.conn.abort(self, None)

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def succeed(self) -> None:
        if self.done:
            return
        self.done = True
        self._stop_timer()
        self.deferred.callback(self.view)

    def fail(self, exc: Exception) -> None:
        if self.done:
            return
        self.done = True
        self._stop_timer()
        self.deferred.errback(Failure(exc))
        # Nobody saw this buffer and its connection is gone: reuse it.
        self.buffers.give(self.view)


def check_head(head: bytes, url: str, first: int, last: int) -> tuple[bool, bool]:
    """
    Check a response head (status line and headers, without the blank line)
    against a request for bytes C{first}..C{last}.

    @return: C{(informational, keep_alive)}: an informational (1xx) head is
        to be skipped; otherwise the body is exactly C{last - first + 1}
        bytes and C{keep_alive} says whether the connection may carry more.
    @raise SourceError: the answer is not the bytes asked for.
    """
    lines = head.split(b"\r\n")
    m = _STATUS.match(lines[0])
    if m is None:
        raise SourceError(f"{url} sent no HTTP status line: {lines[0][:80]!r}")
    minor, code = m.group(1), int(m.group(2))
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise SourceError(f"{url} sent a malformed header line: {line[:80]!r}")
        headers.setdefault(name.lower(), []).append(value.strip())
    if 100 <= code < 200 and code != 101:
        return True, True
    want = last - first + 1
    if code == 206:
        cr = headers.get(b"content-range", [b""])
        m = _CONTENT_RANGE.match(cr[0]) if len(cr) == 1 else None
        if m is None or int(m.group(1)) != first or int(m.group(2)) != last:
            raise SourceError(f"{url} answered range {b', '.join(cr)!r} for bytes {first}-{last}")
    elif code != 200 or first != 0:
        raise SourceError(f"{url} answered HTTP {code} to a range request")
    if b"transfer-encoding" in headers:
        raise SourceError(f"{url} sent a {b', '.join(headers[b'transfer-encoding'])!r} body, not a plain one")
    lengths = set(headers.get(b"content-length", []))
    if len(lengths) != 1:
        raise SourceError(f"{url} sent no single Content-Length")
    length = lengths.pop()
    if not length.isdigit() or int(length) != want:
        raise SourceError(f"{url} sent a body of {length.decode('latin-1')} bytes, {want} asked")
    tokens = {t.strip().lower() for v in headers.get(b"connection", []) for t in v.split(b",")}
    keep_alive = b"close" not in tokens and (minor == b"1" or b"keep-alive" in tokens)
    return False, keep_alive


@implementer(IResolutionReceiver)
class _Resolution:
    """Collects the addresses of one name resolution (IReactorPluggableNameResolver)."""

    def __init__(self, done: Deferred[list[tuple[int, tuple[Any, ...]]]]) -> None:
        self.done = done
        self.addresses: list[tuple[int, tuple[Any, ...]]] = []

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        family = socket.AF_INET6 if isinstance(address, IPv6Address) else socket.AF_INET
        self.addresses.append((family, (address.host, address.port)))

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


def _open_socket(family: int, address: tuple[Any, ...]) -> socket.socket:
    """A non-blocking TCP socket, its connection under way."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            raise OSError(err, errno.errorcode.get(err, str(err)))
    except BaseException:
        sock.close()
        raise
    return sock


def _queued(sock: socket.socket) -> int:
    """Bytes received on C{sock} and not read yet (0 where the system cannot tell)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


#: open_socket(family, address) -> a non-blocking socket connecting there.
SocketOpener = Callable[[int, tuple[Any, ...]], socket.socket]


class RangeClient:
    """
    Range requests to C{http://} URLs on keep-alive connections.

    @param reactor: an L{IReactorFDSet} (and L{IReactorPluggableNameResolver}
        for host names that are not IP addresses).
    @param clock: times requests and connection attempts (default: C{reactor}).
    @param connections: the most connections per (host, port).
    @param start_connections: connections per (host, port) to begin with;
        more are opened as round trips show (see L{CONNECTIONS_PER_HOST}).
    @param depth: requests pipelined per connection.
    @param open_socket: makes the sockets (tests give one end of a socket pair).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime | None = None,
        timeout: float = HTTP_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        connections: int = CONNECTIONS_PER_HOST,
        depth: int = PIPELINE_DEPTH,
        buffers: BufferPool | None = None,
        open_socket: SocketOpener = _open_socket,
        start_connections: int = 1,
    ) -> None:
        if connections < 1 or depth < 1 or not 1 <= start_connections <= connections:
            raise ValueError("connections and depth are at least 1, start_connections 1 to connections")
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.connections = connections
        self.start_connections = start_connections
        self.depth = depth
        self.buffers = buffers if buffers is not None else BufferPool()
        self.open_socket = open_socket
        self._targets: dict[str, _Target] = {}
        self._hosts: dict[tuple[str, int], _Host] = {}

    def fetch(self, url: str, first: int, last: int) -> Deferred[memoryview]:
        """
        Bytes C{first}..C{last} (inclusive) of C{url}: a view of a buffer of
        exactly that many bytes, which the caller may hand back with
        L{release} once done with it.
        """
        target = self._targets.get(url)
        if target is None:
            try:
                target = self._targets[url] = _Target(url)
            except ValueError as e:
                d: Deferred[memoryview] = Deferred()
                d.errback(Failure(SourceError(str(e))))
                return d
        if first < 0 or last < first:
            raise ValueError(f"bad range {first}-{last}")
        req = _Request(target, first, last, self.buffers)
        req.timer = self.clock.callLater(self.timeout, self._timed_out, req)
        key = (target.host, target.port)
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host(self, target.host, target.port)
        host.submit(req)
        return req.deferred

    def release(self, data: memoryview | bytes) -> None:
        """Give back the buffer behind a body from L{fetch}: no view of it may be used afterwards."""
        self.buffers.give(data)

    def close(self) -> None:
        """Close every connection; requests still outstanding fail."""
        hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            host.close()

    def _timed_out(self, req: _Request) -> None:
        req.timer = None
        exc = SourceError(
            f"{req.target.url} timed out after {self.timeout:g}s (bytes {req.first}-{req.last})"
        )
        if req.conn is not None:
            req.conn.abort(req, exc)
        else:
            host = self._hosts.get((req.target.host, req.target.port))
            if host is not None and req in host.pending:
                host.pending.remove(req)
            req.fail(exc)


class _Host:
    """The connections to one (host, port) and the requests waiting for one of them."""

    def __init__(self, client: RangeClient, host: str, port: int) -> None:
        self.client = client
        self.host = host
        self.port = port
        self.pending: deque[_Request] = deque()
        self.conns: list[_Connection] = []
        self.addresses: list[tuple[int, tuple[Any, ...]]] | None = None
        self._resolving = False
        self.closed = False
        #: Connections allowed now, and how often (an EWMA of 0 or 1) an
        #: answer's head came with little of its body behind it.
        self.limit = client.start_connections
        self.late = 0.0
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            self.addresses = [(family, (host, port))]

    def submit(self, req: _Request, front: bool = False) -> None:
        req.conn = None
        if front:
            self.pending.appendleft(req)
        else:
            self.pending.append(req)
        self.dispatch()

    def dispatch(self) -> None:
        """Put waiting requests on connections: spread over up to C{connections}, then pipelined."""
        client = self.client
        while self.pending and not self.closed:
            best: _Connection | None = None
            for c in self.conns:
                if (
                    c.usable
                    and len(c.queue) < client.depth
                    and (best is None or len(c.queue) < len(best.queue))
                ):
                    best = c
            if (best is None or best.queue) and len(self.conns) < self.limit:
                if self.addresses is None:
                    self._resolve()
                else:
                    best = self._connect() or best
            if best is None or not self.pending:
                return
            req = self.pending.popleft()
            if not req.done:
                best.send(req)

    def head_read(self, late: bool) -> None:
        """
        A response head was read, C{late} if little of its body was there
        yet: open another connection once that is the rule and requests wait.
        """
        self.late = 0.8 * self.late + (0.2 if late else 0.0)
        if self.late > 0.5 and self.pending and self.limit < self.client.connections:
            self.limit += 1
            self.late = 0.0

    def _connect(self) -> _Connection | None:
        assert self.addresses is not None
        family, address = self.addresses[0]
        try:
            sock = self.client.open_socket(family, address)
        except OSError as e:
            self.fail_pending(SourceError(f"cannot connect to {self.host}:{self.port}: {e}"))
            return None
        conn = _Connection(self, sock)
        self.conns.append(conn)
        return conn

    def _resolve(self) -> None:
        if self._resolving:
            return
        self._resolving = True
        d: Deferred[list[tuple[int, tuple[Any, ...]]]] = Deferred()
        self.client.reactor.nameResolver.resolveHostName(_Resolution(d), self.host, self.port)

        def resolved(addresses: list[tuple[int, tuple[Any, ...]]]) -> None:
            self._resolving = False
            if not addresses:
                self.fail_pending(SourceError(f"cannot resolve {self.host}"))
                return
            self.addresses = addresses
            self.dispatch()

        d.addCallback(resolved)

    def fail_pending(self, exc: Exception) -> None:
        pending, self.pending = self.pending, deque()
        for req in pending:
            req.fail(exc)

    def lost(self, conn: _Connection, requests: list[_Request], exc: Exception | None) -> None:
        """
        A connection is gone with these requests unanswered (in order): the
        one being answered failed already; retry the others once.
        """
        if conn in self.conns:
            self.conns.remove(conn)
        again = []
        for req in requests:
            if req.done:
                continue
            if conn.connect_failed:
                req.fail(SourceError(f"cannot connect to {self.host}:{self.port}: {exc}"))
            elif not conn.connected and not self.closed:
                again.append(req)  # never sent: no retry spent
            elif req.retried or self.closed:
                req.fail(SourceError(f"{req.target.url}: connection lost before an answer ({exc})"))
            else:
                req.retried = True
                again.append(req)
        for req in reversed(again):
            self.pending.appendleft(req)
        self.dispatch()

    def close(self) -> None:
        self.closed = True
        for conn in list(self.conns):
            conn.abort(None, SourceError("the range client was closed"))
        self.fail_pending(SourceError("the range client was closed"))


@implementer(IReadDescriptor, IWriteDescriptor)
class _Connection:
    """One keep-alive connection carrying Range requests (pipelined if C{depth} allows), answered in order."""

    def __init__(self, host: _Host, sock: socket.socket) -> None:
        self.host = host
        self.client = host.client
        self.reactor = host.client.reactor
        self.sock = sock
        self._fd = sock.fileno()
        #: Requests sent (or to send), oldest first: answers come in this order.
        self.queue: deque[_Request] = deque()
        self._out = bytearray()
        #: Received bytes not consumed yet (only while a head is awaited).
        self._pending = bytearray()
        #: The request whose body is being read.
        self._body: _Request | None = None
        self.connected = False
        self.connect_failed = False
        self.answers = 0
        #: False once no more requests may be sent (the server said close, or we are closing).
        self.usable = True
        self.closed = False
        self._writing = True
        self.reactor.addWriter(self)
        self._connect_timer: IDelayedCall | None = self.client.clock.callLater(
            self.client.connect_timeout, self._connect_timed_out
        )

    # -- IFileDescriptor ---------------------------------------------------

    def fileno(self) -> int:
        return -1 if self.closed else self._fd

    def logPrefix(self) -> str:
        return "RangeConnection"

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw the socket hang up or doRead/doWrite raised."""
        exc = reason.value if isinstance(reason.value, Exception) else None
        if not self.connected and not self.closed:
            self.connect_failed = True
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                exc = OSError(err, errno.errorcode.get(err, str(err)))
        self._lose(exc)

    # -- sending -----------------------------------------------------------

    def send(self, req: _Request) -> None:
        req.conn = self
        self.queue.append(req)
        self._out += req.head
        if self.connected:
            self._flush()

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._lose(e)
            return
        del self._out[:sent]
        if self._out and not self._writing:
            self._writing = True
            self.reactor.addWriter(self)
        elif not self._out and self._writing:
            self._writing = False
            self.reactor.removeWriter(self)

    def doWrite(self) -> None:
        if self.closed:
            return
        if not self.connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.connect_failed = True
                self._lose(OSError(err, errno.errorcode.get(err, str(err))))
                return
            self.connected = True
            if self._connect_timer is not None and self._connect_timer.active():
                self._connect_timer.cancel()
            self._connect_timer = None
            self.reactor.addReader(self)
        self._flush()

    def _connect_timed_out(self) -> None:
        self._connect_timer = None
        if not self.connected:
            self.connect_failed = True
            self._lose(OSError(errno.ETIMEDOUT, f"no connection in {self.client.connect_timeout:g}s"))

    # -- receiving ---------------------------------------------------------

    def doRead(self) -> None:
        sock = self.sock
        for _ in range(READS_PER_EVENT):
            if self.closed:
                return
            req = self._body
            try:
                if req is not None:
                    room = req.want - req.got
                    n = sock.recv_into(req.view[req.got :], room)
                    if n == 0:
                        self._lose(None)
                        return
                    req.got += n
                    if req.got < req.want:
                        if n < room:
                            return  # drained: wait for more
                        continue
                    self._body = None
                    self._answered(req)
                    continue
                chunk = sock.recv(HEAD_READ)
            except BlockingIOError:
                return
            except OSError as e:
                self._lose(e)
                return
            if not chunk:
                self._lose(None)
                return
            self._pending += chunk
            if not self._consume() or len(chunk) < HEAD_READ:
                return

    def _consume(self) -> bool:
        """Parse heads and fill bodies from the received bytes; False if the connection closed."""
        pending = self._pending
        while pending and not self.closed:
            if not self.queue:
                self.host.client.log.warn(
                    "{host}:{port} sent {n} bytes nothing was asked for",
                    host=self.host.host,
                    port=self.host.port,
                    n=len(pending),
                )
                self._lose(None)
                return False
            req = self.queue[0]
            if self._body is None:
                end = pending.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
                if end < 0:
                    if len(pending) > MAX_HEAD:
                        self.abort(
                            req, SourceError(f"{req.target.url} sent a response head over {MAX_HEAD} bytes")
                        )
                        return False
                    return True
                head = bytes(pending[:end])
                del pending[: end + 4]
                try:
                    informational, keep_alive = check_head(head, req.target.url, req.first, req.last)
                except SourceError as e:
                    self.abort(req, e)
                    return False
                if informational:
                    continue
                if not keep_alive:
                    self.usable = False
                self.answers += 1
                if self.answers > WARM_UP:
                    self.host.head_read(len(pending) + _queued(self.sock) < min(req.want, AHEAD_BYTES))
                req.got = 0
                self._body = req
            n = min(len(pending), req.want - req.got)
            with memoryview(pending) as mv:
                req.view[req.got : req.got + n] = mv[:n]
            del pending[:n]
            req.got += n
            if req.got < req.want:
                return True
            self._body = None
            self._answered(req)
        return not self.closed

    def _answered(self, req: _Request) -> None:
        """A whole body is in: hand it over, then keep the connection going."""
        self.queue.popleft()
        req.conn = None
        req.succeed()
        if not self.usable and not self.closed:
            # The server closes after this answer: what is queued goes elsewhere.
            self._pending.clear()
            self._lose(None)
        elif not self.closed:
            self.host.dispatch()

    # -- closing -----------------------------------------------------------

    def abort(self, req: _Request | None, exc: Exception | None) -> None:
        """Fail C{req} (when given) and close; the other requests are retried elsewhere."""
        self.usable = False  # what the failure's callbacks ask goes elsewhere
        if req is not None and exc is not None:
            req.fail(exc)
        self._lose(exc)

    def _lose(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.usable = False
        if self._connect_timer is not None and self._connect_timer.active():
            self._connect_timer.cancel()
        self._connect_timer = None
        self.reactor.removeReader(self)
        self.reactor.removeWriter(self)
        self.sock.close()
        requests, self.queue = list(self.queue), deque()
        # The request being answered (head or some body bytes in) is the server's fault.
        if requests and (self._body is not None or self._pending):
            req = requests.pop(0)
            got = max(req.got, 0)
            reason = f": {exc}" if exc is not None else ""
            req.fail(SourceError(f"{req.target.url} sent {got} of {req.want} bytes, then closed{reason}"))
        self._body = None
        self._pending = bytearray()
        self.host.lost(self, requests, exc if exc is not None else ConnectionError("closed by the server"))
