"""The features the Kubernetes source needs from its client, checked by running them against the
control plane of ``clients.py`` (not by reading the docs), and each package's latest release.

Each check runs in a worker process of ``clients.py`` (``--task features``) with the client's own
calls and answers with a short verdict: ``yes``, ``no: why``, or how it can be had.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clients import NAMESPACE, OTHER_NODE, kubectl, pod_name

GONE_WAIT = 8.0  # how long a watch from a compacted resourceVersion may take to say 410
BOOKMARK_WAIT = 15.0  # a watch with timeoutSeconds=5 gets its bookmark about 2 s before its end
SELECTED = "app=app-0"  # what the bookmark check watches; pod-00001 (app-1) changes meanwhile


# --- per client: the few calls beyond the adapter's -------------------------------------------


async def _bookmarks(client: str, adapter: Any, rv: str) -> tuple[list[str], str]:
    """Event types of a watch asked for bookmarks (allowWatchBookmarks=true, timeoutSeconds=5),
    and how the client lets one ask for them. The watch selects app=app-0 and a pod of another
    app changes meanwhile: the API server sends a bookmark (about 2 s before the watch's end)
    when the resource moved past what the watcher was sent, which is what bookmarks are for."""
    seen: list[str] = []
    if client == "kubernetes_asyncio":
        stream = adapter.watch_module.Watch().stream(
            adapter.v1.list_namespaced_pod,
            NAMESPACE,
            label_selector=SELECTED,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=5,
        )
        async for event in stream:
            seen.append(event["type"])
        return seen, "watch(..., allow_watch_bookmarks=True)"
    if client == "lightkube":
        # AsyncClient.watch() has no parameter for it: only through the private request builder.
        inner = adapter.client._client
        notes = []
        for mode in ("typed", "raw"):
            request = inner.prepare_request(
                "list",
                res=adapter.types[mode],
                namespace=NAMESPACE,
                watch=True,
                params={
                    "labelSelector": SELECTED,
                    "resourceVersion": rv,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": 5,
                },
            )
            try:
                async for kind, _ in inner.watch(request):
                    seen.append(kind)
                    if kind == "BOOKMARK":
                        break
            except Exception as e:  # the typed model rejects the bookmark's skeleton object
                notes.append(f"{mode}: {type(e).__name__}: {str(e)[:80]}")
                continue
            notes.append(f"{mode}: {'yes' if 'BOOKMARK' in seen else 'none'}")
            break
        how = "private API only (AsyncClient._client.prepare_request); " + "; ".join(notes)
        return seen, how
    # kr8s: watch() has no parameter for it; async_get_kind (undocumented) takes raw params.
    params = {
        "labelSelector": SELECTED,
        "resourceVersion": rv,
        "allowWatchBookmarks": "true",
        "timeoutSeconds": "5",
    }
    async with adapter.api.async_get_kind(
        adapter.pod, namespace=NAMESPACE, watch=True, params=params, timeout=None
    ) as (_, response):
        async for line in response.aiter_lines():
            seen.append(json.loads(line)["type"])
    return seen, "undocumented Api.async_get_kind(params=...) only; watch() has no flag"


async def _gone(adapter: Any, mode: str) -> str:
    """A watch from resourceVersion 1 (long compacted out of the watch cache): what the caller
    sees within GONE_WAIT seconds."""

    async def first() -> str:
        async for kind, _ in adapter.watch(NAMESPACE, "1", mode):
            if kind == "ERROR":
                return "yes (an ERROR event with the 410 Status)"
        return "no: the watch ended without an error"

    try:
        return await asyncio.wait_for(first(), GONE_WAIT)
    except asyncio.TimeoutError:
        return f"no: nothing within {GONE_WAIT:.0f} s (a hidden re-watch)"
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        if "410" in text or "Expired" in text or "too old" in text:
            return f"yes ({type(e).__name__} 410)"
        return f"no: {text[:120]}"


async def _selectors(client: str, adapter: Any, pods: int) -> str:
    if client == "kubernetes_asyncio":
        labelled = (
            await adapter.v1.list_namespaced_pod(NAMESPACE, label_selector="app=app-3")
        ).items
    elif client == "lightkube":
        listing = adapter.client.list(
            adapter.types["typed"], namespace=NAMESPACE, labels={"app": "app-3"}
        )
        labelled = [item async for item in listing]
    else:
        labelled = [p async for p in adapter.api.get(adapter.pod, namespace=NAMESPACE,
                                                     label_selector={"app": "app-3"})]  # fmt: skip
    on_node, _ = await adapter.list(NAMESPACE, "typed", f"spec.nodeName={OTHER_NODE}")
    want_labelled = len([i for i in range(pods) if i % 100 == 3])
    want_on_node = len([i for i in range(pods) if i % 20 == 19])
    if (len(labelled), len(on_node)) == (want_labelled, want_on_node):
        return f"yes (app=app-3: {len(labelled)}; spec.nodeName: {len(on_node)})"
    return (
        f"no: app=app-3 gave {len(labelled)} (want {want_labelled}), "
        f"spec.nodeName gave {len(on_node)} (want {want_on_node})"
    )


async def _event(client: str, adapter: Any) -> str:
    """A core/v1 Event about a pod, made with the client's typed objects."""
    target = {"kind": "Pod", "namespace": NAMESPACE, "name": pod_name(0)}
    reason, message = "FeatureCheck", "fqdnguard client check"
    if client == "kubernetes_asyncio":
        c = adapter.client
        event = c.CoreV1Event(
            metadata=c.V1ObjectMeta(generate_name="check-"),
            involved_object=c.V1ObjectReference(**target),
            reason=reason,
            message=message,
            type="Warning",
        )
        made = await adapter.v1.create_namespaced_event(NAMESPACE, event)
        name = made.metadata.name
    elif client == "lightkube":
        from lightkube.models.core_v1 import ObjectReference  # noqa: PLC0415
        from lightkube.models.meta_v1 import ObjectMeta  # noqa: PLC0415
        from lightkube.resources.core_v1 import Event  # noqa: PLC0415

        made = await adapter.client.create(
            Event(
                metadata=ObjectMeta(generateName="check-", namespace=NAMESPACE),
                involvedObject=ObjectReference(**target),
                reason=reason,
                message=message,
                type="Warning",
            )
        )
        name = made.metadata.name
    else:
        from kr8s.asyncio.objects import Event  # noqa: PLC0415

        event = await Event(
            {
                "metadata": {"generateName": "check-", "namespace": NAMESPACE},
                "involvedObject": target,
                "reason": reason,
                "message": message,
                "type": "Warning",
            },
            api=adapter.api,
        )
        await event.create()
        name = event.name
    return f"yes ({name})" if name else "no: no name came back"


async def _incluster(client: str, adapter: Any) -> str:
    """Connect with the client's own in-cluster loading (the service account's files at their
    standard path, KUBERNETES_SERVICE_HOST/PORT) and read one pod."""
    if client == "kubernetes_asyncio":
        configuration = adapter.client.Configuration()
        adapter.config.load_incluster_config(client_configuration=configuration)
        adapter.api = adapter.client.ApiClient(configuration)
        adapter.v1 = adapter.client.CoreV1Api(adapter.api)
        how = "config.load_incluster_config()"
    elif client == "lightkube":
        adapter.client = adapter.lightkube.AsyncClient(
            config=adapter.lightkube.KubeConfig.from_env()
        )
        how = "KubeConfig.from_env()"
    else:
        adapter.api = await adapter.kr8s.api()
        how = "kr8s.asyncio.api() with no arguments"
    items, _ = await adapter.list(NAMESPACE, "typed", f"metadata.name={pod_name(0)}")
    return f"yes, {how}" if len(items) == 1 else f"no: {len(items)} pods read"


async def check(client: str, adapter: Any, args: argparse.Namespace) -> dict[str, str]:
    """Every check of one client (in a worker process); the in-cluster one alone when asked."""
    extra = dict(item.split("=", 1) for item in args.feature_arg)
    if extra.get("incluster"):
        return {"in-cluster service account": await _guard(_incluster(client, adapter))}
    results: dict[str, str] = {}
    await adapter.connect(args.kubeconfig)
    results["kubeconfig, client certificate"] = await _guard(_one_pod(adapter))
    _, list_rv = await adapter.list(NAMESPACE, "typed", f"metadata.name={pod_name(0)}")
    results["list gives its resourceVersion"] = (
        f"yes ({list_rv})" if list_rv else "no: the listing's resourceVersion is not exposed"
    )
    results["watch from a resourceVersion"] = await _guard(
        _watch_from(adapter, extra["rv_before_patch"])
    )
    seen, how = await _bookmarks_guarded(client, adapter, extra["rv_now"], args.kubeconfig)
    results["BOOKMARK events"] = (
        f"yes, {how}" if "BOOKMARK" in seen else f"no ({how}; got {sorted(set(seen))})"
    )
    for mode in ("typed", "raw"):
        results[f"410 Gone reaches the caller ({mode})"] = await _gone(adapter, mode)
    results["label and field selectors"] = await _guard(
        _selectors(client, adapter, int(extra["pods"]))
    )
    results["create an Event"] = await _guard(_event(client, adapter))
    await adapter.close()
    token = copy.copy(adapter)  # the same client module, connected anew
    await token.connect(Path(extra["token_kubeconfig"]))
    results["kubeconfig, bearer token"] = await _guard(_one_pod(token))
    await token.close()
    return results


async def _bookmarks_guarded(
    client: str, adapter: Any, rv: str, kubeconfig: Path
) -> tuple[list[str], str]:
    async def change_another_pod() -> None:
        await asyncio.sleep(1)
        proc = await asyncio.create_subprocess_exec(
            "kubectl", f"--kubeconfig={kubeconfig}", "label", "pod", pod_name(1), "-n", NAMESPACE,
            "--overwrite", f"bookmark-check={os.getpid()}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await proc.wait()

    nudge = asyncio.create_task(change_another_pod())
    try:
        return await asyncio.wait_for(_bookmarks(client, adapter, rv), BOOKMARK_WAIT)
    except asyncio.TimeoutError:
        return [], f"nothing within {BOOKMARK_WAIT:.0f} s"
    except Exception as e:
        return [], f"{type(e).__name__}: {str(e)[:100]}"
    finally:
        await nudge


async def _one_pod(adapter: Any) -> str:
    items, _ = await adapter.list(NAMESPACE, "typed", f"metadata.name={pod_name(0)}")
    return "yes" if len(items) == 1 else f"no: {len(items)} pods read"


async def _watch_from(adapter: Any, rv: str) -> str:
    """The first change after rv is the label patch made just after it (on pod-00001)."""

    async def first() -> str:
        async for kind, name in adapter.watch(NAMESPACE, rv, "typed"):
            return f"{kind} {name}"
        return "nothing"

    got = await asyncio.wait_for(first(), 10)
    want = f"MODIFIED {pod_name(1)}"
    return "yes" if got == want else f"no: first event {got}, want {want}"


async def _guard(work: Any) -> str:
    try:
        return str(await asyncio.wait_for(work, 30))
    except Exception as e:
        return f"no: {type(e).__name__}: {str(e)[:120]}"


# --- the driver's side ---------------------------------------------------------------------------


def run_all(
    kube_dir: Path,
    kubeconfig: Path,
    clients: list[str],
    *,
    worker_cmd: Callable[..., list[str]],
    env: Callable[[], dict[str, str]],
    parse: Callable[[str, str, str], dict[str, Any]],
) -> dict[str, dict[str, str]]:
    """Every client's checks, each in a fresh worker process (not pinned)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tools.kube.localkube import write_kubeconfig  # noqa: PLC0415

    cluster = json.loads((kube_dir / "cluster.json").read_text())
    port = cluster["ports"]["kube-apiserver"]
    ca = kube_dir / "pki" / "ca.crt"
    token = kubectl(kubeconfig, "create", "token", "bench-reader", "-n", NAMESPACE).strip()
    pods = len(
        json.loads(kubectl(kubeconfig, "get", "pods", "-n", NAMESPACE, "-o", "json"))["items"]
    )
    results: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="fqdnguard-kfeatures-") as temp:
        token_kubeconfig = write_kubeconfig(
            Path(temp) / "token.kubeconfig", f"https://127.0.0.1:{port}", ca,
            user="bench-reader", token=token,
        )  # fmt: skip
        account = Path(temp) / "serviceaccount"
        account.mkdir()
        (account / "token").write_text(token)
        (account / "ca.crt").write_bytes(ca.read_bytes())
        (account / "namespace").write_text(NAMESPACE)
        home = Path(temp) / "home"
        home.mkdir()
        for client in clients:
            rv_before = _current_rv(kubeconfig)
            kubectl(kubeconfig, "label", "pod", pod_name(1), "-n", NAMESPACE, "--overwrite",
                     f"feature-check={os.getpid()}-{client}")  # fmt: skip
            rv_now = _current_rv(kubeconfig)
            extra = [
                f"rv_before_patch={rv_before}", f"rv_now={rv_now}", f"pods={pods}",
                f"token_kubeconfig={token_kubeconfig}",
            ]  # fmt: skip
            cmd = worker_cmd(client, "features", "typed", kubeconfig)[3:]  # not pinned
            for item in extra:
                cmd += ["--feature-arg", item]
            results[client] = _run(cmd, env(), parse, f"{client} features")
            # In-cluster: the service account's files at their standard path, in a mount
            # namespace of the worker's own (a tmpfs over /run), and no kubeconfig to find.
            incluster_env = {k: v for k, v in env().items() if k != "KUBECONFIG"}
            incluster_env |= {
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(port),
                "HOME": str(home),
            }
            script = (
                "mount -t tmpfs tmpfs /run && "
                "mkdir -p /run/secrets/kubernetes.io/serviceaccount && "
                f'cp {account}/* /run/secrets/kubernetes.io/serviceaccount/ && exec "$@"'
            )
            incluster = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                         script, "sh", *cmd, "--feature-arg", "incluster=1"]  # fmt: skip
            results[client] |= _run(incluster, incluster_env, parse, f"{client} in-cluster")
    return results


def _run(
    cmd: list[str], env: dict[str, str], parse: Callable[[str, str, str], dict[str, Any]], what: str
) -> dict[str, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = parse(proc.stdout, what, proc.stderr)
    return {k: v for k, v in result.items() if not k.startswith("rss_")}


def _current_rv(kubeconfig: Path) -> str:
    out = kubectl(kubeconfig, "get", "--raw", f"/api/v1/namespaces/{NAMESPACE}/pods?limit=1")
    return str(json.loads(out)["metadata"]["resourceVersion"])


# --- releases ------------------------------------------------------------------------------------


def release(package: str) -> dict[str, Any]:
    """The installed version (pip show), the latest on the package index (pip download of it) and
    when that was uploaded (the index's PEP 691 JSON, which pip reads), and how many releases the
    last 12 months saw."""
    info: dict[str, Any] = {}
    shown = subprocess.run(
        [sys.executable, "-m", "pip", "show", package], capture_output=True, text=True, check=False
    ).stdout
    for line in shown.splitlines():
        key, _, value = line.partition(": ")
        if key in ("Version", "Requires", "Home-page"):
            info[{"Version": "installed"}.get(key, key.lower())] = value
    with tempfile.TemporaryDirectory() as temp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
             "--only-binary=:all:", "--index-url", "https://pypi.org/simple", "-d", temp, package],
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        files = os.listdir(temp)
    if proc.returncode != 0 or not files:
        info["latest"] = f"unknown: pip download failed: {proc.stderr.strip()[-200:]}"
        return info
    match = re.match(r"[^-]+-([^-]+)-", files[0])
    info["latest"] = match.group(1) if match else files[0]
    try:
        request = urllib.request.Request(
            f"https://pypi.org/simple/{package}/",
            headers={"Accept": "application/vnd.pypi.simple.v1+json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            index = json.loads(response.read())
    except (OSError, ValueError) as e:
        info["released"] = f"unknown: {e}"
        return info
    uploads: dict[str, str] = {}
    for file in index.get("files", []):
        found = re.match(
            rf"{re.escape(package)}-([^-]+?)(?:-|\.tar\.gz|\.zip)", file["filename"], re.I
        )
        if found and file.get("upload-time"):
            version = found.group(1)
            uploads[version] = min(uploads.get(version, file["upload-time"]), file["upload-time"])
    info["released"] = uploads.get(info["latest"], "unknown")[:10]
    year_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=365)
    info["releases_last_12_months"] = sum(
        1
        for t in uploads.values()
        if datetime.datetime.fromisoformat(t.replace("Z", "+00:00")) > year_ago
    )
    return info
