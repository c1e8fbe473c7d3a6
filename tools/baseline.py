"""The previous release of fqdnguard, built from this repository's history, for the tests that
hand a node over between two versions (tests/test_upgrade_versions_netns.py): a rolling update
from it to this checkout, and the rollback from this checkout to it.

The baseline is the commit named in ``tests/upgrade_baseline.txt`` (the last one that landed;
move it forward when a new one lands). Its tree is exported with ``git archive`` (no worktree,
nothing in this checkout changes) into ``${XDG_CACHE_HOME:-~/.cache}/fqdnguard/baseline/<commit>/``
and its extension module built there by cargo, with a target directory shared by every baseline so
that the next one compiles only what changed.

    python3 tools/baseline.py build      # make baseline-build: export and build once per commit
    python3 tools/baseline.py path       # its python/ directory (exit 1 when not built)

Standard library only, so that it runs before the package is built.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = ROOT / "tests" / "upgrade_baseline.txt"


class BaselineError(RuntimeError):
    """The baseline could not be exported or built; the message says why."""


def commit() -> str:
    """The pinned commit: the first word of the pin file's first line that is not a comment."""
    for line in PIN.read_text().splitlines():
        word = line.split("#", 1)[0].strip()
        if word:
            return word
    raise BaselineError(f"{PIN}: no commit named")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("FQDNGUARD_BASELINE_CACHE") or Path(base) / "fqdnguard" / "baseline")


def python_dir(rev: str | None = None) -> Path:
    """Where the baseline's package lives once built (``<dir>/fqdnguard``)."""
    return cache_root() / (rev or commit()) / "python"


def ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def built(rev: str | None = None) -> bool:
    return (python_dir(rev) / "fqdnguard" / f"_core{ext_suffix()}").is_file()


def git(*args: str, capture: bool = True) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=capture, check=False)


def have_commit(rev: str) -> bool:
    return git("cat-file", "-e", f"{rev}^{{commit}}").returncode == 0


def ensure_history(rev: str) -> None:
    """The commit's objects, fetching the rest of the history when this is a shallow clone."""
    if have_commit(rev):
        return
    shallow = git("rev-parse", "--is-shallow-repository").stdout.strip() == b"true"
    if shallow:
        git("fetch", "--quiet", "--unshallow")
    if not have_commit(rev):
        raise BaselineError(
            f"commit {rev} (tests/upgrade_baseline.txt) is not in this clone's history"
            + (" (a shallow clone that could not be deepened)" if shallow else "")
        )


def build(rev: str | None = None, *, quiet: bool = False) -> Path:
    """Exports and builds the baseline once; returns its python/ directory."""
    rev = rev or commit()
    if built(rev):
        return python_dir(rev)
    ensure_history(rev)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if built(rev):
            return python_dir(rev)
        dest = root / rev
        tmp = Path(tempfile.mkdtemp(prefix=f".{rev[:12]}-", dir=root))
        try:
            archive = subprocess.Popen(
                ["git", "-C", str(ROOT), "archive", "--format=tar", rev], stdout=subprocess.PIPE
            )
            untar = subprocess.run(["tar", "-x", "-C", str(tmp)], stdin=archive.stdout, check=False)
            if archive.stdout is not None:
                archive.stdout.close()
            if archive.wait() != 0 or untar.returncode != 0:
                raise BaselineError(f"git archive {rev} failed")
            env = {**os.environ, "CARGO_TARGET_DIR": str(root / "target")}
            cmd = ["cargo", "build", "--release", "--locked", "--features", "python", "--lib"]
            r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=quiet, text=True, check=False)
            if r.returncode != 0:
                tail = (r.stderr or "")[-3000:] if quiet else ""
                raise BaselineError(f"cargo build of {rev} failed (exit {r.returncode}){tail}")
            so = root / "target" / "release" / "lib_core.so"
            shutil.copy2(so, tmp / "python" / "fqdnguard" / f"_core{ext_suffix()}")
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return python_dir(rev)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["build", "path"])
    args = ap.parse_args()
    if args.command == "path":
        if not built():
            print(f"baseline {commit()} is not built (make baseline-build)", file=sys.stderr)
            return 1
        print(python_dir())
        return 0
    try:
        print(build())
    except (BaselineError, OSError) as e:
        print(f"baseline: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
