"""Lost queries in a hot restart of an intercepting proxy: sockets handed over (SCM_RIGHTS)
against reuseport steering, side by side.

Run as root from the repository: ``sudo python benches/upgrade/handover.py [RUNS]``. Uses the
topology and the rendered DaemonSet's processes of tests/test_upgrade_netns.py: two dnsperf
streams (an allowed name, a denied one, 300 queries/s each for 8 s) from the policed pod; the
new proxy starts 2 s in and the old one gets SIGTERM. Prints, per mode and run, queries sent and
lost and the rcodes of each stream.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fqdnguard.testing import KnotServer

from tests import test_upgrade_netns as t
from tests.netns import InterceptTopology


def one(topo: InterceptTopology, mode: str) -> tuple[dict[str, object], dict[str, object]]:
    root = Path(tempfile.mkdtemp(prefix="fqdnguard-handover-"))
    node = t.Node(topo, root)
    try:
        old, new = node.new_pod(), node.new_pod()
        for pod in (old, new):
            pod.proxy.argv.append(f"--socket-handover={mode}")
        node.start(old)
        node.push(old, "*.allowed.e2e.test")
        t.wait(lambda: t.snapshot(node)["rules"] == 8, "interception")
        allowed = t.load(node, "web.allowed.e2e.test", 8, 300)
        denied = t.load(node, "denied.blocked.e2e.test", 8, 300)
        time.sleep(2)
        node.start(new)
        assert old.process is not None
        old.process.send_signal(signal.SIGTERM)
        old.process.wait(30)
        return allowed.result(), denied.result()
    finally:
        node.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    topo = InterceptTopology("fbh").create()
    try:
        with KnotServer({"e2e.test": t.ZONE}, host=t.CLUSTER_DNS4, port=53, netns=topo.dns):
            print("mode       run  allowed sent/lost  denied sent/lost  rcodes")
            for mode in ("fds", "reuseport"):
                for run in range(runs):
                    a, d = one(topo, mode)
                    print(
                        f"{mode:<10} {run:>3}  {a['sent']:>6}/{a['lost']:<4}      "
                        f"{d['sent']:>6}/{d['lost']:<4}     {a['rcodes']} {d['rcodes']}",
                        flush=True,
                    )
    finally:
        topo.close()


if __name__ == "__main__":
    main()
