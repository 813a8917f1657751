"""The Redis client's connections are a blocking pool of TSAD_REDIS_MAX_CONNECTIONS: a
burst of commands beyond it waits for free connections instead of failing (redis-py's
default pool raised "Too many connections" past its size, answered as 503s). Real Redis,
real concurrent requests through the app."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from service.app import create_app
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.stores.redis.connection import connect


async def _burst(client: aioredis.Redis, n: int) -> list:
    """n commands at once, each holding its connection for 50 ms."""
    return await asyncio.gather(*(client.blpop([f"pool-test-{i}"], timeout=0.05)
                                  for i in range(n)))


async def test_a_burst_beyond_the_pool_waits_for_connections(redis_url):
    capped = aioredis.Redis.from_pool(aioredis.ConnectionPool.from_url(redis_url,
                                                                      max_connections=4))
    with pytest.raises(RedisConnectionError, match="Too many connections"):
        await _burst(capped, 32)  # what the default pool did past its size
    await capped.aclose()
    client = connect(redis_url, max_connections=4)
    assert await _burst(client, 32) == [None] * 32
    pool = client.connection_pool
    assert len(pool._available_connections) + len(pool._in_use_connections) <= 4
    await client.aclose()


async def test_concurrent_requests_share_a_small_pool(redis_url):
    """64 streams written at once through one app whose pool holds 3 connections: every
    request is answered 200, and the pool never opened more than 3."""
    settings = Settings(redis_url=redis_url, redis_max_connections=3)
    app = create_app(settings, ServiceMetrics(CollectorRegistry()))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        pool = app.state.services.backend.inner.conn.client.connection_pool
        answers = await asyncio.gather(*(http.post("/score", json={
            "stream": f"pool-{i}", "timestamps": [1.0, 2.0, 3.0],
            "values": [[1.0], [2.0], [3.0]]}) for i in range(64)))
        opened = len(pool._available_connections) + len(pool._in_use_connections)
    assert [r.status_code for r in answers] == [200] * 64, answers[0].text
    assert 1 <= opened <= 3


def test_commands_are_packed_byte_for_byte_as_redis_py_packs_them():
    """The connections pack commands with hiredis (service/stores/redis/connection.py):
    the bytes redis-py's own packer writes, for every argument type the stores send."""
    from redis.asyncio.connection import Connection

    from service.stores.redis.connection import _Connection

    ours, theirs = _Connection(), Connection()
    for args in [("SET", "k", "é"), ("EVALSHA", "ab", 2, b"k1", b"k2", 1.5, -3, 1e-7),
                 ("RPUSH", b"w", memoryview(b"\x00\x01"), bytearray(b"\xff")),
                 ("SCRIPT LOAD", "return 1"), (b"CLIENT SETNAME", b"x"),
                 ("HSET", "h", "f", 0.1 + 0.2)]:
        assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args)), args
