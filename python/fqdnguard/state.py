"""The state directory: its format version, who may write it, and the journal of learning.

What a proxy keeps across restarts (see docs/state.md)::

    state.json            the manifest: format version, sequence number, last writer
    state.lock            taken (flock) by a writer while it checks and writes
    cache.snapshot        the cache (``DnsCache.save``; its own binary format and version)
    policy.json           ``fqdnguard proxy``: the last good policy as pushed (its own format)
    journal.<id>.<n>      what was learned since the last save, one file per process and save
                          (``<id>``: the writer's instance id, ``control.INSTANCE``)
    cache.handover.*      a superseded proxy's cache in a hot restart (daemons.proxy)

**Versions.** The manifest carries ``[major, minor]``. A proxy reads a state of its own major
or an older one (a directory without a manifest is major 0, the layout before manifests, and is
read as it always was), and a newer minor of its own major (files and fields it does not know
are left alone). It refuses a newer major: it logs why, reads nothing of it, writes nothing
over it (the release that wrote it may be rolled forward again), and starts fail closed (no
policy: every query refused until an agent pushes one; no learned addresses).

**Sequence.** Every write of the state (a save, or a process claiming the directory at start)
increments the manifest's sequence. A process may write only while the manifest still holds
the sequence it wrote last: once a newer process has claimed the directory (a hot restart),
a save of the older one is refused (:class:`StaleWriter`) instead of overwriting newer state.

**Journal.** Between saves, each batch of changes the backend applied is appended to this
process's journal before the answers it held are released, as ``(endpoint, name, ip,
expires_at)`` lines: a ``kill -9`` loses nothing learned, names included. A save starts a new
journal file before it snapshots the cache and removes the older ones once the manifest is
written; a start replays every journal left under the policy state it restores.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fqdnguard._core import CacheError, DnsCache, FqdnGuardError
from fqdnguard.control import INSTANCE, atomic_write

__all__ = [
    "FORMAT",
    "MANIFEST",
    "Journal",
    "Manifest",
    "NewerState",
    "StaleWriter",
    "StateDir",
    "StateError",
    "journal_entries",
]

log = logging.getLogger("fqdnguard.state")

#: The state directory format this release writes: (major, minor).
FORMAT = (1, 0)
MANIFEST = "state.json"
LOCK = "state.lock"
#: The manifest's "format" field: what kind of file this is.
KIND = "fqdnguard-state"
#: ``journal.<id>.<n>``: the writer's instance id (a pid before 1.1's writers), then its files
#: in order.
JOURNAL_NAME = re.compile(r"journal\.([0-9]+)\.([0-9]+)")
#: The largest pid Linux gives (pid_max's ceiling): larger writer ids are instance ids.
PID_MAX = 2**22
#: The journal's own line format (its header's "journal" field).
JOURNAL_FORMAT = 1
#: Beside a cache file (the state's, a hand-over's): which pod each endpoint id named for the
#: process that wrote it (``{"owners": {"<id>": "<pod uid>"}}``; Kubernetes objects only).
OWNERS_SUFFIX = ".owners"

#: Endpoint id -> the UID of the pod it names.
Owners = dict[int, str]


def owners_path(cache_file: Path) -> Path:
    return cache_file.with_name(cache_file.name + OWNERS_SUFFIX)


def write_owners(cache_file: Path, owners: Owners | None) -> None:
    """Writes which pod each endpoint id names beside ``cache_file`` (before the cache itself:
    ids are never given twice, so a newer map holds every id an older cache can have that
    still names a pod); without owners (no Kubernetes objects) removes a stale one."""
    side = owners_path(cache_file)
    if owners is None:
        side.unlink(missing_ok=True)
        return
    data = {"owners": {str(i): uid for i, uid in owners.items()}}
    atomic_write(side, json.dumps(data, separators=(",", ":")).encode())


def _parse_owners(data: Any) -> Owners:
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in data.items()
    ):
        raise ValueError("want an object of endpoint ids to pod UIDs")
    return {int(k): v for k, v in data.items()}


def read_owners(cache_file: Path) -> Owners | None:
    """The owners written beside ``cache_file``; None when there are none (a file of the
    previous release, or of a policy without Kubernetes objects); an empty map when they
    cannot be read (then no entry of that file is trusted)."""
    side = owners_path(cache_file)
    try:
        return _parse_owners(json.loads(side.read_bytes())["owners"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.error("%s: unreadable (%s); none of %s's entries is kept", side, e, cache_file.name)
        return {}


def keep_owned(
    entries: list[tuple[int, str, str, float]], then: Owners | None, now: Owners | None
) -> list[tuple[int, str, str, float]]:
    """The entries whose endpoint id names the same pod now (``now``) as for the process that
    learned them (``then``): an id map started afresh (its file lost) or two proxies giving ids
    to new pods in another order must never credit one pod with another's addresses. Without
    owners on either side (no Kubernetes objects, or a file of the previous release) ids are
    what the policy digest says, and everything is kept."""
    if then is None or now is None:
        return entries
    return [e for e in entries if (uid := then.get(e[0])) is not None and now.get(e[0]) == uid]


class StateError(FqdnGuardError):
    """The state directory cannot be read or written as asked; the message says why."""


class NewerState(StateError):
    """The directory holds a state of a newer major format: neither read nor written."""


class StaleWriter(StateError):
    """Another process wrote the state since this one last did: this one's save is refused."""


@dataclass(frozen=True)
class Manifest:
    major: int
    minor: int
    sequence: int
    writer: int | None
    saved_at: float | None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": KIND,
                "version": [self.major, self.minor],
                "sequence": self.sequence,
                "writer": self.writer,
                "saved_at": self.saved_at,
            }
        ).encode()


def read_manifest(directory: Path) -> Manifest | None:
    """The manifest, or None when there is none (format 0). Raises StateError naming what is
    wrong with one that is there."""
    path = directory / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise StateError(f"{path}: not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != KIND:
        raise StateError(f"{path}: not a manifest ('format' is not {KIND!r})")
    version, sequence = data.get("version"), data.get("sequence")
    if (
        not isinstance(version, list)
        or len(version) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in version)
    ):
        raise StateError(f"{path}: 'version' must be [major, minor], got {version!r}")
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
        raise StateError(f"{path}: 'sequence' must be a whole number, got {sequence!r}")
    writer, saved_at = data.get("writer"), data.get("saved_at")
    return Manifest(
        version[0],
        version[1],
        sequence,
        writer if isinstance(writer, int) else None,
        float(saved_at) if isinstance(saved_at, (int, float)) else None,
    )


def _alive(path: Path, writer: int) -> bool:
    """Is the journal ``path`` still being written? Its writer holds ``flock`` on it while it
    runs (the lock goes with the process, in whatever pid namespace it runs). A journal of a
    release that did not lock (``writer`` a pid of this namespace) is asked of the pid."""
    if writer == INSTANCE:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        locked = False
    except BlockingIOError:
        locked = True
    finally:
        os.close(fd)
    if locked or writer > PID_MAX:
        return locked
    try:
        os.kill(writer, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class StateDir:
    """One process's view of a state directory: whether it may read it, the sequence it last
    wrote, and its journal. ``open`` first; then ``claim`` once serving, ``commit`` per save."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        #: The sequence this process read or last wrote.
        self.sequence = 0
        #: The format found (``(0, 0)``: no manifest).
        self.found: tuple[int, int] = (0, 0)
        #: False when the directory holds a newer major format (nothing is read or written).
        self.writable = True
        #: False when nothing in it may be read (a newer major, or an unreadable manifest).
        self.readable = True
        self.journal: Journal | None = None
        #: Journals of processes gone, replayed (or unusable) at start: the first save removes them.
        self._done: list[Path] = []
        self._lock = threading.Lock()

    def open(self) -> bool:
        """Reads the manifest; True when the state may be read. Logs what it refuses."""
        try:
            manifest = read_manifest(self.path)
        except StateError as e:
            log.error("%s; not reading the state (starting fail closed)", e)
            self.readable = False
            return False
        if manifest is None:
            return True  # format 0: the files as they were before manifests
        self.found = (manifest.major, manifest.minor)
        self.sequence = manifest.sequence
        if manifest.major > FORMAT[0]:
            self.readable = self.writable = False
            log.error(
                "%s holds state format %d.%d, written by a newer fqdnguard (this one reads up "
                "to %d.x): not reading it and not writing over it; starting fail closed",
                self.path,
                manifest.major,
                manifest.minor,
                FORMAT[0],
            )
            return False
        if (manifest.major, manifest.minor) > FORMAT:
            log.info(
                "%s holds state format %d.%d (newer minor): reading what format %d.%d knows",
                self.path,
                manifest.major,
                manifest.minor,
                *FORMAT,
            )
        return True

    @contextlib.contextmanager
    def _locked(self) -> Any:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write_manifest(self, sequence: int) -> None:
        manifest = Manifest(*FORMAT, sequence, os.getpid(), time.time())
        atomic_write(self.path / MANIFEST, manifest.to_json())
        self.sequence = sequence

    def claim(self) -> int:
        """Makes this process the directory's writer (at start, once it serves): the sequence
        goes up, so a process that wrote before can no longer save. Returns the sequence."""
        if not self.writable:
            raise NewerState(f"{self.path}: holds a newer state format; not writing")
        with self._lock, self._locked():
            current = _current_sequence(self.path)
            self._write_manifest(max(self.sequence, current) + 1)
            return self.sequence

    def commit(self, write: Callable[[], None], digest: str | None = None) -> int:
        """One save: starts a new journal file (under the policy state ``digest`` when given),
        runs ``write`` (the state files, each written atomically), then writes the manifest with
        the next sequence and removes the journals the save covers. Raises StaleWriter when
        another process wrote since this one did."""
        if not self.writable:
            raise NewerState(f"{self.path}: holds a newer state format; not writing")
        with self._lock, self._locked():
            current = _current_sequence(self.path)
            if current != self.sequence:
                raise StaleWriter(
                    f"{self.path}: another process wrote state sequence {current} after this "
                    f"one's {self.sequence}; not saving over it"
                )
            covered = self.journal.rotate(digest) if self.journal is not None else []
            write()
            self._write_manifest(current + 1)
            for path in covered + self._done:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            self._done = []
            return self.sequence

    # -- the journal --------------------------------------------------------------------------

    def start_journal(
        self, digest: str | None, owner_of: Callable[[int], str | None] | None = None
    ) -> Journal | None:
        """Opens this process's journal (nothing when the directory is not ours to write)."""
        if not self.writable:
            return None
        self.journal = Journal(self.path, digest, owner_of)
        return self.journal

    def replay(
        self,
        cache: DnsCache,
        digest: str | None,
        now: float | None = None,
        *,
        owners: Owners | None = None,
        dropped: set[tuple[int, str]] | None = None,
    ) -> int:
        """Records into ``cache`` what the journals left here hold, when they were written under
        the policy state ``digest``; returns how many entries. A journal under another policy
        state is logged and not read (its endpoint numbers may name other pods), and an entry
        whose endpoint id no longer names the pod it named for its writer (``owners``: see
        :func:`keep_owned`) is skipped, its (endpoint, ip) added to ``dropped``. The next save
        removes the journals of processes no longer running."""
        from fqdnguard.proxy import entries_as_answers  # noqa: PLC0415

        if not self.readable:
            return 0
        now = time.time() if now is None else now
        total = 0
        for path, writer in journal_files(self.path):
            if self.journal is not None and path == self.journal.path:
                continue
            try:
                header, entries = read_journal(path)
            except StateError as e:
                log.error("%s; ignoring it", e)
                continue
            if header.get("digest") != digest:
                log.warning("ignoring %s: written under another policy state", path.name)
                if not _alive(path, writer):
                    self._done.append(path)
                continue
            kept = keep_owned(entries, header.get("owners"), owners)
            if len(kept) < len(entries):
                log.warning(
                    "%s: %d entries of endpoint ids that name other pods now; skipped",
                    path.name,
                    len(entries) - len(kept),
                )
                if dropped is not None:
                    dropped |= {(e[0], e[2]) for e in entries} - {(e[0], e[2]) for e in kept}
                entries = kept
            for endpoint, answers in entries_as_answers(entries, now).items():
                try:
                    cache.record_many(endpoint, answers, now)
                except (CacheError, TypeError, ValueError) as e:
                    log.error("%s: entries of endpoint %d not restored: %s", path, endpoint, e)
            total += len(entries)
            if not _alive(path, writer):
                self._done.append(path)
            log.info("replayed %d journal entries from %s", len(entries), path.name)
        return total


def _current_sequence(path: Path) -> int:
    """The manifest's sequence (0 without one; an unreadable one counts as 0 and is replaced)."""
    try:
        manifest = read_manifest(path)
    except StateError:
        return 0
    return manifest.sequence if manifest is not None else 0


def journal_files(directory: Path) -> list[tuple[Path, int]]:
    """The journal files in ``directory`` (path, writer id), oldest first per writer."""
    found = []
    for path in directory.glob("journal.*"):
        match = JOURNAL_NAME.fullmatch(path.name)
        if match is not None:
            found.append((int(match.group(1)), int(match.group(2)), path))
    return [(path, pid) for pid, _, path in sorted(found)]


def read_journal(path: Path) -> tuple[dict[str, Any], list[tuple[int, str, str, float]]]:
    """A journal's header and its entries. Lines that do not parse (the last one, torn by a
    crash mid-write, or damage) are logged with their number and skipped."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise StateError(f"{path}: cannot read: {e.strerror}") from None
    lines = text.split("\n")
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("journal") != JOURNAL_FORMAT:
        raise StateError(f"{path}:1: not a journal of format {JOURNAL_FORMAT}")
    entries: list[tuple[int, str, str, float]] = []
    bad = 0
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        try:
            if line.startswith("{"):  # which pods the ids of the entries after it name
                header.setdefault("owners", {}).update(_parse_owners(json.loads(line)["owners"]))
                continue
            endpoint, name, ip, expires = json.loads(line)
            if not (
                isinstance(endpoint, int)
                and isinstance(name, str)
                and isinstance(ip, str)
                and isinstance(expires, (int, float))
            ):
                raise ValueError
        except (ValueError, TypeError, KeyError):
            bad += 1
            if bad <= 3:
                log.warning("%s:%d: not a journal entry; skipped", path, number)
            continue
        entries.append((endpoint, name, ip, float(expires)))
    return header, entries


def journal_entries(cache: DnsCache, changes: Sequence[Any]) -> list[tuple[int, str, str, float]]:
    """The cache entries behind a batch of changes: for each (endpoint, ip) added or extended,
    every (endpoint, name) holding it, with all of that name's addresses and expiries."""
    seen: set[tuple[int, str]] = set()
    out: list[tuple[int, str, str, float]] = []
    for c in changes:
        if c.kind == "removed":
            continue
        for name in cache.names_for(c.ip, c.endpoint):
            if (c.endpoint, name) in seen:
                continue
            seen.add((c.endpoint, name))
            out += [(c.endpoint, name, ip, exp) for ip, exp in cache.lookup(name, c.endpoint)]
    return out


class Journal:
    """Appends entries to ``journal.<id>.<n>`` (``id``: :data:`INSTANCE`), holding ``flock`` on
    it while the process runs; a save rotates it. Thread-safe: the event loop appends while a
    save runs on a worker thread.

    ``owner_of`` (Kubernetes objects): the UID of the pod an endpoint id names; before the
    first entry of each id a file holds, a line ``{"owners": {"<id>": "<uid>"}}`` says it (a
    reader checks the id still names that pod; one of the previous release skips the line)."""

    def __init__(
        self,
        directory: Path,
        digest: str | None,
        owner_of: Callable[[int], str | None] | None = None,
    ) -> None:
        self.directory = directory
        self.digest = digest
        self.owner_of = owner_of
        #: The ids whose owner this file says already.
        self._owned: set[int] = set()
        self._lock = threading.Lock()
        # After any file a process of the same id left (an id drawn again): never reused.
        self._n = max(
            (
                int(m.group(2))
                for p, writer in journal_files(directory)
                if writer == INSTANCE
                if (m := JOURNAL_NAME.fullmatch(p.name)) is not None
            ),
            default=0,
        )
        self._fd = -1
        self.path = directory / "journal.none"
        self.appended = 0
        self._open()

    def _open(self) -> None:
        self._n += 1
        self.path = self.directory / f"journal.{INSTANCE}.{self._n}"
        # Made under a temporary name, locked, then linked to its name: another process never
        # sees the journal unlocked (see _alive), which would take it for a dead writer's.
        tmp = self.directory / f".journal.tmp.{INSTANCE}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            header: dict[str, Any] = {
                "journal": JOURNAL_FORMAT,
                "pid": os.getpid(),
                "instance": INSTANCE,
                "digest": self.digest,
            }
            if self.owner_of is not None:  # owned ids only: one without an owner line is not
                header["owners"] = {}
            os.write(fd, json.dumps(header).encode() + b"\n")
            os.link(tmp, self.path)  # never over an existing file
        except OSError:
            os.close(fd)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._fd = fd
        self._owned = set()

    def append(self, entries: Iterable[tuple[int, str, str, float]]) -> int:
        """Writes the entries in one ``write`` (a process crash keeps them: they are in the
        kernel's page cache; the periodic save fsyncs). Returns how many."""
        dumps = json.dumps  # the name only: the rest is numbers and canonical addresses
        entries = list(entries)
        text = "".join(f'[{e},{dumps(n)},"{ip}",{x:.3f}]\n' for e, n, ip, x in entries)
        if not text:
            return 0
        with self._lock:
            if self.owner_of is not None:
                new = {e[0] for e in entries} - self._owned
                owners = {str(i): uid for i in sorted(new) if (uid := self.owner_of(i))}
                if owners:
                    text = dumps({"owners": owners}, separators=(",", ":")) + "\n" + text
                self._owned |= new
            data = text.encode()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        count = len(entries)
        self.appended += count
        return count

    def rotate(self, digest: str | None = None) -> list[Path]:
        """Starts the next file (under ``digest`` when given); returns this process's earlier
        ones, for the caller to remove once what they hold is saved elsewhere."""
        with self._lock:
            old_fd = self._fd
            if digest is not None:
                self.digest = digest
            self._open()
            os.close(old_fd)
        mine = [p for p, writer in journal_files(self.directory) if writer == INSTANCE]
        return [p for p in mine if p != self.path]

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
