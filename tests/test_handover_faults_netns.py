"""Faults injected into the hot restart ("hand-over") of an intercepting proxy, as a DaemonSet
rolling update does it: each process killed (``kill -9``) or frozen (SIGSTOP) at a chosen
point of the protocol (docs/split.md: ``POST /v1/save`` as successor, ``POST /v1/sockets``
and its liveness link, ``serving <instance>``), under dnsperf load from the policed pod, with
real nftables in namespaces made here (tests/test_upgrade_netns.py's node, pods, load and
ruleset watcher).

The points are reached deterministically, without test hooks in the product: a pod's proxy
runs as the manifest says, under a small wrapper (``GATE``, this file) that imports the package
unchanged and, at one point, either waits for the test's word (between the answered save and
the request for the sockets) or kills itself (right after it said it serves).

For every test: denied queries are only ever REFUSED (or unanswered in a gap), never NOERROR;
no interception rule, policed source or learned element is missing from any ruleset snapshot;
the cache of the last proxy holds what was learned. Where a gap is inherent its length and the
queries lost in it are bounded and printed (``-s`` shows them).

Needs root, iproute2, knotd, dnsperf, libnftables and the kernel's nft_tproxy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import dns.message
import dns.rcode
import pytest
from fqdnguard.control import ControlError
from fqdnguard.daemons.proxy import SAVE_WAIT

from tests.netns import CLUSTER_DNS4
from tests.test_upgrade_netns import (
    Node,
    Pod,
    Watcher,
    ask,
    check_upgrade,
    intercept_topology,
    node_of,
    snapshot,
    start_load,
    wait,
)
from tests.test_upgrade_netns import pytestmark as upgrade_needs

#: The same needs as the upgrade tests.
pytestmark = upgrade_needs

#: Each dnsperf stream's rate (queries/s), as in tests/test_upgrade_netns.py.
QPS = 300
LEARNED = {"web.allowed.e2e.test.", "other.allowed.e2e.test."}

#: Runs ``fqdnguard proxy ARGS`` (argv[3:]) as ``-m fqdnguard.cli`` would, with one point of
#: the hand-over marked (argv[1]) and a directory (argv[2]) to meet the test in:
#: ``sockets``: once ``POST /v1/save`` was answered, before asking for the sockets, write
#: ``paused`` and wait for ``go``; ``serving``: kill itself (SIGKILL) right after saying
#: ``serving`` on the liveness link. The package is imported as it is; nothing else changes.
GATE = r"""
import os, runpy, signal, sys, time
point, meet = sys.argv[1], sys.argv[2]
sys.argv = ["fqdnguard", *sys.argv[3:]]
import fqdnguard.daemons.proxy as daemon

if point == "sockets":
    take = daemon.request_fds

    def request_fds(*args, **kwargs):
        open(os.path.join(meet, "paused"), "w").close()
        while not os.path.exists(os.path.join(meet, "go")):
            time.sleep(0.005)
        return take(*args, **kwargs)

    daemon.request_fds = request_fds
elif point == "serving":
    tell = daemon.ProxyDaemon._tell_serving

    def tell_serving(self):
        tell(self)
        os.kill(os.getpid(), signal.SIGKILL)

    daemon.ProxyDaemon._tell_serving = tell_serving
else:
    raise SystemExit(f"unknown point {point}")
runpy.run_module("fqdnguard.cli", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def topo() -> Iterator[Any]:
    with intercept_topology("fk") as topo:
        yield topo


@pytest.fixture
def node(topo: Any) -> Iterator[Node]:
    with node_of(topo) as n:
        yield n


def spawn_gated(node: Node, pod: Pod, point: str) -> None:
    """Starts ``pod``'s proxy container (its argv, env and dirs as the manifest says) under
    GATE at ``point``; returns at once."""
    argv = pod.proxy.argv
    assert argv[1:3] == ["-m", "fqdnguard.cli"], argv
    meet = pod.root / "gate"
    meet.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **pod.proxy.env}
    with open(pod.log, "ab") as out:
        pod.process = node.topo.spawn(
            node.topo.node, sys.executable, "-c", GATE, point, str(meet), *argv[3:],
            stdout=out, stderr=out, env=env, cwd=os.getcwd(),
        )  # fmt: skip


def paused(pod: Pod) -> None:
    """Waits until ``pod``'s proxy, under GATE ``sockets``, has its save answered."""
    assert pod.process is not None
    wait(
        lambda: (pod.root / "gate" / "paused").exists() or pod.process.poll() is not None,
        f"{pod.name} to have its save answered",
        timeout=30,
    )
    assert pod.process.poll() is None, pod.log.read_text()


def go(pod: Pod) -> None:
    (pod.root / "gate" / "go").touch()


def serves(pod: Pod) -> bool:
    try:
        return pod.ask("GET", "/v1/status")[0] == 200
    except ControlError:
        return False


def first_pod(node: Node) -> Pod:
    """pod0 serving under the policy, having learned both allowed names."""
    pod = node.new_pod()
    node.start(pod)
    node.push(pod, "*.allowed.e2e.test")
    wait(lambda: snapshot(node)["rules"] == 12 and snapshot(node)["policed"], "interception")
    assert ask(node, "web.allowed.e2e.test") == dns.rcode.NOERROR
    assert ask(node, "other.allowed.e2e.test") == dns.rcode.NOERROR  # learned, then not asked
    return pod


def kill(pod: Pod) -> None:
    assert pod.process is not None
    pod.process.kill()
    assert pod.process.wait(10) == -signal.SIGKILL


def terminate(pod: Pod) -> None:
    assert pod.process is not None
    pod.process.send_signal(signal.SIGTERM)
    assert pod.process.wait(60) == 0, pod.log.read_text()


def learned(pod: Pod) -> set[str]:
    code, body = pod.ask("GET", "/v1/cache")
    assert code == 200, body
    return {e["name"] for e in body[1:]}


def check_filtered(
    results: dict[str, dict[str, Any]], watcher: Watcher, seconds: float, max_lost: int
) -> None:
    """Nothing unfiltered: allowed queries NOERROR, denied ones REFUSED, each stream losing at
    most ``max_lost`` (a gap); nothing missing from any ruleset snapshot."""
    for stream, rcode in (("allowed", "NOERROR"), ("denied", "REFUSED")):
        got = results[stream]
        assert got["sent"] > seconds * QPS * 2 / 3, got
        assert got["lost"] <= max_lost, (stream, got)
        assert got["rcodes"] == {rcode: got["completed"]}, (stream, got)
    assert watcher.snapshots > 50
    assert watcher.problems == [], watcher.problems[:5]


def no_tracebacks(*pods: Pod) -> None:
    """No proxy logged an exception it did not handle."""
    for pod in pods:
        text = pod.log.read_text()
        assert "Traceback" not in text, f"{pod.name}: {text}"


@contextlib.contextmanager
def under_load(node: Node, seconds: float) -> Iterator[tuple[Watcher, dict[str, Any]]]:
    """The ruleset watcher and two dnsperf streams (an allowed name, a denied one) for the
    block; their results in the dict yielded once the block ends, the watcher stopped."""
    watcher, allowed, denied = start_load(node, False, seconds)
    results: dict[str, Any] = {}
    try:
        yield watcher, results
        results.update(allowed=allowed.result(), denied=denied.result())
    finally:
        watcher.done.set()
        watcher.join()


def report(what: str, results: dict[str, Any] | None = None, **figures: Any) -> None:
    if results is not None:
        figures.update(
            lost_allowed=results["allowed"]["lost"], lost_denied=results["denied"]["lost"]
        )
    print(f"\n{what}: " + ", ".join(f"{k} {v}" for k, v in figures.items()), file=sys.stderr)


def share_answered(node: Node, tries: int = 40) -> tuple[int, int]:
    """Queries from fresh source ports (each flow hashed anew among the listeners): how many
    were answered, and of those how many NOERROR (all must be: the name is allowed)."""
    answered = noerror = 0
    for _ in range(tries):
        s = node.topo.open_socket(node.topo.pod, socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            s.settimeout(0.25)
            s.sendto(
                dns.message.make_query("web.allowed.e2e.test", "A").to_wire(), (CLUSTER_DNS4, 53)
            )
            try:
                reply = dns.message.from_wire(s.recv(65535))
            except OSError:
                continue
        answered += 1
        noerror += reply.rcode() == dns.rcode.NOERROR
    return answered, noerror


# -- 1. the successor dies between the save and the sockets -----------------------------------


def test_a_successor_killed_between_the_save_and_the_sockets_changes_nothing(node: Node) -> None:
    """pod1's proxy has its ``POST /v1/save`` (as successor) answered and is killed before it
    asks for the sockets. pod0 serves on, losing nothing; pod2's proxy then takes over as a
    hand-over does."""
    old = first_pod(node)
    dead, new = node.new_pod(), node.new_pod()
    seconds = 8.0
    with under_load(node, seconds) as (watcher, results):
        time.sleep(1.5)
        spawn_gated(node, dead, "sockets")
        paused(dead)
        kill(dead)
        time.sleep(0.5)
        node.start(new)
        terminate(old)
        node.push(new, "*.allowed.e2e.test")
    check_upgrade(node, old, new, results, watcher, policy_change=False, seconds=seconds)
    assert "listening sockets over" not in dead.log.read_text()
    assert learned(new) >= LEARNED
    no_tracebacks(old, dead, new)


# -- 2. the old proxy dies between the save and the sockets -----------------------------------


def test_an_old_proxy_killed_between_the_save_and_the_sockets(node: Node) -> None:
    """pod0's proxy answered pod1's save and is killed before pod1 asks for the sockets: pod1
    binds its own and serves from the state directory. The gap (nobody listens) is bounded;
    the queries in it are dropped (the interception rules stay), never answered unfiltered."""
    old = first_pod(node)
    new = node.new_pod()
    seconds = 8.0
    with under_load(node, seconds) as (watcher, results):
        time.sleep(1.5)
        spawn_gated(node, new, "sockets")
        paused(new)
        killed = time.monotonic()
        kill(old)
        go(new)
        wait(lambda: serves(new), "the new proxy to serve", timeout=30)
        gap = time.monotonic() - killed
    report(
        "old proxy killed between save and sockets",
        results,
        gap_s=round(gap, 3),
    )
    assert gap < 5.0
    check_filtered(results, watcher, seconds, max_lost=int(QPS * 5))
    log = new.log.read_text()
    assert "handed no sockets over" in log and "took 6 listening sockets" not in log, log
    assert learned(new) >= LEARNED
    assert ask(node, "web.allowed.e2e.test") == dns.rcode.NOERROR
    assert ask(node, "denied.blocked.e2e.test") == dns.rcode.REFUSED
    no_tracebacks(old, new)


# -- 3. the successor dies right after it said it serves ----------------------------------------


def test_a_successor_killed_after_saying_it_serves_comes_back_from_the_state(node: Node) -> None:
    """pod1's proxy takes the sockets, says ``serving`` and is killed at once: pod0's proxy
    has stopped reading, so nobody serves (the policed pod's DNS is dropped) until the
    container restarts. The restarted proxy (same argv, same dirs) comes back from the state
    directory with what was learned, and serves; pod0's is then stopped (the old pod deleted
    once the new one is ready)."""
    old = first_pod(node)
    new = node.new_pod()
    seconds = 10.0
    with under_load(node, seconds) as (watcher, results):
        time.sleep(1.5)
        spawn_gated(node, new, "serving")
        assert new.process is not None
        assert new.process.wait(30) == -signal.SIGKILL, new.log.read_text()
        died = time.monotonic()
        wait(lambda: "serves the sockets handed over" in old.log.read_text(), "pod0 to stop")
        assert share_answered(node, 4) == (0, 0)  # nobody reads: dropped, never unfiltered
        restart = time.monotonic()
        node.start(new)  # the kubelet restarts the container
        gap, start = time.monotonic() - died, time.monotonic() - restart
        terminate(old)
        node.push(new, "*.allowed.e2e.test")
    report(
        "successor killed after serving, restarted",
        results,
        gap_s=round(gap, 3),
        restart_to_serving_s=round(start, 3),
    )
    assert start < 5.0
    check_filtered(results, watcher, seconds, max_lost=int(QPS * (gap + 3)))
    assert learned(new) >= LEARNED
    assert ask(node, "web.allowed.e2e.test") == dns.rcode.NOERROR
    assert ask(node, "denied.blocked.e2e.test") == dns.rcode.REFUSED
    no_tracebacks(old, new)


# -- 4. the old proxy frozen when the successor starts -----------------------------------------


def test_a_frozen_old_proxy_delays_the_successor_a_bounded_time(node: Node) -> None:
    """pod0's proxy is frozen (SIGSTOP: a wedged process) when pod1's starts. pod1's save gets
    no answer; it gives up after the bounded wait and starts on its own (its own sockets, the
    state directory and the frozen one's journal), filtering as before. The frozen process's
    listeners keep their share of the intercepted flows (the kernel hashes a TPROXY'd datagram
    among the port's sockets without running the steering program): those queries go
    unanswered until it runs again; thawed with the SIGTERM its pod's deletion sent, it hands
    its cache over and exits, and every flow is pod1's."""
    old = first_pod(node)
    new = node.new_pod()
    seconds = 12.0
    with under_load(node, seconds) as (watcher, results):
        time.sleep(1.5)
        assert old.process is not None
        old.process.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        node.start(new)
        up = time.monotonic() - frozen
        during = share_answered(node)
        old.process.send_signal(signal.SIGTERM)  # the old pod deleted: pending while frozen
        old.process.send_signal(signal.SIGCONT)
        assert old.process.wait(60) == 0, old.log.read_text()
        after = share_answered(node)
    report(
        "old proxy frozen",
        results,
        successor_up_s=round(up, 3),
        answered_while_frozen=f"{during[0]}/40",
        answered_after=f"{after[0]}/40",
    )
    assert up < SAVE_WAIT + 5, "the successor waited on the frozen proxy"
    assert "no proxy answered POST /v1/save" in new.log.read_text()
    assert 0 < during[0] < 40 and during[1] == during[0], during
    assert after == (40, 40), after
    check_filtered(results, watcher, 0, max_lost=int(QPS * seconds))
    assert learned(new) >= LEARNED
    assert "handed the cache over" in old.log.read_text()
    no_tracebacks(old, new)


# -- 5. three hand-overs in a row -----------------------------------------------------------------


def test_three_hand_overs_in_a_row_lose_nothing(node: Node) -> None:
    """pod0 -> pod1 -> pod2 -> pod3 under load, each new pod's proxy started as soon as the
    previous hand-over ended (its predecessor exited, its agent pushed): no query lost, none
    unfiltered, and what pod0 learned (a name not asked again) reaches pod3's cache."""
    pods = [first_pod(node)]
    seconds = 14.0
    began = time.monotonic()
    with under_load(node, seconds) as (watcher, results):
        time.sleep(1.0)
        for _ in range(3):
            new = node.new_pod()
            node.start(new)
            terminate(pods[-1])
            node.push(new, "*.allowed.e2e.test")
            pods.append(new)
        took = time.monotonic() - began
    report("three hand-overs", seconds=round(took, 3))
    assert took < seconds - 1, "the hand-overs outlasted the load"
    check_filtered(results, watcher, seconds, max_lost=0)
    for pod in pods[1:]:
        assert "took 6 listening sockets over" in pod.log.read_text(), pod.log.read_text()
    for pod in pods[:-1]:
        assert "handed the cache over" in pod.log.read_text(), pod.log.read_text()
    assert learned(pods[-1]) >= LEARNED
    no_tracebacks(*pods)
