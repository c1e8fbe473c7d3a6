"""What a build of the cluster model costs: Kubernetes objects -> this node's endpoints and
policy (fqdnguard.sources.model), after one pod event, at 1k and 10k pods with 100 and 1k
policies, 100 of the pods on this node.

Synthetic objects, no API server (the API-to-verdict latency against a real one is
benches/kube/latency.py). Prints, per size, the median of REPEAT builds: an incremental build
(what a pod event costs: endpoints and selector matches remembered) and a cold one (everything
made again), and their ratio. Run pinned: ``taskset -c 1 python3 benches/kube/build.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fqdnguard.sources.model import ClusterModel

from tests.test_kube_model import cnp, dns_policy, pod

REPEAT = 7
LOCAL = 100


def model(pods: int, policies: int) -> ClusterModel:
    m = ClusterModel("node-a")
    m.changes(
        "Pod",
        [
            pod(
                f"p{i}",
                f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}",
                node="node-a" if i < LOCAL else f"node-{i % 50}",
                labels={"app": f"a{i % policies}", "tier": "x"},
            )
            for i in range(pods)
        ],
    )
    m.changes(
        "CiliumNetworkPolicy",
        [
            cnp(f"pol{j}", dns_policy(f"a{j}", f"*.s{j}.example.com", kube_dns=True))
            for j in range(policies)
        ],
    )
    m.build()
    return m


def one(m: ClusterModel, k: int, *, cold: bool) -> float:
    m.changes("Pod", [pod("churn", "10.250.0.1", node="node-7", labels={"k": str(k)})])
    if cold:
        m._endpoints.clear()
        m._matches.clear()
        m._keys.clear()
    start = time.perf_counter()
    m.build()
    return time.perf_counter() - start


def main() -> None:
    print(f"{'pods':>6} {'policies':>8} {'read/policy':>11} {'incremental':>11} {'cold':>9} ratio")
    for pods, policies in ((1_000, 100), (1_000, 1_000), (10_000, 100), (10_000, 1_000)):
        t = time.perf_counter()
        m = model(pods, policies)
        setup = time.perf_counter() - t
        inc = statistics.median(one(m, k, cold=False) for k in range(REPEAT))
        cold = statistics.median(one(m, k, cold=True) for k in range(REPEAT))
        print(
            f"{pods:>6} {policies:>8} {setup / policies * 1e3:>9.2f}ms "
            f"{inc * 1e3:>9.1f}ms {cold * 1e3:>7.1f}ms {cold / inc:5.1f}x"
        )


if __name__ == "__main__":
    main()
