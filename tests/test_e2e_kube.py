"""End to end with a real control plane: ``fqdnguard run --kubernetes`` on a "node" network
namespace, fed by a real kube-apiserver (the session's ``kube`` fixture), enforcing with
nftables for a "pod" namespace whose address is the pod object's, with a real Knot upstream.

The pod objects carry the addresses of the test's namespaces (no kubelet runs: the test sets
``status.podIPs``). The API server listens on the host's loopback; a relay inside the node
namespace (``tests.kube.Relay``) carries its connections, and cutting the relay is how the node
loses the API server while the server keeps running. fqdnguard runs under the ServiceAccount
of ``deploy/kubernetes/rbac.yaml`` (a token bound to that ClusterRole, RBAC on), so a missing
permission fails these tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest
from fqdnguard.testing import KnotServer

from tests.kube import (
    Relay,
    apply,
    create_namespace,
    create_pod,
    get,
    register_node,
    set_pod_running,
    wait_until,
)
from tests.netns import NODE_POD4, POD4, UPSTREAM4, Topology, echo_ok
from tests.proxy_fixtures import require_knot
from tests.test_e2e_netns import ZONE, _skip_reason
from tests.test_kube_source import install_crds

pytestmark = pytest.mark.skipif(
    (_reason := _skip_reason()) is not None, reason=_reason or "available"
)

NS = "e2e-kube"
NODE_A, NODE_B = "e2e-node-a", "e2e-node-b"
RBAC = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "rbac.yaml"
#: A second address in the pod namespace, claimed by a pod of the other node.
FAR4 = "10.77.1.3"
#: What the local control plane advertises as the API server's address.
APISERVER = "192.0.2.1"


def cnp(name: str, app: str, pattern: str, *, port: int = 443) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": app}},
            "egress": [
                {
                    "toEndpoints": [{"matchLabels": {"k8s-app": "e2e-dns"}}],
                    "toPorts": [
                        {
                            "ports": [{"port": "53", "protocol": "ANY"}],
                            "rules": {"dns": [{"matchPattern": pattern}]},
                        }
                    ],
                },
                {
                    "toFQDNs": [{"matchPattern": pattern}],
                    "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}]}],
                },
            ],
        },
    }


@dataclass
class Env:
    kube: Any
    topo: Topology
    state: Path
    relay: Relay
    proc: subprocess.Popen[bytes]

    def resolve(self, name: str, source: str = POD4) -> tuple[int, list[str]] | None:
        """(rcode, addresses) as the pod asks the node's proxy; None when nothing answers."""
        s = self.topo.open_socket(self.topo.pod, socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            s.bind((source, 0))
            s.settimeout(1.5)
            s.sendto(dns.message.make_query(name, "A").to_wire(), (NODE_POD4, 53))
            try:
                answer = dns.message.from_wire(s.recv(65535))
            except TimeoutError:
                return None
        addrs = [rd.address for rrset in answer.answer for rd in rrset if rrset.rdtype == 1]
        return answer.rcode(), addrs

    def reaches(self, ip: str, port: int = 443) -> bool:
        s = self.topo.connect(self.topo.pod, ip, port)
        if s is None:
            return False
        with s:
            return echo_ok(s)

    def until(self, what: str, check: Any, timeout: float = 15.0) -> Any:
        if self.proc.poll() is not None:
            pytest.fail(f"fqdnguard exited: {self.log()}")
        return wait_until(what, check, timeout)

    def log(self) -> str:
        return (self.state / "fqdnguard.log").read_text(errors="replace")[-6000:]

    def policy_status(self) -> dict[str, Any]:
        from fqdnguard.control import request_sync  # noqa: PLC0415

        _, body = request_sync(self.state / "run" / "control.sock", "GET", "/v1/policy")
        return body  # type: ignore[no-any-return]


def _token_kubeconfig(kube: Any, path: Path) -> Path:
    kube.kubectl("apply", "-f", str(RBAC))
    token = kube.kubectl(
        "create", "token", "fqdnguard", "-n", "kube-system", "--duration=2h"
    ).stdout.strip()
    return kube.token_kubeconfig(path, token)  # type: ignore[no-any-return]


def _start(env_topo: Topology, state: Path, kubeconfig: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "fqdnguard.cli", "run", "--kubernetes",
        "--kubeconfig", str(kubeconfig), "--node-name", NODE_A, "--backend", "nftables",
        "--listen", f"{NODE_POD4}:53", "--upstream", f"{UPSTREAM4}:53",
        "--state-dir", str(state / "run"), "--log-queries", "none", "--log-level", "info",
    ]  # fmt: skip
    with open(state / "fqdnguard.log", "ab") as log:
        return env_topo.spawn(env_topo.node, *cmd, stdout=log, stderr=log, cwd=os.getcwd())


@pytest.fixture(scope="module")
def env(kube: Any) -> Iterator[Env]:
    require_knot()
    topo = Topology(prefix=f"fk{os.getpid() % 100000}").create()
    state = Path(tempfile.mkdtemp(prefix="fqdnguard-e2e-kube-"))
    relay: Relay | None = None
    try:
        topo.ns(topo.pod, "ip", "addr", "add", f"{FAR4}/24", "dev", "fgp0")
        # The API server's advertised address (the `kubernetes` Service's endpoint) answers in
        # the world, so that `toEntities: [kube-apiserver]` has something to reach.
        topo.ns(topo.world, "ip", "addr", "add", f"{APISERVER}/32", "dev", "fgw0")
        topo.ns(topo.node, "ip", "route", "add", f"{APISERVER}/32", "dev", "fgn1")
        topo.start_echo_servers(sys.executable)
        install_crds(kube)
        create_namespace(kube, NS)
        register_node(kube, NODE_A, "10.77.1.1", "10.77.1.0/24")
        register_node(kube, NODE_B, "10.77.9.1", "10.77.2.48/28")  # the DNS pod's
        create_pod(kube, NS, "dns", NODE_B, {"k8s-app": "e2e-dns"})
        set_pod_running(kube, NS, "dns", [UPSTREAM4])
        create_pod(kube, NS, "client", NODE_A, {"app": "client"})
        set_pod_running(kube, NS, "client", [POD4])
        apply(kube, cnp("client-egress", "client", "*.allowed.e2e.test"))
        kubeconfig = _token_kubeconfig(kube, state / "fqdnguard.kubeconfig")
        relay = Relay(topo, topo.node, kube.ports["kube-apiserver"])
        with KnotServer({"e2e.test": ZONE}, host=UPSTREAM4, port=53, netns=topo.world):
            proc = _start(topo, state, kubeconfig)
            e = Env(kube, topo, state, relay, proc)
            e.until("the control socket", (e.state / "run" / "control.sock").exists)
            e.until(
                "the first listings in force",
                lambda: (
                    e.policy_status().get("feed", {}).get("state") == "synced"
                    and e.policy_status().get("restricted_endpoints") == 1
                ),
                30,
            )
            # The DNS server is a pod of the other node: known once the watch of the pods the
            # policy's toEndpoints select has listed it.
            e.until("the DNS server known", lambda: _answers(e, "alt.allowed.e2e.test"))
            yield e
    finally:
        if relay is not None:
            relay.close()
        topo.close()
        log = state / "fqdnguard.log"
        if log.exists():
            print(f"--- fqdnguard log\n{log.read_text(errors='replace')[-8000:]}", file=sys.stderr)
        kube.kubectl("delete", "namespace", NS, "--wait=false", check=False)
        kube.kubectl("delete", "node", NODE_A, NODE_B, "--wait=false", check=False)


def _answers(env: Env, name: str) -> list[str] | None:
    got = env.resolve(name)
    return got[1] if got is not None and got[0] == dns.rcode.NOERROR else None


def _refused(env: Env, name: str, source: str = POD4) -> bool:
    got = env.resolve(name, source)
    return got is not None and got[0] == dns.rcode.REFUSED


def test_verdicts_and_enforcement_follow_the_objects(env: Env) -> None:
    assert not env.reaches("10.77.2.10"), "reachable before its name was resolved"
    assert _answers(env, "web.allowed.e2e.test") == ["10.77.2.10"]
    assert env.reaches("10.77.2.10")
    assert not env.reaches("10.77.2.10", 8080), "a port the policy does not list"
    assert _refused(env, "denied.blocked.e2e.test")
    assert not env.reaches("10.77.2.12")


def test_a_pod_of_another_node_is_no_source(env: Env) -> None:
    create_pod(env.kube, NS, "far", NODE_B, {"app": "client"})
    set_pod_running(env.kube, NS, "far", [FAR4])
    time.sleep(1.0)  # time enough for a watch event to arrive and be built
    assert _refused(env, "web.allowed.e2e.test", source=FAR4), "not a source here"


def test_a_policy_change_and_a_label_change_take_effect(env: Env) -> None:
    apply(env.kube, cnp("client-egress", "client", "*.other.e2e.test"))
    env.until("the new pattern", lambda: _refused(env, "web.allowed.e2e.test"))
    apply(env.kube, cnp("client-egress", "client", "*.allowed.e2e.test"))
    env.until("the pattern back", lambda: _answers(env, "web.allowed.e2e.test"))
    # A second policy for app=alt allows only alt.allowed, on 8080; the label moves the pod.
    apply(env.kube, cnp("alt-egress", "alt", "alt.allowed.e2e.test", port=8080))
    env.kube.kubectl("label", "pod", "client", "-n", NS, "app=alt", "--overwrite")
    env.until("the other policy", lambda: _refused(env, "web.allowed.e2e.test"))
    assert _answers(env, "alt.allowed.e2e.test") == ["10.77.2.14"]
    assert env.reaches("10.77.2.14", 8080)
    env.kube.kubectl("label", "pod", "client", "-n", NS, "app=client", "--overwrite")
    env.until("the first policy again", lambda: _answers(env, "web.allowed.e2e.test"))


def test_entities_kube_apiserver_and_world_reach_exactly_those(env: Env) -> None:
    entities = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "entities", "namespace": NS},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "ent"}},
            "egress": [
                {"toEntities": ["kube-apiserver"]},
                {"toEntities": ["world"],
                 "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]},
            ],
        },
    }  # fmt: skip
    apply(env.kube, entities)
    env.kube.kubectl("label", "pod", "client", "-n", NS, "app=ent", "--overwrite")
    try:
        env.until("the entities policy", lambda: env.reaches("10.77.2.10", 8080))
        assert env.reaches(APISERVER, 443), "kube-apiserver"
        assert not env.reaches("10.77.2.10", 443), "world only on 8080"
        assert not env.reaches(UPSTREAM4, 8080), "a pod's address is the cluster's, not world"
    finally:
        env.kube.kubectl("label", "pod", "client", "-n", NS, "app=client", "--overwrite")
        env.kube.kubectl("delete", "cnp", "entities", "-n", NS)
    env.until("the first policy again", lambda: _answers(env, "web.allowed.e2e.test"))


def test_deleting_and_replacing_a_policy(env: Env) -> None:
    env.kube.kubectl("delete", "cnp", "client-egress", "-n", NS)
    # No policy selects the pod any more: unrestricted, as in Cilium.
    env.until("no policy", lambda: _answers(env, "denied.blocked.e2e.test"))
    apply(env.kube, cnp("client-egress", "client", "*.allowed.e2e.test"))
    env.until("the policy again", lambda: _refused(env, "denied.blocked.e2e.test"))


def test_an_invalid_policy_gets_an_event_and_changes_nothing_else(env: Env) -> None:
    # Valid for the CRD schema, refused by Cilium's rule sanitiser and by fqdnguard.
    bad = cnp("broken", "client", "*.allowed.e2e.test")
    bad["spec"]["egress"][1]["toEndpoints"] = [{"matchLabels": {"app": "anything"}}]
    proc = env.kube.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode == 0, proc.stderr

    def event() -> Any:
        events = get(env.kube, "events", "-n", NS, "--field-selector", "involvedObject.name=broken")
        return [e for e in (events or {}).get("items", []) if e.get("reason") == "InvalidPolicy"]

    (ev,) = env.until("the Event", event)
    assert "egress[1]" in ev["message"] and "toFQDNs" in ev["message"]
    assert ev["count"] in (None, 1)
    # The other policy still allows its names, and nothing became more permissive.
    assert _answers(env, "web.allowed.e2e.test") == ["10.77.2.10"]
    assert _refused(env, "denied.blocked.e2e.test")
    status = env.policy_status()
    assert [i["policy"] for i in status["invalid"]] == [f"{NS}/broken"]
    env.kube.kubectl("delete", "cnp", "broken", "-n", NS)
    env.until("the invalid policy gone", lambda: not env.policy_status()["invalid"])


def test_the_api_server_out_of_reach_then_back(env: Env) -> None:
    assert _answers(env, "web.allowed.e2e.test") == ["10.77.2.10"]
    env.relay.cut()
    try:
        # Changes made while the node cannot see them: a deletion among them.
        env.kube.kubectl("delete", "cnp", "client-egress", "-n", NS)
        apply(env.kube, cnp("client-egress-2", "client", "*.other.e2e.test"))
        time.sleep(1.0)
        assert _answers(env, "web.allowed.e2e.test") == ["10.77.2.10"], "the last state serves"
        assert env.reaches("10.77.2.10")
    finally:
        env.relay.mend()
    env.until("the changes after the return", lambda: _refused(env, "web.allowed.e2e.test"), 45)
    env.kube.kubectl("delete", "cnp", "client-egress-2", "-n", NS)
    apply(env.kube, cnp("client-egress", "client", "*.allowed.e2e.test"))
    env.until("the policy back", lambda: _answers(env, "web.allowed.e2e.test"))


def test_the_api_server_stopped_dns_still_answered_and_enforced(env: Env) -> None:
    env.kube.stop("kube-apiserver")
    try:
        time.sleep(1.0)
        assert _answers(env, "web.allowed.e2e.test") == ["10.77.2.10"]
        assert _refused(env, "denied.blocked.e2e.test")
        assert env.reaches("10.77.2.10")
        assert not env.reaches("10.77.2.12")
    finally:
        env.kube.start("kube-apiserver")
    apply(env.kube, cnp("client-egress", "client", "*.other.e2e.test"))
    env.until("a change after the restart", lambda: _refused(env, "web.allowed.e2e.test"), 45)
    apply(env.kube, cnp("client-egress", "client", "*.allowed.e2e.test"))
    env.until("the policy back", lambda: _answers(env, "web.allowed.e2e.test"))


def test_a_deleted_pod_address_is_refused_and_its_successor_inherits_nothing(env: Env) -> None:
    assert _answers(env, "web.allowed.e2e.test") == ["10.77.2.10"]
    assert env.reaches("10.77.2.10")
    env.kube.kubectl("delete", "pod", "client", "-n", NS, "--grace-period=0", "--force")
    env.until("the address unknown", lambda: _refused(env, "web.allowed.e2e.test"))
    create_pod(env.kube, NS, "client-2", NODE_A, {"app": "client"})
    set_pod_running(env.kube, NS, "client-2", [POD4])
    env.until("the new pod enforced", lambda: _refused(env, "denied.blocked.e2e.test") and
              not _refused(env, "other.allowed.e2e.test"))  # fmt: skip
    assert not env.reaches("10.77.2.10"), "the old pod's learning is not the new pod's"
    assert _answers(env, "web.allowed.e2e.test") == ["10.77.2.10"]
    assert env.reaches("10.77.2.10")


def test_a_restart_serves_from_the_state_before_the_api_server_answers(env: Env) -> None:
    env.relay.cut()  # the restarted process cannot list anything
    try:
        env.proc.terminate()
        env.proc.wait(15)
        kubeconfig = env.state / "fqdnguard.kubeconfig"
        env.proc = _start(env.topo, env.state, kubeconfig)
        env.until("serving from the state", lambda: env.resolve("web.allowed.e2e.test"))
        assert _answers(env, "web.allowed.e2e.test") == ["10.77.2.10"]
        assert _refused(env, "denied.blocked.e2e.test")
    finally:
        env.relay.mend()
    env.until("synced again", lambda: env.policy_status().get("feed", {}).get("state") == "synced")
