"""The ``fqdnguard`` command: ``check`` and ``policy lint`` (``run`` and ``cache`` come later).

Each subcommand is a function taking the parsed arguments and returning the exit status; adding
one is a parser in :func:`build_parser` and a function here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fqdnguard._core import FqdnGuardError
from fqdnguard.endpoints import Endpoint, Endpoints
from fqdnguard.policy import Policy, PolicyError, lint

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


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def cmd_check(args: argparse.Namespace) -> int:
    endpoints = Endpoints.load(args.endpoints)
    policy = Policy.load(args.policy, endpoints=endpoints)
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
    port, proto = args.port
    verdict = policy.dns_verdict(endpoint, args.server, port, proto, args.name)
    to = f"to {args.server} " if args.server else ""
    word = "ALLOWED" if verdict.allowed else "DENIED"
    print(f"{word}: DNS query for {args.name} from {who} {to}on port {port}/{proto}")
    print(f"  {verdict.reason}")
    for w in policy.warnings:
        print(f"  warning: {w}", file=sys.stderr)
    return EXIT_ALLOWED if verdict.allowed else EXIT_DENIED


def cmd_policy_lint(args: argparse.Namespace) -> int:
    errors, warnings = lint(args.paths)
    for e in errors:
        print(f"{e.location()}")
    for w in warnings:
        print(f"{w.file}:{w.line}: warning: {w.path}: not enforced by fqdnguard: {w.message}")
    n_err, n_warn = len(errors), len(warnings)
    print(f"{n_err} error(s), {n_warn} warning(s)", file=sys.stderr)
    return EXIT_ERROR if errors else (EXIT_DENIED if args.strict and warnings else 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fqdnguard", description="DNS-name egress firewall for containers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser(
        "check",
        help="decide whether an endpoint may resolve a name",
        description="Prints the DNS verdict and its explanation. Exit 0: allowed, 1: denied, "
        "2: error.",
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
    check.add_argument("--name", required=True, help="the DNS name queried")
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
    check.set_defaults(func=cmd_check)

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
    plint.set_defaults(func=cmd_policy_lint)
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
    except (FqdnGuardError, ValueError, OSError, _UsageError) as e:
        print(f"fqdnguard: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return status


if __name__ == "__main__":
    sys.exit(main())
