"""The cluster as the agent sees it: Kubernetes objects in, endpoints and a policy out.

A :class:`ClusterModel` is the :class:`~fqdnguard.sources.base.Sink` of a source. It keeps the
objects it is fed (projected, as the source delivers them), reads each policy object once when
it changes, and on :meth:`ClusterModel.build` turns the whole into what the proxy runs:

- the **endpoints**: this node's pods with addresses (not host-networked, not finished), with
  their labels, their namespace's labels (``io.cilium.k8s.namespace.labels.*``), the service
  account and cluster labels, as Cilium gives them, and an id that a pod keeps for its life and
  across restarts (:class:`EndpointIds`, saved in the state directory);
- the **cluster facts** (:class:`~fqdnguard.cluster.Cluster`): nodes, Services with the
  backends their EndpointSlices list, the API server's addresses, and every pod a
  ``toEndpoints`` may select (``peers``);
- the **policy**, compiled for this node's endpoints only (:func:`fqdnguard.policy.assemble`).

Bad objects never make anything more permissive. A policy object that becomes invalid keeps
its last good version in force; a new one that is invalid puts the endpoints it selects into
egress default deny (:func:`fqdnguard.policy.deny_specs`). Cilium's agent skips such a policy
instead: a deliberate difference (docs/kubernetes.md). Each is reported once per object and
reason (``report``), counted, and listed by :meth:`ClusterModel.invalid`.

An address two pods claim at once belongs to neither (refused as an unknown source) until one
lets it go; a pod that is deleted gives its id up for good, so a pod that later reuses its
address starts with nothing learned (:attr:`Built.gone`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fqdnguard.cluster import Cluster, Node, Service, ServicePort
from fqdnguard.control import atomic_write
from fqdnguard.endpoints import (
    NAMESPACE_LABEL,
    SERVICEACCOUNT_LABEL,
    Endpoint,
    Endpoints,
    Selector,
)
from fqdnguard.policy import (
    CCNP,
    CNP,
    ParsedObject,
    Policy,
    assemble,
    deny_specs,
    parse_object,
    to_endpoints_selectors,
)
from fqdnguard.sources.base import Change

__all__ = [
    "KINDS",
    "Built",
    "ClusterModel",
    "EndpointIds",
    "pod_selectors",
]

log = logging.getLogger("fqdnguard.sources")

POD, NAMESPACE, SERVICE, SLICE, NODE = "Pod", "Namespace", "Service", "EndpointSlice", "Node"
KINDS = (CNP, CCNP, POD, NAMESPACE, SERVICE, SLICE, NODE)
POLICY_KINDS = (CNP, CCNP)
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: Ids of other nodes' pods (peers only, never sources) start here; this node's pods get ids
#: below it from :class:`EndpointIds`.
PEER_IDS = 1 << 31
#: What reading an object of an unexpected shape raises (a corrupted state file, a relayed
#: object): the object is left out, failing closed, and the others are built.
UNREADABLE = (AttributeError, KeyError, TypeError, ValueError)
#: A Service whose EndpointSlices cannot all be read: left out.
BROKEN: tuple[list[str], dict[str, int]] = ([], {})
#: Selectors whose matches are remembered (beyond four times this, the memory starts over).
MAX_SELECTORS_HELD = 50_000
#: The file of the state directory that keeps pod UID -> endpoint id.
IDS_FILE = "endpoint-ids.json"
#: The file of the state directory that keeps the objects last seen, to serve from at start.
OBJECTS_FILE = "kubernetes.json"


class EndpointIds:
    """Pod UID -> endpoint id, kept in the state directory so that a restart gives every pod
    the id it had (and the saved cache, keyed by id, stays valid). Ids are never given twice:
    the next id only grows, and a released id is gone."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._ids: dict[str, int] = {}
        self._next = 1
        self._dirty = False
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                ids = {str(k): int(v) for k, v in data["ids"].items()}
                nxt = int(data["next"])
                if not all(0 < i < PEER_IDS for i in [*ids.values(), nxt - 1]) or len(
                    set(ids.values())
                ) != len(ids):
                    raise ValueError("ids out of range or given twice")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                # Losing the map loses nothing enforced (the cache keeps its entries under the
                # old ids until they lapse); pods then get new ids and learn afresh.
                log.error("%s: unreadable (%s); endpoint ids start afresh", self.path, e)
            else:
                self._ids = ids
                self._next = max([nxt, *(i + 1 for i in ids.values())])

    def id_for(self, uid: str) -> int:
        found = self._ids.get(uid)
        if found is None:
            if self._next >= PEER_IDS:
                raise OverflowError("endpoint ids exhausted")
            found = self._ids[uid] = self._next
            self._next += 1
            self._dirty = True
        return found

    def get(self, uid: str) -> int | None:
        return self._ids.get(uid)

    def release(self, uid: str) -> int | None:
        gone = self._ids.pop(uid, None)
        if gone is not None:
            self._dirty = True
        return gone

    def uids(self) -> list[str]:
        return list(self._ids)

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        data = {"ids": self._ids, "next": self._next}
        atomic_write(self.path, json.dumps(data, separators=(",", ":")).encode())
        self._dirty = False

    def __len__(self) -> int:
        return len(self._ids)


@dataclass
class _PolicyObject:
    kind: str
    key: str
    uid: str
    #: The last version that was valid (None: never was).
    good: ParsedObject | None = None
    #: Why the current version is invalid (None: it is valid).
    error: str | None = None
    #: The stand-in of a new invalid object (see deny_specs).
    stand_in: list[Any] | None = None


@dataclass(frozen=True)
class Built:
    """What one build gives the proxy."""

    policy: Policy
    endpoints: Endpoints
    cluster: Cluster
    #: Endpoint ids of pods deleted since the last build: what they learned must go.
    gone: tuple[int, ...] = ()
    #: The distinct (namespace or None, label selector) of every toEndpoints, for the source.
    pod_selectors: tuple[tuple[str | None, str], ...] = ()
    #: Problems of this build (IP conflicts), for the log.
    notes: tuple[str, ...] = field(default_factory=tuple)


Report = Callable[[str, dict[str, Any], str, str], None]


class ClusterModel:
    """Kubernetes objects -> endpoints, cluster facts and policy (see the module's text).

    ``node``: the name of the node this agent runs on. ``report(kind, obj, reason, message)`` is
    called once per policy object and reason when an object is invalid (the source posts it as
    a Kubernetes Event). ``on_change()`` is called after each batch of changes."""

    def __init__(
        self,
        node: str,
        ids: EndpointIds | None = None,
        *,
        unenforced_l7: str = "deny",
        report: Report | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.node = node
        self.ids = ids if ids is not None else EndpointIds()
        self.unenforced_l7 = unenforced_l7
        self.report = report
        self.on_change = on_change
        self.stores: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in KINDS}
        self._policies: dict[tuple[str, str], _PolicyObject] = {}
        self._synced: set[str] = set()
        #: Keys restored from the state directory and not seen again since the source started:
        #: deleted meanwhile unless a listing shows them again (see synced()).
        self._unconfirmed: dict[str, set[str]] = {}
        self._reported: set[tuple[str, str]] = set()
        self._peer_ids: dict[str, int] = {}
        self._next_peer = PEER_IDS
        self._released: list[int] = []
        #: (kind, key) of objects that cannot be read, each logged once until it changes.
        self._bad: set[tuple[str, str]] = set()
        #: Pod key -> (pod object, namespace object, id, endpoint): an endpoint is made again
        #: only when its pod, its namespace or its id changed (objects are replaced, not edited).
        self._endpoints: dict[str, tuple[Any, Any, int, Endpoint | None]] = {}
        #: Selector -> the label sets (Endpoint.key) of this node's endpoints it matches.
        self._matches: dict[Selector, set[Any]] = {}
        self._keys: dict[Any, Any] = {}
        self.version = 0
        self.invalid_total = 0

    # -- the sink ---------------------------------------------------------------------------

    def changes(self, kind: str, batch: list[Change]) -> None:
        store = self.stores.get(kind)
        if store is None:
            return
        unconfirmed = self._unconfirmed.get(kind)
        for c in batch:
            self._bad.discard((kind, c.key))
            if unconfirmed is not None:
                unconfirmed.discard(c.key)
            if c.obj is None:
                old = store.pop(c.key, None)
                if kind == POD and old is not None:
                    self._pod_deleted(old)
                    self._endpoints.pop(c.key, None)
            else:
                old = store.get(c.key)
                if kind == POD and old is not None and _uid(old) != _uid(c.obj):
                    self._pod_deleted(old)  # replaced under the same name: a new pod
                store[c.key] = c.obj
            if kind in POLICY_KINDS:
                self._policy_changed(kind, c.key, c.obj)
        self.version += 1
        if self.on_change is not None:
            self.on_change()

    def synced(self, kind: str) -> None:
        self._synced.add(kind)
        stale = self._unconfirmed.pop(kind, set())
        if stale:
            log.info("%d %s object(s) of the saved state are gone", len(stale), kind)
            self.changes(kind, [Change(kind, key, None) for key in sorted(stale)])
        if kind == POD:
            # Pods deleted while nobody watched: their ids (and what they learned) go now.
            present = {_uid(p) for p in self.stores[POD].values()}
            for uid in self.ids.uids():
                if uid not in present:
                    gone = self.ids.release(uid)
                    if gone is not None:
                        self._released.append(gone)

    def is_synced(self, kinds: Iterable[str] = KINDS) -> bool:
        return all(k in self._synced for k in kinds)

    # -- policies ---------------------------------------------------------------------------

    def _policy_changed(self, kind: str, key: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self._policies.pop((kind, key), None)
            return
        uid = _uid(obj) or key
        entry = self._policies.get((kind, key))
        if entry is None or entry.uid != uid:  # new, or deleted and made again
            entry = self._policies[(kind, key)] = _PolicyObject(kind, key, uid)
        origin = f"{kind} {key}"
        parsed = parse_object(obj, origin, unenforced_l7=self.unenforced_l7)
        if parsed.ok:
            if entry.error is not None:
                log.info("%s is valid again", origin)
            entry.good, entry.error, entry.stand_in = parsed, None, None
            for w in parsed.warnings:
                log.warning("%s", w)
            return
        reason = "; ".join(f"{e.path}: {e.reason}" if e.path else e.reason for e in parsed.errors)
        entry.error = reason
        if entry.good is None:
            entry.stand_in = deny_specs(obj, kind, origin)
            effect = "the endpoints it selects are in egress default deny until it is fixed"
        else:
            effect = "its last valid version stays in force"
        log.error("%s is invalid (%s); %s", origin, reason, effect)
        self.invalid_total += 1
        if self.report is not None and (uid, reason) not in self._reported:
            self._reported.add((uid, reason))
            try:
                self.report(kind, obj, "InvalidPolicy", f"{reason}; {effect}")
            except Exception:  # the report is a courtesy; the verdicts never depend on it
                log.exception("reporting %s failed", origin)

    def invalid(self) -> list[dict[str, Any]]:
        """Every policy object whose current version is invalid, and what is in force for it."""
        return [
            {
                "kind": e.kind,
                "policy": e.key,
                "error": e.error,
                "in_force": "last valid version" if e.good is not None else "default deny",
            }
            for e in sorted(self._policies.values(), key=lambda e: (e.kind, e.key))
            if e.error is not None
        ]

    def pod_selectors(self) -> tuple[tuple[str | None, str], ...]:
        """The pod watches that cover every toEndpoints of the valid policies held."""
        goods = [e.good for e in self._policies.values() if e.good is not None]
        return tuple(sorted(pod_selectors(to_endpoints_selectors(goods)), key=str))

    def synced_kinds(self) -> list[str]:
        return [k for k in KINDS if k in self._synced]

    # -- pods -------------------------------------------------------------------------------

    def _pod_deleted(self, pod: dict[str, Any]) -> None:
        uid = _uid(pod)
        if uid:
            gone = self.ids.release(str(uid))
            if gone is not None:
                self._released.append(gone)
            self._peer_ids.pop(str(uid), None)

    def _is_local(self, pod: dict[str, Any]) -> bool:
        return (pod.get("spec") or {}).get("nodeName") == self.node

    def _endpoint(self, pod: dict[str, Any], ident: int) -> Endpoint | None:
        """A pod as an endpoint; None when it has no address of its own."""
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        if spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
            return None
        ips = [str(p.get("ip")) for p in status.get("podIPs") or [] if p.get("ip")]
        if not ips and status.get("podIP"):
            ips = [str(status["podIP"])]
        if not ips:
            return None
        namespace = str(meta.get("namespace") or "default")
        labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        ns = self.stores[NAMESPACE].get(namespace)
        for k, v in ((ns or {}).get("metadata", {}).get("labels") or {}).items():
            labels[NAMESPACE_LABELS_PREFIX + str(k)] = str(v)
        labels[CLUSTER_LABEL] = "default"
        labels.pop(NAMESPACE_LABEL, None)
        ports = [
            (str(p["name"]), int(p["containerPort"]), str(p.get("protocol") or "TCP"))
            for c in spec.get("containers") or []
            for p in c.get("ports") or []
            if p.get("name") and p.get("containerPort")
        ]
        try:
            return Endpoint.create(
                id=ident,
                name=str(meta.get("name") or ""),
                namespace=namespace,
                ips=ips,
                labels={k: v for k, v in labels.items() if ":" not in k},
                service_account=str(spec.get("serviceAccountName") or "default"),
                ports=ports,
            )
        except ValueError as e:
            log.error("pod %s/%s: %s; not an endpoint", namespace, meta.get("name"), e)
            return None

    def _peer_id(self, uid: str) -> int:
        found = self._peer_ids.get(uid)
        if found is None:
            found = self._peer_ids[uid] = self._next_peer
            self._next_peer += 1
        return found

    # -- the build --------------------------------------------------------------------------

    def build(self) -> Built:
        """Everything the proxy runs, from the objects held now."""
        notes: list[str] = []
        local: list[Endpoint] = []
        peers: list[Endpoint] = []
        namespaces = self.stores[NAMESPACE]
        made = self._endpoints
        for key, pod in self.stores[POD].items():
            try:
                meta = pod.get("metadata") or {}
                uid = str(meta.get("uid") or "")
                if not uid:
                    continue
                is_local = self._is_local(pod)
                ident = self.ids.id_for(uid) if is_local else self._peer_id(uid)
                ns = namespaces.get(str(meta.get("namespace") or "default"))
                cached = made.get(key)
                if (
                    cached is not None
                    and cached[0] is pod
                    and cached[1] is ns
                    and cached[2] == ident
                ):
                    ep = cached[3]
                else:
                    ep = self._endpoint(pod, ident)
                    made[key] = (pod, ns, ident, ep)
            except UNREADABLE as e:
                # Fail closed: not an endpoint (an unknown source, refused) and no peer.
                self._unreadable(POD, key, e)
                made.pop(key, None)
                continue
            if ep is None:
                continue
            if is_local:
                local.append(ep)
            peers.append(ep)
        local = _without_shared_addresses(local, notes)
        peers = _without_shared_addresses(peers, [])
        endpoints = Endpoints(sorted(local, key=lambda ep: ep.id))
        backends = self._backends()
        cluster = Cluster(
            node=self.node,
            nodes=self._nodes(),
            services=tuple(self._services(backends)),
            peers=Endpoints(peers),
            apiserver=tuple(dict.fromkeys(backends.get("default/kubernetes", ([], {}))[0])),
        )
        objects: list[ParsedObject | list[Any]] = []
        for entry in self._policies.values():
            if entry.good is not None:
                objects.append(entry.good)
            elif entry.stand_in is not None:
                objects.append(entry.stand_in)
        policy = assemble(objects, endpoints, cluster=cluster, selects=self._selects(endpoints))
        gone, self._released = tuple(self._released), []
        self._save_ids()
        return Built(policy, endpoints, cluster, gone, self.pod_selectors(), tuple(notes))

    def _save_ids(self) -> None:
        """The ids given since the last save go to disk before the build that uses them is in
        force: after a crash, an id is never given again to another pod, which would inherit
        what the journal replays under it."""
        try:
            self.ids.save()
        except OSError as e:
            log.error("saving the endpoint ids failed (%s); a crash now may reuse an id", e)

    def _selects(self, endpoints: Endpoints) -> Callable[[Selector], bool]:
        """``selects(selector)``: does it match one of ``endpoints``? Each selector is matched
        once against each distinct label set of this node's endpoints, over all builds, so a
        build costs a set intersection per policy, not a match per policy and endpoint."""
        keys = {ep.key: ep.labels for ep in endpoints}
        new = [k for k in keys if k not in self._keys]
        for k in [k for k in self._keys if k not in keys]:
            del self._keys[k]
            for matched in self._matches.values():
                matched.discard(k)
        for k in new:
            labels = self._keys[k] = keys[k]
            for sel, matched in self._matches.items():
                if sel.matches(labels):
                    matched.add(k)
        if len(self._matches) > 4 * MAX_SELECTORS_HELD:
            self._matches.clear()  # selectors of policies long gone: start over

        def selects(sel: Selector) -> bool:
            matched = self._matches.get(sel)
            if matched is None:
                matched = self._matches[sel] = {
                    k for k, labels in self._keys.items() if sel.matches(labels)
                }
            return bool(matched)

        return selects

    def _unreadable(self, kind: str, key: str, e: Exception) -> None:
        if (kind, key) not in self._bad:
            self._bad.add((kind, key))
            log.error("%s %s cannot be read (%s: %s); left out", kind, key, type(e).__name__, e)

    def _nodes(self) -> tuple[Node, ...]:
        """Every node; none when one cannot be read: the entities then lack the facts they
        need and allow nothing (``world`` would otherwise admit that node's addresses)."""
        nodes = []
        for key, obj in self.stores[NODE].items():
            try:
                nodes.append(self._node(obj))
            except UNREADABLE as e:
                self._unreadable(NODE, key, e)
                return ()
        return tuple(nodes)

    @staticmethod
    def _node(obj: dict[str, Any]) -> Node:
        meta, spec, status = (
            obj.get("metadata") or {},
            obj.get("spec") or {},
            obj.get("status") or {},
        )
        addresses = [
            str(a["address"])
            for a in status.get("addresses") or []
            if a.get("type") in ("InternalIP", "ExternalIP") and _is_ip(a.get("address"))
        ]
        cidrs = list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))
        return Node(
            str(meta.get("name") or ""),
            tuple(dict.fromkeys(addresses)),
            tuple(str(c) for c in cidrs),
            _labels(meta),
        )

    def _backends(self) -> dict[str, tuple[list[str], dict[str, int]]]:
        """Per Service (namespace/name): its ready backends' addresses and its named target
        ports, from every EndpointSlice that names it. A Service with a slice that cannot be
        read is left out (its backends are not all known: a ClusterIP admitted for the
        backends a rule selects could lead to one it does not)."""
        out: dict[str, tuple[list[str], dict[str, int]]] = {}
        broken: set[str] = set()
        for key, obj in self.stores[SLICE].items():
            service: str | None = None
            try:
                meta = obj.get("metadata") or {}
                name = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
                if not name:
                    continue
                service = f"{meta.get('namespace')}/{name}"
                addrs = [
                    str(a)
                    for ep in obj.get("endpoints") or []
                    if (ep.get("conditions") or {}).get("ready") is not False
                    for a in ep.get("addresses") or []
                    if _is_ip(a)
                ]
                ports = {
                    str(p.get("name") or ""): int(p["port"])
                    for p in obj.get("ports") or []
                    if p.get("port") is not None
                }
            except UNREADABLE as e:
                self._unreadable(SLICE, key, e)
                if service is not None:
                    broken.add(service)
                continue
            have_addrs, have_ports = out.setdefault(service, ([], {}))
            have_addrs += addrs
            have_ports.update(ports)
        for service in broken:
            out.pop(service, None)
            out[service] = BROKEN
        return out

    def _services(self, backends: dict[str, tuple[list[str], dict[str, int]]]) -> Iterable[Service]:
        for key, obj in self.stores[SERVICE].items():
            if backends.get(key) is BROKEN:
                continue
            try:
                yield self._service(obj, backends.get(key, ([], {})))
            except UNREADABLE as e:
                self._unreadable(SERVICE, key, e)

    @staticmethod
    def _service(obj: dict[str, Any], backends: tuple[list[str], dict[str, int]]) -> Service:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        addrs, named = backends
        ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
        ports = []
        for p in spec.get("ports") or []:
            target = p.get("targetPort", p.get("port"))
            name = str(p.get("name") or "")
            number = target if isinstance(target, int) else named.get(name)
            ports.append(
                ServicePort(name, int(p.get("port") or 0), str(p.get("protocol") or "TCP"), number)
            )
        selector = spec.get("selector")
        return Service(
            str(meta.get("namespace") or "default"),
            str(meta.get("name") or ""),
            _labels(meta),
            tuple(str(ip) for ip in ips if _is_ip(ip)),
            dict(selector) if isinstance(selector, dict) and selector else None,
            tuple(dict.fromkeys(addrs)),
            tuple(ports),
        )

    # -- state ------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Writes the objects held (atomically) and the endpoint ids to ``directory``."""
        data = {"version": 1, "node": self.node, "objects": self.stores}
        atomic_write(
            Path(directory) / OBJECTS_FILE, json.dumps(data, separators=(",", ":")).encode()
        )
        self.ids.save()

    def restore(self, directory: str | os.PathLike[str]) -> bool:
        """Loads the objects a previous run saved; they stand until the source's listings
        confirm or delete them. False when there was nothing (or nothing readable)."""
        path = Path(directory) / OBJECTS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            objects = data["objects"]
            if data.get("version") != 1 or not isinstance(objects, dict):
                raise ValueError(f"unknown format {data.get('version')!r}")
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("%s: unreadable (%s); waiting for the API server", path, e)
            return False
        if data.get("node") != self.node:
            log.error(
                "%s was saved for node %r, not %r; not used", path, data.get("node"), self.node
            )
            return False
        for kind in KINDS:
            items = objects.get(kind) or {}
            if not isinstance(items, dict):
                continue
            self.changes(
                kind, [Change(kind, str(k), v) for k, v in items.items() if isinstance(v, dict)]
            )
            self._unconfirmed[kind] = {str(k) for k in items}
        return True


def _without_shared_addresses(endpoints: list[Endpoint], notes: list[str]) -> list[Endpoint]:
    """The endpoints with every address that two of them claim taken from both (fail closed:
    an address that cannot be told apart is an unknown source until one lets it go)."""
    owners: dict[str, list[Endpoint]] = {}
    for ep in endpoints:
        for ip in ep.ips:
            owners.setdefault(ip, []).append(ep)
    shared = {ip for ip, eps in owners.items() if len(eps) > 1}
    if not shared:
        return endpoints
    for ip in sorted(shared):
        notes.append(
            f"address {ip} is claimed by {', '.join(ep.display for ep in owners[ip])}: "
            "neither gets it"
        )
    out = []
    for ep in endpoints:
        if shared.isdisjoint(ep.ips):
            out.append(ep)
            continue
        v4 = tuple(ip for ip in ep.ipv4 if ip not in shared)
        v6 = tuple(ip for ip in ep.ipv6 if ip not in shared)
        labels = {k: v for k, v in ep.labels.items() if k != NAMESPACE_LABEL}
        out.append(Endpoint(ep.id, ep.name, ep.namespace, v4, v6, labels, ep.ports))
    return out


def _uid(obj: Mapping[str, Any]) -> str:
    """The object's uid, "" when it has none (or no readable metadata)."""
    meta = obj.get("metadata")
    return str(meta.get("uid") or "") if isinstance(meta, dict) else ""


def _labels(meta: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}


def _is_ip(text: object) -> bool:
    try:
        ipaddress.ip_address(str(text))
    except ValueError:
        return False
    return True


def pod_selectors(selectors: Iterable[Selector]) -> set[tuple[str | None, str]]:
    """The pod watches that cover ``selectors``: (namespace or None for all, Kubernetes label
    selector). Requirements on what is no pod label (namespace labels, the service account,
    the cluster) are left out: the watch then brings more pods than the policy selects, never
    fewer."""
    out: set[tuple[str | None, str]] = set()
    for sel in selectors:
        namespace: str | None = None
        parts: list[str] = []
        for name, op, values in sel.requirements:
            if name == NAMESPACE_LABEL and op == "In" and len(values) == 1:
                namespace = next(iter(values))
                continue
            if (
                name is None
                or name.startswith(NAMESPACE_LABELS_PREFIX)
                or name
                in (
                    NAMESPACE_LABEL,
                    SERVICEACCOUNT_LABEL,
                    CLUSTER_LABEL,
                )
            ):
                continue
            vals = ",".join(sorted(values))
            if op == "In":
                parts.append(f"{name}={vals}" if len(values) == 1 else f"{name} in ({vals})")
            elif op == "NotIn":
                parts.append(f"{name} notin ({vals})")
            elif op == "Exists":
                parts.append(name)
            else:
                parts.append(f"!{name}")
        out.add((namespace, ",".join(sorted(parts))))
    return out
