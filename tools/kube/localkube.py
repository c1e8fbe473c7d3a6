"""A local Kubernetes control plane for tests, benchmarks and the demo: etcd, kube-apiserver and
kube-controller-manager (kube-scheduler on request) on loopback, with TLS everywhere,
service-account signing keys and RBAC. No kubelet runs: pods are created with ``spec.nodeName``
and their status is set through the status subresource.

The binaries are built from the Go module proxy through the wrapper modules beside this file
(``etcd/`` and ``kubernetes/``), once per machine, into a cache keyed by the versions::

    python3 tools/kube/localkube.py build          # make kube-build
    python3 tools/kube/localkube.py up DIR         # make kube-up KUBE_DIR=DIR
    python3 tools/kube/localkube.py down DIR       # make kube-down KUBE_DIR=DIR

``DIR/admin.kubeconfig`` is the cluster administrator's kubeconfig. Python callers use
:class:`KubeControlPlane` (the pytest fixture in ``tests/kube.py`` does). Standard library and
``cryptography`` (pyca; only to start a cluster, for its certificates), so that it runs before
the package is built.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

HERE = Path(__file__).resolve().parent
KUBERNETES_MODULE = HERE / "kubernetes"
ETCD_MODULE = HERE / "etcd"
BINARIES = ("etcd", "etcdctl", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
# Components in start order; stopped in the reverse order.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")

# The kubernetes Service's EndpointSlice names the API server's advertised address, and the API
# refuses loopback addresses in endpoints. So the default is a documentation address (RFC 5737):
# it only appears in objects; nothing here (no kubelet, no kube-proxy) sends traffic to it.
DEFAULT_ADVERTISE_ADDRESS = "192.0.2.1"
DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Without kubelets no node ever heartbeats, so the node lifecycle controller would mark every
# registered Node unreachable and evict its pods after five minutes. Everything else runs,
# including the bootstrap-token controllers that are off by default.
CONTROLLERS = "*,bootstrapsigner,tokencleaner,-node-lifecycle-controller"


class KubeError(RuntimeError):
    """The local control plane could not be built, started or stopped; the message says why."""


class GoMissing(KubeError):
    """The Go toolchain is not installed, so the binaries cannot be built."""


class NotBuilt(KubeError):
    """The binaries are not in the cache yet (``make kube-build``)."""


# --- versions and the build ----------------------------------------------------------------------


def _required_version(go_mod: Path, module: str) -> str:
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", go_mod.read_text(), re.M)
    if match is None:
        raise KubeError(f"{go_mod} does not require {module}")
    return match.group(1)


def kubernetes_version() -> str:
    """The k8s.io/kubernetes release the wrapper module pins (e.g. ``v1.33.13``)."""
    return _required_version(KUBERNETES_MODULE / "go.mod", "k8s.io/kubernetes")


def etcd_version() -> str:
    return _required_version(ETCD_MODULE / "go.mod", "go.etcd.io/etcd/server/v3")


def cache_root() -> Path:
    """Where built binaries are kept: FQDNGUARD_KUBE_CACHE, else the user's cache directory."""
    if explicit := os.environ.get("FQDNGUARD_KUBE_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fqdnguard" / "kube"


def _ldflags_kubernetes(version: str) -> str:
    match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+", version)
    if match is None:
        raise KubeError(f"k8s.io/kubernetes {version} is not a release version vX.Y.Z")
    major, minor = match.groups()
    # Without these the servers report v0.0.0-master, and clients warn about the version skew.
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        for name, value in (
            ("gitVersion", version),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        ):
            flags.append(f"-X {package}.{name}={value}")
    return " ".join(flags)


def build_key() -> str:
    """The cache directory name: both versions, plus a digest of what else decides the binaries
    (the wrapper modules' go.mod and go.sum, and the link flags)."""
    kver, ever = kubernetes_version(), etcd_version()
    digest = hashlib.sha256()
    for module in (KUBERNETES_MODULE, ETCD_MODULE):
        for name in ("go.mod", "go.sum"):
            digest.update((module / name).read_bytes())
    digest.update(_ldflags_kubernetes(kver).encode())
    return f"kubernetes-{kver}-etcd-{ever}-{digest.hexdigest()[:12]}"


def bin_dir() -> Path:
    return cache_root() / build_key()


def is_built() -> bool:
    return (bin_dir() / "BUILD.json").is_file()


def go_binary() -> str | None:
    """The go command: on PATH, else where Go's own installer puts it."""
    fallback = Path("/usr/local/go/bin/go")
    return shutil.which("go") or (str(fallback) if fallback.is_file() else None)


def kubectl_binary() -> str | None:
    """kubectl on PATH, else the one ``make helm-build`` builds at this control plane's version
    (tools/helm/build.py, cached beside these binaries)."""
    found = shutil.which("kubectl")
    if found is not None:
        return found
    built = sorted(
        cache_root().parent.glob(f"helm/helm-*-kubectl-{kubernetes_version()}-*/kubectl")
    )
    return str(built[-1]) if built else None


def _go() -> str:
    go = go_binary()
    if go is None:
        raise GoMissing(
            "the Go toolchain is not installed (`go` is not on PATH): the local Kubernetes "
            "control plane is built from the Go module proxy with it"
        )
    return go


def _go_build(
    go: str, module: Path, out: Path, ldflags: str, packages: Sequence[str], *, gocache: Path
) -> None:
    env = {**os.environ, "CGO_ENABLED": "0", "GOCACHE": str(gocache)}
    # -o: into the directory out, or, for one package, to the file out.
    target = f"{out}/" if len(packages) > 1 else str(out)
    cmd = [go, "build", "-trimpath", "-ldflags", ldflags, "-o", target, *packages]
    # One retry: a slow or briefly failing module proxy should not fail the build. What was
    # downloaded and compiled before the failure is in Go's caches, so the retry is cheap.
    for attempt in (1, 2):
        proc = subprocess.run(cmd, cwd=module, env=env, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        if attempt == 1:
            print(f"go build in {module.name} failed, retrying once:\n{proc.stderr[-2000:]}")
            time.sleep(5)
    raise KubeError(f"go build in {module} failed twice:\n{proc.stderr[-4000:]}")


def cached_go_build(
    target: Path,
    what: str,
    steps: Callable[[str, Path, Path], dict[str, str]],
    *,
    force: bool = False,
) -> Path:
    """Build into ``target`` (a directory of the cache, named by the versions) unless it holds a
    finished build (``BUILD.json``): ``steps(go, work, gocache)`` builds into ``work`` and returns
    the versions to stamp; ``what`` says what is built, for the one line printed first."""
    if (target / "BUILD.json").is_file() and not force:
        return target
    go = _go()
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    # Two builds at once (two make runs, two test sessions) would do the work twice: serialise.
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "BUILD.json").is_file() and not force:
            return target
        print(f"building {target.name} into {root} from the Go module proxy: {what}", flush=True)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        work.chmod(0o755)
        # The compiled packages take gigabytes and are of no use once the binaries are cached,
        # so unless GOCACHE is set they go to a directory removed after the build.
        gocache = Path(os.environ.get("GOCACHE") or work / ".gocache")
        try:
            versions = steps(go, work, gocache)
            shutil.rmtree(work / ".gocache", ignore_errors=True)
            go_version = subprocess.run(
                [go, "env", "GOVERSION"], capture_output=True, text=True, check=True
            ).stdout.strip()
            stamp = {**versions, "go": go_version, "seconds": round(time.monotonic() - started, 1)}
            (work / "BUILD.json").write_text(json.dumps(stamp, indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            work.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def build(*, force: bool = False) -> Path:
    """Build etcd, etcdctl, kube-apiserver, kube-controller-manager and kube-scheduler into the
    cache (unless they are there) and return the directory holding them."""

    def steps(go: str, work: Path, gocache: Path) -> dict[str, str]:
        kver, ever = kubernetes_version(), etcd_version()
        _go_build(
            go,
            KUBERNETES_MODULE,
            work,
            _ldflags_kubernetes(kver),
            [f"k8s.io/kubernetes/cmd/{name}" for name in BINARIES if name.startswith("kube-")],
            gocache=gocache,
        )
        etcd = ["go.etcd.io/etcd/server/v3"]
        _go_build(go, ETCD_MODULE, work / "etcd", "-s -w", etcd, gocache=gocache)
        etcdctl = ["go.etcd.io/etcd/etcdctl/v3"]
        _go_build(go, ETCD_MODULE, work / "etcdctl", "-s -w", etcdctl, gocache=gocache)
        return {"kubernetes": kver, "etcd": ever}

    what = "about 12 minutes and 150 MB of downloads the first time on 2 cores"
    return cached_go_build(bin_dir(), what, steps, force=force)


# --- certificates --------------------------------------------------------------------------------


@dataclass
class _Leaf:
    """A certificate signed by one of the CAs: file name, subject, names, usages."""

    name: str
    common_name: str
    organizations: list[str] = field(default_factory=list)
    sans: list[str] = field(default_factory=list)
    server: bool = False
    client: bool = False
    ca: str = "ca"


@dataclass
class _Pki:
    """The cluster's certificates and keys, made with pyca/cryptography, in DIR/pki."""

    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    def ensure(self, advertise_address: str, service_cidr: str) -> None:
        """Make whatever is missing; a directory that has them keeps them (a restarted cluster
        keeps its CA, so the tokens and kubeconfigs it issued stay valid)."""
        try:
            from cryptography import x509  # noqa: PLC0415 (building or stopping needs none of it)
            from cryptography.x509.oid import NameOID  # noqa: PLC0415
        except ImportError:
            raise KubeError(
                "the Python package cryptography is not installed (make deps, or pip install "
                "'cryptography>=42'): the control plane's certificates are made with it"
            ) from None
        self.directory.mkdir(parents=True, exist_ok=True)
        # The cluster CA, and the front proxy's: the API server trusts the latter only for
        # requests the aggregation layer forwards (and says so in kube-system's
        # extension-apiserver-authentication ConfigMap, which the other servers read).
        for ca, common_name in (("ca", "fqdnguard-local"), ("front-proxy-ca", "front-proxy")):
            if not self.path(f"{ca}.crt").exists():
                key = self._new_key(f"{ca}.key")
                name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
                self._write_cert(f"{ca}.crt", name, key, name, key, ca=True)
        if not self.path("sa.key").exists():
            key = self._new_key("sa.key")
            self._write_public("sa.pub", key)
        api_ip = next(iter(ipaddress.ip_network(service_cidr).hosts()))  # the kubernetes Service
        local = ["127.0.0.1", "localhost"]
        api_names = [
            *local,
            advertise_address,
            str(api_ip),
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        leaves = [
            _Leaf("etcd", "etcd", sans=local, server=True, client=True),
            _Leaf("apiserver-etcd-client", "kube-apiserver-etcd-client", client=True),
            _Leaf("apiserver", "kube-apiserver", sans=api_names, server=True),
            _Leaf("admin", "fqdnguard-admin", organizations=["system:masters"], client=True),
            _Leaf("controller-manager", "system:kube-controller-manager", client=True),
            _Leaf("controller-manager-serving", "kube-controller-manager", sans=local, server=True),
            _Leaf("scheduler", "system:kube-scheduler", client=True),
            _Leaf("scheduler-serving", "kube-scheduler", sans=local, server=True),
            _Leaf("front-proxy-client", "front-proxy-client", client=True, ca="front-proxy-ca"),
        ]
        for leaf in leaves:
            if not self.path(f"{leaf.name}.crt").exists():
                self._leaf(leaf)

    def _new_key(self, name: str) -> ec.EllipticCurvePrivateKey:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        _write_private(self.path(name), pem)
        return key

    def _write_public(self, name: str, key: ec.EllipticCurvePrivateKey) -> None:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.path(name).write_bytes(pem)

    def _load_ca(self, ca: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        from cryptography import x509  # noqa: PLC0415
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

        cert = x509.load_pem_x509_certificate(self.path(f"{ca}.crt").read_bytes())
        key = serialization.load_pem_private_key(self.path(f"{ca}.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KubeError(f"{self.path(f'{ca}.key')} is not the EC key this tool makes")
        return cert, key

    def _leaf(self, leaf: _Leaf) -> None:
        from cryptography import x509  # noqa: PLC0415
        from cryptography.x509.oid import NameOID  # noqa: PLC0415

        ca_cert, ca_key = self._load_ca(leaf.ca)
        key = self._new_key(f"{leaf.name}.key")
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in leaf.organizations]
        subject = x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, leaf.common_name)])
        self._write_cert(
            f"{leaf.name}.crt",
            subject,
            key,
            ca_cert.subject,
            ca_key,
            sans=leaf.sans,
            server=leaf.server,
            client=leaf.client,
        )

    def _write_cert(
        self,
        name: str,
        subject: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name,
        issuer_key: ec.EllipticCurvePrivateKey,
        *,
        ca: bool = False,
        sans: Sequence[str] = (),
        server: bool = False,
        client: bool = False,
    ) -> None:
        from cryptography import x509  # noqa: PLC0415
        from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
        from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: PLC0415

        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if sans:
            general: list[x509.GeneralName] = []
            for san in sans:
                try:
                    general.append(x509.IPAddress(ipaddress.ip_address(san)))
                except ValueError:
                    general.append(x509.DNSName(san))
            builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
        cert = builder.sign(issuer_key, hashes.SHA256())
        self.path(name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(
    path: Path,
    server: str,
    ca: Path,
    *,
    user: str,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
) -> Path:
    """A kubeconfig with the certificates embedded, for a client certificate or a bearer token."""
    if (cert is None) == (token is None):
        raise ValueError("a kubeconfig needs either a client certificate or a token")
    if token is not None:
        credentials = f"    token: {token}\n"
    else:
        assert cert is not None and key is not None
        credentials = (
            f"    client-certificate-data: {_b64(cert)}\n    client-key-data: {_b64(key)}\n"
        )
    text = (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        "- name: local\n"
        "  cluster:\n"
        f"    server: {server}\n"
        f"    certificate-authority-data: {_b64(ca)}\n"
        "users:\n"
        f"- name: {user}\n"
        "  user:\n"
        f"{credentials}"
        "contexts:\n"
        f"- name: {user}@local\n"
        "  context:\n"
        "    cluster: local\n"
        f"    user: {user}\n"
        f"current-context: {user}@local\n"
    )
    _write_private(path, text.encode())
    return path


# --- the control plane ---------------------------------------------------------------------------


def _dying_with_parent(cmd: list[str]) -> list[str]:
    """cmd run so that it gets SIGTERM when the thread that started it exits (util-linux's
    setpriv sets PR_SET_PDEATHSIG and execs it; no Python runs between fork and exec)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *cmd] if setpriv else cmd


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Component:
    name: str
    args: list[str]
    pid: int | None = None


@dataclass
class KubeControlPlane:
    """etcd, kube-apiserver and kube-controller-manager (and kube-scheduler if asked) on loopback,
    with their data, certificates, logs and state in ``directory``.

    ``up()`` starts them and waits until the API server is ready and the controller manager has
    made the ``default`` ServiceAccount; ``down()`` stops them and keeps the data, so a later
    ``up()`` on the same directory finds every object again. The state (ports, process ids) is in
    ``directory/cluster.json``, so ``down()`` works from another process (``make kube-down``).
    """

    directory: Path
    scheduler: bool = False
    advertise_address: str = DEFAULT_ADVERTISE_ADDRESS
    service_cidr: str = DEFAULT_SERVICE_CIDR
    apiserver_args: list[str] = field(default_factory=list)
    controller_manager_args: list[str] = field(default_factory=list)
    binaries: Path | None = None
    detached: bool = False
    ports: dict[str, int] = field(default_factory=dict)
    components: dict[str, _Component] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # the components this process started
        self.pki = _Pki(self.directory / "pki")

    # paths and addresses

    @property
    def kubeconfig(self) -> Path:
        """The administrator's kubeconfig (client certificate in group system:masters)."""
        return self.directory / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['kube-apiserver']}"

    @property
    def ca_file(self) -> Path:
        return self.pki.path("ca.crt")

    @property
    def etcd_endpoint(self) -> str:
        return f"https://127.0.0.1:{self.ports['etcd']}"

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run etcdctl against this cluster's etcd (for instance ``compact``)."""
        cmd = [
            str(self._bin("etcdctl")),
            f"--endpoints={self.etcd_endpoint}",
            f"--cacert={self.ca_file}",
            f"--cert={self.pki.path('apiserver-etcd-client.crt')}",
            f"--key={self.pki.path('apiserver-etcd-client.key')}",
            *args,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl with the admin kubeconfig (or the one given)."""
        kubectl = kubectl_binary()
        if kubectl is None:
            raise KubeError("kubectl is not installed (nor built: make helm-build)")
        cmd = [kubectl, f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=120, check=False
        )
        if check and proc.returncode != 0:
            raise KubeError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def token_kubeconfig(self, path: Path, token: str, user: str = "token") -> Path:
        """A kubeconfig that authenticates with a bearer token (a ServiceAccount's, say)."""
        return write_kubeconfig(path, self.server, self.ca_file, user=user, token=token)

    # lifecycle

    def _bin(self, name: str) -> Path:
        directory = self.binaries or bin_dir()
        path = directory / name
        if not path.is_file():
            raise NotBuilt(f"{path} is missing: run `make kube-build` first")
        return path

    def _state_file(self) -> Path:
        return self.directory / "cluster.json"

    def _save(self) -> None:
        state = {
            "binaries": str(self.binaries or bin_dir()),
            "ports": self.ports,
            "components": {
                c.name: {"args": c.args, "pid": c.pid} for c in self.components.values()
            },
        }
        tmp = self._state_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self._state_file())

    @classmethod
    def attach(cls, directory: Path) -> KubeControlPlane:
        """The control plane whose state is in directory (started by another process)."""
        directory = Path(directory).resolve()
        try:
            state = json.loads((directory / "cluster.json").read_text())
        except FileNotFoundError:
            raise KubeError(f"no control plane in {directory} (no cluster.json)") from None
        plane = cls(directory, binaries=Path(state["binaries"]), detached=True)
        plane.ports = {k: int(v) for k, v in state["ports"].items()}
        plane.components = {
            name: _Component(name, list(c["args"]), c["pid"])
            for name, c in state["components"].items()
        }
        return plane

    def _args(self) -> dict[str, list[str]]:
        d, pki, p = self.directory, self.pki.path, self.ports
        etcd_client = [
            f"--etcd-servers={self.etcd_endpoint}",
            f"--etcd-cafile={pki('ca.crt')}",
            f"--etcd-certfile={pki('apiserver-etcd-client.crt')}",
            f"--etcd-keyfile={pki('apiserver-etcd-client.key')}",
        ]
        args = {
            "etcd": [
                "--name=local",
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls={self.etcd_endpoint}",
                f"--advertise-client-urls={self.etcd_endpoint}",
                f"--listen-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
                f"--initial-cluster=local=http://127.0.0.1:{p['etcd-peer']}",
                f"--cert-file={pki('etcd.crt')}",
                f"--key-file={pki('etcd.key')}",
                f"--trusted-ca-file={pki('ca.crt')}",
                "--client-cert-auth",
                "--log-level=warn",
                # A throwaway cluster for tests and benchmarks on a shared machine: a crash may
                # lose its last writes, and an fsync stuck behind other processes' disk writes
                # no longer times requests out ("etcdserver: request timed out").
                "--unsafe-no-fsync",
            ],
            "kube-apiserver": [
                "--bind-address=127.0.0.1",
                f"--secure-port={p['kube-apiserver']}",
                f"--advertise-address={self.advertise_address}",
                f"--cert-dir={d / 'apiserver'}",
                f"--tls-cert-file={pki('apiserver.crt')}",
                f"--tls-private-key-file={pki('apiserver.key')}",
                f"--client-ca-file={pki('ca.crt')}",
                *etcd_client,
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki('sa.pub')}",
                f"--service-account-signing-key-file={pki('sa.key')}",
                f"--service-cluster-ip-range={self.service_cidr}",
                f"--requestheader-client-ca-file={pki('front-proxy-ca.crt')}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki('front-proxy-client.crt')}",
                f"--proxy-client-key-file={pki('front-proxy-client.key')}",
                "--profiling=false",
                *self.apiserver_args,
            ],
            "kube-controller-manager": [
                f"--kubeconfig={d / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={d / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={d / 'controller-manager.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p['kube-controller-manager']}",
                f"--cert-dir={d / 'controller-manager'}",
                f"--tls-cert-file={pki('controller-manager-serving.crt')}",
                f"--tls-private-key-file={pki('controller-manager-serving.key')}",
                f"--client-ca-file={pki('ca.crt')}",
                f"--requestheader-client-ca-file={pki('front-proxy-ca.crt')}",
                f"--controllers={CONTROLLERS}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki('sa.key')}",
                f"--root-ca-file={pki('ca.crt')}",
                f"--cluster-signing-cert-file={pki('ca.crt')}",
                f"--cluster-signing-key-file={pki('ca.key')}",
                f"--service-cluster-ip-range={self.service_cidr}",
                "--leader-elect=false",
                "--profiling=false",
                *self.controller_manager_args,
            ],
        }
        if self.scheduler:
            args["kube-scheduler"] = [
                f"--kubeconfig={d / 'scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={d / 'scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={d / 'scheduler.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p['kube-scheduler']}",
                f"--tls-cert-file={pki('scheduler-serving.crt')}",
                f"--tls-private-key-file={pki('scheduler-serving.key')}",
                "--leader-elect=false",
                "--profiling=false",
            ]
        return args

    def up(self, timeout: float = 120.0) -> KubeControlPlane:
        """Start every component and wait until the cluster is usable."""
        if self._state_file().exists():
            old = KubeControlPlane.attach(self.directory)
            if any(old._alive(c) for c in old.components.values()):
                raise KubeError(f"a control plane is already running in {self.directory}")
        for name in BINARIES:
            self._bin(name)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "logs").mkdir(exist_ok=True)
        self.pki.ensure(self.advertise_address, self.service_cidr)
        self.ports = {name: _free_port() for name in ("etcd-peer", *COMPONENTS)}
        for user, cert in (
            ("admin", "admin"),
            ("controller-manager", "controller-manager"),
            ("scheduler", "scheduler"),
        ):
            write_kubeconfig(
                self.directory / f"{user}.kubeconfig",
                self.server,
                self.ca_file,
                user=user,
                cert=self.pki.path(f"{cert}.crt"),
                key=self.pki.path(f"{cert}.key"),
            )
        self.components = {name: _Component(name, args) for name, args in self._args().items()}
        deadline = time.monotonic() + timeout
        try:
            for name in self.components:
                self.start(name, deadline - time.monotonic())
            self._wait(
                "the controller manager to make the default ServiceAccount",
                lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default") == 200,
                deadline - time.monotonic(),
                "kube-controller-manager",
            )
        except BaseException:
            self.down()
            raise
        return self

    def start(self, name: str, timeout: float = 60.0) -> None:
        """Start one component (again) with the arguments it was first given, and wait until it
        is healthy. With stop() this restarts the API server or etcd in a test."""
        component = self.components[name]
        if self._alive(component):
            raise KubeError(f"{name} is already running (pid {component.pid})")
        log = open(self.directory / "logs" / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        with log:
            cmd = [str(self._bin(name)), *component.args]
            # Started for `make kube-up` it outlives this process; started for a test session
            # it dies with it, even if the session is killed (no control plane left behind).
            proc = subprocess.Popen(
                cmd if self.detached else _dying_with_parent(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                # A terminal's ^C does not reach it: whoever started it stops it.
                start_new_session=True,
            )
        component.pid = proc.pid
        self._procs[name] = proc
        self._save()
        checks = {
            "etcd": self._etcd_healthy,
            "kube-apiserver": lambda: self._get("/readyz") == 200,
            "kube-controller-manager": lambda: self._healthz("kube-controller-manager"),
            "kube-scheduler": lambda: self._healthz("kube-scheduler"),
        }
        self._wait(f"{name} to be healthy", checks[name], timeout, name, proc)

    def stop(self, name: str, timeout: float = 15.0) -> None:
        """Stop one component: SIGTERM, then SIGKILL after timeout seconds."""
        component = self.components[name]
        if self._alive(component):
            assert component.pid is not None
            os.kill(component.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self._alive(component) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._alive(component):
                os.kill(component.pid, signal.SIGKILL)
                while self._alive(component):
                    time.sleep(0.05)
        proc = self._procs.pop(name, None)
        if proc is not None:
            proc.wait()
        component.pid = None
        self._save()

    def restart(self, name: str) -> None:
        self.stop(name)
        self.start(name)

    def down(self) -> None:
        """Stop every component (the data stays in the directory)."""
        for name in reversed(list(self.components)):
            self.stop(name)

    def _alive(self, component: _Component) -> bool:
        """Whether the component's process still runs: the pid exists, is not a zombie, and runs
        the component's binary (a pid reused by another program is not ours to signal)."""
        if component.pid is None:
            return False
        proc = self._procs.get(component.name)
        if proc is not None:  # our own child: poll() also reaps it
            return proc.poll() is None
        try:
            stat = Path(f"/proc/{component.pid}/stat").read_text()
            exe = os.readlink(f"/proc/{component.pid}/exe")
        except OSError:
            return False
        state = stat.rsplit(")", 1)[1].split()[0]
        return state != "Z" and Path(exe).name == component.name

    # health checks

    def _ssl(self, client: str) -> ssl.SSLContext:
        """Verifies the server against the cluster's CA; presents client's certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        cert, key = self.pki.path(f"{client}.crt"), self.pki.path(f"{client}.key")
        context.load_cert_chain(str(cert), str(key))
        return context

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(
                self.server + path, context=self._ssl("admin"), timeout=5
            ) as response:
                return int(response.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (OSError, ssl.SSLError):
            return 0

    def _healthz(self, name: str) -> bool:
        url = f"https://127.0.0.1:{self.ports[name]}/healthz"
        try:
            with urllib.request.urlopen(url, context=self._ssl("admin"), timeout=5) as response:
                return int(response.status) == 200
        except (OSError, ssl.SSLError):
            return False

    def _etcd_healthy(self) -> bool:
        url = f"{self.etcd_endpoint}/health"
        try:
            with urllib.request.urlopen(
                url, context=self._ssl("apiserver-etcd-client"), timeout=5
            ) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ssl.SSLError, ValueError):
            return False

    def _wait(
        self,
        what: str,
        check: Callable[[], bool],
        timeout: float,
        name: str,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> None:
        deadline = time.monotonic() + max(timeout, 1.0)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise KubeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            if check():
                return
            time.sleep(0.2)
        raise KubeError(
            f"timed out after {timeout:.0f}s waiting for {what}:\n{self.log_tail(name)}"
        )

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.directory / "logs" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> KubeControlPlane:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()


# --- command line (the make targets) -------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localkube", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the binaries into the cache unless they are there")
    b.add_argument("--force", action="store_true", help="build again even if cached")
    sub.add_parser("bin-dir", help="print the cache directory of this version's binaries")
    u = sub.add_parser("up", help="start the control plane with its state in DIR")
    u.add_argument("dir", type=Path)
    u.add_argument("--scheduler", action="store_true", help="also run kube-scheduler")
    u.add_argument(
        "--apiserver-arg", action="append", default=[], help="an extra kube-apiserver flag"
    )
    d = sub.add_parser("down", help="stop the control plane whose state is in DIR")
    d.add_argument("dir", type=Path)
    r = sub.add_parser("restart", help="restart one component of the control plane in DIR")
    r.add_argument("dir", type=Path)
    r.add_argument("component", choices=COMPONENTS)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            cached = is_built() and not args.force
            target = build(force=args.force)
            stamp = json.loads((target / "BUILD.json").read_text())
            print(f"{'cached' if cached else 'built'}: {target} ({stamp})")
        elif args.command == "bin-dir":
            print(bin_dir())
        elif args.command == "up":
            plane = KubeControlPlane(
                args.dir, scheduler=args.scheduler, apiserver_args=args.apiserver_arg, detached=True
            ).up()
            print(f"API server {plane.server}; kubeconfig {plane.kubeconfig}")
        elif args.command == "down":
            KubeControlPlane.attach(args.dir).down()
        elif args.command == "restart":
            KubeControlPlane.attach(args.dir).restart(args.component)
    except KubeError as e:
        print(f"localkube {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
