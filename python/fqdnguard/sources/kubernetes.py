"""Policies, pods, namespaces, Services, EndpointSlices and Nodes from the Kubernetes API server.

Three layers, each replaceable on its own:

- :class:`KubeTransport`: the HTTP seam, ``list`` (paginated) and ``watch`` (decoded events),
  on kubernetes_asyncio's ``ApiClient`` in raw mode: the bodies are JSON-decoded here, never
  turned into the generated model classes (they cost CPU and memory for nothing we read).
  Anything with the same three coroutines (:class:`Transport`) can take its place.
- :class:`Informer`: list, then watch from the list's resourceVersion, into a local store of
  *projected* objects (only the fields fqdnguard reads), with bookmarks, a relist on 410 Gone
  that reports the difference against the store, and reconnects with capped exponential backoff
  and full jitter. The store survives an unreachable API server.
- :class:`KubernetesSource`: the informers fqdnguard needs, feeding a
  :class:`~fqdnguard.sources.base.Sink`, plus the pods elsewhere that policies can select
  (:meth:`KubernetesSource.set_pod_selectors`) and Events posted once per object and reason.

docs/kubernetes.md ("The source") describes the behaviour; ``deploy/kubernetes/rbac.yaml`` is
the least-privilege role it runs under.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from fqdnguard._core import FqdnGuardError
from fqdnguard.sources.base import Change, Sink

__all__ = [
    "ApiError",
    "ConfigError",
    "Gone",
    "Informer",
    "KubeTransport",
    "KubernetesError",
    "KubernetesSource",
    "Transport",
    "TransportError",
    "object_key",
    "project",
]

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Projector = Callable[[Obj], "Obj | None"]

# Pages of a list: 500 objects (client-go's default) keep a 10k-pod listing to pieces of a few
# MB instead of one 50 MB body.
PAGE_SIZE = 500
# A watch asks the server to end it after a random time in this range (client-go: 5 to 10
# minutes), so that all of a node's watches do not come back at once.
WATCH_TIMEOUT = (300.0, 600.0)
# Reconnects: full jitter over an exponential ceiling from 0.2 s doubling to 30 s.
BACKOFF = (0.2, 30.0)
# Above this many distinct toEndpoints selectors, one cluster-wide pod watch replaces them.
POD_SELECTOR_CAP = 32
# A watch event line longer than this is refused (etcd stores objects up to 1.5 MB).
MAX_EVENT_BYTES = 16 * 1024 * 1024
COMPONENT = "fqdnguard"


class KubernetesError(FqdnGuardError):
    """Talking to the Kubernetes API server failed; the message says what and where."""


class ConfigError(KubernetesError, ValueError):
    """The client configuration (kubeconfig, in-cluster service account) cannot be used."""


class TransportError(KubernetesError):
    """The API server could not be reached, or broke off, or sent something undecodable."""


class ApiError(KubernetesError):
    """The API server answered with an error Status (HTTP status or a watch ERROR event)."""

    def __init__(self, status: int, reason: str, message: str, path: str) -> None:
        super().__init__(f"{path}: {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.path = path

    @classmethod
    def from_status(cls, status: Mapping[str, Any], path: str, http: int = 0) -> ApiError:
        """From a ``Status`` object (an error body, or a watch ERROR event's object)."""
        code = status.get("code") if isinstance(status.get("code"), int) else http
        error = Gone if code == 410 else cls
        return error(
            int(code or 0),
            str(status.get("reason") or "Unknown"),
            str(status.get("message") or "no message"),
            path,
        )


class Gone(ApiError):
    """410 Gone: the resourceVersion asked for is older than what the server keeps; relist."""


# --- the transport seam ------------------------------------------------------------------------


class Transport(Protocol):
    """What an :class:`Informer` and the Event poster need from an API client."""

    async def list(
        self, path: str, params: Mapping[str, str], project: Projector | None = None
    ) -> tuple[list[Obj], str]:
        """Every object at ``path`` (paginated), each passed through ``project`` (None from it
        drops the object), and the list's resourceVersion."""
        ...

    def watch(self, path: str, params: Mapping[str, str]) -> AsyncIterator[Obj]:
        """The decoded watch events (``{"type", "object"}``) until the server ends the watch."""
        ...

    async def create(self, path: str, body: Obj) -> Obj:
        """POST ``body`` to ``path``; the created object (ApiError 409 if it exists)."""
        ...

    async def close(self) -> None: ...


def _status_body(raw: bytes) -> Mapping[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        return {"message": raw[:200].decode("utf-8", "replace")}
    return body if isinstance(body, dict) else {}


class KubeTransport:
    """:class:`Transport` on kubernetes_asyncio's ApiClient, raw: no generated models.

    :meth:`connect` reads the in-cluster service account (token and CA under
    ``/var/run/secrets/kubernetes.io/serviceaccount``, ``KUBERNETES_SERVICE_HOST``) or, given a
    path, a kubeconfig (client certificates and bearer tokens)."""

    def __init__(self, api: Any, *, page_size: int = PAGE_SIZE) -> None:
        self._api = api
        self.page_size = page_size

    @classmethod
    async def connect(
        cls, kubeconfig: str | Path | None = None, *, context: str | None = None
    ) -> KubeTransport:
        # Imported here: only the Kubernetes source needs the client library.
        from kubernetes_asyncio import config  # noqa: PLC0415
        from kubernetes_asyncio.client import ApiClient, Configuration  # noqa: PLC0415

        conf = Configuration()
        where = f"kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster service account"
        try:
            if kubeconfig is None:
                config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
            else:
                if not Path(kubeconfig).is_file():
                    raise ConfigError(f"kubeconfig {kubeconfig}: no such file")
                await config.load_kube_config(
                    config_file=str(kubeconfig),
                    context=context,
                    client_configuration=conf,
                    persist_config=False,
                )
        except ConfigError:
            raise
        except Exception as e:  # the loaders raise ConfigException, OSError, YAML errors...
            raise ConfigError(f"cannot use {where}: {e}") from e
        api = ApiClient(conf)
        from fqdnguard import __version__  # noqa: PLC0415 (the package imports this module late)

        api.user_agent = f"fqdnguard/{__version__}"
        return cls(api)

    async def close(self) -> None:
        await self._api.close()

    async def _request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str],
        timeout: aiohttp.ClientTimeout,
        body: Obj | None = None,
    ) -> aiohttp.ClientResponse:
        try:
            response: aiohttp.ClientResponse = await self._api.call_api(
                path,
                method,
                query_params=list(params.items()),
                header_params={"Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise TransportError(f"{method} {path}: {type(e).__name__}: {e}") from e
        return response

    async def _json(
        self,
        method: str,
        path: str,
        params: Mapping[str, str],
        body: Obj | None = None,
    ) -> Obj:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
        response = await self._request(method, path, params, timeout, body)
        async with response:
            try:
                raw = await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise TransportError(f"{method} {path}: {type(e).__name__}: {e}") from e
            if response.status >= 300:
                raise ApiError.from_status(_status_body(raw), path, response.status)
        try:
            decoded = json.loads(raw)
        except ValueError as e:
            raise TransportError(f"{method} {path}: the answer is not JSON: {e}") from e
        if not isinstance(decoded, dict):
            raise TransportError(f"{method} {path}: the answer is not a JSON object")
        return decoded

    async def list(
        self, path: str, params: Mapping[str, str], project: Projector | None = None
    ) -> tuple[list[Obj], str]:
        items: list[Obj] = []
        version: str | None = None
        token: str | None = None
        while True:
            query = {**params, "limit": str(self.page_size)}
            if token:
                query["continue"] = token
            page = await self._json("GET", path, query)
            meta = page.get("metadata") or {}
            if version is None:  # every page is of the first page's snapshot
                version = str(meta.get("resourceVersion") or "")
            for item in page.get("items") or ():
                if not isinstance(item, dict):
                    continue
                kept = project(item) if project is not None else item
                if kept is not None:
                    items.append(kept)
            token = meta.get("continue")
            if not token:
                break
        if not version:
            raise TransportError(f"GET {path}: the list has no resourceVersion")
        return items, version

    async def watch(self, path: str, params: Mapping[str, str]) -> AsyncIterator[Obj]:
        seconds = float(params.get("timeoutSeconds") or WATCH_TIMEOUT[1])
        # The server ends the watch after timeoutSeconds; a silent connection is broken after that
        # plus a margin (no network partition holds a watch for ever).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=seconds + 30)
        response = await self._request("GET", path, {**params, "watch": "true"}, timeout)
        async with response:
            if response.status != 200:
                raw = await response.read()
                raise ApiError.from_status(_status_body(raw), path, response.status)
            pending = bytearray()
            try:
                async for chunk in response.content.iter_any():
                    start = len(pending)
                    pending += chunk
                    while (end := pending.find(b"\n", start)) >= 0:
                        line = bytes(pending[:end])
                        del pending[: end + 1]
                        start = 0
                        if line.strip():
                            yield _decode_event(line, path)
                    if len(pending) > MAX_EVENT_BYTES:
                        raise TransportError(
                            f"watch {path}: an event longer than {MAX_EVENT_BYTES} bytes"
                        )
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise TransportError(f"watch {path}: {type(e).__name__}: {e}") from e
            if pending.strip():
                yield _decode_event(bytes(pending), path)

    async def create(self, path: str, body: Obj) -> Obj:
        return await self._json("POST", path, {}, body)


def _decode_event(line: bytes, path: str) -> Obj:
    try:
        event = json.loads(line)
    except ValueError as e:
        raise TransportError(f"watch {path}: an event is not JSON: {e}") from e
    if (
        not isinstance(event, dict)
        or not isinstance(event.get("type"), str)
        or not isinstance(event.get("object"), dict)
    ):
        raise TransportError(f"watch {path}: an event without a type and an object")
    return event


# --- projections ---------------------------------------------------------------------------------

_META = ("name", "namespace", "uid", "labels", "resourceVersion", "deletionTimestamp")


def _meta(obj: Obj, labels: Callable[[dict[str, str]], dict[str, str]] | None = None) -> Obj:
    meta = obj.get("metadata") or {}
    out = {k: meta[k] for k in _META if k in meta}
    if labels is not None and "labels" in out:
        out["labels"] = labels(out["labels"])
    return out


def _pick(source: Mapping[str, Any] | None, *fields: str) -> Obj:
    source = source or {}
    return {k: source[k] for k in fields if k in source}


def _pod(obj: Obj) -> Obj:
    spec = obj.get("spec") or {}
    out_spec = _pick(spec, "nodeName", "serviceAccountName", "hostNetwork")
    out_spec["containers"] = [
        _pick(c, "name", "ports") for c in spec.get("containers") or () if isinstance(c, dict)
    ]
    return {
        "metadata": _meta(obj),
        "spec": out_spec,
        "status": _pick(obj.get("status"), "podIPs", "phase"),
    }


def _namespace(obj: Obj) -> Obj:
    return {"metadata": _meta(obj)}


def _service(obj: Obj) -> Obj:
    fields = ("clusterIP", "clusterIPs", "ports", "selector", "type")
    return {"metadata": _meta(obj), "spec": _pick(obj.get("spec"), *fields)}


SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def _endpoint(endpoint: Obj) -> Obj:
    out = _pick(endpoint, "addresses", "targetRef", "nodeName")
    out["conditions"] = _pick(endpoint.get("conditions"), "ready", "serving", "terminating")
    return out


def _endpointslice(obj: Obj) -> Obj:
    return {
        "metadata": _meta(obj, lambda labels: _pick(labels, SERVICE_NAME_LABEL)),
        "addressType": obj.get("addressType"),
        "endpoints": [_endpoint(e) for e in obj.get("endpoints") or () if isinstance(e, dict)],
        "ports": obj.get("ports") or [],
    }


def _node(obj: Obj) -> Obj:
    return {
        "metadata": _meta(obj),
        "spec": _pick(obj.get("spec"), "podCIDR", "podCIDRs"),
        "status": _pick(obj.get("status"), "addresses"),
    }


def _policy(obj: Obj) -> Obj:
    return {"metadata": _meta(obj), **_pick(obj, "spec", "specs")}


_PROJECTIONS: dict[str, Callable[[Obj], Obj]] = {
    "Pod": _pod,
    "Namespace": _namespace,
    "Service": _service,
    "EndpointSlice": _endpointslice,
    "Node": _node,
    "CiliumNetworkPolicy": _policy,
    "CiliumClusterwideNetworkPolicy": _policy,
}


def project(kind: str, obj: Obj) -> Obj:
    """``obj`` cut down to what fqdnguard reads of a ``kind`` (see docs/kubernetes.md)."""
    return _PROJECTIONS[kind](obj)


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name``, or ``name`` for a cluster-scoped object (as in :class:`Change`)."""
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError("the object has no metadata.name")
    namespace = meta.get("namespace") if isinstance(meta, dict) else None
    return f"{namespace}/{name}" if namespace else name


def _version(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    value = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def _api_version(path: str) -> str:
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        return parts[1]
    return f"{parts[1]}/{parts[2]}"


# --- the informer --------------------------------------------------------------------------------


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, base * 2 ** min(attempt, 32)))


class Informer:
    """One list+watch of ``path`` (with query ``params``, e.g. a fieldSelector) into a store.

    ``run()`` runs until cancelled: list (no resourceVersion: a consistent read, never an older
    cache), deliver the difference against the store and ``synced(kind)``, then watch from the
    list's resourceVersion with bookmarks, resuming from the last resourceVersion seen when a
    watch ends. A 410 Gone relists. Errors are retried with capped exponential backoff and full
    jitter; the last one is in :attr:`error` (and logged) until a list or watch succeeds. The
    store keeps its objects meanwhile.

    ``project`` cuts an object down to what the consumer reads; an object it cannot project (it
    raises) is logged and skipped, and the store keeps the last good version of it.
    """

    def __init__(
        self,
        transport: Transport,
        kind: str,
        path: str,
        params: Mapping[str, str],
        project: Callable[[Obj], Obj],
        *,
        sink: Sink,
        watch_timeout: tuple[float, float] = WATCH_TIMEOUT,
        backoff: tuple[float, float] = BACKOFF,
        rng: random.Random | None = None,
    ) -> None:
        self.transport = transport
        self.kind = kind
        self.path = path
        self.params = dict(params)
        self.project = project
        self.sink = sink
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self.rng = rng or random.Random()
        self.api_version = _api_version(path)
        self.store: dict[str, Obj] = {}
        self.resource_version: str | None = None
        self.synced = False
        self.error: KubernetesError | None = None
        # Counters, for the status and the tests.
        self.lists = 0
        self.watches = 0
        self.bookmarks = 0
        self.gone = 0
        self.skipped = 0
        self.failures = 0

    def __repr__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.params.items())
        return f"Informer({self.kind} {self.path}{'?' + query if query else ''})"

    def status(self) -> Obj:
        return {
            "kind": self.kind,
            "path": self.path,
            "params": dict(self.params),
            "synced": self.synced,
            "objects": len(self.store),
            "resourceVersion": self.resource_version,
            "error": str(self.error) if self.error else None,
            "lists": self.lists,
            "watches": self.watches,
            "bookmarks": self.bookmarks,
            "gone": self.gone,
            "skipped": self.skipped,
            "failures": self.failures,
        }

    def _projected(self, obj: Obj) -> Obj | None:
        try:
            object_key(obj)
            out = self.project(obj)
        except Exception as e:  # a malformed object must not stop the others
            self.skipped += 1
            log.warning("%s: skipping an object that cannot be read: %s", self, e)
            return None
        out.setdefault("apiVersion", self.api_version)
        out.setdefault("kind", self.kind)
        return out

    async def run(self) -> None:
        attempt = 0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self.resource_version is None:
                    await self._relist()
                    attempt = 0
                started = loop.time()
                if await self._watch() or loop.time() - started >= 1.0:
                    attempt = 0
                    continue  # ended by its timeout: resume from the last resourceVersion
                # Ended at once with nothing: a server going down or something in between
                # closing watches. Wait as after an error rather than spin.
            except Gone as e:
                self.gone += 1
                self.resource_version = None
                log.info("%s: %s; relisting", self, e)
                if attempt == 0:
                    attempt = 1
                    continue  # the first relist at once
            except (ApiError, TransportError) as e:
                # Logged when it starts or changes, not at every retry of the same failure.
                repeated = self.error is not None and str(self.error) == str(e)
                log.log(logging.DEBUG if repeated else logging.WARNING, "%s: %s", self, e)
                self.error = e
                self.failures += 1
            delay = backoff_delay(attempt, *self.backoff, self.rng)
            attempt += 1
            await asyncio.sleep(delay)

    async def _relist(self) -> None:
        items, version = await self.transport.list(self.path, self.params, self._projected)
        fresh: dict[str, Obj] = {}
        for obj in items:
            fresh[object_key(obj)] = obj
        batch = [
            Change(self.kind, key, obj)
            for key, obj in fresh.items()
            if (old := self.store.get(key)) is None or _version(old) != _version(obj)
        ]
        batch += [Change(self.kind, key, None) for key in self.store.keys() - fresh.keys()]
        self.store = fresh
        self.resource_version = version
        self.lists += 1
        self._recovered()
        if batch:
            self.sink.changes(self.kind, batch)
        self.synced = True
        self.sink.synced(self.kind)

    async def _watch(self) -> bool:
        """One watch until the server ends it; whether it delivered anything."""
        assert self.resource_version is not None
        low, high = self.watch_timeout
        params = {
            **self.params,
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(max(1, round(self.rng.uniform(low, high)))),
        }
        self.watches += 1
        delivered = False
        events = self.transport.watch(self.path, params)
        try:
            async for event in events:
                self._event(event)
                delivered = True
                self._recovered()
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
        return delivered

    def _recovered(self) -> None:
        if self.error is not None:
            log.warning("%s: working again after: %s", self, self.error)
            self.error = None

    def _event(self, event: Obj) -> None:
        kind, raw = event["type"], event["object"]
        if kind == "ERROR":
            raise ApiError.from_status(raw, self.path)
        version = _version(raw)
        if kind == "BOOKMARK":
            if version:
                self.resource_version = version
                self.bookmarks += 1
            return
        if kind == "DELETED":
            try:
                key = object_key(raw)
            except ValueError:
                self.skipped += 1
            else:
                if self.store.pop(key, None) is not None:
                    self.sink.changes(self.kind, [Change(self.kind, key, None)])
        elif kind in ("ADDED", "MODIFIED"):
            obj = self._projected(raw)
            if obj is not None:
                key = object_key(obj)
                old = self.store.get(key)
                self.store[key] = obj
                if old is None or _version(old) != version:
                    self.sink.changes(self.kind, [Change(self.kind, key, obj)])
        else:
            log.warning("%s: ignoring a watch event of type %r", self, kind)
        if version:
            self.resource_version = version


# --- the source ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Watch:
    kind: str
    path: str
    params: tuple[tuple[str, str], ...] = ()


# What every node watches whole (the node's own pods are added with its name).
CLUSTER_WATCHES = (
    _Watch("CiliumNetworkPolicy", "/apis/cilium.io/v2/ciliumnetworkpolicies"),
    _Watch("CiliumClusterwideNetworkPolicy", "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies"),
    _Watch("Namespace", "/api/v1/namespaces"),
    _Watch("Service", "/api/v1/services"),
    _Watch("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices"),
    _Watch("Node", "/api/v1/nodes"),
)

PodSelector = tuple["str | None", str]


def _newer(a: Obj, b: Obj) -> bool:
    """Whether ``a`` is a later state of the object than ``b``. resourceVersions are opaque
    strings to clients, but every API server on etcd 3 gives etcd revisions (integers); when both
    are, the larger wins, so that a lagging watch never takes a pod back in time."""
    va, vb = _version(a), _version(b)
    if va is not None and vb is not None and va.isdigit() and vb.isdigit():
        return int(va) > int(vb)
    return va != vb


class _PodMerge:
    """The pods of several informers (this node's, and one per selector for the others) as one
    "Pod" stream: a pod is reported while at least one informer holds it, in its newest version,
    and deleted when the last one lets it go."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.held: dict[str, dict[int, Obj]] = {}
        self.reported: dict[str, Obj] = {}

    def feed(self, informer: int, batch: Iterable[Change]) -> None:
        out: list[Change] = []
        for change in batch:
            holders = self.held.setdefault(change.key, {})
            if change.obj is None:
                holders.pop(informer, None)
            else:
                holders[informer] = change.obj
            self._settle(change.key, out)
        if out:
            self.sink.changes("Pod", out)

    def drop(self, informer: int) -> None:
        """An informer stopped: what only it held is deleted."""
        out: list[Change] = []
        for key in [k for k, h in self.held.items() if informer in h]:
            del self.held[key][informer]
            self._settle(key, out)
        if out:
            self.sink.changes("Pod", out)

    def _settle(self, key: str, out: list[Change]) -> None:
        holders = self.held.get(key)
        if not holders:
            self.held.pop(key, None)
            if self.reported.pop(key, None) is not None:
                out.append(Change("Pod", key, None))
            return
        newest = None
        for obj in holders.values():
            if newest is None or _newer(obj, newest):
                newest = obj
        assert newest is not None
        last = self.reported.get(key)
        if last is None or (_version(last) != _version(newest) and _newer(newest, last)):
            self.reported[key] = newest
            out.append(Change("Pod", key, newest))


class _MergeSink:
    def __init__(self, source: KubernetesSource, informer: int) -> None:
        self.source = source
        self.informer = informer

    def changes(self, kind: str, batch: list[Change]) -> None:
        self.source._pods.feed(self.informer, batch)

    def synced(self, kind: str) -> None:
        self.source._pod_informer_synced()


@dataclass
class _Running:
    informer: Informer
    task: asyncio.Task[None]
    id: int


class KubernetesSource:
    """The Kubernetes API server as a source for the agent (see :mod:`fqdnguard.sources.base`).

    Watches CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy (cilium.io/v2) everywhere,
    the pods on node ``node_name``, Namespaces, Services, EndpointSlices and Nodes, and the pods
    on other nodes that the selectors given to :meth:`set_pod_selectors` pick. Each kind's
    changes go to ``sink``, pods from all pod watches merged into one "Pod" stream.

    ``kubeconfig`` None uses the in-cluster service account. ``transport`` replaces the client
    (it is then not closed by the source).
    """

    def __init__(
        self,
        sink: Sink,
        node_name: str,
        kubeconfig: str | Path | None = None,
        *,
        transport: Transport | None = None,
        selector_cap: int = POD_SELECTOR_CAP,
        watch_timeout: tuple[float, float] = WATCH_TIMEOUT,
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        if not node_name:
            raise ConfigError("the node name is empty (--node-name, or NODE_NAME)")
        self.sink = sink
        self.node_name = node_name
        self.kubeconfig = kubeconfig
        self.selector_cap = selector_cap
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self._transport = transport
        self._owns_transport = transport is None
        self._connecting = asyncio.Lock()
        self._informers: list[_Running] = []
        self._pods = _PodMerge(sink)
        self._local_pods: _Running | None = None
        self._selected: dict[PodSelector, _Running] = {}
        self._retiring: list[_Running] = []
        self._selectors: list[PodSelector] = []
        self._next_id = 0
        self._running = False
        self._stopping = asyncio.Event()
        self._posted: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # every informer still running

    # lifecycle

    async def _connect(self) -> Transport:
        async with self._connecting:
            if self._transport is None:
                self._transport = await KubeTransport.connect(self.kubeconfig)
            return self._transport

    def _start(self, watch: _Watch, sink: Sink | None = None) -> _Running:
        assert self._transport is not None
        self._next_id += 1
        informer = Informer(
            self._transport,
            watch.kind,
            watch.path,
            dict(watch.params),
            _PROJECTIONS[watch.kind],
            sink=sink or _MergeSink(self, self._next_id),
            watch_timeout=self.watch_timeout,
            backoff=self.backoff,
        )
        task = asyncio.get_running_loop().create_task(informer.run(), name=repr(informer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return _Running(informer, task, self._next_id)

    async def run(self) -> None:
        """Watch until :meth:`stop`; then stop every watch and close the client."""
        if self._running:
            raise RuntimeError("KubernetesSource.run() is already running")
        self._running = True
        try:
            await self._connect()
            for watch in CLUSTER_WATCHES:
                self._informers.append(self._start(watch, self.sink))
            local = _Watch(
                "Pod", "/api/v1/pods", (("fieldSelector", f"spec.nodeName={self.node_name}"),)
            )
            self._local_pods = self._start(local)
            self._apply_selectors()
            await self._stopping.wait()
        finally:
            # Every informer, retired ones still unwinding included, is done before the
            # client closes under them.
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._informers, self._selected, self._retiring = [], {}, []
            self._local_pods = None
            if self._owns_transport and self._transport is not None:
                await self._transport.close()
                self._transport = None
            self._running = False

    def stop(self) -> None:
        """Make :meth:`run` return (it stops the watches and closes the client first)."""
        self._stopping.set()

    async def close(self) -> None:
        """Close the client of a source that posted Events without running (run() closes it
        itself when it returns)."""
        if not self._running and self._owns_transport and self._transport is not None:
            await self._transport.close()
            self._transport = None

    # remote pods

    def set_pod_selectors(self, selectors: Iterable[PodSelector]) -> None:
        """The pods on other nodes to watch: distinct ``(namespace or None, label selector)``
        pairs (a policy's toEndpoints; None: every namespace). One watch per pair; above
        ``selector_cap`` pairs, one watch of every pod on other nodes instead. Watches no longer
        wanted stop once the new ones have listed, so a pod that stays selected is not deleted
        and added again in between."""
        self._selectors = sorted(set(selectors), key=lambda s: (s[0] or "", s[1]))
        if self._running and self._local_pods is not None:
            self._apply_selectors()

    def _pod_watch(self, selector: PodSelector | None) -> _Watch:
        elsewhere = ("fieldSelector", f"spec.nodeName!={self.node_name}")
        if selector is None:
            return _Watch("Pod", "/api/v1/pods", (elsewhere,))
        namespace, labels = selector
        path = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
        params = (elsewhere, ("labelSelector", labels)) if labels else (elsewhere,)
        return _Watch("Pod", path, params)

    def _apply_selectors(self) -> None:
        # Above the cap, one watch of every pod on other nodes (None).
        too_many = len(self._selectors) > self.selector_cap
        wanted: list[PodSelector | None] = [None] if too_many else list(self._selectors)
        current = dict(self._selected)
        self._selected = {}
        for selector in wanted:
            key: PodSelector = selector if selector is not None else ("*", "")
            running = current.pop(key, None)
            self._selected[key] = running or self._start(self._pod_watch(selector))
        self._retiring += current.values()
        self._retire()

    def _pod_informer_synced(self) -> None:
        self._retire()
        pods = [self._local_pods, *self._selected.values()]
        if all(r is not None and r.informer.synced for r in pods):
            self.sink.synced("Pod")

    def _retire(self) -> None:
        """Stop the pod watches no longer wanted once their replacements have listed."""
        if not self._retiring or not all(r.informer.synced for r in self._selected.values()):
            return
        for running in self._retiring:
            running.task.cancel()
            self._pods.drop(running.id)
        self._retiring = []

    @property
    def pod_watches(self) -> list[str]:
        """The pod watches of other nodes running now, as ``path?query`` (for the status)."""
        return [
            r.informer.path + "?" + "&".join(f"{k}={v}" for k, v in r.informer.params.items())
            for r in self._selected.values()
        ]

    def status(self) -> dict[str, list[Obj]]:
        """Per kind, the state of its watches (synced, objects, last error...)."""
        out: dict[str, list[Obj]] = {}
        running = [*self._informers, *self._selected.values()]
        if self._local_pods is not None:
            running.insert(0, self._local_pods)
        for r in running:
            out.setdefault(r.informer.kind, []).append(r.informer.status())
        return out

    def errors(self) -> dict[str, str]:
        """The kinds whose watch is failing now, with the last error (e.g. 403 Forbidden)."""
        return {
            kind: state["error"]
            for kind, states in self.status().items()
            for state in states
            if state["error"]
        }

    # Events

    async def post_event(
        self, obj_ref: Mapping[str, Any], reason: str, message: str, type: str = "Warning"
    ) -> str:
        """Post an Event about an object, once per object and reason across the cluster: the
        Event's name is derived from the object's uid and the reason, so the second node to
        post gets AlreadyExists and leaves it. ``obj_ref``: apiVersion, kind, name, namespace
        (absent for a cluster-scoped object: its Events go to "default") and uid, as in the
        object's metadata. Returns "created", "exists" or "failed" (logged); never raises for
        the API server's sake."""
        uid, name = str(obj_ref.get("uid") or ""), str(obj_ref.get("name") or "")
        if not uid or not name:
            raise ValueError("an Event needs the object's name and uid")
        if (uid, reason) in self._posted:
            return "exists"
        namespace = str(obj_ref.get("namespace") or "") or "default"
        digest = hashlib.sha256(f"{uid}\0{reason}".encode()).hexdigest()[:16]
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        involved = {
            k: obj_ref[k]
            for k in ("apiVersion", "kind", "name", "namespace", "uid")
            if obj_ref.get(k)
        }
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name[:200]}.{COMPONENT}.{digest}", "namespace": namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message[:1024],
            "type": type,
            "source": {"component": COMPONENT, "host": self.node_name},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            transport = await self._connect()
            await transport.create(f"/api/v1/namespaces/{namespace}/events", event)
        except ApiError as e:
            if e.status != 409:
                log.warning("posting Event %s for %s: %s", reason, name, e)
                return "failed"
            result = "exists"
        except KubernetesError as e:
            log.warning("posting Event %s for %s: %s", reason, name, e)
            return "failed"
        else:
            result = "created"
        self._posted.add((uid, reason))
        return result
