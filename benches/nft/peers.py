"""A policy update where one selected peer address changes (a kube-dns pod restarted with a new
IP), through the nftables backend: time and netlink messages, before and after peer sets.

    sudo taskset -c 1 python benches/nft/peers.py --before /tmp/main-checkout/python
    FQDNGUARD_BENCH_QUICK=1 sudo python benches/nft/peers.py      # fewer rounds, this tree only

``--before`` is the ``python`` directory of another checkout (e.g. ``git worktree add`` of main,
with the compiled extension copied in): its backend is measured the same way, in the same run,
and the ratio printed. Each variant runs in a network namespace of its own (created and deleted
here) with 100 and then 1,000 restricted endpoints, all selected by one policy: DNS to the
kube-dns pods (toEndpoints, 2 pods), a toFQDNs rule, a toEndpoints rule for 3 database pods and
a toCIDRSet with an except. The update alternates one kube-dns pod's address between two values;
each ``set_policy`` call is timed (median of the rounds), the policies themselves are compiled
beforehand (that is the agent's work, the same for both).

Messages are the netlink messages the process sends to the kernel during one update (requests,
dumps and batch markers), counted in a separate run under ``strace`` (decoded netlink headers
between two marker syscalls), so tracing never slows the timed rounds. "after, nft text" is the
same element update written as ``delete element`` / ``add element`` nft text through
libnftables, for comparison with the netlink element transaction the backend sends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICK = os.environ.get("FQDNGUARD_BENCH_QUICK") == "1"
SIZES = (100, 1_000)
MARK = "\0fqdnguard-bench-mark"

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: pods, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod}}
  egress:
    - toEndpoints:
        - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
      toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
    - toFQDNs: [{matchPattern: "*.example.com"}]
      toPorts: [{ports: [{port: "443", protocol: TCP}]}]
    - toEndpoints: [{matchLabels: {app: db}}]
      toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
    - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]
      toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


def endpoints(n: int, dns: str) -> str:
    lines = ["endpoints:"]
    lines += [
        f"  - {{name: pod{i}, namespace: default, ips: [10.1.{i // 250}.{1 + i % 250}], "
        "labels: {app: pod}}"
        for i in range(n)
    ]
    lines += [
        f"  - {{name: dns{i}, namespace: kube-system, ips: [{ip}], labels: {{k8s-app: kube-dns}}}}"
        for i, ip in enumerate(("10.96.0.10", dns))
    ]
    lines += [
        f"  - {{name: db{i}, namespace: default, ips: [10.2.0.{i + 1}], labels: {{app: db}}}}"
        for i in range(3)
    ]
    return "\n".join(lines) + "\n"


def mark() -> None:
    """A syscall ``strace`` shows with this text: where an update starts and ends."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.sendto(b"fqdnguard-bench-mark", MARK)


def body(n: int, rounds: int, count_only: bool) -> dict[str, object]:
    """In the namespace: install with one kube-dns address, then alternate it; time (or, under
    strace, fence with marks) each update."""
    from fqdnguard import Endpoints, Policy  # noqa: PLC0415
    from fqdnguard.backends.nftables import Nftables  # noqa: PLC0415

    states = []
    for dns in ("10.96.0.11", "10.96.0.12"):
        eps = Endpoints.from_yaml(endpoints(n, dns))
        states.append((Policy.from_yaml(POLICY, endpoints=eps), eps))
    b = Nftables()
    b.set_policy(*states[0], listen=[("10.0.0.1", 53)])
    asyncio.run(b.start())
    peer_sets = hasattr(b, "_update_locked")  # this tree's backend, not main's
    out: dict[str, object] = {"peer_sets": peer_sets}
    if count_only:
        mark()
        b.set_policy(*states[1])
        mark()
        if peer_sets:
            b.set_policy(*states[0])
            a, z = (
                int.from_bytes(socket.inet_aton(x), "big") for x in ("10.96.0.11", "10.96.0.12")
            )
            script = nft_text_update(b, a, z)
            mark()
            b._run(script)  # type: ignore[attr-defined]
            mark()
    else:
        times = []
        for r in range(rounds):
            t = time.perf_counter()
            b.set_policy(*states[(r + 1) % 2])
            times.append(1000 * (time.perf_counter() - t))
        out["set_policy_ms"] = round(statistics.median(times), 3)
        if peer_sets:
            # The element change alone, as nft text and as the netlink transaction it is.
            b.set_policy(*states[0])
            name = dns_set(b)
            ips = [int.from_bytes(socket.inet_aton(a), "big") for a in ("10.96.0.11", "10.96.0.12")]
            for method in ("nft_text", "netlink"):
                spent = []
                for r in range(rounds):
                    old, new = ips[:: 1 if r % 2 == 0 else -1]
                    script = nft_text_update(b, old, new)
                    t = time.perf_counter()
                    if method == "nft_text":
                        b._run(script)  # type: ignore[attr-defined]
                    else:
                        b._send_peer_elements([(name, ((old, old),), ((new, new),))])  # type: ignore[attr-defined]
                    spent.append(1000 * (time.perf_counter() - t))
                    if r % 2 == 0 and r == rounds - 1:  # back to what the backend recorded
                        b._send_peer_elements([(name, ((new, new),), ((old, old),))])  # type: ignore[attr-defined]
                out[f"{method}_ms"] = round(statistics.median(spent), 3)
    b.remove_table()
    asyncio.run(b.close())
    return out


def dns_set(b: object) -> str:
    """The kube-dns rule's IPv4 peer set (the one holding 10.96.0.10)."""
    target = int.from_bytes(socket.inet_aton("10.96.0.10"), "big")
    peer_sets = b._want.peer_sets  # type: ignore[attr-defined]
    return next(s for s, iv in peer_sets.items() if any(lo <= target <= hi for lo, hi in iv))


def nft_text_update(b: object, old: int, new: int) -> str:
    """The kube-dns rule's element change as nft text."""
    t, name = f"inet {b.table}", dns_set(b)  # type: ignore[attr-defined]
    a, z = (socket.inet_ntoa(v.to_bytes(4, "big")) for v in (old, new))
    return f"delete element {t} {name} {{ {a} }}\nadd element {t} {name} {{ {z} }}\n"


def count(trace: str) -> list[tuple[int, int]]:
    """(netlink messages, bytes) sent between each pair of marks of an strace log."""
    spans: list[tuple[int, int]] = []
    inside = False
    messages = sent = 0
    for line in trace.splitlines():
        if "fqdnguard-bench-mark" in line:
            if inside:
                spans.append((messages, sent))
            inside, messages, sent = not inside, 0, 0
            continue
        if inside and re.search(r"\b(sendto|sendmsg)\(", line):
            messages += line.count("nlmsg_len=")
            if m := re.search(r"= (\d+)$", line):
                sent += int(m.group(1))
    return spans


def run_variant(python_path: str, n: int, rounds: int) -> dict[str, object]:
    """One backend (the ``fqdnguard`` package under ``python_path``) at ``n`` endpoints, in a
    namespace of its own: the timed rounds, then the counted update under strace."""
    ns = f"fgpeers{os.getpid() % 100000}"
    env = dict(os.environ, PYTHONPATH=python_path, FQDNGUARD_BENCH_IN_NETNS="1")
    cmd = [sys.executable, __file__, "--inside", str(n), str(rounds)]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        timed = subprocess.run(
            ["ip", "netns", "exec", ns, *cmd], env=env, check=True, capture_output=True,
            text=True, cwd=ROOT,
        ).stdout  # fmt: skip
        result: dict[str, object] = json.loads(timed.strip().splitlines()[-1])
        with tempfile.NamedTemporaryFile("r", suffix=".strace") as log:
            subprocess.run(
                ["ip", "netns", "exec", ns, "strace", "-f", "-qq", "-e", "trace=sendto,sendmsg",
                 "-e", "signal=none", "-s", "1000000", "-o", log.name, *cmd, "--count"],
                env=env, check=True, capture_output=True, cwd=ROOT,
            )  # fmt: skip
            spans = count(log.read())
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    result["messages"], result["bytes"] = spans[0]
    if len(spans) > 1:
        result["nft_text_messages"], result["nft_text_bytes"] = spans[1]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="the python/ directory of a checkout to compare with")
    parser.add_argument("--inside", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(body(*args.inside, count_only=args.count)))
        return 0
    if os.geteuid() != 0:
        print("needs root: it creates network namespaces and nftables sets", file=sys.stderr)
        return 2
    variants = [("after", str(ROOT / "python"))]
    if args.before:
        variants.insert(0, ("before", str(Path(args.before).resolve())))
    results: dict[str, dict[int, dict[str, object]]] = {}
    for n in SIZES:
        rounds = (3 if QUICK else 11) if n <= 100 else (2 if QUICK else 5)
        for name, path in variants:
            results.setdefault(name, {})[n] = run_variant(path, n, rounds)
    print(f"{'endpoints':>9} {'variant':<22} {'update ms':>10} {'messages':>9} {'bytes':>10}")
    for n in SIZES:
        after = results["after"][n]
        rows = [(name, results[name][n]) for name, _ in variants]
        for name, r in rows:
            label = "before (rules inline)" if name == "before" else "after (peer sets)"
            print(f"{n:>9} {label:<22} {r['set_policy_ms']:>10} {r['messages']:>9} "
                  f"{r['bytes']:>10}")  # fmt: skip
        if "nft_text_ms" in after:
            print(f"{n:>9} {'  element change alone':<22}")
            print(f"{n:>9} {'  netlink (the backend)':<22} {after['netlink_ms']:>10} "
                  f"{after['messages']:>9} {after['bytes']:>10}")  # fmt: skip
            print(f"{n:>9} {'  nft text':<22} {after['nft_text_ms']:>10} "
                  f"{after['nft_text_messages']:>9} {after['nft_text_bytes']:>10}")  # fmt: skip
        if "before" in results:
            before = results["before"][n]
            print(
                f"{n:>9} {'before / after':<22} "
                f"{before['set_policy_ms'] / after['set_policy_ms']:>10.1f} "  # type: ignore[operator]
                f"{before['messages'] / max(1, after['messages']):>9.1f} "  # type: ignore[operator]
                f"{before['bytes'] / max(1, after['bytes']):>10.1f}"  # type: ignore[operator]
            )
    print(json.dumps({k: {str(n): r for n, r in v.items()} for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
