"""Cilium's standalone DNS proxy as a peer of benches/peers (``cilium-sdp``), driven for real.

The proxy (Cilium v1.19.0, an optional build of tools/gobuild.py) takes its rules from our agent
end of the FQDNData gRPC stream (tools/peers/cilium-sdp-agent) and sees the endpoints' queries to
Knot through TPROXY rules in a namespace of the test's own. Shows: each endpoint's allowed names
are answered from Knot, another endpoint's names and names nobody allows are refused, the agent
hears of what was resolved, and with the rules in place but no proxy the queries are dropped,
never answered by Knot around it. The agent refuses a bad rules file, naming what is wrong.

Needs the proxy built (``python3 tools/gobuild.py build cilium-standalone-dns-proxy``, about 10
minutes cold; CI does not build it), root, knotd and the kernel's nft_tproxy; skipped with the
reason otherwise. The agent is built here when Go is installed (about 30 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import dns.message
import dns.rcode
import pytest
from fqdnguard.testing import KnotServer, free_port

from tests.netns import Topology, netns_unavailable
from tests.proxy_fixtures import require_knot
from tools import gobuild

ROOT = Path(__file__).resolve().parent.parent


def load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("peers_run", ROOT / "benches/peers/run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path  # as a script it puts the source tree first: not for the other tests
    return module


run = load_harness()


def built(name: str) -> str:
    if gobuild.is_built(name):
        return str(gobuild.binary_path(name))
    if gobuild.go_binary() is None:
        pytest.skip(f"Go is not installed: {name} is built from the Go module proxy with it")
    return str(gobuild.build(name))


class Loopback(Topology):
    """One namespace with only its loopback: the bench's own setting."""

    def _namespaces(self) -> tuple[str, ...]:
        return (self.node,)

    def _create(self) -> None:
        self.add_namespace(self.node)


@pytest.fixture
def namespace() -> Iterator[Loopback]:
    if reason := netns_unavailable():
        pytest.skip(reason)
    if not gobuild.is_built(run.SDP_PROXY):
        pytest.skip(run.SDP_NOT_BUILT)
    require_knot()
    topo = Loopback(f"fgsdp{os.getpid() % 100000}").create()
    try:
        yield topo
    finally:
        topo.close()


ZONE = "\n".join(
    [
        "$ORIGIN example.com.",
        "$TTL 5",
        "@ SOA ns admin 1 3600 600 86400 60",
        "@ NS ns",
        f"ns A {run.UPSTREAM}",
        "* A 192.0.2.1",
    ]
)


def test_cilium_sdp_enforces_each_endpoints_rules_through_tproxy(namespace: Loopback) -> None:
    built(run.SDP_AGENT)
    w = run.Workload("t", [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    with (
        tempfile.TemporaryDirectory() as tmp,
        # Everything started in this block (Knot, the agent, the proxy, nft) is in the namespace.
        namespace.inside(namespace.node),
    ):
        up_port = free_port(run.UPSTREAM)
        with KnotServer({"example.com": ZONE}, host=run.UPSTREAM, port=up_port, workers=1):
            peer = run.make_peer("cilium-sdp", w, Path(tmp), f"{run.UPSTREAM}:{up_port}")
            assert peer.addr == run.UPSTREAM and peer.port == up_port

            def ask(i: int, name: str) -> dns.message.Message | None:
                return run.ask(peer.port, run.endpoint_ip(i), name, addr=peer.addr)

            with run.running(peer):
                run.check_verdicts(peer, w)
                mine = ask(0, "n0.pool.example.com")
                assert mine is not None and mine.rcode() == dns.rcode.NOERROR
                assert [rr.to_text() for rrset in mine.answer for rr in rrset] == ["192.0.2.1"]
                deep = ask(1, "x.y.d5.example.com")  # **.d5.example.com is endpoint 1's
                assert deep is not None and deep.rcode() == dns.rcode.NOERROR and deep.answer
                for i, name in ((1, "n0.pool.example.com"), (0, "a.d5.example.com")):
                    other = ask(i, name)  # another endpoint's rule
                    assert other is not None and other.rcode() == dns.rcode.REFUSED
                nobody = ask(2, "evil.example.com")
                assert nobody is not None and nobody.rcode() == dns.rcode.REFUSED
                assert (run.cached(peer) or 0) >= 2  # the agent heard of what was resolved
            # The steering rules without the proxy: dropped, not answered by Knot around it.
            for cmd in peer.setup:
                subprocess.run(cmd, check=True)
            try:
                dropped = run.ask(
                    peer.port, run.endpoint_ip(0), "n0.pool.example.com", 1.0, peer.addr
                )
                assert dropped is None
            finally:
                for cmd in peer.cleanup:
                    subprocess.run(cmd, check=False)
            # And with them gone Knot answers directly: what the rules changed was the path.
            direct = run.ask(peer.port, run.endpoint_ip(0), "evil.example.com", addr=peer.addr)
            assert direct is not None and direct.rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize(
    ("rules", "says"),
    [
        (
            {"endpoints": [{"id": 1, "identity": 1000, "ips": ["127.1.0.999"]}], "servers": []},
            "no servers",
        ),
        (
            {
                "endpoints": [{"id": 1, "identity": 1000, "ips": ["127.1.0.999"]}],
                "servers": [
                    {"identity": 9, "prefixes": ["127.0.0.53/32"], "port": 53, "proto": 17}
                ],
            },
            'endpoints[0]: address "127.1.0.999"',
        ),
        (
            {
                "endpoints": [{"id": 70000, "identity": 1000, "ips": ["127.1.0.1"]}],
                "servers": [
                    {"identity": 9, "prefixes": ["127.0.0.53/32"], "port": 53, "proto": 17}
                ],
            },
            "endpoints[0]: id must be 1-65535 and unique, got 70000",
        ),
        (
            {
                "endpoints": [],
                "servers": [
                    {"identity": 9, "prefixes": ["127.0.0.53/33"], "port": 53, "proto": 17}
                ],
            },
            'servers[0]: prefix "127.0.0.53/33"',
        ),
        ({"endpoints": [], "servers": [], "rules": []}, 'unknown field "rules"'),
    ],
)
def test_agent_refuses_a_bad_rules_file_naming_what_is_wrong(
    tmp_path: Path, rules: dict[str, object], says: str
) -> None:
    agent = built(run.SDP_AGENT)
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    done = subprocess.run(
        [agent, "-rules", str(path), "-listen", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and str(path) in done.stderr
