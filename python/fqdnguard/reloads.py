"""The policy in force and what the last reloads did: served on the control socket
(``GET /v1/policy``, shown by ``fqdnguard policy status``) and counted in Prometheus metrics.

Every way a policy is put in force goes through :meth:`PolicyStatus.applied` (start-up, SIGHUP in
``fqdnguard run``, a push to ``fqdnguard proxy``) or :meth:`PolicyStatus.rejected`. A reload that
lifts every restriction from an endpoint that had some (no egress policy selects it any more)
is logged as a warning, counted, and listed: it may be meant (a policy was removed on purpose),
but it is also what a careless edit looks like.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fqdnguard.policy import Policy, lifted

__all__ = ["PolicyStatus"]

log = logging.getLogger("fqdnguard.policy")

#: Reloads kept for ``policy status``.
HISTORY = 20


class PolicyStatus:
    """The policy in force (where it came from, when) and the last :data:`HISTORY` reloads."""

    def __init__(self) -> None:
        self.source = "none"
        self.origin: list[str] = []
        self.loaded_at: float | None = None
        self.digest: str | None = None
        self.policies: list[dict[str, Any]] = []
        self.endpoints = 0
        self.restricted = 0
        self.reloads: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.applied_count = 0
        self.rejected_count = 0
        self.lifted_count = 0
        #: Policy objects (Kubernetes) whose current version is invalid, and what is in force
        #: for each (see fqdnguard.sources.model); how many were seen invalid in all.
        self.invalid: list[dict[str, Any]] = []
        self.invalid_total = 0
        #: What the source says of itself (Kubernetes: synced kinds, last error), or None.
        self.feed: dict[str, Any] | None = None

    def applied(
        self,
        old: Policy | None,
        new: Policy,
        *,
        source: str,
        origin: list[str],
        digest: str | None = None,
        trigger: str | None = None,
    ) -> list[str]:
        """Records ``new``, from ``source`` (``files``, ``agent``, ``state``), as the policy in
        force (``old`` was, None at start-up), put there by ``trigger`` (``SIGHUP``, ``push``;
        default: the source); returns the endpoints the change left with no restriction
        (``namespace/name``), and warns about them."""
        gone = lifted(old, new)
        now = time.time()
        if gone:
            shown = ", ".join(gone[:10]) + (f" and {len(gone) - 10} more" if len(gone) > 10 else "")
            log.warning(
                "policy %s lifted every egress restriction from %d endpoint(s) that had some: %s",
                "reload" if old is not None else "load",
                len(gone),
                shown,
            )
        self.source, self.origin, self.loaded_at, self.digest = source, list(origin), now, digest
        self.policies = [
            {"policy": p.display, "kind": p.kind, "file": p.file, "line": p.line}
            for p in new.policies
        ]
        self.endpoints = len(new._endpoints or ())
        self.restricted = len(new.restricted())
        if old is not None:
            self.applied_count += 1
            self.lifted_count += len(gone)
            self.reloads.append(
                {
                    "at": now,
                    "source": trigger or source,
                    "outcome": "applied",
                    "policies": len(new.policies),
                    "unrestricted": gone,
                }
            )
        return gone

    def rejected(self, source: str, error: str) -> None:
        """Records a reload that was refused (the policy in force stayed)."""
        self.rejected_count += 1
        self.reloads.append(
            {"at": time.time(), "source": source, "outcome": "rejected", "error": error}
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "origin": self.origin,
            "loaded_at": self.loaded_at,
            "digest": self.digest,
            "policies": self.policies,
            "endpoints": self.endpoints,
            "restricted_endpoints": self.restricted,
            "reloads": list(self.reloads),
            "lifted_total": self.lifted_count,
            "invalid": self.invalid,
            "invalid_total": self.invalid_total,
            **({"feed": self.feed} if self.feed is not None else {}),
        }

    def collector(self) -> Collector:
        return _StatusCollector(self)


class _StatusCollector(Collector):
    def __init__(self, status: PolicyStatus) -> None:
        self.status = status

    def collect(self) -> Iterator[Any]:
        st = self.status
        reloads = CounterMetricFamily(
            "fqdnguard_policy_reloads", "Policy reloads and pushes, by outcome", labels=["outcome"]
        )
        reloads.add_metric(["applied"], st.applied_count)
        reloads.add_metric(["rejected"], st.rejected_count)
        yield reloads
        yield CounterMetricFamily(
            "fqdnguard_policy_lifted_endpoints",
            "Endpoints a policy reload left with no egress restriction after they had some",
            value=st.lifted_count,
        )
        yield GaugeMetricFamily(
            "fqdnguard_policy_invalid_objects",
            "Policy objects whose current version is invalid (their last valid version, or "
            "default deny for what they select, is in force)",
            value=len(st.invalid),
        )
        yield CounterMetricFamily(
            "fqdnguard_policy_invalid",
            "Policy object versions found invalid",
            value=st.invalid_total,
        )
        yield GaugeMetricFamily(
            "fqdnguard_policy_restricted_endpoints",
            "Endpoints whose egress the policy in force restricts",
            value=st.restricted,
        )
        if st.loaded_at is not None:
            yield GaugeMetricFamily(
                "fqdnguard_policy_loaded_timestamp_seconds",
                "When the policy in force was put in force (Unix time)",
                value=st.loaded_at,
            )
