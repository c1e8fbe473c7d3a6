"""The container image without a Docker engine or a registry (``make image``): the repository's
``Dockerfile`` built with buildah from a local Debian base made by debootstrap, checked with
podman, and saved as an OCI archive::

    python3 tools/image/image.py all       # base, wheels, build, check, save (make image)
    python3 tools/image/image.py check     # the built image: --version, then a smoke query

Steps:

- ``base``: ``debootstrap --variant=minbase`` of Debian bookworm with the runtime's packages,
  kept as a tarball in ``${XDG_CACHE_HOME:-~/.cache}/fqdnguard/image/`` (keyed by the package
  list), imported into podman as ``debian:bookworm-slim``, the name the Dockerfile's runtime
  stage starts from (with a registry, the same Dockerfile pulls the real one instead);
- ``wheels``: the fqdnguard wheel built by maturin on this machine, and the wheels of its
  dependencies (``pip download``), into ``dist/image/``: the image installs from there with no
  index;
- ``build``: ``buildah bud`` of the Dockerfile's ``runtime`` target;
- ``check``: ``fqdnguard --version`` inside must be the wheel's version; then, in a network
  namespace made for the check (the container's host network: podman joins it), a Knot upstream
  on its loopback and ``fqdnguard run --backend nftables`` in the container with NET_ADMIN and
  NET_RAW only and a read-only root file system (as the DaemonSet runs it): an allowed name
  is answered and its address reaches the kernel set, a denied name is refused;
- ``save``: ``podman save --format oci-archive``; prints the image and archive sizes.

Needs root and the Debian packages debootstrap, buildah, podman and runc, knot (the upstream)
and iproute2. Standard library, plus dnspython and fqdnguard.testing (Knot) for the check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DIST = ROOT / "dist" / "image"
IMAGE = "localhost/fqdnguard"
BASE_IMAGE = "debian:bookworm-slim"
SUITE = "bookworm"
# What the runtime needs (the Dockerfile installs the same when its base lacks them): python3
# and venv (the image's virtual environment), nftables (libnftables for the backend), iproute2
# (ip rules and routes of interception).
BASE_PACKAGES = ("python3", "python3-venv", "nftables", "iproute2")
# What crun, the default runtime, cannot do here (cgroups in hybrid mode), and the limits that
# cannot be raised without saying them.
RUNTIME = ["--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# The proxy opens 1,024 upstream sockets per address family (RFC 5452), more than 1,024 files.
RUN_ULIMITS = ["--ulimit", "nofile=16384:16384", "--ulimit", "nproc=4096:4096"]
PODMAN = ["podman", *RUNTIME, "--cgroup-manager=cgroupfs"]


class ImageError(RuntimeError):
    """A step failed; the message says which and why."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fqdnguard" / "image"


def run(cmd: Sequence[str], *, capture: bool = False, **kw: object) -> str:
    proc = subprocess.run(
        list(cmd),
        capture_output=capture,
        text=True,
        check=False,
        **kw,  # type: ignore[call-overload]
    )
    if proc.returncode != 0:
        tail = (proc.stderr or "")[-3000:] if capture else ""
        raise ImageError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode})\n{tail}")
    return str(proc.stdout or "")


def version() -> str:
    """The package version (Cargo.toml's, which pyproject.toml takes)."""
    match = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    if match is None:
        raise ImageError("Cargo.toml has no version")
    return match.group(1)


def tag() -> str:
    return f"{IMAGE}:{version()}"


# --- steps ---------------------------------------------------------------------------------------


def base() -> Path:
    """The debootstrap tarball (made once, then cached), imported as BASE_IMAGE."""
    key = hashlib.sha256(",".join((SUITE, *BASE_PACKAGES)).encode()).hexdigest()[:12]
    tarball = cache_dir() / f"debian-{SUITE}-minbase-{key}.tar"
    if not tarball.is_file():
        cache_dir().mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".root-") as d:
            root = Path(d) / "root"
            include = ",".join(BASE_PACKAGES)
            run(["debootstrap", "--variant=minbase", f"--include={include}", SUITE, str(root)],
                capture=True)  # fmt: skip
            # What an image does not need: the package lists and caches, documentation.
            for sub in ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man"):
                for child in (root / sub).glob("*"):
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            partial = tarball.with_suffix(".partial")
            run(["tar", "-C", str(root), "-cf", str(partial), "."])
            partial.rename(tarball)
        print(f"base: debootstrap in {time.monotonic() - started:.0f} s -> {tarball}")
    else:
        print(f"base: cached {tarball}")
    # Imported again whenever the tarball is newer than the image (a new key, a cleared store).
    run([*PODMAN, "import", "--quiet", str(tarball), BASE_IMAGE], capture=True)
    return tarball


def wheels() -> Path:
    """The fqdnguard wheel (maturin, release) and its dependencies' wheels, in DIST."""
    if DIST.exists():
        shutil.rmtree(DIST)
    DIST.mkdir(parents=True)
    started = time.monotonic()
    run([sys.executable, "-m", "maturin", "build", "--release", "--out", str(DIST)], cwd=ROOT)
    built = sorted(DIST.glob("fqdnguard-*.whl"))
    if len(built) != 1:
        raise ImageError(f"maturin left {len(built)} fqdnguard wheels in {DIST}")
    # The dependencies, as binary wheels for this interpreter (bookworm's python3 is 3.11 too).
    run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
         "--only-binary=:all:", "--dest", str(DIST), str(built[0])])  # fmt: skip
    print(f"wheels: {len(list(DIST.glob('*.whl')))} in {time.monotonic() - started:.0f} s")
    return built[0]


def build() -> str:
    started = time.monotonic()
    dockerfile = str(ROOT / "Dockerfile")
    run(["buildah", "--storage-driver", "overlay", "bud", *RUNTIME, *ULIMITS, "--pull=never",
         "--layers", "--target", "runtime", "-t", tag(), "-f", dockerfile, str(ROOT)])  # fmt: skip
    print(f"build: {tag()} in {time.monotonic() - started:.0f} s")
    return tag()


SMOKE_ZONE = """$ORIGIN example.com.
$TTL 300
@   SOA ns.example.com. admin.example.com. 1 3600 600 86400 300
    NS  ns.example.com.
ns  A   192.0.2.1
www A   192.0.2.10
"""
SMOKE_ENDPOINTS = """endpoints:
  - name: pod
    namespace: default
    ips: [127.0.0.2]
    labels: {app: pod}
"""
SMOKE_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: smoke, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod}}
  egress:
    - toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules: {dns: [{matchName: www.example.com}]}
    - toFQDNs: [{matchName: www.example.com}]
"""
ASK = """
import socket, sys, dns.message, dns.rcode
out = []
for name in sys.argv[2:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.2", 0))
    s.settimeout(3)
    s.sendto(dns.message.make_query(name, "A").to_wire(), ("127.0.0.1", int(sys.argv[1])))
    answer = dns.message.from_wire(s.recv(65535))
    ips = [r.address for rr in answer.answer for r in rr if rr.rdtype == 1]
    out.append(f"{name} {dns.rcode.to_text(answer.rcode())} {','.join(ips)}")
print("\\n".join(out))
"""


def check() -> dict[str, object]:
    """--version inside; then the smoke query in a network namespace made for it."""
    from fqdnguard.testing import KnotServer  # noqa: PLC0415

    image = tag()
    said = run(
        [*PODMAN, "run", "--rm", *RUN_ULIMITS, image, "fqdnguard", "--version"], capture=True
    )
    if said.strip() != f"fqdnguard {version()}":
        raise ImageError(f"fqdnguard --version in {image} said {said.strip()!r}")
    print(f"check: {said.strip()}")
    netns = f"fqdnguard-image-{os.getpid()}"
    container = f"fqdnguard-smoke-{os.getpid()}"
    run(["ip", "netns", "add", netns])
    knot = None
    try:
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        knot = KnotServer({"example.com": SMOKE_ZONE}, "127.0.0.1", 53053, netns=netns)
        knot.start()
        with tempfile.TemporaryDirectory(prefix="fqdnguard-smoke-") as d:
            (Path(d) / "policy.yaml").write_text(SMOKE_POLICY)
            (Path(d) / "endpoints.yaml").write_text(SMOKE_ENDPOINTS)
            port = 5300
            run([*PODMAN, "run", "-d", "--name", container, *RUN_ULIMITS,
                 "--network", f"ns:/run/netns/{netns}", "--cap-drop", "ALL",
                 "--read-only", "--read-only-tmpfs=false",
                 "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
                 "-v", f"{d}:/etc/fqdnguard-smoke:ro", image,
                 "fqdnguard", "run", "--backend", "nftables", "--log-queries", "all",
                 "--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:53053",
                 "--policy", "/etc/fqdnguard-smoke/policy.yaml",
                 "--endpoints", "/etc/fqdnguard-smoke/endpoints.yaml"], capture=True)  # fmt: skip
            answers = _ask_when_serving(netns, port, container)
            ruleset = run(["ip", "netns", "exec", netns, "nft", "list", "ruleset"], capture=True)
        logs = run([*PODMAN, "logs", container], capture=True)
        if answers != ["www.example.com NOERROR 192.0.2.10", "www.other.org REFUSED "]:
            raise ImageError(f"smoke query answered {answers}\n{logs[-3000:]}")
        if "192.0.2.10" not in ruleset:
            raise ImageError(f"the allowed answer's address is not in the ruleset:\n{ruleset}")
        print("check: smoke query in the container: allowed NOERROR 192.0.2.10 (in the nftables"
              " set), denied REFUSED")  # fmt: skip
        return {"version": said.strip(), "answers": answers}
    finally:
        subprocess.run([*PODMAN, "rm", "-f", container], capture_output=True, check=False)
        if knot is not None:
            knot.stop()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def _ask_when_serving(netns: str, port: int, container: str, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", ASK, str(port),
             "www.example.com", "www.other.org"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode == 0:
            return proc.stdout.splitlines()
        if time.monotonic() > deadline:
            logs = subprocess.run(
                [*PODMAN, "logs", container], capture_output=True, text=True, check=False
            )
            raise ImageError(
                f"the container did not answer in {timeout:.0f} s: {proc.stderr[-500:]}\n"
                f"{logs.stdout[-2000:]}{logs.stderr[-2000:]}"
            )
        time.sleep(0.5)


def save() -> dict[str, int]:
    archive = DIST / f"fqdnguard-{version()}.oci.tar"
    archive.unlink(missing_ok=True)
    run([*PODMAN, "save", "--format", "oci-archive", "-o", str(archive), tag()], capture=True)
    inspect = json.loads(run([*PODMAN, "image", "inspect", tag()], capture=True))
    sizes = {"image_bytes": int(inspect[0]["Size"]), "archive_bytes": archive.stat().st_size}
    print(
        f"save: {archive}: image {sizes['image_bytes'] / 1e6:.0f} MB, "
        f"OCI archive {sizes['archive_bytes'] / 1e6:.0f} MB"
    )
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="image.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["base", "wheels", "build", "check", "save", "all"])
    args = parser.parse_args(argv)
    steps = {"base": base, "wheels": wheels, "build": build, "check": check, "save": save}
    started = time.monotonic()
    try:
        for name in steps if args.step == "all" else [args.step]:
            steps[name]()
    except (ImageError, OSError) as e:
        print(f"image {args.step}: {e}", file=sys.stderr)
        return 1
    print(f"image {args.step}: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
