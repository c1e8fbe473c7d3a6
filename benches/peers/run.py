"""fqdnguard beside the DNS proxies that filter: same rules, same Knot upstream, same load.

Peers (each given the same allow rules for the same endpoints; a denied name gets its refusal):
  fqdnguard      `fqdnguard run`, log backend
  fqdnguard-nft  the same with the nftables backend, in a network namespace of its own (root)
  dnsdist        Debian's dnsdist: per-source rules (NetmaskGroupRule) with a DNSNameSet for
                 the exact names and a SuffixMatchNode for the subdomain rules, REFUSED
                 otherwise, no packet cache
  knot-resolver  Debian's kresd: the view module per source with policy.domains / policy.suffix
                 (PASS), REFUSE otherwise, forwarding to the same Knot with NO_CACHE
  blocky         Blocky (tools/gobuild.py), one client group per endpoint with an allowlist
                 (allowlist-only groups deny the rest), caching off; its deny answer (NXDOMAIN,
                 blockType nxDomain) counts as its refusal
  cilium-sdp     Cilium's standalone DNS proxy (cilium v1.19.0, tools/gobuild.py; optional, so
                 only when built, and not in --quick unless named), fed its rules over the
                 FQDNData gRPC stream by our agent end (tools/peers/cilium-sdp-agent): each
                 endpoint its ID, identity, address and DNS patterns, Knot's address an identity
                 of its own. A transparent proxy: the load asks Knot's address, and TPROXY rules
                 (nftables, root) steer the endpoints' queries to the proxy's port, which
                 forwards them to Knot; REFUSED otherwise. Its agent (same CPU as the proxy)
                 receives a mapping after every lookup, its CPU is reported beside the proxy's

Workloads:
  (b) 1,000 endpoints (127.1.0.1 ...), each with its own 10 rules drawn from a pool of 10k, so
      10k distinct rules in all (what --quick runs, shorter).
  (a) 10 endpoints sharing one rule set of 100, 10k or 100k rules (--workloads a100,a10k,a100k).
The rules are matchName `nJ.pool.example.com` and matchPattern `**.dJ.example.com`, half each:
the subset every peer can express. A suffix rule also admits its apex (dJ.example.com), which
`**.` does not: no query asks for an apex. `*.x` (one label) and `*` inside a label have no
suffix form, so they are left out of the comparison.

The load: LOAD_SOURCES dnsperf processes, each bound to the source address of another endpoint
(spread over the list, so that the peers that scan rules per source scan the average), on CPU 0;
their CPU per query is measured too (getrusage), to show that the load is not the bottleneck.
Every peer (all its threads) and Knot run on CPU 1. Before timing, every peer's verdicts are
checked on allowed and denied names of several endpoints (denied: another endpoint's names,
names nobody allows), so that none is fast because it is wrong.

Figures per peer and workload, in one run: maximum qps (median of --repeat runs) and its ratio to
fqdnguard; the queries lost per million (dnsperf's "Queries lost": a lost query holds one of
dnsperf's outstanding slots for its 2 s timeout, so at 512 outstanding a few hundred lost queries
cut the maximum of any peer, and dnsperf's run time includes that wait) beside the host's UDP
receive-buffer drops in the same runs; CPU microseconds per query of the peer (from /proc/PID/stat,
all threads) and of the load generators; p50/p99 at a fixed rate every peer sustains; RSS; and (full
runs, workload (b)) RSS every 5 s over 60 s of unique allowed names (a wildcard zone, TTL 5 s) at a
fixed rate, with how many names the peer learned (fqdnguard: its cache, from its metrics; the others
keep no cache). Each peer's busiest threads (from /proc/PID/task) say what limits it.

Usage: python benches/peers/run.py [--quick] [--json FILE] [--workloads b,a100,...]
                                   [--peers NAMES] [--seconds S] [--repeat N] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT))

import dns.message  # noqa: E402
import dns.rcode  # noqa: E402
from fqdnguard.testing import KnotServer, free_port  # noqa: E402

from tools import gobuild  # noqa: E402

UPSTREAM = "127.0.0.53"
LISTEN = "127.0.0.1"
LOAD_CPU, SERVER_CPU = "0", "1"
LOAD_SOURCES = 4
ZONE_TTL = 5
# Latency percentiles leave out each dnsperf run's first SETTLE_S seconds (its start-up burst;
# benches/proxy/run.py says why).
SETTLE_S = 0.5
UNIQUE_SECONDS, UNIQUE_RATE = 60, 2000
SDP_PROXY, SDP_AGENT = "cilium-standalone-dns-proxy", "cilium-sdp-agent"
SDP_NOT_BUILT = (
    "not built: Cilium's standalone DNS proxy is an optional Go program (about 10 minutes and 6 "
    "CPU-minutes cold on 2 busy cores): python3 tools/gobuild.py build "
    f"{SDP_PROXY} {SDP_AGENT}"
)
# Identities the agent gives: endpoint i has SDP_IDENTITY + i, Knot SDP_SERVER_IDENTITY (both
# in the cluster range, below 65,536).
SDP_IDENTITY, SDP_SERVER_IDENTITY = 1000, 60000
# The proxy marks its own upstream sockets with Cilium's egress magic mark (0x0B00 under mask
# 0x0F00): never steered again.
SDP_MARK, SDP_MARK_MASK = 0x0B00, 0x0F00
SDP_TABLE = "fqdnguard_bench_sdp"


# --- rules, endpoints, names -----------------------------------------------------------------


def rule(j: int) -> tuple[str, str]:
    """Rule j of the pool: ("name", text) or ("suffix", zone) for matchPattern `**.zone`."""
    return ("name", f"n{j}.pool.example.com") if j % 2 == 0 else ("suffix", f"d{j}.example.com")


def allowed_names(j: int) -> list[str]:
    kind, text = rule(j)
    return [text] if kind == "name" else [f"a.{text}", f"x-{j}.y.{text}"]


@dataclass
class Workload:
    name: str
    #: endpoint index -> its rule numbers
    rules: list[list[int]]
    #: the unique-name rule `**.uniq.example.com` is given to endpoint 0 as well
    unique: bool = False

    @property
    def endpoints(self) -> int:
        return len(self.rules)

    def pool(self) -> list[int]:
        return sorted({j for r in self.rules for j in r})


def endpoint_ip(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


def workload(name: str) -> Workload:
    if name == "b":
        perm = list(range(10_000))
        random.Random(18).shuffle(perm)
        return Workload("b", [perm[10 * i : 10 * i + 10] for i in range(1000)], unique=True)
    sizes = {"a100": 100, "a10k": 10_000, "a100k": 100_000}
    if name not in sizes:
        raise SystemExit(f"unknown workload {name!r}: choose b, {', '.join(sizes)}")
    shared = list(range(sizes[name]))
    return Workload(name, [shared] * 10)


def load_endpoints(w: Workload) -> list[int]:
    """The endpoints the load comes from: spread evenly over the list."""
    n = w.endpoints
    return sorted({round(k * (n - 1) / max(1, LOAD_SOURCES - 1)) for k in range(LOAD_SOURCES)})


def rules_of(w: Workload, i: int) -> list[tuple[str, str]]:
    out = [rule(j) for j in w.rules[i]]
    if w.unique and i == 0:
        out.append(("suffix", "uniq.example.com"))
    return out


def denied_names(w: Workload, i: int) -> list[str]:
    """Names endpoint i may not ask: names nobody allows, and other endpoints' names."""
    mine = set(w.rules[i])
    others = [j for j in (w.rules[(i + 1) % w.endpoints][:3]) if j not in mine]
    out = [f"evil{i}.example.com", f"n{i}.evil.example.com"]
    for j in others:
        out += allowed_names(j)[:1]
    return out


# --- the peers' configurations ---------------------------------------------------------------


@dataclass
class Peer:
    name: str
    cmd: list[str]
    port: int
    #: is this answer the peer's refusal?
    refused: Callable[[dns.message.Message], bool]
    version: str
    netns: str | None = None
    metrics: str | None = None
    #: the metric that counts the names the peer learned (at `metrics`)
    learned_metric: str = "fqdnguard_cache_names"
    env: dict[str, str] = field(default_factory=dict)
    #: run after the peer stopped (and before it starts)
    cleanup: list[list[str]] = field(default_factory=list)
    #: run before the peer starts (after cleanup)
    setup: list[list[str]] = field(default_factory=list)
    #: where the load sends: the peer's address, or the upstream's for a transparent proxy
    addr: str = LISTEN
    #: a process the peer needs, started before it, on its CPU (Cilium's agent end)
    helper: list[str] | None = None
    helper_pid: int | None = None


def is_refused(m: dns.message.Message) -> bool:
    return m.rcode() == dns.rcode.REFUSED


def fqdnguard_peer(w: Workload, d: Path, up: str, name: str = "fqdnguard") -> Peer:
    pol = d / "fqdnguard-policies"
    pol.mkdir(exist_ok=True)
    docs = []
    for i in range(w.endpoints):
        if i > 0 and w.rules[i] is w.rules[0]:
            continue  # (a): one shared rule set selects every endpoint (label set below)
        sel = "{set: shared}" if w.rules[i] is w.rules[-1] and w.name != "b" else f"{{ep: e{i}}}"
        dns_rules = "\n".join(
            f'              - matchName: "{t}"'
            if k == "name"
            else f'              - matchPattern: "**.{t}"'
            for k, t in rules_of(w, i)
        )
        docs.append(
            f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: e{i}, namespace: bench}}
spec:
  endpointSelector: {{matchLabels: {sel}}}
  egress:
    - toCIDR: [{UPSTREAM}/32]
      toPorts:
        - ports: [{{port: "53", protocol: ANY}}]
          rules:
            dns:
{dns_rules}
"""
        )
    (pol / "rules.yaml").write_text("---\n".join(docs))
    eps = ["endpoints:"]
    for i in range(w.endpoints):
        labels = f"{{ep: e{i}, set: shared}}"
        eps.append(
            f"  - {{name: e{i}, namespace: bench, ips: [{endpoint_ip(i)}], labels: {labels}}}"
        )
    (d / "endpoints.yaml").write_text("\n".join(eps) + "\n")
    port = free_port()
    metrics_port = free_port()
    from fqdnguard import __version__  # noqa: PLC0415

    return Peer(
        name,
        [
            sys.executable,
            "-m",
            "fqdnguard.cli",
            "run",
            "--policy",
            str(pol),
            "--endpoints",
            str(d / "endpoints.yaml"),
            "--upstream",
            up,
            "--listen",
            f"{LISTEN}:{port}",
            "--backend",
            "log",
            "--log-queries",
            "none",
            "--log-level",
            "warning",
            "--metrics",
            f"127.0.0.1:{metrics_port}",
        ],
        port,
        is_refused,
        f"fqdnguard {__version__}",
        metrics=f"http://127.0.0.1:{metrics_port}/metrics",
        env={"PYTHONPATH": str(ROOT / "python")},
    )


def lua_chunks(statements: list[str], size: int = 10_000) -> list[str]:
    """The statements in functions of at most `size` each: a Lua function holds at most 65,536
    constants (the configurations of dnsdist and kresd for 100k rules failed to load)."""
    out = []
    for k in range(0, len(statements), size):
        out += ["do local f = function()", *statements[k : k + size], "end f() end"]
    return out


def dnsdist_peer(w: Workload, d: Path, up: str) -> Peer:
    port = free_port()
    lines = [
        f'setLocal("{LISTEN}:{port}")',
        f'newServer({{address="{up}"}})',
        'setSecurityPollSuffix("")',
        "setMaxUDPOutstanding(65535)",
    ]
    groups: dict[int, list[int]] = {}
    for i in range(w.endpoints):
        groups.setdefault(id(w.rules[i]), []).append(i)
    for members in groups.values():
        names = [t for k, t in rules_of(w, members[0]) if k == "name"]
        zones = [t for k, t in rules_of(w, members[0]) if k == "suffix"]
        lines.append("do")
        lines.append("local g = newNMG()")
        lines += [f'g:addMask("{endpoint_ip(i)}/32")' for i in members]
        lines.append("local n = newDNSNameSet()")
        lines += lua_chunks([f'n:add(newDNSName("{t}"))' for t in names])
        lines.append("local s = newSuffixMatchNode()")
        lines += lua_chunks([f's:add("{t}")' for t in zones])
        lines.append(
            "addAction(AndRule({NetmaskGroupRule(g), "
            "OrRule({QNameSetRule(n), SuffixMatchNodeRule(s, true)})}), AllowAction())"
        )
        lines.append("end")
    lines.append("addAction(AllRule(), RCodeAction(DNSRCode.REFUSED))")
    conf = d / "dnsdist.conf"
    conf.write_text("\n".join(lines) + "\n")
    version = subprocess.run(
        ["dnsdist", "--version"], capture_output=True, text=True, check=False
    ).stdout
    return Peer(
        "dnsdist",
        ["dnsdist", "--supervised", "--disable-syslog", "-C", str(conf)],
        port,
        is_refused,
        version.splitlines()[0] if version else "dnsdist",
    )


def kresd_peer(w: Workload, d: Path, up: str) -> Peer:
    port = free_port()
    host, up_port = up.rsplit(":", 1)
    lines = [
        f"net.listen('{LISTEN}', {port}, {{kind = 'dns'}})",
        "modules.load('view')",
        "policy.add(policy.all(policy.FLAGS({'NO_CACHE'})))",
        # STUB, not FORWARD: Knot is authoritative and signs nothing, and FORWARD validates
        # DNSSEC (every answer would be SERVFAIL).
        f"policy.add(policy.all(policy.STUB('{host}@{up_port}')))",
    ]
    for i in range(w.endpoints):
        if i > 0 and w.rules[i] is w.rules[0] and w.name != "b":
            subnet = None  # (a): one rule set for every endpoint, below
        else:
            subnet = f"{endpoint_ip(i)}/32"
        if subnet is None:
            continue
        names = [t for k, t in rules_of(w, i) if k == "name"]
        zones = [t for k, t in rules_of(w, i) if k == "suffix"]
        subnets = (
            [subnet] if w.name == "b" else [f"{endpoint_ip(k)}/32" for k in range(w.endpoints)]
        )
        lines.append("do")
        lines.append("local n, s = {}, {}")
        lines += lua_chunks([f"table.insert(n, todname('{t}'))" for t in names])
        lines += lua_chunks([f"table.insert(s, todname('{t}'))" for t in zones])
        for net in subnets:
            if names:
                lines.append(f"view:addr('{net}', policy.domains(policy.PASS, n))")
            if zones:
                lines.append(f"view:addr('{net}', policy.suffix(policy.PASS, s))")
        lines.append("end")
    lines.append("view:addr('0.0.0.0/0', policy.all(policy.REFUSE))")
    conf = d / "kresd.conf"
    conf.write_text("\n".join(lines) + "\n")
    rundir = d / "kresd-run"
    rundir.mkdir(exist_ok=True)
    version = subprocess.run(
        ["kresd", "--version"], capture_output=True, text=True, check=False
    ).stdout
    return Peer(
        "knot-resolver",
        ["kresd", "-n", "-q", "-c", str(conf), str(rundir)],
        port,
        is_refused,
        version.strip() or "kresd",
    )


def blocky_peer(w: Workload, d: Path, up: str, binary: Path) -> Peer:
    port = free_port()
    allow, clients = [], []
    for i in range(w.endpoints):
        if i == 0 or w.name == "b":
            entries = [
                f"        {t}" if k == "name" else f"        *.{t}" for k, t in rules_of(w, i)
            ]
            allow.append(f"    g{i}:\n      - |\n" + "\n".join(entries))
        group = f"g{i}" if w.name == "b" else "g0"
        clients.append(f"    {endpoint_ip(i)}: [{group}]")
    conf = d / "blocky.yml"
    conf.write_text(
        f"""upstreams:
  groups:
    default: [{up}]
  init:
    strategy: fast
caching:
  maxTime: -1
  prefetching: false
blocking:
  blockType: nxDomain
  loading:
    # Serve only once the lists are loaded: with "fast" the first seconds deny everything.
    strategy: blocking
  allowlists:
{chr(10).join(allow)}
  clientGroupsBlock:
    default: [deny-everything]
{chr(10).join(clients)}
  denylists:
    deny-everything:
      - |
        /.*/
ports:
  dns: {LISTEN}:{port}
log:
  level: warn
queryLog:
  type: none
"""
    )
    version = subprocess.run(
        [str(binary), "version"], capture_output=True, text=True, check=False
    ).stdout
    ver = next((ln.split(":", 1)[1].strip() for ln in version.splitlines() if "Version" in ln), "")
    return Peer(
        "blocky",
        [str(binary), "--config", str(conf)],
        port,
        lambda m: m.rcode() == dns.rcode.NXDOMAIN,
        f"blocky {ver or 'v0.26.2'}",
    )


def cilium_sdp_peer(w: Workload, d: Path, up: str, proxy: Path, agent: Path) -> Peer:
    """Cilium's standalone DNS proxy behind TPROXY, with our agent end serving its rules."""
    host, up_port = up.rsplit(":", 1)
    endpoints = []
    for i in range(w.endpoints):
        patterns = [t if k == "name" else f"**.{t}" for k, t in rules_of(w, i)]
        endpoints.append(
            {
                "id": i + 1,
                "identity": SDP_IDENTITY + i,
                "ips": [endpoint_ip(i)],
                "patterns": patterns,
            }
        )
    server = {
        "identity": SDP_SERVER_IDENTITY,
        "prefixes": [f"{host}/32"],
        "port": int(up_port),
        "proto": socket.IPPROTO_UDP,
    }
    rules = d / "cilium-sdp-rules.json"
    rules.write_text(json.dumps({"endpoints": endpoints, "servers": [server]}))
    agent_port, proxy_port, metrics_port = free_port(), free_port(), free_port()
    # Its options (Cilium's option names), one file each: the L7 proxy on, IPv4 only, a fixed
    # transparent port, and REFUSED for a denied name (Cilium's default, said here).
    conf = d / "cilium-sdp-config"
    conf.mkdir(exist_ok=True)
    options = {
        "enable-l7-proxy": "true",
        "enable-standalone-dns-proxy": "true",
        "enable-ipv4": "true",
        "enable-ipv6": "false",
        "tofqdns-proxy-port": str(proxy_port),
        "standalone-dns-proxy-server-port": str(agent_port),
        "tofqdns-dns-reject-response-code": "refused",
    }
    for k, v in options.items():
        (conf / k).write_text(v)
    # Loopback traffic passes prerouting on lo: the endpoints' queries to Knot go to the proxy's
    # transparent socket; with no proxy listening they are dropped, never answered by Knot.
    steer = f"iif lo ip saddr 127.1.0.0/16 ip daddr {host} udp dport {up_port}"
    (d / "cilium-sdp.nft").write_text(
        f"""table ip {SDP_TABLE} {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    meta mark & {SDP_MARK_MASK:#x} == {SDP_MARK:#x} return
    {steer} tproxy to {LISTEN}:{proxy_port} accept
    {steer} drop
  }}
}}
"""
    )
    return Peer(
        "cilium-sdp",
        [
            str(proxy),
            "--config-dir",
            str(conf),
            "--shell-sock-path",
            str(d / "cilium-sdp-shell.sock"),
        ],
        int(up_port),
        is_refused,
        f"cilium standalone-dns-proxy {cilium_version()}",
        metrics=f"http://127.0.0.1:{metrics_port}/metrics",
        learned_metric="cilium_sdp_agent_names",
        setup=[["nft", "-f", str(d / "cilium-sdp.nft")]],
        cleanup=[["nft", "delete", "table", "ip", SDP_TABLE]],
        addr=host,
        helper=[
            str(agent),
            "-rules",
            str(rules),
            "-listen",
            f"127.0.0.1:{agent_port}",
            "-metrics",
            f"127.0.0.1:{metrics_port}",
        ],
    )


def cilium_version() -> str:
    """The Cilium module the proxy is built from (its go.mod)."""
    mod = gobuild.PROGRAMS[SDP_PROXY].module / "go.mod"
    for line in mod.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["github.com/cilium/cilium"]:
            return parts[1]
    return "unknown"


# --- running and measuring -------------------------------------------------------------------


def ask(
    port: int, source: str, name: str, timeout: float = 2.0, addr: str = LISTEN
) -> dns.message.Message | None:
    q = dns.message.make_query(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(timeout)
        s.sendto(q.to_wire(), (addr, port))
        try:
            return dns.message.from_wire(s.recv(4096))
        except (OSError, dns.exception.DNSException):
            return None


def wait_ready(peer: Peer, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{peer.name} exited with {proc.returncode} before answering")
        if ask(peer.port, endpoint_ip(0), "probe.example.com", 0.3, peer.addr) is not None:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{peer.name} did not answer on {peer.addr}:{peer.port} in {timeout:.0f}s")


def check_verdicts(peer: Peer, w: Workload) -> None:
    """Every allowed name answered with an address, every denied one refused (peer's way)."""
    wrong = []
    sample = sorted({*load_endpoints(w), 1, w.endpoints // 2 + 1} & set(range(w.endpoints)))
    for i in sample:
        src = endpoint_ip(i)
        for j in w.rules[i][:6]:
            for name in allowed_names(j):
                m = ask(peer.port, src, name, addr=peer.addr)
                if m is None or m.rcode() != dns.rcode.NOERROR or not m.answer:
                    wrong.append(f"{src} {name}: allowed, got {describe(m)}")
        for name in denied_names(w, i):
            m = ask(peer.port, src, name, addr=peer.addr)
            if m is None or not peer.refused(m):
                wrong.append(f"{src} {name}: denied, got {describe(m)}")
    if wrong:
        raise RuntimeError(f"{peer.name} gives wrong verdicts: " + "; ".join(wrong[:6]))


def describe(m: dns.message.Message | None) -> str:
    if m is None:
        return "no answer"
    return f"{dns.rcode.to_text(m.rcode())} with {sum(len(r) for r in m.answer)} records"


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def udp_drops() -> int:
    """The host's UDP receive-buffer drops so far (/proc/net/snmp RcvbufErrors): a full socket
    queue, the peer's listener or the upstream's, drops the datagram there."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()]
    udp = [ln for ln in lines if ln and ln[0] == "Udp:"]
    return int(dict(zip(udp[0][1:], udp[1][1:], strict=True)).get("RcvbufErrors", 0))


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name, from /proc/PID/task."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_queries(w: Workload, d: Path) -> list[tuple[str, Path]]:
    """One query file per load source: its allowed names, with about 10% denied names."""
    out = []
    for i in load_endpoints(w):
        names = [n for j in w.rules[i] for n in allowed_names(j)]
        denied = denied_names(w, i)
        lines = [f"{n} A" for n in names] + [f"{n} A" for n in denied[: max(1, len(names) // 9)]]
        f = d / f"queries-{i}.txt"
        f.write_text("\n".join(lines) + "\n")
        out.append((endpoint_ip(i), f))
    return out


def dnsperf_load(
    port: int,
    sources: list[tuple[str, Path]],
    seconds: float,
    rate: float | None = None,
    addr: str = LISTEN,
) -> dict[str, float]:
    """LOAD_SOURCES dnsperf processes at once, one per source address; summed figures."""
    procs = []
    files = []
    for src, queries in sources:
        cmd = ["taskset", "-c", LOAD_CPU, "dnsperf", "-s", addr, "-p", str(port), "-a", src]
        cmd += ["-d", str(queries), "-l", str(seconds), "-c", "2", "-q", "128", "-t", "2"]
        if rate is not None:
            cmd += ["-Q", str(max(1, int(rate / len(sources)))), "-v"]
        f = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed below, after the wait)
        files.append(f)
        procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, text=True))
    load_cpu = 0.0
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        load_cpu += usage.ru_utime + usage.ru_stime
        if p.stderr is not None:
            p.stderr.close()
    qps = completed = lost = 0.0
    latencies: list[float] = []
    for p, f in zip(procs, files, strict=True):
        f.seek(0)
        out = f.read()
        f.close()
        if p.returncode != 0:
            raise RuntimeError(f"dnsperf exited with {p.returncode}: {out[-500:]}")
        lat = []
        for raw in out.splitlines():
            line = raw.strip()
            if line.startswith("Queries per second:"):
                qps += float(line.split(":")[1])
            elif line.startswith("Queries completed:"):
                completed += float(line.split(":")[1].split()[0])
            elif line.startswith("Queries lost:"):
                lost += float(line.split(":")[1].split()[0])
            elif line.startswith(">") and rate is not None:
                with contextlib.suppress(ValueError):
                    lat.append(float(line.split()[-1]) * 1000)
        skip = int(rate / len(sources) * SETTLE_S) if rate else 0
        latencies += lat[skip:] if len(lat) > 2 * skip else lat
    result = {"qps": qps, "completed": completed, "lost": lost, "load_cpu_s": load_cpu}
    if latencies:
        latencies.sort()
        result["p50_ms"] = percentile(latencies, 0.50)
        result["p99_ms"] = percentile(latencies, 0.99)
    return result


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@contextlib.contextmanager
def running(peer: Peer) -> Iterator[subprocess.Popen[bytes]]:
    for cmd in peer.cleanup:
        subprocess.run(cmd, capture_output=True, check=False)
    for cmd in peer.setup:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{peer.name}: {' '.join(cmd)} failed: {done.stderr.strip()}")
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in finally)
    helper = None
    if peer.helper:
        helper = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, *peer.helper], stdout=log, stderr=log, cwd=ROOT
        )
        peer.helper_pid = helper.pid
    proc = subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, *peer.cmd],
        stdout=log,
        stderr=log,
        cwd=ROOT,
        env={**os.environ, **peer.env},
    )
    try:
        try:
            wait_ready(peer, proc)
        except RuntimeError as e:
            log.seek(0)
            raise RuntimeError(f"{e}: {log.read()[-1500:].decode(errors='replace')}") from None
        yield proc
    finally:
        for p in (proc, helper):
            if p is None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        peer.helper_pid = None
        log.close()
        for cmd in peer.cleanup:
            subprocess.run(cmd, capture_output=True, check=False)


def measure(
    peer: Peer,
    w: Workload,
    sources: list[tuple[str, Path]],
    seconds: float,
    repeat: int,
    *,
    knot_pid: int | None,
) -> dict[str, object]:
    with running(peer) as proc:
        check_verdicts(peer, w)
        dnsperf_load(peer.port, sources, 1.0, addr=peer.addr)  # warm up
        runs = []
        threads_before = thread_cpu(proc.pid)
        helper = peer.helper_pid
        for _ in range(repeat):
            before = cpu_seconds(proc.pid)
            knot_before = cpu_seconds(knot_pid) if knot_pid else 0.0
            helper_before = cpu_seconds(helper) if helper else 0.0
            drops_before = udp_drops()
            r = dnsperf_load(peer.port, sources, seconds, addr=peer.addr)
            r["udp_drops"] = udp_drops() - drops_before
            r["cpu_s"] = cpu_seconds(proc.pid) - before
            r["knot_cpu_s"] = cpu_seconds(knot_pid) - knot_before if knot_pid else 0.0
            r["helper_cpu_s"] = cpu_seconds(helper) - helper_before if helper else 0.0
            runs.append(r)
        threads_after = thread_cpu(proc.pid)
        rss = rss_mb(proc.pid)
        busy = {
            t: threads_after[t] - threads_before.get(t, 0.0)
            for t in threads_after
            if threads_after[t] - threads_before.get(t, 0.0) > 0
        }
    total_busy = sum(busy.values()) or 1.0
    extra = {}
    if peer.helper:
        # The agent end's work for this peer (the mappings it is sent), on the same CPU.
        extra["agent_cpu_us_per_query"] = statistics.median(
            r["helper_cpu_s"] / r["completed"] * 1e6 for r in runs
        )
    return {
        "qps": statistics.median(r["qps"] for r in runs),
        "cpu_us_per_query": statistics.median(r["cpu_s"] / r["completed"] * 1e6 for r in runs),
        "load_cpu_us_per_query": statistics.median(
            r["load_cpu_s"] / r["completed"] * 1e6 for r in runs
        ),
        # Knot shares the peer's core: what is left of that core for the peer.
        "knot_cpu_us_per_query": statistics.median(
            r["knot_cpu_s"] / r["completed"] * 1e6 for r in runs
        ),
        "rss_mb": round(rss, 1),
        # Queries dnsperf never got an answer to (each holds one of its outstanding slots for
        # its timeout, so a few lost queries lower the maximum qps of any peer), and the
        # host's UDP receive-buffer drops meanwhile (where they were lost).
        "lost_per_million": statistics.median(
            r["lost"] / max(1.0, r["completed"] + r["lost"]) * 1e6 for r in runs
        ),
        "udp_drops": statistics.median(r["udp_drops"] for r in runs),
        "version": peer.version,
        "threads": {
            t: round(s / total_busy, 3) for t, s in sorted(busy.items(), key=lambda kv: -kv[1])[:4]
        },
        "runs": len(runs),
        **extra,
    }


def at_rate(
    peer: Peer, sources: list[tuple[str, Path]], rate: float, seconds: float, repeat: int
) -> dict[str, float]:
    with running(peer):
        dnsperf_load(peer.port, sources, 1.0, rate, peer.addr)
        runs = [dnsperf_load(peer.port, sources, seconds, rate, peer.addr) for _ in range(repeat)]
    return {
        "p50_ms": statistics.median(r.get("p50_ms", float("nan")) for r in runs),
        "p99_ms": statistics.median(r.get("p99_ms", float("nan")) for r in runs),
        "rate": rate,
    }


def unique_stream(peer: Peer, d: Path) -> dict[str, object]:
    """RSS every 5 s over UNIQUE_SECONDS of unique allowed names from endpoint 0."""
    queries = d / "unique.txt"
    if not queries.exists():
        n = UNIQUE_RATE * UNIQUE_SECONDS
        queries.write_text("".join(f"u{k}.uniq.example.com A\n" for k in range(n)))
    with running(peer) as proc:
        cmd = ["taskset", "-c", LOAD_CPU, "dnsperf", "-s", peer.addr, "-p", str(peer.port)]
        cmd += ["-a", endpoint_ip(0), "-d", str(queries), "-l", str(UNIQUE_SECONDS)]
        cmd += ["-Q", str(UNIQUE_RATE), "-c", "2", "-t", "2"]
        load = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples = []
        start = time.monotonic()
        while load.poll() is None:
            samples.append(
                (round(time.monotonic() - start), round(rss_mb(proc.pid), 1), cached(peer))
            )
            time.sleep(5)
    steady = [m for t, m, _ in samples if t >= 20]
    # "Once the cache is full": entries live ZONE_TTL s, so from 20 s on the cache holds what
    # arrives in ZONE_TTL seconds and should stay flat.
    growth = (max(steady) - min(steady)) / min(steady) if steady else float("nan")
    held = [n for _, _, n in samples if isinstance(n, int)]
    return {
        # (seconds, RSS MB, names held)
        "every_5s": samples,
        "learned_max": max(held) if held else "no cache",
        "steady_growth": round(growth, 3),
    }


def cached(peer: Peer) -> int | None:
    """Names the peer learned: fqdnguard's cache (its metrics), the names Cilium's proxy
    reported to its agent; None for a peer without."""
    if not peer.metrics:
        return None
    with urllib.request.urlopen(peer.metrics, timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(peer.learned_metric + " "):
            return int(float(line.split()[-1]))
    return None


# --- the run ---------------------------------------------------------------------------------

PEERS = ("fqdnguard", "fqdnguard-nft", "dnsdist", "knot-resolver", "blocky", "cilium-sdp")
#: left out of --quick unless named: their builds are optional (tools/gobuild.py)
OPTIONAL = ("cilium-sdp",)
NETNS = f"fgpeers{os.getpid() % 100000}"


def make_peer(name: str, w: Workload, d: Path, up: str) -> Peer:
    """The peer's configuration for the workload; RuntimeError saying why it cannot run."""
    if name == "fqdnguard":
        return fqdnguard_peer(w, d, up)
    if name == "fqdnguard-nft":
        if os.geteuid() != 0:
            raise RuntimeError("needs root: the nftables backend runs in a namespace of its own")
        peer = fqdnguard_peer(w, d, up, name)
        peer.cmd[peer.cmd.index("log")] = "nftables"
        # The backend's table stays when the proxy stops (failing closed): it would block the
        # other peers' endpoints.
        peer.cleanup = [["nft", "delete", "table", "inet", "fqdnguard"]]
        return peer
    if name == "dnsdist":
        if shutil.which("dnsdist") is None:
            raise RuntimeError("dnsdist is not installed (make system-deps)")
        return dnsdist_peer(w, d, up)
    if name == "knot-resolver":
        if shutil.which("kresd") is None and not Path("/usr/sbin/kresd").exists():
            raise RuntimeError("kresd is not installed (make system-deps: knot-resolver)")
        return kresd_peer(w, d, up)
    if name == "blocky":
        try:
            binary = gobuild.build("blocky")
        except gobuild.GoBuildError as e:
            raise RuntimeError(f"blocky could not be built: {e}") from None
        return blocky_peer(w, d, up, binary)
    if name == "cilium-sdp":
        if os.geteuid() != 0:
            raise RuntimeError("needs root: TPROXY rules steer the load to the transparent proxy")
        if not gobuild.is_built(SDP_PROXY):
            raise RuntimeError(SDP_NOT_BUILT)
        try:
            proxy, agent = gobuild.build(SDP_PROXY), gobuild.build(SDP_AGENT)
        except gobuild.GoBuildError as e:
            raise RuntimeError(f"cilium-sdp could not be built: {e}") from None
        return cilium_sdp_peer(w, d, up, proxy, agent)
    raise RuntimeError(f"unknown peer {name}")


def run_workload(
    w: Workload, peers: list[str], args: argparse.Namespace, results: dict, failed: dict
) -> None:
    d = Path(tempfile.mkdtemp(prefix=f"fqdnguard-peers-{w.name}-"))
    zone = "\n".join(
        [
            "$ORIGIN example.com.",
            f"$TTL {ZONE_TTL}",
            "@ SOA ns admin 1 3600 600 86400 60",
            "@ NS ns",
            f"ns A {UPSTREAM}",
            "* A 192.0.2.1",
        ]
    )
    sources = write_queries(w, d)
    up_port = free_port(UPSTREAM)
    up = f"{UPSTREAM}:{up_port}"
    print(f"workload {w.name}: {w.endpoints} endpoints, {len(w.pool())} distinct rules", flush=True)
    out: dict[str, dict[str, object]] = {}
    with KnotServer({"example.com": zone}, host=UPSTREAM, port=up_port, workers=1) as knot:
        if knot._proc is not None:
            subprocess.run(
                ["taskset", "-a", "-p", "-c", SERVER_CPU, str(knot._proc.pid)],
                capture_output=True,
                check=False,
            )
        made: dict[str, Peer] = {}
        for name in peers:
            try:
                peer = make_peer(name, w, d, up)
                knot_pid = knot._proc.pid if knot._proc is not None else None
                r = measure(peer, w, sources, args.seconds, args.repeat, knot_pid=knot_pid)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                failed.setdefault(name, f"workload {w.name}: {e}")
                print(f"  {name:<16} FAILED: {str(e)[:300]}", flush=True)
                continue
            made[name] = peer
            out[name] = r
            print(
                f"  {name:<16} {r['qps']:>9.0f} qps  {r['cpu_us_per_query']:>6.1f} us/query "
                f"(load {r['load_cpu_us_per_query']:.1f}, Knot {r['knot_cpu_us_per_query']:.1f}"
                + (
                    f", agent {r['agent_cpu_us_per_query']:.1f}"
                    if "agent_cpu_us_per_query" in r
                    else ""
                )
                + ")"
                f"  lost {r['lost_per_million']:.0f}/M (UDP drops {r['udp_drops']:.0f})"
                f"  rss {r['rss_mb']} MB  threads {r['threads']}",
                flush=True,
            )
        if out:
            rate = 0.5 * min(float(r["qps"]) for r in out.values())  # type: ignore[arg-type]
            for name, peer in made.items():
                try:
                    lat = at_rate(peer, sources, rate, max(2.0, args.seconds / 2), args.repeat)
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    failed.setdefault(name, f"workload {w.name} at a fixed rate: {e}")
                    continue
                out[name].update(lat)
                print(
                    f"  {name:<16} at {rate:.0f} qps: p50 {lat['p50_ms']:.3f} ms  "
                    f"p99 {lat['p99_ms']:.3f} ms",
                    flush=True,
                )
            if w.unique and not args.quick:
                for name, peer in made.items():
                    try:
                        out[name]["unique"] = unique_stream(peer, d)
                    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                        failed.setdefault(name, f"unique-name stream: {e}")
                        continue
                    u = out[name]["unique"]
                    print(f"  {name:<16} unique names: {u}", flush=True)
        base = out.get("fqdnguard")
        for r in out.values():
            r["ratio_to_fqdnguard"] = (
                round(float(r["qps"]) / float(base["qps"]), 3) if base else None  # type: ignore[arg-type]
            )
    shutil.rmtree(d, ignore_errors=True)
    results[w.name] = out


def targets(results: dict) -> list[str]:
    lines = []
    b = results.get("b", {})
    fq = b.get("fqdnguard")
    filtering = {k: v for k, v in b.items() if not k.startswith("fqdnguard")}
    if fq and filtering:
        best_name, best = max(filtering.items(), key=lambda kv: kv[1]["qps"])
        ratio = fq["qps"] / best["qps"]
        ok = "OK" if ratio >= 1.5 else "MISS"
        lines.append(
            f"{ok}: (b) fqdnguard max qps {ratio:.2f}x the best filtering peer "
            f"({best_name}); target >= 1.5x"
        )
        lowest = min(b.items(), key=lambda kv: kv[1]["cpu_us_per_query"])[0]
        ok = "OK" if lowest == "fqdnguard" else "MISS"
        lines.append(f"{ok}: (b) lowest CPU per query: {lowest} (target: fqdnguard)")
    for name, r in b.items():
        u = r.get("unique")
        if u:
            ok = "OK" if u["steady_growth"] <= 0.10 else "MISS"
            lines.append(
                f"{ok}: {name} RSS growth under unique names once full "
                f"{u['steady_growth'] * 100:.1f}% (target <= 10%)"
            )
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    sizes = {"a100": 100, "a10k": 10_000, "a100k": 100_000}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    peers = sorted({p for w in results.values() for p in w})
    for p in peers:
        pts = sorted((sizes[w], results[w][p]) for w in results if w in sizes and p in results[w])
        color = None
        if pts:
            (line,) = ax1.plot([x for x, _ in pts], [r["qps"] for _, r in pts], "o-", label=p)
            color = line.get_color()
            cpu = [r["cpu_us_per_query"] for _, r in pts]
            ax2.plot([x for x, _ in pts], cpu, "o-", label=p, color=color)
        if p in results.get("b", {}):
            r = results["b"][p]
            ax1.scatter([10_000], [r["qps"]], marker="x", s=70, color=color)
            ax2.scatter([10_000], [r["cpu_us_per_query"]], marker="x", s=70, color=color)
    for ax, label in ((ax1, "max qps"), (ax2, "CPU us per query (peer)")):
        ax.set_xscale("log")
        ax.set_xlabel("rules; o-: (a) 10 endpoints share them; x: (b) 1,000 endpoints x 10")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="workload (b), 2 s, 1 repeat (CI)")
    ap.add_argument("--json", type=Path, help="write the summary JSON here")
    ap.add_argument("--workloads", default="b,a100,a10k,a100k")
    ap.add_argument(
        "--peers", help=f"default: {','.join(PEERS)} ({', '.join(OPTIONAL)} not with --quick)"
    )
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.repeat, args.workloads = 2.0, 1, "b"
    if args.peers is None:
        args.peers = ",".join(p for p in PEERS if not (args.quick and p in OPTIONAL))
    if shutil.which("dnsperf") is None:
        print("dnsperf is not installed (make system-deps)", file=sys.stderr)
        return 2
    if os.geteuid() == 0 and not args.inside:
        # Everything runs in a namespace of its own: the nftables backend's table never touches
        # the host, and every peer sees the same loopback.
        subprocess.run(["ip", "netns", "add", NETNS], check=True)
        try:
            cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--inside"]
            return subprocess.run(["ip", "netns", "exec", NETNS, *cmd], check=False).returncode
        finally:
            subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    if args.inside:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    peers = [p for p in args.peers.split(",") if p]
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    started = time.monotonic()
    for name in args.workloads.split(","):
        run_workload(workload(name), peers, args, results, failed)
    lines = targets(results)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    full = {
        "results": results,
        "failed": failed,
        "targets": lines,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "cpus": {"load": LOAD_CPU, "peer_and_knot": SERVER_CPU},
        "load_sources": LOAD_SOURCES,
        "wall_s": round(time.monotonic() - started, 1),
    }
    (args.out / ("quick.json" if args.quick else "results.json")).write_text(
        json.dumps(full, indent=1) + "\n"
    )
    if not args.quick:
        with contextlib.suppress(ImportError):
            plot(results, args.out / "results.png")
    if args.json:
        summary_workload = results.get("b") or next(iter(results.values()), {})
        keys = ("qps", "cpu_us_per_query", "p99_ms", "rss_mb", "version")
        summary = {
            "peers": {n: {k: r.get(k) for k in keys} for n, r in summary_workload.items()},
            "failed": failed,
        }
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"done in {time.monotonic() - started:.0f}s", flush=True)
    return 0 if "fqdnguard" in results.get("b", {"fqdnguard": 1}) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
