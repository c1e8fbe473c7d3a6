"""The interface between a source and the agent that consumes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Change", "Sink"]


@dataclass(frozen=True)
class Change:
    """The upsert (``obj`` set) or the delete (``obj`` None) of one object.

    ``kind`` is the object's Kubernetes kind ("Pod", "Namespace", "Service", "EndpointSlice",
    "Node", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"); ``key`` is
    ``namespace/name``, or ``name`` for a cluster-scoped object. ``obj`` is the object as the API
    server returns it (JSON-decoded), possibly cut down to the fields fqdnguard reads; on a
    delete it is None (the last state the source knew is not needed)."""

    kind: str
    key: str
    obj: dict[str, Any] | None

    @property
    def deleted(self) -> bool:
        return self.obj is None


class Sink(Protocol):
    """What a source feeds."""

    def changes(self, kind: str, batch: list[Change]) -> None:
        """Objects of ``kind`` changed; ``batch`` is in the order the server reported them
        (a later change of the same key wins)."""

    def synced(self, kind: str) -> None:
        """The first full listing of ``kind`` has been delivered (after a relist: again)."""
