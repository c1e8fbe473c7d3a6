"""Policy load+compile time, and DNS verdicts from Python against a bare PatternSet.matches.

Load: 1,000 CiliumNetworkPolicy files x 10 egress rules x 10 rules.dns patterns (100 in quick
mode), from YAML to a compiled policy (target: under one second). Verdicts: 250 endpoints, each
selected by 4 policies (400 patterns), a name per call; the reference is `PatternSet.matches` over
the same 400 patterns, called the same way (target: the verdict no slower than 2x).
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
from conftest import QUICK
from fqdnguard import Endpoint, Endpoints, PatternSet, Policy

N_POLICIES = 100 if QUICK else 1000
N_RULES = 10
N_PATTERNS = 10
N_ENDPOINTS = 250
CALLS = 1000

TARGETS = [
    ("DNS verdict vs PatternSet.matches", "test_dns_verdict", "test_patternset_matches", "<=", 2.0),
]


def patterns(i: int, r: int) -> list[str]:
    return [
        [f"api{i}-{r}-{k}.svc{k}.example.com", f"*.cdn{i}-{r}-{k}.example.net",
         f"**.t{i}-{r}-{k}.cloud.io", f"api-*-p{i}-{r}-{k}.example.org"][k % 4]
        for k in range(N_PATTERNS)
    ]  # fmt: skip


def policy_yaml(i: int) -> str:
    rules = []
    for r in range(N_RULES):
        dns = "\n".join(f'        - matchPattern: "{p}"' for p in patterns(i, r))
        rules.append(
            "  - toEndpoints:\n"
            "    - matchLabels:\n"
            "        k8s:io.kubernetes.pod.namespace: kube-system\n"
            "        k8s:k8s-app: kube-dns\n"
            "    toPorts:\n"
            "    - ports:\n"
            '      - port: "53"\n'
            "        protocol: ANY\n"
            "      rules:\n"
            "        dns:\n" + dns
        )
    return (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        f"metadata:\n  name: p{i}\n  namespace: default\n"
        f"spec:\n  endpointSelector:\n    matchLabels:\n      app: app{i % N_ENDPOINTS}\n"
        "  egress:\n" + "\n".join(rules) + "\n"
    )


def endpoints() -> Endpoints:
    eps = [Endpoint.create(id=1, name="coredns", namespace="kube-system", ips=["10.96.0.10"],
                           labels={"k8s-app": "kube-dns"})]  # fmt: skip
    for e in range(N_ENDPOINTS):
        eps.append(
            Endpoint.create(id=e + 2, name=f"pod{e}", namespace="default",
                            ips=[f"10.1.{e // 250}.{e % 250 + 1}"], labels={"app": f"app{e}"})
        )  # fmt: skip
    return Endpoints(eps)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("policies")
    for i in range(N_POLICIES):
        (d / f"p{i:04}.yaml").write_text(policy_yaml(i))
    return d


@pytest.fixture(scope="module")
def compiled(policy_dir: pathlib.Path) -> tuple[Policy, Endpoints]:
    eps = endpoints()
    return Policy.load(policy_dir, endpoints=eps), eps


@pytest.mark.benchmark(group="policy-load")
def test_load_and_compile(benchmark: Any, policy_dir: pathlib.Path) -> None:
    eps = endpoints()
    pol = benchmark.pedantic(lambda: Policy.load(policy_dir, endpoints=eps), rounds=3, iterations=1)
    assert len(pol) == N_POLICIES


def _work(eps: Endpoints) -> list[tuple[Endpoint, str]]:
    """CALLS (endpoint, name) pairs over every app endpoint: half allowed, half denied."""
    apps = [ep for ep in eps if ep.name.startswith("pod")]
    out = []
    for c in range(CALLS):
        ep = apps[c % len(apps)]
        i = ep.id - 2  # its first policy is p{i}
        name = f"x.cdn{i}-3-1.example.net" if c % 2 else f"x.other{c}.example.net"
        out.append((ep, name))
    return out


@pytest.mark.benchmark(group="dns-verdict")
def test_dns_verdict(benchmark: Any, compiled: tuple[Policy, Endpoints]) -> None:
    pol, eps = compiled
    work = _work(eps)
    for ep, name in work:  # bind every identity before timing
        pol.dns_verdict(ep, "10.96.0.10", 53, "UDP", name)
    verdict = pol.dns_verdict

    def run() -> int:
        return sum(verdict(ep, "10.96.0.10", 53, "UDP", name).allowed for ep, name in work)

    allowed = benchmark(run)
    # Quick mode has fewer policies than endpoints: some endpoints are then unrestricted.
    assert allowed >= CALLS // 2


@pytest.mark.benchmark(group="dns-verdict")
def test_patternset_matches(benchmark: Any, compiled: tuple[Policy, Endpoints]) -> None:
    _, eps = compiled
    work = _work(eps)
    # Every pattern of every policy in one set (so the same names hit and miss).
    ps = PatternSet([p for i in range(N_POLICIES) for r in range(N_RULES) for p in patterns(i, r)])
    matches = ps.matches

    def run() -> int:
        return sum(matches(name) for _, name in work)

    # Quick mode has fewer policies than endpoints: only their names are in the set.
    assert benchmark(run) == CALLS // 2 * min(N_POLICIES, N_ENDPOINTS) // N_ENDPOINTS
