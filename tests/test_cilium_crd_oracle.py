"""Cilium's own CRD, from the pinned Go module (tools/cilium/module.py, ``make cilium-module``),
as the oracle: installed in the real API server (the ``kube`` fixture), it takes or refuses each
object of tests/cilium_rejects.py, and fqdnguard's loader must agree. Objects the schema takes
but Cilium's agent refuses when it sanitises the rule are compared with fqdnguard's error, and
the table names the Cilium function that refuses them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fqdnguard import Policy, PolicyError

from tests.cilium_rejects import CASES, CILIUM_VERSION, Case
from tests.kube import create_namespace, wait_for_crds
from tools.cilium.module import VERSION, module_dir
from tools.kube.localkube import KubeControlPlane

ROOT = Path(__file__).resolve().parents[1]
CRD_FILES = ("ciliumnetworkpolicies.yaml", "ciliumclusterwidenetworkpolicies.yaml")


@pytest.fixture(scope="module")
def cilium_crds() -> Path:
    """The CRD directory of the pinned module; fails under CI when it was not fetched."""
    d = module_dir()
    if d is None:
        reason = f"github.com/cilium/cilium@{VERSION} is not downloaded: run `make cilium-module`"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return d / "pkg" / "k8s" / "apis" / "cilium.io" / "client" / "crds" / "v2"


def test_the_pinned_version_is_the_one_deploy_crds_holds(cilium_crds: Path) -> None:
    assert VERSION == CILIUM_VERSION
    assert f"**{VERSION}**" in (ROOT / "deploy" / "crds" / "README.md").read_text()
    assert f"Cilium {VERSION}" in (ROOT / "docs" / "policy.md").read_text()
    for name in CRD_FILES:
        assert (cilium_crds / name).read_bytes() == (ROOT / "deploy" / "crds" / name).read_bytes()


def _install(kube: KubeControlPlane, crds: Path) -> None:
    for name in CRD_FILES:
        kube.kubectl("apply", "--server-side", "-f", str(crds / name))
    wait_for_crds(
        kube, "ciliumnetworkpolicies.cilium.io", "ciliumclusterwidenetworkpolicies.cilium.io"
    )


def _fqdnguard_error(case: Case) -> PolicyError | None:
    try:
        Policy.from_yaml(case.text("oracle"), filename=f"{case.name}.json")
    except PolicyError as e:
        return e
    return None


def test_the_api_server_with_ciliums_crd_and_fqdnguard_agree(
    kube: KubeControlPlane, cilium_crds: Path
) -> None:
    _install(kube, cilium_crds)
    create_namespace(kube, "oracle")
    disagree = []
    for case in CASES:
        proc = kube.kubectl(
            "create", "--dry-run=server", "-f", "-", input=case.text("oracle"), check=False
        )
        api_accepts = proc.returncode == 0
        if not api_accepts:
            assert (
                "Invalid value" in proc.stderr
                or "Unsupported value" in proc.stderr
                or ("Required value" in proc.stderr or "must" in proc.stderr)
            ), proc.stderr  # refused by the schema, not for another reason
        error = _fqdnguard_error(case)
        ours = None if error is None else [e.location() for e in error.errors]
        cilium_accepts = case.path is None
        if api_accepts == case.schema or (not api_accepts and cilium_accepts):
            disagree.append(
                f"{case.name}: the table says schema={case.schema}, the API server "
                f"{'accepts' if api_accepts else 'refuses: ' + proc.stderr.strip()}"
            )
        if (error is None) != cilium_accepts:
            disagree.append(
                f"{case.name}: Cilium {'accepts' if cilium_accepts else 'refuses'}, "
                f"fqdnguard says {ours or 'valid'}"
            )
        if (
            error is not None
            and case.path is not None
            and not any(e.path == case.path for e in error.errors)
        ):
            disagree.append(f"{case.name}: fqdnguard names {ours}, not {case.path}")
        if api_accepts and not cilium_accepts:
            assert case.sanitizer, f"{case.name}: which Cilium function refuses it?"
    assert not disagree, "\n".join(disagree)
    assert {c.schema for c in CASES if c.path} == {True, False}
