"""Go programs the tests and benchmarks run against, built from the Go module proxy once per
machine and cached under ``${XDG_CACHE_HOME:-~/.cache}/fqdnguard/go/`` (or ``FQDNGUARD_GO_CACHE``),
keyed by a digest of what decides the binary: the module's go.mod, go.sum and Go sources, and the
Go version. The product itself stays Rust and Python.

    python3 tools/gobuild.py build [NAME ...]     # make go-build: every program, or the ones named
    python3 tools/gobuild.py path NAME            # the cached binary (exit 1 when not built)

Standard library only, so that it runs before the package is built.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script
    sys.path.insert(0, str(HERE.parent))

from tools.kube.localkube import go_binary  # noqa: E402


class GoBuildError(RuntimeError):
    """A program could not be built; the message says why (with the compiler's output)."""


class GoMissing(GoBuildError):
    """The Go toolchain is not installed."""


@dataclass(frozen=True)
class Program:
    """One binary: the Go module (a directory under tools/) and the package to build in it."""

    name: str
    module: Path
    package: str
    #: What the program is, for messages.
    what: str
    #: Built by `build` with no names (make go-build, CI).
    default: bool = True


PROGRAMS = {
    p.name: p
    for p in (
        Program(
            "cilium-matchpattern",
            HERE / "cilium",
            "./matchpattern",
            "the differential oracle of toFQDNs matching, Cilium's pkg/fqdn/matchpattern",
        ),
        Program(
            "blocky",
            HERE / "peers" / "blocky",
            "github.com/0xERR0R/blocky",
            "Blocky, a filtering DNS proxy (benches/peers)",
        ),
        # Builds in about 10 minutes and 6 CPU-minutes on 2 busy cores, so CI does not build it:
        # the full run of benches/peers/run.py drives it (peer cilium-sdp) when it is built.
        Program(
            "cilium-standalone-dns-proxy",
            HERE / "peers" / "cilium-dnsproxy",
            "github.com/cilium/cilium/standalone-dns-proxy",
            "Cilium's standalone DNS proxy (benches/peers, peer cilium-sdp)",
            default=False,
        ),
        # Its agent end (the FQDNData gRPC server), ours: only of use with the proxy above.
        Program(
            "cilium-sdp-agent",
            HERE / "peers" / "cilium-sdp-agent",
            ".",
            "the agent end of Cilium's standalone DNS proxy (benches/peers, peer cilium-sdp)",
            default=False,
        ),
    )
}


def cache_root() -> Path:
    if explicit := os.environ.get("FQDNGUARD_GO_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fqdnguard" / "go"


def _go_version(go: str) -> str:
    return subprocess.run(
        [go, "env", "GOVERSION"], capture_output=True, text=True, check=True
    ).stdout.strip()


def build_key(program: Program, go: str | None = None) -> str:
    """The cache directory name: the program's name and a digest of its module's go.mod, go.sum
    and Go sources, and of the Go version (none when Go is missing: the key then finds nothing
    built by a toolchain)."""
    digest = hashlib.sha256()
    files = [program.module / "go.mod", program.module / "go.sum"]
    files += sorted(program.module.rglob("*.go"))
    for f in files:
        digest.update(str(f.relative_to(program.module)).encode() + b"\0")
        digest.update(f.read_bytes() + b"\0")
    digest.update(program.package.encode())
    go = go or go_binary()
    digest.update((_go_version(go) if go else "no-go").encode())
    return f"{program.name}-{digest.hexdigest()[:16]}"


def binary_path(name: str) -> Path:
    program = PROGRAMS[name]
    return cache_root() / build_key(program) / name


def is_built(name: str) -> bool:
    return binary_path(name).is_file()


def build(name: str, *, force: bool = False) -> Path:
    """Build the named program into the cache unless it is there; return the binary's path."""
    program = PROGRAMS[name]
    go = go_binary()
    if go is None:
        raise GoMissing(f"the Go toolchain is not installed (`go` is not on PATH): {program.what}")
    target = cache_root() / build_key(program, go)
    binary = target / name
    if binary.is_file() and not force:
        return binary
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file() and not force:
            return binary
        print(f"building {name} ({program.what}) from the Go module proxy", flush=True)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        # The compiled packages are of no use once the binary is cached: unless GOCACHE is set
        # they go to a directory removed after the build.
        gocache = os.environ.get("GOCACHE") or str(work / ".gocache")
        env = {**os.environ, "CGO_ENABLED": "0", "GOCACHE": gocache, "GOFLAGS": "-mod=mod"}
        cmd = [go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(work / name)]
        try:
            # One retry: a slow or briefly failing module proxy should not fail the build.
            for attempt in (1, 2):
                proc = subprocess.run(
                    [*cmd, program.package],
                    cwd=program.module,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if proc.returncode == 0:
                    break
                if attempt == 2:
                    raise GoBuildError(f"go build of {name} failed twice:\n{proc.stderr[-4000:]}")
                print(f"go build of {name} failed, retrying once:\n{proc.stderr[-2000:]}")
                time.sleep(5)
            shutil.rmtree(work / ".gocache", ignore_errors=True)
            stamp = {"go": _go_version(go), "seconds": round(time.monotonic() - started, 1)}
            (work / "BUILD.json").write_text(json.dumps(stamp, indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            work.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "build", help="build the programs named (when none: all but the optional) unless cached"
    )
    b.add_argument("names", nargs="*", metavar="NAME", help=", ".join(PROGRAMS))
    p = sub.add_parser("path", help="print the cached binary's path; exit 1 when not built")
    p.add_argument("name", choices=list(PROGRAMS))
    args = parser.parse_args(argv)
    if args.command == "path":
        path = binary_path(args.name)
        print(path)
        return 0 if path.is_file() else 1
    unknown = [n for n in args.names if n not in PROGRAMS]
    if unknown:
        parser.error(f"unknown program {', '.join(unknown)}: choose from {', '.join(PROGRAMS)}")
    for name in args.names or [n for n, p in PROGRAMS.items() if p.default]:
        started = time.monotonic()
        try:
            path = build(name)
        except GoBuildError as e:
            print(f"gobuild: {e}", file=sys.stderr)
            return 1
        print(f"{name}: {path} ({time.monotonic() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
