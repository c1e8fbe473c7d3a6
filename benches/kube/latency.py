"""From an API change to a changed verdict, against a real API server.

Starts the local control plane (tools/kube/localkube.py, what ``make kube-up`` runs) unless
``--kube-dir`` names a running one, creates pods and CiliumNetworkPolicies, and runs the agent
side of fqdnguard (the Kubernetes source, the cluster model and its builds:
``fqdnguard.sources.feed.KubernetesFeed``) in a child process pinned to one core. The child
prints, after each build, the DNS verdict of a probe pod for a probe name; the parent flips the
probe's policy through the API and times the moment the child's verdict follows, while a
churn of pod events (label patches of other nodes' pods, ``--churn`` per second) runs.

Per size (pods, policies) it prints: the initial sync time and the child's RSS after it; the
API-change-to-verdict latency, p50 and p99 over ``--flips`` flips (target p99 < 1 s); and the
child's CPU per pod event, from its own clock over a churn-only window (the churn patches the
labels of this node's pods: events the agent receives and builds for).

    python3 benches/kube/latency.py            # 1k and 10k pods x 100 and 1k policies
    python3 benches/kube/latency.py --quick    # 1k pods, 100 policies, fewer flips
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "python"))

NS = "latency"
NODE = "lat-a"
OTHERS = [f"lat-{c}" for c in "bcdefgh"]
LOCAL = 100
PROBE_NAME = "x.flip-a.example.com"
TARGET_P99 = 1.0


# -- the child: the agent side of fqdnguard ------------------------------------------------------


def agent(kubeconfig: str) -> None:
    """Runs the source, the model and its builds; one JSON line per build and per second."""
    import resource  # noqa: PLC0415

    import uvloop  # noqa: PLC0415
    from fqdnguard.sources.feed import KubernetesFeed  # noqa: PLC0415
    from fqdnguard.sources.model import Built  # noqa: PLC0415

    started = time.time()
    last: dict[str, Any] = {}

    def out(line: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    def apply(built: Built) -> None:
        probe = built.endpoints.by_name(NS, "probe")
        verdict = None
        if probe is not None:
            verdict = bool(built.policy.dns_verdict(probe, None, 53, "UDP", PROBE_NAME).allowed)
        synced = feed.model.is_synced()
        if verdict != last.get("verdict") or synced != last.get("synced"):
            last.update(verdict=verdict, synced=synced)
            out({"t": time.time(), "verdict": verdict, "synced": synced,
                 "endpoints": len(built.endpoints), "started": started})  # fmt: skip

    feed = KubernetesFeed(NODE, apply, kubeconfig=kubeconfig)

    async def main() -> None:
        await feed.start()
        while True:
            await asyncio.sleep(1.0)
            times = os.times()
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out({"stats": {"cpu": times.user + times.system, "peak_rss_kb": rss,
                           "rss_kb": _rss_kb(), "builds": feed.builds}})  # fmt: skip

    uvloop.run(main())


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- the parent ---------------------------------------------------------------------------------


def _pod(name: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/c"}]},
    }


def _status(ip: str) -> dict[str, Any]:
    return {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def _cnp(name: str, app: str, pattern: str) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": app}},
            "egress": [
                {
                    "toEndpoints": [{"matchLabels": {"k8s-app": "dns"}}],
                    "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                                 "rules": {"dns": [{"matchPattern": pattern}]}}],
                },
                {"toFQDNs": [{"matchPattern": pattern}]},
            ],
        },
    }  # fmt: skip


def _ip(i: int) -> str:
    return f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}"


async def setup(kube: Any, pods: int, policies: int, apps: int) -> None:
    """Pods pod-0..pods-1 (LOCAL of them on this node) and policies pol-0..policies-1; what
    exists already is kept (sizes grow from one round to the next)."""
    base = f"/api/v1/namespaces/{NS}/pods"
    have = {i["metadata"]["name"] for i in json.loads(await kube.get(base))["items"]}
    todo = [i for i in range(pods) if f"pod-{i}" not in have]

    def create(i: int) -> Any:
        async def call() -> None:
            node = NODE if i < LOCAL else OTHERS[i % len(OTHERS)]
            await kube.request("POST", base, _pod(f"pod-{i}", node, {"app": f"a{i % apps}"}))
            await kube.request("PATCH", f"{base}/pod-{i}/status", _status(_ip(i)),
                               "application/merge-patch+json")  # fmt: skip

        return call

    await kube.many([create(i) for i in todo])
    cbase = f"/apis/cilium.io/v2/namespaces/{NS}/ciliumnetworkpolicies"
    have = {i["metadata"]["name"] for i in json.loads(await kube.get(cbase))["items"]}
    todo = [j for j in range(policies) if f"pol-{j}" not in have]
    await kube.many([
        (lambda j=j: kube.request("POST", cbase, _cnp(f"pol-{j}", f"a{j}", f"*.s{j}.example.com")))
        for j in todo
    ])  # fmt: skip


class Child:
    def __init__(self, kubeconfig: Path) -> None:
        self.proc = subprocess.Popen(
            ["taskset", "-c", "1", sys.executable, __file__, "--agent", str(kubeconfig)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT / "python")},
        )
        self.lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.stats: dict[str, Any] = {}
        self.started = time.time()

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.proc.stdout is not None
        while True:
            raw = await loop.run_in_executor(None, self.proc.stdout.readline)
            if not raw:
                return
            line = json.loads(raw)
            if "stats" in line:
                self.stats = line["stats"]
            else:
                await self.lines.put(line)

    async def until(self, check: Any, timeout: float) -> dict[str, Any]:
        deadline = time.time() + timeout
        while True:
            line = await asyncio.wait_for(self.lines.get(), max(0.01, deadline - time.time()))
            if check(line):
                return line

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


async def churn(kube: Any, pods: int, rate: float, counter: list[int]) -> None:
    """Label patches of this node's pods (every one an event the agent receives and builds;
    other nodes' pods are not watched unless a policy's toEndpoints selects them)."""
    base = f"/api/v1/namespaces/{NS}/pods"
    k = 0
    while True:
        i = (k * 7919) % min(LOCAL, pods)
        patch = {"metadata": {"labels": {"churn": str(k)}}}
        with contextlib.suppress(Exception):
            await kube.request("PATCH", f"{base}/pod-{i}", patch, "application/merge-patch+json")
            counter[0] += 1
        k += 1
        await asyncio.sleep(1 / rate)


async def measure(kube: Any, kubeconfig: Path, pods: int, policies: int, args: Any) -> Any:
    await setup(kube, pods, policies, max(policies, 1))
    probe_pol = f"/apis/cilium.io/v2/namespaces/{NS}/ciliumnetworkpolicies/probe-pol"
    child = Child(kubeconfig)
    reader = asyncio.ensure_future(child.read())
    try:
        first = await child.until(lambda line: line["synced"], 600)
        sync_s = first["t"] - child.started
        await asyncio.sleep(1.5)
        rss_mb = child.stats.get("rss_kb", 0) / 1024
        events = [0]
        churner = asyncio.ensure_future(churn(kube, pods, args.churn, events))
        # CPU per pod event: a churn-only window.
        await asyncio.sleep(1.5)
        cpu0, ev0 = child.stats.get("cpu", 0.0), events[0]
        await asyncio.sleep(args.window)
        cpu1, ev1 = child.stats.get("cpu", 0.0), events[0]
        cpu_per_event_us = (cpu1 - cpu0) / max(1, ev1 - ev0) * 1e6
        latencies = []
        for flip in range(args.flips):
            allowed = flip % 2 == 0
            pattern = "*.flip-a.example.com" if allowed else "*.flip-b.example.com"
            t0 = time.time()
            spec = {"spec": _cnp("probe-pol", "probe", pattern)["spec"]}
            await kube.request("PATCH", probe_pol, spec, "application/merge-patch+json")
            line = await child.until(lambda line, a=allowed: line["verdict"] is a, 30)
            latencies.append(line["t"] - t0)
            await asyncio.sleep(0.2)
        churner.cancel()
    finally:
        child.stop()
        reader.cancel()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return {
        "pods": pods,
        "policies": policies,
        "sync_s": round(sync_s, 2),
        "rss_mb": round(rss_mb, 1),
        "cpu_per_pod_event_us": round(cpu_per_event_us),
        "latency_p50_ms": round(statistics.median(latencies) * 1e3, 1),
        "latency_p99_ms": round(p99 * 1e3, 1),
        "flips": len(latencies),
        "churn_per_s": args.churn,
    }


async def run(kube_dir: Path, args: Any) -> list[Any]:
    from benches.kube.clients import Kube  # noqa: PLC0415

    kubeconfig = kube_dir / "admin.kubeconfig"
    kubectl = ["kubectl", "--kubeconfig", str(kubeconfig)]
    subprocess.run([*kubectl, "apply", "--server-side", "-f", str(ROOT / "deploy" / "crds")],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([*kubectl, "create", "namespace", NS], capture_output=True, check=False)
    for node in [NODE, *OTHERS]:
        body = json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
        subprocess.run([*kubectl, "apply", "-f", "-"], input=body.encode(), check=True,
                       capture_output=True)  # fmt: skip
    sizes = [(1_000, 100)] if args.quick else [(1_000, 100), (1_000, 1_000), (10_000, 100),
                                               (10_000, 1_000)]  # fmt: skip
    results = []
    async with Kube(kubeconfig) as kube:
        base = f"/api/v1/namespaces/{NS}/pods"
        for name, node, labels, ip in (
            ("probe", NODE, {"app": "probe"}, "10.99.0.2"),
            ("dns", OTHERS[0], {"k8s-app": "dns"}, "10.99.0.53"),
        ):
            with contextlib.suppress(Exception):
                await kube.request("POST", base, _pod(name, node, labels))
            await kube.request("PATCH", f"{base}/{name}/status", _status(ip),
                               "application/merge-patch+json")  # fmt: skip
        cbase = f"/apis/cilium.io/v2/namespaces/{NS}/ciliumnetworkpolicies"
        with contextlib.suppress(Exception):
            await kube.request("POST", cbase, _cnp("probe-pol", "probe", "*.flip-b.example.com"))
        # Policies beyond a size's count are deleted first (sizes go 100 -> 1k -> 100 -> 1k).
        for pods, policies in sizes:
            have = json.loads(await kube.get(cbase))["items"]
            extra = [i["metadata"]["name"] for i in have
                     if i["metadata"]["name"].startswith("pol-")
                     and int(i["metadata"]["name"][4:]) >= policies]  # fmt: skip
            await kube.many([(lambda n=n: kube.request("DELETE", f"{cbase}/{n}")) for n in extra])
            result = await measure(kube, kubeconfig, pods, policies, args)
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agent", metavar="KUBECONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--kube-dir", type=Path, help="a running control plane (make kube-up)")
    parser.add_argument("--quick", action="store_true", help="1k pods, 100 policies, 10 flips")
    parser.add_argument("--flips", type=int, default=None)
    parser.add_argument("--churn", type=float, default=20.0, help="pod events per second")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of churn for CPU")
    args = parser.parse_args()
    if args.agent:
        agent(args.agent)
        return 0
    args.flips = args.flips or (10 if args.quick else 40)
    if args.kube_dir is not None:
        results = asyncio.run(run(args.kube_dir, args))
    else:
        from tools.kube.localkube import KubeControlPlane  # noqa: PLC0415

        with (
            tempfile.TemporaryDirectory(prefix="fqdnguard-latency-") as d,
            KubeControlPlane(Path(d)) as plane,
        ):
            results = asyncio.run(run(plane.directory, args))
    print(f"\n{'pods':>6} {'policies':>8} {'sync':>7} {'RSS':>8} {'CPU/event':>10} "
          f"{'p50':>8} {'p99':>8}  target p99 < {TARGET_P99:.0f} s")  # fmt: skip
    for r in results:
        ok = "OK" if r["latency_p99_ms"] < TARGET_P99 * 1e3 else "MISS"
        print(f"{r['pods']:>6} {r['policies']:>8} {r['sync_s']:>6.1f}s {r['rss_mb']:>6.1f}MB "
              f"{r['cpu_per_pod_event_us']:>8}us {r['latency_p50_ms']:>6.0f}ms "
              f"{r['latency_p99_ms']:>6.0f}ms  {ok}")  # fmt: skip
    out = ROOT / "benches" / "kube" / "results" / f"latency{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
