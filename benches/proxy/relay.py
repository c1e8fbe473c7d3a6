"""The ceiling for a Python DNS proxy: a bare uvloop UDP relay that parses nothing.

It swaps the 16-bit id for one of its own (so answers find their client) and copies bytes both
ways; no policy, no cache. Usage: relay.py LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop


class Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        entry = self.relay.pending.pop(data[:2], None)
        if entry is not None and self.relay.client is not None:
            client, orig_id = entry
            self.relay.client.sendto(orig_id + data[2:], client)


class Relay(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.pending: dict[bytes, tuple[tuple[str, int], bytes]] = {}
        self.next_id = 0
        self.client: asyncio.DatagramTransport | None = None
        self.upstream: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = transport  # type: ignore[assignment]  # uvloop's UDP transport class

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12 or self.upstream is None:
            return
        self.next_id = (self.next_id + 1) & 0xFFFF
        new_id = self.next_id.to_bytes(2, "big")
        self.pending[new_id] = (addr, data[:2])
        self.upstream.sendto(new_id + data[2:])


async def main(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay()
    await loop.create_datagram_endpoint(lambda: relay, local_addr=listen)
    up, _ = await loop.create_datagram_endpoint(lambda: Upstream(relay), remote_addr=upstream)
    relay.upstream = up
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()


if __name__ == "__main__":
    a = sys.argv[1:]
    uvloop.run(main((a[0], int(a[1])), (a[2], int(a[3]))))
