"""What the image and the DaemonSet run besides the daemons: ``fqdnguard --version`` and the exec
probes ``fqdnguard probe live|ready``, against a real ``fqdnguard proxy`` process (the ``log``
backend) and a real Knot upstream on loopback."""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from fqdnguard.testing import KnotServer

from tests.split_helpers import ROOT, fqdnguard_cmd, stop
from tests.test_split import Node


def fqdnguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fqdnguard_cmd(*args), capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )


def test_version_is_the_package_version() -> None:
    proc = fqdnguard("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"fqdnguard {version('fqdnguard')}\n"
    # pyproject.toml takes the version from Cargo.toml: the image says what was built.
    cargo = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    assert cargo is not None
    assert proc.stdout.split()[1] == cargo.group(1)


@pytest.fixture
def node(knot: KnotServer) -> Iterator[Node]:
    with tempfile.TemporaryDirectory(prefix="fqdnguard-probe-") as d:
        n = Node(knot, Path(d))
        try:
            yield n
        finally:
            n.close()


def probe(kind: str, socket: Path) -> tuple[int, str]:
    proc = fqdnguard("probe", kind, "--socket", str(socket))
    out = (proc.stdout + proc.stderr).strip()
    assert "\n" not in out, f"a probe says one line: {out!r}"
    return proc.returncode, out


def test_probes_follow_the_proxy_at_their_socket(node: Node) -> None:
    sock = node.state / "control.sock"
    # Nothing there yet: not live, and the reason names the socket.
    code, out = probe("live", sock)
    assert code == 1 and out.startswith("live: failed: no proxy answers on") and str(sock) in out

    # A proxy with an empty state directory serves (refusing everything) but enforces nothing
    # yet: live, not ready.
    proxy = node.proxy()
    pid = proxy.pid  # type: ignore[attr-defined]
    assert probe("live", sock) == (0, f"live: ok: proxy pid {pid} answers on {sock}")
    code, out = probe("ready", sock)
    assert code == 1
    assert (
        out == f"ready: failed: proxy pid {pid} has no policy in force yet (refusing every query)"
    )

    # The agent pushes a policy: ready.
    assert node.agent("--once").wait(30) == 0  # type: ignore[attr-defined]
    code, out = probe("ready", sock)
    assert code == 0
    assert (
        out
        == f"ready: ok: proxy pid {pid} enforces a policy from the agent (1 policies, 3 endpoints)"
    )

    # Restarted without an agent: ready at once from the state directory.
    assert stop(proxy) == 0  # type: ignore[arg-type]
    assert probe("live", sock)[0] == 1
    proxy = node.proxy()
    code, out = probe("ready", sock)
    assert code == 0 and "from its state directory" in out, out


def test_a_probe_at_something_else_fails_with_a_reason(tmp_path: Path) -> None:
    not_a_socket = tmp_path / "control.sock"
    not_a_socket.write_text("")
    for kind in ("live", "ready"):
        code, out = probe(kind, not_a_socket)
        assert code == 1 and out.startswith(f"{kind}: failed: no proxy answers on"), out
    proc = fqdnguard("probe", "alive")
    assert proc.returncode == 2 and "invalid choice: 'alive'" in proc.stderr
