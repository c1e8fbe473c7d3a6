"""The Helm chart (deploy/helm/fqdnguard) and what is generated from it: ``helm lint``; the
rendered objects (the DaemonSet's shape, the proxy's options read back by the proxy's own config
reader, values refused with a reason); the generated manifests and CRD copies up to date; every
object accepted by a real API server (``kubectl apply --dry-run=server``); and, with the real
DaemonSet controller and scheduler, an install and an image change whose surge pod is scheduled
beside the old one on the same node until the rollout completes.

helm and kubectl are built from the Go module proxy (``make helm-build``), the control plane by
``make kube-build``; without them the tests skip, naming the target, and fail when CI is set.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fqdnguard.config import read_config_file
from fqdnguard.daemons.proxy import ADOPT_TIMEOUT, DRAIN_MAX, SUCCESSOR_WAIT

from tests.deploy_manifest import pod_processes
from tests.kube import require_kube_binaries, wait_until
from tools.helm import build, manifests
from tools.kube.localkube import KubeControlPlane, kubernetes_version

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "fqdnguard"
RUN_DIR = "/run/fqdnguard"
SOCKET = f"{RUN_DIR}/control.sock"
STATE_DIR = "/var/lib/fqdnguard"


def tool(name: str) -> Path:
    if not build.is_built():
        reason = f"helm and kubectl are not built ({build.bin_dir()}): run `make helm-build`"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return build.binary(name)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(tool("helm")), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}: {proc.stderr}")
    return proc


def render(*args: str) -> list[dict[str, Any]]:
    """The chart's objects (hooks included), as `helm template` renders them."""
    out = helm("template", "fqdnguard", str(CHART), "--namespace", "kube-system", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(objects: list[dict[str, Any]], kind: str, name: str = "fqdnguard") -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


# --- the chart, rendered -------------------------------------------------------------------------


def test_chart_crds_are_the_projects_crds_and_app_version_is_the_package_version() -> None:
    source = sorted(p.name for p in (ROOT / "deploy" / "crds").glob("*.yaml"))
    copies = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert (
        source
        == copies
        == [
            "ciliumclusterwidenetworkpolicies.yaml",
            "ciliumnetworkpolicies.yaml",
        ]
    )
    for name in source:
        assert (CHART / "crds" / name).read_bytes() == (
            ROOT / "deploy" / "crds" / name
        ).read_bytes()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    cargo = (ROOT / "Cargo.toml").read_text()
    assert f'\nversion = "{chart["appVersion"]}"\n' in cargo


def test_kubectl_is_built_from_the_control_planes_kubernetes() -> None:
    """tools/helm/kubectl/go.mod repeats the control plane's requirements and pins, so that
    kubectl is the same release as the API server; only its go.sum has more."""

    def body(path: Path) -> str:
        text = path.read_text()
        return text[text.index("\nmodule ") :].split("\n", 2)[2]

    tools = ROOT / "tools"
    assert body(tools / "helm" / "kubectl" / "go.mod") == body(
        tools / "kube" / "kubernetes" / "go.mod"
    )
    assert build.kubectl_version() == kubernetes_version()


def test_helm_lint() -> None:
    proc = helm("lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout, proc.stdout


def test_generated_manifests_are_up_to_date() -> None:
    stale = manifests.stale(tool("helm"))
    assert not stale, f"stale: {[str(p.relative_to(ROOT)) for p in stale]}: run `make manifests`"


def test_the_daemonset_runs_proxy_and_agent_as_the_hand_over_needs() -> None:
    objects = render("--no-hooks")
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == {
        ("ServiceAccount", "fqdnguard"),
        ("ClusterRole", "fqdnguard"),
        ("ClusterRoleBinding", "fqdnguard"),
        ("ConfigMap", "fqdnguard"),
        ("DaemonSet", "fqdnguard"),
    }
    ds = one(objects, "DaemonSet")
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    # Long enough for the proxy's own longest waits at stop (docs/deploy.md, "Upgrade").
    assert pod["terminationGracePeriodSeconds"] >= SUCCESSOR_WAIT + DRAIN_MAX + ADOPT_TIMEOUT
    assert pod["serviceAccountName"] == "fqdnguard"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["hostPath"] == {"path": STATE_DIR, "type": "DirectoryOrCreate"}
    assert volumes["run"] == {"name": "run", "emptyDir": {}}
    containers = {c["name"]: c for c in pod["containers"]}
    assert list(containers) == ["proxy", "agent"]
    everything = pod["initContainers"] + pod["containers"]
    for c in everything:
        # No ports: with hostNetwork they are host ports, and the surge pod would stay Pending.
        assert "ports" not in c, c["name"]
        sc = c["securityContext"]
        assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["state"] == STATE_DIR and mounts["run"] == RUN_DIR, c["name"]
    assert containers["proxy"]["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    assert "add" not in containers["agent"]["securityContext"]["capabilities"]
    assert pod["initContainers"][0]["command"] == ["chmod", "0700", STATE_DIR, RUN_DIR]

    proxy, agent = containers["proxy"], containers["agent"]
    assert proxy["command"] == ["fqdnguard"]
    assert proxy["args"] == [
        "proxy",
        "--config=/etc/fqdnguard/proxy.yaml",
        "--intercept",
        f"--state-dir={STATE_DIR}",
        f"--control-socket={SOCKET}",
        "--backend=nftables",
        "--log-level=info",
    ]
    assert agent["args"][:3] == ["agent", "--kubernetes", f"--socket={SOCKET}"]
    assert agent["env"] == [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    ]
    # Exec probes at the pod's own socket, never a port the other pod may answer.
    probes = (("startupProbe", "live"), ("livenessProbe", "live"), ("readinessProbe", "ready"))
    for probe, kind in probes:
        assert proxy[probe]["exec"]["command"] == ["fqdnguard", "probe", kind, f"--socket={SOCKET}"]
    assert helm("template", "x", str(CHART), "--set", "interception.enabled=false").returncode == 0
    direct = one(render("--set", "interception.enabled=false"), "DaemonSet")
    assert "--intercept" not in direct["spec"]["template"]["spec"]["containers"][0]["args"]


def test_the_rendered_pod_as_a_node_would_start_it(tmp_path: Path) -> None:
    """What tests that run the chart's processes get from deploy/kubernetes/fqdnguard.yaml."""
    state, run, config = tmp_path / "state", tmp_path / "run-a", tmp_path / "config"
    pod = pod_processes(state_dir=state, run_dir=run, config_dir=config, node_name="node-a")
    fqdnguard = [sys.executable, "-m", "fqdnguard.cli"]
    assert pod["proxy"].argv == [
        *fqdnguard, "proxy", f"--config={config}/proxy.yaml", "--intercept",
        f"--state-dir={state}", f"--control-socket={run}/control.sock", "--backend=nftables",
        "--log-level=info",
    ]  # fmt: skip
    assert pod["proxy"].probes["readinessProbe"] == [
        *fqdnguard,
        "probe",
        "ready",
        f"--socket={run}/control.sock",
    ]
    assert pod["agent"].argv[:6] == [
        *fqdnguard,
        "agent",
        "--kubernetes",
        f"--socket={run}/control.sock",
    ]
    assert pod["agent"].env == {"NODE_NAME": "node-a"} and pod["proxy"].env == {}
    assert read_config_file(str(config / "proxy.yaml")).reject == "refused"
    assert {stat.S_IMODE(p.stat().st_mode) for p in (state, run)} == {0o700}


def proxy_options(tmp_path: Path, *args: str) -> Any:
    """The rendered ConfigMap's proxy.yaml, read by the proxy's own config reader."""
    config = one(render(*args), "ConfigMap")
    path = tmp_path / "proxy.yaml"
    path.write_text(config["data"]["proxy.yaml"])
    return read_config_file(str(path))


def test_values_named_after_ciliums_reach_the_proxy(tmp_path: Path) -> None:
    default = proxy_options(tmp_path)
    assert (default.min_ttl, default.hold_max, default.reject) == (0, 0.1, "refused")
    assert default.upstreams == [] and default.listen == [("127.0.0.1", 5353)]
    assert (default.log_queries, default.metrics, default.intercept_port) == (
        "sampled",
        ("127.0.0.1", 9967),
        10053,
    )
    tuned = proxy_options(
        tmp_path,
        "--set", "dnsProxy.minTtl=3600",
        "--set", "dnsProxy.proxyResponseMaxDelay=1.5s",
        "--set", "dnsProxy.dnsRejectResponseCode=nameError",
        "--set", "nodeLocalDns.enabled=true",
        "--set", "metrics.enabled=false",
        "--set", "queryLogging=all",
        "--set", "dnsProxy.searchDomains={svc.cluster.local}",
    )  # fmt: skip
    assert (tuned.min_ttl, tuned.hold_max, tuned.reject) == (3600, 1.5, "nxdomain")
    assert tuned.upstreams == [("169.254.20.10", 53)]
    assert (tuned.metrics, tuned.log_queries) == (None, "all")
    assert tuned.search_domains == ["svc.cluster.local"]
    assert proxy_options(tmp_path, "--set", "dnsProxy.proxyResponseMaxDelay=250ms").hold_max == 0.25
    upstreams = proxy_options(tmp_path, "--set", "upstreams={10.96.0.10:53,10.96.0.11}").upstreams
    assert upstreams == [("10.96.0.10", 53), ("10.96.0.11", 53)]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "dnsProxy.proxyResponseMaxDelay=100",
            'dnsProxy.proxyResponseMaxDelay: "100" is not a duration such as 100ms or 1s',
        ),
        (
            "dnsProxy.endpointMaxIpPerHostname=50",
            "dnsProxy.endpointMaxIpPerHostname: 50: fqdnguard keeps at most 1000 addresses",
        ),
        (
            "dnsProxy.dnsRejectResponseCode=servfail",
            'dnsProxy.dnsRejectResponseCode: "servfail" must be refused or nameError',
        ),
        ("queryLogging=verbose", 'queryLogging: "verbose" must be all, sampled or none'),
    ],
)
def test_values_fqdnguard_cannot_honour_are_refused_with_a_reason(value: str, message: str) -> None:
    proc = helm("template", "fqdnguard", str(CHART), "--set", value, check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr


def test_uninstall_hooks_clean_every_node_and_helm_waits_for_them() -> None:
    hooks = render("--show-only", "templates/cleanup.yaml")
    weights = {}
    for o in hooks:
        annotations = o["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "post-delete"
        weights[o["kind"]] = int(annotations["helm.sh/hook-weight"])
    # The permissions first, then the cleanup on every node, then the Job helm waits for.
    assert weights["ServiceAccount"] < weights["DaemonSet"] < weights["Job"]
    ds = one(hooks, "DaemonSet", "fqdnguard-cleanup")["spec"]["template"]["spec"]
    assert ds["hostNetwork"] is True and ds["tolerations"] == [{"operator": "Exists"}]
    script = ds["initContainers"][0]["command"][2]
    assert f"--socket={STATE_DIR}/control.sock" in script
    assert "exec fqdnguard intercept cleanup --port=10053" in script
    assert ds["initContainers"][0]["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    without = render("--set", "cleanup.enabled=false")
    assert not [o for o in without if "helm.sh/hook" in o["metadata"].get("annotations", {})]


# --- against a real API server, controller manager and scheduler ---------------------------------


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeControlPlane]:
    """A control plane with kube-scheduler (the session's ``kube`` has none)."""

    tool("helm")
    require_kube_binaries()
    directory = tmp_path_factory.mktemp("kube-deploy")
    with KubeControlPlane(directory, scheduler=True) as p:
        yield p


def kubectl(
    plane: KubeControlPlane, *args: str, input: str | None = None, check: bool = True
) -> str:
    proc = subprocess.run(
        [str(tool("kubectl")), f"--kubeconfig={plane.kubeconfig}", *args],
        input=input, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
    return proc.stdout


def test_api_server_accepts_every_rendered_object(plane: KubeControlPlane) -> None:
    """Server-side dry run, strict field validation: an unknown field or a rejected object fails."""
    rendered = helm(
        "template", "fqdnguard", str(CHART), "--namespace", "kube-system", "--include-crds"
    ).stdout
    hooks = helm(
        "template", "fqdnguard", str(CHART), "--namespace", "kube-system",
        "--show-only", "templates/cleanup.yaml",
    ).stdout  # fmt: skip
    for text in (rendered, hooks):
        out = kubectl(
            plane, "apply", "--server-side", "--dry-run=server", "--validate=strict",
            "--field-manager=test", "-f", "-", input=text,
        )  # fmt: skip
        assert "(server dry run)" in out
    # The generated plain manifests too, as a kubectl user applies them.
    for name in ("fqdnguard.yaml", "fqdnguard-cleanup.yaml"):
        path = ROOT / "deploy" / "kubernetes" / name
        out = kubectl(plane, "apply", "--dry-run=server", "--validate=strict", "-f", str(path))
        assert "(server dry run)" in out
    # And the API server does reject what it must: a check that the dry run can fail.
    bad = rendered.replace("maxUnavailable: 0", "maxUnavailable: 0\n      maxSurgeTypo: 1")
    proc = subprocess.run(
        [str(tool("kubectl")), f"--kubeconfig={plane.kubeconfig}", "apply", "--server-side",
         "--dry-run=server", "--validate=strict", "-f", "-"],
        input=bad, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "maxSurgeTypo" in proc.stderr


NODE, NODE_IP = "node-a", "192.0.2.11"


def pods(plane: KubeControlPlane, name: str = "fqdnguard") -> list[dict[str, Any]]:
    """The pods labelled app.kubernetes.io/name=``name`` in kube-system."""
    out = kubectl(
        plane, "get", "pods", "-n", "kube-system", "-l", f"app.kubernetes.io/name={name}",
        "-o", "json",
    )  # fmt: skip
    return list(json.loads(out)["items"])


def play_kubelet(
    plane: KubeControlPlane, node_ip: str = NODE_IP, name: str = "fqdnguard"
) -> list[dict[str, Any]]:
    """What the node's kubelet would do now: report every scheduled pod Running and Ready (a
    hostNetwork pod has the node's address), and finish deleting pods being deleted."""
    current = pods(plane, name)
    for pod in current:
        name = pod["metadata"]["name"]
        if pod["metadata"].get("deletionTimestamp"):
            kubectl(plane, "delete", "pod", "-n", "kube-system", name, "--grace-period=0",
                    "--force", "--wait=false", check=False)  # fmt: skip
            continue
        ready = any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in pod.get("status", {}).get("conditions", [])
        )
        if pod["spec"].get("nodeName") and not ready:
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            status = {
                "status": {
                    "phase": "Running",
                    "hostIP": node_ip,
                    "podIP": node_ip,
                    "podIPs": [{"ip": node_ip}],
                    "startTime": now,
                    "conditions": [
                        {"type": t, "status": "True", "lastTransitionTime": now}
                        for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
                    ],
                }
            }
            kubectl(plane, "patch", "pod", "-n", "kube-system", name, "--subresource=status",
                    "--type=merge", "-p", json.dumps(status))  # fmt: skip
    return current


@pytest.fixture(scope="module")
def node(plane: KubeControlPlane) -> str:
    """A Node as its kubelet would register it: Ready, with room for the pods."""
    kubectl(plane, "apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE,
         "labels": {"kubernetes.io/os": "linux", "kubernetes.io/hostname": NODE}}}
    ))  # fmt: skip
    capacity = {"cpu": "4", "memory": "8Gi", "pods": "110"}
    kubectl(plane, "patch", "node", NODE, "--subresource=status", "--type=merge", "-p", json.dumps({
        "status": {
            "capacity": capacity, "allocatable": capacity,
            "addresses": [{"type": "InternalIP", "address": NODE_IP}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "played by the test"}],
        }
    }))  # fmt: skip
    return NODE


def helm_cluster(plane: KubeControlPlane, *args: str) -> subprocess.Popen[str]:
    """helm against the control plane, in kube-system, started (not waited for)."""
    return subprocess.Popen(
        [str(tool("helm")), *args, "--namespace", "kube-system"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "KUBECONFIG": str(plane.kubeconfig)},
    )  # fmt: skip


def helm_done(proc: subprocess.Popen[str], timeout: float = 180) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"helm {proc.args}: {err}"
    return out


def test_install_and_image_change_surge_beside_the_old_pod_and_complete(
    plane: KubeControlPlane, node: str
) -> None:
    node_ip = NODE_IP

    def helm_cluster_done(*args: str) -> str:
        return helm_done(helm_cluster(plane, *args))

    helm_cluster_done("install", "fqdnguard", str(CHART), "--set", "image.tag=0.1.0")

    def first_ready() -> list[dict[str, Any]] | None:
        current = play_kubelet(plane, node_ip)
        ds = json.loads(kubectl(plane, "get", "ds", "fqdnguard", "-n", "kube-system", "-o", "json"))
        return current if ds.get("status", {}).get("numberReady") == 1 else None

    (old,) = wait_until("the first pod scheduled onto the node and Ready", first_ready)
    assert old["spec"]["nodeName"] == node
    assert old["spec"]["containers"][0]["image"] == "localhost/fqdnguard:0.1.0"

    helm_cluster_done(
        "upgrade", "fqdnguard", str(CHART), "--reuse-values", "--set", "image.tag=0.2.0"
    )

    def surge() -> list[dict[str, Any]] | None:
        current = pods(plane)
        new = [p for p in current if p["spec"]["containers"][0]["image"].endswith(":0.2.0")]
        return current if new and new[0]["spec"].get("nodeName") else None

    both = wait_until("the surge pod scheduled", surge)
    # The scheduler put the new pod on the same node while the old one still runs there: no
    # host port stood in its way (the pod spec declares none).
    assert len(both) == 2, [p["metadata"]["name"] for p in both]
    assert {p["spec"]["nodeName"] for p in both} == {node}
    old_now = next(p for p in both if p["metadata"]["name"] == old["metadata"]["name"])
    assert not old_now["metadata"].get("deletionTimestamp"), "the old pod went before the new one"
    new = next(p for p in both if p is not old_now)
    scheduled = [c for c in new["status"]["conditions"] if c["type"] == "PodScheduled"]
    assert scheduled and scheduled[0]["status"] == "True"

    def rolled_out() -> bool:
        current = play_kubelet(plane, node_ip)
        ds = json.loads(kubectl(plane, "get", "ds", "fqdnguard", "-n", "kube-system", "-o", "json"))
        s = ds.get("status", {})
        return (
            s.get("observedGeneration") == ds["metadata"]["generation"]
            and s.get("updatedNumberScheduled") == s.get("numberAvailable") == 1
            and s.get("desiredNumberScheduled") == 1
            and [p["spec"]["containers"][0]["image"] for p in current]
            == ["localhost/fqdnguard:0.2.0"]
        )

    wait_until("the rollout to complete, the old pod gone", rolled_out)
    out = kubectl(plane, "rollout", "status", "ds/fqdnguard", "-n", "kube-system", "--timeout=30s")
    assert "successfully rolled out" in out


def test_uninstall_waits_until_every_node_is_cleaned(
    plane: KubeControlPlane, node: str, tmp_path: Path
) -> None:
    """helm uninstall runs the post-delete hooks and waits: the Job's own script (run here as
    its container would, with a token of the hooks' ServiceAccount, so under their RBAC) does not
    finish while the node's cleanup pod is not Ready, and finishes once it is; then helm deletes
    the hooks and returns."""
    release, cleanup = "second", "second-fqdnguard-cleanup"
    helm_done(helm_cluster(plane, "install", release, str(CHART), "--skip-crds"))
    uninstall = helm_cluster(plane, "uninstall", release, "--timeout=120s")
    try:

        def cleanup_pod_scheduled() -> list[dict[str, Any]] | None:
            found = pods(plane, cleanup)
            return found if found and all(p["spec"].get("nodeName") for p in found) else None

        (pod,) = wait_until("the cleanup DaemonSet's pod on the node", cleanup_pod_scheduled)
        assert pod["spec"]["nodeName"] == node
        job = wait_until(
            "the cleanup Job",
            lambda: json.loads(kubectl(plane, "get", "jobs", "-n", "kube-system", "-o", "json"))[
                "items"
            ],
        )[0]
        assert job["metadata"]["name"] == cleanup
        script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]

        # The Job's container, as kubelet would start it: its ServiceAccount's token and the cluster
        # CA at the usual path (a tmpfs over /run in a mount namespace of its own), the API server's
        # address in the environment.
        secrets = tmp_path / "serviceaccount"
        secrets.mkdir()
        token = kubectl(plane, "create", "token", cleanup, "-n", "kube-system").strip()
        (secrets / "token").write_text(token)
        (secrets / "ca.crt").write_bytes(plane.ca_file.read_bytes())
        sa = "/run/secrets/kubernetes.io/serviceaccount"
        port = plane.server.rsplit(":", 1)[1]
        waiter = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'mount -t tmpfs none /run && mkdir -p {sa} && cp "$1"/* {sa}/ && shift && exec "$@"',
             "sh", str(secrets), "python3", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                 "KUBERNETES_SERVICE_PORT": port},
        )  # fmt: skip
        try:
            time.sleep(5)
            assert waiter.poll() is None, f"the Job finished before any node was cleaned: {waiter}"
            assert uninstall.poll() is None, "helm uninstall returned before the cleanup"
            # The node's kubelet reports the cleanup pod Ready: its init container (the cleanup)
            # succeeded.
            play_kubelet(plane, NODE_IP, cleanup)
            out, _ = waiter.communicate(timeout=60)
        finally:
            waiter.kill()
        assert waiter.returncode == 0, out
        assert "cleanup done on 0 of 1 nodes" in out and out.endswith(
            "cleanup done on 1 of 1 nodes\n"
        )

        # The Job's pod exits 0, the Job completes, helm deletes the hooks and returns.
        job_pod = wait_until("the Job's pod", lambda: pods(plane, f"{cleanup}-wait"))[0]
        kubectl(plane, "patch", "pod", "-n", "kube-system", job_pod["metadata"]["name"],
                "--subresource=status", "--type=merge", "-p", json.dumps({"status": {
                    "phase": "Succeeded",
                    "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
                    "containerStatuses": [{
                        "name": "wait", "ready": False, "restartCount": 0, "image": "x",
                        "imageID": "",
                        "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
                    }],
                }}))  # fmt: skip
        out = helm_done(uninstall, timeout=120)
        assert f'release "{release}" uninstalled' in out
    finally:
        uninstall.kill()
    left = kubectl(plane, "get", "ds,jobs,sa,role,rolebinding", "-n", "kube-system", "-o", "name")
    assert release not in left, left
