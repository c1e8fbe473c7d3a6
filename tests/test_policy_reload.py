"""Reloads that would fail open, through the real reload paths against a real Knot upstream:
SIGHUP to ``fqdnguard run``, a push to ``fqdnguard proxy`` on its control socket, and
``fqdnguard agent``. An emptied file, a file reduced to ``---``, a file cut in the middle of
``egress`` and an emptied directory each leave the policy in force (a name it denies is still
refused); a reload that does lift every restriction from an endpoint is warned about, counted
and listed by ``fqdnguard policy status``."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest
from fqdnguard.control import ControlError, request_sync
from fqdnguard.testing import KnotServer, free_port

from tests.proxy_fixtures import ENDPOINTS, POD_IP
from tests.split_helpers import ask, fqdnguard_cmd, spawn, stop, wait_for

# The pod may resolve www.example.com only: alias.example.com, which Knot answers, is what
# an unrestricted pod would get and the policy in force refuses.
POD_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: pod-dns, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod}}
  egress:
    - toEndpoints:
        - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns:
              - matchName: www.example.com
"""
# What a file cut in the middle of `egress` reads as: `egress:` with nothing after it.
TRUNCATED = POD_POLICY[: POD_POLICY.index("    - toEndpoints")]
# A policy for another endpoint only: putting it in place of POD_POLICY lifts the pod's.
FREE_POLICY = POD_POLICY.replace("pod-dns", "free-dns").replace("app: pod", "app: free")

SHAPES = [
    ("emptied file", ""),
    ("only ---", "---\n"),
    ("truncated mid-egress", TRUNCATED),
    ("emptied directory", None),
]


def query(port: int, name: str) -> tuple[int, list[str]]:
    import socket  # noqa: PLC0415

    def make(family: int) -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((POD_IP, 0))
        return s

    return ask(make, ("127.0.0.1", port), name)


def policy_status(state: Path) -> dict[str, Any] | None:
    try:
        code, body = request_sync(state / "control.sock", "GET", "/v1/policy", timeout=2)
    except ControlError:
        return None
    return body if code == 200 else None


def status_cli(state: Path) -> str:
    done = subprocess.run(
        [*fqdnguard_cmd("policy", "status", "--state-dir", str(state))],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def assert_old_policy_in_force(port: int) -> None:
    assert query(port, "alias.example.com")[0] == dns.rcode.REFUSED
    assert query(port, "www.example.com") == (dns.rcode.NOERROR, ["192.0.2.10", "192.0.2.11"])


@pytest.fixture
def root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fqdnguard-reload-") as d:
        yield Path(d)


def test_sighup_keeps_the_policy_in_force_for_empty_and_truncated_sets(
    knot: KnotServer, root: Path
) -> None:
    policies = root / "policies"
    policies.mkdir()
    (policies / "pod.yaml").write_text(POD_POLICY)
    (root / "endpoints.yaml").write_text(ENDPOINTS)
    state, log = root / "state", root / "run.log"
    port, mport = free_port(), free_port()
    proc = spawn(
        fqdnguard_cmd(
            "run", "--listen", f"127.0.0.1:{port}", "--upstream", f"{knot.host}:{knot.port}",
            "--policy", str(policies), "--endpoints", str(root / "endpoints.yaml"),
            "--state-dir", str(state), "--metrics", f"127.0.0.1:{mport}", "--log-queries", "none",
        ),
        log,
    )  # fmt: skip
    try:
        wait_for(lambda: policy_status(state), "fqdnguard run", log=log)
        assert_old_policy_in_force(port)
        for i, (shape, text) in enumerate(SHAPES):
            if text is None:
                (policies / "pod.yaml").unlink()
            else:
                (policies / "pod.yaml").write_text(text)
            proc.send_signal(signal.SIGHUP)
            st = wait_for(
                lambda n=i + 1: (s := policy_status(state)) and len(s["reloads"]) == n and s,
                f"the reload of the {shape}",
                log=log,
            )
            assert st["reloads"][-1]["outcome"] == "rejected", shape
            assert_old_policy_in_force(port)
            (policies / "pod.yaml").write_text(POD_POLICY)  # (no SIGHUP: nothing changes)
        text = metrics(mport)
        assert 'fqdnguard_policy_reloads_total{outcome="rejected"} 4.0' in text
        assert "fqdnguard_policy_lifted_endpoints_total 0.0" in text

        # A reload that does lift the pod's restrictions is applied (as Cilium would), and
        # said so: a warning, the metric, and `policy status`.
        (policies / "pod.yaml").write_text(FREE_POLICY)
        proc.send_signal(signal.SIGHUP)
        st = wait_for(
            lambda: (s := policy_status(state)) and len(s["reloads"]) == 5 and s, "the reload"
        )
        assert st["reloads"][-1]["outcome"] == "applied"
        assert st["reloads"][-1]["unrestricted"] == ["default/pod"]
        assert query(port, "alias.example.com")[0] == dns.rcode.NOERROR
        text = metrics(mport)
        assert "fqdnguard_policy_lifted_endpoints_total 1.0" in text
        assert 'fqdnguard_policy_reloads_total{outcome="applied"} 1.0' in text
        out = status_cli(state)
        assert f"Source:     files ({policies})" in out
        assert "CiliumNetworkPolicy default/free-dns" in out
        assert out.count(": rejected (") == 4 and "no policy file (*.yaml" in out
        assert "SIGHUP: applied, 1 policies; UNRESTRICTED: default/pod" in out
    finally:
        stop(proc)
    text = log.read_text()
    assert "lifted every egress restriction from 1 endpoint(s) that had some: default/pod" in text
    assert "policy reload failed, keeping the policy in force" in text
    assert "at least one of ingress, ingressDeny, egress and egressDeny" in text


def test_pushes_to_the_proxy_keep_the_policy_in_force_and_report_lifting(
    knot: KnotServer, root: Path
) -> None:
    (root / "pod.yaml").write_text(POD_POLICY)
    (root / "endpoints.yaml").write_text(ENDPOINTS)
    state, log = root / "state", root / "split.log"
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        proxy = fqdnguard_cmd(
            "proxy", "--state-dir", str(state), "--listen", f"127.0.0.1:{port}",
            "--upstream", f"{knot.host}:{knot.port}", "--log-queries", "none",
        )  # fmt: skip
        procs.append(spawn(proxy, log))
        wait_for(lambda: policy_status(state), "fqdnguard proxy", log=log)
        agent = fqdnguard_cmd(
            "agent", "--state-dir", str(state), "--policy", str(root / "pod.yaml"),
            "--endpoints", str(root / "endpoints.yaml"), "--once",
        )  # fmt: skip
        assert subprocess.run(agent, check=False, capture_output=True, timeout=60).returncode == 0
        assert_old_policy_in_force(port)
        sock = state / "control.sock"
        for shape, text in SHAPES:
            sources = [] if text is None else [["pod.yaml", text]]
            code, body = request_sync(
                sock, "PUT", "/v1/policy", {"sources": sources, "endpoints": ENDPOINTS}
            )
            assert code == 422, (shape, body)
            assert_old_policy_in_force(port)
        st = policy_status(state)
        assert (
            st is not None
            and [r["outcome"] for r in st["reloads"]] == ["applied"] + ["rejected"] * 4
        )
        # The agent does not push an emptied file either.
        (root / "pod.yaml").write_text("")
        done = subprocess.run(agent, check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "no policy document in the file" in done.stderr
        assert_old_policy_in_force(port)
        # A push that lifts the pod's restrictions: the proxy says so, and so does the agent.
        (root / "pod.yaml").write_text(FREE_POLICY)
        done = subprocess.run(agent, check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "lifted every egress restriction from 1 endpoint(s): default/pod" in done.stderr
        st = policy_status(state)
        assert st is not None and st["source"] == "agent"
        assert st["reloads"][-1]["unrestricted"] == ["default/pod"]
        assert st["lifted_total"] == 1
        assert "push: applied, 1 policies; UNRESTRICTED: default/pod" in status_cli(state)
    finally:
        for proc in procs:
            stop(proc)
    assert "lifted every egress restriction from 1 endpoint(s) that had some" in log.read_text()


def test_policy_status_without_a_running_process_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fqdnguard.cli", "policy", "status", "--state-dir", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "no running fqdnguard answers" in done.stderr
