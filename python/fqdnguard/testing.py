"""A real authoritative DNS server (Knot DNS, Debian package ``knot``) for tests, benchmarks and
the demo: fqdnguard's upstream in integration tests is the real thing, never a mock.

    with KnotServer({"example.com": ZONE_TEXT}) as knot:
        knot.address  # ("127.0.0.1", port)

Only loopback addresses (or addresses inside network namespaces the caller made) are used.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["KnotServer", "KnotUnavailable", "free_port"]


class KnotUnavailable(RuntimeError):
    """knotd is not installed (``apt-get install knot``) or did not start."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on host at the time of asking."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as t:
            t.bind((host, 0))
            port = int(t.getsockname()[1])
            with socket.socket(family, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
            return port
    raise OSError(f"no free port on {host}")


def _probe_query(name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split("."))
    return (
        struct.pack("!HHHHHH", 0x5151, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\x00"
        + struct.pack("!HH", 6, 1)
    )


class KnotServer:
    """Runs knotd serving the given zones (origin -> zone file text) on host:port."""

    def __init__(
        self,
        zones: dict[str, str],
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        extra_listen: list[tuple[str, int]] | None = None,
        workers: int = 1,
        netns: str | None = None,
    ) -> None:
        self.zones = {origin.rstrip(".") + ".": text for origin, text in zones.items()}
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.extra_listen = extra_listen or []
        self.workers = workers
        self.netns = netns
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def _config(self, root: Path) -> str:
        listens = [(self.host, self.port), *self.extra_listen]
        lines = ["server:"]
        lines += [f"    listen: {h}@{p}" for h, p in listens]
        lines += [
            f"    rundir: {root}",
            f"    udp-workers: {self.workers}",
            f"    tcp-workers: {self.workers}",
            "    background-workers: 1",
            "database:",
            f"    storage: {root}",
            "template:",
            "  - id: default",
            f"    storage: {root}",
            '    file: "%s.zone"',
            "    semantic-checks: off",
            "log:",
            "  - target: stderr",
            "    any: error",
            "zone:",
        ]
        lines += [f"  - domain: {origin}" for origin in self.zones]
        return "\n".join(lines) + "\n"

    def start(self) -> KnotServer:
        knotd = shutil.which("knotd") or (
            "/usr/sbin/knotd" if os.path.exists("/usr/sbin/knotd") else None
        )
        if knotd is None:
            raise KnotUnavailable("knotd not found: install the Debian package 'knot'")
        root = Path(tempfile.mkdtemp(prefix="fqdnguard-knot-"))
        self._dir = root
        for origin, text in self.zones.items():
            (root / f"{origin}zone").write_text(text)
        (root / "knot.conf").write_text(self._config(root))
        cmd = [knotd, "-c", str(root / "knot.conf")]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready(next(iter(self.zones)))
        return self

    def _wait_ready(self, origin: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        query = _probe_query(origin)
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise KnotUnavailable(f"knotd exited with {self._proc.returncode}: {err.strip()}")
            if self._netns_probe() if self.netns else self._local_probe(family, query):
                return
            time.sleep(0.05)
        self.stop()
        raise KnotUnavailable(f"knotd did not answer on {self.host}@{self.port} within {timeout}s")

    def _local_probe(self, family: int, query: bytes) -> bool:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            try:
                s.sendto(query, self.address)
                data = s.recv(4096)
            except OSError:
                return False
        return len(data) >= 4 and data[3] & 0x0F == 0  # NOERROR: the zone is loaded

    def _netns_probe(self) -> bool:
        probe = (
            "import socket,sys;a=sys.argv;"
            "s=socket.socket(socket.AF_INET6 if ':' in a[1] else socket.AF_INET,socket.SOCK_DGRAM);"
            "s.settimeout(0.3);s.sendto(bytes.fromhex(a[3]),(a[1],int(a[2])));"
            "d=s.recv(4096);sys.exit(0 if d[3]&15==0 else 1)"
        )
        query = _probe_query(next(iter(self.zones))).hex()
        cmd = [
            "ip",
            "netns",
            "exec",
            str(self.netns),
            "python3",
            "-c",
            probe,
            self.host,
            str(self.port),
            query,
        ]
        return subprocess.run(cmd, check=False, capture_output=True).returncode == 0

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None and self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> KnotServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
