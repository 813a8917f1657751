"""The in-process backend: the embedded default when no Redis is configured. One process
only; a restart loses every stream, alert, pending delivery and key made over HTTP.
``commit`` is atomic because it never awaits between its writes."""

from __future__ import annotations

from service.stores.base import Commit, StreamPolicy
from service.stores.memory.alerts import MemoryAlerts
from service.stores.memory.ingest import MemoryIngest
from service.stores.memory.keys import MemoryKeys
from service.stores.memory.streams import MemoryStreams
from service.stores.memory.webhooks import MemoryWebhooks


class MemoryBackend:
    name = "memory"

    def __init__(self, policy: StreamPolicy | None = None, *,
                 alert_retention_seconds: float = 30 * 86_400,
                 dead_letter_retention_seconds: float = 30 * 86_400) -> None:
        self.streams = MemoryStreams(policy or StreamPolicy())
        self.alerts = MemoryAlerts(alert_retention_seconds)
        self.webhooks = MemoryWebhooks(self.alerts.outbox, dead_letter_retention_seconds)
        self.keys = MemoryKeys()
        self.ingest = MemoryIngest()

    async def commit(self, commit: Commit) -> int:
        version = self.streams.apply(commit)
        self.alerts.apply(commit.alerts, commit.events)
        return version

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
