"""Shared test configuration: hypothesis profiles chosen by HYPOTHESIS_PROFILE (dev, ci), and the
fixtures of the proxy integration tests (a real Knot upstream, a policy and its endpoints), and
the session's local Kubernetes control plane (``kube``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from fqdnguard import Endpoints, Policy
from fqdnguard.testing import KnotServer
from hypothesis import HealthCheck, settings

from tests.proxy_fixtures import ENDPOINTS, POLICY, UPSTREAM_IP, ZONE, require_knot

if TYPE_CHECKING:
    from tools.kube.localkube import KubeControlPlane

settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile(
    "ci",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="module")
def knot() -> Iterator[KnotServer]:
    require_knot()
    with KnotServer({"example.com": ZONE}, host=UPSTREAM_IP) as server:
        yield server


@pytest.fixture(scope="module")
def proxy_endpoints() -> Endpoints:
    return Endpoints.from_yaml(ENDPOINTS)


@pytest.fixture(scope="module")
def proxy_policy(proxy_endpoints: Endpoints) -> Policy:
    return Policy.from_yaml(POLICY, endpoints=proxy_endpoints)


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeControlPlane]:
    """A real control plane (etcd, kube-apiserver, kube-controller-manager) on loopback, shared by
    the session: each test uses its own namespaces and object names."""
    # Imported here, so that the other tests need none of what the control plane needs.
    from tests.kube import require_kube_binaries  # noqa: PLC0415
    from tools.kube.localkube import KubeControlPlane  # noqa: PLC0415

    require_kube_binaries()
    directory = tmp_path_factory.mktemp("kube")
    with KubeControlPlane(directory) as plane:
        yield plane
    shutil.rmtree(directory / "etcd")  # 65 MB of preallocated log; the logs and certificates stay
