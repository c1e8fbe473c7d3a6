"""Helpers of the agent/proxy split tests: real ``fqdnguard proxy`` / ``agent`` processes, their
control socket, and a steady UDP query stream that accounts for every query."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
from fqdnguard.control import ControlError, request_sync

ROOT = Path(__file__).resolve().parent.parent


def fqdnguard_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fqdnguard.cli", *args]


def spawn(
    cmd: Sequence[str], log: Path, prefix: Sequence[str] = (), **kw: Any
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([*prefix, *cmd], stdout=out, stderr=out, cwd=ROOT, **kw)


def status(state_dir: Path, timeout: float = 2.0) -> dict[str, Any] | None:
    """The proxy's /v1/status, or None when no proxy answers on the state dir's socket."""
    try:
        code, body = request_sync(state_dir / "control.sock", "GET", "/v1/status", timeout=timeout)
    except ControlError:
        return None
    return body if code == 200 else None


def wait_for(
    pred: Callable[[], Any], what: str, timeout: float = 15.0, log: Path | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    tail = f"\n--- log\n{log.read_text()}" if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}{tail}")


def stop(proc: subprocess.Popen[bytes], sig: int = 15, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def ask(
    sock_factory: Callable[[int], socket.socket],
    server: tuple[str, int],
    name: str,
    rdtype: str = "A",
    timeout: float = 2.0,
) -> tuple[int, list[str]]:
    """One UDP query: (rcode, A/AAAA addresses)."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with sock_factory(family) as s:
        s.settimeout(timeout)
        s.sendto(dns.message.make_query(name, rdtype).to_wire(), server)
        answer = dns.message.from_wire(s.recv(65535))
    addrs = [rd.address for rrset in answer.answer for rd in rrset if rrset.rdtype in (1, 28)]
    return answer.rcode(), addrs


class QueryStream:
    """Sends queries at a steady rate from one UDP socket and records every answer by id.

    ``names`` are asked in turn; ``lost()`` lists the ids without an answer, ``rcodes`` counts
    answers by rcode. Ids are unique while fewer than 65,536 queries are sent."""

    def __init__(
        self, sock: socket.socket, server: tuple[str, int], names: Sequence[str], rate: float
    ) -> None:
        self.sock = sock
        self.server = server
        self.names = list(names)
        self.rate = rate
        self.sent: dict[int, str] = {}
        self.answered: dict[int, int] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._wires = []
        for name in self.names:
            self._wires.append(bytearray(dns.message.make_query(name, "A").to_wire()))
        self._sending_done = threading.Event()

    def start(self) -> QueryStream:
        self.sock.setblocking(False)
        self._receiver.start()
        self._sender.start()
        return self

    def _send(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        qid = 0
        while not self._stop.is_set() and qid < 65535:
            qid += 1
            wire = self._wires[qid % len(self._wires)]
            wire[0:2] = qid.to_bytes(2, "big")
            try:
                self.sent[qid] = self.names[qid % len(self.names)]
                self.sock.sendto(bytes(wire), self.server)
            except OSError as e:
                self.errors.append(f"send {qid}: {e}")
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self._sending_done.set()

    def _receive(self) -> None:
        while True:
            if self._sending_done.is_set() and (
                len(self.answered) >= len(self.sent) or time.monotonic() > self._give_up
            ):
                return
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if not ready:
                continue
            try:
                data = self.sock.recv(65535)
            except OSError:
                continue
            if len(data) >= 4:
                qid = int.from_bytes(data[:2], "big")
                if qid in self.answered:
                    self.errors.append(f"duplicate answer for {qid}")
                self.answered[qid] = data[3] & 0x0F

    _give_up = float("inf")

    def stop(self, grace: float = 3.0) -> QueryStream:
        """Stops sending and waits up to ``grace`` seconds for the last answers."""
        self._give_up = time.monotonic() + grace + 1.0
        self._stop.set()
        self._sender.join()
        self._give_up = time.monotonic() + grace
        self._receiver.join()
        self.sock.close()
        return self

    def lost(self) -> list[int]:
        return sorted(set(self.sent) - set(self.answered))

    def rcodes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rc in self.answered.values():
            key = dns.rcode.to_text(rc)
            out[key] = out.get(key, 0) + 1
        return out

    def summary(self) -> str:
        return (
            f"{len(self.sent)} sent, {len(self.answered)} answered, lost {self.lost()[:20]}, "
            f"rcodes {self.rcodes()}, errors {self.errors[:5]}"
        )


def file_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777
