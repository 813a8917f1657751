"""The Redis backend: a single Redis, or a Redis Cluster (``cluster=True``: ``url`` names
one node), shared by every replica of the service and surviving its restarts.

``commit`` is one MULTI/EXEC on a single Redis: the stream's changed state sections, its
scored-up-to mark and the batch's receipt (``streams.py``), the alerts the batch changed
and the events it emitted (``alerts.py``), so a crash never leaves a tracker that believes
an alert is open without its record or its event. A batch that changed no alert (most
of them) commits in one Lua script instead, which also releases the stream's lock.

On a cluster the stream's keys and the alerts' keys live in two slots, and a transaction
cannot span two slots: the alerts and their events are committed first, then the
stream's state. A crash in between can leave the stream one batch behind its alerts,
never an event lost: the same batch scored again emits the same alert and event ids (they
derive from the stream, the time and the version), which receivers deduplicate.
"""

from __future__ import annotations

from service.stores.base import Commit, StreamPolicy
from service.stores.redis.alerts import RedisAlerts
from service.stores.redis.connection import RedisConnection
from service.stores.redis.ingest import RedisIngest
from service.stores.redis.keys import RedisKeys
from service.stores.redis.streams import RedisStreams
from service.stores.redis.webhooks import RedisWebhooks


class RedisBackend:
    name = "redis"

    def __init__(self, url: str, policy: StreamPolicy, *, prefix: str = "tsad",
                 cluster: bool = False, timeout_seconds: float = 2.0,
                 max_connections: int = 128, lock_lease_seconds: float = 5.0,
                 lock_wait_seconds: float = 10.0,
                 alert_retention_seconds: int = 30 * 86_400,
                 dead_letter_retention_seconds: float = 30 * 86_400) -> None:
        # a command waits for a free connection as long as a request waits for its lock
        self.conn = RedisConnection(url, prefix=prefix, cluster=cluster,
                                    timeout_seconds=timeout_seconds,
                                    max_connections=max_connections,
                                    pool_wait_seconds=lock_wait_seconds)
        self.streams = RedisStreams(self.conn, policy, lock_lease_seconds=lock_lease_seconds,
                                    lock_wait_seconds=lock_wait_seconds)
        self.alerts = RedisAlerts(self.conn, alert_retention_seconds)
        self.webhooks = RedisWebhooks(self.conn, self.alerts.outbox,
                                      dead_letter_retention_seconds)
        self.keys = RedisKeys(self.conn)
        self.ingest = RedisIngest(self.conn, lock_lease_seconds=lock_lease_seconds,
                                  lock_wait_seconds=lock_wait_seconds)

    async def commit(self, commit: Commit) -> int:
        await self.conn.ready()  # before building a pipeline
        if not commit.writes_state:  # a receipt alone: nothing else to keep it atomic with
            pipe = self.conn.pipeline(transaction=True)
            self.streams.stage_receipt(pipe, commit)
            await self.conn.call(pipe.execute())
            return 0
        # the stream's keys only, no binding switched: one script
        if not (commit.alerts or commit.events or commit.binding is not None):
            return await self.streams.commit_alone(commit)
        if self.conn.cluster and (commit.alerts or commit.events):  # their slot first
            alerts = self.alerts.stage(self.conn.pipeline(transaction=True), commit.stream,
                                       commit.alerts, commit.events)
            await self.conn.call(alerts.execute())
        pipe = self.conn.pipeline(transaction=True)
        self.streams.stage_commit(pipe, commit)  # first: the version bump
        if not self.conn.cluster:
            self.alerts.stage(pipe, commit.stream, commit.alerts, commit.events)
        return int((await self.conn.call(pipe.execute()))[0])

    async def ping(self) -> None:
        await self.conn.ping()

    async def close(self) -> None:
        await self.conn.close()
