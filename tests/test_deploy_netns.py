"""The chart's uninstall cleanup as a node runs it: the script of the cleanup DaemonSet's init
container, read from the rendered chart, in a network namespace where a crashed ``fqdnguard run
--intercept`` left its interception (as a crash must), while the node's proxy still answers on
the state directory's socket. It waits for that proxy to stop, then removes the interception."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fqdnguard.testing import KnotServer

from tests.netns import netns_unavailable, sh
from tests.split_helpers import stop, wait_for
from tests.test_deploy import CHART, helm
from tests.test_split import Node


def intercept_status(ns: str) -> dict[str, int]:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "fqdnguard.cli", "intercept", "status"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    status: dict[str, int] = json.loads(proc.stdout)
    return status


def cleanup_script(state_dir: Path) -> str:
    out = helm(
        "template", "fqdnguard", str(CHART), "--show-only", "templates/cleanup.yaml",
        "--set", f"stateDir={state_dir}",
    ).stdout  # fmt: skip
    ds = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "DaemonSet")
    command: list[str] = ds["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    return command[2]


def test_uninstall_cleanup_waits_for_the_nodes_proxy_then_removes_interception(
    knot: KnotServer, tmp_path: Path
) -> None:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(why)
    node = Node(knot, tmp_path)
    script = cleanup_script(node.state)
    # `fqdnguard` as the image has it on PATH: this interpreter and the package under test.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "fqdnguard").write_text(f'#!/bin/sh\nexec {sys.executable} -m fqdnguard.cli "$@"\n')
    (shim / "fqdnguard").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}

    ns = f"fgunin{os.getpid()}"
    sh("ip", "netns", "add", ns)
    crashed = cleaner = None
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # Interception left behind by a proxy that died: installed for real, then kill -9.
        (tmp_path / "run").mkdir(mode=0o700)
        crashed = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "fqdnguard.cli", "run",
             "--backend", "nftables", "--intercept", "--log-queries", "none",
             "--policy", str(tmp_path / "policy.yaml"),
             "--endpoints", str(tmp_path / "endpoints.yaml"),
             "--state-dir", str(tmp_path / "run"), "--listen", "127.0.0.1:5300",
             "--upstream", "127.0.0.1:53"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: intercept_status(ns)["table"], "interception installed", timeout=30)
        crashed.send_signal(signal.SIGKILL)
        crashed.wait(10)
        left = intercept_status(ns)
        assert left["table"] and left["ip_rules4"] and left["ip_rules6"], left

        # The node's proxy (the old pod's, terminating) still answers on STATE_DIR/control.sock.
        proxy = node.proxy()
        cleaner = subprocess.Popen(
            ["ip", "netns", "exec", ns, "/bin/sh", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        time.sleep(5)
        assert cleaner.poll() is None, f"cleaned while the proxy served: {cleaner.communicate()}"
        assert intercept_status(ns)["table"]

        # The proxy stops: the cleanup runs at once.
        assert stop(proxy) == 0  # type: ignore[arg-type]
        out, _ = cleaner.communicate(timeout=30)
        assert cleaner.returncode == 0, out
        assert out.startswith("removed: table yes"), out
        after = intercept_status(ns)
        assert not after["table"] and not after["ip_rules4"] and not after["ip_rules6"], after
        assert not after["routes4"] and not after["routes6"], after
    finally:
        for proc in (crashed, cleaner):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        node.close()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
