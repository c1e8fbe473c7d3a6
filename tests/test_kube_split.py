"""``fqdnguard agent --kubernetes`` and ``fqdnguard proxy`` as two real processes, the agent
watching the real API server (the session's ``kube`` fixture) and relaying its objects to the
proxy, on loopback with the ``log`` backend and a real Knot upstream. Pods carry loopback
addresses (set through the status subresource), so the test's queries come from them.

What it shows: the proxy follows the API server through the agent; killing the agent leaves the
proxy serving; a restarted proxy serves the relayed objects at once and the agent, still
running, gives it the changes it missed."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest
from fqdnguard.testing import KnotServer, free_port

from tests.kube import apply, create_namespace, create_pod, register_node, set_pod_running
from tests.proxy_fixtures import require_knot
from tests.split_helpers import ask, fqdnguard_cmd, spawn, status, stop, wait_for
from tests.test_kube_source import install_crds

NS = "split-kube"
NODE, OTHER = "split-node-a", "split-node-b"
POD, DNS = "127.0.0.31", "127.0.0.32"
ZONE = """$ORIGIN split.test.
$TTL 300
@        SOA ns admin 1 3600 600 86400 60
@        NS  ns
ns       A   127.0.0.32
www      A   192.0.2.31
other    A   192.0.2.32
"""


def cnp(pattern: str) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "split", "namespace": NS},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "split"}},
            "egress": [
                {
                    "toEndpoints": [{"matchLabels": {"k8s-app": "split-dns"}}],
                    "toPorts": [
                        {
                            "ports": [{"port": "53", "protocol": "ANY"}],
                            "rules": {"dns": [{"matchPattern": pattern}]},
                        }
                    ],
                }
            ],
        },
    }


class Node:
    def __init__(self, kube: Any, knot: KnotServer, root: Path) -> None:
        self.kube, self.knot, self.root = kube, knot, root
        self.state = root / "state"
        self.port = free_port("127.0.0.1")
        self.log = root / "fqdnguard.log"

    def proxy(self) -> Any:
        cmd = fqdnguard_cmd(
            "proxy", "--state-dir", str(self.state), "--backend", "log",
            "--listen", f"127.0.0.1:{self.port}", "--upstream", f"{DNS}:{self.knot.port}",
            "--log-queries", "none",
        )  # fmt: skip
        proc = spawn(cmd, self.log)
        wait_for(lambda: (status(self.state) or {}).get("pid") == proc.pid, "the proxy",
                 log=self.log)  # fmt: skip
        return proc

    def agent(self) -> Any:
        cmd = fqdnguard_cmd(
            "agent", "--kubernetes", "--kubeconfig", str(self.kube.kubeconfig),
            "--node-name", NODE, "--state-dir", str(self.state), "--interval", "0.2",
        )  # fmt: skip
        return spawn(cmd, self.log)

    def ask(self, name: str) -> int | None:
        def sock(family: int) -> socket.socket:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((POD, 0))
            return s

        try:
            return ask(sock, ("127.0.0.1", self.port), name, timeout=1.0)[0]
        except OSError:
            return None

    def until(self, what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
        return wait_for(check, what, timeout, log=self.log)


@pytest.fixture(scope="module")
def node(kube: Any) -> Iterator[Node]:
    require_knot()
    install_crds(kube)
    create_namespace(kube, NS)
    register_node(kube, NODE, "10.78.0.1")
    register_node(kube, OTHER, "10.78.0.2")
    create_pod(kube, NS, "client", NODE, {"app": "split"})
    set_pod_running(kube, NS, "client", [POD])
    create_pod(kube, NS, "dns", OTHER, {"k8s-app": "split-dns"})
    set_pod_running(kube, NS, "dns", [DNS])
    apply(kube, cnp("www.split.test"))
    root = Path(tempfile.mkdtemp(prefix="fqdnguard-kube-split-"))
    port = free_port(DNS)
    with KnotServer({"split.test": ZONE}, host=DNS, port=port) as knot:
        yield Node(kube, knot, root)
    kube.kubectl("delete", "namespace", NS, "--wait=false", check=False)
    kube.kubectl("delete", "node", NODE, OTHER, "--wait=false", check=False)


def test_the_proxy_follows_the_api_server_through_the_agent(node: Node) -> None:
    proxy = node.proxy()
    agent = node.agent()
    try:
        node.until("the relayed policy", lambda: node.ask("www.split.test") == dns.rcode.NOERROR)
        assert node.ask("other.split.test") == dns.rcode.REFUSED
        apply(node.kube, cnp("other.split.test"))
        node.until("the change", lambda: node.ask("other.split.test") == dns.rcode.NOERROR)
        assert node.ask("www.split.test") == dns.rcode.REFUSED

        stop(agent, 9)  # the agent dies: the proxy keeps what it has
        assert node.ask("other.split.test") == dns.rcode.NOERROR
        apply(node.kube, cnp("www.split.test"))  # nobody relays this one yet

        stop(proxy)  # the proxy restarts with no agent: the saved objects serve at once
        proxy = node.proxy()
        assert node.ask("other.split.test") == dns.rcode.NOERROR
        assert node.ask("www.split.test") == dns.rcode.REFUSED

        agent = node.agent()  # back: a reset brings the change made meanwhile
        node.until("the missed change", lambda: node.ask("www.split.test") == dns.rcode.NOERROR)
        assert node.ask("other.split.test") == dns.rcode.REFUSED
        kube_state = (status(node.state) or {}).get("kubernetes") or {}
        assert kube_state.get("node") == NODE and kube_state.get("session")
    finally:
        stop(agent)
        stop(proxy)
