"""A node handed over between two releases: the rolling update from the previous release to this
checkout, then the rollback (``helm rollback``) to it, under load.

The previous release is the commit pinned in tests/upgrade_baseline.txt, built from this
repository's history by tools/baseline.py (``make baseline-build``; built here when missing).
Each of its pods runs as its own rendered manifest (its deploy/kubernetes/fqdnguard.yaml) says,
with its own package; this checkout's pods as this checkout's manifest says. Everything else is
tests/test_upgrade_netns.py's node: namespaces made here, real nftables, Knot at the cluster-DNS
address, dnsperf from the policed pod, the ruleset read every 50 ms.

Shown, across both hand-overs: no query lost, every allowed query answered and every denied one
REFUSED (nothing unfiltered), the successor took the listening sockets over each time, and no
interception rule, policed source or learned element missing from any snapshot of the ruleset.

Needs root, iproute2, knotd, dnsperf, libnftables, the kernel's nft_tproxy, git history that
holds the pinned commit, and cargo.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest

from tests.test_upgrade_netns import (
    Node,
    Pod,
    ask,
    check_rules_outlive,
    intercept_topology,
    node_of,
    snapshot,
    start_load,
    wait,
)
from tests.test_upgrade_netns import pytestmark as upgrade_needs
from tools import baseline

#: The same needs as the upgrade tests of one release.
pytestmark = upgrade_needs

SECONDS = 14.0


@pytest.fixture(scope="module")
def previous() -> tuple[str, Path]:
    """The pinned release: its commit and its python/ directory (built here when missing). A
    checkout without that history (an exported tree) skips, saying so, except under CI (CI
    set), where that fails."""
    try:
        return baseline.commit(), baseline.build(quiet=True)
    except (baseline.BaselineError, OSError) as e:
        reason = f"the previous release could not be built: {e}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def protocol_of(python: Path) -> str:
    """The object protocol that release's agent speaks, asked of its own package."""
    code = "from fqdnguard.daemons.proxy import KUBE_PROTOCOL; print(KUBE_PROTOCOL)"
    env = {**os.environ, "PYTHONPATH": str(python)}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return r.stdout.strip()


def loaded_core(pod: Pod) -> str:
    """The extension module the pod's process mapped (which release is running)."""
    assert pod.process is not None
    maps = Path(f"/proc/{pod.process.pid}/maps").read_text()
    found = re.search(r"(\S+/fqdnguard/_core[^/\s]*\.so)", maps)
    assert found is not None, "no fqdnguard extension mapped"
    return os.path.realpath(found.group(1))


@pytest.fixture
def node() -> Iterator[Node]:
    with intercept_topology("fv") as topo, node_of(topo) as n:
        yield n


def hand_over(node: Node, old: Pod, new: Pod) -> None:
    """The surge pod starts beside the old one and takes over; the old one gets SIGTERM, as
    the DaemonSet's rolling update does; then the new pod's agent pushes its objects."""
    node.start(new)
    assert old.process is not None
    old.process.send_signal(signal.SIGTERM)
    assert old.process.wait(30) == 0, old.log.read_text()
    node.push(new, "*.allowed.e2e.test")


def test_upgrade_from_the_previous_release_and_roll_back_losing_nothing(
    node: Node, previous: tuple[str, Path]
) -> None:
    rev, old_python = previous
    old_manifest = old_python.parent / "deploy" / "kubernetes" / "fqdnguard.yaml"
    old_protocol = int(protocol_of(old_python))
    first = node.new_pod(old_manifest, old_python, old_protocol)
    current = node.new_pod()
    back = node.new_pod(old_manifest, old_python, old_protocol)

    node.start(first)
    assert loaded_core(first).startswith(str(old_python)), loaded_core(first)
    node.push(first, "*.allowed.e2e.test")
    wait(lambda: snapshot(node)["rules"] == 12 and snapshot(node)["policed"], "interception")
    assert ask(node, "web.allowed.e2e.test") == dns.rcode.NOERROR
    assert ask(node, "other.allowed.e2e.test") == dns.rcode.NOERROR

    watcher, allowed, denied = start_load(node, False, SECONDS)
    try:
        time.sleep(2.0)
        hand_over(node, first, current)  # the rolling update to this checkout
        assert not loaded_core(current).startswith(str(old_python))
        time.sleep(4.0)
        hand_over(node, current, back)  # the rollback
        assert loaded_core(back).startswith(str(old_python))
        results = {"allowed": allowed.result(), "denied": denied.result()}
    finally:
        watcher.done.set()
        watcher.join()

    logs = "\n".join(f"--- {p.name}\n{p.log.read_text()}" for p in (first, current, back))
    for successor in (current, back):
        assert "took 6 listening sockets over" in successor.log.read_text(), logs
    for stream, rcode in (("allowed", "NOERROR"), ("denied", "REFUSED")):
        got = results[stream]
        assert got["sent"] > SECONDS * 200, (stream, got)
        assert got["lost"] == 0, (stream, got, rev)
        assert got["rcodes"] == {rcode: got["completed"]}, (stream, got)
    assert watcher.snapshots > 100
    assert watcher.problems == [], watcher.problems[:5]
    # What the first release learned came through both hand-overs.
    cached = {e["name"] for e in back.ask("GET", "/v1/cache")[1][1:]}
    assert {"web.allowed.e2e.test.", "other.allowed.e2e.test."} <= cached, cached
    check_rules_outlive(node, back)
