"""Shared pieces of the proxy integration tests: a real Knot upstream, a policy, endpoints."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import uvloop

if TYPE_CHECKING:
    from fqdnguard.config import ProxyConfig

UPSTREAM_IP = "127.0.0.53"
SECOND_UPSTREAM_IP = "127.0.0.54"
POD_IP = "127.0.0.2"
FREE_IP = "127.0.0.3"
STRANGER_IP = "127.0.0.99"

BIG_TXT = " ".join(f'"{"x" * 200}"' for _ in range(4))

ZONE = f"""$ORIGIN example.com.
$TTL 300
@       SOA ns admin 1 3600 600 86400 60
@       NS  ns
@       A   192.0.2.1
ns      A   127.0.0.53
www     A   192.0.2.10
www     A   192.0.2.11
www     AAAA 2001:db8::10
alias   CNAME www
chain1  CNAME chain2
chain2  CNAME www.example.com.
short   30 A 192.0.2.30
big     TXT {BIG_TXT}
outside CNAME host.other.org.
"""

ENDPOINTS = f"""
endpoints:
  - name: kube-dns
    namespace: kube-system
    ips: [{UPSTREAM_IP}, {SECOND_UPSTREAM_IP}]
    labels: {{k8s-app: kube-dns}}
  - name: pod
    namespace: default
    ips: [{POD_IP}, "::1"]
    labels: {{app: pod}}
  - name: free
    namespace: default
    ips: [{FREE_IP}]
    labels: {{app: free}}
"""

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: pod-dns, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod}}
  egress:
    - toEndpoints:
        - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns:
              - matchPattern: "*.example.com"
              - matchName: "example.com"
    - toFQDNs: [{matchPattern: "*.example.com"}]
      toPorts:
        - ports: [{port: "443", protocol: TCP}]
"""


def files_config(tmp_path: Path, upstream_port: int, **cfg: Any) -> ProxyConfig:
    """``fqdnguard run``'s options with POLICY and ENDPOINTS written to files in ``tmp_path``,
    the state directory ``tmp_path/state``, and a free port on 127.0.0.1 to listen on."""
    from fqdnguard.config import ProxyConfig  # noqa: PLC0415
    from fqdnguard.testing import free_port  # noqa: PLC0415

    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "endpoints.yaml").write_text(ENDPOINTS)
    cfg.setdefault("log_queries", "none")
    return ProxyConfig(
        listen=[("127.0.0.1", free_port())],
        upstreams=[(UPSTREAM_IP, upstream_port)],
        policy=[str(tmp_path / "policy.yaml")],
        endpoints=str(tmp_path / "endpoints.yaml"),
        state_dir=str(tmp_path / "state"),
        **cfg,
    )


def require_knot() -> None:
    if shutil.which("knotd") is None and not shutil.which("/usr/sbin/knotd"):
        pytest.skip("knotd is not installed (apt-get install knot); .ci/run installs it")


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(coro_fn())


async def udp_ask(
    server: tuple[str, int], wire: bytes, source: str = POD_IP, timeout: float = 3.0
) -> bytes:
    """Sends one datagram from ``source`` and returns the first datagram back."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not fut.done():
                fut.set_result(data)

    family = 10 if ":" in server[0] else 2
    transport, _ = await loop.create_datagram_endpoint(
        Client, local_addr=(source, 0), remote_addr=server, family=family
    )
    try:
        transport.sendto(wire)
        return await asyncio.wait_for(fut, timeout)
    finally:
        transport.close()


async def tcp_ask(
    server: tuple[str, int], wires: list[bytes], source: str = POD_IP, timeout: float = 3.0
) -> list[bytes]:
    """Sends the messages pipelined on one TCP connection; returns the answers in arrival order."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(server[0], server[1], local_addr=(source, 0)), timeout
    )
    try:
        writer.write(b"".join(len(w).to_bytes(2, "big") + w for w in wires))
        await writer.drain()
        out = []
        for _ in wires:
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), timeout), "big")
            out.append(await asyncio.wait_for(reader.readexactly(size), timeout))
        return out
    finally:
        writer.close()


async def tcp_ask_half_closed(
    server: tuple[str, int], wires: list[bytes], source: str = POD_IP, timeout: float = 3.0
) -> list[bytes]:
    """Sends the messages pipelined on one TCP connection, then shuts its write side (as
    ``nc -q`` and some stub resolvers do); returns every answer read until the server closes."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(server[0], server[1], local_addr=(source, 0)), timeout
    )
    try:
        writer.write(b"".join(len(w).to_bytes(2, "big") + w for w in wires))
        writer.write_eof()
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    out = []
    while len(rest) >= 2:
        size = int.from_bytes(rest[:2], "big")
        out.append(rest[2 : 2 + size])
        rest = rest[2 + size :]
    return out
