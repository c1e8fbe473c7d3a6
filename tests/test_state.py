"""The state directory's format: its manifest (version, sequence), the compatibility rule between
releases, the refusal of a stale writer, and the journal that keeps what was learned between
saves through a ``kill -9``. Real ``fqdnguard proxy`` processes against a real Knot upstream on
loopback (the ``log`` backend; the nftables side is in test_e2e_split_netns.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import dns.rcode
import pytest
from fqdnguard._core import DnsCache
from fqdnguard.control import request_sync
from fqdnguard.daemons.proxy import _PolicyState
from fqdnguard.endpoints import Endpoints
from fqdnguard.state import (
    FORMAT,
    MANIFEST,
    Journal,
    StaleWriter,
    StateDir,
    journal_files,
    read_manifest,
)

from tests import test_split
from tests.proxy_fixtures import ENDPOINTS, POD_IP, POLICY
from tests.split_helpers import fqdnguard_cmd, status, stop, wait_for
from tests.test_split import Node

#: The split tests' fixture: a state dir, a port, and the processes started on them.
node = test_split.node


def pod_endpoint() -> int:
    ep = Endpoints.from_yaml(ENDPOINTS).by_ip(POD_IP)
    assert ep is not None
    return int(ep.id)


def write_format0_state(state: Path) -> None:
    """A state directory as fqdnguard wrote it before manifests: a snapshot and a policy."""
    state.mkdir(mode=0o700)
    cache = DnsCache()
    cache.record(pod_endpoint(), "www.example.com", [("192.0.2.10", 300)])
    cache.save(state / "cache.snapshot")
    saved = _PolicyState([("policy.yaml", POLICY)], ENDPOINTS, "agent", time.time())
    (state / "policy.json").write_bytes(saved.to_json())


def manifest(state: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((state / MANIFEST).read_text())
    return data


def cache_list(state: Path) -> set[tuple[str, str]]:
    """(name, ip) pairs ``fqdnguard cache list --json`` prints for the state dir."""
    out = subprocess.run(
        fqdnguard_cmd("cache", "list", "--json", "--state-dir", str(state)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {(e["name"], e["ip"]) for e in map(json.loads, out.splitlines())}  # NDJSON


# -- versions ------------------------------------------------------------------------------------


def test_a_state_dir_from_before_manifests_is_read_and_gets_one(node: Node) -> None:
    write_format0_state(node.state)
    node.proxy()
    st = status(node.state)
    assert st is not None and st["policy"]["source"] == "state"
    assert ("www.example.com.", "192.0.2.10") in node.learned()
    assert node.ask("alias.example.com")[0] == dns.rcode.NOERROR
    assert st["state"]["found"] == [0, 0]
    m = manifest(node.state)
    assert m["format"] == "fqdnguard-state" and m["version"] == list(FORMAT)
    assert m["sequence"] == 1  # the start claimed the directory


def test_a_newer_minor_is_read(node: Node) -> None:
    write_format0_state(node.state)
    newer = {"format": "fqdnguard-state", "version": [FORMAT[0], FORMAT[1] + 3], "sequence": 7}
    (node.state / MANIFEST).write_text(json.dumps({**newer, "pod_uids": "a later release's"}))
    node.proxy()
    assert (status(node.state) or {})["policy"]["source"] == "state"
    assert ("www.example.com.", "192.0.2.10") in node.learned()
    assert manifest(node.state)["sequence"] == 8


def test_a_newer_major_is_refused_fail_closed_and_left_as_it_is(node: Node) -> None:
    write_format0_state(node.state)
    (node.state / MANIFEST).write_text(
        json.dumps({"format": "fqdnguard-state", "version": [FORMAT[0] + 1, 0], "sequence": 41})
    )
    before = {p.name: p.read_bytes() for p in node.state.iterdir()}
    proxy = node.proxy()
    # Nothing of it was read: no policy (every query refused), nothing learned.
    assert node.ask("www.example.com")[0] == dns.rcode.REFUSED
    st = status(node.state)
    assert st is not None and st["policy"]["source"] == "none" and st["cache"]["entries"] == 0
    assert st["state"]["writable"] is False
    assert "written by a newer fqdnguard" in node.log.read_text()
    # An agent's push puts a policy in force; it is not saved over the newer state.
    assert node.agent("--once").wait(30) == 0  # type: ignore[attr-defined]
    assert node.ask("www.example.com")[0] == dns.rcode.NOERROR
    code, body = request_sync(node.state / "control.sock", "POST", "/v1/save")
    assert code == 409 and "newer state format" in body["error"]
    assert stop(proxy) == 0  # type: ignore[arg-type]
    after = {p.name: p.read_bytes() for p in node.state.iterdir() if p.name != "state.lock"}
    assert after == before


def test_an_unreadable_manifest_starts_fail_closed(node: Node) -> None:
    write_format0_state(node.state)
    (node.state / MANIFEST).write_text('{"format": "fqdnguard-state", "version": "1.0"}')
    node.proxy()
    assert node.ask("www.example.com")[0] == dns.rcode.REFUSED
    assert "'version' must be [major, minor]" in node.log.read_text()


# -- sequence numbers ----------------------------------------------------------------------------


def test_sequence_numbers_increase_and_a_stale_writers_save_is_refused(tmp_path: Path) -> None:
    a = StateDir(tmp_path)
    assert a.open()
    assert a.claim() == 1
    assert a.commit(lambda: None) == 2
    assert a.commit(lambda: None) == 3
    b = StateDir(tmp_path)  # a newer process takes the directory over
    assert b.open() and b.sequence == 3
    assert b.claim() == 4
    written: list[str] = []
    with pytest.raises(StaleWriter, match="sequence 4 after this one's 3"):
        a.commit(lambda: written.append("a"))
    assert written == []  # refused before writing anything
    assert b.commit(lambda: written.append("b")) == 5
    assert written == ["b"]
    m = read_manifest(tmp_path)
    assert m is not None and m.sequence == 5 and m.writer is not None


def test_a_running_proxy_refuses_to_save_once_another_process_claimed_its_state(
    node: Node,
) -> None:
    node.proxy()
    assert node.agent("--once").wait(30) == 0  # type: ignore[attr-defined]
    first = (status(node.state) or {})["state"]["sequence"]
    sock = node.state / "control.sock"
    assert request_sync(sock, "POST", "/v1/save") == (200, {"sequence": first + 1})
    assert request_sync(sock, "POST", "/v1/save") == (200, {"sequence": first + 2})
    snapshot = (node.state / "cache.snapshot").read_bytes()
    other = StateDir(node.state)  # a newer writer (what a proxy taking over does at start)
    assert other.open()
    other.claim()
    code, body = request_sync(sock, "POST", "/v1/save")
    assert code == 409 and "another process wrote state sequence" in body["error"], body
    assert (node.state / "cache.snapshot").read_bytes() == snapshot


# -- the journal ---------------------------------------------------------------------------------


def pairs(entries: list[dict[str, object]]) -> set[tuple[object, object]]:
    return {(e["endpoint"], e["ip"]) for e in entries}


def test_kill_9_loses_nothing_learned_since_the_last_save(node: Node) -> None:
    proxy = node.proxy()  # the default save interval (60 s): no save happens before the kill
    assert node.agent("--once").wait(30) == 0  # type: ignore[attr-defined]
    for name in ("www.example.com", "short.example.com", "chain1.example.com"):
        assert node.ask(name)[0] == dns.rcode.NOERROR
    before = node.cache()
    # Each allowed (endpoint, ip) pair, under the name whose answer first allowed it.
    first = {("www.example.com.", "192.0.2.10"), ("short.example.com.", "192.0.2.30")}
    assert first <= node.learned()
    proxy.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
    proxy.wait()  # type: ignore[attr-defined]
    # What a crashed proxy left, as `cache list` reads it without one running ...
    assert first <= cache_list(node.state)
    # ... and what the next one starts from: every pair, with the name that allowed it.
    node.proxy()
    assert pairs(before) <= pairs(node.cache())
    assert first <= node.learned()
    assert "replayed" in node.log.read_text()


def test_a_save_covers_the_journal_and_removes_it(node: Node) -> None:
    node.proxy()
    assert node.agent("--once").wait(30) == 0  # type: ignore[attr-defined]
    assert node.ask("www.example.com")[0] == dns.rcode.NOERROR
    journals = [p for p, _ in journal_files(node.state)]
    assert len(journals) == 1
    wait_for(lambda: journals[0].read_text().count("\n") >= 3, "the journal entries")
    assert request_sync(node.state / "control.sock", "POST", "/v1/save")[0] == 200
    after = [p for p, _ in journal_files(node.state)]
    assert len(after) == 1 and after != journals  # a fresh journal, the covered one removed
    assert after[0].read_text().count("\n") == 1  # its header only


def test_journal_replay_skips_damage_and_other_policy_states(tmp_path: Path) -> None:
    now = time.time()
    good = Journal(tmp_path, "d1")
    good.append([(3, "a.example.com.", "192.0.2.1", now + 100)])
    with open(good.path, "a") as f:
        f.write('[3, "b.example.com.", "192.0.2.2"]\n[3, "b.example.c')  # damaged, torn
    good.close()
    other = Journal(tmp_path, "d2")  # this process's next file, under another policy state
    other.append([(3, "c.example.com.", "192.0.2.3", now + 100)])
    other.close()
    (tmp_path / "journal.1.1").write_text("not a journal\n")
    cache = DnsCache()
    state = StateDir(tmp_path)
    assert state.open()
    assert state.replay(cache, "d1", now) == 1
    assert [(n, ip) for _, n, ip, _ in cache.entries()] == [("a.example.com.", "192.0.2.1")]


def test_journals_are_named_by_instance_and_a_live_writer_is_told_by_its_lock(
    tmp_path: Path,
) -> None:
    """Two proxies that are both pid 1 (containers) share the directory: a journal carries
    the writer's instance id, not its pid, and another process sees it live while its writer
    holds it (so a save never removes it), dead once closed, and reads a header with the
    added field as before (what the previous release's reader does with it)."""
    import fcntl  # noqa: PLC0415
    import os  # noqa: PLC0415

    from fqdnguard.control import INSTANCE  # noqa: PLC0415
    from fqdnguard.state import PID_MAX, Journal, _alive, journal_files, read_journal  # noqa: PLC0415

    journal = Journal(tmp_path, "digest")
    journal.append([(1, "a.example.com.", "192.0.2.1", time.time() + 60)])
    ((path, writer),) = journal_files(tmp_path)
    assert writer == INSTANCE != os.getpid() and writer > PID_MAX
    header, entries = read_journal(path)
    assert header["instance"] == INSTANCE and header["digest"] == "digest"
    assert [e[1] for e in entries] == ["a.example.com."]
    # Another process's view: the writer holds the lock.
    other = tmp_path / f"journal.{INSTANCE + 1}.1"
    other.write_text(json.dumps({"journal": 1, "pid": 1, "digest": "digest"}) + "\n")
    fd = os.open(other, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    assert _alive(other, INSTANCE + 1), "a journal whose writer runs is live"
    os.close(fd)
    assert not _alive(other, INSTANCE + 1), "a journal nobody holds is a dead writer's"
    journal.close()


def test_a_journal_is_locked_while_its_writer_runs_as_another_process_sees_it(
    tmp_path: Path,
) -> None:
    """Asked from another process (another instance id), the live writer's journal is held,
    after a rotation too; once closed it is a dead writer's."""
    from fqdnguard.state import Journal, journal_files  # noqa: PLC0415

    def alive_elsewhere(path: Path, writer: int) -> bool:
        code = "import sys; from pathlib import Path; from fqdnguard.state import _alive; "
        code += "print(_alive(Path(sys.argv[1]), int(sys.argv[2])))"
        out = subprocess.run(
            [sys.executable, "-c", code, str(path), str(writer)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout.strip() == "True"

    journal = Journal(tmp_path, "digest")
    ((path, writer),) = journal_files(tmp_path)
    assert alive_elsewhere(path, writer)
    journal.rotate()
    assert alive_elsewhere(journal.path, writer)
    journal.close()
    assert not alive_elsewhere(journal.path, writer)


def test_a_journal_is_locked_before_it_has_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between creating a journal and locking it, another process would see it unlocked (a
    dead writer's) and remove it at its next save: the lock comes first, the name after."""
    import fcntl  # noqa: PLC0415

    from fqdnguard import state  # noqa: PLC0415

    named_at_lock: list[list[str]] = []
    real_flock = fcntl.flock

    def flock(fd: int, op: int) -> None:  # the real flock; records what is named then
        named_at_lock.append([p.name for p, _ in state.journal_files(tmp_path)])
        real_flock(fd, op)

    monkeypatch.setattr(state.fcntl, "flock", flock)
    journal = state.Journal(tmp_path, "digest")
    journal.rotate()
    journal.close()
    assert len(named_at_lock) == 2
    assert named_at_lock[0] == [], "the journal had its name before it was locked"
    assert named_at_lock[1] == [journal_files_name(tmp_path, 1)]


def journal_files_name(directory: Path, n: int) -> str:
    from fqdnguard.control import INSTANCE  # noqa: PLC0415

    return f"journal.{INSTANCE}.{n}"
