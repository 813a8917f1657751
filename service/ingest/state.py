"""What the ingest doors keep between requests, beside the streams in the same store:
the rows of grouped streams still waiting for a channel (``Stage``), the watches made
over the API, each watch's last evaluated time, and which replica runs a watch (a lease).

In memory without Redis; with Redis, keys under the service's prefix, through the window
store's connection and its error handling (an outage is a 503, as for streams).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Protocol

Row = list[float | None]  # one value per channel; None: not arrived yet


@dataclass
class Stage:
    """A grouped stream's rows not yet stored, by time stamp (ms), and the last stored
    value of each channel (what a row missing one is completed with)."""

    rows: dict[int, Row] = field(default_factory=dict)
    last: Row | None = None


class IngestState(Protocol):
    async def stage(self, stream: str) -> Stage: ...

    async def save_stage(self, stream: str, stage: Stage, removed: list[int]) -> None: ...

    async def watches(self) -> dict[str, dict]: ...

    async def put_watch(self, name: str, spec: dict) -> bool:
        """Store a watch definition; True when it is new."""
        ...

    async def delete_watch(self, name: str) -> bool: ...

    async def cursor(self, name: str) -> float | None: ...

    async def set_cursor(self, name: str, t: float | None) -> None: ...

    async def lease(self, name: str, owner: str, seconds: float) -> bool:
        """Hold (take or renew) the right to run watch ``name`` for ``seconds``."""
        ...


class MemoryIngestState:
    def __init__(self) -> None:
        self._stages: dict[str, Stage] = {}
        self._watches: dict[str, dict] = {}
        self._cursors: dict[str, float] = {}

    async def stage(self, stream: str) -> Stage:
        held = self._stages.get(stream)
        return Stage(dict(held.rows), held.last) if held else Stage()

    async def save_stage(self, stream: str, stage: Stage, removed: list[int]) -> None:
        self._stages[stream] = Stage(dict(stage.rows), stage.last)

    async def watches(self) -> dict[str, dict]:
        return dict(self._watches)

    async def put_watch(self, name: str, spec: dict) -> bool:
        new = name not in self._watches
        self._watches[name] = spec
        return new

    async def delete_watch(self, name: str) -> bool:
        self._cursors.pop(name, None)
        return self._watches.pop(name, None) is not None

    async def cursor(self, name: str) -> float | None:
        return self._cursors.get(name)

    async def set_cursor(self, name: str, t: float | None) -> None:
        if t is None:
            self._cursors.pop(name, None)
        else:
            self._cursors[name] = t

    async def lease(self, name: str, owner: str, seconds: float) -> bool:
        return True  # one process: it runs every watch


class RedisIngestState:
    def __init__(self, window_store) -> None:  # noqa: ANN001 - a RedisWindowStore
        self.ws = window_store
        self.redis = window_store._redis
        self.prefix = window_store.prefix

    def _stage_key(self, stream: str) -> str:
        return f"{self.prefix}:{{{stream}}}:stage"  # the stream's hash slot

    async def stage(self, stream: str) -> Stage:
        raw = await self.ws._call(self.redis.hgetall(self._stage_key(stream)))
        stage = Stage()
        for key, value in raw.items():
            key = key.decode()
            if key == "last":
                stage.last = json.loads(value)
            else:
                stage.rows[int(key[2:])] = json.loads(value)
        return stage

    async def save_stage(self, stream: str, stage: Stage, removed: list[int]) -> None:
        key = self._stage_key(stream)
        pipe = self.redis.pipeline(transaction=True)
        if removed:
            pipe.hdel(key, *(f"r:{t}" for t in removed))
        fields = {f"r:{t}": json.dumps(row) for t, row in stage.rows.items()}
        if stage.last is not None:
            fields["last"] = json.dumps(stage.last)
        if fields:
            pipe.hset(key, mapping=fields)
        await self.ws._call(pipe.execute())

    @property
    def _watches_key(self) -> str:
        return f"{self.prefix}:ingest:watches"

    @property
    def _cursors_key(self) -> str:
        return f"{self.prefix}:ingest:watch-cursors"

    async def watches(self) -> dict[str, dict]:
        raw = await self.ws._call(self.redis.hgetall(self._watches_key))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    async def put_watch(self, name: str, spec: dict) -> bool:
        return bool(await self.ws._call(self.redis.hset(self._watches_key, name,
                                                        json.dumps(spec))))

    async def delete_watch(self, name: str) -> bool:
        await self.ws._call(self.redis.hdel(self._cursors_key, name))
        return bool(await self.ws._call(self.redis.hdel(self._watches_key, name)))

    async def cursor(self, name: str) -> float | None:
        raw = await self.ws._call(self.redis.hget(self._cursors_key, name))
        return None if raw is None else float(raw)

    async def set_cursor(self, name: str, t: float | None) -> None:
        if t is None:
            await self.ws._call(self.redis.hdel(self._cursors_key, name))
        else:
            await self.ws._call(self.redis.hset(self._cursors_key, name, repr(t)))

    async def lease(self, name: str, owner: str, seconds: float) -> bool:
        key = f"{self.prefix}:ingest:watch-lease:{name}"
        ms = int(seconds * 1000)
        if await self.ws._call(self.redis.set(key, owner, nx=True, px=ms)):
            return True
        held = await self.ws._call(self.redis.get(key))
        if held is not None and held.decode() == owner:
            # ours: renew (a race with its expiry only costs one period of the watch)
            await self.ws._call(self.redis.set(key, owner, px=ms))
            return True
        return False


def build_ingest_state(window_store) -> IngestState:  # noqa: ANN001 - the raw window store
    if window_store.backend == "redis":
        return RedisIngestState(window_store)
    return MemoryIngestState()


def owner_id() -> str:
    """This process, as a lease holder."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"
