"""The size of the objects the agent lists and watches, as the API server returns them (JSON), for
"What the watches cost a 5,000-node cluster" in docs/kubernetes.md.

Objects of typical shape are made on the control plane of ``clients.py``: a Deployment's pod with
its status as a kubelet reports it, a Node as a kubelet registers it (with 30 container images in
its status), a kube-dns Service, the EndpointSlices the controller manager makes, a
CiliumNetworkPolicy with DNS and toFQDNs rules. Each is read back with a GET, and measured whole,
without ``metadata.managedFields``, and as metadata only (PartialObjectMetadata).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from clients import APPS, Kube, _with_kube, kubectl

ROOT = Path(__file__).resolve().parents[2]
SIZES_NS = "sizes"
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
WATCH_ENVELOPE = len('{"type":"MODIFIED","object":}\n')


def _compact(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":")).encode())


def _apply(kubeconfig: Path, manifest: dict[str, Any]) -> None:
    kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", "-",
             input=json.dumps(manifest))  # fmt: skip


def _established(kubeconfig: Path, crd: str) -> bool:
    status = json.loads(kubectl(kubeconfig, "get", "crd", crd, "-o", "json")).get("status", {})
    return any(
        c.get("type") == "Established" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def _typical_pod(i: int) -> dict[str, Any]:
    """A pod as a ReplicaSet makes it (admission adds the token volume and tolerations)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"coredns-7db6d8ff4d-{i:05d}",
            "namespace": SIZES_NS,
            "labels": {"k8s-app": "kube-dns", "pod-template-hash": "7db6d8ff4d"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9153"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "coredns-7db6d8ff4d",
                    "uid": "4f9a6c1e-5b1d-4a63-9d1e-0c2b8f0e7a11",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "nodeName": "sizes-node",
            "priorityClassName": "",
            "containers": [
                {
                    "name": "coredns",
                    "image": "registry.k8s.io/coredns/coredns:v1.11.3",
                    "args": ["-conf", "/etc/coredns/Corefile"],
                    "ports": [
                        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                        {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                        {"name": "metrics", "containerPort": 9153, "protocol": "TCP"},
                    ],
                    "resources": {
                        "limits": {"memory": "170Mi"},
                        "requests": {"cpu": "100m", "memory": "70Mi"},
                    },
                    "livenessProbe": {
                        "httpGet": {"path": "/health", "port": 8080},
                        "initialDelaySeconds": 60,
                        "timeoutSeconds": 5,
                    },
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}},
                    "volumeMounts": [
                        {"name": "config-volume", "mountPath": "/etc/coredns", "readOnly": True}
                    ],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]},
                    },
                }
            ],
            "volumes": [
                {
                    "name": "config-volume",
                    "configMap": {
                        "name": "coredns",
                        "items": [{"key": "Corefile", "path": "Corefile"}],
                    },
                }
            ],
        },
    }


def _typical_pod_status(i: int) -> dict[str, Any]:
    started = "2026-12-01T10:00:00Z"
    conditions = [
        {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": started}
        for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady",
                  "PodScheduled")
    ]  # fmt: skip
    ip = f"10.244.200.{i + 2}"
    return {
        "status": {
            "phase": "Running",
            "conditions": conditions,
            "hostIP": "192.0.2.20",
            "hostIPs": [{"ip": "192.0.2.20"}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": started,
            "qosClass": "Burstable",
            "containerStatuses": [
                {
                    "name": "coredns",
                    "state": {"running": {"startedAt": started}},
                    "lastState": {},
                    "ready": True,
                    "restartCount": 0,
                    "image": "registry.k8s.io/coredns/coredns:v1.11.3",
                    "imageID": "registry.k8s.io/coredns/coredns@sha256:"
                    "9caabbf6238b189a65d0d6e6ac138de60d6a1c419e5a341fbbb7c78382559c6e",
                    "containerID": "containerd://"
                    "5c2b9a4f0e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b",
                    "started": True,
                }
            ],
        }
    }


def _typical_node(images: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Node as a kubelet on a cloud VM registers it, and its status (images: how many of the
    node's container images the status lists; the kubelet's default cap is 50)."""
    labels = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": "sizes-node",
        "beta.kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "node.kubernetes.io/instance-type": "m5.xlarge",
        "beta.kubernetes.io/instance-type": "m5.xlarge",
        "topology.kubernetes.io/region": "eu-west-1",
        "topology.kubernetes.io/zone": "eu-west-1a",
        "failure-domain.beta.kubernetes.io/region": "eu-west-1",
        "failure-domain.beta.kubernetes.io/zone": "eu-west-1a",
        "node-role.kubernetes.io/worker": "",
    }
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "sizes-node",
            "labels": labels,
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                "csi.volume.kubernetes.io/nodeid": '{"ebs.csi.aws.com":"i-0123456789abcdef0"}',
            },
        },
        "spec": {
            "podCIDR": "10.244.200.0/24",
            "podCIDRs": ["10.244.200.0/24"],
            "providerID": "aws:///eu-west-1a/i-0123456789abcdef0",
        },
    }
    resources = {
        "cpu": "4",
        "ephemeral-storage": "104845292Ki",
        "hugepages-1Gi": "0",
        "hugepages-2Mi": "0",
        "memory": "15896204Ki",
        "pods": "58",
    }
    when = "2026-12-01T10:00:00Z"
    conditions = [
        {"type": t, "status": s, "lastHeartbeatTime": when, "lastTransitionTime": when,
         "reason": r, "message": m}
        for t, s, r, m in (
            ("MemoryPressure", "False", "KubeletHasSufficientMemory",
             "kubelet has sufficient memory available"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID",
             "kubelet has sufficient PID available"),
            ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        )
    ]  # fmt: skip
    status = {
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": "192.0.2.20"},
                {"type": "InternalDNS", "address": "ip-192-0-2-20.eu-west-1.compute.internal"},
                {"type": "Hostname", "address": "ip-192-0-2-20.eu-west-1.compute.internal"},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "ec2" + "0" * 29,
                "systemUUID": "ec2" + "1" * 33,
                "bootID": "7c8f3a52-9d1e-4b6a-8f0e-2a1b3c4d5e6f",
                "kernelVersion": "6.1.115-126.197.amzn2023.x86_64",
                "osImage": "Amazon Linux 2023.6.20241121",
                "containerRuntimeVersion": "containerd://1.7.23",
                "kubeletVersion": "v1.33.13",
                "kubeProxyVersion": "v1.33.13",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "images": [
                {
                    "names": [
                        f"registry.example.com/team-{k % 7}/service-{k}@sha256:{k:064x}",
                        f"registry.example.com/team-{k % 7}/service-{k}:v1.{k}.0",
                    ],
                    "sizeBytes": 50_000_000 + k * 1_234_567,
                }
                for k in range(images)
            ],
        }
    }
    return node, status


def _cnp() -> dict[str, Any]:
    """A CiliumNetworkPolicy of the shape fqdnguard serves: DNS through kube-dns, toFQDNs."""
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "app-egress", "namespace": SIZES_NS},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "app-3"}},
            "egress": [
                {
                    "toEndpoints": [
                        {
                            "matchLabels": {
                                "k8s:io.kubernetes.pod.namespace": "kube-system",
                                "k8s:k8s-app": "kube-dns",
                            }
                        }
                    ],
                    "toPorts": [
                        {
                            "ports": [
                                {"port": "53", "protocol": "UDP"},
                                {"port": "53", "protocol": "TCP"},
                            ],
                            "rules": {"dns": [{"matchPattern": "*"}]},
                        }
                    ],
                },
                {
                    "toFQDNs": [
                        {"matchName": "api.example.com"},
                        {"matchPattern": "*.storage.example.com"},
                        {"matchName": "login.example.org"},
                    ],
                    "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}],
                },
            ],
        },
    }


async def _sizes_of(kube: Kube, path: str) -> dict[str, int]:
    whole = await kube.get(path)
    obj = json.loads(whole)
    managed = _compact(obj["metadata"].get("managedFields", []))
    obj["metadata"].pop("managedFields", None)
    metadata_only = await kube.get(path, accept=METADATA_ONLY)
    return {
        "bytes": len(whole),
        "without_managed_fields": _compact(obj),
        "managed_fields": managed,
        "metadata_only": len(metadata_only),
    }


async def _slice_for(kube: Kube, namespace: str, service: str, endpoints: int) -> dict[str, int]:
    """The EndpointSlice the controller manager made for service, once it lists `endpoints`."""
    path = (
        f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        f"?labelSelector=kubernetes.io%2Fservice-name%3D{service}"
    )
    deadline = time.monotonic() + 60
    while True:
        items = json.loads(await kube.get(path))["items"]
        ready = [s for s in items if len(s.get("endpoints") or []) == endpoints]
        if ready:
            name = ready[0]["metadata"]["name"]
            sizes = await _sizes_of(
                kube, f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices/{name}"
            )
            return sizes | {"endpoints": endpoints}
        if time.monotonic() > deadline:
            got = [len(s.get("endpoints") or []) for s in items]
            raise RuntimeError(f"no EndpointSlice of {service} with {endpoints} endpoints: {got}")
        await asyncio.sleep(0.5)


def _service(name: str, namespace: str, selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"k8s-app": name, "kubernetes.io/name": "CoreDNS"},
            "annotations": {"prometheus.io/port": "9153", "prometheus.io/scrape": "true"},
        },
        "spec": {
            "selector": selector,
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153},
            ],
        },
    }


def measure(kube_dir: Path, kubeconfig: Path, bench_namespace: str) -> dict[str, Any]:
    """Make the objects (idempotent) and measure them."""
    labels = {"team": "platform", "environment": "production"}
    _apply(kubeconfig, {"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": SIZES_NS, "labels": labels}})  # fmt: skip
    node, node_status = _typical_node(images=30)
    _apply(kubeconfig, node)
    kubectl(kubeconfig, "patch", "node", "sizes-node", "--subresource=status", "--type=merge",
             "-p", json.dumps(node_status))  # fmt: skip
    deadline = time.monotonic() + 60
    while "default" not in kubectl(kubeconfig, "get", "serviceaccounts", "-n", SIZES_NS):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no default ServiceAccount in {SIZES_NS}")
        time.sleep(0.3)
    for i in range(3):
        pod = _typical_pod(i)
        _apply(kubeconfig, pod)
        status = json.dumps(_typical_pod_status(i))
        kubectl(kubeconfig, "patch", "pod", pod["metadata"]["name"], "-n", SIZES_NS,
                 "--subresource=status", "--type=merge", "-p", status)  # fmt: skip
    _apply(kubeconfig, _service("kube-dns", SIZES_NS, {"k8s-app": "kube-dns"}))
    _apply(kubeconfig, _service("app-7", bench_namespace, {"app": "app-7"}))
    kubectl(kubeconfig, "apply", "--server-side", "-f", str(ROOT / "deploy" / "crds"))
    deadline = time.monotonic() + 60
    while not _established(kubeconfig, "ciliumnetworkpolicies.cilium.io"):
        if time.monotonic() > deadline:
            raise RuntimeError("the CiliumNetworkPolicy CRD was not established within 60 s")
        time.sleep(0.3)
    _apply(kubeconfig, _cnp())

    async def body(kube: Kube) -> dict[str, Any]:
        bench = await kube.get(f"/api/v1/namespaces/{bench_namespace}/pods")
        count = len(json.loads(bench)["items"])
        bench_meta = await kube.get(
            f"/api/v1/namespaces/{bench_namespace}/pods",
            accept="application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        )
        pod = _typical_pod(0)["metadata"]["name"]
        selected = len([i for i in range(count) if i % APPS == 7])
        nodes_name = "/api/v1/nodes/sizes-node"
        node_sizes = await _sizes_of(kube, nodes_name)
        node_obj = json.loads(await kube.get(nodes_name))
        node_obj["metadata"].pop("managedFields", None)
        node_obj["status"].pop("images", None)
        return {
            "watch_event_envelope": WATCH_ENVELOPE,
            "bench_pod_in_list": {
                "pods": count,
                "list_bytes": len(bench),
                "bytes_per_pod": round(len(bench) / count),
                "metadata_only_per_pod": round(len(bench_meta) / count),
            },
            "pod": await _sizes_of(kube, f"/api/v1/namespaces/{SIZES_NS}/pods/{pod}"),
            "node": node_sizes | {"images": 30, "without_images": _compact(node_obj)},
            "namespace": await _sizes_of(kube, f"/api/v1/namespaces/{SIZES_NS}"),
            "service": await _sizes_of(kube, f"/api/v1/namespaces/{SIZES_NS}/services/kube-dns"),
            "endpointslice_3": await _slice_for(kube, SIZES_NS, "kube-dns", 3),
            "endpointslice_n": await _slice_for(kube, bench_namespace, "app-7", min(selected, 100)),
            "cnp": await _sizes_of(
                kube, f"/apis/cilium.io/v2/namespaces/{SIZES_NS}/ciliumnetworkpolicies/app-egress"
            ),
        }

    return dict(asyncio.run(_with_kube(kubeconfig, body)))
