"""End to end: ``fqdnguard run --intercept`` without ``--upstream`` on a node whose resolv.conf
nameserver has no route from the node (see tests/netns.py, ``InterceptTopology``).

It starts anyway, over either UDP path: the pods' intercepted queries go to the servers they
asked and never needed that upstream. Queries for it (sent to fqdnguard's own listener) get
SERVFAIL and the failures are counted; once the route appears, they are answered, without a
restart.

Needs root, iproute2, knotd, libnftables and the kernel's nft_tproxy; skipped with the reason
otherwise.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest
from fqdnguard.testing import KnotServer

from tests.netns import CLUSTER_DNS4, CLUSTER_DNS6, NODE_POLICED4, OTHER_DNS4, InterceptTopology
from tests.proxy_fixtures import require_knot
from tests.test_e2e_intercept_netns import POLICY, ZONE, Env, endpoints_yaml
from tests.test_e2e_netns import _skip_reason

pytestmark = pytest.mark.skipif(
    (_reason := _skip_reason()) is not None, reason=_reason or "available"
)

#: The node's resolv.conf nameserver: a cluster-DNS address the node has no route to at first.
NODE_DNS = "10.96.0.30"
#: The dns namespace, as the node reaches it.
DNS_GATEWAY = "10.79.4.2"


@pytest.fixture(params=["rust", "asyncio"], ids=["udp_io=rust", "udp_io=asyncio"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    require_knot()
    topo = InterceptTopology().create()
    state = Path(tempfile.mkdtemp(prefix="fqdnguard-upstream-"))
    e = Env(topo, state, udp_io=request.param)
    try:
        topo.ns(topo.dns, "ip", "addr", "add", f"{NODE_DNS}/32", "dev", "lo")
        # The node reaches the cluster-DNS servers the pods ask, not its own nameserver.
        topo.ns(topo.node, "ip", "route", "del", "10.96.0.0/24")
        for server in (CLUSTER_DNS4, OTHER_DNS4):
            topo.ns(topo.node, "ip", "route", "add", f"{server}/32", "via", DNS_GATEWAY)
        Path(f"/etc/netns/{topo.node}/resolv.conf").write_text(f"nameserver {NODE_DNS}\n")
        (state / "policy.yaml").write_text(POLICY)
        (state / "endpoints.yaml").write_text(
            endpoints_yaml().replace(f'"{CLUSTER_DNS6}"]', f'"{CLUSTER_DNS6}", {NODE_DNS}]', 1)
        )
        extra = [(CLUSTER_DNS6, 53), (NODE_DNS, 53)]
        with KnotServer(
            {"e2e.test": ZONE}, host=CLUSTER_DNS4, port=53, extra_listen=extra, netns=topo.dns
        ):
            yield e
            if e.proxy is not None:
                e.stop()
    finally:
        topo.close()
        if e.log.exists() and os.environ.get("FQDNGUARD_E2E_LOG"):
            print(f"--- fqdnguard log\n{e.log.read_text()}", file=sys.stderr)


def test_an_unreachable_upstream_is_not_fatal_and_is_used_once_reachable(env: Env) -> None:
    assert env.node("ip", "route", "get", NODE_DNS).returncode != 0  # no route: unreachable
    env.start()  # raises when fqdnguard exits
    pod = env.topo.pod
    # Intercepted queries go to the server asked: the upstream is not needed.
    for tcp in (False, True):
        got = env.ask(pod, "web.allowed.e2e.test", CLUSTER_DNS4, tcp=tcp)
        assert (got.rcode, got.addrs) == (dns.rcode.NOERROR, ["10.79.2.10"])
    # Queries for the upstream (asked of fqdnguard directly) fail closed.
    assert env.ask(pod, "web.allowed.e2e.test", NODE_POLICED4).rcode == dns.rcode.SERVFAIL
    proxy = env.stats()["proxy"]
    assert proxy["upstream_unreachable"] >= 1
    sent = proxy["udp_send_errors" if env.udp_io == "rust" else "upstream_send_errors"]
    assert sent >= 1
    assert "10.96.0.30:53" in env.log.read_text()
    # The route appears: forwarding resumes without a restart.
    env.node("ip", "route", "add", f"{NODE_DNS}/32", "via", DNS_GATEWAY).check_returncode()
    deadline = time.monotonic() + 15
    while True:
        got = env.ask(pod, "web.allowed.e2e.test", NODE_POLICED4)
        if got.rcode == dns.rcode.NOERROR or time.monotonic() > deadline:
            break
    assert (got.rcode, got.addrs, got.source) == (
        dns.rcode.NOERROR,
        ["10.79.2.10"],
        (NODE_POLICED4, 53),
    )
    assert env.proxy is not None and env.proxy.poll() is None
