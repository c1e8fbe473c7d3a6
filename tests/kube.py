"""The local Kubernetes control plane in tests (``tools/kube/localkube.py``, the same code as
``make kube-up``): how to get it, and small helpers to drive it with kubectl.

No kubelet runs: a pod is created with ``spec.nodeName`` on a registered Node (the pod garbage
collector deletes pods bound to a Node that does not exist), and its addresses and Ready
condition are set through the status subresource (:func:`set_pod_running`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from tools.kube.localkube import (
    KubeControlPlane,
    bin_dir,
    build,
    go_binary,
    is_built,
    kubectl_binary,
)

T = TypeVar("T")


def require_kube_binaries() -> None:
    """Skip unless the binaries are built (``make kube-build``: about 12 minutes and 8 CPU-minutes
    once per machine, so ``make test`` does not build them; ``.ci/run`` does, before the tests).
    In CI (CI set) a missing build is an error, not a skip."""
    if kubectl_binary() is None:
        reason = (
            "kubectl is not installed nor built (make helm-build): the tests drive the API with it"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    if is_built():
        return
    if go_binary() is None:
        pytest.skip(
            "Go is not installed: the local Kubernetes control plane (etcd, kube-apiserver, "
            "kube-controller-manager) is built from the Go module proxy with it"
        )
    if os.environ.get("FQDNGUARD_KUBE_BUILD") == "1":
        build()
        return
    reason = (
        f"the local control plane is not built ({bin_dir()} is missing): run `make kube-build` "
        "once (about 12 minutes on 2 cores), or set FQDNGUARD_KUBE_BUILD=1 to build it here"
    )
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def wait_until(what: str, check: Callable[[], T | None], timeout: float = 60.0) -> T:
    """Poll check until it returns something truthy; fail naming what did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def apply(kube: KubeControlPlane, manifest: dict[str, Any] | str) -> None:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    kube.kubectl("apply", "-f", "-", input=text)


def get(kube: KubeControlPlane, *args: str) -> Any:
    """The object(s) as JSON, or None when not found."""
    proc = kube.kubectl("get", *args, "-o", "json", check=False)
    if proc.returncode != 0:
        if "NotFound" in proc.stderr:
            return None
        raise AssertionError(f"kubectl get {' '.join(args)}: {proc.stderr}")
    return json.loads(proc.stdout)


def create_namespace(
    kube: KubeControlPlane, name: str, labels: dict[str, str] | None = None
) -> None:
    """A namespace with its default ServiceAccount (pods cannot be admitted before).

    The controller manager's ServiceAccount controller makes it, usually within a second; after
    a test restarted the API server that controller may wait out a long backoff before it
    resyncs (more than a minute was seen), so after 10 s the test makes it itself, as the
    controller would have."""
    apply(
        kube,
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}},
        },
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if get(kube, "serviceaccount", "default", "-n", name):
            return
        time.sleep(0.2)
    kube.kubectl("create", "serviceaccount", "default", "-n", name, check=False)
    wait_until(
        f"the default ServiceAccount of namespace {name}",
        lambda: get(kube, "serviceaccount", "default", "-n", name),
    )


def register_node(
    kube: KubeControlPlane, name: str, address: str, pod_cidr: str | None = None
) -> None:
    """A Node object with an InternalIP and a Ready condition, as a kubelet would register it
    (and the pod CIDR the controller manager would allocate it, when given)."""
    node: dict[str, Any] = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
    if pod_cidr is not None:
        node["spec"] = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]}
    apply(kube, node)
    status = {
        "status": {
            "addresses": [{"type": "InternalIP", "address": address}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        }
    }
    kube.kubectl(
        "patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )


def create_pod(
    kube: KubeControlPlane, namespace: str, name: str, node: str, labels: dict[str, str]
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        },
    }
    apply(kube, pod)


def set_pod_running(kube: KubeControlPlane, namespace: str, name: str, ips: list[str]) -> None:
    """What a kubelet reports for a started pod: its addresses, phase Running, Ready."""
    ready = [
        {"type": t, "status": "True"}
        for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
    ]
    status = {
        "status": {
            "phase": "Running",
            "podIP": ips[0],
            "podIPs": [{"ip": ip} for ip in ips],
            "conditions": ready,
        }
    }
    kube.kubectl(
        "patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )  # fmt: skip


class Relay:
    """Lets a network namespace reach the API server on the host's loopback: listens on
    127.0.0.1:``port`` inside namespace ``netns`` (a socket made there) and relays each
    connection to 127.0.0.1:``port`` of this process's namespace, byte for byte (TLS passes
    through untouched, so the kubeconfig's address and certificate work inside as outside).

    ``cut()`` closes every relayed connection and refuses new ones (the node loses the API
    server while it keeps running); ``mend()`` lets them through again."""

    def __init__(self, topo: Any, netns: str, port: int) -> None:
        import socket  # noqa: PLC0415
        import threading  # noqa: PLC0415

        self.port = port
        self.listener = topo.open_socket(netns, socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.cut_off = False
        self._live: list[Any] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import socket  # noqa: PLC0415
        import threading  # noqa: PLC0415

        while True:
            try:
                inner, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_off:
                inner.close()
                continue
            try:
                outer = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError:
                inner.close()
                continue
            outer.settimeout(None)
            with self._lock:
                self._live += [inner, outer]
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: Any, b: Any) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(2)

    def cut(self) -> None:
        self.cut_off = True
        with self._lock:
            live, self._live = self._live, []
        for s in live:
            with contextlib.suppress(OSError):
                s.shutdown(2)
            s.close()

    def mend(self) -> None:
        self.cut_off = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


def wait_for_crds(kube: KubeControlPlane, *names: str) -> None:
    """Wait until each CRD is Established (kubectl wait fails outright on a CRD that has no
    conditions yet, so poll)."""
    for crd in names:
        wait_until(
            f"CRD {crd} to be Established",
            lambda crd=crd: any(
                c["type"] == "Established" and c["status"] == "True"
                for c in get(kube, "crd", crd)["status"].get("conditions") or []
            ),
        )
