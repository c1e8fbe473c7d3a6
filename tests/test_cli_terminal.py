"""The project as the person at the terminal meets it: the Makefile and the README's
prerequisites, configuration and file errors, start-up warnings, ``check --to``, ``cache list``,
``intercept`` on a clean node, and the demo."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

from tests.test_policy_cli import run

ROOT = pathlib.Path(__file__).resolve().parent.parent


# -- make: a project venv, and a demo that installs only what it uses --------------------------


def make_n(*args: str) -> list[str]:
    """The commands ``make`` would run (dry run, nothing is executed)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "--no-print-directory", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return r.stdout.splitlines()


def installs(lines: list[str]) -> list[str]:
    return [ln for ln in lines if re.search(r"\bpip\b.* install\b", ln)]


@pytest.mark.parametrize("target", ["deps", "build-dev", "demo", "test"])
def test_make_installs_into_the_project_venv(target: str) -> None:
    lines = make_n(target, "VENV=.venv")
    pips = installs(lines)
    assert pips, lines
    for ln in pips:
        assert ln.startswith(".venv/bin/python -m pip install"), ln
    runs = [ln for ln in lines if re.search(r"\bpython3?\b", ln) and ln not in pips]
    for ln in [ln for ln in runs if not ln.startswith("missing=")]:  # the Debian packages
        # The venv is made from the machine's python3; everything else runs the venv's.
        assert ln.startswith((".venv/bin/python ", "python3 -m venv ")), ln


def test_make_python_stays_overridable() -> None:
    lines = make_n("deps", "PYTHON=/opt/py/bin/python3")
    assert all(ln.startswith("/opt/py/bin/python3 -m pip") for ln in installs(lines))
    assert not any(" -m venv " in ln for ln in lines), "no venv is made for another PYTHON"


def test_make_demo_installs_only_what_the_demo_uses() -> None:
    demo = "\n".join(make_n("demo"))
    for unused in ("dnsperf", "dnsdist", "hypothesis", "pytest", "matplotlib", "mypy", "ruff"):
        assert unused not in demo, unused
    assert "knot" in demo


def test_readme_names_the_prerequisites_and_what_the_demo_installs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Commands") : readme.index("```sh\nmake test")]
    for needed in ("Linux", "root", "apt-get", "Rust toolchain", ".venv", "nftables"):
        assert needed in section, needed
    pairs = re.search(r"for b in (.*?); do", "\n".join(make_n("demo-deps")))
    assert pairs is not None
    for pkg in [p.split(":")[1] for p in pairs.group(1).split()]:
        assert f"`{pkg}`" in section, pkg
