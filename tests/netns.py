"""Network namespaces for end-to-end tests: a "pod", a "node" routing it, a "world" behind.

    pod (10.77.1.2, fd77:1::2) --veth-- node (10.77.1.1 | 10.77.2.1) --veth-- world (10.77.2.x)

The node forwards between the two links (so pod traffic crosses its forward hook); the world holds
the upstream resolver and TCP servers on several addresses. Sockets are opened *inside* a
namespace from this process (``Topology.open_socket``: the creating thread enters the namespace
for the ``socket()`` call only; a socket stays in the namespace it was made in), so the tests
drive pods without a process per action. Everything lives in namespaces these tests create
and delete.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000

POD4, POD6 = "10.77.1.2", "fd77:1::2"
NODE_POD4, NODE_POD6 = "10.77.1.1", "fd77:1::1"
NODE_WORLD4, NODE_WORLD6 = "10.77.2.1", "fd77:2::1"
UPSTREAM4 = "10.77.2.53"
#: World addresses the TCP servers answer on (every address, ports 443 and 8080).
WORLD4 = [f"10.77.2.{i}" for i in range(10, 16)]
WORLD6 = [f"fd77:2::{i}" for i in range(10, 16)]
SERVER_PORTS = (443, 8080)

_libc = ctypes.CDLL(None, use_errno=True)
_setns_lock = threading.Lock()

# An echo server on every world address: each connection gets back what it sends.
ECHO_SERVER = """
import asyncio, socket, sys
async def echo(r, w):
    try:
        while data := await r.read(4096):
            w.write(data)
            await w.drain()
    except ConnectionError:
        pass
    finally:
        w.close()
async def main():
    servers = []
    for port in map(int, sys.argv[1:]):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
        servers.append(await asyncio.start_server(echo, sock=s))
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def netns_unavailable() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (creates network namespaces and nftables rules); CI runs it as root"
    if shutil.which("ip") is None:
        return "needs the 'ip' command (iproute2)"
    probe = f"fgprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"'ip netns add' failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def sh(*args: str) -> None:
    r = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")


class Topology:
    """Creates the three namespaces and their links; ``close`` deletes them."""

    def __init__(self, prefix: str | None = None) -> None:
        prefix = prefix or f"fg{os.getpid() % 100000}"
        self.pod, self.node, self.world = f"{prefix}-pod", f"{prefix}-node", f"{prefix}-world"
        self._procs: list[subprocess.Popen[bytes]] = []

    def ns(self, name: str, *cmd: str) -> None:
        sh("ip", "netns", "exec", name, *cmd)

    def create(self) -> Topology:
        try:
            self._create()
            self._wait_addresses_usable()
        except Exception:
            self.close()
            raise
        return self

    def _create(self) -> None:
        pod, node, world = self.pod, self.node, self.world
        for n in (pod, node, world):
            self.add_namespace(n)
        sh("ip", "link", "add", "fgp0", "netns", pod, "type", "veth", "peer", "fgn0", "netns", node)
        sh(
            "ip",
            "link",
            "add",
            "fgw0",
            "netns",
            world,
            "type",
            "veth",
            "peer",
            "fgn1",
            "netns",
            node,
        )
        self.ns(pod, "ip", "addr", "add", f"{POD4}/24", "dev", "fgp0")
        self.ns(pod, "ip", "addr", "add", f"{POD6}/64", "dev", "fgp0", "nodad")
        self.ns(node, "ip", "addr", "add", f"{NODE_POD4}/24", "dev", "fgn0")
        self.ns(node, "ip", "addr", "add", f"{NODE_POD6}/64", "dev", "fgn0", "nodad")
        self.ns(node, "ip", "addr", "add", f"{NODE_WORLD4}/24", "dev", "fgn1")
        self.ns(node, "ip", "addr", "add", f"{NODE_WORLD6}/64", "dev", "fgn1", "nodad")
        for a in [UPSTREAM4, *WORLD4]:
            self.ns(world, "ip", "addr", "add", f"{a}/24", "dev", "fgw0")
        for a in WORLD6:
            self.ns(world, "ip", "addr", "add", f"{a}/64", "dev", "fgw0", "nodad")
        for n, dev in ((pod, "fgp0"), (node, "fgn0"), (node, "fgn1"), (world, "fgw0")):
            self.ns(n, "ip", "link", "set", dev, "up")
        self.ns(pod, "ip", "route", "add", "default", "via", NODE_POD4)
        self.ns(pod, "ip", "-6", "route", "add", "default", "via", NODE_POD6)
        self.ns(world, "ip", "route", "add", "default", "via", NODE_WORLD4)
        self.ns(world, "ip", "-6", "route", "add", "default", "via", NODE_WORLD6)
        self.ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.ns(node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")

    def _namespaces(self) -> tuple[str, ...]:
        return (self.pod, self.node, self.world)

    def add_namespace(self, name: str) -> None:
        """A new namespace with loopback up and IPv6 duplicate address detection off.

        Off before any link exists, so it covers the link-local addresses the kernel gives each
        veth as it comes up (``nodad`` on ``ip addr add`` covers only the addresses we add). A
        link-local address stays "tentative" for about a second after link up, and until then
        the kernel sends no neighbour solicitation from that link, so the first IPv6 packet
        forwarded onto it waits for neighbour discovery past a short connect timeout.
        """
        sh("ip", "netns", "add", name)
        self.ns(name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
        self.ns(name, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        self.ns(name, "ip", "link", "set", "lo", "up")

    def _wait_addresses_usable(self, timeout: float = 5.0) -> None:
        """Returns once no IPv6 address in the topology is tentative; raises after ``timeout``."""
        deadline = time.monotonic() + timeout
        for n in self._namespaces():
            while True:
                r = subprocess.run(
                    ["ip", "-n", n, "-6", "addr", "show", "tentative"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                if not r.stdout.strip():
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"IPv6 addresses still tentative in {n}: {r.stdout.strip()}")
                time.sleep(0.05)

    def spawn(self, name: str, *cmd: str, **kw: object) -> subprocess.Popen[bytes]:
        """Starts a process in a namespace; ``close`` ends it."""
        proc = subprocess.Popen(["ip", "netns", "exec", name, *cmd], **kw)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc  # type: ignore[no-any-return]

    def start_echo_servers(self, python: str) -> None:
        proc = self.spawn(
            self.world,
            python,
            "-c",
            ECHO_SERVER,
            *map(str, SERVER_PORTS),
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the echo servers did not start")

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        """This thread in namespace ``name`` for the block (keep it to socket creation)."""
        with _setns_lock:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
            try:
                if _libc.setns(target, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {name} failed")
                try:
                    yield
                finally:
                    if _libc.setns(own, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns back failed")  # pragma: no cover
            finally:
                os.close(target)
                os.close(own)

    def open_socket(self, name: str, family: int, kind: int) -> socket.socket:
        with self.inside(name):
            return socket.socket(family, kind)

    def connect(self, name: str, ip: str, port: int, timeout: float = 0.4) -> socket.socket | None:
        """A TCP connection from namespace ``name``, or None when it does not get through."""
        s = self.open_socket(
            name, socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM
        )
        s.settimeout(timeout)
        try:
            s.connect((ip, port))
        except OSError:
            s.close()
            return None
        return s

    def close(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs.clear()
        for n in (self.pod, self.node, self.world):
            subprocess.run(["ip", "netns", "del", n], capture_output=True, check=False)


def echo_ok(s: socket.socket, payload: bytes = b"ping", timeout: float = 1.0) -> bool:
    """True when the connection still carries data both ways."""
    s.settimeout(timeout)
    try:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(len(payload) - len(got))
            if not chunk:
                return False
            got += chunk
        return got == payload
    except OSError:
        return False


# -- interception: two pods, a node, a world and a "dns" namespace --------------------------------
#
#   policed (10.79.1.2, fd79:1::2) --+
#                                    +-- node (fqdnguard run --intercept) --+-- world (10.79.2.x)
#   free    (10.79.3.2, fd79:3::2) --+                                      +-- dns (cluster DNS)
#
# The dns namespace holds the cluster-DNS addresses (10.96.0.10, fd96::10) and a second server
# (10.96.0.20, fd96::20) that no policy admits; the node routes them to it. Both pods just ask
# those addresses, as pods whose resolv.conf names kube-dns do.

CLUSTER_DNS4, CLUSTER_DNS6 = "10.96.0.10", "fd96::10"
OTHER_DNS4, OTHER_DNS6 = "10.96.0.20", "fd96::20"
POLICED4, POLICED6 = "10.79.1.2", "fd79:1::2"
NODE_POLICED4 = "10.79.1.1"
FREE4, FREE6 = "10.79.3.2", "fd79:3::2"
IWORLD4 = [f"10.79.2.{i}" for i in range(10, 16)]
IWORLD6 = [f"fd79:2::{i}" for i in range(10, 16)]


class InterceptTopology(Topology):
    """Five namespaces (see above); ``pod`` is the policed pod, ``free`` the other one."""

    def __init__(self, prefix: str | None = None) -> None:
        prefix = prefix or f"fi{os.getpid() % 100000}"
        super().__init__(prefix)
        self.free, self.dns = f"{prefix}-free", f"{prefix}-dns"

    def _namespaces(self) -> tuple[str, ...]:
        return (self.pod, self.free, self.node, self.world, self.dns)

    def _create(self) -> None:
        node = self.node
        for n in self._namespaces():
            self.add_namespace(n)
        links = (  # (namespace, its device, node's device, subnet index)
            (self.pod, "fip0", "fin1", 1),
            (self.world, "fiw0", "fin2", 2),
            (self.free, "fif0", "fin3", 3),
            (self.dns, "fid0", "fin4", 4),
        )
        for ns, dev, peer, i in links:
            sh("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", peer, "netns", node)
            self.ns(node, "ip", "addr", "add", f"10.79.{i}.1/24", "dev", peer)
            self.ns(node, "ip", "addr", "add", f"fd79:{i}::1/64", "dev", peer, "nodad")
            self.ns(node, "ip", "link", "set", peer, "up")
            self.ns(ns, "ip", "link", "set", dev, "up")
            own4, own6 = (IWORLD4, IWORLD6) if ns == self.world else ([f"10.79.{i}.2"], [])
            for a in own4:
                self.ns(ns, "ip", "addr", "add", f"{a}/24", "dev", dev)
            for a in own6 or [f"fd79:{i}::2"]:
                self.ns(ns, "ip", "addr", "add", f"{a}/64", "dev", dev, "nodad")
            self.ns(ns, "ip", "route", "add", "default", "via", f"10.79.{i}.1")
            self.ns(ns, "ip", "-6", "route", "add", "default", "via", f"fd79:{i}::1")
        for a in (CLUSTER_DNS4, OTHER_DNS4):
            self.ns(self.dns, "ip", "addr", "add", f"{a}/32", "dev", "lo")
        for a in (CLUSTER_DNS6, OTHER_DNS6):
            self.ns(self.dns, "ip", "addr", "add", f"{a}/128", "dev", "lo")
        self.ns(node, "ip", "route", "add", "10.96.0.0/24", "via", "10.79.4.2")
        self.ns(node, "ip", "-6", "route", "add", "fd96::/64", "via", "fd79:4::2")
        self.ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.ns(node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        # The node's own resolver (``ip netns exec`` mounts /etc/netns/NAME/resolv.conf): what
        # fqdnguard forwards direct (not intercepted) queries to when no --upstream is given.
        os.makedirs(self._etc, exist_ok=True)
        with open(os.path.join(self._etc, "resolv.conf"), "w") as f:
            f.write(f"nameserver {CLUSTER_DNS4}\n")

    @property
    def _etc(self) -> str:
        return f"/etc/netns/{self.node}"

    def close(self) -> None:
        super().close()
        for n in (self.free, self.dns):
            subprocess.run(["ip", "netns", "del", n], capture_output=True, check=False)
        shutil.rmtree(self._etc, ignore_errors=True)
