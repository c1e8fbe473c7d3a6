"""Where policies and endpoints come from: files, or the Kubernetes API server.

A source yields *changes*, each the upsert or the delete of one object, in batches, and says
when a kind's first full listing is in (*synced*). The agent consumes them without asking where
they came from (see :mod:`fqdnguard.sources.base`).
"""

from fqdnguard.sources.base import Change, Sink

__all__ = ["Change", "Sink"]
