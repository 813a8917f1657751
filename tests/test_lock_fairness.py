"""The stream lock serves a stream's writers in arrival order (issue 24: a polled lock let
32 writers of one stream wait up to 10 s and time out). Real Redis, one connection pool
per writer (as replicas have), real concurrent writers; and the in-memory store."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis.asyncio as aioredis

from service.stores.base import StreamPolicy
from tests.conftest import BACKENDS, BackendUnderTest


@pytest.fixture(params=BACKENDS[:2])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def writers(backend: BackendUnderTest, n: int) -> list:
    """``n`` writers' stores: on Redis each its own connections, like ``n`` replicas; in
    memory one store (its lock is per process)."""
    if backend.redis_url is None:
        return [backend.build(StreamPolicy())] * n
    return [backend.build(StreamPolicy()) for _ in range(n)]


async def queued(backend: BackendUnderTest, store, stream: str, n: int) -> None:  # noqa: ANN001
    """Returns once ``n`` writers wait in the stream's lock queue (Redis), or after the
    waiter has reached the lock (memory: asyncio.Lock queues on its first await)."""
    if backend.redis_url is None:
        for _ in range(5):
            await asyncio.sleep(0)
        return
    client = aioredis.from_url(backend.redis_url)
    key = store.streams.conn.stream_key(stream, "lockq")
    try:
        for _ in range(500):
            if await client.llen(key) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{n} writers never queued on {key}")
    finally:
        await client.aclose()


async def test_waiting_writers_get_the_lock_in_arrival_order(kind, request):
    backend = _backend(kind, request)
    stores = writers(backend, 9)
    order: list[int] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with stores[0].streams.lock("s"):
            order.append(0)
            await release.wait()

    async def writer(i: int) -> None:
        async with stores[i].streams.lock("s"):
            order.append(i)

    tasks = [asyncio.create_task(holder())]
    await asyncio.sleep(0.05)
    for i in [5, 2, 8, 1, 7, 3, 6, 4]:  # arrival order, unlike creation or token order
        tasks.append(asyncio.create_task(writer(i)))
        await queued(backend, stores[0], "s", len(tasks) - 1)
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert order == [0, 5, 2, 8, 1, 7, 3, 6, 4]
    for store in set(stores):
        await store.close()


async def test_thirty_two_writers_of_one_stream_take_turns_and_none_times_out(redis_url):
    """32 replicas' writers loop on one stream's lock, each holding it a few ms: every
    writer gets it (nobody times out) and they take turns: while all are writing, no
    writer gets the lock twice more than another."""
    backend = BackendUnderTest("redis", redis_url)
    stores = [backend.build(StreamPolicy(), lock_wait_seconds=10) for _ in range(32)]
    rounds, turns = 4, []

    async def writer(i: int) -> None:
        for _ in range(rounds):
            async with stores[i].streams.lock("busy"):
                turns.append(i)
                await asyncio.sleep(0.003)

    await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(32))), 60)
    assert sorted(turns) == sorted(list(range(32)) * rounds)  # nobody timed out
    counts = [0] * 32
    for i in turns[:32 * (rounds - 1)]:  # while every writer still has rounds left
        counts[i] += 1
        assert max(counts) - min(counts) <= 2, (i, counts)
    for store in stores:
        await store.close()


def _backend(kind: str, request: pytest.FixtureRequest) -> BackendUnderTest:
    if kind == "memory":
        return BackendUnderTest("memory")
    return BackendUnderTest("redis", request.getfixturevalue("redis_url"))


async def test_an_append_that_takes_the_lock_queues_in_arrival_order(kind, request):
    """A lone request's append takes the stream's lock in its own call (deferred): while
    the lock is held, it stores nothing and queues like any writer, behind those already
    waiting, then appends holding the lock."""
    backend = _backend(kind, request)
    stores = writers(backend, 3)
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with stores[0].streams.lock("s"):
            order.append("holder")
            await release.wait()
            meta = await stores[0].streams.get("s")
            order.append(f"holder saw {meta.points_seen if meta else 0} points")

    async def writer() -> None:
        async with stores[1].streams.lock("s"):
            order.append("writer")

    async def appender() -> None:
        async with stores[2].streams.lock("s", deferred=True) as held:
            appended = await stores[2].streams.append("s", np.array([[1.0, 2.0]]), lock=held)
            order.append(f"appender stored {appended.accepted}")

    tasks = [asyncio.create_task(holder())]
    await asyncio.sleep(0.05)
    tasks.append(asyncio.create_task(writer()))
    await queued(backend, stores[0], "s", 1)
    tasks.append(asyncio.create_task(appender()))
    await queued(backend, stores[0], "s", 2)
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert order == ["holder", "holder saw 0 points", "writer", "appender stored 1"]
    for store in set(stores):
        await store.close()
