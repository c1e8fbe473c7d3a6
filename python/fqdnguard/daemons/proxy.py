"""``fqdnguard proxy``: the data plane alone, enforcing on its own.

It owns the enforcement backend and keeps answering, refusing and programming it whatever the
agent does: the policy comes from the agent over the control socket (see
:mod:`fqdnguard.control`) and is kept in force until the next good one arrives. The last good
policy (the YAML texts and the endpoints text, as pushed) and the cache are saved in the state
directory, atomically, periodically and at shutdown; a proxy started with a state directory
serves and enforces from them at once, before any agent is reachable. Without a saved policy it
knows no endpoint and refuses every query (fail closed) until an agent pushes one.

Hot restart: a second proxy can start on the same listen addresses (SO_REUSEPORT on UDP and
TCP). At start each proxy attaches a classic BPF program to the port's reuseport group that
sends every new datagram and connection to the group's second socket, i.e. the newer proxy
while two run, and falls back to the kernel's hash when there is one. The new proxy asks the old
one to save its state first, loads it, and takes the control socket over; the old one, on
SIGTERM, serves until its sockets have been quiet for a moment (nothing new reaches it once the
new one is up), then finishes its in-flight queries and exits: a rolling restart drops nothing.

Nor does it lose what the old proxy learned after that save. The new one reconciles the backend
without pruning (the old one's recent additions stay in force), and the old one, finding its
control socket taken, writes no state file of its own (the new one's are newer): it saves its
cache as ``cache.handover.<pid>.<digest>`` and asks the new one to adopt it (``POST
/v1/adopt``), which records the entries, programs what is new and saves. Told to stop before its
successor is up, the old proxy serves on until it is (SUCCESSOR_WAIT); a hand-over nobody
adopted is merged by the next proxy that starts under the same policy state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from fqdnguard._core import CacheError, DnsCache, PatternSet
from fqdnguard.backends import Backend, BackendError, make_backend
from fqdnguard.config import ConfigError, ProxyConfig
from fqdnguard.control import (
    INSTANCE,
    PEER,
    ControlError,
    ControlServer,
    Handler,
    WithFds,
    atomic_write,
    ensure_private_dir,
    policy_digest,
    request,
    request_fds,
)
from fqdnguard.daemons.run import BACKGROUND, cache_listing
from fqdnguard.endpoints import Endpoints, from_yaml_with_cluster
from fqdnguard.policy import Policy, PolicyError
from fqdnguard.proxy import Inherited, Proxy, entries_as_answers
from fqdnguard.reloads import PolicyStatus
from fqdnguard.sources.base import Change
from fqdnguard.sources.model import IDS_FILE, KINDS, OBJECTS_FILE, Built, ClusterModel, EndpointIds
from fqdnguard.state import (
    FORMAT,
    OWNERS_SUFFIX,
    Owners,
    StateDir,
    StateError,
    keep_owned,
    owners_path,
    read_owners,
    write_owners,
)

__all__ = ["POLICY_FILE", "ProxyDaemon", "load_policy_state", "run_proxy", "steer_to_newest"]

log = logging.getLogger("fqdnguard.daemons.proxy")

POLICY_FILE = "policy.json"
#: A superseded proxy's cache, for the proxy that took over: this prefix and its instance id
#: (``control.INSTANCE``; a pid before).
HANDOVER_PREFIX = "cache.handover."
#: ``cache.handover.<id>.<first 16 hex digits of the policy digest, or "none">``: entries are
#: keyed by endpoint number, which only the same policy state gives the same meaning.
HANDOVER_NAME = re.compile(re.escape(HANDOVER_PREFIX) + r"[0-9]+\.([0-9a-f]{16}|none)")
#: At SIGTERM after a successor asked for our state: wait this long for it to take over. Also
#: how long after its ``POST /v1/save`` it may ask for the sockets.
SUCCESSOR_WAIT = 10.0
#: How long a starting proxy waits for the running one to answer ``POST /v1/save`` (a wedged
#: or frozen one never does); then it starts on its own.
SAVE_WAIT = 5.0
#: How long the successor that took the sockets has to say it serves (on the liveness link)
#: before this proxy takes them (and the control socket) back.
LINK_TIMEOUT = 60.0
#: Routes the pod-private ``--control-socket`` serves: reading and pushing, never the hand-over
#: (``/v1/save``, ``/v1/sockets``, ``/v1/adopt`` are the node's rendezvous socket's only).
PRIVATE_ROUTES = frozenset(
    {
        ("GET", "/v1/status"),
        ("GET", "/v1/policy"),
        ("PUT", "/v1/policy"),
        ("POST", "/v1/objects"),
        ("GET", "/v1/cache"),
        ("GET", "/v1/stats"),
        ("GET", "/v1/endpoints"),
    }
)
#: Format of the policy state file; a newer one is refused rather than misread.
POLICY_FORMAT = 1
#: SO_ATTACH_REUSEPORT_CBPF (asm-generic/socket.h).
SO_ATTACH_REUSEPORT_CBPF = 51
#: At SIGTERM: serve until no query came for QUIET seconds (at most DRAIN_MAX), then stop.
QUIET = 0.25
DRAIN_MAX = 3.0
#: At stop: how long the new proxy may take to adopt the cache handed over. These three bound
#: how long a proxy takes from SIGTERM to its exit (the chart's terminationGracePeriodSeconds).
ADOPT_TIMEOUT = 30.0


class _Removal(NamedTuple):
    """A change for the backend: the element of (endpoint, ip) goes (as ``Change`` names it)."""

    kind: str
    endpoint: int
    ip: str
    expires_at: float | None


def dropped_pairs(
    entries: list[tuple[int, str, str, float]], kept: list[tuple[int, str, str, float]]
) -> set[tuple[int, str]]:
    """The (endpoint, ip) pairs of ``entries`` that no entry of ``kept`` holds."""
    held = {(e[0], e[2]) for e in kept}
    return {(e[0], e[2]) for e in entries if (e[0], e[2]) not in held}


def _rebuilt(cache: DnsCache, entries: list[tuple[int, str, str, float]]) -> DnsCache:
    """A cache with ``cache``'s limits holding ``entries`` only."""
    kept = DnsCache(
        min_ttl=cache.min_ttl,
        max_ips_per_name=cache.max_ips_per_name,
        max_entries=cache.max_entries,
    )
    now = time.time()
    for endpoint, answers in entries_as_answers(entries, now).items():
        kept.record_many(endpoint, answers, now)
    return kept


@dataclass
class _Successor:
    """A starting proxy that asked for our state (``POST /v1/save`` with ``successor``): only
    it may take the sockets, once, within SUCCESSOR_WAIT, with the nonce it was given."""

    instance: int
    pid: int | None
    nonce: str
    at: float


class _PolicyState:
    """The policy in force as pushed: sources, endpoints text, digest, and where it came from."""

    def __init__(
        self,
        sources: list[tuple[str, str]],
        endpoints: str | None,
        source: str,
        loaded_at: float,
    ) -> None:
        self.sources = sources
        self.endpoints = endpoints
        self.digest = policy_digest(sources, endpoints)
        self.source = source
        self.loaded_at = loaded_at

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": POLICY_FORMAT,
                "digest": self.digest,
                "saved_at": time.time(),
                "sources": [list(s) for s in self.sources],
                "endpoints": self.endpoints,
            }
        ).encode()


def parse_push(body: Any) -> tuple[list[tuple[str, str]], str | None]:
    """Checks the shape of a ``PUT /v1/policy`` body (or a saved state); ValueError names what
    is wrong."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object with 'sources' and 'endpoints'")
    sources = body.get("sources")
    if not isinstance(sources, list):
        raise ValueError("'sources' must be a list of [name, yaml text] pairs")
    out: list[tuple[str, str]] = []
    for i, item in enumerate(sources):
        if (
            not isinstance(item, (list, tuple))
            or len(item) != 2
            or not all(isinstance(x, str) for x in item)
        ):
            raise ValueError(f"sources[{i}] must be a [name, yaml text] pair of strings")
        out.append((item[0], item[1]))
    endpoints = body.get("endpoints")
    if endpoints is not None and not isinstance(endpoints, str):
        raise ValueError("'endpoints' must be the endpoints YAML text or null")
    return out, endpoints


def compile_policy(
    sources: list[tuple[str, str]],
    endpoints_text: str | None,
    *,
    allow_empty: bool = False,
    unenforced_l7: str = "deny",
) -> tuple[Policy, Endpoints]:
    """Compiles a pushed set whole; raises PolicyError (every problem) or ValueError. A set
    with no file, or a file with no policy document, is an error unless ``allow_empty``."""
    endpoints, cluster = (
        from_yaml_with_cluster(endpoints_text, filename="endpoints")
        if endpoints_text is not None
        else (Endpoints(), None)
    )
    policy = Policy._from_sources(
        list(sources),
        endpoints,
        allow_empty=allow_empty,
        unenforced_l7=unenforced_l7,
        cluster=cluster,
    )
    return policy, endpoints


def load_policy_state(path: Path) -> tuple[list[tuple[str, str]], str | None] | None:
    """The saved policy (sources, endpoints text), or None when there is none. Raises ValueError
    when the file is there but unreadable (the caller starts fail-closed)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != POLICY_FORMAT:
        raise ValueError(f"{path}: not a policy state of format {POLICY_FORMAT}")
    sources, endpoints = parse_push(data)
    if data.get("digest") != policy_digest(sources, endpoints):
        raise ValueError(f"{path}: digest does not match the content")
    return sources, endpoints


def still_allowed(
    entries: list[tuple[int, str, str, float]], policy: Policy, endpoints: Endpoints
) -> tuple[list[tuple[int, str, str, float]], int]:
    """The cache entries ((endpoint id, name, ip, expires_at)) that ``policy`` still lets
    their endpoint have, and how many others were dropped: what a hot restart carries over
    when the policy changed in between. An entry of an endpoint id the registry no longer
    has, or of a name no ``toFQDNs`` selector of its endpoint matches, is dropped (never
    enforced); an endpoint no default-deny policy selects keeps its entries (it reaches
    everything anyway)."""
    by_id = {ep.id: ep for ep in endpoints}
    #: endpoint id -> its toFQDNs selectors (None: unrestricted, keeps all; False: gone).
    selectors: dict[int, PatternSet | bool | None] = {}
    kept: list[tuple[int, str, str, float]] = []
    for entry in entries:
        ep_id = entry[0]
        if ep_id not in selectors:
            ep = by_id.get(ep_id)
            plan = policy.egress_plan(ep) if ep is not None else None
            if ep is None:
                selectors[ep_id] = False
            elif plan is None:
                selectors[ep_id] = None
            else:
                names = PatternSet()
                for _ports, items in plan.fqdn:
                    for is_pattern, text in items:
                        (names.add if is_pattern else names.add_name)(text, 0)
                selectors[ep_id] = names
        found = selectors[ep_id]
        if found is None or (isinstance(found, PatternSet) and found.matches(entry[1])):
            kept.append(entry)
    return kept, len(entries) - len(kept)


# -- Kubernetes objects relayed by an agent --------------------------------------------------------

#: The version of the ``POST /v1/objects`` protocol this proxy speaks.
KUBE_PROTOCOL = 1
#: Seconds between two saves of relayed objects (and at every reset and at stop).
KUBE_SAVE_INTERVAL = 5.0


class _KubeState:
    def __init__(self, model: ClusterModel, session: str | None, seq: int) -> None:
        self.model, self.session, self.seq = model, session, seq


@dataclass(frozen=True)
class ObjectsPush:
    """A checked ``POST /v1/objects`` body."""

    node: str
    session: str
    seq: int
    reset: bool
    batches: list[tuple[str, list[Change]]]
    synced: list[str]


def kube_digest(node: str) -> str:
    return hashlib.sha256(f"kubernetes\0{node}".encode()).hexdigest()


def saved_node(directory: Path) -> str | None:
    """The node whose Kubernetes objects the state directory holds, or None."""
    try:
        data = json.loads((directory / OBJECTS_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error("%s: unreadable (%s)", OBJECTS_FILE, e)
        return None
    node = data.get("node") if isinstance(data, dict) else None
    return node if isinstance(node, str) and node else None


def parse_objects(body: Any) -> ObjectsPush:
    """Checks a ``POST /v1/objects`` body; ValueError names what is wrong. A newer protocol
    than :data:`KUBE_PROTOCOL` is refused (the agent then says so and keeps retrying: the
    proxy keeps its policy)."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    protocol = body.get("protocol")
    if protocol != KUBE_PROTOCOL:
        raise ValueError(
            f"protocol {protocol!r}: this proxy speaks {KUBE_PROTOCOL} (upgrade the proxy first)"
        )
    node, session, seq = body.get("node"), body.get("session"), body.get("seq")
    if not isinstance(node, str) or not node:
        raise ValueError("'node' must be the node's name")
    if not isinstance(session, str) or not session:
        raise ValueError("'session' must be a string")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError("'seq' must be a whole number")
    reset = body.get("reset", False)
    if not isinstance(reset, bool):
        raise ValueError("'reset' must be true or false")
    batches: list[tuple[str, list[Change]]] = []
    for i, item in enumerate(body.get("changes") or []):
        if not isinstance(item, dict):
            raise ValueError(f"changes[{i}] must be an object")
        kind, key, obj = item.get("kind"), item.get("key"), item.get("obj")
        if kind not in KINDS:
            raise ValueError(f"changes[{i}].kind: {kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"changes[{i}].key must be a string")
        if obj is not None and not isinstance(obj, dict):
            raise ValueError(f"changes[{i}].obj must be an object or null")
        change = Change(kind, key, obj)
        if batches and batches[-1][0] == kind:
            batches[-1][1].append(change)
        else:
            batches.append((kind, [change]))
    synced = body.get("synced") or []
    if not isinstance(synced, list) or any(k not in KINDS for k in synced):
        raise ValueError(f"'synced' must list kinds among {', '.join(KINDS)}")
    return ObjectsPush(node, session, seq, reset, batches, list(synced))


# -- reuseport steering -------------------------------------------------------------------------


def _steering_program() -> tuple[bytes, Any]:
    """A struct sock_fprog of one cBPF instruction, ``ret #1``: the group's socket 1."""
    insn = struct.pack("HBBI", 0x06, 0, 0, 1)  # BPF_RET | BPF_K, k = 1
    buf = ctypes.create_string_buffer(insn)
    return struct.pack("HL", 1, ctypes.addressof(buf)), buf


def steer_to_newest(sockets: list[Any]) -> int:
    """Attaches the steering program to each socket's reuseport group; returns how many took it.

    Sockets join a group in order and a closing one is replaced by the last: with two proxies
    the newer one is socket 1 and gets everything new; with one, ``ret #1`` is out of range and
    the kernel falls back to its hash (the only socket)."""
    prog, keep = _steering_program()
    done = 0
    for sock in sockets:
        try:
            fd = sock if isinstance(sock, int) else sock.fileno()
            with socket.socket(fileno=socket.dup(fd)) as s:
                s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, prog)
            done += 1
        except OSError as e:
            log.warning("cannot attach the reuseport program (hot restart may drop): %s", e)
    del keep
    return done


def _listening_sockets(proxy: Proxy) -> list[int]:
    """Every listener's descriptor, direct and transparent, UDP and TCP."""
    return [fd for *_, fd in proxy.handover_sockets()]


# -- the daemon ---------------------------------------------------------------------------------


class ProxyDaemon:
    """Runs ``fqdnguard proxy``: ``await daemon.run()`` until SIGTERM/SIGINT."""

    def __init__(
        self,
        config: ProxyConfig,
        backend: Backend | None = None,
        *,
        control_socket: str | os.PathLike[str] | None = None,
        socket_handover: str = "fds",
    ) -> None:
        if not config.state_dir:
            raise ConfigError(
                "state_dir: fqdnguard proxy needs --state-dir (policy, cache, socket)"
            )
        self.config = config
        # A hostPath volume is made 0755 (accepted: nobody else can write in it); one that
        # others can write to is made 0700 when it holds only fqdnguard's files.
        self.state_dir = ensure_private_dir(config.state_dir, tighten=True)
        self.state = StateDir(self.state_dir)
        self.backend = (
            backend
            if backend is not None
            else make_backend(config.backend, reverse_path_check=config.reverse_path_check)
        )
        if socket_handover not in ("fds", "reuseport"):
            raise ConfigError(f"socket_handover: {socket_handover!r}: choose fds or reuseport")
        self.socket_handover = socket_handover
        self.proxy: Proxy | None = None
        routes: dict[tuple[str, str], Handler] = {
            ("GET", "/v1/status"): self._get_status,
            ("PUT", "/v1/policy"): self._put_policy,
            ("POST", "/v1/objects"): self._post_objects,
            ("POST", "/v1/save"): self._post_save,
            ("POST", "/v1/adopt"): self._post_adopt,
            ("POST", "/v1/sockets"): self._post_sockets,
            ("GET", "/v1/cache"): self._get_cache,
            ("GET", "/v1/stats"): self._get_stats,
            ("GET", "/v1/policy"): self._get_policy,
            ("GET", "/v1/endpoints"): self._get_endpoints,
        }
        #: STATE_DIR/control.sock: the node's hand-over rendezvous, taken over by a successor.
        self.control = ControlServer(self.state_dir / "control.sock", routes, tighten=True)
        #: ``--control-socket``: reading and pushing (PRIVATE_ROUTES) on a path of this process
        #: only (a pod-private directory), for its own agent and probes; never handed over.
        self.private = (
            ControlServer(
                control_socket,
                {k: v for k, v in routes.items() if k in PRIVATE_ROUTES},
                tighten=True,
            )
            if control_socket is not None
            else None
        )
        #: The listening sockets handed to a successor (POST /v1/sockets), by key, while it
        #: starts (the liveness link is open) and after it said it serves.
        self._sockets_passed: list[tuple[str, str, int]] = []
        #: The successor that took them said it serves: this proxy no longer reads them.
        self._released = False
        #: The starting proxy allowed to take the sockets (see _post_save).
        self._successor: _Successor | None = None
        #: A successor's end of the liveness link (this proxy took the sockets over).
        self._link: socket.socket | None = None
        #: The nonce our predecessor gave us at POST /v1/save.
        self._handover_nonce: str | None = None
        #: (endpoint, ip) pairs of restored entries the policy no longer allows: their
        #: elements are deleted once the backend runs (see _revoke).
        self._restore_dropped: set[tuple[int, str]] = set()
        #: Endpoint id -> pod UID with Kubernetes objects (None otherwise): written beside
        #: every cache and journal this proxy writes, checked in every one it reads. Replaced
        #: (never changed in place) when the ids change: the saver's thread reads it.
        self._owners: Owners | None = None
        self.status = PolicyStatus()
        self.policy_state: _PolicyState | None = None
        #: The Kubernetes objects an agent relays (POST /v1/objects), when that is the source.
        self.kube: _KubeState | None = None
        self._kube_saved_at = 0.0
        self._stop = asyncio.Event()
        self._push_lock = asyncio.Lock()
        self._started_at = time.time()
        self._metrics: Any = None
        self._save_lock = threading.Lock()
        #: When a starting proxy asked for our state (POST /v1/save): it is about to take over.
        self._successor_asked: float | None = None

    @property
    def cache_path(self) -> Path:
        return self.state_dir / "cache.snapshot"

    @property
    def policy_path(self) -> Path:
        return self.state_dir / POLICY_FILE

    # -- start ------------------------------------------------------------------------------

    async def _hand_over(self) -> bool:
        """When a proxy is already serving from this state dir, asks it to save its state now
        (so this one starts from the freshest cache). True when one answered."""
        try:
            status, body = await request(
                self.control.path, "POST", "/v1/save", {"successor": INSTANCE}, timeout=SAVE_WAIT
            )
        except ControlError as e:
            if self.control.path.exists():
                # Nobody listens (a proxy that died left its socket), or one listens and does
                # not answer (wedged, frozen): start on its own either way, fresh sockets
                # beside any it still holds (they keep their share of intercepted flows
                # until that process runs again or is killed).
                log.warning("no proxy answered POST /v1/save on %s (%s): starting on its own",
                            self.control.path, e)  # fmt: skip
            return False
        if status == 200:
            log.info("another proxy serves from %s: took its saved state", self.state_dir)
            nonce = body.get("handover") if isinstance(body, dict) else None
            self._handover_nonce = nonce if isinstance(nonce, str) else None
        return status == 200

    async def _take_sockets(self) -> Inherited:
        """Asks the running proxy for its listening sockets (``POST /v1/sockets``, passed with
        SCM_RIGHTS). Whatever goes wrong leaves this proxy to bind its own (beside the other
        one's, SO_REUSEPORT): never a moment where nobody holds the port."""
        loop = asyncio.get_running_loop()
        want = [list(key) for key in Proxy.listener_keys(self.config)]
        ask = {"want": want, "handover": self._handover_nonce, "instance": INSTANCE}
        try:
            got = await loop.run_in_executor(
                None,
                functools.partial(
                    request_fds, self.control.path, "POST", "/v1/sockets", ask, link=True
                ),
            )
        except ControlError as e:
            log.warning("the running proxy handed no sockets over (%s): binding new ones", e)
            return {}
        status, body, fds = got.status, got.body, got.fds
        keys = body.get("sockets") if isinstance(body, dict) else None
        out: Inherited = {}
        if status != 200 or not isinstance(keys, list) or len(keys) != len(fds):
            log.warning("the running proxy handed no sockets over (%s %s)", status, body)
            if got.link is not None:
                got.link.close()
        else:
            # The liveness link: the running proxy reads these sockets on until this one says
            # it serves (or takes them back if the link ends first: this process died).
            self._link = got.link
            for key, fd in zip(keys, fds, strict=True):
                if (
                    isinstance(key, list)
                    and len(key) == 3
                    and key[0] in ("udp", "tcp")
                    and isinstance(key[1], str)
                    and isinstance(key[2], int)
                ):
                    out[(key[0], key[1], key[2])] = socket.socket(fileno=fd)
                    continue
                os.close(fd)
            log.info("took %d listening sockets over from the running proxy", len(out))
            return out
        for fd in fds:
            os.close(fd)
        return {}

    async def _revoke(self, pairs: set[tuple[int, str]]) -> None:
        """Deletes the elements of ``pairs`` (what another proxy, or this one before a
        restart, programmed for entries the policy in force no longer allows) unless an entry
        of this proxy's cache still allows the address to the endpoint: dropped from the cache,
        they must not stay admitted in the kernel until their own timeouts."""
        if not pairs or self.proxy is None:
            return
        now = time.time()
        cache = self.proxy.cache
        gone = [
            _Removal("removed", endpoint, ip, None)
            for endpoint, ip in sorted(pairs)
            if not cache.allowed(endpoint, ip, now)
        ]
        if not gone:
            return
        try:
            await self.proxy.backend.apply(gone)
        except BackendError as e:
            log.error("cannot delete %d elements the policy no longer allows: %s", len(gone), e)
            return
        log.info("deleted %d elements the policy in force no longer allows", len(gone))

    def _digest_tag(self) -> str:
        """The policy state's part of a hand-over file's name."""
        digest = self._state_digest()
        return digest[:16] if digest is not None else "none"

    def _state_digest(self) -> str | None:
        """What gives the cache's endpoint ids their meaning: the pushed policy's digest, or,
        with Kubernetes objects, the node (ids are kept by pod UID across changes)."""
        if self.policy_state is not None:
            return self.policy_state.digest
        if self.kube is not None:
            return kube_digest(self.kube.model.node)
        return None

    def _restore(self) -> tuple[Policy, Endpoints, DnsCache]:
        if not self.state.open():
            return Policy.empty(), Endpoints(), DnsCache(min_ttl=self.config.min_ttl)
        policy, endpoints, cache = self._restore_saved()
        self._refresh_owners()
        # Every file carries which pod each of its endpoint ids named for its writer: entries
        # of ids that name another pod now (the id map lost, or given out in another order by
        # another proxy) are dropped, their elements revoked below.
        cache, self._restore_dropped = self._owned(cache, read_owners(self.cache_path), "cache")
        self._merge_leftovers(cache)
        self.state.replay(
            cache, self._state_digest(), owners=self._owners, dropped=self._restore_dropped
        )
        # Journals and hand-over files may hold what was learned under an earlier policy
        # (endpoint ids are stable across policy changes with Kubernetes objects): keep only
        # what the policy restored allows.
        if self.policy_state is None and self.kube is None:
            return policy, endpoints, cache  # no policy restored: kept for the one to come
        every = cache.entries()
        entries, dropped = still_allowed(every, policy, endpoints)
        if dropped:
            log.info("dropped %d restored entries the policy in force no longer allows", dropped)
            self._restore_dropped |= dropped_pairs(every, entries)
            cache = _rebuilt(cache, entries)
        return policy, endpoints, cache

    def _refresh_owners(self) -> None:
        """Which pod each endpoint id names now (after the Kubernetes objects changed)."""
        if self.kube is None:
            self._owners = None
            return
        ids = self.kube.model.ids
        self._owners = {i: uid for uid in ids.uids() if (i := ids.get(uid)) is not None}

    def _owner_of(self, endpoint: int) -> str | None:
        owners = self._owners
        return owners.get(endpoint) if owners is not None else None

    def _owned(
        self, cache: DnsCache, then: Owners | None, what: str
    ) -> tuple[DnsCache, set[tuple[int, str]]]:
        """``cache`` without the entries whose endpoint id names another pod now than for the
        process that saved it (``then``), and the (endpoint, ip) pairs dropped."""
        every = cache.entries()
        kept = keep_owned(every, then, self._owners)
        if len(kept) == len(every):
            return cache, set()
        log.warning("%s: %d entries of endpoint ids that name other pods now; dropped",
                    what, len(every) - len(kept))  # fmt: skip
        return _rebuilt(cache, kept), dropped_pairs(every, kept)

    def _merge_leftovers(self, cache: DnsCache) -> None:
        """Adds to ``cache`` what hand-over files no proxy adopted hold (the proxy that took over
        died first) when they were saved under the policy state now restored, and only the
        entries whose ids name the same pods now; removes them."""
        for path in sorted(self.state_dir.glob(f"{HANDOVER_PREFIX}*")):
            if path.name.endswith(OWNERS_SUFFIX):
                continue  # read with its cache file
            match = HANDOVER_NAME.fullmatch(path.name)
            if match is None or match.group(1) != self._digest_tag():
                log.warning("ignoring %s: not a hand-over under this policy state", path.name)
                continue
            try:
                left = DnsCache.load(path)
            except CacheError as e:
                log.error("cannot read %s (%s); ignoring it", path.name, e)
                continue
            left, dropped = self._owned(left, read_owners(path), path.name)
            self._restore_dropped |= dropped
            now = time.time()
            for endpoint, answers in entries_as_answers(left.entries(), now).items():
                cache.record_many(endpoint, answers, now)
            path.unlink()
            owners_path(path).unlink(missing_ok=True)
            log.info("merged %d entries left in %s", len(left), path.name)

    def _restore_saved(self) -> tuple[Policy, Endpoints, DnsCache]:
        cache = DnsCache(min_ttl=self.config.min_ttl)
        if self.cache_path.exists():
            try:
                cache = DnsCache.load(self.cache_path)
                log.info("restored %d cache entries from %s", len(cache), self.cache_path)
            except CacheError as e:
                log.error("cannot restore the cache (%s); starting empty", e)
        restored = self._restore_kube()
        if restored is not None:
            return restored.policy, restored.endpoints, cache
        try:
            saved = load_policy_state(self.policy_path)
            if saved is not None:
                # It was accepted when pushed (an empty set only when that was allowed).
                policy, endpoints = compile_policy(
                    *saved, allow_empty=True, unenforced_l7=self.config.unenforced_l7
                )
                self.policy_state = _PolicyState(*saved, source="state", loaded_at=time.time())
                self.status.applied(
                    None,
                    policy,
                    source="state",
                    origin=[name for name, _ in saved[0]],
                    digest=self.policy_state.digest,
                )
                log.info(
                    "serving the saved policy (%d policies, %d endpoints) until an agent pushes",
                    len(policy),
                    len(endpoints),
                )
                return policy, endpoints, cache
        except (ValueError, PolicyError) as e:
            log.error("cannot use the saved policy (%s); refusing every query until a push", e)
        else:
            log.warning("no saved policy: refusing every query until an agent pushes one")
        return Policy.empty(), Endpoints(), cache

    def _restore_kube(self) -> Built | None:
        """The Kubernetes objects an agent relayed last, when that was the source."""
        node = saved_node(self.state_dir)
        if node is None:
            return None
        model = ClusterModel(
            node, EndpointIds(self.state_dir / IDS_FILE), unenforced_l7=self.config.unenforced_l7
        )
        if not model.restore(self.state_dir):
            return None
        built = model.build()
        self.kube = _KubeState(model, None, 0)
        self.status.applied(None, built.policy, source="state", origin=[f"kubernetes node {node}"])
        log.info(
            "serving the saved Kubernetes objects of node %s (%d policies, %d endpoints) "
            "until an agent relays the current ones",
            node,
            len(built.policy),
            len(built.endpoints),
        )
        return built

    async def start(self) -> None:
        try:
            await self._start()
        finally:
            if self._link is not None:  # not serving: the predecessor takes its sockets back
                self._link.close()
                self._link = None

    async def _start(self) -> None:
        handed_over = await self._hand_over()
        inherited: Inherited = {}
        if handed_over and self.socket_handover == "fds":
            inherited = await self._take_sockets()
        policy, endpoints, cache = self._restore()
        self.proxy = Proxy(policy, endpoints, backend=self.backend, cache=cache, config=self.config)
        # Without a policy (none saved, or unreadable) the node's interception and enforcement
        # stay as they are: only a policy in force shrinks them (fail closed).
        in_force = self.policy_state is not None or self.kube is not None
        await self.proxy.start(
            taking_over=handed_over, inherited=inherited, policy_in_force=in_force
        )
        steer_to_newest(_listening_sockets(self.proxy))
        await self._revoke(self._restore_dropped)
        self._restore_dropped = set()
        if self.config.metrics is not None:
            # Before this proxy takes the control socket and says it serves: a metrics port it
            # cannot bind (another program holds it) fails its start while the predecessor
            # still serves the sockets (it takes them back), not after. SO_REUSEPORT: during a
            # hot restart the successor binds the port beside its predecessor.
            from fqdnguard.metrics import serve_metrics  # noqa: PLC0415

            host, port = self.config.metrics
            self._metrics = await serve_metrics(
                self.proxy, host, port, [self.status.collector()], reuse_port=True
            )
        if self.private is not None:
            await self.private.start()
        await self.control.start()
        if handed_over:
            log.info("took over the control socket %s", self.control.path)
        self._claim_state()
        self._tell_serving()
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

    def _claim_state(self) -> None:
        """Makes this process the state directory's writer (a proxy that wrote before can no
        longer save over it) and starts its journal."""
        assert self.proxy is not None
        if not self.state.writable:
            return
        try:
            sequence = self.state.claim()
        except (StateError, OSError) as e:
            log.error("cannot claim the state directory: %s", e)
            return
        self.proxy.journal = self.state.start_journal(self._state_digest(), self._owner_of)
        log.info("state directory %s: format %d.%d, sequence %d", self.state_dir, *FORMAT, sequence)

    def _tell_serving(self) -> None:
        """Tells the predecessor that handed its sockets over that this proxy serves them now
        (it then stops reading them), and ends the link."""
        if self._link is None:
            return
        try:
            self._link.settimeout(5)
            self._link.sendall(f"serving {INSTANCE}\n".encode())
        except OSError as e:
            log.warning("cannot tell the previous proxy that this one serves: %s", e)
        finally:
            self._link.close()
            self._link = None

    async def run(self) -> None:
        await self.start()
        saver = asyncio.ensure_future(self._save_periodically())
        try:
            await self._stop.wait()
        finally:
            saver.cancel()
            await self.stop()

    def superseded(self) -> bool:
        """A successor took this proxy's sockets (and is starting, or serves) or its control
        socket: the node's tables are the successor's to write."""
        return bool(self._sockets_passed) or self.control.superseded()

    async def _follow_link(self, instance: int, reader: asyncio.StreamReader) -> None:
        """The liveness link of a hand-over: the successor ``instance`` that took the sockets
        writes ``serving <instance>`` once it serves; this proxy then stops reading them. If
        the link ends first (the successor died or gave up) or says anything else, or nothing
        comes within LINK_TIMEOUT, this proxy keeps (or goes back to) serving: it takes the
        control socket and the state directory back if the successor had taken them."""
        try:
            line = await asyncio.wait_for(reader.readline(), LINK_TIMEOUT)
        except (TimeoutError, ConnectionError, ValueError):
            line = b""
        if line.strip() == f"serving {instance}".encode() and self.proxy is not None:
            self._released = True
            self.proxy.stop_listening(self._sockets_passed)
            log.info("the new proxy serves the sockets handed over: finishing in-flight queries")
            return
        log.warning(
            "the new proxy (instance %d) that took the sockets did not come to serve (%s): "
            "serving them again",
            instance,
            f"no word within {LINK_TIMEOUT:.0f} s" if line else "it is gone",
        )
        self._sockets_passed = []
        if self.control.superseded():
            try:
                await self.control.retake()
                log.info("took the control socket %s back", self.control.path)
            except OSError as e:
                log.error("cannot take the control socket back: %s", e)
        if self.state.writable and self.state.journal is not None:
            try:
                self.state.claim()
            except (StateError, OSError) as e:
                log.error("cannot claim the state directory back: %s", e)

    def request_stop(self) -> None:
        self._stop.set()

    async def _drain(self) -> None:
        """Serves until no query arrived for QUIET seconds (at most DRAIN_MAX)."""
        assert self.proxy is not None
        engine = self.proxy.engine
        deadline = time.monotonic() + DRAIN_MAX
        seen = engine.stats()["queries"]
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            now_seen = engine.stats()["queries"]
            if now_seen != seen:
                seen, quiet_since = now_seen, time.monotonic()
            elif time.monotonic() - quiet_since >= QUIET:
                return

    async def _await_successor(self) -> None:
        """A proxy that asked for our state is starting: serve until it has taken the control
        socket over and, when it took the sockets, said it serves them (at most SUCCESSOR_WAIT
        after it asked), so what we learn meanwhile is handed to it."""
        if self._successor_asked is None:
            return
        deadline = self._successor_asked + SUCCESSOR_WAIT
        while time.monotonic() < deadline:
            if self._sockets_passed:
                if self._released:
                    return
            elif self.control.superseded():
                return
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.proxy is not None:
            await self._await_successor()
            await self._drain()
        superseded = self.control.superseded()
        await self.control.close()
        if self.private is not None:
            await self.private.close()
        if self.proxy is not None:
            await self.proxy.stop()
        if self._metrics is not None:
            await self._metrics.close()
        if superseded:
            await self._hand_cache_over()
        else:
            try:
                self.save()
            except (StateError, CacheError, OSError) as e:
                log.error("saving the state failed: %s", e)
        if self.state.journal is not None:
            self.state.journal.close()
        log.info("stopped")

    # -- state ------------------------------------------------------------------------------

    async def _hand_cache_over(self) -> None:
        """Gives this proxy's cache to the one that took over (it owns the state files now)."""
        if self.proxy is None:
            return
        name = f"{HANDOVER_PREFIX}{INSTANCE}.{self._digest_tag()}"
        path = self.state_dir / name
        try:
            write_owners(path, self._owners)
            self.proxy.cache.save(path)
            status, body = await request(
                self.control.path, "POST", "/v1/adopt", {"file": name}, timeout=ADOPT_TIMEOUT
            )
        except (CacheError, OSError, ControlError) as e:
            # Left in place: the next proxy to start here adopts it (see _restore).
            log.error("handing the cache over failed: %s (left in %s)", e, path)
            return
        if status != 200:
            log.error("the new proxy did not adopt %s: %s %s", path, status, body)
            return
        changes = body.get("changes") if isinstance(body, dict) else body
        log.info("handed the cache over: %s changes for the new proxy", changes)

    def save(self) -> None:
        """Saves the cache and the policy in force (each atomically) as the state directory's
        next sequence; nothing once another proxy has taken the control socket over (its state
        is the newer). Raises StaleWriter when one has written the state since this one did,
        NewerState when the directory is a newer release's."""
        with self._save_lock:  # the periodic saver, /v1/save and /v1/adopt use threads
            if self.control.superseded():
                return
            self.state.commit(self._write_state, self._state_digest())

    def _write_state(self) -> None:
        if self.proxy is not None:
            write_owners(self.cache_path, self._owners)
            self.proxy.cache.save(self.cache_path)
        if self.policy_state is not None:
            atomic_write(self.policy_path, self.policy_state.to_json())
        if self.kube is not None:
            self.kube.model.save(self.state_dir)

    async def _save_periodically(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.cache_save_interval)
            try:
                await loop.run_in_executor(BACKGROUND, self.save)
            except (CacheError, OSError, StateError) as e:
                log.error("saving the state failed: %s", e)

    # -- control routes ---------------------------------------------------------------------

    async def _get_status(self, _body: Any) -> tuple[int, Any]:
        assert self.proxy is not None
        ps = self.policy_state
        return 200, {
            "pid": os.getpid(),
            "started_at": self._started_at,
            "listen": [f"{h}:{p}" for h, p in self.proxy.config.listen],
            "backend": self.backend.name,
            "policy": {
                "digest": ps.digest if ps else None,
                "source": ps.source if ps else "none",
                "loaded_at": ps.loaded_at if ps else None,
                "policies": len(self.proxy.policy),
                "endpoints": len(self.proxy.endpoints),
            },
            "kubernetes": (
                {"node": self.kube.model.node, "session": self.kube.session, "seq": self.kube.seq}
                if self.kube is not None
                else None
            ),
            "cache": self.proxy.cache.stats(),
            "engine": {k: v for k, v in self.proxy.engine.stats().items() if isinstance(v, int)},
            "state": {
                "format": list(FORMAT),
                "found": list(self.state.found),
                "sequence": self.state.sequence,
                "writable": self.state.writable,
            },
        }

    def _refused_superseded(self) -> tuple[int, Any]:
        return 409, {
            "error": "this proxy has handed over to a newer one, which owns the node's "
            "interception and enforcement now: push to it (its control socket)",
            "superseded": True,
        }

    async def _put_policy(self, body: Any) -> tuple[int, Any]:  # noqa: PLR0911 (one per refusal)
        assert self.proxy is not None
        try:
            sources, endpoints_text = parse_push(body)
        except ValueError as e:
            return 400, {"error": str(e)}
        digest = policy_digest(sources, endpoints_text)
        allow_empty = self.config.allow_empty_policy or (
            isinstance(body, dict) and body.get("allow_empty") is True
        )
        async with self._push_lock:
            if self.policy_state is not None and self.policy_state.digest == digest:
                self.policy_state.source = "agent"
                return 200, {"digest": digest, "changed": False}
            loop = asyncio.get_running_loop()
            try:
                policy, endpoints = await loop.run_in_executor(
                    None,
                    functools.partial(
                        compile_policy,
                        sources,
                        endpoints_text,
                        allow_empty=allow_empty,
                        unenforced_l7=self.config.unenforced_l7,
                    ),
                )
            except PolicyError as e:
                self.status.rejected("push", str(e))
                log.error("policy push refused, keeping the policy in force: %s", e)
                return 422, {
                    "error": f"the policy set does not compile: {e}",
                    "errors": [err.location() for err in e.errors],
                }
            except ValueError as e:
                self.status.rejected("push", str(e))
                return 422, {"error": f"the policy set does not compile: {e}", "errors": [str(e)]}
            if self.superseded():  # while it compiled
                return self._refused_superseded()
            old = self.proxy.policy
            journal = self.state.journal
            try:
                self.proxy.set_policy(policy, endpoints)
            except (ConfigError, BackendError) as e:
                self.status.rejected("push", str(e))
                return 409, {"error": f"the policy cannot be put in force: {e}"}
            if journal is not None:  # what is learned from now on is under the new policy
                journal.rotate(digest)
            state = _PolicyState(sources, endpoints_text, "agent", time.time())
            self.policy_state = state
            if self.kube is not None:  # a pushed policy replaces relayed objects
                self.kube = None
                for name in (OBJECTS_FILE,):
                    with contextlib.suppress(FileNotFoundError):
                        (self.state_dir / name).unlink()
            gone = self.status.applied(
                old,
                policy,
                source="agent",
                origin=[name for name, _ in sources],
                digest=digest,
                trigger="push",
            )
            try:  # the cache too: the journals written under the old policy are then covered
                await loop.run_in_executor(None, self.save)
            except (StateError, CacheError, OSError) as e:
                log.error("the pushed policy is in force but not saved: %s", e)
        log.info(
            "policy pushed: %d policies, %d endpoints (digest %s)",
            len(policy),
            len(endpoints),
            digest[:12],
        )
        return 200, {"digest": digest, "changed": True, "unrestricted": gone}

    async def _post_objects(self, body: Any) -> tuple[int, Any]:
        """Kubernetes objects relayed by ``fqdnguard agent --kubernetes``: a batch of changes
        (see :func:`parse_objects` and docs/split.md). The first batch of a session, and any
        batch after a gap, must be a reset (every object); otherwise the answer is 409 with
        ``need: reset`` and the policy in force stays."""
        assert self.proxy is not None
        try:
            push = parse_objects(body)
        except ValueError as e:
            return 400, {"error": str(e)}
        async with self._push_lock:
            if self.superseded():
                return self._refused_superseded()
            k = self.kube
            if push.reset:
                ids = (
                    k.model.ids
                    if k is not None and k.model.node == push.node
                    else EndpointIds(self.state_dir / IDS_FILE)
                )
                model = ClusterModel(push.node, ids, unenforced_l7=self.config.unenforced_l7)
            elif k is None or k.session != push.session or push.seq != k.seq + 1:
                return 409, {
                    "error": "not the next batch of the session this proxy follows",
                    "need": "reset",
                }
            else:
                model = k.model
            for kind, batch in push.batches:
                model.changes(kind, batch)
            for kind in push.synced:
                model.synced(kind)
            old = self.proxy.policy
            try:
                built = model.build()
                self.proxy.set_policy(built.policy, built.endpoints)
            except (ConfigError, BackendError, ValueError) as e:
                self.kube = None if k is None or push.reset else k
                if self.kube is not None:
                    self.kube.session = None  # the next batch must be a reset
                self.status.rejected("push", str(e))
                return 409, {"error": f"the objects cannot be put in force: {e}", "need": "reset"}
            if built.gone:
                self.proxy.forget_endpoints(built.gone)
            first = self.policy_state is not None or k is None
            self.kube = _KubeState(model, push.session, push.seq)
            self._refresh_owners()
            if first:  # objects replace a pushed policy: one source of truth in the state
                self.policy_state = None
                with contextlib.suppress(FileNotFoundError):
                    self.policy_path.unlink()
                if self.state.journal is not None:
                    self.state.journal.rotate(self._state_digest())
            self.status.applied(
                old,
                built.policy,
                source="agent",
                origin=[f"kubernetes node {push.node}"],
                digest=self._state_digest(),
                trigger="push",
            )
            self.status.invalid = model.invalid()
            self.status.invalid_total = model.invalid_total
            if first or time.monotonic() - self._kube_saved_at > KUBE_SAVE_INTERVAL:
                self._kube_saved_at = time.monotonic()
                try:
                    await asyncio.get_running_loop().run_in_executor(None, self.save)
                except (StateError, CacheError, OSError) as e:
                    log.error("the relayed objects are in force but not saved: %s", e)
        return 200, {
            "session": push.session,
            "seq": push.seq,
            "endpoints": len(built.endpoints),
            "policies": len(built.policy),
            "invalid": self.status.invalid,
        }

    async def _get_policy(self, _body: Any) -> tuple[int, Any]:
        return 200, self.status.to_json()

    async def _post_save(self, body: Any) -> tuple[int, Any]:
        """Saves now. A starting proxy names itself (``successor``: its instance id) and gets
        a nonce (``handover``): with it, and from the same process, it may then take the
        sockets (``POST /v1/sockets``), once."""
        successor = body.get("successor") if isinstance(body, dict) else None
        if successor is not None and (
            not isinstance(successor, int) or isinstance(successor, bool)
        ):
            return 400, {"error": "'successor' must be the starting proxy's instance id"}
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.save)
        except (StateError, CacheError, OSError) as e:
            return 409, {"error": f"not saved: {e}"}
        if successor is None:
            return 200, {"sequence": self.state.sequence}
        self._successor_asked = time.monotonic()
        peer = PEER.get()
        self._successor = _Successor(
            successor, peer.pid if peer else None, secrets.token_hex(16), time.monotonic()
        )
        return 200, {"sequence": self.state.sequence, "handover": self._successor.nonce}

    async def _post_sockets(self, body: Any) -> tuple[int, Any]:
        """A starting proxy takes the listening sockets it names (``{"want": [[kind, host,
        port], ...]}``) over (SCM_RIGHTS): both hold them until this one stops reading them,
        once the other one serves (see :meth:`_release_when_superseded`); queued queries are
        never lost in between. Sockets it does not name stay this proxy's alone."""
        assert self.proxy is not None
        want = body.get("want") if isinstance(body, dict) else None
        if not isinstance(want, list) or not all(isinstance(k, list) and len(k) == 3 for k in want):
            return 400, {"error": "'want' must list the [kind, host, port] of the listeners"}
        refused = self._may_take_sockets(body)
        if refused is not None:
            log.warning("refused the listening sockets to a caller: %s", refused)
            return 403, {"error": refused}
        successor, self._successor = self._successor, None  # once
        assert successor is not None
        wanted = {(k[0], k[1], k[2]) for k in want}
        listing = [s for s in self.proxy.handover_sockets() if (s[0], s[1], s[2]) in wanted]
        # Our own duplicates, now: a listener closed meanwhile cannot have its number reused
        # by another descriptor that would then be sent instead.
        fds = [os.dup(fd) for *_, fd in listing]
        self._sockets_passed = [(kind, host, port) for kind, host, port, _ in listing]
        self._released = False
        log.info(
            "handing %d listening sockets to the starting proxy %d",
            len(listing),
            successor.instance,
        )
        return 200, WithFds(
            {"sockets": [[kind, host, port] for kind, host, port, _ in listing]},
            fds,
            link=functools.partial(self._follow_link, successor.instance),
        )

    def _may_take_sockets(self, body: dict[str, Any]) -> str | None:
        """Why this caller may not take the sockets, or None: only the process that asked for
        our state as a successor (``POST /v1/save``), with the nonce it got, within
        SUCCESSOR_WAIT, once, and not while another one holds them."""
        successor, peer = self._successor, PEER.get()
        if self._sockets_passed:
            return "the sockets were handed over already"
        if successor is None:
            return "no starting proxy asked for this proxy's state (POST /v1/save) first"
        if time.monotonic() - successor.at > SUCCESSOR_WAIT:
            return f"asked more than {SUCCESSOR_WAIT:.0f} s after POST /v1/save"
        if body.get("handover") != successor.nonce or body.get("instance") != successor.instance:
            return "not the nonce and instance POST /v1/save gave"
        if peer is None or peer.pid != successor.pid:
            return "not the process that asked for the state"
        return None

    async def _post_adopt(self, body: Any) -> tuple[int, Any]:
        """The proxy this one took over from hands its cache over (see the module's text)."""
        assert self.proxy is not None
        name = body.get("file") if isinstance(body, dict) else None
        match = HANDOVER_NAME.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            return 400, {
                "error": f"file: want '{HANDOVER_PREFIX}<id>.<digest>' in the state directory"
            }
        path = self.state_dir / match.group(0)
        if match.group(1) != self._digest_tag():
            return 409, {"error": f"{path.name} was saved under another policy state"}
        loop = asyncio.get_running_loop()
        try:
            cache = await loop.run_in_executor(None, DnsCache.load, path)
        except (CacheError, OSError) as e:
            return 422, {"error": f"cannot load {path.name}: {e}"}
        # An id the other proxy gave a pod may name another pod here (pods created while both
        # ran get ids in each one's order), and the policy may have changed since it learned
        # them: only entries of the same pod that the policy still allows are carried over.
        every = cache.entries()
        owned = keep_owned(every, read_owners(path), self._owners)
        if len(owned) < len(every):
            log.warning("not adopting %d entries of endpoint ids that name other pods here",
                        len(every) - len(owned))  # fmt: skip
        entries, dropped = still_allowed(owned, self.proxy.policy, self.proxy.endpoints)
        if dropped:
            log.info("not adopting %d entries the policy in force no longer allows", dropped)
        changes = await self.proxy.adopt(entries)
        await self._revoke(dropped_pairs(every, entries))
        for gone in (path, owners_path(path)):
            gone.unlink(missing_ok=True)
        try:
            await loop.run_in_executor(None, self.save)
        except (CacheError, OSError, StateError) as e:
            log.error("saving the state failed: %s", e)
        log.info("adopted %d cache entries (%d changes) from %s", len(cache), changes, path.name)
        return 200, {"entries": len(cache), "changes": changes}

    async def _get_cache(self, query: Any) -> tuple[int, Any]:
        assert self.proxy is not None
        return cache_listing(self.proxy.cache, self.config, query)

    async def _get_endpoints(self, _body: Any) -> tuple[int, Any]:
        from fqdnguard.daemons.run import endpoint_names  # noqa: PLC0415

        assert self.proxy is not None
        return 200, endpoint_names(self.proxy.endpoints)

    async def _get_stats(self, _body: Any) -> tuple[int, Any]:
        assert self.proxy is not None
        return 200, {"engine": self.proxy.engine.stats(), "cache": self.proxy.cache.stats()}


def run_proxy(
    config: ProxyConfig,
    *,
    control_socket: str | os.PathLike[str] | None = None,
    socket_handover: str = "fds",
) -> None:
    """Runs ``fqdnguard proxy`` until SIGTERM/SIGINT on uvloop."""
    import uvloop  # noqa: PLC0415

    # Every file it writes (cache snapshot, journals, state) is this user's only, whatever the
    # state directory's mode lets others read.
    os.umask(0o077)

    async def main() -> None:
        daemon = ProxyDaemon(config, control_socket=control_socket, socket_handover=socket_handover)
        await daemon.run()

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main())
