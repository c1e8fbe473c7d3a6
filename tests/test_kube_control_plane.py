"""The local control plane is a real cluster: what the later Kubernetes tests rely on, shown
against etcd, kube-apiserver and kube-controller-manager (tools/kube/localkube.py)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

from tests.kube import (
    apply,
    create_namespace,
    create_pod,
    get,
    register_node,
    require_kube_binaries,
    set_pod_running,
    wait_until,
)
from tools.kube.localkube import (
    DEFAULT_ADVERTISE_ADDRESS,
    DEFAULT_SERVICE_CIDR,
    KubeControlPlane,
    kubernetes_version,
)

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "deploy" / "crds"


def test_kubectl_talks_to_the_api_server_as_admin(kube: KubeControlPlane) -> None:
    version = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == kubernetes_version()  # not v0.0.0-master
    kube.kubectl("create", "configmap", "hello", "-n", "default", "--from-literal=greeting=hi")
    assert get(kube, "configmap", "hello", "-n", "default")["data"] == {"greeting": "hi"}
    whoami = json.loads(kube.kubectl("auth", "whoami", "-o", "json").stdout)
    assert "system:masters" in whoami["status"]["userInfo"]["groups"]


def test_kubernetes_service_names_the_advertised_address(kube: KubeControlPlane) -> None:
    slice_ = wait_until(
        "the kubernetes Service's EndpointSlice",
        lambda: get(kube, "endpointslice", "kubernetes", "-n", "default"),
    )
    assert slice_["endpoints"][0]["addresses"] == [DEFAULT_ADVERTISE_ADDRESS]
    assert slice_["ports"][0]["port"] == int(kube.server.rsplit(":", 1)[1])


def test_two_nodes_can_be_registered(kube: KubeControlPlane) -> None:
    register_node(kube, "node-a", "10.250.0.1")
    register_node(kube, "node-b", "10.250.0.2")
    nodes = {n["metadata"]["name"]: n for n in get(kube, "nodes")["items"]}
    assert {"node-a", "node-b"} <= set(nodes)
    for name, address in (("node-a", "10.250.0.1"), ("node-b", "10.250.0.2")):
        status = nodes[name]["status"]
        assert status["addresses"] == [{"type": "InternalIP", "address": address}]
        assert [c["status"] for c in status["conditions"] if c["type"] == "Ready"] == ["True"]


def test_service_with_a_ready_pod_gets_an_endpointslice(kube: KubeControlPlane) -> None:
    create_namespace(kube, "eps")
    register_node(kube, "node-a", "10.250.0.1")
    apply(
        kube,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "eps"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "protocol": "TCP"}]},
        },
    )
    create_pod(kube, "eps", "web-1", "node-a", {"app": "web"})
    set_pod_running(kube, "eps", "web-1", ["10.244.1.5", "fd00:244:1::5"])

    pod = get(kube, "pod", "web-1", "-n", "eps")
    assert pod["status"]["podIPs"] == [{"ip": "10.244.1.5"}, {"ip": "fd00:244:1::5"}]
    service = get(kube, "service", "web", "-n", "eps")
    assert ipaddress.ip_address(service["spec"]["clusterIP"]) in ipaddress.ip_network(
        DEFAULT_SERVICE_CIDR
    )

    def ready_slice() -> dict[str, object] | None:
        items = get(kube, "endpointslices", "-n", "eps", "-l", "kubernetes.io/service-name=web")
        for item in items["items"]:
            for endpoint in item.get("endpoints") or []:
                if endpoint["conditions"].get("ready"):
                    return {"slice": item, "endpoint": endpoint}
        return None

    found = wait_until("an EndpointSlice with the ready pod", ready_slice)
    slice_, endpoint = found["slice"], found["endpoint"]
    assert isinstance(slice_, dict) and isinstance(endpoint, dict)
    assert slice_["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == (
        "endpointslice-controller.k8s.io"
    )
    assert slice_["addressType"] == "IPv4"
    assert endpoint["addresses"] == ["10.244.1.5"]
    assert endpoint["nodeName"] == "node-a"
    assert endpoint["targetRef"]["name"] == "web-1"


def test_service_account_token_is_denied_until_rbac_grants(
    kube: KubeControlPlane, tmp_path: Path
) -> None:
    create_namespace(kube, "rbac")
    apply(
        kube,
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "reader", "namespace": "rbac"},
        },
    )
    token = kube.kubectl("create", "token", "reader", "-n", "rbac").stdout.strip()
    as_reader = kube.token_kubeconfig(tmp_path / "reader.kubeconfig", token, user="reader")

    denied = kube.kubectl("get", "configmaps", "-n", "rbac", kubeconfig=as_reader, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert "system:serviceaccount:rbac:reader" in denied.stderr

    apply(
        kube,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "read-configmaps", "namespace": "rbac"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
    )
    apply(
        kube,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "reader", "namespace": "rbac"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "read-configmaps",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "rbac"}],
        },
    )
    wait_until(
        "the RoleBinding to let the token list configmaps",
        lambda: (
            kube.kubectl(
                "get", "configmaps", "-n", "rbac", kubeconfig=as_reader, check=False
            ).returncode
            == 0
        ),
    )
    # Still nothing beyond the grant.
    secrets = kube.kubectl("get", "secrets", "-n", "rbac", kubeconfig=as_reader, check=False)
    assert "Forbidden" in secrets.stderr


def test_token_controller_fills_a_service_account_token_secret(kube: KubeControlPlane) -> None:
    create_namespace(kube, "tokens")
    apply(
        kube,
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "legacy", "namespace": "tokens"},
        },
    )
    apply(
        kube,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/service-account-token",
            "metadata": {
                "name": "legacy-token",
                "namespace": "tokens",
                "annotations": {"kubernetes.io/service-account.name": "legacy"},
            },
        },
    )
    secret = wait_until(
        "the token controller to fill the secret",
        lambda: (
            (s := get(kube, "secret", "legacy-token", "-n", "tokens"))
            and "token" in s.get("data", {})
            and s
        ),
    )
    assert {"token", "ca.crt", "namespace"} <= set(secret["data"])


def test_garbage_collection_and_namespace_deletion(kube: KubeControlPlane) -> None:
    create_namespace(kube, "gc")
    kube.kubectl("create", "configmap", "owner", "-n", "gc")
    owner_uid = get(kube, "configmap", "owner", "-n", "gc")["metadata"]["uid"]
    apply(
        kube,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "dependent",
                "namespace": "gc",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
                ],
            },
        },
    )
    kube.kubectl("create", "configmap", "other", "-n", "gc")
    kube.kubectl("delete", "configmap", "owner", "-n", "gc", "--wait=false")
    wait_until(
        "the garbage collector to delete the dependent",
        lambda: get(kube, "configmap", "dependent", "-n", "gc") is None,
    )
    assert get(kube, "configmap", "other", "-n", "gc") is not None

    kube.kubectl("delete", "namespace", "gc", "--wait=false")
    wait_until(
        "the namespace controller to empty and remove the namespace",
        lambda: get(kube, "namespace", "gc") is None,
    )


def test_cilium_crds_take_the_examples_and_refuse_an_invalid_policy(
    kube: KubeControlPlane,
) -> None:
    kube.kubectl("apply", "--server-side", "-f", str(CRDS))
    # (kubectl wait fails outright on a CRD that has no conditions yet, so poll.)
    for crd in ("ciliumnetworkpolicies.cilium.io", "ciliumclusterwidenetworkpolicies.cilium.io"):
        wait_until(
            f"CRD {crd} to be Established",
            lambda crd=crd: any(
                c["type"] == "Established" and c["status"] == "True"
                for c in get(kube, "crd", crd)["status"].get("conditions") or []
            ),
        )
    create_namespace(kube, "batch")
    examples = sorted((ROOT / "examples" / "policies").glob("*.yaml"))
    assert examples
    for path in examples:
        kube.kubectl("apply", "-f", str(path))
    cnps = get(kube, "cnp", "-A")["items"]
    assert {"web-github", "crawler"} <= {p["metadata"]["name"] for p in cnps}
    web = get(kube, "cnp", "web-github", "-n", "default")
    rules = web["spec"]["egress"][0]["toPorts"][0]["rules"]["dns"]
    assert {"matchName": "api.github.com"} in rules
    assert get(kube, "ccnp", "-A")["items"], "an example CiliumClusterwideNetworkPolicy"

    invalid = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ping-only, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
    - toPorts:
        - ports: [{port: "53", protocol: ICMP}]
"""
    refused = kube.kubectl("apply", "-f", "-", input=invalid, check=False)
    assert refused.returncode != 0
    assert "protocol" in refused.stderr
    assert 'Unsupported value: "ICMP"' in refused.stderr
    assert get(kube, "cnp", "ping-only", "-n", "default") is None


def test_data_survives_a_restart_of_etcd_and_the_api_server(kube: KubeControlPlane) -> None:
    create_namespace(kube, "persist")
    kube.kubectl("create", "configmap", "kept", "-n", "persist", "--from-literal=n=42")
    before = get(kube, "configmap", "kept", "-n", "persist")
    kube.stop("kube-apiserver")
    kube.restart("etcd")
    kube.start("kube-apiserver")
    after = get(kube, "configmap", "kept", "-n", "persist")
    assert after["data"] == {"n": "42"}
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    # The controller manager kept running through it and still reconciles.
    create_namespace(kube, "after-restart")


def test_make_kube_up_and_down_keep_the_data(tmp_path: Path) -> None:
    """The make targets (another process than the one that stops them), a second start refused
    while one runs, and objects kept through a stop and start of the whole control plane."""
    require_kube_binaries()
    directory = tmp_path / "cluster"
    make = ["make", "-s", "-C", str(ROOT), f"PYTHON={sys.executable}", f"KUBE_DIR={directory}"]

    def run(target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*make, target], capture_output=True, text=True, check=False, timeout=300
        )

    up = run("kube-up")
    assert up.returncode == 0, up.stderr
    try:
        plane = KubeControlPlane.attach(directory)
        plane.kubectl("create", "configmap", "kept", "-n", "default", "--from-literal=k=v")
        again = run("kube-up")
        assert again.returncode != 0
        assert "already running" in again.stderr

        pids = [c.pid for c in plane.components.values()]
        assert run("kube-down").returncode == 0
        assert all(_proc_state(pid) in ("gone", "Z") for pid in pids)

        assert run("kube-up").returncode == 0
        plane = KubeControlPlane.attach(directory)
        assert get(plane, "configmap", "kept", "-n", "default")["data"] == {"k": "v"}
    finally:
        run("kube-down")
    assert all(c.pid is None for c in KubeControlPlane.attach(directory).components.values())


def _proc_state(pid: int | None) -> str:
    """The process's state letter (Z: exited, not yet reaped), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_compaction_gives_an_old_watch_410_gone(tmp_path: Path) -> None:
    """Extra API server flags reach the server, and etcdctl reaches etcd: with no watch cache
    for configmaps, compacting etcd past a resourceVersion makes a watch from it expire."""
    require_kube_binaries()
    no_cache = ["--watch-cache-sizes=configmaps#0"]
    with KubeControlPlane(tmp_path / "cluster", apiserver_args=no_cache) as plane:
        created = plane.kubectl("create", "configmap", "first", "-o", "json").stdout
        old = json.loads(created)["metadata"]["resourceVersion"]
        for name in ("second", "third"):  # the watch starts after old: compact past that too
            plane.kubectl("create", "configmap", name)
        status = json.loads(plane.etcdctl("endpoint", "status", "-w", "json").stdout)
        plane.etcdctl("compact", str(status[0]["Status"]["header"]["revision"]))
        watch = "/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=5"
        events = plane.kubectl("get", "--raw", f"{watch}&resourceVersion={old}").stdout
        event = json.loads(events.splitlines()[0])
        assert event["type"] == "ERROR"
        assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")


STARTER = """
import json, sys, time
from tools.kube.localkube import KubeControlPlane
plane = KubeControlPlane(sys.argv[1]).up()
print(json.dumps([c.pid for c in plane.components.values()]), flush=True)
time.sleep(600)
"""


def test_a_killed_test_session_leaves_no_control_plane_behind(tmp_path: Path) -> None:
    """Started from Python (not `make kube-up`), the components die with the process that
    started them, even when it is killed and cannot stop them."""
    require_kube_binaries()
    directory = tmp_path / "cluster"
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(directory)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert starter.stdout is not None
        pids = json.loads(starter.stdout.readline())
        assert all(_proc_state(pid) not in ("gone", "Z") for pid in pids)
        starter.kill()
        starter.wait()
        wait_until(
            "the components to exit",
            lambda: all(_proc_state(pid) in ("gone", "Z") for pid in pids),
            timeout=90,  # all at once: the API server may wait for etcd, which is going too
        )
    finally:
        starter.kill()
        starter.wait()
        if starter.stdout is not None:
            starter.stdout.close()
        KubeControlPlane.attach(directory).down()  # whatever is left, if the test failed
