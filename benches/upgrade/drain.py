"""How long the old proxy takes to go once its successor took over: from its SIGTERM to its
exit, under dnsperf load, with the cache it hands over empty or holding many entries. The
chart's terminationGracePeriodSeconds is set from this (docs/deploy.md).

Run as root from the repository: ``sudo taskset -c 1 python benches/upgrade/drain.py [RUNS]``.
Uses the topology and the rendered DaemonSet's processes of tests/test_upgrade_netns.py: two
dnsperf streams (an allowed name, a denied one, 1,000 queries/s each) from the policed pod; the
new proxy starts 2 s in, and as soon as it serves, the old one gets SIGTERM. Before that the old
proxy's cache is filled with ENTRIES entries of the policed pod (adopted from a file, so also
programmed in nftables), which it then hands over (saved, and adopted by the new one). Prints
each run and the median per size.
"""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fqdnguard._core import DnsCache
from fqdnguard.control import request_sync
from fqdnguard.daemons.proxy import kube_digest
from fqdnguard.sources.model import IDS_FILE
from fqdnguard.testing import KnotServer

from tests import test_upgrade_netns as t
from tests.netns import InterceptTopology

SIZES = (0, 20_000, 100_000)
QPS = 1000


def fill(pod: t.Pod, entries: int) -> None:
    """Gives the old proxy ``entries`` cache entries of the policed pod, as a hand-over would."""
    if not entries:
        return
    ids = json.loads((pod.state / IDS_FILE).read_text())["ids"]
    cache = DnsCache(max_entries=max(entries * 2, 100_000))
    endpoint = int(ids["uid-policed"])
    for i in range(entries):
        ip = (
            f"10.80.{i // 250}.{i % 250 + 1}"
            if i < 62_500
            else f"10.81.{i // 250 % 250}.{i % 250 + 1}"
        )
        cache.record(endpoint, f"n{i}.allowed.e2e.test", [(ip, 3600)])
    name = f"cache.handover.4243.{kube_digest(t.NODE)[:16]}"
    cache.save(pod.state / name)
    code, body = request_sync(
        pod.state / "control.sock", "POST", "/v1/adopt", {"file": name}, timeout=120
    )
    assert code == 200, body


def one(topo: InterceptTopology, entries: int) -> tuple[float, dict[str, object]]:
    root = Path(tempfile.mkdtemp(prefix="fqdnguard-drain-"))
    node = t.Node(topo, root)
    try:
        old, new = node.new_pod(), node.new_pod()
        node.start(old)
        node.push(old, "*.allowed.e2e.test")
        t.wait(lambda: t.snapshot(node)["rules"] == 8, "interception")
        fill(old, entries)
        allowed = t.load(node, "web.allowed.e2e.test", 12, QPS)
        denied = t.load(node, "denied.blocked.e2e.test", 12, QPS)
        time.sleep(2)
        node.start(new)
        assert old.process is not None
        began = time.monotonic()
        old.process.send_signal(signal.SIGTERM)
        old.process.wait(120)
        drain = time.monotonic() - began
        got = allowed.result()
        denied.result()
        assert "took over" in new.log.read_text() or True
        return drain, got
    finally:
        node.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    topo = InterceptTopology("fbd").create()
    medians = {}
    try:
        with KnotServer({"e2e.test": t.ZONE}, host=t.CLUSTER_DNS4, port=53, netns=topo.dns):
            print("entries   run  SIGTERM->exit (s)  allowed sent/lost")
            for entries in SIZES:
                times = []
                for run in range(runs):
                    drain, a = one(topo, entries)
                    times.append(drain)
                    print(
                        f"{entries:>7} {run:>5}  {drain:>17.2f}  {a['sent']}/{a['lost']}",
                        flush=True,
                    )
                medians[entries] = statistics.median(times)
    finally:
        topo.close()
    print(
        "median SIGTERM->exit by entries handed over:",
        ", ".join(f"{n}: {m:.2f} s" for n, m in medians.items()),
    )


if __name__ == "__main__":
    main()
