"""The local control protocol between ``fqdnguard agent`` and ``fqdnguard proxy``.

HTTP/1.1 with JSON bodies over a Unix stream socket, one request per connection
(``Connection: close``). The socket is the owner's only: the file is 0600 inside a 0700
directory, and the server also checks the peer's uid (``SO_PEERCRED``: the server's own uid or
root). The agent *pushes*; the proxy never needs the agent to serve or enforce.

Routes served by the proxy (every body is JSON; errors are ``{"error": "...", ...}``)::

    GET  /v1/status   {"pid", "policy": {"digest", "source", "policies", "endpoints",
                       "loaded_at"}, "cache": {...}, "engine": {...}, "listen": [...]}
    PUT  /v1/policy   body {"sources": [[name, yaml text], ...], "endpoints": yaml text | null,
                      "allow_empty": false}
                      200 {"digest", "changed", "unrestricted": [ns/name, ...]}; 422 {"error",
                      "errors": [file:line: ...]} when the set does not compile, or has no file
                      or an empty one without allow_empty (the policy in force stays in force)
    GET  /v1/policy   the policy in force and the last reloads (``fqdnguard policy status``)
    POST /v1/save     writes the cache and the policy to the state directory now: 200
                      {"sequence"}; with {"successor": id} also a nonce, "handover", for
    POST /v1/sockets  the listening sockets (SCM_RIGHTS, :class:`WithFds`), to that caller only
    GET  /v1/cache    NDJSON, streamed (chunked transfer encoding): first {"now", "max_ttl",
                      "min_ttl", "entries"}, then one {"endpoint", "name", "ip", "expires_at"}
                      per line; ``?endpoint=ID&name=NAME`` filter it
    GET  /v1/stats    {"engine": {...}, "cache": {...}}

``digest`` is :func:`policy_digest` of what was pushed: the agent compares it with its own to
decide whether a push is needed (after either side restarted), so a resync is one GET when
nothing changed. Bodies are limited to ``MAX_BODY`` bytes; a request must arrive within
``READ_TIMEOUT`` seconds and its answer be taken within ``WRITE_TIMEOUT``; at most
``MAX_CONNECTIONS`` are open at once (see ``fqdnguard._http.ConnectionCap``). A handler may
answer a :class:`Stream` instead of a JSON body: its chunks are sent as they come
(``Transfer-Encoding: chunked``), each within ``WRITE_TIMEOUT``, so a listing of a million
entries is never built in memory; :func:`stream_sync` reads one line by line, and
:func:`request` / :func:`request_sync` return an NDJSON answer as the list of its objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fqdnguard._core import FqdnGuardError
from fqdnguard._http import MAX_HEADER, BadRequest, ConnectionCap, read_request, respond

__all__ = [
    "INSTANCE",
    "PEER",
    "ControlError",
    "ControlServer",
    "FdAnswer",
    "Handler",
    "Peer",
    "Stream",
    "WithFds",
    "atomic_write",
    "ensure_private_dir",
    "policy_digest",
    "request",
    "request_fds",
    "request_sync",
    "stream_sync",
]

log = logging.getLogger("fqdnguard.control")

#: This process's name in a shared directory (temporary files, journals, hand-over files):
#: not its pid, since two proxies sharing a state directory may run in pid namespaces of their
#: own and both be pid 1. A random number above the largest pid Linux gives (2**22) and below
#: 2**31, so a release that still reads such names as pids sees no live process behind them.
INSTANCE = secrets.randbelow(2**31 - 2**22 - 1) + 2**22 + 1

MAX_BODY = 64 * 1024 * 1024
READ_TIMEOUT = 10.0
#: Seconds a peer has to take an answer (the cache listing can be large).
WRITE_TIMEOUT = 30.0
#: Connections open at once; at the cap, the oldest one still sending its request is closed.
MAX_CONNECTIONS = 64

#: A route handler: the decoded JSON body (None without one; for a request without a body, the
#: query string's parameters as a dict, if any) -> (status, JSON-able body or a Stream).
Handler = Callable[[Any], Awaitable[tuple[int, Any]]]

NDJSON = "application/x-ndjson"


@dataclass
class Stream:
    """An answer sent as it is produced: each chunk (bytes, NDJSON lines) goes out as one chunk
    of a ``Transfer-Encoding: chunked`` body, after the previous one was taken by the peer."""

    chunks: AsyncIterator[bytes]
    content_type: str = NDJSON


@dataclass
class WithFds:
    """A JSON answer that also passes file descriptors to the peer (``SCM_RIGHTS``, with the
    answer's first byte): the hand-over of listening sockets in a hot restart. ``fds`` are
    the handler's own duplicates, taken when it answered (so a descriptor closed or reused
    meanwhile cannot be sent): the server closes them once sent; the peer gets its own
    (:func:`request_fds`).

    ``link``: after the answer the connection stays open and ``link(reader)`` is awaited with
    it; the peer writes on it (or closes it, e.g. by dying): the liveness link of a hot
    restart."""

    body: Any
    fds: list[int]
    link: Callable[[asyncio.StreamReader], Awaitable[None]] | None = None


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a control connection (``SO_PEERCRED``). ``pid`` is 0 when
    the peer runs in a pid namespace this process cannot see (another pod)."""

    pid: int
    uid: int
    gid: int


#: The peer of the request being handled (set per connection, read by handlers).
PEER: contextvars.ContextVar[Peer | None] = contextvars.ContextVar("PEER", default=None)


@dataclass
class FdAnswer:
    """What :func:`request_fds` got: the status, the JSON body, the descriptors received (now
    this process's to close), and with ``link=True`` the connection, still open."""

    status: int
    body: Any
    fds: list[int]
    link: socket.socket | None = None


#: The most descriptors one answer passes (the kernel's SCM_MAX_FD is 253).
MAX_FDS = 64


class ControlError(FqdnGuardError):
    """The control socket could not be used: not there, refused, or a bad answer."""


def policy_digest(sources: Sequence[Sequence[str]], endpoints: str | None) -> str:
    """A stable digest of a policy set as pushed (its file names and texts, and endpoints)."""
    canonical = json.dumps(
        {"sources": [list(s) for s in sources], "endpoints": endpoints},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


#: What fqdnguard itself puts in a state or control socket directory (a directory holding only
#: these, or nothing, may be tightened: it is fqdnguard's).
OWN_FILES = re.compile(
    r"(state\.json|state\.lock|cache\.snapshot|policy\.json|kubernetes\.json|"
    r"endpoint-ids\.json|control\.sock|journal\.[0-9]+\.[0-9]+|"
    r"cache\.handover\.[0-9]+\.[0-9a-z]+|\.[\w.-]+\.(tmp\.)?[0-9]+)"
)


def ensure_private_dir(path: str | os.PathLike[str], *, tighten: bool = False) -> Path:
    """Creates ``path`` (mode 0700) or checks an existing one: a real directory (not a
    symlink), owned by root or this user, that no other user can write to (``mode & 0o022 ==
    0``: nobody else can create, rename or remove a file in it, e.g. put another socket in the
    control socket's place; the socket itself is 0600 and the server checks the peer's uid).

    ``tighten``: a directory that others can write to is made 0700 instead of refused when it
    is this user's, has no sticky bit (``/tmp``-like directories are shared, never changed),
    and this call created it or it holds nothing but fqdnguard's files (a Kubernetes emptyDir
    is created 0777, empty); the mode it had is logged. The directory is opened with
    ``O_NOFOLLOW`` and changed through that descriptor, so a symlink is never followed."""
    p = Path(path)
    created = False
    if not p.exists() and not p.is_symlink():
        p.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = True
    try:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        what = "a symlink" if p.is_symlink() else "not a directory"
        raise ControlError(
            f"{p}: {what} ({e.strerror}); the control socket's directory must be a real directory"
        ) from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in (0, os.geteuid()):
            raise ControlError(
                f"{p}: owned by uid {st.st_uid}; the control socket's directory must be root's "
                "or this user's"
            )
        if not mode & 0o022:
            return p
        why = _why_not_tighten(p, st, created) if tighten else "not this process's to change"
        if why is not None:
            raise ControlError(
                f"{p}: mode {mode:04o} lets other users write in it ({why}); the control "
                f"socket's directory must not be writable by others (chmod go-w {p})"
            )
        os.fchmod(fd, 0o700)
        log.info("%s: mode %04o tightened to 0700 for the control socket", p, mode)
        return p
    finally:
        os.close(fd)


def _why_not_tighten(p: Path, st: os.stat_result, created: bool) -> str | None:
    if st.st_uid != os.geteuid():
        return "another user's"
    if st.st_mode & stat.S_ISVTX:
        return "a shared directory: sticky bit"
    if created:
        return None
    foreign = [e.name for e in os.scandir(p) if not OWN_FILES.fullmatch(e.name)]
    if foreign:
        return f"it holds files that are not fqdnguard's, e.g. {sorted(foreign)[0]!r}"
    return None


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` so a crash leaves the old file or the new one: a temporary
    file in the same directory, fsync, rename over ``path``, fsync of the directory."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp.{INSTANCE}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, p)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _peer(sock: socket.socket | None) -> Peer | None:
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid, uid, gid)


class ControlServer:
    """Serves ``routes`` ({(method, path): handler}) on a Unix socket at ``path``.

    The socket is created under a temporary name with mode 0600 and renamed over ``path``, so a
    proxy that takes over from another one (hot restart) replaces its socket without a moment
    where the path is missing; ``close`` removes the file only if it is still this server's.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        routes: dict[tuple[str, str], Handler],
        *,
        tighten: bool = False,
    ):
        self.path = Path(path)
        self.routes = routes
        #: Make the socket's directory private if it is this user's and open (see
        #: :func:`ensure_private_dir`).
        self.tighten = tighten
        self._server: asyncio.base_events.Server | None = None
        self._inode: int | None = None
        self.connections = ConnectionCap(MAX_CONNECTIONS)

    async def start(self) -> None:
        ensure_private_dir(self.path.parent, tighten=self.tighten)
        tmp = self.path.with_name(f".{self.path.name}.{INSTANCE}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, str(tmp))
        finally:
            os.umask(old)
        os.chmod(tmp, 0o600)
        self._inode = tmp.stat().st_ino
        os.replace(tmp, self.path)

    def superseded(self) -> bool:
        """True when another server has since taken ``path`` over (a hot restart)."""
        try:
            return self._inode is not None and self.path.stat().st_ino != self._inode
        except FileNotFoundError:
            return False

    async def retake(self) -> None:
        """Takes ``path`` back with a fresh socket renamed over it (a successor that had taken
        it over died before serving): the old listening socket, no longer reachable by the
        path, is closed; connections in progress finish."""
        old, self._server = self._server, None
        await self.start()
        if old is not None:
            old.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.connections.admit(writer):
            writer.transport.abort()
            return
        try:
            peer = _peer(writer.get_extra_info("socket"))
            PEER.set(peer)
            if peer is not None and peer.uid not in (0, os.geteuid()):
                await _respond(writer, 403, {"error": f"uid {peer.uid} may not use this socket"})
                return
            try:
                method, path, body = await asyncio.wait_for(_read_request(reader), READ_TIMEOUT)
            except BadRequest as e:
                await _respond(writer, e.status, {"error": str(e)})
                return
            finally:
                self.connections.request_read(writer)
            path, _, query = path.partition("?")
            if body is None and query:
                body = dict(parse_qsl(query))
            handler = self.routes.get((method, path))
            if handler is None:
                allowed = [m for m, p in self.routes if p == path]
                status = 405 if allowed else 404
                await _respond(writer, status, {"error": f"no route {method} {path}"})
                return
            try:
                status, result = await handler(body)
            except Exception as e:
                log.exception("control %s %s failed", method, path)
                status, result = 500, {"error": f"{type(e).__name__}: {e}"}
            if isinstance(result, Stream):
                await _respond_stream(writer, status, result)
            elif isinstance(result, WithFds):
                try:
                    await _respond_fds(writer, status, result)
                finally:
                    for fd in result.fds:
                        os.close(fd)
                if result.link is not None:
                    await result.link(reader)
            else:
                await _respond(writer, status, result)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connections.release(writer)
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, Any]:
    method, path, _headers, raw = await read_request(reader, MAX_BODY)
    if not raw:
        return method, path, None
    try:
        return method, path, json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not JSON: {e}") from None


async def _respond(writer: asyncio.StreamWriter, status: int, body: Any) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()
    await respond(writer, status, "application/json", payload, WRITE_TIMEOUT)


async def _respond_fds(writer: asyncio.StreamWriter, status: int, answer: WithFds) -> None:
    """The whole answer in one ``sendmsg`` carrying the descriptors, on a duplicate of the
    connection's socket (the transport has written nothing on it: one request, one answer)."""
    payload = json.dumps(answer.body, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    transport_socket = writer.get_extra_info("socket")
    if transport_socket is None:
        raise ConnectionError("no socket under the connection")
    await writer.drain()
    with socket.socket(fileno=os.dup(transport_socket.fileno())) as sock:
        sock.settimeout(WRITE_TIMEOUT)
        data = head + payload
        sent = socket.send_fds(sock, [data], answer.fds)
        if sent < len(data):
            sock.sendall(data[sent:])


async def _respond_stream(writer: asyncio.StreamWriter, status: int, stream: Stream) -> None:
    writer.write(
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {stream.content_type}"
        "\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
    )
    try:
        async for chunk in stream.chunks:
            if chunk:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
    except (TimeoutError, ConnectionError):
        raise
    except Exception:
        # The status line is out: end the connection without the last chunk, which tells the
        # reader the answer is incomplete.
        log.exception("streaming an answer failed")
        return
    writer.write(b"0\r\n\r\n")
    await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


def _encode(method: str, path: str, body: Any) -> bytes:
    payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: fqdnguard\r\nConnection: close\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    head += f"Content-Length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


def _head(head: bytes, where: str) -> tuple[int, dict[str, str]]:
    """The status and the (lower-cased) headers of an answer's head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ControlError(f"{where}: not an HTTP answer: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _dechunk(data: bytes, where: str) -> Iterator[bytes]:
    """The chunks of a complete chunked body; ControlError if it ends early."""
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        size_text = data[pos:end].split(b";")[0].strip() if end >= 0 else b""
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ControlError(f"{where}: the answer was cut short (bad chunk)") from None
        start = end + 2
        if size == 0:
            return
        if len(data) < start + size + 2:
            raise ControlError(f"{where}: the answer was cut short")
        yield data[start : start + size]
        pos = start + size + 2


def _json_lines(data: bytes, where: str) -> list[Any]:
    try:
        return [json.loads(line) for line in data.splitlines() if line]
    except ValueError as e:
        raise ControlError(f"{where}: answer line is not JSON: {e}") from None


def _decode(raw: bytes, where: str) -> tuple[int, Any]:
    head, sep, payload = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ControlError(f"{where}: not an HTTP answer: {head[:80]!r}")
    status, headers = _head(head, where)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        payload = b"".join(_dechunk(payload, where))
    if headers.get("content-type") == NDJSON:
        return status, _json_lines(payload, where)
    try:
        return status, json.loads(payload) if payload else None
    except ValueError as e:
        raise ControlError(f"{where}: answer body is not JSON: {e}") from None


async def request(
    path: str | os.PathLike[str], method: str, url: str, body: Any = None, timeout: float = 10.0
) -> tuple[int, Any]:
    """One request to the control socket at ``path``: (status, decoded JSON body). Raises
    :class:`ControlError` when the socket is missing, refuses, or answers nonsense."""
    where = os.fspath(path)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(where), timeout)
    except (OSError, TimeoutError) as e:
        raise ControlError(f"{where}: cannot connect: {e}") from None
    try:
        writer.write(_encode(method, url, body))
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, TimeoutError) as e:
        raise ControlError(f"{where}: {method} {url}: {e or type(e).__name__}") from None
    finally:
        writer.close()
    return _decode(raw, where)


def request_sync(
    path: str | os.PathLike[str], method: str, url: str, body: Any = None, timeout: float = 10.0
) -> tuple[int, Any]:
    """:func:`request` without an event loop (for the command line)."""
    where = os.fspath(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(where)
            s.sendall(_encode(method, url, body))
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError as e:
            raise ControlError(f"{where}: {method} {url}: {e}") from None
    return _decode(b"".join(chunks), where)


def request_fds(
    path: str | os.PathLike[str],
    method: str,
    url: str,
    body: Any = None,
    timeout: float = 10.0,
    *,
    link: bool = False,
) -> FdAnswer:
    """:func:`request_sync` to a route answering :class:`WithFds`, the whole of it within
    ``timeout``. The answer is read up to its ``Content-Length``; with ``link`` the connection
    is then left open and returned (the caller writes on it and closes it), else closed.
    Raises :class:`ControlError` like :func:`request_sync` (also when the descriptors were cut
    short, ``MSG_CTRUNC``), after closing any descriptor received."""
    where = os.fspath(path)
    deadline = time.monotonic() + timeout
    fds: list[int] = []
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:

        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no whole answer in time")
            return left

        s.settimeout(remaining())
        s.connect(where)
        s.settimeout(remaining())
        s.sendall(_encode(method, url, body))
        data = b""
        want: int | None = None
        while want is None or len(data) < want:
            s.settimeout(remaining())
            chunk, got, flags, _addr = socket.recv_fds(s, 65536, MAX_FDS)
            fds += got
            if flags & socket.MSG_CTRUNC:
                raise ControlError(f"{where}: {method} {url}: descriptors cut short (MSG_CTRUNC)")
            if not chunk:
                if want is None and data:
                    break  # an answer without Content-Length, ended by the peer
                raise ControlError(f"{where}: {method} {url}: the answer was cut short")
            data += chunk
            head, sep, _ = data.partition(b"\r\n\r\n")
            if want is None and sep:
                length = _head(head, where)[1].get("content-length", "")
                want = len(head) + 4 + int(length) if length.isdigit() else None
        status, answer = _decode(data, where)
    except (OSError, ControlError) as e:
        s.close()
        for fd in fds:
            os.close(fd)
        if isinstance(e, ControlError):
            raise
        raise ControlError(f"{where}: {method} {url}: {e or type(e).__name__}") from None
    if not link:
        s.close()
        return FdAnswer(status, answer, fds)
    s.settimeout(None)
    return FdAnswer(status, answer, fds, s)


def stream_sync(
    path: str | os.PathLike[str], method: str, url: str, timeout: float = 10.0
) -> Iterator[Any]:
    """One request whose answer is NDJSON: yields its objects as they arrive (for the command
    line, which prints as it reads). Raises :class:`ControlError` when the socket is missing,
    refuses, answers an error (its message), or the answer is cut short."""
    where = os.fspath(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(where)
            s.sendall(_encode(method, url, None))
            reader = s.makefile("rb")
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = reader.readline(MAX_HEADER)
                if not line:
                    raise ControlError(f"{where}: {method} {url}: no answer")
                head += line
            status, headers = _head(head[:-4], where)
            if status != 200 or headers.get("content-type") != NDJSON:
                status, body = _decode(head + reader.read(), where)
                raise ControlError(f"{where}: {method} {url}: {status}: {body}")
            chunked = headers.get("transfer-encoding", "").lower() == "chunked"
            pending = b""
            while True:
                if chunked:
                    size_line = reader.readline(64)
                    try:
                        size = int(size_line.split(b";")[0].strip(), 16)
                    except ValueError:
                        raise ControlError(f"{where}: the answer was cut short") from None
                    if size == 0:
                        break
                    chunk = reader.read(size + 2)
                    if len(chunk) != size + 2:
                        raise ControlError(f"{where}: the answer was cut short")
                    chunk = chunk[:-2]
                else:
                    chunk = reader.read(65536)
                    if not chunk:
                        break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                yield from _json_lines(b"\n".join(lines), where)
            yield from _json_lines(pending, where)
        except OSError as e:
            raise ControlError(f"{where}: {method} {url}: {e}") from None
