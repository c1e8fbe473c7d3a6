"""``fqdnguard proxy`` and ``fqdnguard agent`` as two real processes against a real Knot
upstream on loopback (the ``log`` backend): the control protocol and its socket's permissions,
the proxy living on without the agent, serving from its state at once after a restart, and a
rolling restart of two proxies on one port that loses no query. The same with nftables in
network namespaces is in test_e2e_netns.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest
from fqdnguard._core import DnsCache
from fqdnguard.control import ControlError, ensure_private_dir, request_fds, request_sync
from fqdnguard.testing import KnotServer, free_port

from tests.proxy_fixtures import ENDPOINTS, POD_IP, POLICY, STRANGER_IP
from tests.split_helpers import (
    QueryStream,
    ask,
    file_mode,
    fqdnguard_cmd,
    spawn,
    status,
    stop,
    wait_for,
)


class Node:
    """A state dir, a port, and the proxy/agent processes started on them."""

    def __init__(self, knot: KnotServer, root: Path) -> None:
        self.knot = knot
        self.root = root
        self.state = root / "state"
        self.port = free_port("127.0.0.1")
        self.log = root / "fqdnguard.log"
        self.procs: list[object] = []
        (root / "policy.yaml").write_text(POLICY)
        (root / "endpoints.yaml").write_text(ENDPOINTS)

    def proxy(self, *extra: str, wait: bool = True) -> object:
        cmd = fqdnguard_cmd(
            "proxy", "--state-dir", str(self.state), "--backend", "log",
            "--listen", f"127.0.0.1:{self.port}", "--listen", f"[::1]:{self.port}",
            "--upstream", f"{self.knot.host}:{self.knot.port}", "--log-queries", "none", *extra,
        )  # fmt: skip
        proc = spawn(cmd, self.log)
        self.procs.append(proc)
        if wait:
            self.wait_serving(proc)
        return proc

    def wait_serving(self, proc: object) -> None:
        pid = proc.pid  # type: ignore[attr-defined]
        wait_for(lambda: (status(self.state) or {}).get("pid") == pid, "the proxy", log=self.log)

    def agent(self, *extra: str) -> object:
        cmd = fqdnguard_cmd(
            "agent", "--state-dir", str(self.state), "--policy", str(self.root / "policy.yaml"),
            "--endpoints", str(self.root / "endpoints.yaml"), "--interval", "0.2", *extra,
        )  # fmt: skip
        proc = spawn(cmd, self.log)
        self.procs.append(proc)
        return proc

    def cache(self) -> list[dict[str, Any]]:
        """The serving proxy's cache entries (GET /v1/cache)."""
        code, body = request_sync(self.state / "control.sock", "GET", "/v1/cache")
        assert code == 200, body
        entries: list[dict[str, Any]] = body[1:]  # NDJSON: a header line, then the entries
        return entries

    def learned(self) -> set[tuple[str, str]]:
        """(name, ip) of every entry the serving proxy's cache holds."""
        return {(e["name"], e["ip"]) for e in self.cache()}

    def digest(self) -> str | None:
        return ((status(self.state) or {}).get("policy") or {}).get("digest")

    def ask(
        self, name: str, source: str = POD_IP, family: int = 4, port: int | None = None
    ) -> tuple[int, list[str]]:
        host = "127.0.0.1" if family == 4 else "::1"

        def make(fam: int) -> socket.socket:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.bind((source, 0))
            return s

        return ask(make, (host, port or self.port), name)

    def stream(self, names: list[str], rate: float, family: int = 4) -> QueryStream:
        fam, src, host = (
            (socket.AF_INET, POD_IP, "127.0.0.1")
            if family == 4
            else (socket.AF_INET6, "::1", "::1")
        )
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((src, 0))
        return QueryStream(s, (host, self.port), names, rate).start()

    def changes(self) -> list[dict[str, object]]:
        """What the log backend applied (its JSON lines in the log)."""
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith('{"change"'):
                out.append(json.loads(line))
        return out

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)  # type: ignore[arg-type]


@pytest.fixture
def node(knot: KnotServer) -> Iterator[Node]:
    with tempfile.TemporaryDirectory(prefix="fqdnguard-split-") as d:
        n = Node(knot, Path(d))
        try:
            yield n
        finally:
            n.close()


def test_control_socket_is_private_and_the_protocol_checks_its_input(node: Node) -> None:
    node.proxy()
    sock = node.state / "control.sock"
    assert file_mode(sock) == 0o600
    assert file_mode(node.state) == 0o700
    # No policy yet: every query is refused (fail closed), nothing is forwarded.
    assert node.ask("www.example.com")[0] == dns.rcode.REFUSED
    st = status(node.state)
    assert st is not None and st["policy"]["source"] == "none" and st["policy"]["digest"] is None

    assert request_sync(sock, "GET", "/v1/nothing")[0] == 404
    assert request_sync(sock, "DELETE", "/v1/policy")[0] == 405
    code, body = request_sync(sock, "PUT", "/v1/policy", {"sources": "x"})
    assert code == 400 and "sources" in body["error"]
    bad = POLICY.replace('matchPattern: "*.example.com"', 'matchPattern: "bad name"', 1)
    code, body = request_sync(
        sock, "PUT", "/v1/policy", {"sources": [["p.yaml", bad]], "endpoints": ENDPOINTS}
    )
    assert code == 422
    assert any(e.startswith("p.yaml:") and "' '" in e for e in body["errors"]), body
    assert node.digest() is None  # nothing half-applied

    agent = node.agent("--once")
    assert agent.wait(30) == 0  # type: ignore[attr-defined]
    assert node.digest() is not None
    assert node.ask("www.example.com") == (dns.rcode.NOERROR, ["192.0.2.10", "192.0.2.11"])
    assert node.ask("www.other.org")[0] == dns.rcode.REFUSED
    assert node.ask("www.example.com", source=STRANGER_IP)[0] == dns.rcode.REFUSED
    assert (node.state / "policy.json").exists()
    assert file_mode(node.state / "policy.json") == 0o600
    # A second sync is one GET: nothing to push.
    assert node.agent("--once").wait(30) == 0  # type: ignore[attr-defined]
    assert "in-sync" in node.log.read_text()


def test_agent_killed_under_load_loses_no_answer_and_new_names_are_enforced(node: Node) -> None:
    proxy = node.proxy()
    agent = node.agent()
    wait_for(node.digest, "the first push", log=node.log)
    stream = node.stream(["www.example.com", "alias.example.com", "evil.other.org"], rate=200)
    time.sleep(1.0)
    agent.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
    agent.wait()  # type: ignore[attr-defined]
    time.sleep(1.5)
    stream.stop()
    assert stream.lost() == [], stream.summary()
    assert set(stream.rcodes()) == {"NOERROR", "REFUSED"}, stream.summary()
    # A name never asked before: answered, and its new address handed to the backend.
    assert node.ask("short.example.com") == (dns.rcode.NOERROR, ["192.0.2.30"])
    learned = [c for c in node.changes() if c["ip"] == "192.0.2.30"]
    assert learned and learned[0]["change"] == "added"

    # The agent comes back with a changed policy: the same proxy process takes it.
    before = node.digest()
    changed = POLICY.replace('matchName: "example.com"', 'matchName: "short.example.com"')
    (node.root / "policy.yaml").write_text(changed)
    node.agent()
    wait_for(lambda: node.digest() not in (None, before), "the resync", log=node.log)
    st = status(node.state)
    assert st is not None and st["pid"] == proxy.pid  # type: ignore[attr-defined]
    assert st["policy"]["source"] == "agent"
    assert node.ask("example.com")[0] == dns.rcode.REFUSED  # the new policy is in force


def test_restarted_proxy_serves_from_its_state_at_once(node: Node) -> None:
    proxy = node.proxy()
    assert node.agent("--once").wait(30) == 0  # type: ignore[attr-defined]
    assert node.ask("www.example.com")[0] == dns.rcode.NOERROR
    assert stop(proxy) == 0  # type: ignore[arg-type]
    assert (node.state / "cache.snapshot").exists()

    # No agent now: the new proxy serves the saved policy from its first query.
    started = time.monotonic()
    node.proxy()
    assert node.ask("alias.example.com")[0] == dns.rcode.NOERROR
    assert node.ask("www.other.org")[0] == dns.rcode.REFUSED
    assert time.monotonic() - started < 10
    st = status(node.state)
    assert st is not None and st["policy"]["source"] == "state"
    assert ("www.example.com.", "192.0.2.10") in node.learned()


def test_corrupt_policy_state_starts_fail_closed(node: Node) -> None:
    node.state.mkdir(mode=0o700)
    (node.state / "policy.json").write_text('{"format": 1, "sources": [], "endpoints": null}')
    node.proxy()
    assert node.ask("www.example.com")[0] == dns.rcode.REFUSED
    assert "digest does not match" in node.log.read_text()


def test_state_dir_open_to_others_is_refused(node: Node, tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "notes.txt").write_text("not fqdnguard's")
    loose.chmod(0o777)
    proc = spawn(
        fqdnguard_cmd("proxy", "--state-dir", str(loose), "--listen", "127.0.0.1:1"), node.log
    )
    assert proc.wait(30) == 2
    assert "chmod go-w" in node.log.read_text() and "'notes.txt'" in node.log.read_text()
    assert file_mode(loose) == 0o777


def test_only_fqdnguards_own_directories_are_tightened(tmp_path: Path) -> None:
    """The control socket's directory: accepted when nobody else can write in it, made 0700
    when others can and it is fqdnguard's (created now, or holding only its files), refused
    otherwise; never through a symlink, never a shared (sticky) one."""
    system = tmp_path / "system"  # a hostPath such as /var/lib: 0755, accepted as it is
    system.mkdir()
    system.chmod(0o755)
    assert ensure_private_dir(system, tighten=True) == system
    assert file_mode(system) == 0o755
    link = tmp_path / "link"  # a state dir that is a symlink to a system directory
    link.symlink_to(system)
    with pytest.raises(ControlError, match="symlink"):
        ensure_private_dir(link, tighten=True)
    assert file_mode(system) == 0o755
    shared = tmp_path / "shared"  # /tmp-like
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(ControlError, match="sticky"):
        ensure_private_dir(shared, tighten=True)
    assert os.stat(shared).st_mode & 0o7777 == 0o1777
    empty = tmp_path / "empty"  # a fresh emptyDir
    empty.mkdir()
    empty.chmod(0o777)
    with pytest.raises(ControlError, match="chmod go-w"):
        ensure_private_dir(empty)  # not asked to tighten
    assert ensure_private_dir(empty, tighten=True) == empty
    assert file_mode(empty) == 0o700
    ours = tmp_path / "ours"  # holding fqdnguard's files only (a restarted container)
    ours.mkdir()
    for name in ("control.sock", "state.json", "journal.4242424.3", ".control.sock.4242424"):
        (ours / name).touch()
    ours.chmod(0o777)
    ensure_private_dir(ours, tighten=True)
    assert file_mode(ours) == 0o700
    new = tmp_path / "a" / "b"
    assert ensure_private_dir(new) == new and file_mode(new) == 0o700


@pytest.mark.parametrize("family", [4, 6])
def test_rolling_restart_of_two_proxies_loses_no_query(node: Node, family: int) -> None:
    old = node.proxy()
    assert node.agent("--once").wait(30) == 0  # type: ignore[attr-defined]
    # Several source ports, so the kernel's reuseport hash would spread them over both proxies.
    names = ["www.example.com", "alias.example.com", "evil.other.org"]
    streams = [node.stream(names, 150, family) for _ in range(4)]
    time.sleep(0.7)
    new = node.proxy()  # same port: SO_REUSEPORT on UDP and TCP; takes the control socket
    time.sleep(0.5)
    assert stop(old) == 0  # type: ignore[arg-type]
    time.sleep(0.7)
    for stream in streams:
        stream.stop()
        assert stream.lost() == [], stream.summary()
        assert len(stream.sent) > 200
    assert status(node.state)["pid"] == new.pid  # type: ignore[attr-defined,index]
    # The survivor answers over TCP too.
    host = "127.0.0.1" if family == 4 else "::1"
    source = POD_IP if family == 4 else "::1"
    answer = dns.query.tcp(
        dns.message.make_query("www.example.com", "A"),
        host,
        port=node.port,
        source=source,
        timeout=3,
    )
    assert answer.rcode() == dns.rcode.NOERROR


def test_what_the_old_proxy_learns_after_the_takeover_is_handed_to_the_new_one(node: Node) -> None:
    own = free_port("127.0.0.1")  # an address only the old proxy listens on
    old = node.proxy("--listen", f"127.0.0.1:{own}")
    assert node.agent("--once").wait(30) == 0  # type: ignore[attr-defined]
    new = node.proxy()  # takes the control socket and the shared port over
    # Learned by the old proxy after the new one started from its saved state...
    assert node.ask("short.example.com", port=own) == (dns.rcode.NOERROR, ["192.0.2.30"])
    # ... and by the new one only.
    assert node.ask("www.example.com")[0] == dns.rcode.NOERROR
    told = [c for c in node.changes() if c["ip"] == "192.0.2.30"]
    assert [c["change"] for c in told] == ["added"], "only the old proxy has it"
    assert stop(old) == 0  # type: ignore[arg-type]
    assert status(node.state)["pid"] == new.pid  # type: ignore[attr-defined,index]

    learned = node.learned()
    assert ("short.example.com.", "192.0.2.30") in learned, "the old proxy's entry was lost"
    assert ("www.example.com.", "192.0.2.10") in learned
    # The new proxy adopted it as its own learning: its backend was told too.
    wait_for(
        lambda: len([c for c in node.changes() if c["ip"] == "192.0.2.30"]) == 2,
        "the new proxy's backend to add the adopted address",
        log=node.log,
    )
    # The saved state is the new proxy's (the old one wrote no state file after the takeover).
    saved = {
        (name, ip) for _, name, ip, _ in DnsCache.load(node.state / "cache.snapshot").entries()
    }
    assert {("short.example.com.", "192.0.2.30"), ("www.example.com.", "192.0.2.10")} <= saved
    assert not list(node.state.glob("cache.handover.*"))
    log = node.log.read_text()
    assert "handed the cache over" in log and "adopted" in log


def test_an_old_proxy_stopped_before_the_new_one_is_up_waits_and_hands_over(node: Node) -> None:
    own = free_port("127.0.0.1")
    old = node.proxy("--listen", f"127.0.0.1:{own}")
    assert node.agent("--once").wait(30) == 0  # type: ignore[attr-defined]
    # A new proxy's first step, taken here so its slow start is certain: ask for the state.
    save = request_sync(node.state / "control.sock", "POST", "/v1/save", {"successor": 1})
    assert save[0] == 200
    # The old proxy learns after that save and is told to stop before the new one is up (an
    # orchestrator that does not wait for readiness): it keeps serving for its successor.
    assert node.ask("short.example.com", port=own) == (dns.rcode.NOERROR, ["192.0.2.30"])
    old.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    time.sleep(1.5)  # several times the drain's quiet period
    assert old.poll() is None, "stopped before its successor took over"  # type: ignore[attr-defined]
    assert node.ask("short.example.com", port=own)[0] == dns.rcode.NOERROR
    new = node.proxy()
    assert old.wait(20) == 0  # type: ignore[attr-defined]
    assert status(node.state)["pid"] == new.pid  # type: ignore[attr-defined,index]
    assert ("short.example.com.", "192.0.2.30") in node.learned()
    assert "handed the cache over" in node.log.read_text()


def test_a_hand_over_nobody_adopted_is_merged_at_the_next_start(node: Node) -> None:
    first = node.proxy()
    assert node.agent("--once").wait(30) == 0  # type: ignore[attr-defined]
    assert node.ask("www.example.com")[0] == dns.rcode.NOERROR
    digest = node.digest()
    endpoint = next(e["endpoint"] for e in node.cache() if e["name"] == "www.example.com.")
    assert stop(first) == 0  # type: ignore[arg-type]
    # What an old proxy left when the one that took over died before adopting it, and one
    # saved under another policy state (its endpoint numbers may mean other pods).
    assert digest is not None
    for tag, ip in ((digest[:16], "192.0.2.30"), ("0" * 16, "192.0.2.99")):
        left = DnsCache()
        left.record(endpoint, "short.example.com", [(ip, 300)])
        left.save(node.state / f"cache.handover.4242.{tag}")

    node.proxy()
    learned = node.learned()
    assert {("short.example.com.", "192.0.2.30"), ("www.example.com.", "192.0.2.10")} <= learned
    assert ("short.example.com.", "192.0.2.99") not in learned
    assert [p.name for p in node.state.glob("cache.handover.*")] == [
        "cache.handover.4242." + "0" * 16
    ]
    assert "not a hand-over under this policy state" in node.log.read_text()


# -- the hand-over's own routes ---------------------------------------------------------------

#: A starting proxy's first steps, done by hand with raw sockets: ask for the state as a
#: successor, take the sockets with the nonce (the connection left open: the liveness link),
#: take the control socket over, say so, and wait to be killed.
FAKE_SUCCESSOR = r"""
import json, os, socket, sys, time
from fqdnguard.control import request_sync
state, port, instance = sys.argv[1], int(sys.argv[2]), 4242424
code, body = request_sync(f"{state}/control.sock", "POST", "/v1/save", {"successor": instance})
assert code == 200, body
ask = json.dumps({"want": [["udp", "127.0.0.1", port], ["tcp", "127.0.0.1", port]],
                  "handover": body.get("handover"), "instance": instance}).encode()
link = socket.socket(socket.AF_UNIX)
link.connect(f"{state}/control.sock")
link.sendall(b"POST /v1/sockets HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n%s" % (len(ask), ask))
data, fds, _, _ = socket.recv_fds(link, 65536, 16)
assert b" 200 " in data.split(b"\r\n")[0] and len(fds) == 2, (data, fds)
mine = socket.socket(socket.AF_UNIX)
mine.bind(f"{state}/.taken")
mine.listen()
os.replace(f"{state}/.taken", f"{state}/control.sock")
print("took", flush=True)
time.sleep(3600)
"""


def test_a_successor_killed_after_taking_the_sockets_leaves_the_old_one_serving(node: Node) -> None:
    old = node.proxy()
    assert node.agent("--once").wait(30) == 0  # type: ignore[attr-defined]
    assert node.ask("www.example.com")[0] == dns.rcode.NOERROR
    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE_SUCCESSOR, str(node.state), str(node.port)],
        stdout=subprocess.PIPE,
    )
    try:
        assert fake.stdout is not None and fake.stdout.readline() == b"took\n"
    finally:
        fake.kill()  # kill -9, right after it took the sockets and the control socket
        fake.wait()
        if fake.stdout is not None:
            fake.stdout.close()
    # The old proxy reads its sockets again (nothing is lost to a queue nobody reads),
    # filtering as before, and takes the control socket back.
    wait_for(lambda: (status(node.state) or {}).get("pid") == old.pid, "the control socket back")  # type: ignore[attr-defined]
    stream = node.stream(["www.example.com", "evil.other.org"], rate=100)
    time.sleep(1.5)
    stream.stop()
    assert stream.lost() == [], stream.summary()
    assert set(stream.rcodes()) == {"NOERROR", "REFUSED"}, stream.summary()
    assert "did not come to serve" in node.log.read_text()
    # A real successor then takes over as usual.
    new = node.proxy()
    assert stop(old) == 0  # type: ignore[arg-type]
    assert status(node.state)["pid"] == new.pid  # type: ignore[attr-defined,index]
    assert node.ask("www.example.com")[0] == dns.rcode.NOERROR


def test_sockets_go_only_to_the_successor_that_asked_for_the_state_and_once(node: Node) -> None:
    private = node.root / "pod" / "control.sock"
    node.proxy("--control-socket", str(private))
    # The pod-private socket serves reading and pushing, never the hand-over.
    assert request_sync(private, "GET", "/v1/status")[0] == 200
    for method, url, body in (
        ("POST", "/v1/sockets", {"want": []}),
        ("POST", "/v1/save", {"successor": 7}),
        ("POST", "/v1/adopt", {"file": "cache.handover.7.none"}),
    ):
        assert request_sync(private, method, url, body)[0] == 404, url
    main = node.state / "control.sock"
    want = [["udp", "127.0.0.1", node.port], ["tcp", "127.0.0.1", node.port]]
    got = request_fds(main, "POST", "/v1/sockets", {"want": want})
    assert (got.status, got.fds) == (403, []), got.body  # nobody asked for the state first
    code, body = request_sync(main, "POST", "/v1/save", {"successor": 4242424})
    assert code == 200 and isinstance(body["handover"], str), body
    ask = {"want": want, "handover": body["handover"], "instance": 4242424}
    # Another process with the nonce, and this one with a wrong one: refused.
    other = subprocess.run(
        [sys.executable, "-c", "import json, sys; from fqdnguard.control import request_fds; "
         f"print(request_fds(sys.argv[1], 'POST', '/v1/sockets', {ask!r}).status)", str(main)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert other.stdout.strip() == "403", other
    assert request_fds(main, "POST", "/v1/sockets", {**ask, "handover": "x"}).status == 403
    got = request_fds(main, "POST", "/v1/sockets", ask, link=True)
    try:
        assert got.status == 200 and len(got.fds) == 2, got.body
        kinds = set()
        for fd in got.fds:
            with socket.socket(fileno=os.dup(fd)) as s:
                assert s.getsockname() == ("127.0.0.1", node.port)
                kinds.add(s.type)
        assert kinds == {socket.SOCK_DGRAM, socket.SOCK_STREAM}
        again = request_fds(main, "POST", "/v1/sockets", ask)  # once
        assert again.status == 403 and again.fds == [], again.body
    finally:
        for fd in got.fds:
            os.close(fd)
        assert got.link is not None
        got.link.close()  # the link ends before "serving": the proxy keeps its sockets
    assert node.ask("www.example.com")[0] == dns.rcode.REFUSED  # still served (no policy yet)


def test_a_superseded_proxy_refuses_pushes(node: Node) -> None:
    private = node.root / "old" / "control.sock"
    node.proxy("--control-socket", str(private))
    assert node.agent("--once").wait(30) == 0  # type: ignore[attr-defined]
    before = node.digest()
    node.proxy()  # takes the sockets and the control socket over
    # The old pod's agent still pushes to the old proxy: the node's tables are the new one's.
    changed = POLICY.replace('matchName: "example.com"', 'matchName: "short.example.com"')
    code, body = request_sync(
        private, "PUT", "/v1/policy", {"sources": [["p.yaml", changed]], "endpoints": ENDPOINTS}
    )
    assert code == 409 and body.get("superseded") is True, body
    code, body = request_sync(
        private, "POST", "/v1/objects",
        {"protocol": 1, "node": "n", "session": "s", "seq": 1, "reset": True, "changes": []},
    )  # fmt: skip
    assert code == 409 and body.get("superseded") is True, body
    code, st = request_sync(private, "GET", "/v1/status")
    assert code == 200 and st["policy"]["digest"] == before
