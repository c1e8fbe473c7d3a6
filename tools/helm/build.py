"""helm and kubectl for the chart's tests and for operators without them: built from the Go module
proxy through the wrapper modules beside this file (``helm/`` pins helm.sh/helm/v3, ``kubectl/``
builds k8s.io/kubernetes/cmd/kubectl at the local control plane's version), once per machine, into
a cache keyed by the versions, like the control plane of ``tools/kube``::

    python3 tools/helm/build.py build       # make helm-build
    python3 tools/helm/build.py bin-dir     # where helm and kubectl are

Standard library only, plus ``tools/kube/localkube.py`` (the Go build and the cache root).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from tools.kube import localkube  # noqa: E402
from tools.kube.localkube import KubeError  # noqa: E402

HELM_MODULE = HERE / "helm"
KUBECTL_MODULE = HERE / "kubectl"
BINARIES = ("helm", "kubectl")


def helm_version() -> str:
    """The helm.sh/helm/v3 release the wrapper module pins (e.g. ``v3.18.6``)."""
    return localkube._required_version(HELM_MODULE / "go.mod", "helm.sh/helm/v3")


def kubectl_version() -> str:
    """The k8s.io/kubernetes release kubectl is built from: the control plane's."""
    return localkube._required_version(KUBECTL_MODULE / "go.mod", "k8s.io/kubernetes")


def _module_version(go_mod: Path, module: str) -> str:
    return localkube._required_version(go_mod, module)


def _ldflags_helm(version: str) -> str:
    """What helm's own Makefile sets: its version, and the Kubernetes version its client
    libraries speak (``helm template`` renders ``.Capabilities.KubeVersion`` from it)."""
    client_go = _module_version(HELM_MODULE / "go.mod", "k8s.io/client-go")
    match = re.fullmatch(r"v0\.(\d+)\.\d+", client_go)
    if match is None:
        raise KubeError(f"helm's k8s.io/client-go {client_go} is not a v0.X.Y release")
    minor = match.group(1)
    flags = ["-s", "-w", f"-X helm.sh/helm/v3/internal/version.version={version}"]
    flags.append("-X helm.sh/helm/v3/internal/version.gitTreeState=clean")
    for package in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        flags += [f"-X {package}.k8sVersionMajor=1", f"-X {package}.k8sVersionMinor={minor}"]
    return " ".join(flags)


def build_key() -> str:
    """The cache directory name: both versions, plus a digest of the wrapper modules and the
    link flags."""
    hver, kver = helm_version(), kubectl_version()
    digest = hashlib.sha256()
    for module in (HELM_MODULE, KUBECTL_MODULE):
        for name in ("go.mod", "go.sum"):
            digest.update((module / name).read_bytes())
    digest.update(_ldflags_helm(hver).encode())
    digest.update(localkube._ldflags_kubernetes(kver).encode())
    return f"helm-{hver}-kubectl-{kver}-{digest.hexdigest()[:12]}"


def cache_root() -> Path:
    """Beside the control plane's cache: ``fqdnguard/helm`` under the user's cache directory."""
    return localkube.cache_root().parent / "helm"


def bin_dir() -> Path:
    return cache_root() / build_key()


def is_built() -> bool:
    return (bin_dir() / "BUILD.json").is_file()


def binary(name: str) -> Path:
    """The cached helm or kubectl (raises NotBuilt when the cache does not hold it)."""
    path = bin_dir() / name
    if not (is_built() and path.is_file()):
        raise localkube.NotBuilt(f"{name} is not built ({path} is missing): run `make helm-build`")
    return path


def build(*, force: bool = False) -> Path:
    """Build helm and kubectl into the cache (unless they are there); return the directory."""

    def steps(go: str, work: Path, gocache: Path) -> dict[str, str]:
        hver, kver = helm_version(), kubectl_version()
        helm = ["helm.sh/helm/v3/cmd/helm"]
        localkube._go_build(go, HELM_MODULE, work / "helm", _ldflags_helm(hver), helm,
                            gocache=gocache)  # fmt: skip
        kubectl = ["k8s.io/kubernetes/cmd/kubectl"]
        ldflags = localkube._ldflags_kubernetes(kver)
        localkube._go_build(go, KUBECTL_MODULE, work / "kubectl", ldflags, kubectl,
                            gocache=gocache)  # fmt: skip
        return {"helm": hver, "kubectl": kver}

    what = "about 14 minutes the first time on 2 busy cores, most of it kubectl"
    return localkube.cached_go_build(bin_dir(), what, steps, force=force)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build helm and kubectl into the cache unless they are there")
    b.add_argument("--force", action="store_true", help="build again even if cached")
    sub.add_parser("bin-dir", help="print the cache directory holding helm and kubectl")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            cached = is_built() and not args.force
            target = build(force=args.force)
            stamp = json.loads((target / "BUILD.json").read_text())
            print(f"{'cached' if cached else 'built'}: {target} ({stamp})")
        else:
            print(bin_dir())
    except KubeError as e:
        print(f"helm build: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
