"""The cluster model: Kubernetes objects (as the API server returns them) in, endpoints and a
policy out. No API server here: the objects are fed as a source would feed them; the source
itself is tested against a real one (tests/test_kube_source.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fqdnguard._core import DnsCache
from fqdnguard.policy import Selector
from fqdnguard.sources.base import Change
from fqdnguard.sources.model import ClusterModel, EndpointIds, pod_selectors

NODE = "node-a"


def pod(
    name: str,
    ip: str | None,
    *,
    uid: str | None = None,
    node: str = NODE,
    ns: str = "default",
    labels: dict[str, str] | None = None,
    host_network: bool = False,
) -> Change:
    obj: dict[str, Any] = {
        "metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{name}",
                     "labels": labels or {}},
        "spec": {"nodeName": node, "hostNetwork": host_network, "serviceAccountName": "default"},
        "status": {"phase": "Running", "podIPs": [{"ip": ip}] if ip else []},
    }  # fmt: skip
    return Change("Pod", f"{ns}/{name}", obj)


def cnp(name: str, spec: dict[str, Any], *, ns: str = "default", uid: str | None = None) -> Change:
    obj = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{name}"},
        "spec": spec,
    }
    return Change("CiliumNetworkPolicy", f"{ns}/{name}", obj)


def dns_policy(app: str, pattern: str, *, kube_dns: bool = False) -> dict[str, Any]:
    """DNS to any server (``kube_dns``: to the kube-dns pods) for ``pattern``, and egress to
    what it resolves."""
    dns: dict[str, Any] = {
        "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                     "rules": {"dns": [{"matchPattern": pattern}]}}],
    }  # fmt: skip
    if kube_dns:
        dns["toEndpoints"] = [
            {
                "matchLabels": {
                    "k8s-app": "kube-dns",
                    "k8s:io.kubernetes.pod.namespace": "kube-system",
                }
            }
        ]
    return {
        "endpointSelector": {"matchLabels": {"app": app}},
        "egress": [dns, {"toFQDNs": [{"matchPattern": pattern}]}],
    }


def model(**kw: Any) -> tuple[ClusterModel, list[tuple[str, str, str]]]:
    reports: list[tuple[str, str, str]] = []

    def report(kind: str, obj: dict[str, Any], reason: str, message: str) -> None:
        reports.append((obj["metadata"]["name"], reason, message))

    return ClusterModel(NODE, report=report, **kw), reports


def verdict(m: ClusterModel, ip: str, name: str, server: str = "10.0.9.9") -> str:
    built = m.build()
    ep = built.endpoints.by_ip(ip)
    return "allow" if built.policy.dns_verdict(ep, None, 53, "UDP", name).allowed else "deny"


def test_a_local_pod_gets_its_policy_and_a_remote_pod_is_no_source() -> None:
    m, _ = model()
    m.changes("Pod", [pod("web", "10.0.1.5", labels={"app": "web"}),
                      pod("far", "10.0.2.5", node="node-b", labels={"app": "web"}),
                      pod("dns", "10.0.3.3", node="node-b", ns="kube-system",
                          labels={"k8s-app": "kube-dns"})])  # fmt: skip
    m.changes("CiliumNetworkPolicy", [cnp("p", dns_policy("web", "*.example.com", kube_dns=True))])
    built = m.build()
    assert [ep.name for ep in built.endpoints] == ["web"]
    assert built.endpoints.by_ip("10.0.2.5") is None, "another node's pod is not a source"
    assert built.cluster.peers is not None
    assert {ep.name for ep in built.cluster.peers} == {"web", "far", "dns"}
    assert verdict(m, "10.0.1.5", "api.example.com") == "allow", "the kube-dns pod is a peer"
    assert verdict(m, "10.0.1.5", "api.example.org") == "deny"
    assert built.pod_selectors == (("kube-system", "k8s-app=kube-dns"),)


def test_a_label_change_moves_a_pod_to_another_policy() -> None:
    m, _ = model()
    m.changes("CiliumNetworkPolicy", [cnp("a", dns_policy("a", "*.a.com")),
                                      cnp("b", dns_policy("b", "*.b.com"))])  # fmt: skip
    m.changes("Pod", [pod("x", "10.0.1.7", labels={"app": "a"})])
    assert verdict(m, "10.0.1.7", "w.a.com") == "allow"
    assert verdict(m, "10.0.1.7", "w.b.com") == "deny"
    m.changes("Pod", [pod("x", "10.0.1.7", labels={"app": "b"})])
    assert verdict(m, "10.0.1.7", "w.a.com") == "deny"
    assert verdict(m, "10.0.1.7", "w.b.com") == "allow"


def test_namespace_labels_are_endpoint_labels_as_in_cilium() -> None:
    m, _ = model()
    team = {"metadata": {"name": "team", "labels": {"tier": "gold"}}}
    m.changes("Namespace", [Change("Namespace", "team", team)])
    m.changes("Pod", [pod("x", "10.0.1.8", ns="team")])
    (ep,) = m.build().endpoints
    assert ep.labels["io.cilium.k8s.namespace.labels.tier"] == "gold"
    assert ep.labels["io.kubernetes.pod.namespace"] == "team"
    assert ep.labels["io.cilium.k8s.policy.serviceaccount"] == "default"


def test_an_invalid_update_keeps_the_last_valid_version_and_is_reported_once() -> None:
    m, reports = model()
    m.changes("Pod", [pod("x", "10.0.1.9", labels={"app": "web"})])
    m.changes("CiliumNetworkPolicy", [cnp("p", dns_policy("web", "*.example.com"))])
    assert verdict(m, "10.0.1.9", "a.example.com") == "allow"
    bad = dns_policy("web", "*.example.com")
    bad["egress"][1]["toFQDNs"] = [{"matchPattern": "bad..name"}]
    for _ in range(3):  # the same bad version seen again (a relist) is reported once
        m.changes("CiliumNetworkPolicy", [cnp("p", bad)])
    assert verdict(m, "10.0.1.9", "a.example.com") == "allow", "last valid version in force"
    assert len(reports) == 1
    name, reason, message = reports[0]
    assert (name, reason) == ("p", "InvalidPolicy")
    assert "egress[1].toFQDNs[0].matchPattern" in message
    assert m.invalid() == [
        {"kind": "CiliumNetworkPolicy", "policy": "default/p", "error": m.invalid()[0]["error"],
         "in_force": "last valid version"}
    ]  # fmt: skip
    m.changes("CiliumNetworkPolicy", [cnp("p", dns_policy("web", "*.example.com"))])
    assert m.invalid() == []


def test_a_new_invalid_policy_puts_what_it_selects_into_default_deny() -> None:
    m, reports = model()
    m.changes("Pod", [pod("x", "10.0.1.10", labels={"app": "web"}),
                      pod("y", "10.0.1.11", labels={"app": "other"})])  # fmt: skip
    built = m.build()
    assert not built.policy.restricted(), "no policy: nothing restricted"
    bad = dns_policy("web", "*.example.com")
    bad["egress"][0]["toPorts"][0]["rules"]["dns"] = [{"matchName": "*.example.com"}]
    m.changes("CiliumNetworkPolicy", [cnp("p", bad)])
    built = m.build()
    assert built.policy.restricted() == frozenset({("default", "x")})
    assert verdict(m, "10.0.1.10", "a.example.com") == "deny"
    assert verdict(m, "10.0.1.11", "a.example.com") == "allow", "others untouched"
    assert m.invalid()[0]["in_force"] == "default deny"
    assert len(reports) == 1


def test_an_unreadable_selector_denies_the_whole_namespace() -> None:
    m, _ = model()
    m.changes("Pod", [pod("x", "10.0.1.12"), pod("z", "10.0.1.13", ns="other")])
    m.changes("CiliumNetworkPolicy", [cnp("p", {"endpointSelector": "nonsense", "egress": [{}]})])
    assert m.build().policy.restricted() == frozenset({("default", "x")})


def test_a_deleted_pod_gives_its_id_up_and_a_new_pod_on_its_address_starts_afresh() -> None:
    m, _ = model()
    m.changes("Pod", [pod("old", "10.0.1.20", uid="u1")])
    first = m.build()
    (old,) = first.endpoints
    cache = DnsCache()
    cache.record(old.id, "a.example.com", [("192.0.2.7", 300)])
    m.changes("Pod", [Change("Pod", "default/old", None)])
    gone = m.build()
    assert gone.gone == (old.id,)
    assert gone.endpoints.by_ip("10.0.1.20") is None, "the address is unknown meanwhile"
    assert [c.kind for c in cache.forget(old.id)] == ["removed"]
    m.changes("Pod", [pod("new", "10.0.1.20", uid="u2")])
    (new,) = m.build().endpoints
    assert new.id != old.id
    assert not cache.allowed(new.id, "192.0.2.7")


def test_a_pod_replaced_under_the_same_name_is_a_new_pod() -> None:
    m, _ = model()
    m.changes("Pod", [pod("x", "10.0.1.21", uid="u1")])
    (a,) = m.build().endpoints
    m.changes("Pod", [pod("x", "10.0.1.21", uid="u2")])  # a relist saw only the new one
    built = m.build()
    assert built.gone == (a.id,)
    assert next(iter(built.endpoints)).id != a.id


def test_an_address_two_pods_claim_belongs_to_neither() -> None:
    m, _ = model()
    m.changes("Pod", [pod("a", "10.0.1.30"), pod("b", "10.0.1.30")])
    built = m.build()
    assert built.endpoints.by_ip("10.0.1.30") is None
    assert "10.0.1.30" in built.notes[0]


def test_host_network_and_addressless_pods_are_no_endpoints() -> None:
    m, _ = model()
    m.changes("Pod", [pod("h", "10.0.0.1", host_network=True), pod("p", None)])
    assert len(m.build().endpoints) == 0


def test_ids_and_objects_survive_a_restart_and_stale_objects_go_at_sync(tmp_path: Path) -> None:
    m, _ = model(ids=EndpointIds(tmp_path / "endpoint-ids.json"))
    m.changes("Pod", [pod("keep", "10.0.1.40", labels={"app": "web"}), pod("del", "10.0.1.41")])
    m.changes("CiliumNetworkPolicy", [cnp("p", dns_policy("web", "*.example.com"))])
    before = {ep.name: ep.id for ep in m.build().endpoints}
    m.save(tmp_path)

    again, _ = model(ids=EndpointIds(tmp_path / "endpoint-ids.json"))
    assert again.restore(tmp_path)
    built = again.build()
    assert {ep.name: ep.id for ep in built.endpoints} == before, "same ids at once"
    assert verdict(again, "10.0.1.40", "a.example.com") == "allow", "policy in force at once"
    # The source lists again: `del` is gone and the policy was deleted while nobody watched.
    again.changes("Pod", [pod("keep", "10.0.1.40", labels={"app": "web"})])
    again.synced("Pod")
    again.synced("CiliumNetworkPolicy")
    built = again.build()
    assert [ep.name for ep in built.endpoints] == ["keep"]
    assert built.gone == (before["del"],)
    assert verdict(again, "10.0.1.40", "a.example.com") == "allow", "no policy: unrestricted"
    assert not built.policy.restricted()


def test_a_state_of_another_node_is_not_used(tmp_path: Path) -> None:
    m, _ = model()
    m.changes("Pod", [pod("x", "10.0.1.50")])
    m.save(tmp_path)
    other = ClusterModel("node-b")
    assert not other.restore(tmp_path)


def test_pod_selectors_keep_pod_labels_and_drop_what_no_pod_label_holds() -> None:
    sel = Selector.build(
        {"k8s-app": "kube-dns", "io.kubernetes.pod.namespace": "kube-system",
         "io.cilium.k8s.namespace.labels.team": "x"},
        [("tier", "In", ["a", "b"]), ("legacy", "DoesNotExist", [])],
    )  # fmt: skip
    assert pod_selectors([sel]) == {("kube-system", "!legacy,k8s-app=kube-dns,tier in (a,b)")}
    assert pod_selectors([Selector()]) == {(None, "")}


def test_ids_are_on_disk_before_a_build_is_used_so_a_crash_never_gives_one_twice(
    tmp_path: Path,
) -> None:
    ids_file = tmp_path / "endpoint-ids.json"
    m, _ = model(ids=EndpointIds(ids_file))
    m.changes("Pod", [pod("a", "10.0.1.60", uid="ua")])
    (a,) = m.build().endpoints
    # A crash now: the objects were never saved (model.save), the ids were.
    again, _ = model(ids=EndpointIds(ids_file))
    again.changes("Pod", [pod("b", "10.0.1.61", uid="ub")])
    (b,) = again.build().endpoints
    assert b.id != a.id, "pod b must not get the id whose learning the journal holds for pod a"


def test_an_unreadable_object_is_left_out_and_the_others_are_built() -> None:
    """Objects of an unexpected shape (a corrupted state file, a relayed object) fail closed
    one by one: the pod is an unknown source, a Service with an unreadable EndpointSlice gives
    no ClusterIP, and every other object is built as before."""
    m, _ = model()
    m.changes("Pod", [pod("good", "10.0.1.70", labels={"app": "web"})])
    broken = pod("bad", "10.0.1.71", labels={"app": "web"})
    assert broken.obj is not None
    broken.obj["spec"]["containers"] = [{"ports": [{"name": "dns", "containerPort": "x"}]}]
    m.changes("Pod", [broken, Change("Pod", "default/worse", {"metadata": ["not", "a", "map"]})])
    m.changes("CiliumNetworkPolicy", [cnp("p", dns_policy("web", "*.example.com"))])
    m.changes("Node", [Change("Node", "n", {"metadata": {"name": "n"}, "status": "nonsense"}),
                       Change("Node", "ok", {"metadata": {"name": "ok"}})])  # fmt: skip
    m.changes("Service", [Change("Service", "default/dns", {
        "metadata": {"name": "dns", "namespace": "default"},
        "spec": {"clusterIPs": ["10.96.0.10"], "ports": [{"port": 53}]},
    })])  # fmt: skip
    m.changes("EndpointSlice", [Change("EndpointSlice", "default/dns-1", {
        "metadata": {"name": "dns-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "dns"}},
        "endpoints": [{"addresses": ["10.0.3.3"]}], "ports": [{"port": "fifty-three"}],
    })])  # fmt: skip
    built = m.build()
    assert [ep.name for ep in built.endpoints] == ["good"]
    assert built.endpoints.by_ip("10.0.1.71") is None, "the unreadable pod is an unknown source"
    assert verdict(m, "10.0.1.70", "a.example.com") == "allow"
    assert built.cluster.nodes == (), "one unreadable node: no node facts (entities fail closed)"
    assert built.cluster.services == (), "no ClusterIP from a Service whose backends are unknown"


def test_an_ids_file_out_of_range_or_with_an_id_twice_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / "endpoint-ids.json"
    for bad in ({"ids": {"a": 7, "b": 7}, "next": 8}, {"ids": {"a": 2**31 + 1}, "next": 3}):
        path.write_text(json.dumps(bad))
        ids = EndpointIds(path)
        assert len(ids) == 0, bad
        m, _ = model(ids=ids)
        m.changes("Pod", [pod("a", "10.0.1.80", uid="a"), pod("b", "10.0.1.81", uid="b")])
        assert len({ep.id for ep in m.build().endpoints}) == 2
