"""Which Kubernetes client the Kubernetes source is built on: kubernetes_asyncio, lightkube and kr8s
measured against a real API server holding 10,000 pods (issue 15).

    python3 benches/kube/clients.py            # the full run: 10,000 pods, 5,000 events, 3 repeats
    python3 benches/kube/clients.py --quick    # 1,000 pods, 500 events, once (for bench-quick)

It starts a local control plane in a temporary directory (``tools/kube/localkube.py``; or uses a
running one with ``--kube-dir``), registers a Node, creates the pods in one namespace (bound with
``spec.nodeName``, labels varied, ``status.podIPs`` set through the status subresource), then runs
every measurement of every candidate in a fresh interpreter pinned to one CPU (``taskset -c 1``),
so that the RSS is that client's:

- RSS after importing what the client needs, beside the same interpreter before the import;
- listing every pod: wall and CPU time, peak RSS (VmHWM), RSS holding the list;
- a watch receiving N events (this process patches a label of N pods meanwhile): CPU per event;

each in the client's typed-model mode and in its plain-dict mode. Then it checks, by running them,
the features the informer needs (bookmarks, a 410 Gone reaching the caller, resourceVersion
control, selectors, in-cluster and kubeconfig credentials, creating an Event), reads each
package's latest release from the package index, and measures the JSON size of typical objects.
It prints the tables and writes the run's JSON under ``benches/kube/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = HERE / "results"
CLIENTS = ("kubernetes_asyncio", "lightkube", "kr8s")
PACKAGES = {"kubernetes_asyncio": "kubernetes_asyncio", "lightkube": "lightkube", "kr8s": "kr8s"}
MODES = ("typed", "raw")
NAMESPACE = "bench"
NODE = "bench-node"
OTHER_NODE = "bench-node-2"
APPS = 100  # pods carry app=app-<i % APPS>
BENCH_CPU = "1"
WORKER_TIMEOUT = 600.0

JSON = dict[str, Any]


def proc_status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pod_name(i: int) -> str:
    return f"pod-{i:05d}"


# --- the candidates, each behind the same four calls --------------------------------------------
#
# Each adapter imports its client when it is made (so the import's RSS is measured in the worker),
# then: connect(kubeconfig), list(namespace, mode, field_selector) -> (items, resourceVersion or
# None), watch(namespace, resourceVersion, mode) -> async iterator of (type, name), close().
# "typed" is the client's natural model objects; "raw" its plain dicts (or the response's JSON
# decoded here where it has no such mode).


class KubernetesAsyncio:
    def __init__(self) -> None:
        from kubernetes_asyncio import client, config, watch  # noqa: PLC0415

        self.client, self.config, self.watch_module = client, config, watch

    async def connect(self, kubeconfig: Path) -> None:
        configuration = self.client.Configuration()
        await self.config.load_kube_config(
            config_file=str(kubeconfig), client_configuration=configuration
        )
        self.api = self.client.ApiClient(configuration)
        self.v1 = self.client.CoreV1Api(self.api)

    async def list(self, namespace: str, mode: str, fields: str | None = None) -> tuple[list, str]:
        if mode == "typed":
            pods = await self.v1.list_namespaced_pod(namespace, field_selector=fields)
            return pods.items, pods.metadata.resource_version
        response = await self.v1.list_namespaced_pod(
            namespace, field_selector=fields, _preload_content=False
        )
        body = json.loads(await response.read())
        return body["items"], body["metadata"]["resourceVersion"]

    async def watch(self, namespace: str, rv: str, mode: str) -> AsyncIterator[tuple[str, str]]:
        if mode == "typed":
            stream = self.watch_module.Watch().stream(
                self.v1.list_namespaced_pod, namespace, resource_version=rv
            )
            async for event in stream:
                yield event["type"], event["object"].metadata.name
            return
        response = await self.v1.list_namespaced_pod(
            namespace, watch=True, resource_version=rv, _preload_content=False
        )
        async for line in response.content:
            event = json.loads(line)
            yield event["type"], event["object"]["metadata"].get("name", "")

    async def close(self) -> None:
        await self.api.close()


class Lightkube:
    def __init__(self) -> None:
        import lightkube  # noqa: PLC0415
        from lightkube.generic_resource import create_namespaced_resource  # noqa: PLC0415
        from lightkube.resources.core_v1 import Pod  # noqa: PLC0415

        self.lightkube = lightkube
        self.types = {"typed": Pod, "raw": create_namespaced_resource("", "v1", "Pod", "pods")}

    async def connect(self, kubeconfig: Path) -> None:
        config = self.lightkube.KubeConfig.from_file(kubeconfig)
        self.client = self.lightkube.AsyncClient(config=config)

    async def list(
        self, namespace: str, mode: str, fields: str | None = None
    ) -> tuple[list, str | None]:
        selector = dict([fields.split("=", 1)]) if fields else None
        listing = self.client.list(self.types[mode], namespace=namespace, fields=selector)
        items = [item async for item in listing]
        return items, listing.resourceVersion

    async def watch(self, namespace: str, rv: str, mode: str) -> AsyncIterator[tuple[str, str]]:
        stream = self.client.watch(self.types[mode], namespace=namespace, resource_version=rv)
        async for kind, obj in stream:
            name = obj.metadata.name if mode == "typed" else obj["metadata"].get("name", "")
            yield kind, name

    async def close(self) -> None:
        await self.client.close()


class Kr8s:
    def __init__(self) -> None:
        import kr8s.asyncio  # noqa: PLC0415
        from kr8s.asyncio.objects import Pod  # noqa: PLC0415

        self.kr8s, self.pod = kr8s.asyncio, Pod

    async def connect(self, kubeconfig: Path) -> None:
        self.api = await self.kr8s.api(kubeconfig=str(kubeconfig))

    async def list(self, namespace: str, mode: str, fields: str | None = None) -> tuple[list, None]:
        # kr8s pages by 100 and yields items only: the listing's resourceVersion is not exposed.
        listing = self.api.get(
            self.pod, namespace=namespace, field_selector=fields, raw=mode == "raw"
        )
        return [item async for item in listing], None

    async def watch(self, namespace: str, rv: str, mode: str) -> AsyncIterator[tuple[str, str]]:
        if mode == "typed":
            async for kind, obj in self.api.watch(self.pod, namespace=namespace, since=rv):
                yield kind, obj.name
            return
        # No plain-dict watch: the request through kr8s's session, its lines decoded here.
        params = {"watch": "true", "resourceVersion": rv}
        async with self.api.call_api(
            "GET", url="pods", namespace=namespace, stream=True, params=params, timeout=None
        ) as response:
            async for line in response.aiter_lines():
                event = json.loads(line)
                yield event["type"], event["object"]["metadata"].get("name", "")

    async def close(self) -> None:
        session = getattr(self.api, "_session", None)
        if session is not None:
            await session.aclose()


ADAPTERS: dict[str, Callable[[], Any]] = {
    "kubernetes_asyncio": KubernetesAsyncio,
    "lightkube": Lightkube,
    "kr8s": Kr8s,
}


# --- the worker: one client, one mode, one task, in a fresh process ------------------------------


async def _list_task(adapter: Any, args: argparse.Namespace) -> JSON:
    await adapter.connect(args.kubeconfig)
    # Warm-up in the same mode: the connection, TLS and whatever the client loads lazily.
    await adapter.list(args.namespace, args.mode, f"metadata.name={pod_name(0)}")
    rss_before = proc_status("VmRSS")
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    items, _ = await adapter.list(args.namespace, args.mode)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    result = {
        "items": len(items),
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_before": rss_before,
        "rss_holding": proc_status("VmRSS"),
        "hwm": proc_status("VmHWM"),
    }
    await adapter.close()
    return result


async def _watch_task(adapter: Any, args: argparse.Namespace) -> JSON:
    await adapter.connect(args.kubeconfig)
    await adapter.list(args.namespace, args.mode, f"metadata.name={pod_name(0)}")
    print("READY", flush=True)
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    seen: dict[str, int] = {}
    count = 0
    async for kind, name in adapter.watch(args.namespace, args.rv, args.mode):
        if kind == "MODIFIED":
            seen[name] = seen.get(name, 0) + 1
            count += 1
            if count == args.events:
                break
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    result = {
        "events": count,
        "distinct": len(seen),
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_us_per_event": cpu / count * 1e6,
        "hwm": proc_status("VmHWM"),
    }
    await adapter.close()
    return result


def worker(args: argparse.Namespace) -> int:
    import uvloop  # noqa: PLC0415 (the agent's event loop; measured in the base line)

    rss_base = proc_status("VmRSS")
    adapter = ADAPTERS[args.client]()
    result: JSON = {"rss_base": rss_base, "rss_import": proc_status("VmRSS")}
    if args.task == "list":
        result |= uvloop.run(_list_task(adapter, args))
    elif args.task == "watch":
        result |= uvloop.run(_watch_task(adapter, args))
    elif args.task == "features":
        import client_features  # noqa: PLC0415 (beside this file)

        result |= uvloop.run(client_features.check(args.client, adapter, args))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# --- the driver ----------------------------------------------------------------------------------


def _worker_cmd(client: str, task: str, mode: str, kubeconfig: Path, *extra: str) -> list[str]:
    return [
        "taskset", "-c", BENCH_CPU, sys.executable, str(Path(__file__).resolve()), "worker",
        "--client", client, "--task", task, "--mode", mode, "--kubeconfig", str(kubeconfig),
        "--namespace", NAMESPACE, *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _parse_result(out: str, what: str, stderr: str) -> JSON:
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise RuntimeError(f"{what} gave no result:\n{out[-2000:]}\n{stderr[-4000:]}")


def run_worker(client: str, task: str, mode: str, kubeconfig: Path, *extra: str) -> JSON:
    cmd = _worker_cmd(client, task, mode, kubeconfig, *extra)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(), timeout=WORKER_TIMEOUT, check=False
    )
    what = f"{client} {task} {mode}"
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return _parse_result(proc.stdout, what, proc.stderr)


class Kube:
    """The bench's own requests (setup, patching, sizes): kubernetes_asyncio in plain-JSON mode,
    many requests in flight on one client."""

    def __init__(self, kubeconfig: Path, concurrency: int = 24) -> None:
        self.kubeconfig = kubeconfig
        self.concurrency = concurrency

    async def __aenter__(self) -> Kube:
        from kubernetes_asyncio import client, config  # noqa: PLC0415

        configuration = client.Configuration()
        await config.load_kube_config(
            config_file=str(self.kubeconfig), client_configuration=configuration
        )
        # One connection per request in flight (aiohttp's default pool is 100).
        self.api = client.ApiClient(configuration)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.api.close()

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> bytes:
        from kubernetes_asyncio.client.exceptions import ApiException  # noqa: PLC0415

        headers = {"Accept": "application/json", "Content-Type": content_type}
        # A loaded machine makes etcd time out now and then (500) or the API server shed load
        # (429): a few tries, with a pause growing each time.
        for attempt in range(6):
            try:
                response = await self.api.rest_client.request(
                    method, self.api.configuration.host + path, headers=headers, body=body
                )
                return bytes(response.data)
            except ApiException as e:
                if e.status == 409 and method == "POST" and attempt > 0:
                    return b""  # the try that timed out had made it after all
                if e.status not in (429, 500, 503, 504) or attempt == 5:
                    raise
                await asyncio.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    async def get(self, path: str, accept: str = "application/json") -> bytes:
        response = await self.api.rest_client.request(
            "GET", self.api.configuration.host + path, headers={"Accept": accept}
        )
        return bytes(response.data)

    async def many(self, calls: list[Callable[[], Coroutine[Any, Any, Any]]]) -> float:
        """Run the calls with at most `concurrency` in flight; return the wall time."""
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(call: Callable[[], Coroutine[Any, Any, Any]]) -> None:
            async with semaphore:
                await call()

        started = time.perf_counter()
        await asyncio.gather(*(one(call) for call in calls))
        return time.perf_counter() - started


def _pod(i: int, node: str) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(i),
            "namespace": NAMESPACE,
            "labels": {
                "app": f"app-{i % APPS}",
                "tier": ("web", "api", "worker", "db")[i % 4],
                "pod-template-hash": f"{(i * 2654435761) % 16**10:010x}",
            },
        },
        "spec": {
            "nodeName": node,
            "containers": [{"name": "app", "image": f"registry.invalid/app-{i % APPS}:1"}],
        },
    }


def _running_status(ip: str) -> JSON:
    conditions = [
        {"type": t, "status": "True"}
        for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
    ]
    return {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": conditions,
        }
    }


def _pod_ip(i: int) -> str:
    return f"10.244.{i // 250}.{i % 250 + 2}"


async def setup_pods(kube: Kube, pods: int) -> JSON:
    """The namespace's pods pod-00000...: what is missing is created, each with its status."""
    body = json.loads(await kube.get(f"/api/v1/namespaces/{NAMESPACE}/pods"))
    have = {item["metadata"]["name"]: item for item in body["items"]}
    missing = [i for i in range(pods) if pod_name(i) not in have]
    # Every 20th pod sits on another node: the field selector on spec.nodeName then selects.
    create = [
        (lambda i=i: kube.request(
            "POST", f"/api/v1/namespaces/{NAMESPACE}/pods",
            _pod(i, OTHER_NODE if i % 20 == 19 else NODE),
        ))
        for i in missing
    ]  # fmt: skip
    create_s = await kube.many(create)
    no_ip = [i for i in range(pods) if not have.get(pod_name(i), {}).get("status", {}).get("podIP")]
    status = [
        (lambda i=i: kube.request(
            "PATCH", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod_name(i)}/status",
            _running_status(_pod_ip(i)), "application/merge-patch+json",
        ))
        for i in no_ip
    ]  # fmt: skip
    status_s = await kube.many(status)
    return {
        "created": len(create),
        "create_s": round(create_s, 1),
        "create_per_s": round(len(create) / create_s) if create else None,
        "status_set": len(status),
        "status_s": round(status_s, 1),
    }


async def current_rv(kube: Kube) -> str:
    body = json.loads(await kube.get(f"/api/v1/namespaces/{NAMESPACE}/pods?limit=1"))
    return str(body["metadata"]["resourceVersion"])


async def patch_labels(kube: Kube, count: int, value: str) -> float:
    patch = {"metadata": {"labels": {"round": value}}}
    calls = [
        (lambda i=i: kube.request(
            "PATCH", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod_name(i)}",
            patch, "application/merge-patch+json",
        ))
        for i in range(count)
    ]  # fmt: skip
    return await kube.many(calls)


def run_watch(client: str, mode: str, kubeconfig: Path, events: int, round_id: str) -> JSON:
    """A worker watches from now while this process patches `events` pods' labels."""
    rv = asyncio.run(_with_kube(kubeconfig, current_rv))
    cmd = _worker_cmd(client, "watch", mode, kubeconfig, "--rv", rv, "--events", str(events))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(f"{client} watch {mode} did not start: {line}{err[-4000:]}")

    async def patch(kube: Kube) -> float:
        return await patch_labels(kube, events, round_id)

    patch_s = asyncio.run(_with_kube(kubeconfig, patch))
    out, err = proc.communicate(timeout=WORKER_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{client} watch {mode} failed ({proc.returncode}):\n{err[-4000:]}")
    result = _parse_result(out, f"{client} watch {mode}", err)
    result["patch_s"] = patch_s
    return result


async def _with_kube(kubeconfig: Path, body: Callable[[Kube], Coroutine[Any, Any, Any]]) -> Any:
    async with Kube(kubeconfig) as kube:
        return await body(kube)


def kubectl(kubeconfig: Path, *args: str, input: str | None = None) -> str:
    proc = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", *args],
        input=input, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr}")
    return proc.stdout


def prepare_cluster(kubeconfig: Path) -> None:
    """The Nodes, the namespace (once its default ServiceAccount exists), and a ServiceAccount
    that may read it, for the token and in-cluster checks."""
    for node, address in ((NODE, "192.0.2.10"), (OTHER_NODE, "192.0.2.11")):
        kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}))  # fmt: skip
        status = {"status": {"addresses": [{"type": "InternalIP", "address": address}]}}
        kubectl(kubeconfig, "patch", "node", node, "--subresource=status", "--type=merge",
                "-p", json.dumps(status))  # fmt: skip
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}))  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        proc = subprocess.run(
            ["kubectl", f"--kubeconfig={kubeconfig}", "get", "serviceaccount", "default",
             "-n", NAMESPACE],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no default ServiceAccount in {NAMESPACE}: {proc.stderr}")
        time.sleep(0.3)
    reader = [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "bench-reader", "namespace": NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "bench-reader", "namespace": NAMESPACE},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "view"},
         "subjects": [{"kind": "ServiceAccount", "name": "bench-reader",
                       "namespace": NAMESPACE}]},
    ]  # fmt: skip
    for manifest in reader:
        kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(manifest))


def median_of(runs: list[JSON], key: str) -> float:
    return float(statistics.median(run[key] for run in runs))


def measure(kubeconfig: Path, events: int, repeats: int, clients: list[str]) -> JSON:
    results: JSON = {"import": {}, "list": {}, "watch": {}}
    for client in clients:
        runs = [run_worker(client, "import", "typed", kubeconfig) for _ in range(repeats)]
        results["import"][client] = runs
        print(f"  {client} import: {median_of(runs, 'rss_import') / 2**20:.1f} MB", flush=True)
    bare = [run_worker("none", "import", "typed", kubeconfig) for _ in range(repeats)]
    results["import"]["none"] = bare
    round_no = 0
    for client in clients:
        for mode in MODES:
            key = f"{client}/{mode}"
            runs = [run_worker(client, "list", mode, kubeconfig) for _ in range(repeats)]
            results["list"][key] = runs
            print(
                f"  {key} list: {median_of(runs, 'wall_s'):.2f} s,"
                f" cpu {median_of(runs, 'cpu_s'):.2f} s,"
                f" hwm {median_of(runs, 'hwm') / 2**20:.0f} MB",
                flush=True,
            )
            watch_runs = []
            for _ in range(repeats):
                round_no += 1
                watch_runs.append(
                    run_watch(client, mode, kubeconfig, events, f"r{round_no}-{time.time_ns()}")
                )
            results["watch"][key] = watch_runs
            print(
                f"  {key} watch: {median_of(watch_runs, 'cpu_us_per_event'):.0f} us/event",
                flush=True,
            )
    return results


class _NoClient:
    """The base line: the worker's interpreter with nothing imported for a client."""


ADAPTERS["none"] = _NoClient


# --- features, releases, sizes, the table ---------------------------------------------------------


def run_features(kube_dir: Path, kubeconfig: Path, clients: list[str]) -> JSON:
    import client_features  # noqa: PLC0415 (beside this file)

    return client_features.run_all(
        kube_dir, kubeconfig, clients, worker_cmd=_worker_cmd, env=_env, parse=_parse_result
    )


def releases(clients: list[str]) -> JSON:
    import client_features  # noqa: PLC0415 (beside this file)

    return {client: client_features.release(PACKAGES[client]) for client in clients}


def object_sizes(kube_dir: Path, kubeconfig: Path) -> JSON:
    import object_sizes as sizes  # noqa: PLC0415 (beside this file)

    return sizes.measure(kube_dir, kubeconfig, NAMESPACE)


def _ratio(value: float, best: float) -> str:
    return f"x{value / best:.2f}" if best > 0 else "-"


def table(results: JSON, clients: list[str]) -> str:
    base = median_of(results["import"]["none"], "rss_import")
    lines = [
        f"base line: the worker's interpreter (python3 + uvloop) {base / 2**20:.1f} MB RSS",
        "",
        "| client | mode | import RSS +MB | list wall s | list CPU s | list peak RSS MB"
        " | holding the list MB | watch CPU us/event |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = []
    for client in clients:
        imported = median_of(results["import"][client], "rss_import") - base
        for mode in MODES:
            listing = results["list"][f"{client}/{mode}"]
            watch = results["watch"][f"{client}/{mode}"]
            rows.append(
                (
                    client,
                    mode,
                    imported / 2**20,
                    median_of(listing, "wall_s"),
                    median_of(listing, "cpu_s"),
                    median_of(listing, "hwm") / 2**20,
                    (median_of(listing, "rss_holding") - median_of(listing, "rss_before")) / 2**20,
                    median_of(watch, "cpu_us_per_event"),
                )
            )
    best = [min(row[i] for row in rows) for i in range(2, 8)]
    for row in rows:
        cells = [f"{v:.2f} ({_ratio(v, b)})" for v, b in zip(row[2:], best, strict=True)]
        lines.append(f"| {row[0]} | {row[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def features_table(features: JSON, release_info: JSON, clients: list[str]) -> str:
    checks = list(next(iter(features.values())).keys())
    lines = ["| check | " + " | ".join(clients) + " |", "| --- |" + " --- |" * len(clients)]
    for check in checks:
        lines.append(f"| {check} | " + " | ".join(features[c][check] for c in clients) + " |")
    for item in ("installed", "latest", "released"):
        lines.append(
            f"| {item} | " + " | ".join(str(release_info[c].get(item)) for c in clients) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="(internal) one measurement in this process")
    w.add_argument("--client", required=True, choices=[*CLIENTS, "none"])
    w.add_argument("--task", required=True, choices=["import", "list", "watch", "features"])
    w.add_argument("--mode", default="typed", choices=MODES)
    w.add_argument("--kubeconfig", type=Path)
    w.add_argument("--namespace", default=NAMESPACE)
    w.add_argument("--rv")
    w.add_argument("--events", type=int)
    w.add_argument("--feature-arg", action="append", default=[])
    parser.add_argument("--quick", action="store_true", help="1,000 pods, 500 events, once")
    parser.add_argument("--pods", type=int)
    parser.add_argument("--events", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--kube-dir", type=Path, help="use the control plane running in DIR")
    parser.add_argument("--no-release", action="store_true", help="skip the package index")
    parser.add_argument("--out", type=Path, help="the JSON (default: under benches/kube/results)")
    args = parser.parse_args(argv)
    if args.command == "worker":
        return worker(args)

    pods = args.pods or (1000 if args.quick else 10_000)
    events = args.events or (500 if args.quick else 5000)
    repeats = args.repeats or (1 if args.quick else 3)
    clients = [c for c in args.clients.split(",") if c]
    if shutil.which("taskset") is None or shutil.which("kubectl") is None:
        print("clients.py needs taskset (util-linux) and kubectl", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT))
    from tools.kube.localkube import KubeControlPlane, KubeError  # noqa: PLC0415

    temp = None
    plane = None
    try:
        if args.kube_dir:
            kube_dir = args.kube_dir.resolve()
        else:
            temp = tempfile.mkdtemp(prefix="fqdnguard-kclients-")
            kube_dir = Path(temp) / "kube"
            print(f"starting a control plane in {kube_dir}", flush=True)
            plane = KubeControlPlane(kube_dir).up()
        kubeconfig = kube_dir / "admin.kubeconfig"
        prepare_cluster(kubeconfig)

        async def setup(kube: Kube) -> JSON:
            return await setup_pods(kube, pods)

        print(f"creating {pods} pods", flush=True)
        setup_info = asyncio.run(_with_kube(kubeconfig, setup))
        print(f"  {setup_info}", flush=True)
        print("measuring (each in a fresh process on CPU 1)", flush=True)
        results = measure(kubeconfig, events, repeats, clients)
        print("checking features", flush=True)
        features = run_features(kube_dir, kubeconfig, clients)
        release_info = {} if args.no_release else releases(clients)
        print("measuring object sizes", flush=True)
        sizes = object_sizes(kube_dir, kubeconfig)
    except (KubeError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"clients.py: {e}", file=sys.stderr)
        return 1
    finally:
        if plane is not None:
            plane.down()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)

    print()
    print(f"{pods} pods, {events} watch events, median of {repeats}; ratio to the best in ()")
    print(table(results, clients))
    print()
    print(features_table(features, release_info or {c: {} for c in clients}, clients))
    print()
    print(json.dumps(sizes, indent=1))
    run = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pods": pods,
        "events": events,
        "repeats": repeats,
        "cpu": BENCH_CPU,
        "load_average": os.getloadavg(),
        "setup": setup_info,
        "versions": {c: release_info.get(c, {}).get("installed") for c in clients},
        "results": results,
        "features": features,
        "releases": release_info,
        "sizes": sizes,
    }
    out = args.out or RESULTS / f"clients-{'quick' if args.quick else 'full'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(run, indent=1) + "\n")
    print(f"\nwritten: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
