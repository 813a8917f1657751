"""The ingest doors' part of the storage interface (``Backend.ingest``), one contract on
every backend (memory, Redis, a Redis Cluster: the ``backend`` fixture): held rows of
grouped streams, watches, their cursors and leases."""

from __future__ import annotations

import asyncio

import pytest

from service.stores.base import HeldRows


@pytest.fixture
async def store(backend):
    s = backend.build()
    yield s.ingest
    await s.close()


async def test_held_rows_round_trip_and_removed_rows_go(store):
    assert await store.held("host.a") == HeldRows()
    held = HeldRows({1000: [1.0, None], 2000: [2.0, 3.0]}, last=[0.5, 0.25])
    await store.hold("host.a", held, removed=[])
    assert await store.held("host.a") == held
    got = await store.held("host.a")
    got.rows.pop(1000)
    got.rows[3000] = [None, 4.0]
    got.last = [2.0, 3.0]
    await store.hold("host.a", got, removed=[1000])
    assert await store.held("host.a") == HeldRows({2000: [2.0, 3.0], 3000: [None, 4.0]},
                                                  last=[2.0, 3.0])
    assert await store.held("host.b") == HeldRows()  # per stream


async def test_held_rows_are_a_copy_until_held_again(store):
    await store.hold("s", HeldRows({1000: [1.0]}), removed=[])
    got = await store.held("s")
    got.rows[1000][0] = 9.0
    got.rows[2000] = [2.0]
    assert await store.held("s") == HeldRows({1000: [1.0]})


async def test_a_forgotten_stream_holds_nothing(store):
    await store.hold("s", HeldRows({1000: [1.0, None]}, last=[0.0, 0.0]), removed=[])
    await store.forget_stream("s")
    assert await store.held("s") == HeldRows()


async def test_holding_serialises_one_stream_not_two(store):
    inside: list[str] = []

    async def critical(stream: str, tag: str) -> None:
        async with store.holding(stream):
            inside.append(f"{tag}+")
            await asyncio.sleep(0.05)
            inside.append(f"{tag}-")

    await asyncio.gather(critical("s", "a"), critical("s", "b"))
    assert inside in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])
    inside.clear()
    await asyncio.gather(critical("s", "a"), critical("t", "b"))
    assert inside[:2] in (["a+", "b+"], ["b+", "a+"])  # other streams do not wait


async def test_watches_and_their_cursors(store):
    spec = {"query": "up", "step": 30.0}
    assert await store.put_watch("w", spec) is True
    assert await store.put_watch("w", spec | {"step": 60.0}) is False
    assert await store.put_watch("v", spec) is True
    assert await store.watches() == {"w": spec | {"step": 60.0}, "v": spec}
    assert await store.cursor("w") is None
    await store.set_cursor("w", 1_700_000_030.5)
    assert await store.cursor("w") == 1_700_000_030.5
    assert await store.delete_watch("w") is True  # with its cursor, in one step
    assert await store.cursor("w") is None and await store.watches() == {"v": spec}
    assert await store.delete_watch("w") is False


async def test_one_owner_holds_a_lease_until_it_lapses_or_is_released(store):
    assert await store.lease("w", "a", 0.3)
    assert not await store.lease("w", "b", 0.3)  # a holds it
    assert await store.lease("w", "a", 0.3)  # renewed by its holder
    assert await store.lease("v", "b", 0.3)  # another watch
    await asyncio.sleep(0.45)
    assert await store.lease("w", "b", 10)  # a's lapsed
    await store.release("w", "a")  # not a's any more: nothing happens
    assert not await store.lease("w", "a", 10)
    await store.release("w", "b")
    assert await store.lease("w", "a", 10)
