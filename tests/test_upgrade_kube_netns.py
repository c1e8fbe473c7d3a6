"""The upgrade of an intercepting fqdnguard with both containers of each pod running, the agent
fed by a real API server (the session's ``kube`` fixture, tests/kube.py).

The namespaces, the Knot upstream, the ruleset watcher and the dnsperf load are those of
tests/test_upgrade_netns.py. Here each pod of the DaemonSet runs its ``proxy`` and its
``agent`` container from the rendered manifest deploy/kubernetes/fqdnguard.yaml: command,
args, env (NODE_NAME from the downward API, here the Node object's name) and mounted paths
(``tests.deploy_manifest.pod_processes``), both in the node namespace (hostNetwork).

One word is added to the agent's argv: ``--kubeconfig FILE``. In a cluster the kubelet mounts
the pod's ServiceAccount token at /var/run/secrets/kubernetes.io/serviceaccount and sets
KUBERNETES_SERVICE_HOST; the manifest declares no such mount (it is implicit), and the test
will not write that host path. The kubeconfig carries what the mount would: a token of the
manifest's own ServiceAccount (``fqdnguard`` in kube-system, bound to the manifest's
ClusterRole, both applied from the manifest, RBAC on) and the API server's CA. The API server
listens on the host's loopback; a relay (``tests.kube.Relay``) makes it answer on the node
namespace's loopback at the same port, so the kubeconfig's address works there.

The objects live in the API server: the Node, the policed Pod bound to it (its
``status.podIP`` the policed namespace's address, set through the status subresource: no
kubelet runs) and a CiliumNetworkPolicy with DNS rules and toFQDNs. Under dnsperf load the old
pod (proxy + agent) runs, the new pod starts and takes over, and the old pod's processes get
SIGTERM. Shown: no query lost, denied names REFUSED and allowed ones answered throughout,
nothing removed from the node's ruleset; then a policy change made in the API server after the
hand-over is enforced (the new pod's agent feeds the proxy in force: the proxy follows its
session). Also with the policy changed, and a pod created, in the API server between the two
starts.

Needs root, iproute2, knotd, dnsperf, libnftables, nft_tproxy, and the local control plane's
binaries (their absence fails under CI, like the other kube tests).
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest
import yaml

from tests.deploy_manifest import MANIFEST
from tests.kube import (
    Relay,
    apply,
    create_namespace,
    create_pod,
    register_node,
    set_pod_running,
)
from tests.netns import POLICED4, InterceptTopology
from tests.test_e2e_netns import _skip_reason
from tests.test_kube_source import install_crds, service_account_kubeconfig
from tests.test_upgrade_netns import (
    Node,
    Pod,
    ask,
    check_rules_outlive,
    check_upgrade,
    intercept_topology,
    node_of,
    policy_spec,
    snapshot,
    start_load,
    wait,
)

pytestmark = pytest.mark.skipif(
    (_reason := _skip_reason()) is not None or shutil.which("dnsperf") is None,
    reason=_reason or "dnsperf is not installed",
)

NS = "upgrade-kube"
NODE_NAME = "upgrade-node"
#: The pod created between the two starts (pod churn): the free namespace's address.
LATE4 = "10.79.3.2"


def cnp(pattern: str) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "policed-egress", "namespace": NS},
        "spec": policy_spec(pattern),
    }


def _manifest_rbac(kube: Any) -> None:
    """The manifest's ServiceAccount, ClusterRole and ClusterRoleBinding, as it defines them."""
    for obj in yaml.safe_load_all(MANIFEST.read_text()):
        if obj and obj["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding"):
            apply(kube, obj)


def _service_account(manifest: Path) -> tuple[str, str]:
    """(namespace, name) of the ServiceAccount the DaemonSet's pods run under."""
    for obj in yaml.safe_load_all(manifest.read_text()):
        if obj and obj["kind"] == "DaemonSet":
            account = obj["spec"]["template"]["spec"]["serviceAccountName"]
            return obj["metadata"]["namespace"], account
    raise AssertionError("the manifest has no DaemonSet")


@pytest.fixture(scope="module")
def cluster(kube: Any) -> Iterator[tuple[Any, Path]]:
    """The CRDs, the manifest's RBAC, the namespace and the Node; a kubeconfig holding a token
    of the DaemonSet's ServiceAccount."""
    install_crds(kube)
    _manifest_rbac(kube)
    create_namespace(kube, NS)
    register_node(kube, NODE_NAME, "10.79.1.1")
    directory = Path(tempfile.mkdtemp(prefix="fqdnguard-upgrade-kube-"))
    namespace, account = _service_account(MANIFEST)
    kubeconfig = service_account_kubeconfig(
        kube, account, directory / "kubeconfig", namespace=namespace
    )
    try:
        yield kube, kubeconfig
    finally:
        kube.kubectl("delete", "namespace", NS, "--wait=false", check=False)
        kube.kubectl("delete", "node", NODE_NAME, "--wait=false", check=False)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def topo(cluster: tuple[Any, Path]) -> Iterator[InterceptTopology]:
    kube, _ = cluster
    with intercept_topology("fk") as topo:
        relay = Relay(topo, topo.node, kube.ports["kube-apiserver"])
        try:
            yield topo
        finally:
            relay.close()


@pytest.fixture
def node(topo: InterceptTopology, cluster: tuple[Any, Path]) -> Iterator[Node]:
    kube, _ = cluster
    with node_of(topo, NODE_NAME) as n:
        create_pod(kube, NS, "policed", NODE_NAME, {"app": "policed"})
        set_pod_running(kube, NS, "policed", [POLICED4])
        apply(kube, cnp("*.allowed.e2e.test"))
        try:
            yield n
        finally:
            kube.kubectl(
                "delete", "pod", "--all", "-n", NS, "--grace-period=0", "--force", check=False
            )
            kube.kubectl("delete", "cnp", "--all", "-n", NS, check=False)


def start_pod(node: Node, pod: Pod, kubeconfig: Path) -> None:
    """Both containers: the proxy (serving once it answers its control socket), then the
    agent, with the one word the manifest cannot give it outside a cluster."""
    node.start(pod)
    node.start_agent(pod, "--kubeconfig", str(kubeconfig))


def session(pod: Pod) -> str | None:
    """The agent session the pod's proxy follows (None before a reset)."""
    kube = pod.ask("GET", "/v1/status")[1].get("kubernetes") or {}
    return kube.get("session")  # type: ignore[no-any-return]


def upgrade(node: Node, cluster: tuple[Any, Path], *, policy_change: bool) -> None:
    kube, kubeconfig = cluster
    seconds = 8.0
    old, new = node.new_pod(), node.new_pod()
    start_pod(node, old, kubeconfig)
    wait(lambda: snapshot(node)["rules"] == 12 and snapshot(node)["policed"], "interception")
    wait(lambda: ask(node, "web.allowed.e2e.test") == dns.rcode.NOERROR, "the policy relayed")
    assert ask(node, "other.allowed.e2e.test") == dns.rcode.NOERROR  # learned, then unlisted
    assert ask(node, "denied.blocked.e2e.test") == dns.rcode.REFUSED
    first = session(old)
    assert first, "the old proxy follows no agent"
    watcher, allowed, denied = start_load(node, policy_change, seconds)
    try:
        time.sleep(1.5)
        if policy_change:  # between the two starts, a narrower policy and pod churn
            apply(kube, cnp("web.allowed.e2e.test"))
            create_pod(kube, NS, "late", NODE_NAME, {"app": "policed"})
            set_pod_running(kube, NS, "late", [LATE4])
            wait(
                lambda: ask(node, "other.allowed.e2e.test") == dns.rcode.REFUSED,
                "the narrower policy in force on the old pod",
            )
        time.sleep(0.5)
        start_pod(node, new, kubeconfig)
        for process in old.processes():  # the kubelet stops every container of the old pod
            process.send_signal(signal.SIGTERM)
        for process in old.processes():
            assert process.wait(30) == 0, (old.log.read_text(), old.agent_log.read_text())
        wait(lambda: session(new) not in (None, first), "the new agent's reset", 20)
        results = {"allowed": allowed.result(), "denied": denied.result()}
    finally:
        watcher.done.set()
        watcher.join()
    check_upgrade(node, old, new, results, watcher, policy_change=policy_change, seconds=seconds)
    # A change made in the API server after the hand-over: only the new pod's agent is there
    # to relay it, and the proxy in force enforces it.
    feeding = session(new)
    widen = policy_change
    apply(kube, cnp("*.allowed.e2e.test" if widen else "web.allowed.e2e.test"))
    verdict = dns.rcode.NOERROR if widen else dns.rcode.REFUSED
    wait(lambda: ask(node, "other.allowed.e2e.test") == verdict, "the change after the hand-over")
    assert ask(node, "web.allowed.e2e.test") == dns.rcode.NOERROR
    assert ask(node, "denied.blocked.e2e.test") == dns.rcode.REFUSED
    assert session(new) == feeding, "the proxy in force follows another agent"
    assert new.agent_process is not None and new.agent_process.poll() is None
    check_rules_outlive(node, new)


def test_upgrade_with_both_containers_and_the_api_server(
    node: Node, cluster: tuple[Any, Path]
) -> None:
    upgrade(node, cluster, policy_change=False)


def test_upgrade_with_a_policy_change_in_the_api_server_between_the_starts(
    node: Node, cluster: tuple[Any, Path]
) -> None:
    upgrade(node, cluster, policy_change=True)
