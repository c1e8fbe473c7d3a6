"""What Cilium rejects (its CRD schema or its rule sanitising, tests/cilium_rejects.py) fqdnguard
rejects too: an error in the loaders, `policy lint` and `run`, naming the policy, the rule and
the field. The CRD half is checked against the real API server in test_cilium_crd_oracle.py."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from fqdnguard import Policy, PolicyError
from fqdnguard.policy import lint

from tests.cilium_rejects import CASES, Case

REJECTED = [c for c in CASES if c.path is not None]
VALID = [c for c in CASES if c.path is None]


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.name)
def test_what_cilium_accepts_loads(case: Case) -> None:
    Policy.from_yaml(case.text())


@pytest.mark.parametrize("case", REJECTED, ids=lambda c: c.name)
def test_what_cilium_rejects_is_an_error_naming_the_policy_rule_and_field(case: Case) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(case.text(), filename="p.yaml")
    found = [e for e in info.value.errors if e.path == case.path and case.reason in e.reason]
    assert found, [e.location() for e in info.value.errors]
    if "Cilium rejects it" in found[0].reason:
        # The checks added from Cilium's sources name the policy as well as the field.
        assert f"(CiliumNetworkPolicy default/{case.name};" in found[0].reason


@pytest.mark.parametrize(
    "name", ["icmp-in-toports", "dns-on-ingress", "empty-rules", "empty-server-name"]
)
def test_policy_lint_and_run_refuse_what_cilium_rejects(name: str, tmp_path: pathlib.Path) -> None:
    case = next(c for c in CASES if c.name == name)
    f = tmp_path / "p.yaml"
    f.write_text(case.text())
    errors, _ = lint([str(f)])
    assert [e for e in errors if e.path == case.path], errors
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from fqdnguard.cli import main; sys.exit(main())",
            "policy",
            "lint",
            str(f),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{case.path}: " in proc.stdout + proc.stderr
    assert f"CiliumNetworkPolicy default/{name}" in proc.stdout + proc.stderr
    # `run` loads through Policy.load: the same error stops it.
    with pytest.raises(PolicyError):
        Policy.load([str(f)])
