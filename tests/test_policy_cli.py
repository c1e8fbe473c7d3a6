"""`fqdnguard check` and `fqdnguard policy lint` as a user runs them: exit codes and output."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
POLICIES = str(EXAMPLES / "policies")
ENDPOINTS = str(EXAMPLES / "endpoints.yaml")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fqdnguard.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "code", "first_line"),
    [
        (["--ip", "10.244.1.5", "--name", "api.github.com", "--server", "10.96.0.10"], 0,
         "ALLOWED: DNS query for api.github.com from default/web-6d4cf56db6-abcde (10.244.1.5) "
         "to 10.96.0.10 on port 53/UDP"),
        (["--ip", "10.244.1.5", "--name", "evil.com", "--port", "53/tcp"], 1,
         "DENIED: DNS query for evil.com from default/web-6d4cf56db6-abcde (10.244.1.5) on port "
         "53/TCP"),
        (["--ip", "10.244.1.5", "--name", "api.github.com", "--server", "8.8.8.8"], 1, "DENIED"),
        (["--labels", "app=crawler,io.kubernetes.pod.namespace=batch", "--name",
          "x.y.example.org"], 0, "ALLOWED"),
        (["--labels", "app=legacy,k8s:io.kubernetes.pod.namespace=legacy", "--name", "a.b"], 0,
         "ALLOWED"),
    ],
)  # fmt: skip
def test_check_exit_codes(args: list[str], code: int, first_line: str) -> None:
    r = run("check", "--policy", POLICIES, "--endpoints", ENDPOINTS, *args)
    assert r.returncode == code, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(first_line)
    assert lines[1].startswith("  allowed" if code == 0 else "  denied")


def test_check_explains_the_rule() -> None:
    r = run("check", "--policy", POLICIES, "--endpoints", ENDPOINTS, "--ip", "10.244.1.5",
            "--name", "raw.githubusercontent.com")  # fmt: skip
    assert r.returncode == 0
    assert "CiliumNetworkPolicy default/web-github egress rule 0" in r.stdout
    assert 'matchPattern: "*.githubusercontent.com"' in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ip", "10.9.9.9", "--name", "a.com"], "no endpoint in"),
        (["--ip", "10.244.1.5", "--name", "a..com"], "invalid name"),
        (["--ip", "10.244.1.5", "--name", "a.com", "--server", "dns"], "invalid IP address"),
        (["--ip", "10.244.1.5", "--name", "a.com", "--port", "53/icmp"], "PORT"),
        (["--name", "a.com"], "one of the arguments --ip --labels is required"),
    ],
)
def test_check_errors_exit_2(args: list[str], message: str) -> None:
    r = run("check", "--policy", POLICIES, "--endpoints", ENDPOINTS, *args)
    assert r.returncode == 2
    assert message in r.stderr


def test_check_bad_policy_exits_2(tmp_path: pathlib.Path) -> None:
    (tmp_path / "p.yaml").write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n")
    r = run("check", "--policy", str(tmp_path), "--endpoints", ENDPOINTS, "--ip", "10.244.1.5",
            "--name", "a.com")  # fmt: skip
    assert r.returncode == 2
    assert f"{tmp_path / 'p.yaml'}:1: metadata: required field is missing" in r.stderr


def test_lint_clean_and_dirty(tmp_path: pathlib.Path) -> None:
    r = run("policy", "lint", POLICIES)
    assert r.returncode == 0 and r.stdout == ""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n"
        "  endpointSelector: {}\n  egress:\n  - toFQDNs: [{matchPattern: 'a b'}]\n"
        "  - toEntities: [health]\n  - toPorts: [{ports: [{port: 53}]}]\n"
    )
    r = run("policy", "lint", str(tmp_path))
    assert r.returncode == 2
    assert r.stdout.splitlines() == [
        f'{bad}:7: spec.egress[0].toFQDNs[0].matchPattern: invalid matchPattern "a b": '
        "character ' ' at position 1 is not allowed (only letters, digits, '-', '_', '.' and "
        "'*')",
        f"{bad}:9: spec.egress[2].toPorts[0].ports[0].port: must be a string, not an integer "
        "(quote it)",
        f"{bad}:8: warning: spec.egress[1].toEntities[0]: not enforced by fqdnguard: entity "
        "'health': Cilium's health endpoints (allows nothing)",
    ]
    assert "2 error(s), 1 warning(s)" in r.stderr


def test_lint_strict_fails_on_warnings(tmp_path: pathlib.Path) -> None:
    (tmp_path / "w.yaml").write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n"
        "  endpointSelector: {}\n  ingress: [{}]\n"
    )
    assert run("policy", "lint", str(tmp_path)).returncode == 0
    assert run("policy", "lint", "--strict", str(tmp_path)).returncode == 1


def test_console_script_is_declared() -> None:
    text = (EXAMPLES.parent / "pyproject.toml").read_text()
    assert 'fqdnguard = "fqdnguard.cli:main"' in text
