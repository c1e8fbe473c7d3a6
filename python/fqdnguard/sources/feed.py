"""Follows the Kubernetes source: each batch of changes becomes a new build of the cluster
model, put in force through ``apply``.

Builds are coalesced: the first change after a build starts a short wait (``coalesce``) during
which further changes join, so a burst of pod events costs one build, and a steady churn costs
at most one build per wait plus the build itself. The model is saved to the state directory
after builds (at most every ``save_interval``) and at stop, so that a restart serves and
enforces from it at once, before the API server answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fqdnguard.sources.model import IDS_FILE, Built, ClusterModel, EndpointIds

__all__ = ["KubernetesFeed", "report_to"]

log = logging.getLogger("fqdnguard.sources")

#: Seconds the first change of a burst waits for the others.
COALESCE = 0.05
#: Seconds between two saves of the model.
SAVE_INTERVAL = 5.0


class KubernetesFeed:
    """The model, its source and the loop between them. ``apply(built)`` puts a build in
    force (it may raise: the build is then retried at the next change, and the one in force
    stays)."""

    def __init__(
        self,
        node: str,
        apply: Callable[[Built], None],
        *,
        kubeconfig: str | None = None,
        state_dir: str | Path | None = None,
        unenforced_l7: str = "deny",
        source_factory: Callable[..., Any] | None = None,
        coalesce: float = COALESCE,
        save_interval: float = SAVE_INTERVAL,
    ) -> None:
        self.node = node
        self.apply = apply
        self.state_dir = Path(state_dir) if state_dir is not None else None
        ids = EndpointIds(self.state_dir / IDS_FILE if self.state_dir is not None else None)
        self.model = ClusterModel(
            node,
            ids,
            unenforced_l7=unenforced_l7,
            report=self._report,
            on_change=self._changed,
        )
        self.coalesce = coalesce
        self.save_interval = save_interval
        self.kubeconfig = kubeconfig
        self._source_factory = source_factory
        self.source: Any = None
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._selectors: tuple[tuple[str | None, str], ...] | None = None
        self._saved_at = 0.0
        self._save_pending = False
        self.builds = 0
        self.build_errors = 0
        self.last_build: Built | None = None
        #: Versions of the model seen by the last build; for tests and the status.
        self.built_version = -1

    # -- start-up ---------------------------------------------------------------------------

    def restore(self) -> Built | None:
        """The build of the objects saved by the last run, or None when there is none."""
        if self.state_dir is None or not self.model.restore(self.state_dir):
            return None
        built = self.model.build()
        self.built_version = self.model.version
        self.last_build = built
        log.info(
            "serving from the saved Kubernetes state: %d endpoints, %d policies",
            len(built.endpoints),
            len(built.policy.policies),
        )
        return built

    async def start(self) -> None:
        factory = self._source_factory
        if factory is None:
            from fqdnguard.sources.kubernetes import KubernetesSource  # noqa: PLC0415

            factory = KubernetesSource
        self.source = factory(self.model, self.node, kubeconfig=self.kubeconfig)
        if self.last_build is not None:
            self._push_selectors(self.last_build)
        self._tasks = [
            asyncio.ensure_future(self.source.run()),
            asyncio.ensure_future(self._follow()),
        ]

    async def stop(self) -> None:
        if self.source is not None:
            with contextlib.suppress(Exception):
                await self.source.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        self.save()

    # -- the loop ---------------------------------------------------------------------------

    def _changed(self) -> None:
        self._dirty.set()

    async def _follow(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.coalesce)
            self._dirty.clear()
            self.rebuild()
            if self._save_pending and time.monotonic() - self._saved_at >= self.save_interval:
                await asyncio.get_running_loop().run_in_executor(None, self.save)

    def rebuild(self) -> Built | None:
        version = self.model.version
        try:
            built = self.model.build()
            self.apply(built)
        except Exception:
            self.build_errors += 1
            log.exception("applying the cluster's changes failed; the policy in force stays")
            return None
        self.builds += 1
        self.built_version = version
        self.last_build = built
        self._save_pending = True
        for note in built.notes:
            log.warning("%s", note)
        self._push_selectors(built)
        return built

    def _push_selectors(self, built: Built) -> None:
        if self.source is None or built.pod_selectors == self._selectors:
            return
        self._selectors = built.pod_selectors
        setter = getattr(self.source, "set_pod_selectors", None)
        if setter is not None:
            setter(list(built.pod_selectors))

    def save(self) -> None:
        if self.state_dir is None:
            return
        try:
            self.model.save(self.state_dir)
        except OSError as e:
            log.error("saving the Kubernetes state failed: %s", e)
            return
        self._saved_at = time.monotonic()
        self._save_pending = False

    # -- reports ----------------------------------------------------------------------------

    def _report(self, kind: str, obj: dict[str, Any], reason: str, message: str) -> None:
        report_to(self.source, kind, obj, reason, message)

    def status(self) -> dict[str, Any]:
        synced = self.model.is_synced()
        return {
            "node": self.node,
            "state": "synced" if synced else "syncing (serving the last state)",
            "builds": self.builds,
            "build_errors": self.build_errors,
            "objects": {k: len(v) for k, v in self.model.stores.items()},
        }


#: Events being posted (a reference keeps each task alive until it is done).
_POSTING: set[asyncio.Future[Any]] = set()


def report_to(source: Any, kind: str, obj: dict[str, Any], reason: str, message: str) -> None:
    """Posts a problem of a policy object as a Kubernetes Event through ``source`` (when it
    can post), without waiting: the verdicts never depend on it."""
    post = getattr(source, "post_event", None)
    if post is None:
        return
    meta = obj.get("metadata") or {}
    ref = {
        "apiVersion": "cilium.io/v2",
        "kind": kind,
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
        "resourceVersion": meta.get("resourceVersion"),
    }
    result = post(ref, reason, message)
    if inspect.isawaitable(result):
        task = asyncio.ensure_future(result)
        _POSTING.add(task)
        task.add_done_callback(_posted)


def _posted(task: asyncio.Future[Any]) -> None:
    _POSTING.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("posting an Event failed: %s", task.exception())
