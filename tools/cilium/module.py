#!/usr/bin/env python3
"""The Cilium Go module the tests compare fqdnguard with (its CRDs and rule sanitising), fetched
from the Go module proxy once per machine into ${XDG_CACHE_HOME:-~/.cache}/fqdnguard/gomod (a
GOMODCACHE of its own, keyed by version as Go keys every module).

    python3 tools/cilium/module.py fetch      # download if missing; print the module's directory
    python3 tools/cilium/module.py dir        # print it, exit 1 if not downloaded

The version is the one deploy/crds/README.md names; keep both in step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MODULE = "github.com/cilium/cilium"
VERSION = "v1.19.0"


def gomodcache() -> Path:
    """FQDNGUARD_GOMODCACHE, else ${XDG_CACHE_HOME:-~/.cache}/fqdnguard/gomod."""
    if explicit := os.environ.get("FQDNGUARD_GOMODCACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fqdnguard" / "gomod"


def module_dir() -> Path | None:
    """The extracted module, or None when it was never downloaded (or only partly)."""
    d = gomodcache() / f"{MODULE}@{VERSION}"
    return d if (d / "go.mod").is_file() else None


def fetch() -> Path:
    """Download the module unless it is there; its directory."""
    if (d := module_dir()) is not None:
        return d
    go = shutil.which("go") or "/usr/local/go/bin/go"
    env = {**os.environ, "GOMODCACHE": str(gomodcache()), "GOFLAGS": "-mod=mod"}
    err = ""
    for _ in range(2):  # one retry: a slow or briefly failing module proxy
        proc = subprocess.run(
            [go, "mod", "download", "-json", f"{MODULE}@{VERSION}"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            cwd=gomodcache().parent if gomodcache().parent.is_dir() else None,
        )
        if proc.returncode == 0:
            return Path(json.loads(proc.stdout)["Dir"])
        err = proc.stderr + proc.stdout
    raise SystemExit(f"go mod download {MODULE}@{VERSION} failed:\n{err[-2000:]}")


def main(argv: list[str]) -> int:
    if argv == ["fetch"]:
        print(fetch())
        return 0
    if argv == ["dir"]:
        d = module_dir()
        if d is None:
            print(
                f"{MODULE}@{VERSION} is not downloaded: run `make cilium-module`", file=sys.stderr
            )
            return 1
        print(d)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
