"""The upgrade of an intercepting fqdnguard, as the DaemonSet's rolling update does it.

Network namespaces made here (tests/netns.py ``InterceptTopology``): a policed pod, a node with
real nftables, a Knot upstream at the cluster-DNS address. Each "pod" of the DaemonSet runs
its proxy container exactly as the rendered manifest deploy/kubernetes/fqdnguard.yaml (the
chart's default values) says: command, args, env, mounted paths and the ConfigMap's config file
(``tests.deploy_manifest.pod_processes``: the hostPath state directory is one directory per
node, the emptyDir and the ConfigMap one per pod). Nothing is overridden: the intercepted
queries go to the server the pod asked (the chart sets no upstream), the direct listener is the
chart's 127.0.0.1:5353 inside the node namespace.
The old pod's proxy runs; dnsperf loads it from the policed pod with two streams (an allowed
name, a denied one); the new pod's proxy starts beside it and takes over; the old one is told to
stop (SIGTERM) or is killed (``kill -9``) in the middle of the hand-over. Shown: no query lost,
every denied query REFUSED and every allowed one answered (nothing unfiltered), and no
interception rule, policed source or learned element missing from any snapshot of the node's
ruleset taken every 50 ms; the rules stay when the proxies exit.

The agent container is not run: the objects it would relay (``POST /v1/objects``) are pushed
through the pod-private control socket (the agent's ``--socket``, the proxy's
``--control-socket``) as it pushes them.

Needs root, iproute2, knotd, dnsperf, libnftables and the kernel's nft_tproxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest
from fqdnguard._core import DnsCache
from fqdnguard.control import ControlError, request_sync
from fqdnguard.daemons.proxy import KUBE_PROTOCOL, kube_digest
from fqdnguard.sources.model import IDS_FILE, KINDS
from fqdnguard.testing import KnotServer

from tests.deploy_manifest import MANIFEST, Process, pod_processes
from tests.netns import CLUSTER_DNS4, POLICED4, InterceptTopology
from tests.proxy_fixtures import require_knot
from tests.test_e2e_netns import _skip_reason

NODE = "node-a"

ZONE = """$ORIGIN e2e.test.
$TTL 300
@               SOA ns admin 1 3600 600 86400 60
@               NS  ns
ns              A   10.96.0.10
web.allowed     A   10.79.2.10
other.allowed   A   10.79.2.11
denied.blocked  A   10.79.2.12
"""

pytestmark = pytest.mark.skipif(
    (_reason := _skip_reason()) is not None or shutil.which("dnsperf") is None,
    reason=_reason or "dnsperf is not installed",
)


# -- the manifest -----------------------------------------------------------------------------


def flag(argv: list[str], name: str) -> str:
    for i, word in enumerate(argv):
        if word == name:
            return argv[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise KeyError(name)


# -- the objects an agent relays ----------------------------------------------------------


def policy_spec(pattern: str) -> dict[str, Any]:
    """The policed pods' CiliumNetworkPolicy: DNS on port 53 only for names matching
    ``pattern``, and TCP 443 to what they resolve to."""
    selector = {"matchName": pattern} if "*" not in pattern else {"matchPattern": pattern}
    return {
        "endpointSelector": {"matchLabels": {"app": "policed"}},
        "egress": [
            {"toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                          "rules": {"dns": [selector]}}]},
            {"toFQDNs": [selector], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
        ],
    }  # fmt: skip


def objects(pattern: str, late_pod: bool) -> list[dict[str, Any]]:
    def pod(name: str, ip: str, app: str) -> dict[str, Any]:
        return {"kind": "Pod", "key": f"default/{name}", "obj": {
            "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}",
                         "labels": {"app": app}},
            "spec": {"nodeName": NODE, "hostNetwork": False, "serviceAccountName": "default"},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
        }}  # fmt: skip

    out = [
        {"kind": "Namespace", "key": "default",
         "obj": {"metadata": {"name": "default", "uid": "uid-ns", "labels": {}}}},
        pod("policed", POLICED4, "policed"),
        {"kind": "CiliumNetworkPolicy", "key": "default/policed-egress", "obj": {
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "policed-egress", "namespace": "default", "uid": "uid-cnp"},
            "spec": policy_spec(pattern)}},
    ]  # fmt: skip
    if late_pod:  # pod churn: a pod that came after the old proxy's start
        out.append(pod("late", "10.79.3.2", "policed"))
    return out


# -- one node, two pods ---------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    #: The pod's directory: its emptyDir (run/), its ConfigMap files (config/), its log.
    root: Path
    proxy: Process
    agent: Process
    process: subprocess.Popen[bytes] | None = None
    #: The agent container's process, when the test runs it (tests/test_upgrade_kube_netns.py).
    agent_process: subprocess.Popen[bytes] | None = None
    #: Another release's package directory (PYTHONPATH), for a pod of that release
    #: (tests/test_upgrade_versions_netns.py); None: this checkout's.
    python: Path | None = None
    #: The object protocol its agent speaks (``POST /v1/objects``).
    protocol: int | str = KUBE_PROTOCOL

    @property
    def socket(self) -> Path:
        """The pod-private control socket (``--control-socket``), the agent's ``--socket``."""
        return Path(flag(self.proxy.argv, "--control-socket"))

    @property
    def state(self) -> Path:
        return Path(flag(self.proxy.argv, "--state-dir"))

    @property
    def log(self) -> Path:
        return self.root / "proxy.log"

    @property
    def agent_log(self) -> Path:
        return self.root / "agent.log"

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in (self.process, self.agent_process) if p is not None]

    def ask(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        return request_sync(self.socket, method, url, body, timeout=10)


@dataclass
class Node:
    topo: InterceptTopology
    root: Path
    pods: list[Pod] = field(default_factory=list)
    seq: int = 0
    #: The node's name: the pods' NODE_NAME, the Node object's name on a control plane.
    name: str = NODE

    def new_pod(
        self,
        manifest: Path = MANIFEST,
        python: Path | None = None,
        protocol: int | str = KUBE_PROTOCOL,
    ) -> Pod:
        """The next pod of the DaemonSet on this node: its containers as the rendered manifest
        starts them, the node's state directory shared, its own emptyDir and ConfigMap files.
        Another release's pod: its manifest, package directory and agent protocol."""
        name = f"pod{len(self.pods)}"
        root = self.root / name
        containers = pod_processes(
            state_dir=self.root / "node" / "state",
            run_dir=root / "run",
            config_dir=root / "config",
            node_name=self.name,
            manifest=manifest,
        )
        pod = Pod(name, root, containers["proxy"], containers["agent"], python=python)
        pod.protocol = protocol
        assert flag(pod.agent.argv, "--socket") == str(pod.socket), "agent and proxy disagree"
        self.pods.append(pod)
        return pod

    def start(self, pod: Pod) -> None:
        env = {**os.environ, **pod.proxy.env}
        if pod.python is not None:
            env["PYTHONPATH"] = str(pod.python)
        with open(pod.log, "ab") as out:
            pod.process = self.topo.spawn(
                self.topo.node, *pod.proxy.argv, stdout=out, stderr=out, env=env, cwd=os.getcwd()
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert pod.process.poll() is None, f"the proxy exited: {pod.log.read_text()}"
            try:
                if pod.ask("GET", "/v1/status")[0] == 200:
                    return
            except ControlError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{pod.name} did not serve: {pod.log.read_text()}")

    def start_agent(self, pod: Pod, *extra: str) -> None:
        """The pod's agent container in the node namespace (hostNetwork), its argv as the
        manifest says plus ``extra``; its env (NODE_NAME) from the manifest."""
        env = {**os.environ, **pod.agent.env}
        if pod.python is not None:
            env["PYTHONPATH"] = str(pod.python)
        with open(pod.agent_log, "ab") as out:
            pod.agent_process = self.topo.spawn(
                self.topo.node, *pod.agent.argv, *extra, stdout=out, stderr=out, env=env,
                cwd=os.getcwd(),
            )  # fmt: skip

    def push(self, pod: Pod, pattern: str, *, late_pod: bool = False) -> None:
        """What the pod's agent does: a reset with every object, all kinds synced."""
        self.seq += 1
        body = {
            "protocol": pod.protocol, "node": self.name, "session": f"agent-{pod.name}",
            "seq": self.seq, "reset": True, "synced": list(KINDS),
            "changes": objects(pattern, late_pod),
        }  # fmt: skip
        status, answer = pod.ask("POST", "/v1/objects", body)
        assert status == 200, answer

    def nft(self, *args: str) -> Any:
        r = subprocess.run(
            ["ip", "netns", "exec", self.topo.node, "nft", "-j", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        return json.loads(r.stdout) if r.returncode == 0 else None

    def cleanup(self) -> None:
        for pod in self.pods:
            for process in pod.processes():
                if process.poll() is None:
                    process.kill()
                    process.wait(10)
        cli = [sys.executable, "-m", "fqdnguard.cli", "intercept", "cleanup"]
        subprocess.run(
            ["ip", "netns", "exec", self.topo.node, *cli], capture_output=True, check=False
        )
        subprocess.run(
            ["ip", "netns", "exec", self.topo.node, "nft", "delete", "table", "inet", "fqdnguard"],
            capture_output=True,
            check=False,
        )


def snapshot(node: Node) -> dict[str, Any]:
    """Interception rules and policed sources; the enforcement table's elements."""
    out: dict[str, Any] = {"rules": 0, "policed": set(), "elements": set(), "sources": set()}
    data = node.nft("list", "ruleset")
    for item in (data or {}).get("nftables", []):
        if "rule" in item and item["rule"]["table"] == "fqdnguard_intercept":
            out["rules"] += 1
        elif "map" in item and item["map"]["table"] == "fqdnguard":
            for elem in item["map"].get("elem", []):  # restricted source -> its chain
                out["sources"].add(json.dumps(elem, sort_keys=True))
        elif "set" in item:
            s = item["set"]
            for elem in s.get("elem", []):
                value = elem.get("elem", {}).get("val", elem) if isinstance(elem, dict) else elem
                key = (s["table"], s["name"], json.dumps(value, sort_keys=True))
                if s["table"] == "fqdnguard_intercept":
                    out["policed"].add(key)
                elif s["table"] == "fqdnguard":
                    out["elements"].add(key)
    return out


class Watcher(threading.Thread):
    """Snapshots the node's ruleset every 50 ms; records what ever went missing."""

    def __init__(self, node: Node, allowed_to_go: set[str]) -> None:
        super().__init__(daemon=True)
        self.node, self.allowed_to_go = node, allowed_to_go
        self.first = snapshot(node)
        self.seen = dict(self.first)
        self.problems: list[str] = []
        self.snapshots = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            now = snapshot(self.node)
            self.snapshots += 1
            if now["rules"] != self.first["rules"]:
                self.problems.append(
                    f"{now['rules']} interception rules, not {self.first['rules']}"
                )
            for kind in ("policed", "elements", "sources"):
                gone = {
                    k for k in self.seen[kind] - now[kind]
                    if not any(ip in k[2] for ip in self.allowed_to_go)
                }  # fmt: skip
                if gone:
                    self.problems.append(f"{kind} removed: {sorted(gone)}")
                self.seen[kind] = self.seen[kind] | now[kind]


@dataclass
class Load:
    """One dnsperf stream from the policed pod to the cluster-DNS address (intercepted)."""

    process: subprocess.Popen[str]

    def result(self) -> dict[str, Any]:
        out, _ = self.process.communicate(timeout=60)
        got: dict[str, Any] = {"rcodes": {}}
        for key in ("sent", "completed", "lost"):
            m = re.search(rf"Queries {key}:\s+(\d+)", out)
            assert m is not None, out
            got[key] = int(m.group(1))
        m = re.search(r"Response codes:\s+(.*)", out)
        for code, count in re.findall(r"([A-Z]+) (\d+)", m.group(1) if m else ""):
            got["rcodes"][code] = int(count)
        return got


def load(node: Node, name: str, seconds: float, qps: int) -> Load:
    data = node.root / f"queries-{name}"
    data.write_text(f"{name} A\n")
    cmd = [
        "ip", "netns", "exec", node.topo.pod, "dnsperf", "-s", CLUSTER_DNS4, "-p", "53",
        "-d", str(data), "-l", str(seconds), "-Q", str(qps), "-c", "4", "-t", "3",
    ]  # fmt: skip
    return Load(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))


def ask(node: Node, name: str) -> int:
    import socket  # noqa: PLC0415

    s = node.topo.open_socket(node.topo.pod, socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(3)
        s.sendto(dns.message.make_query(name, "A").to_wire(), (CLUSTER_DNS4, 53))
        return dns.message.from_wire(s.recv(65535)).rcode()


def wait(cond: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def intercept_topology(prefix: str) -> Iterator[InterceptTopology]:
    """The namespaces, with Knot serving the zone at the cluster-DNS address."""
    require_knot()
    topo = InterceptTopology(f"{prefix}{os.getpid() % 100000}").create()
    try:
        with KnotServer({"e2e.test": ZONE}, host=CLUSTER_DNS4, port=53, netns=topo.dns):
            yield topo
    finally:
        topo.close()


@contextlib.contextmanager
def node_of(topo: InterceptTopology, name: str = NODE) -> Iterator[Node]:
    """A node named ``name`` on the topology; its pods' processes killed at the end (the
    logs printed when FQDNGUARD_E2E_LOG is set)."""
    root = Path(tempfile.mkdtemp(prefix="fqdnguard-upgrade-"))
    n = Node(topo, root, name=name)
    try:
        yield n
    finally:
        n.cleanup()
        if os.environ.get("FQDNGUARD_E2E_LOG"):
            for pod in n.pods:
                for log in (pod.log, pod.agent_log):
                    if log.exists():
                        print(f"--- {pod.name} {log.name}\n{log.read_text()}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def topo() -> Iterator[InterceptTopology]:
    with intercept_topology("fu") as topo:
        yield topo


@pytest.fixture
def node(topo: InterceptTopology) -> Iterator[Node]:
    with node_of(topo) as n:
        yield n


def upgrade(node: Node, *, policy_change: bool, kill_old: bool, seconds: float = 8.0) -> None:
    old, new = node.new_pod(), node.new_pod()
    assert "--intercept" in old.proxy.argv and flag(old.proxy.argv, "--control-socket")
    node.start(old)
    node.push(old, "*.allowed.e2e.test")
    wait(lambda: snapshot(node)["rules"] == 12 and snapshot(node)["policed"], "interception")
    assert ask(node, "web.allowed.e2e.test") == dns.rcode.NOERROR
    assert ask(node, "other.allowed.e2e.test") == dns.rcode.NOERROR  # learned, then unlisted
    pattern = "web.allowed.e2e.test" if policy_change else "*.allowed.e2e.test"
    watcher, allowed, denied = start_load(node, policy_change, seconds)
    try:
        time.sleep(1.5)
        if policy_change:  # between the two starts, pod churn and a narrower policy
            node.push(old, pattern, late_pod=True)
        time.sleep(0.5)
        node.start(new)  # serves from the state directory before its agent pushes
        assert old.process is not None
        if kill_old:
            # In the middle of the hand-over: the new proxy has the sockets and the control
            # socket; the old one has not handed its cache over yet.
            old.process.kill()
        else:
            old.process.send_signal(signal.SIGTERM)
        assert old.process.wait(30) in (0, -signal.SIGKILL)
        node.push(new, pattern, late_pod=policy_change)
        results = {"allowed": allowed.result(), "denied": denied.result()}
    finally:
        watcher.done.set()
        watcher.join()
    check_upgrade(node, old, new, results, watcher, policy_change=policy_change, seconds=seconds)
    check_rules_outlive(node, new)


def start_load(node: Node, policy_change: bool, seconds: float) -> tuple[Watcher, Load, Load]:
    """The ruleset watcher (an address the policy change drops may go), then two dnsperf
    streams from the policed pod: an allowed name and a denied one."""
    watcher = Watcher(node, {"10.79.2.11"} if policy_change else set())
    watcher.start()
    allowed = load(node, "web.allowed.e2e.test", seconds, 300)
    denied = load(node, "denied.blocked.e2e.test", seconds, 300)
    return watcher, allowed, denied


def check_upgrade(
    node: Node,
    old: Pod,
    new: Pod,
    results: dict[str, dict[str, Any]],
    watcher: Watcher,
    *,
    policy_change: bool,
    seconds: float,
) -> None:
    """The hand-over happened; no query lost, none unfiltered; nothing removed from the
    ruleset; the new proxy's cache holds what the policy in force allows, nothing more."""
    logs = "\n".join(p.log.read_text() for p in (old, new))
    assert "took 6 listening sockets over" in new.log.read_text(), logs
    for stream, rcode in (("allowed", "NOERROR"), ("denied", "REFUSED")):
        got = results[stream]
        assert got["sent"] > seconds * 200, got
        assert got["lost"] == 0, (stream, got)
        assert got["rcodes"] == {rcode: got["completed"]}, (stream, got)
    assert watcher.snapshots > 50
    assert watcher.problems == [], watcher.problems[:5]
    cached = {e["name"] for e in new.ask("GET", "/v1/cache")[1][1:]}
    assert "web.allowed.e2e.test." in cached
    if policy_change:
        assert "other.allowed.e2e.test." not in cached, "a name the policy dropped was kept"
        kept = [k for k in snapshot(node)["elements"] if "10.79.2.11" in k[2]]
        assert kept == [], "an address the policy no longer allows stays admitted"
        assert ask(node, "other.allowed.e2e.test") == dns.rcode.REFUSED


def check_rules_outlive(node: Node, new: Pod) -> None:
    """The new pod's processes exit too: the rules stay (they belong to the node)."""
    for process in new.processes():
        process.send_signal(signal.SIGTERM)
    for process in new.processes():
        assert process.wait(30) == 0
    after = snapshot(node)
    assert after["rules"] == 12 and after["policed"], after
    with pytest.raises(OSError):  # nobody serves: the policed pod's DNS is dropped, not unfiltered
        ask(node, "web.allowed.e2e.test")


def test_upgrade_hands_sockets_and_state_over_losing_nothing(node: Node) -> None:
    upgrade(node, policy_change=False, kill_old=False)


def test_upgrade_with_a_policy_change_between_the_starts(node: Node) -> None:
    upgrade(node, policy_change=True, kill_old=False)


def test_upgrade_with_the_old_proxy_killed_in_the_middle(node: Node) -> None:
    upgrade(node, policy_change=False, kill_old=True)


def test_a_proxy_without_a_readable_policy_keeps_what_the_node_enforces(node: Node) -> None:
    """Its state unreadable (here the relayed objects; a newer release's state or a corrupt
    policy file do the same), a proxy starts with no policy: the sources the node polices stay
    intercepted and restricted (their DNS refused) until a policy arrives; only then the sets
    follow it."""
    first, second = node.new_pod(), node.new_pod()
    node.start(first)
    node.push(first, "*.allowed.e2e.test")
    wait(lambda: snapshot(node)["policed"] and snapshot(node)["sources"], "interception")
    assert ask(node, "web.allowed.e2e.test") == dns.rcode.NOERROR
    before = snapshot(node)
    assert first.process is not None
    first.process.kill()
    first.process.wait(10)
    state = first.state
    (state / "kubernetes.json").write_text("{not json")
    node.start(second)
    after = snapshot(node)
    assert after["rules"] == before["rules"]
    assert after["policed"] == before["policed"], "the policed sources shrank without a policy"
    assert after["sources"] == before["sources"], "restricted endpoints lost their chains"
    assert before["elements"] <= after["elements"]
    for name in ("web.allowed.e2e.test", "denied.blocked.e2e.test"):
        assert ask(node, name) == dns.rcode.REFUSED  # to the proxy, which has no policy yet
    node.push(second, "*.allowed.e2e.test")
    assert ask(node, "web.allowed.e2e.test") == dns.rcode.NOERROR
    assert ask(node, "denied.blocked.e2e.test") == dns.rcode.REFUSED


def test_adopted_entries_the_policy_no_longer_allows_leave_the_kernel(node: Node) -> None:
    """During the overlap the old proxy, still under the wider policy, learned and programmed
    an address the new one's narrower policy no longer allows: adopting its cache drops the
    entry and deletes the element, and keeps what is still allowed."""
    pod = node.new_pod()
    node.start(pod)
    node.push(pod, "web.allowed.e2e.test")
    assert ask(node, "web.allowed.e2e.test") == dns.rcode.NOERROR
    (_, set_name, _), *_ = [k for k in snapshot(node)["elements"] if "10.79.2.10" in k[2]]
    cached = pod.ask("GET", "/v1/cache")[1][1:]
    endpoint = next(e["endpoint"] for e in cached if e["name"] == "web.allowed.e2e.test.")
    subprocess.run(
        ["ip", "netns", "exec", node.topo.node, "nft", "add", "element", "inet", "fqdnguard",
         set_name, "{ 10.79.2.11 timeout 300s }"],
        check=True,
    )  # fmt: skip
    assert any("10.79.2.11" in k[2] for k in snapshot(node)["elements"])
    left = DnsCache()
    left.record(endpoint, "other.allowed.e2e.test", [("10.79.2.11", 300)])
    left.record(endpoint, "web.allowed.e2e.test", [("10.79.2.10", 300)])
    state = pod.state
    name = f"cache.handover.4242.{kube_digest(NODE)[:16]}"
    left.save(state / name)
    code, body = request_sync(state / "control.sock", "POST", "/v1/adopt", {"file": name})
    assert code == 200, body
    elements = snapshot(node)["elements"]
    assert not any("10.79.2.11" in k[2] for k in elements), "a disallowed address stays admitted"
    assert any("10.79.2.10" in k[2] for k in elements)


def _ids(node: Node, pod: Pod) -> dict[str, int]:
    """The pods' endpoint ids by UID (endpoint-ids.json in the node's state directory)."""
    return {uid: int(i) for uid, i in json.loads((pod.state / IDS_FILE).read_text())["ids"].items()}


def test_restored_entries_of_an_id_that_names_another_pod_now_are_dropped(node: Node) -> None:
    """The proxy learned an address for the policed pod, then died (kill -9: its journal and
    state stay). The id map it left is then not the one the next proxy reads (here the two
    pods' ids swapped, as two proxies giving ids to new pods in another order, or a lost map
    started afresh, would do): the next proxy must not credit the late pod with what the
    policed pod learned, although the policy would allow it the name."""
    first, second = node.new_pod(), node.new_pod()
    node.start(first)
    node.push(first, "*.allowed.e2e.test", late_pod=True)
    assert ask(node, "web.allowed.e2e.test") == dns.rcode.NOERROR
    ids = _ids(node, first)
    policed, late = ids["uid-policed"], ids["uid-late"]
    assert first.process is not None
    first.process.kill()
    first.process.wait(10)
    swapped = {"ids": {"uid-policed": late, "uid-late": policed}, "next": max(ids.values()) + 1}
    (first.state / IDS_FILE).write_text(json.dumps(swapped))
    node.start(second)
    cached = second.ask("GET", "/v1/cache")[1][1:]
    credited = {e["endpoint"] for e in cached if e["name"] == "web.allowed.e2e.test."}
    assert policed not in credited, "the late pod (now this id) got the policed pod's entries"
    elements = snapshot(node)["elements"]
    assert not any("10.79.2.10" in k[2] for k in elements), "the address stays admitted"
    assert ask(node, "web.allowed.e2e.test") == dns.rcode.NOERROR  # learned again, by its id


def test_a_hand_over_of_ids_that_name_other_pods_here_is_not_adopted(node: Node) -> None:
    """The proxy handing over gave an id to another pod than this one did (pods created while
    both ran): its file says which pod each id named; those entries are not adopted and their
    elements are deleted, the others are."""
    pod = node.new_pod()
    node.start(pod)
    node.push(pod, "*.allowed.e2e.test", late_pod=True)
    assert ask(node, "web.allowed.e2e.test") == dns.rcode.NOERROR
    ids = _ids(node, pod)
    policed, late = ids["uid-policed"], ids["uid-late"]
    left = DnsCache()
    left.record(late, "other.allowed.e2e.test", [("10.79.2.11", 300)])  # another pod's, there
    left.record(policed, "web.allowed.e2e.test", [("10.79.2.10", 300)])
    name = f"cache.handover.4242.{kube_digest(NODE)[:16]}"
    left.save(pod.state / name)
    owners = {"owners": {str(policed): "uid-policed", str(late): "uid-gone"}}
    (pod.state / f"{name}.owners").write_text(json.dumps(owners))
    (_, set_name, _), *_ = [k for k in snapshot(node)["elements"] if "10.79.2.10" in k[2]]
    late_set = f"ep_{late}_{set_name.split('_', 2)[2]}"  # ep_<id>_<class>_<family>
    subprocess.run(
        ["ip", "netns", "exec", node.topo.node, "nft", "add", "element", "inet", "fqdnguard",
         late_set, "{ 10.79.2.11 timeout 300s }"],
        check=True,
    )  # fmt: skip
    code, body = request_sync(pod.state / "control.sock", "POST", "/v1/adopt", {"file": name})
    assert code == 200, body
    cached = {(e["endpoint"], e["name"]) for e in pod.ask("GET", "/v1/cache")[1][1:]}
    assert (late, "other.allowed.e2e.test.") not in cached, "another pod's entry was adopted"
    assert (policed, "web.allowed.e2e.test.") in cached
    elements = snapshot(node)["elements"]
    assert not any("10.79.2.11" in k[2] for k in elements), "its element stays admitted"
    assert not (pod.state / f"{name}.owners").exists()
