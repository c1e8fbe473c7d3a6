"""The ``fqdnguard`` command: ``run``, ``proxy``, ``agent``, ``check``, ``policy lint``,
``cache list`` and ``probe``.

Each subcommand is a function taking the parsed arguments and returning the exit status; adding
one is a parser in :func:`build_parser` and a function here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fqdnguard._core import FqdnGuardError
from fqdnguard.backends import BackendError
from fqdnguard.config import ConfigError
from fqdnguard.endpoints import Endpoint, Endpoints
from fqdnguard.policy import Policy, PolicyError, lint

if TYPE_CHECKING:
    from fqdnguard._core import DnsCache
    from fqdnguard.config import ProxyConfig

EXIT_ALLOWED = 0
EXIT_DENIED = 1
EXIT_ERROR = 2


class _UsageError(Exception):
    pass


def _port(text: str) -> tuple[int, str]:
    """``53``, ``53/udp``, ``53/TCP`` -> (port, protocol)."""
    num, _, proto = text.partition("/")
    proto = (proto or "udp").upper()
    if not num.isdigit() or not 0 < int(num) <= 65535 or proto not in ("UDP", "TCP", "SCTP"):
        raise argparse.ArgumentTypeError(f"{text!r} is not PORT[/udp|/tcp|/sctp]")
    return int(num), proto


def _destination(text: str) -> tuple[str, int, str]:
    """``IP:PORT``, ``[V6]:PORT``, with ``/tcp`` (the default), ``/udp`` or ``/sctp`` ->
    (ip, port, protocol)."""
    from fqdnguard.config import ConfigError, parse_hostport  # noqa: PLC0415

    hostport, _, proto = text.partition("/")
    proto = (proto or "tcp").upper()
    if proto not in ("UDP", "TCP", "SCTP"):
        raise argparse.ArgumentTypeError(f"{text!r}: protocol must be tcp, udp or sctp")
    try:
        ip, port = parse_hostport(hostport, "--to")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--to: ")) from None
    return ip, port, proto


class _Names:
    """What ``check --to`` assumes the DNS cache holds for the address: the ``--name`` given,
    and with ``--state-dir`` what the proxy learned for the endpoint."""

    def __init__(self, names: list[str], learned: list[dict[str, object]]) -> None:
        self.names = names
        self.learned = learned

    def names_for(self, ip: str, endpoint: int | None = None) -> list[str]:
        found = [str(e["name"]) for e in self.learned
                 if e["ip"] == ip and (endpoint is None or e["endpoint"] == endpoint)]  # fmt: skip
        return sorted({*self.names, *found})


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def cmd_check(args: argparse.Namespace) -> int:
    from fqdnguard.endpoints import load_with_cluster  # noqa: PLC0415

    endpoints, cluster = load_with_cluster(args.endpoints)
    policy = Policy.load(
        args.policy,
        endpoints=endpoints,
        cluster=cluster,
        allow_empty=bool(args.allow_empty_policy),
        unenforced_l7=args.unenforced_l7 or "deny",
    )
    endpoint: Endpoint | None
    if args.ip is not None:
        endpoint = endpoints.by_ip(args.ip)
        if endpoint is None:
            raise _UsageError(f"no endpoint in {args.endpoints} has the address {args.ip}")
        who = f"{endpoint.display} ({args.ip})"
    else:
        try:
            endpoint = Endpoint.create(name="(labels)", labels=args.labels)
        except ValueError as e:
            raise _UsageError(str(e)) from e
        who = "labels " + ",".join(f"{k}={v}" for k, v in sorted(endpoint.labels.items()))
    if args.to is not None:
        return _check_egress(args, policy, endpoint, who)
    if args.name is None:
        raise _UsageError("give --name NAME (a DNS verdict) or --to IP:PORT (an egress verdict)")
    port, proto = args.port
    verdict = policy.dns_verdict(endpoint, args.server, port, proto, args.name)
    to = f"to {args.server} " if args.server else ""
    word = "ALLOWED" if verdict.allowed else "DENIED"
    print(f"{word}: DNS query for {args.name} from {who} {to}on port {port}/{proto}")
    print(f"  {verdict.reason}")
    for w in policy.warnings:
        print(f"  warning: {w}", file=sys.stderr)
    return EXIT_ALLOWED if verdict.allowed else EXIT_DENIED


def _check_egress(args: argparse.Namespace, policy: Policy, endpoint: Endpoint, who: str) -> int:
    """``check --to``: may the endpoint open a connection to (send to) IP:PORT/PROTO?"""
    ip, port, proto = args.to
    learned: list[dict[str, object]] = []
    if args.state_dir is not None:
        _, lines, _ = _cache_lines(args.state_dir, None)
        learned = list(lines)
    names = _Names([args.name] if args.name else [], learned)
    verdict = policy.egress_verdict(endpoint, ip, port, proto, names)
    word = "ALLOWED" if verdict.allowed else "DENIED"
    known = names.names_for(ip, endpoint.id)
    under = f" (known as {', '.join(known)})" if known else ""
    print(f"{word}: traffic from {who} to {ip}{under} port {port}/{proto}")
    print(f"  {verdict.reason}")
    for w in policy.warnings:
        print(f"  warning: {w}", file=sys.stderr)
    return EXIT_ALLOWED if verdict.allowed else EXIT_DENIED


def cmd_policy_lint(args: argparse.Namespace) -> int:
    errors, warnings = lint(
        args.paths,
        allow_empty=bool(args.allow_empty_policy),
        unenforced_l7=args.unenforced_l7 or "deny",
    )
    order = {f: i for i, f in enumerate(dict.fromkeys(e.file for e in errors))}
    for e in sorted(errors, key=lambda e: (order[e.file], e.line)):
        print(f"{e.location()}")
    for w in warnings:
        print(f"{w.file}:{w.line}: warning: {w.path}: not enforced by fqdnguard: {w.message}")
    n_err, n_warn = len(errors), len(warnings)
    print(f"{n_err} error(s), {n_warn} warning(s)", file=sys.stderr)
    return EXIT_ERROR if errors else (EXIT_DENIED if args.strict and warnings else 0)


def cmd_policy_status(args: argparse.Namespace) -> int:
    """What the running ``fqdnguard run`` / ``proxy`` has in force, asked on its control
    socket, and what its last reloads did."""
    import json  # noqa: PLC0415
    import time  # noqa: PLC0415
    from typing import cast  # noqa: PLC0415

    from fqdnguard.control import ControlError  # noqa: PLC0415

    try:
        data = cast("dict[str, Any]", _control_get(args.state_dir, "/v1/policy"))
    except (FileNotFoundError, ConnectionRefusedError, ControlError) as e:
        raise _UsageError(
            f"no running fqdnguard answers on the control socket in {args.state_dir} ({e})"
        ) from None
    if args.json:
        print(json.dumps(data, indent=2))
        return 0

    def when(t: object) -> str:
        if not isinstance(t, (int, float)):
            return "-"
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    origin = ", ".join(map(str, data.get("origin") or [])) or "-"
    print(f"Source:     {data.get('source')} ({origin})")
    print(f"Loaded:     {when(data.get('loaded_at'))}")
    if data.get("digest"):
        print(f"Digest:     {data['digest']}")
    print(f"Endpoints:  {data.get('endpoints')} ({data.get('restricted_endpoints')} restricted)")
    policies = list(data.get("policies") or [])
    print(f"Policies:   {len(policies)}")
    for p in policies:
        print(
            f"  {p['kind']} {p['policy']}" + (f"  ({p['file']}:{p['line']})" if p["line"] else "")
        )
    invalid = list(data.get("invalid") or [])
    if invalid or data.get("feed") is not None:
        print(f"Invalid:    {len(invalid)} ({data.get('invalid_total', 0)} invalid versions seen)")
    for bad in invalid:
        print(f"  {bad['kind']} {bad['policy']}: {bad['error']} (in force: {bad['in_force']})")
    feed = data.get("feed")
    if isinstance(feed, dict):
        print(f"Kubernetes: {feed.get('state')} (node {feed.get('node')})")
    reloads = list(data.get("reloads") or [])
    lifted = data.get("lifted_total")
    print(f"Reloads:    {len(reloads)} recorded, {lifted} endpoint(s) left unrestricted")
    for r in reloads:
        head = f"  {when(r.get('at'))} {r.get('source')}: {r.get('outcome')}"
        if r.get("outcome") == "rejected":
            print(f"{head} ({r.get('error')}); the policy in force stayed")
            continue
        gone = r.get("unrestricted") or []
        tail = f"; UNRESTRICTED: {', '.join(gone)}" if gone else ""
        print(f"{head}, {r.get('policies')} policies{tail}")
    return 0


def _setup_logging(level: str) -> None:
    import logging  # noqa: PLC0415

    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _node_name(args: argparse.Namespace) -> str | None:
    """``--node-name``, else NODE_NAME (the downward API) when the Kubernetes source is on."""
    if getattr(args, "node_name", None):
        return str(args.node_name)
    if getattr(args, "kubernetes", None):
        return os.environ.get("NODE_NAME") or None
    return None


def _kubernetes_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kubernetes",
        action="store_true",
        default=None,
        help="policies, pods and DNS Services from the Kubernetes API server (in-cluster "
        "service account, or --kubeconfig); see docs/kubernetes.md",
    )
    p.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (outside the cluster)")
    p.add_argument(
        "--node-name", metavar="NAME", help="the node this runs on (default: $NODE_NAME)"
    )


def _proxy_config(args: argparse.Namespace) -> ProxyConfig:
    """The config file overridden by the data-plane flags common to ``run`` and ``proxy``."""
    from fqdnguard.config import ProxyConfig, read_config_file  # noqa: PLC0415

    config = read_config_file(args.config) if args.config else ProxyConfig()
    return config.override(
        listen=args.listen,
        upstreams=args.upstream,
        policy=getattr(args, "policy", None),
        endpoints=getattr(args, "endpoints", None),
        backend=args.backend,
        reject=args.reject,
        search_domains=args.search_domain,
        state_dir=args.state_dir,
        metrics=args.metrics,
        unknown_endpoint=args.unknown_endpoint,
        upstream_timeout=args.upstream_timeout,
        upstream_retransmit=args.upstream_retransmit,
        upstream_retries=args.upstream_retries,
        max_ttl=args.max_ttl,
        log_queries=args.log_queries,
        intercept=getattr(args, "intercept", None) or None,
        intercept_port=getattr(args, "intercept_port", None),
        udp_io=args.udp_io,
        allow_empty_policy=args.allow_empty_policy,
        kubernetes=getattr(args, "kubernetes", None) or None,
        kubeconfig=getattr(args, "kubeconfig", None),
        node_name=_node_name(args),
        unenforced_l7=args.unenforced_l7,
        reverse_path_check=False if args.no_reverse_path_check else None,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from fqdnguard.daemons.run import run  # noqa: PLC0415

    _setup_logging(args.log_level)
    config = _proxy_config(args)
    if args.dry_run:
        return _dry_run(config)
    run(config)
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    from fqdnguard.daemons.proxy import run_proxy  # noqa: PLC0415

    _setup_logging(args.log_level)
    config = _proxy_config(args)
    if not config.state_dir:
        raise _UsageError(
            "--state-dir is required: the proxy keeps its policy, cache and socket there"
        )
    run_proxy(config, control_socket=args.control_socket, socket_handover=args.socket_handover)
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from fqdnguard.daemons.agent import Agent, run_agent  # noqa: PLC0415

    _setup_logging(args.log_level)
    if args.socket is None and args.state_dir is None:
        raise _UsageError("give the proxy's --state-dir (or its control --socket)")
    socket_path = args.socket or os.path.join(args.state_dir, "control.sock")
    if args.kubernetes:
        return _kubernetes_agent(args, socket_path)
    if not args.policy:
        raise _UsageError("give --policy PATH (files) or --kubernetes")
    agent = Agent(
        args.policy,
        args.endpoints,
        socket_path,
        interval=args.interval,
        allow_empty=args.allow_empty_policy,
    )
    if args.once:
        import asyncio  # noqa: PLC0415

        outcome = asyncio.run(agent.sync())
        print(outcome)
        return 0 if outcome in ("pushed", "in-sync") else EXIT_ERROR
    run_agent(agent)
    return 0


def _kubernetes_agent(args: argparse.Namespace, socket_path: str) -> int:
    from fqdnguard.daemons.agent import KubernetesAgent  # noqa: PLC0415

    if args.policy or args.endpoints:
        raise _UsageError("--kubernetes takes policies and endpoints from the API server; "
                          "drop --policy and --endpoints")  # fmt: skip
    node = _node_name(args)
    if not node:
        raise _UsageError("--kubernetes needs the node's name: --node-name or NODE_NAME")
    agent = KubernetesAgent(
        node,
        socket_path,
        kubeconfig=args.kubeconfig,
        interval=args.interval,
        unenforced_l7=args.unenforced_l7,
    )
    if args.once:
        raise _UsageError("--once is for files; the Kubernetes agent follows the API server")
    import uvloop  # noqa: PLC0415

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(agent.run())
    return 0


def _dry_run(config: ProxyConfig) -> int:
    """Prints the ruleset the backend would install for the policy and endpoints, and exits."""
    from fqdnguard.backends import make_backend  # noqa: PLC0415
    from fqdnguard.daemons.run import load_policy  # noqa: PLC0415

    policy, endpoints = load_policy(config)
    backend = make_backend(config.backend, reverse_path_check=config.reverse_path_check)
    ruleset = getattr(backend, "ruleset", None)
    if ruleset is None:
        print(f"# the {backend.name} backend installs no ruleset")
        return 0
    backend.set_policy(policy, endpoints, listen=config.listen)  # type: ignore[attr-defined]
    print(ruleset(), end="")
    if config.intercept:
        from fqdnguard.intercept import (  # noqa: PLC0415
            Interceptor,
            InterceptSettings,
            policed_sources,
        )

        interceptor = Interceptor(
            InterceptSettings(
                port=config.intercept_port, reverse_path_check=config.reverse_path_check
            ),
            exclude=config.listen,
        )
        interceptor.sources = policed_sources(policy, endpoints)
        print(interceptor.ruleset(), end="")
    return 0


def cmd_intercept(args: argparse.Namespace) -> int:
    """``intercept cleanup`` removes what ``run --intercept`` installs; ``intercept status``
    prints what is installed now."""
    import json  # noqa: PLC0415

    from fqdnguard.intercept import Interceptor, InterceptSettings  # noqa: PLC0415

    interceptor = Interceptor(InterceptSettings(port=args.port))
    try:
        if args.intercept_command == "cleanup":
            before = interceptor.status()
            interceptor.remove()
            after = interceptor.status()
            print(
                f"removed: table {'yes' if before['table'] else 'absent'}, "
                f"ip rules {before['ip_rules4']} (IPv4) {before['ip_rules6']} (IPv6), "
                f"routes {before['routes4']} (IPv4) {before['routes6']} (IPv6)"
            )
            left = after["table"] or any(after[k] for k in ("ip_rules4", "ip_rules6"))
            return EXIT_ERROR if left else 0
        print(json.dumps(interceptor.status(), indent=2))
        return 0
    finally:
        interceptor.close()


def _control_socket(state_dir: str) -> str:
    """The control socket of the fqdnguard serving from ``state_dir``; FileNotFoundError when
    none is there, a usage error when the state directory itself is missing."""
    from fqdnguard.daemons.run import CONTROL_SOCKET  # noqa: PLC0415

    if not os.path.isdir(state_dir):
        what = "is not a directory" if os.path.exists(state_dir) else "no such directory"
        raise _UsageError(f"state directory {state_dir}: {what}")
    sock = os.path.join(state_dir, CONTROL_SOCKET)
    if not os.path.exists(sock):
        raise FileNotFoundError(sock)
    return sock


def _control_get(state_dir: str, path: str) -> dict[str, object]:
    from fqdnguard.control import request_sync  # noqa: PLC0415

    sock = _control_socket(state_dir)
    status, body = request_sync(sock, "GET", path, timeout=5)
    if status != 200 or not isinstance(body, dict):
        raise _UsageError(f"control socket answered {status}: {body}")
    return body


def cmd_cache_list(args: argparse.Namespace) -> int:
    """Prints the entries as they arrive from the proxy (or from the last snapshot): a listing
    of a million entries is never held whole, here or in the proxy."""
    import json  # noqa: PLC0415
    import time  # noqa: PLC0415

    names = _endpoint_names(args.state_dir, args.endpoints)
    wanted = _endpoint_ids(args.endpoint, names) if args.endpoint is not None else None
    name_ok = _name_filter(args.name) if args.name else None
    # The proxy filters by one endpoint id; names (patterns, parts) are filtered here.
    one = next(iter(wanted)) if wanted is not None and len(wanted) == 1 else None
    header, lines, source = _cache_lines(args.state_dir, one)
    now = float(header["now"])
    max_ttl = header.get("max_ttl")
    if max_ttl is not None:
        print(f"TTLs are capped at max_ttl {max_ttl} s", file=sys.stderr)
    width = max([len("Endpoint"), *(len(n) for n in names.values())]) + 2
    if not args.json:
        print(f"{'Endpoint':<{width}}{'FQDN':<40}{'TTL':>7}  {'ExpirationTime':<22}IP")
    count = 0
    for entry in lines:
        if wanted is not None and entry["endpoint"] not in wanted:
            continue
        if name_ok is not None and not name_ok(entry["name"]):
            continue
        count += 1
        entry["endpoint_name"] = names.get(entry["endpoint"])
        if args.json:
            print(json.dumps(entry))
            continue
        who = entry["endpoint_name"] or f"#{entry['endpoint']}"
        ttl = max(0, int(entry["expires_at"] - now))
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry["expires_at"]))
        print(f"{who:<{width}}{entry['name']:<40}{ttl:>7}  {when:<22}{entry['ip']}")
    print(f"{count} entries ({source})", file=sys.stderr)
    return 0


def _endpoint_names(state_dir: str, endpoints_file: str | None) -> dict[int, str]:
    """Endpoint id -> ``namespace/name``: from the running fqdnguard, else from the policy an
    agent last pushed to the state directory, else from ``--endpoints``; empty when none
    knows (the listing then shows ids)."""
    from fqdnguard.control import ControlError  # noqa: PLC0415
    from fqdnguard.daemons.proxy import POLICY_FILE, load_policy_state  # noqa: PLC0415

    if endpoints_file is not None:
        return {ep.id: ep.display for ep in Endpoints.load(endpoints_file)}
    try:
        data = _control_get(state_dir, "/v1/endpoints")
        listed = data.get("endpoints")
        if isinstance(listed, dict):
            return {int(k): str(v) for k, v in listed.items()}
    except (FileNotFoundError, ConnectionRefusedError, ControlError, _UsageError):
        pass  # not running, or a release without the endpoint listing
    try:
        saved = load_policy_state(Path(state_dir) / POLICY_FILE)
    except ValueError:
        saved = None
    if saved is None or saved[1] is None:
        return {}
    try:
        return {ep.id: ep.display for ep in Endpoints.from_yaml(saved[1])}
    except ValueError:
        return {}


def _endpoint_ids(given: str, names: dict[int, str]) -> set[int]:
    """The ids ``--endpoint`` means: ``NS/NAME``, a ``NAME`` (in any namespace) or an id."""
    if given.isdigit():
        return {int(given)}
    found = {i for i, n in names.items() if n == given or n.split("/", 1)[1] == given}
    if not found:
        known = ", ".join(sorted(names.values())) or "none known (give --endpoints FILE)"
        raise _UsageError(f"--endpoint {given}: no such endpoint (endpoints: {known})")
    return found


def _name_filter(given: str) -> Callable[[str], bool]:
    """``--name``: a pattern with ``*`` matches as a policy's matchPattern does; other text
    matches every name that contains it (any case)."""
    if "*" in given:
        from fqdnguard._core import PatternError, PatternSet  # noqa: PLC0415

        try:
            patterns = PatternSet([given])
        except PatternError as e:
            raise _UsageError(f"--name {given}: {e}") from None
        return patterns.matches
    part = given.lower()
    return lambda name: part in name.lower()


def _cache_lines(state_dir: str, endpoint: int | None) -> tuple[dict[str, Any], Iterator[Any], str]:
    """The cache of the fqdnguard running with ``state_dir``, streamed from its control socket
    (only ``endpoint``'s entries when given), or without one what it left there: the listing's
    header, its entries as they arrive, and which of the two."""
    import time  # noqa: PLC0415
    from urllib.parse import urlencode  # noqa: PLC0415

    from fqdnguard.control import ControlError, stream_sync  # noqa: PLC0415

    filters = {"endpoint": endpoint} if endpoint is not None else {}
    try:
        sock = _control_socket(state_dir)
        url = "/v1/cache" + (f"?{urlencode(filters)}" if filters else "")
        lines = stream_sync(sock, "GET", url, timeout=30)
        return next(lines), lines, "live"
    except (FileNotFoundError, ConnectionRefusedError, ControlError) as e:
        if isinstance(e, ControlError) and "cut short" in str(e):
            raise
    cache = _saved_cache(state_dir)
    header = {"now": time.time(), "max_ttl": None, "min_ttl": cache.min_ttl}
    return header, _saved_lines(cache, endpoint, None), "saved"


def _saved_cache(state_dir: str) -> DnsCache:
    """What a stopped (or crashed) fqdnguard left in ``state_dir``: the snapshot and the
    journals written since, as its next start would restore them."""
    from fqdnguard._core import DnsCache  # noqa: PLC0415
    from fqdnguard.control import policy_digest  # noqa: PLC0415
    from fqdnguard.daemons.proxy import POLICY_FILE, load_policy_state  # noqa: PLC0415
    from fqdnguard.daemons.run import CACHE_FILE  # noqa: PLC0415
    from fqdnguard.state import StateDir, journal_files  # noqa: PLC0415

    snapshot = os.path.join(state_dir, CACHE_FILE)
    directory = Path(state_dir)
    if not os.path.exists(snapshot) and not journal_files(directory):
        raise _UsageError(f"no running fqdnguard (no control socket) and no state in {state_dir}")
    state = StateDir(directory)
    if not state.open():
        raise _UsageError(f"{state_dir}: the state cannot be read (see the message above)")
    cache = DnsCache.load(snapshot) if os.path.exists(snapshot) else DnsCache()
    try:
        saved = load_policy_state(directory / POLICY_FILE)
    except ValueError:
        saved = None
    state.replay(cache, policy_digest(*saved) if saved is not None else None)
    return cache


def _saved_lines(cache: DnsCache, endpoint: int | None, name: str | None) -> Iterator[Any]:
    """The entries of a saved cache, as the proxy's listing gives them."""
    import json  # noqa: PLC0415

    cursor: int | None = 0
    while cursor is not None:
        data, cursor = cache.listing(cursor, endpoint=endpoint, name=name)
        for line in data.splitlines():
            yield json.loads(line)


#: Where the DaemonSet's proxy container keeps its control socket: a directory private to the
#: pod (an emptyDir), so that during an upgrade each pod's probes reach its own proxy.
PROBE_SOCKET = "/run/fqdnguard/control.sock"


def _version() -> str:
    """The installed package's version (its metadata), else the compiled module's."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("fqdnguard")
    except PackageNotFoundError:
        from fqdnguard._core import __version__  # noqa: PLC0415

        return __version__


def probe_result(kind: str, socket_path: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the proxy at ``socket_path`` is live (answers ``GET /v1/status``) or ready (has a
    policy in force, from its state directory or pushed by an agent), and why, in one line."""
    from fqdnguard.control import ControlError, request_sync  # noqa: PLC0415

    try:
        status, body = request_sync(socket_path, "GET", "/v1/status", timeout=timeout)
    except ControlError as e:
        return False, f"no proxy answers on {socket_path}: {e}"
    if status != 200 or not isinstance(body, dict):
        return False, f"{socket_path} answered GET /v1/status with {status}: {body}"
    pid = body.get("pid")
    if kind == "live":
        return True, f"proxy pid {pid} answers on {socket_path}"
    policy = body.get("policy")
    source = policy.get("source") if isinstance(policy, dict) else None
    if not isinstance(policy, dict) or source in (None, "none"):
        return False, f"proxy pid {pid} has no policy in force yet (refusing every query)"
    origin = "its state directory" if source == "state" else f"the {source}"
    counts = f"{policy.get('policies')} policies, {policy.get('endpoints')} endpoints"
    return True, f"proxy pid {pid} enforces a policy from {origin} ({counts})"


def cmd_probe(args: argparse.Namespace) -> int:
    """Kubernetes exec probes: exit 0 when live/ready, 1 when not, with a one-line reason."""
    ok, reason = probe_result(args.probe_kind, args.socket, timeout=args.timeout)
    print(
        f"{args.probe_kind}: {'ok' if ok else 'failed'}: {reason}",
        file=sys.stdout if ok else sys.stderr,
    )
    return 0 if ok else EXIT_DENIED


def _data_plane_options(p: argparse.ArgumentParser, *, policy: bool) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML file of options (see README)")
    p.add_argument("--listen", action="append", metavar="ADDR:PORT", help="repeatable; [V6]:PORT")
    p.add_argument(
        "--upstream", action="append", metavar="ADDR:PORT", help="repeatable; default resolv.conf"
    )
    if policy:
        p.add_argument("--policy", action="append", metavar="PATH", help="policy file or directory")
        p.add_argument("--endpoints", metavar="FILE", help="endpoints YAML file")
    p.add_argument("--backend", choices=["callback", "log", "nftables"])
    p.add_argument("--reject", choices=["refused", "nxdomain"])
    p.add_argument(
        "--search-domain",
        action="append",
        metavar="SUFFIX",
        help="denied names under SUFFIX get NXDOMAIN (musl search lists); repeatable",
    )
    p.add_argument("--state-dir", metavar="DIR", help="cache snapshots and the control socket")
    p.add_argument("--metrics", metavar="ADDR:PORT", help="serve Prometheus metrics")
    p.add_argument("--unknown-endpoint", metavar="NS/NAME", help="treat unknown sources as it")
    p.add_argument("--upstream-timeout", type=float, metavar="SECONDS")
    p.add_argument(
        "--upstream-retransmit",
        type=float,
        metavar="SECONDS",
        help="send an unanswered UDP query again after SECONDS (default: a quarter of the "
        "timeout; 0: never)",
    )
    p.add_argument(
        "--upstream-retries",
        type=int,
        metavar="N",
        help="at most N copies more of a UDP query, all before the timeout (default 1)",
    )
    p.add_argument(
        "--max-ttl",
        type=int,
        metavar="SECONDS",
        help="cap the TTLs of answers, in the cache and for the client (default 86400)",
    )
    p.add_argument("--log-queries", choices=["all", "sampled", "none"])
    p.add_argument(
        "--udp-io",
        choices=["rust", "asyncio"],
        help="who serves the UDP sockets: a Rust thread (default) or asyncio transports",
    )
    _policy_meaning_options(p, empty=True)
    p.add_argument(
        "--no-reverse-path-check",
        action="store_true",
        help="do not drop packets whose source address does not route back through the "
        "interface they came in on (for asymmetric routing; see docs/nftables.md)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _intercept_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--intercept",
        action="store_true",
        default=None,
        help="send policed endpoints' DNS (port 53, any server) to the proxy with nftables "
        "TPROXY; the rules belong to the node and stay at exit until 'fqdnguard intercept "
        "cleanup' (see docs/intercept.md)",
    )
    p.add_argument(
        "--intercept-port",
        type=int,
        metavar="PORT",
        help="port of the transparent listeners on 127.0.0.1 and ::1 (default 10053)",
    )


def _policy_meaning_options(p: argparse.ArgumentParser, *, empty: bool) -> None:
    if empty:
        p.add_argument(
            "--allow-empty-policy",
            action="store_true",
            default=None,
            help="accept a policy file with no policy document or a directory with no policy "
            "file (by default an error: the policy in force stays)",
        )
    p.add_argument(
        "--unenforced-l7",
        choices=["deny", "allow-port"],
        help="what a port rule with L7 rules fqdnguard cannot enforce (HTTP, Kafka, "
        "serverNames) admits: nothing (deny, the default) or the whole port at L4",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fqdnguard", description="DNS-name egress firewall for containers."
    )
    parser.add_argument("--version", action="version", version=f"fqdnguard {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the DNS proxy (data plane and control plane in one process)",
        description="Runs the proxy until SIGTERM/SIGINT; SIGHUP reloads the policy. Flags "
        "override the --config file. A bad option exits 2 with a message naming it.",
    )
    _data_plane_options(run, policy=True)
    _kubernetes_options(run)
    _intercept_options(run)
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the firewall ruleset the backend would install, then exit",
    )
    run.set_defaults(func=cmd_run)

    proxy = sub.add_parser(
        "proxy",
        help="run the data plane alone; an agent pushes its policy over the control socket",
        description="Serves and enforces from the state directory at once (last good policy, "
        "cache), takes policy pushes from 'fqdnguard agent' on STATE_DIR/control.sock, and keeps "
        "serving when the agent is gone. Several can share the listen port for a rolling "
        "restart: start the new one, then SIGTERM the old one.",
    )
    _data_plane_options(proxy, policy=False)
    _intercept_options(proxy)
    proxy.add_argument(
        "--control-socket",
        metavar="PATH",
        help="also serve the control API on PATH (e.g. a pod-private directory, for the "
        "agent and exec probes of this pod): never handed over, removed at exit; "
        "STATE_DIR/control.sock stays the hand-over rendezvous",
    )
    proxy.add_argument(
        "--socket-handover",
        choices=["fds", "reuseport"],
        default="fds",
        help="hot restart: take the listening sockets over from the running proxy over the "
        "control socket (fds, the default) or bind beside them and rely on reuseport "
        "steering (reuseport; loses intercepted UDP queries, see docs/split.md)",
    )
    proxy.set_defaults(func=cmd_proxy)

    agent = sub.add_parser(
        "agent",
        help="run the control plane alone: push the policy files to a running proxy",
        description="Compiles the policy and endpoints files and pushes them to the proxy "
        "whenever its policy differs (files changed, proxy or agent restarted). A set that "
        "does not compile is reported and never pushed. SIGHUP checks at once.",
    )
    agent.add_argument(
        "--policy",
        action="append",
        metavar="PATH",
        help="policy file or directory (repeatable; or --kubernetes)",
    )
    agent.add_argument("--endpoints", metavar="FILE", help="endpoints YAML file")
    target = agent.add_mutually_exclusive_group()
    target.add_argument("--state-dir", metavar="DIR", help="the proxy's state directory")
    target.add_argument("--socket", metavar="PATH", help="the proxy's control socket")
    agent.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often to check the files and the proxy (default 1)",
    )
    agent.add_argument(
        "--once",
        action="store_true",
        help="sync once, print the outcome, exit 0 when the proxy has the policy",
    )
    agent.add_argument(
        "--allow-empty-policy",
        action="store_true",
        help="push a policy file with no policy document or a directory with no policy file "
        "(by default such a set is not pushed: the proxy keeps the policy in force)",
    )
    _kubernetes_options(agent)
    agent.add_argument(
        "--unenforced-l7",
        choices=["deny", "allow-port"],
        default="deny",
        help="as the proxy's option: how the agent reads the policies it reports on",
    )
    agent.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    agent.set_defaults(func=cmd_agent)

    cache = sub.add_parser("cache", help="the FQDN cache of a running proxy")
    csub = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    clist = csub.add_parser(
        "list",
        help="print the names and IPs learned (like 'cilium fqdn cache list')",
        description="Asks the running proxy over its control socket; without one, reads the "
        "last snapshot in the state directory. Entries are printed as they arrive, grouped by "
        "endpoint and name but not sorted (pipe through sort).",
    )
    clist.add_argument("--state-dir", default="/var/lib/fqdnguard", metavar="DIR")
    clist.add_argument(
        "--endpoint",
        metavar="NS/NAME",
        help="only this endpoint (namespace/name, a name, or an id)",
    )
    clist.add_argument(
        "--name",
        metavar="PATTERN",
        help="only names matching PATTERN (with '*', as a matchPattern: '*.example.com'), or "
        "containing it",
    )
    clist.add_argument(
        "--endpoints",
        metavar="FILE",
        help="endpoints YAML file naming the endpoints (default: asked of the running "
        "fqdnguard, or the policy saved in the state directory)",
    )
    clist.add_argument(
        "--json", action="store_true", help="one JSON object per entry and line (NDJSON)"
    )
    clist.set_defaults(func=cmd_cache_list)

    check = sub.add_parser(
        "check",
        help="decide whether an endpoint may resolve a name, or reach an address (--to)",
        description="Prints the DNS verdict (--name) or the egress verdict (--to) and its "
        "explanation. Exit 0: allowed, 1: denied, 2: error.",
    )
    check.add_argument(
        "--policy",
        action="append",
        required=True,
        metavar="DIR",
        help="policy file or directory (repeatable)",
    )
    check.add_argument("--endpoints", required=True, metavar="FILE", help="endpoints YAML file")
    who = check.add_mutually_exclusive_group(required=True)
    who.add_argument("--ip", help="source address of the endpoint (looked up in --endpoints)")
    who.add_argument(
        "--labels",
        type=_labels,
        metavar="K=V,...",
        help="labels of the endpoint (namespace: io.kubernetes.pod.namespace=NS)",
    )
    check.add_argument(
        "--name",
        help="the DNS name queried; with --to, a name the address is taken to have resolved from",
    )
    check.add_argument(
        "--to",
        type=_destination,
        metavar="IP:PORT[/PROTO]",
        help="give the egress verdict for traffic to IP:PORT ([V6]:PORT; /tcp by default, /udp, "
        "/sctp) instead of a DNS verdict",
    )
    check.add_argument(
        "--state-dir",
        metavar="DIR",
        help="with --to: also the names the proxy with this state directory learned for the "
        "address (asked live, or read from what it saved)",
    )
    check.add_argument(
        "--port",
        type=_port,
        default=(53, "UDP"),
        metavar="PORT[/PROTO]",
        help="DNS port and protocol (default 53/udp)",
    )
    check.add_argument(
        "--server", metavar="IP", help="the DNS server asked (default: any server a rule admits)"
    )
    _policy_meaning_options(check, empty=True)
    check.set_defaults(func=cmd_check)

    intercept = sub.add_parser(
        "intercept",
        help="the node's interception rules",
        description="'cleanup' removes the nftables table, ip rules and routes that "
        "'run --intercept' and 'proxy --intercept' install (they belong to the node: left in "
        "place at exit, a hand-over and a crash, so enforcement holds); "
        "'status' prints what is installed. Needs CAP_NET_ADMIN.",
    )
    isub = intercept.add_subparsers(dest="intercept_command", required=True, metavar="COMMAND")
    for name, text in (
        ("cleanup", "remove the interception rules, ip rules and routes"),
        ("status", "print the installed interception state as JSON"),
    ):
        ip = isub.add_parser(name, help=text)
        ip.add_argument("--port", type=int, default=10053, help=argparse.SUPPRESS)
        ip.set_defaults(func=cmd_intercept)

    probe = sub.add_parser(
        "probe",
        help="liveness and readiness of a running proxy (Kubernetes exec probes)",
        description="'live': the proxy at the control socket answers. 'ready': it also has a "
        "policy in force (from its state directory or pushed by an agent). Exit 0 when so, 1 "
        "when not, with a one-line reason.",
    )
    probe.add_argument("probe_kind", choices=["live", "ready"], metavar="live|ready")
    probe.add_argument(
        "--socket",
        default=PROBE_SOCKET,
        metavar="PATH",
        help=f"the proxy's control socket (default {PROBE_SOCKET}, the DaemonSet's)",
    )
    probe.add_argument(
        "--timeout", type=float, default=3.0, metavar="SECONDS", help="how long to wait (3)"
    )
    probe.set_defaults(func=cmd_probe)

    policy = sub.add_parser("policy", help="policy tools")
    psub = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    plint = psub.add_parser(
        "lint",
        help="validate policies as Cilium would",
        description="Lists every problem with file:line. Exit 0 when clean, 2 on errors.",
    )
    plint.add_argument("paths", nargs="+", metavar="DIR", help="policy files or directories")
    plint.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when some feature is not enforced by fqdnguard",
    )
    _policy_meaning_options(plint, empty=True)
    plint.set_defaults(func=cmd_policy_lint)
    pstatus = psub.add_parser(
        "status",
        help="the policy a running fqdnguard has in force, and its last reloads",
        description="Asks the running 'fqdnguard run' or 'fqdnguard proxy' on its control "
        "socket (STATE_DIR/control.sock): the policy in force, where it came from, when it "
        "was loaded, and the last reloads (refused ones, and the endpoints each left with no "
        "egress restriction).",
    )
    pstatus.add_argument("--state-dir", required=True, metavar="DIR", help="its state directory")
    pstatus.add_argument("--json", action="store_true", help="JSON output")
    pstatus.set_defaults(func=cmd_policy_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except PolicyError as e:
        for err in e.errors:
            print(f"fqdnguard: error: {err.location()}", file=sys.stderr)
        return EXIT_ERROR
    except ConfigError as e:
        for problem in e.problems:
            print(f"fqdnguard: error: {problem}", file=sys.stderr)
        return EXIT_ERROR
    except (FqdnGuardError, ValueError, OSError, _UsageError, BackendError) as e:
        print(f"fqdnguard: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return status


if __name__ == "__main__":
    sys.exit(main())
