"""Transparent interception: the node sends policed endpoints' DNS to the proxy with TPROXY.

What ``fqdnguard run --intercept`` installs, all of it owned by fqdnguard::

    table inet fqdnguard_intercept {
      # (source, port) of endpoints a policy with DNS rules selects: port 53 and the ports
      # their DNS rules name
      set policed4 { type ipv4_addr . inet_service; }
      set policed6 { type ipv6_addr . inet_service; }
      chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
        meta mark & 0x2000 == 0x2000 return  # the proxy's own upstream traffic: never again
        ip daddr 10.0.0.1 meta l4proto { tcp, udp } th dport 53 return  # its own --listen
        meta l4proto { tcp, udp } ip saddr . th dport @policed4    # reverse_path_check:
            fib saddr . iif oif missing counter drop               # a borrowed source
        meta l4proto { tcp, udp } ip6 saddr . th dport @policed6
            fib saddr . iif oif missing counter drop
        meta l4proto tcp ip saddr . th dport @policed4             # a TCP connection's
            ct direction original ct state established              # later packets: to the
            meta mark set meta mark | 0x1000 return                 # chain below
        meta l4proto tcp ip6 saddr . th dport @policed6
            ct direction original ct state established meta mark set meta mark | 0x1000 return
        meta l4proto { tcp, udp } ip saddr . th dport @policed4
            tproxy ip to 127.0.0.1:10053 meta mark set meta mark | 0x1000 accept
        meta l4proto { tcp, udp } ip6 saddr . th dport @policed6
            tproxy ip6 to [::1]:10053 meta mark set meta mark | 0x1000 accept
        meta l4proto { tcp, udp } ip saddr . th dport @policed4 counter drop
        meta l4proto { tcp, udp } ip6 saddr . th dport @policed6 counter drop
      }
      chain established {
        type filter hook prerouting priority dstnat + 10; policy accept;
        meta mark & 0x1000 == 0x1000 meta l4proto tcp ct direction original
            ct state established socket transparent 1 accept
        meta mark & 0x1000 == 0x1000 meta l4proto tcp ct direction original
            ct state established counter drop
      }
    }
    ip -4 rule add fwmark 0x1000/0x1000 lookup 153 priority 153     # and the same with -6
    ip -4 route replace local 0.0.0.0/0 dev lo table 153            # ::/0 with -6

TPROXY keeps the packet as the pod sent it (destination: the DNS server it asked) and hands it to
the proxy's transparent socket; the fwmark rule and the ``local`` route make the kernel deliver it
on this node instead of forwarding it. Only queries *from* policed sources *to* port 53 (and to
the other ports their DNS rules name, as Cilium redirects those too) match, at any destination
address, so DNS of other endpoints is never touched. When no transparent
listener is there (fqdnguard crashed), nft's tproxy does not match and the drop rules after it
keep the policed pods' DNS from going around the proxy. The hook runs at priority
mangle (-150), before the DNAT of a service address (kube-proxy, dstnat -100), so the sets match
the port the pod asked; the DNAT still translates the first packet after TPROXY chose the socket,
so the proxy sees the translated address (the socket a TCP connection gets is made with it), and
conntrack translates the answers back to the address the pod asked.

Only the first packet of a TCP connection goes through TPROXY. Its later packets still carry the
address the pod asked (the Service's) at mangle, where TPROXY's lookup of an established socket
cannot find the connection (its socket has the translated address) and would hand them to the
listener, which resets the connection. They are marked and left to the ``established`` chain,
after the DNAT, where ``socket`` finds the connection by the translated address; a packet with no
transparent socket there (a connection opened before the pod was policed) is dropped.

Installing is idempotent: one nftables transaction adds the table, deletes it and defines it
anew (whatever was there, e.g. a set of another type left by an older version, is replaced
atomically: no packet sees a half-made table); ip rules are added only when missing. A policy
reload does the same with the new sources, so it also repairs a table someone deleted. A proxy
started without a policy in force keeps the sources the sets already hold (``install(keep=True)``):
only a policy shrinks them. The rules belong to the node: a proxy that stops or crashes leaves
them in place so the pods' DNS keeps going to where the proxy will be again, and ``fqdnguard
intercept cleanup`` (:meth:`Interceptor.remove`) removes them.

Policy routing uses ``ip`` (iproute2, already needed by the tests and the demo): two rules and two
routes at start and stop do not justify a new Python dependency, and ``ip -json`` lets install and
removal check exactly what is there.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fqdnguard.backends import BackendError
from fqdnguard.backends.nftables import Libnftables, NftError

__all__ = [
    "DEFAULT_PORT",
    "InterceptError",
    "InterceptSettings",
    "Interceptor",
    "policed_sources",
]

log = logging.getLogger("fqdnguard.intercept")

#: Where the transparent listeners are (loopback: unreachable from the network directly).
DEFAULT_PORT = 10053
LISTEN4, LISTEN6 = "127.0.0.1", "::1"
TABLE = "fqdnguard_intercept"
FAMILY = "inet"


class InterceptError(BackendError):
    """Interception could not be installed or removed; the message says what refused."""


@dataclass(frozen=True)
class InterceptSettings:
    """The marks, routing table and rule priority interception uses (defaults avoid the bits of
    kube-proxy 0x4000/0x8000 and Cilium 0x0f00)."""

    port: int = DEFAULT_PORT
    #: Set on intercepted packets; the ip rule routes it to ``route_table``.
    tproxy_mark: int = 0x1000
    #: Set (SO_MARK) on the proxy's upstream sockets; interception skips such packets.
    proxy_mark: int = 0x2000
    route_table: int = 153
    rule_priority: int = 153
    table: str = TABLE
    #: Drop policed-looking DNS whose source does not route back through the interface it came
    #: in on (another pod borrowing a policed pod's address), before it is intercepted.
    reverse_path_check: bool = True


#: The DNS port every policed endpoint has intercepted, whatever ports its DNS rules name.
DNS_PORT = 53

#: A packet of a connection after its first, from the side that opened it.
_LATER = "ct direction original ct state established"
#: The chain that finds an intercepted TCP connection's socket by its translated address: after
#: the node's DNAT (dstnat, -100), where the packet carries the address the socket was made with.
_ESTABLISHED_HOOK = "type filter hook prerouting priority dstnat + 10; policy accept;"


def policed_sources(policy: Any, endpoints: Any) -> tuple[list[str], list[str]]:
    """The set elements (``"ADDR . PORT"``, IPv4 and IPv6) of every endpoint a policy with DNS
    rules selects: each of its addresses with port 53, every port its DNS rules name (Cilium
    redirects DNS on the rule's port: a rule on port 5353 must not leave that port unpoliced),
    and every Service port leading to one of those (interception sees the port before the
    Service translation: a Service on 1053 sending to the DNS pods' 53 must not go around)."""
    v4: set[tuple[Any, int]] = set()
    v6: set[tuple[Any, int]] = set()
    for ep in endpoints or ():
        if ep.ips and policy.has_dns_rules(ep):
            ports = {DNS_PORT, *policy.dns_ports(ep), *policy.dns_service_ports(ep)}
            for ip in ep.ips:
                addr = ipaddress.ip_address(ip)
                (v6 if addr.version == 6 else v4).update((addr, port) for port in ports)
    return [f"{a} . {p}" for a, p in sorted(v4)], [f"{a} . {p}" for a, p in sorted(v6)]


class Interceptor:
    """Installs, updates and removes the interception rules and policy routing in the current
    network namespace. Needs CAP_NET_ADMIN."""

    def __init__(
        self,
        settings: InterceptSettings | None = None,
        *,
        library: str | None = None,
        exclude: Iterable[tuple[str, int]] = (),
    ) -> None:
        self.settings = settings or InterceptSettings()
        self.library = library
        #: The proxy's own listen addresses: DNS sent to them is left alone (never looped back).
        self.exclude = list(exclude)
        self._nft: Libnftables | None = None
        self._lock = threading.Lock()
        self.sources: tuple[list[str], list[str]] = ([], [])

    # -- the ruleset --------------------------------------------------------------------------

    def rules(self) -> list[str]:
        s = self.settings
        mark_only = f"meta mark set meta mark | {s.tproxy_mark:#x}"
        mark = f"{mark_only} accept"
        dns = "meta l4proto { tcp, udp }"
        own = []
        for host, port in self.exclude:
            addr = ipaddress.ip_address(host)
            where = (
                "fib daddr type local"
                if addr.is_unspecified
                else f"{'ip6' if addr.version == 6 else 'ip'} daddr {addr}"
            )
            own.append(f"{where} meta l4proto {{ tcp, udp }} th dport {port} return")
        spoofed = (
            [
                f"{dns} ip saddr . th dport @policed4 fib saddr . iif oif missing counter drop",
                f"{dns} ip6 saddr . th dport @policed6 fib saddr . iif oif missing counter drop",
            ]
            if s.reverse_path_check
            else []
        )
        return [
            f"meta mark & {s.proxy_mark:#x} == {s.proxy_mark:#x} return",
            *own,
            *spoofed,
            # A TCP connection's later packets: left to the `established` chain (below).
            f"meta l4proto tcp ip saddr . th dport @policed4 {_LATER} {mark_only} return",
            f"meta l4proto tcp ip6 saddr . th dport @policed6 {_LATER} {mark_only} return",
            f"{dns} ip saddr . th dport @policed4 tproxy ip to {LISTEN4}:{s.port} {mark}",
            f"{dns} ip6 saddr . th dport @policed6 tproxy ip6 to [{LISTEN6}]:{s.port} {mark}",
            # tproxy found no listener (fqdnguard is not running): no way around the proxy.
            f"{dns} ip saddr . th dport @policed4 counter drop",
            f"{dns} ip6 saddr . th dport @policed6 counter drop",
        ]

    def established_rules(self) -> list[str]:
        """The ``established`` chain, after the node's DNAT: a later packet of an intercepted
        TCP connection (marked by :meth:`rules`) goes on only to the transparent socket that
        accepted the connection, looked up by the packet's translated address (the socket's
        own); without one it is dropped (a connection opened before the pod was policed, or
        one fqdnguard has closed)."""
        ours = f"meta mark & {self.settings.tproxy_mark:#x} == {self.settings.tproxy_mark:#x}"
        return [
            f"{ours} meta l4proto tcp {_LATER} socket transparent 1 accept",
            f"{ours} meta l4proto tcp {_LATER} counter drop",
        ]

    def ruleset(self) -> str:
        """The table as ``nft -f`` text, plus the policy routing as comments (``--dry-run``)."""
        v4, v6 = self.sources
        s = self.settings
        lines = [f"table {FAMILY} {s.table} {{"]
        for name, kind, elems in (
            ("policed4", "ipv4_addr . inet_service", v4),
            ("policed6", "ipv6_addr . inet_service", v6),
        ):
            lines.append(f"\tset {name} {{\n\t\ttype {kind}")
            if elems:
                lines.append("\t\telements = { " + ", ".join(elems) + " }")
            lines.append("\t}")
        lines.append(
            "\tchain prerouting {\n\t\ttype filter hook prerouting priority mangle; policy accept;"
        )
        lines += [f"\t\t{r}" for r in self.rules()]
        lines.append(f"\t}}\n\tchain established {{\n\t\t{_ESTABLISHED_HOOK}")
        lines += [f"\t\t{r}" for r in self.established_rules()]
        lines += ["\t}", "}"]
        for family, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
            lines.append(
                f"# ip {family} rule add fwmark {s.tproxy_mark:#x}/{s.tproxy_mark:#x} "
                f"lookup {s.route_table} priority {s.rule_priority}"
            )
            lines.append(
                f"# ip {family} route replace local {default} dev lo table {s.route_table}"
            )
        return "\n".join(lines) + "\n"

    def _script(self, sources: tuple[list[str], list[str]], *, keep: bool = False) -> str:
        """One transaction: the table made sure of, deleted and defined anew (atomic, so no
        packet ever meets a half-made table; whatever drifted is replaced). ``keep``: the
        sets are not deleted, so the sources already policed stay (only the chain's rules
        are replaced, and ``sources`` added)."""
        t = f"{FAMILY} {self.settings.table}"
        cmds = [
            f"add table {t}",
            *([] if keep else [f"delete table {t}", f"add table {t}"]),
            f"add set {t} policed4 {{ type ipv4_addr . inet_service; }}",
            f"add set {t} policed6 {{ type ipv6_addr . inet_service; }}",
            f"add chain {t} prerouting "
            "{ type filter hook prerouting priority mangle; policy accept; }",
            f"add chain {t} established {{ {_ESTABLISHED_HOOK} }}",
            *([f"flush chain {t} prerouting", f"flush chain {t} established"] if keep else []),
        ]
        cmds += [f"add rule {t} prerouting {r}" for r in self.rules()]
        cmds += [f"add rule {t} established {r}" for r in self.established_rules()]
        for name, elems in (("policed4", sources[0]), ("policed6", sources[1])):
            if elems:
                cmds.append(f"add element {t} {name} {{ {', '.join(elems)} }}")
        return "\n".join(cmds) + "\n"

    # -- lifecycle ----------------------------------------------------------------------------

    def _lib(self) -> Libnftables:
        if self._nft is None:
            self._nft = Libnftables(self.library)
        return self._nft

    def set_sources(self, v4: Iterable[str], v6: Iterable[str]) -> None:
        """The policed ``"ADDR . PORT"`` elements; once installed, the table is defined anew
        with them in one transaction (which also repairs it if someone deleted it)."""
        sources = (list(v4), list(v6))
        if self._nft is not None:
            with self._lock:
                try:
                    self._nft.run(self._script(sources))
                except NftError as e:
                    raise InterceptError(f"interception: cannot update the sources: {e}") from None
        self.sources = sources

    def install(self, *, keep: bool = False) -> None:
        """Installs (or repairs) the table and the policy routing; idempotent.

        ``keep``: no policy is in force yet (a proxy that could not read its state): the
        sources the node already polices stay in the sets, beside this one's, so their DNS
        still comes to the proxy (which refuses it until a policy arrives) instead of going
        around it; only :meth:`set_sources`, with a policy in force, shrinks them."""
        ip_command()
        nft = self._lib()
        with self._lock:
            try:
                if keep:
                    try:
                        nft.run(self._script(self.sources, keep=True))
                    except NftError:
                        # The table is not as this release makes it (a set of another type):
                        # defined anew with what its sets hold added to ours.
                        nft.run(self._script(self._with_existing(nft)))
                else:
                    nft.run(self._script(self.sources))
            except NftError as e:
                hint = ""
                if "Operation not permitted" in str(e):
                    hint = " (needs root or CAP_NET_ADMIN in this network namespace)"
                elif "No such file or directory" in str(e) or "not supported" in str(e):
                    hint = " (are the kernel's nft_tproxy and nft_socket modules available?)"
                raise InterceptError(
                    f"interception: cannot install table {FAMILY} {self.settings.table}{hint}: {e}"
                ) from None
        self._install_routing()
        v4, v6 = self.sources
        log.info(
            "interception installed: DNS of %d IPv4 and %d IPv6 sources to port %d",
            len(v4),
            len(v6),
            self.settings.port,
        )

    def _with_existing(self, nft: Libnftables) -> tuple[list[str], list[str]]:
        """This one's sources plus the policed elements the table holds now."""
        v4, v6 = (set(self.sources[0]), set(self.sources[1]))
        try:
            text = nft.run(f"list table {FAMILY} {self.settings.table}", json_output=True)
        except NftError:
            text = ""
        for item in json.loads(text).get("nftables", []) if text else []:
            found = item.get("set", {})
            if found.get("name") not in ("policed4", "policed6"):
                continue
            out = v4 if found["name"] == "policed4" else v6
            for elem in found.get("elem", []):
                parts = elem.get("concat") if isinstance(elem, dict) else None
                if isinstance(parts, list) and len(parts) == 2:
                    out.add(f"{parts[0]} . {parts[1]}")
        return sorted(v4), sorted(v6)

    def _install_routing(self) -> None:
        s = self.settings
        for family in ("-4", "-6"):
            if not self._our_rules(family):
                _ip(
                    family,
                    "rule",
                    "add",
                    "fwmark",
                    f"{s.tproxy_mark:#x}/{s.tproxy_mark:#x}",
                    "lookup",
                    str(s.route_table),
                    "priority",
                    str(s.rule_priority),
                )
            _ip(family, "route", "replace", *self._route(family))

    def _route(self, family: str) -> list[str]:
        default = "0.0.0.0/0" if family == "-4" else "::/0"
        return ["local", default, "dev", "lo", "table", str(self.settings.route_table)]

    def _our_rules(self, family: str) -> list[dict[str, Any]]:
        s = self.settings
        out = []
        for rule in _ip_json(family, "rule", "show"):
            if (
                str(rule.get("table")) == str(s.route_table)
                and rule.get("priority") == s.rule_priority
                and _as_int(rule.get("fwmark")) == s.tproxy_mark
            ):
                out.append(rule)
        return out

    def remove(self) -> None:
        """Removes the table, the ip rules and the routes (whatever of them is there)."""
        nft = self._lib()
        with self._lock:
            try:
                nft.run(f"delete table {FAMILY} {self.settings.table}\n")
            except NftError as e:
                if "No such file or directory" not in str(e):
                    raise InterceptError(f"interception: cannot delete the table: {e}") from None
        s = self.settings
        for family in ("-4", "-6"):
            for _ in self._our_rules(family):
                _ip(
                    family,
                    "rule",
                    "del",
                    "fwmark",
                    f"{s.tproxy_mark:#x}/{s.tproxy_mark:#x}",
                    "lookup",
                    str(s.route_table),
                    "priority",
                    str(s.rule_priority),
                )
            # Only our route: the table may hold other tools' routes too.
            _ip(family, "route", "del", *self._route(family), check=False)
        log.info("interception removed")

    def status(self) -> dict[str, Any]:
        """What is installed now: the table's rules and set sizes, the ip rules and routes."""
        nft = self._lib()
        out: dict[str, Any] = {"table": False, "rules": 0, "policed4": 0, "policed6": 0}
        with self._lock:
            try:
                text = nft.run(f"list table {FAMILY} {self.settings.table}", json_output=True)
            except NftError:
                text = ""
        for item in json.loads(text).get("nftables", []) if text else []:
            if "table" in item:
                out["table"] = True
            elif "rule" in item:
                out["rules"] += 1
            elif "set" in item and item["set"]["name"] in ("policed4", "policed6"):
                out[item["set"]["name"]] = len(item["set"].get("elem", []))
        s = self.settings
        for family, key in (("-4", "4"), ("-6", "6")):
            out[f"ip_rules{key}"] = len(self._our_rules(family))
            routes = _ip_json(family, "route", "show", "table", str(s.route_table), check=False)
            out[f"routes{key}"] = sum(
                1 for r in routes if r.get("type") == "local" and r.get("dst") == "default"
            )
        return out

    def close(self) -> None:
        if self._nft is not None:
            self._nft.close()
            self._nft = None


def _as_int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value), 0)
    except ValueError:
        return None


def ip_command() -> str:
    found = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise InterceptError("interception: the 'ip' command is needed (Debian package 'iproute2')")
    return found


def _ip(*args: str, check: bool = True) -> str:
    r = subprocess.run([ip_command(), *args], capture_output=True, text=True, check=False)
    if r.returncode != 0 and check:
        raise InterceptError(f"interception: ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def _ip_json(*args: str, check: bool = True) -> list[dict[str, Any]]:
    """``ip -json`` as a list. A routing table that was never made (a node where interception
    was never installed) holds nothing: iproute2 then prints ``[`` and fails, which reads as
    empty here."""
    family, rest = args[0], args[1:]
    r = subprocess.run(
        [ip_command(), "-json", family, *rest], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        if "table does not exist" in r.stderr or not check:
            return []
        raise InterceptError(f"interception: ip {' '.join(args)}: {r.stderr.strip()}")
    text = r.stdout.strip()
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError:
        raise InterceptError(
            f"interception: ip -json {' '.join(args)} printed no JSON: {text[:80]!r}"
        ) from None
    return data if isinstance(data, list) else []
