"""The Redis backend's API keys: ``<prefix>:apikeys``, a hash of key id -> JSON record (its
hash, scopes and tenant; never the key). Every replica and `tsad keys` see the same keys:
a revoked key is refused from the next request."""

from __future__ import annotations

import json
from dataclasses import asdict

from service.auth.keys import ApiKey
from service.stores.redis.connection import RedisConnection


class RedisKeys:
    def __init__(self, conn: RedisConnection) -> None:
        self.conn = conn
        self.redis = conn.client
        self.k_keys = conn.key("apikeys")

    async def add(self, key: ApiKey) -> None:
        await self.conn.call(self.redis.hset(self.k_keys, key.id, json.dumps(asdict(key))))

    async def get(self, kid: str) -> ApiKey | None:
        raw = await self.conn.call(self.redis.hget(self.k_keys, kid))
        return ApiKey(**json.loads(raw)) if raw else None

    async def list(self) -> list[ApiKey]:
        raw = await self.conn.call(self.redis.hgetall(self.k_keys))
        return sorted((ApiKey(**json.loads(v)) for v in raw.values()),
                      key=lambda k: k.created_at)

    async def revoke(self, kid: str) -> bool:
        return bool(await self.conn.call(self.redis.hdel(self.k_keys, kid)))
