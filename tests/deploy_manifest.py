"""The processes of the rendered DaemonSet (deploy/kubernetes/fqdnguard.yaml), as a node would
start them, for tests that must run exactly what the chart runs: each container's command and
arguments, its environment (the downward API's NODE_NAME), and its mounted paths mapped to
directories of the test (the node-wide state directory, a pod-private run directory per pod, the
ConfigMap's files), plus its exec probes mapped the same way."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "kubernetes" / "fqdnguard.yaml"


@dataclass
class Process:
    """One container: argv (``fqdnguard`` is this interpreter with the package under test), its
    environment additions, and its probes' argv by kind (startupProbe, livenessProbe, ...)."""

    argv: list[str]
    env: dict[str, str]
    probes: dict[str, list[str]]


def _objects(manifest: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc]


def pod_processes(
    *, state_dir: Path, run_dir: Path, config_dir: Path, node_name: str, manifest: Path = MANIFEST
) -> dict[str, Process]:
    """The containers of one pod, by name, with its volumes at the given directories: the
    hostPath state directory at ``state_dir`` (shared by every pod of the node), the emptyDir
    at ``run_dir`` (one per pod), the ConfigMap written into ``config_dir``. Does what the init
    container does (both directories private) and returns the main containers."""
    objects = _objects(manifest)
    ds = next(o for o in objects if o["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    where: dict[str, Path] = {}
    for volume in pod["volumes"]:
        if "hostPath" in volume:
            where[volume["name"]] = state_dir
        elif "emptyDir" in volume:
            where[volume["name"]] = run_dir
        elif "configMap" in volume:
            config = next(
                o
                for o in objects
                if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]["name"]
            )
            config_dir.mkdir(parents=True, exist_ok=True)
            for name, text in config["data"].items():
                (config_dir / name).write_text(text)
            where[volume["name"]] = config_dir
        else:
            raise AssertionError(f"volume {volume['name']}: a kind the tests do not map")
    for path in (state_dir, run_dir):
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)

    def mapped(mounts: list[dict[str, Any]], word: str) -> str:
        """A path under a mount (alone, or as the value of --flag=PATH) at its directory."""
        flag, eq, value = word.rpartition("=") if word.startswith("-") else ("", "", word)
        # Longest mount path first, so that /run/x/y is not mapped through /run/x.
        for mount in sorted(mounts, key=lambda m: -len(m["mountPath"])):
            root = mount["mountPath"].rstrip("/")
            if value == root or value.startswith(root + "/"):
                return f"{flag}{eq}{where[mount['name']]}{value[len(root) :]}"
        return word

    def argv(mounts: list[dict[str, Any]], words: list[str]) -> list[str]:
        out = [mapped(mounts, w) for w in words]
        if out and out[0] == "fqdnguard":
            out = [sys.executable, "-m", "fqdnguard.cli", *out[1:]]
        return out

    processes = {}
    for c in pod["containers"]:
        mounts = c.get("volumeMounts", [])
        env = {}
        for var in c.get("env", []):
            field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            if field == "spec.nodeName":
                env[var["name"]] = node_name
            elif "value" in var:
                env[var["name"]] = var["value"]
            else:
                raise AssertionError(f"env {var['name']}: a source the tests do not map")
        probes = {
            kind: argv(mounts, c[kind]["exec"]["command"])
            for kind in ("startupProbe", "livenessProbe", "readinessProbe")
            if kind in c
        }
        processes[c["name"]] = Process(
            argv(mounts, [*c.get("command", []), *c.get("args", [])]), env, probes
        )
    return processes
