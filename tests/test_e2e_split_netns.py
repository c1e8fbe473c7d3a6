"""The agent/proxy split end to end in network namespaces, enforcing with nftables: a pod routed
through a node running ``fqdnguard proxy`` (+ ``fqdnguard agent``), a real Knot upstream and TCP
servers in a world (see tests/netns.py and test_e2e_netns.py for the topology and the policy).

Shows: ``kill -9`` of the agent under a steady query stream loses no answer and names resolved
afterwards still get enforced in the kernel; a restarted proxy serves at once and still allows
what was learned before; a rolling restart of two proxies on port 53 loses no query, and the
new proxy neither prunes what the old one added after saving its state nor loses what the old
one learned after the takeover; IPv6 alike.
Needs root, iproute2, knotd and libnftables; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest
from fqdnguard._core import Engine
from fqdnguard.testing import KnotServer

from tests.netns import NODE_POD4, NODE_POD6, POD4, UPSTREAM4, Topology, echo_ok
from tests.proxy_fixtures import require_knot
from tests.split_helpers import QueryStream, ask, fqdnguard_cmd, spawn, status, stop, wait_for
from tests.test_e2e_netns import ENDPOINTS, POLICY, ZONE, _skip_reason

pytestmark = pytest.mark.skipif(
    (_reason := _skip_reason()) is not None, reason=_reason or "available"
)


class World:
    def __init__(self, topo: Topology, root: Path) -> None:
        self.topo = topo
        self.root = root
        (root / "policy.yaml").write_text(POLICY)
        (root / "endpoints.yaml").write_text(ENDPOINTS)
        self.state = root / "state"
        self.log = root / "fqdnguard.log"
        self.procs: list[subprocess.Popen[bytes]] = []

    def reset(self) -> None:
        for p in self.procs:
            stop(p)
        self.procs.clear()
        shutil.rmtree(self.state, ignore_errors=True)
        self.nft("delete", "table", "inet", "fqdnguard", check=False)
        self.log.write_text("")

    def nft(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(
            ["ip", "netns", "exec", self.topo.node, "nft", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"nft {' '.join(args)}: {r.stderr}")
        return r.stdout

    def proxy(self) -> subprocess.Popen[bytes]:
        cmd = fqdnguard_cmd(
            "proxy", "--backend", "nftables", "--state-dir", str(self.state),
            "--listen", f"{NODE_POD4}:53", "--listen", f"[{NODE_POD6}]:53",
            "--upstream", f"{UPSTREAM4}:53", "--log-queries", "none",
        )  # fmt: skip
        proc = spawn(cmd, self.log, prefix=["ip", "netns", "exec", self.topo.node])
        self.procs.append(proc)
        wait_for(lambda: (status(self.state) or {}).get("pid") is not None and self._pid_is(proc),
                 "the proxy", log=self.log)  # fmt: skip
        return proc

    def _pid_is(self, proc: subprocess.Popen[bytes]) -> bool:
        # `ip netns exec` execs the command: the proxy's pid is the Popen's.
        return (status(self.state) or {}).get("pid") == proc.pid

    def agent(self, *extra: str) -> subprocess.Popen[bytes]:
        cmd = fqdnguard_cmd(
            "agent", "--state-dir", str(self.state), "--policy", str(self.root / "policy.yaml"),
            "--endpoints", str(self.root / "endpoints.yaml"), "--interval", "0.2", *extra,
        )  # fmt: skip
        proc = spawn(cmd, self.log)
        self.procs.append(proc)
        return proc

    def digest(self) -> str | None:
        return ((status(self.state) or {}).get("policy") or {}).get("digest")

    def resolve(
        self, name: str, rdtype: str = "A", server: str = NODE_POD4
    ) -> tuple[int, list[str]]:
        return ask(
            lambda fam: self.topo.open_socket(self.topo.pod, fam, socket.SOCK_DGRAM),
            (server, 53),
            name,
            rdtype,
        )

    def set_holding(self, ip: str) -> str | None:
        """The name of the fqdnguard set whose elements include ``ip``."""
        listing = json.loads(self.nft("-j", "list", "table", "inet", "fqdnguard"))
        for item in listing["nftables"]:
            elems = item.get("set", {}).get("elem", [])
            if any((e["elem"]["val"] if isinstance(e, dict) else e) == ip for e in elems):
                return str(item["set"]["name"])
        return None

    def kernel_addresses(self) -> set[str]:
        """Every address in the fqdnguard table's learned-address sets."""
        listing = json.loads(self.nft("-j", "list", "table", "inet", "fqdnguard"))
        out: set[str] = set()
        for item in listing["nftables"]:
            if item.get("set", {}).get("name", "").startswith("ep_"):
                for e in item["set"].get("elem", []):
                    out.add(str(e["elem"]["val"] if isinstance(e, dict) else e))
        return out

    def cache_list(self) -> set[str]:
        """The addresses ``fqdnguard cache list`` shows for the state dir."""
        out = subprocess.run(
            fqdnguard_cmd("cache", "list", "--json", "--state-dir", str(self.state)),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {e["ip"] for e in map(json.loads, out.splitlines())}  # NDJSON

    def reaches(self, ip: str, port: int = 443) -> bool:
        s = self.topo.connect(self.topo.pod, ip, port)
        if s is None:
            return False
        ok = echo_ok(s)
        s.close()
        return ok

    def stream(self, names: list[str], rate: float, server: str = NODE_POD4) -> QueryStream:
        fam = socket.AF_INET6 if ":" in server else socket.AF_INET
        s = self.topo.open_socket(self.topo.pod, fam, socket.SOCK_DGRAM)
        return QueryStream(s, (server, 53), names, rate).start()


@pytest.fixture(scope="module")
def world_env() -> Iterator[World]:
    require_knot()
    topo = Topology(prefix=f"fs{__import__('os').getpid() % 100000}").create()
    root = Path(tempfile.mkdtemp(prefix="fqdnguard-e2e-split-"))
    w = World(topo, root)
    try:
        topo.start_echo_servers(sys.executable)
        with KnotServer({"e2e.test": ZONE}, host=UPSTREAM4, port=53, netns=topo.world):
            yield w
            w.reset()
    finally:
        topo.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def w(world_env: World) -> Iterator[World]:
    world_env.reset()
    try:
        yield world_env
    except BaseException:
        print(f"--- fqdnguard log\n{world_env.log.read_text()}", file=sys.stderr)
        raise
    finally:
        for p in world_env.procs:
            stop(p)
        world_env.procs.clear()


def test_agent_killed_under_load_proxy_answers_and_enforces_new_names(w: World) -> None:
    w.proxy()
    agent = w.agent()
    wait_for(w.digest, "the first push", log=w.log)
    assert not w.reaches("10.77.2.10"), "open before any name was resolved"
    stream = w.stream(["web.allowed.e2e.test", "denied.blocked.e2e.test"], rate=150)
    time.sleep(1.0)
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    time.sleep(1.5)
    stream.stop()
    assert stream.lost() == [], stream.summary()
    assert stream.rcodes() == {
        "NOERROR": len(stream.sent) - stream.rcodes().get("REFUSED", 0),
        "REFUSED": stream.rcodes()["REFUSED"],
    }
    assert w.reaches("10.77.2.10")
    # Names never resolved before, after the agent died: learned and opened in the kernel...
    assert w.resolve("other.allowed.e2e.test") == (dns.rcode.NOERROR, ["10.77.2.11"])
    assert w.reaches("10.77.2.11")
    assert w.resolve("other.allowed.e2e.test", "AAAA", server=NODE_POD6) == (
        dns.rcode.NOERROR,
        ["fd77:2::11"],
    )
    assert w.reaches("fd77:2::11")
    # ... and what is denied or never resolved stays closed.
    assert w.resolve("denied.blocked.e2e.test")[0] == dns.rcode.REFUSED
    assert not w.reaches("10.77.2.12")
    assert not w.reaches("fd77:2::12")


def test_restarted_proxy_serves_at_once_and_still_allows_what_it_learned(w: World) -> None:
    proxy = w.proxy()
    assert w.agent("--once").wait(30) == 0
    assert w.resolve("web.allowed.e2e.test")[1] == ["10.77.2.10"]
    assert w.resolve("web.allowed.e2e.test", "AAAA", server=NODE_POD6)[1] == ["fd77:2::10"]
    assert w.reaches("10.77.2.10") and w.reaches("fd77:2::10")
    assert stop(proxy) == 0
    rebuilt = hasattr(Engine, "programmed_state")
    if rebuilt:
        # Lose the kernel state too (a node reboot): only the restored cache can reopen it.
        w.nft("delete", "table", "inet", "fqdnguard")
    # The closed port stays closed while no proxy runs (the table is left in place, fail closed).
    elif not rebuilt:
        assert not w.reaches("10.77.2.11")

    started = time.monotonic()
    w.proxy()  # no agent: the saved policy and cache
    elapsed = time.monotonic() - started
    # Learned before the restart: open without asking DNS again.
    assert w.reaches("10.77.2.10") and w.reaches("fd77:2::10")
    assert not w.reaches("10.77.2.11")
    assert w.resolve("denied.blocked.e2e.test")[0] == dns.rcode.REFUSED
    assert w.resolve("other.allowed.e2e.test") == (dns.rcode.NOERROR, ["10.77.2.11"])
    assert w.reaches("10.77.2.11")
    assert elapsed < 10
    st = status(w.state)
    assert st is not None and st["policy"]["source"] == "state"
    assert st["cache"]["entries"] >= 2


def test_rolling_restart_of_two_proxies_on_port_53_loses_no_query(w: World) -> None:
    old = w.proxy()
    assert w.agent("--once").wait(30) == 0
    names = ["web.allowed.e2e.test", "alt.allowed.e2e.test", "denied.blocked.e2e.test"]
    v4 = w.stream(names, 200)
    v6 = w.stream(names, 200, server=NODE_POD6)
    time.sleep(0.7)
    new = w.proxy()  # the same addresses and port, the same nftables table
    time.sleep(0.5)
    assert stop(old) == 0
    time.sleep(0.7)
    v4.stop()
    v6.stop()
    assert v4.lost() == [], v4.summary()
    assert v6.lost() == [], v6.summary()
    assert status(w.state)["pid"] == new.pid  # type: ignore[index]
    # The survivor enforces: learned during the overlap stays open, new names get opened.
    assert w.reaches("10.77.2.14", 8080)
    assert w.resolve("other.allowed.e2e.test")[1] == ["10.77.2.11"]
    assert w.reaches("10.77.2.11")
    assert not w.reaches("10.77.2.12")
    assert POD4 in w.nft("list", "map", "inet", "fqdnguard", "src4")


def test_taking_over_prunes_nothing_the_old_proxy_added_after_its_save(w: World) -> None:
    old = w.proxy()
    assert w.agent("--once").wait(30) == 0
    assert w.resolve("web.allowed.e2e.test")[1] == ["10.77.2.10"]
    name = w.set_holding("10.77.2.10")
    assert name is not None
    # What the old proxy programs between the new one's save and its reconcile, added here by
    # hand so the moment is certain: in the kernel, in no saved cache.
    w.nft("add", "element", "inet", "fqdnguard", name, "{ 10.77.2.11 timeout 60s }")
    assert w.reaches("10.77.2.11")
    new = w.proxy()  # takes over: reconciles the kernel to its cache, without pruning
    assert w.reaches("10.77.2.11"), "the takeover pruned what the old proxy had added"
    assert w.reaches("10.77.2.10")
    assert stop(old) == 0
    assert status(w.state)["pid"] == new.pid  # type: ignore[index]
    assert w.reaches("10.77.2.11") and not w.reaches("10.77.2.12")
    # A cold start is exact: the unknown element goes, what the cache holds stays.
    assert stop(new) == 0
    w.proxy()
    assert not w.reaches("10.77.2.11")
    assert w.reaches("10.77.2.10")


def test_kill_9_under_load_loses_no_allowed_pair(w: World) -> None:
    proxy = w.proxy()  # the default save interval (60 s): nothing is saved before the kill
    assert w.agent("--once").wait(30) == 0
    names = [f"burst-{i}.allowed.e2e.test" for i in range(1, 61)]
    stream = w.stream([*names, "denied.blocked.e2e.test"], rate=250)
    time.sleep(1.0)
    assert w.resolve("web.allowed.e2e.test")[1] == ["10.77.2.10"]
    proxy.send_signal(signal.SIGKILL)  # under load: the stream is still sending
    proxy.wait()
    stream.stop(grace=0.5)
    allowed = {
        f"10.77.3.{stream.sent[q].split('.')[0].removeprefix('burst-')}"
        for q, rcode in stream.answered.items()
        if rcode == dns.rcode.NOERROR
    }
    assert len(allowed) >= 50, stream.summary()
    allowed.add("10.77.2.10")

    w.proxy()  # a cold start: no peer to hand over, the kernel reconciled to what it restored
    missing = allowed - w.kernel_addresses()
    assert not missing, f"no longer enforced after the restart: {sorted(missing)}"
    assert w.reaches("10.77.2.10")
    assert not w.reaches("10.77.2.11")
    assert allowed <= w.cache_list()
