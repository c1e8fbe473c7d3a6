"""What the metrics endpoint and the control socket share: HTTP/1.x served on the event loop.

A request must arrive whole within a deadline, an answer must be taken by the peer within one,
and a cap bounds the connections open at once. Idle connections cannot hold that cap against a
real client: when it is reached, the connection that has waited longest without finishing its
request is closed to make room (see :class:`ConnectionCap`). No thread per connection.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from http import HTTPStatus

__all__ = ["BadRequest", "ConnectionCap", "read_request", "respond"]

MAX_HEADER = 16 * 1024


class BadRequest(Exception):
    """A request that cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ConnectionCap:
    """At most ``limit`` connections open at once.

    When a new connection comes at the cap, the oldest connection still sending its request is
    closed to make room; only when every open connection is being answered is the new one
    refused. Relying on the read timeout alone would let anyone who keeps ``limit`` idle
    connections open (opening them again as they time out) lock a real client out for as long
    as they like. With eviction, a client that sends its request at once (a scraper, the
    agent) is closed only if ``limit`` connections arrive in the moment before its request is
    read; the read timeout still frees what idles below the cap.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"connection limit {limit} must be at least 1")
        self.limit = limit
        self._open: set[asyncio.StreamWriter] = set()
        #: Connections whose request is not read yet, oldest first.
        self._reading: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, writer: asyncio.StreamWriter) -> bool:
        """Takes ``writer``'s connection in, making room if need be; False: refused."""
        if len(self._open) >= self.limit:
            if not self._reading:
                self.refused += 1
                return False
            oldest, _ = self._reading.popitem(last=False)
            self._open.discard(oldest)
            self.evicted += 1
            oldest.transport.abort()  # its reader sees the end of the stream
        self._open.add(writer)
        self._reading[writer] = None
        return True

    def request_read(self, writer: asyncio.StreamWriter) -> None:
        """The request is in: the connection is being answered and is not closed for room."""
        self._reading.pop(writer, None)

    def release(self, writer: asyncio.StreamWriter) -> None:
        self._reading.pop(writer, None)
        self._open.discard(writer)

    def abort_all(self) -> None:
        """Closes every connection at once (the server is stopping)."""
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()
        self._reading.clear()


async def read_request(
    reader: asyncio.StreamReader, max_body: int
) -> tuple[str, str, dict[str, str], bytes]:
    """One HTTP/1.x request: (method, target, headers with lower-case names, body). Raises
    :class:`BadRequest` naming what is wrong; the caller bounds the time it may take."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise BadRequest("request header too large", 431) from None
    if len(head) > MAX_HEADER:
        raise BadRequest("request header too large", 431)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"not an HTTP/1.x request line: {lines[0][:80]!r}")
    method, target = parts[0], parts[1]
    headers = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest(f"malformed header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise BadRequest(f"Content-Length {length_text!r} is not a number")
    length = int(length_text)
    if length > max_body:
        raise BadRequest(f"body of {length} bytes is over the limit of {max_body}", 413)
    body = await reader.readexactly(length) if length else b""
    return method, target, headers, body


async def respond(
    writer: asyncio.StreamWriter,
    status: int,
    content_type: str,
    body: bytes,
    timeout: float,
) -> None:
    """Writes one answer and closes after it (``Connection: close``); a peer that does not
    take it within ``timeout`` seconds raises TimeoutError (the caller closes)."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Status"
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await asyncio.wait_for(writer.drain(), timeout)
