"""`make demo-kubernetes`: fqdnguard following a real Kubernetes control plane.

Takes a control plane started by `make kube-up KUBE_DIR=DIR` (etcd, kube-apiserver and
kube-controller-manager on loopback, built from the Go module proxy), installs Cilium's policy
CRDs, registers two nodes, creates the demo's pods (their addresses are loopback addresses, set
through the status subresource, as a kubelet would) and its CiliumNetworkPolicies, then runs
`fqdnguard run --kubernetes` for one node against a Knot upstream, and shows:

- the verdicts of the pods' queries, as the policies in the API server say;
- a policy changed with kubectl, and how long fqdnguard took to follow it;
- an invalid policy: the Event it gets, the pod it selects in default deny, and
  `fqdnguard policy status` listing it.

Everything stays on loopback; no root needed.  Usage: python3 examples/demo_kubernetes.py DIR
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
from fqdnguard.testing import KnotServer, free_port

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = ("127.0.0.53", 5300)
NODE, OTHER = "demo-node", "dns-node"
PODS = [
    # (namespace, name, node, labels, address)
    ("default", "web", NODE, {"app": "web"}, "127.0.0.10"),
    ("default", "batch", NODE, {"app": "batch"}, "127.0.0.11"),
    ("default", "tools", NODE, {"app": "tools"}, "127.0.0.12"),
    ("kube-system", "coredns", OTHER, {"k8s-app": "kube-dns"}, UPSTREAM[0]),
]


class Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        self.base = ["kubectl", f"--kubeconfig={kubeconfig}"]

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> str:
        proc = subprocess.run(
            [*self.base, *args], input=input, capture_output=True, text=True, check=False
        )
        if check and proc.returncode != 0:
            raise SystemExit(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def apply(self, obj: dict[str, Any] | str) -> None:
        self("apply", "-f", "-", input=obj if isinstance(obj, str) else json.dumps(obj))


def until(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def setup(k: Kubectl) -> None:
    print("== Cilium's policy CRDs (deploy/crds), two nodes, the demo's pods")
    k("apply", "--server-side", "-f", str(ROOT / "deploy" / "crds"))
    established = "jsonpath={.status.conditions[?(@.type=='Established')].status}"
    for crd in ("ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"):
        until(f"the CRD {crd}.cilium.io established",
              lambda crd=crd: k("get", "crd", f"{crd}.cilium.io", "-o", established,
                                check=False) == "True")  # fmt: skip
    for ns in ("default", "kube-system"):
        until(
            f"the ServiceAccount {ns}/default",
            lambda ns=ns: k("get", "sa", "default", "-n", ns, check=False),
        )
    for name in (NODE, OTHER):
        k.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    for ns, name, node, labels, ip in PODS:
        k.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {
                    "nodeName": node,
                    "containers": [{"name": "a", "image": "registry.invalid/a"}],
                },
            }
        )
        status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
        k(
            "patch",
            "pod",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(status),
        )
        print(f"   pod {ns}/{name} on {node}, {ip}, labels {labels}")
    print("== the demo's CiliumNetworkPolicies (examples/demo/policies): web and batch; tools none")
    k("apply", "-f", str(ROOT / "examples" / "demo" / "policies"))


def ask(port: int, source: str, name: str) -> str:
    r = dns.query.udp(
        dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=3, source=source
    )
    addrs = [rd.to_text() for rrset in r.answer for rd in rrset if rrset.rdtype == 1]
    return dns.rcode.to_text(r.rcode()) + (" " + ", ".join(addrs) if addrs else "")


def status(state: Path) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fqdnguard.cli",
            "policy",
            "status",
            "--state-dir",
            str(state),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return json.loads(out.stdout) if out.returncode == 0 else {}


def main() -> int:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    kube_dir = Path(sys.argv[1]).resolve()
    kubeconfig = kube_dir / "admin.kubeconfig"
    k = Kubectl(kubeconfig)
    setup(k)
    zone = (ROOT / "examples" / "zones" / "example.com.zone").read_text()
    state = Path(tempfile.mkdtemp(prefix="fqdnguard-demo-kube-"))
    port = free_port()
    with KnotServer({"example.com": zone}, host=UPSTREAM[0], port=UPSTREAM[1]):
        cmd = [
            sys.executable,
            "-m",
            "fqdnguard.cli",
            "run",
            "--kubernetes",
            "--kubeconfig",
            str(kubeconfig),
            "--node-name",
            NODE,
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"{UPSTREAM[0]}:{UPSTREAM[1]}",
            "--state-dir",
            str(state),
            "--log-queries",
            "none",
        ]
        print(f"\n== fqdnguard run --kubernetes --node-name {NODE} (port {port})")
        log_path = state / "fqdnguard.log"
        with open(log_path, "w") as log:
            proxy = subprocess.Popen(cmd, cwd=ROOT, stderr=log, stdout=log)
        try:
            until(
                "fqdnguard in sync with the API server",
                lambda: (
                    status(state).get("feed", {}).get("state") == "synced"
                    and status(state).get("restricted_endpoints") == 2
                ),
            )
            www = lambda: ask(port, "127.0.0.10", "www.example.com")  # noqa: E731
            until("the DNS server pod known", lambda: www().startswith("NOERROR"), 20)
            print(f"\n{'pod':<14}{'query':<24}result")
            pods = (("web", "127.0.0.10"), ("batch", "127.0.0.11"), ("tools", "127.0.0.12"))
            for pod, src in pods:
                for name in ("www.example.com", "a.b.deep.example.com", "evil.example.org"):
                    print(f"{pod:<14}{name:<24}{ask(port, src, name)}")

            print("\n== kubectl: web-egress now also allows a.b.deep.example.com")
            text = (ROOT / "examples" / "demo" / "policies" / "web.yaml").read_text()
            api = "- matchName: api.example.com"
            changed = text.replace(api, f"{api}\n{' ' * 14}- matchName: a.b.deep.example.com", 1)
            started = time.monotonic()
            k.apply(changed)
            deep = lambda: ask(port, "127.0.0.10", "a.b.deep.example.com")  # noqa: E731
            until("the change", lambda: deep().startswith("NOERROR"), 10)
            took = (time.monotonic() - started) * 1e3
            print(
                f"{'web':<14}{'a.b.deep.example.com':<24}{deep()}"
                f"   (followed the change {took:.0f} ms after kubectl apply returned)"
            )

            print("\n== kubectl: an invalid policy (toFQDNs and toEndpoints in one rule)")
            broken = {
                "apiVersion": "cilium.io/v2",
                "kind": "CiliumNetworkPolicy",
                "metadata": {"name": "broken", "namespace": "default"},
                "spec": {
                    "endpointSelector": {"matchLabels": {"app": "tools"}},
                    "egress": [{"toFQDNs": [{"matchName": "x.example.com"}], "toEndpoints": [{}]}],
                },
            }
            k.apply(broken)
            selector = "involvedObject.name=broken,reason=InvalidPolicy"
            events = lambda: json.loads(  # noqa: E731
                k("get", "events", "-n", "default", "--field-selector", selector, "-o", "json")
            )["items"]
            event = until("its Event", events)
            print(f"   Event {event[0]['reason']}: {event[0]['message']}")
            tools = lambda: ask(port, "127.0.0.12", "www.example.com")  # noqa: E731
            until("tools in default deny", lambda: tools().startswith("REFUSED"), 10)
            print(
                f"{'tools':<14}{'www.example.com':<24}{tools()}"
                "   (no policy selected tools: a new invalid one puts it in default deny)"
            )
            print("\n== fqdnguard policy status")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fqdnguard.cli",
                    "policy",
                    "status",
                    "--state-dir",
                    str(state),
                ],
                check=False,
            )
            k("delete", "cnp", "broken", "-n", "default")
            k.apply(text)
        finally:
            proxy.terminate()
            proxy.wait(15)
    print(f"\nfqdnguard's log: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
