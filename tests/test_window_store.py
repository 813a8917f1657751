"""One contract, every backend (the in-memory default, Redis, a Redis Cluster: the
``backend`` fixture): a stream's points, metadata, state sections and lock."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import redis

from service.errors import Conflict, InvalidInput
from service.stores.base import LEGACY_SECTION, Commit, StreamMeta, StreamPolicy, retained
from tests.conftest import BackendUnderTest

W = 8
POLICY = StreamPolicy(window=W, detector="residual_linear")  # reject, reject: strict


def batch(ts: list[float], channels: int = 2) -> np.ndarray:
    ts_arr = np.asarray(ts, dtype=np.float64)[:, None]
    values = ts_arr * np.arange(1, channels + 1)  # deterministic, distinct per point
    return np.hstack([ts_arr, values])


@pytest.fixture
async def store(backend):
    s = backend.build(POLICY)
    yield s
    await s.close()


async def append(store, stream, points, **policy):
    """An append with the policy changed for this call only (the service fixes it once,
    when it builds the backend)."""
    streams, fixed = store.streams, store.streams.policy
    streams.policy = replace(fixed, **policy)
    try:
        return await streams.append(stream, points)
    finally:
        streams.policy = fixed


async def commit(store, stream, sections=None, **fields):
    return await store.commit(Commit(stream, sections=sections or {}, **fields))


async def test_first_append_creates_stream(store):
    result = await append(store, "s1", batch([1, 2, 3]))
    assert result.created and result.accepted == 3 and result.duplicates == 0
    meta = await store.streams.get("s1")
    assert (meta.channels, meta.window, meta.points_seen, meta.last_timestamp) == (2, W, 3, 3.0)
    np.testing.assert_array_equal(result.points, batch([1, 2, 3]))


async def test_window_keeps_last_w_points_and_returns_context(store):
    await append(store, "s", batch(list(range(1, 101))))
    await commit(store, "s", {"s": b"scored"}, scored=100)  # as a commit does
    result = await append(store, "s", batch([101, 102, 103]))
    # context = the retained(W) - 1 points before the batch (what the scoring loop needs to
    # learn a chunk that began in an earlier batch), then the batch
    keep = retained(W)
    np.testing.assert_array_equal(result.points[:, 0], np.arange(101 - (keep - 1), 104))
    window = await store.streams.window("s")  # the stream's window: its last W points
    np.testing.assert_array_equal(window, batch(list(range(104 - W, 104))))
    assert (await store.streams.get("s")).points_seen == 103


async def test_rejections_change_nothing(store):
    await append(store, "s", batch([1, 2, 3]))
    before = (await store.streams.get("s"), await store.streams.window("s"))
    with pytest.raises(InvalidInput) as exc:
        await append(store, "s", batch([3, 4]))  # 3 is not after the last timestamp
    assert exc.value.loc == ("body", "points", 0, "timestamp")
    with pytest.raises(InvalidInput) as exc:
        await append(store, "s", batch([4, 5], channels=3))
    assert exc.value.loc[-1] == "values"
    after = (await store.streams.get("s"), await store.streams.window("s"))
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])


async def test_drop_policy_is_idempotent_for_exact_duplicates(store):
    await append(store, "s", batch([1, 2, 3]))
    result = await append(store, "s", batch([2, 3, 4]), duplicates="drop")
    assert (result.duplicates, result.accepted) == (2, 1)
    np.testing.assert_array_equal((await store.streams.window("s"))[:, 0], [1, 2, 3, 4])
    conflicting = batch([4, 5])
    conflicting[0, 1] += 1.0  # same timestamp, different value: not a duplicate
    with pytest.raises(InvalidInput):
        await append(store, "s", conflicting, duplicates="drop")
    assert (await store.streams.get("s")).points_seen == 4


async def test_put_stream_fixes_channels_and_resets_state_on_change(store):
    meta, created = await store.streams.put(
        StreamMeta(stream="p", channels=3, window=16, detector="residual_linear",
                   channel_names=["a", "b", "c"]))
    assert created and meta.channel_names == ["a", "b", "c"] and meta.window == 16
    await commit(store, "p", {"s": b"state"})
    _, created = await store.streams.put(
        StreamMeta(stream="p", channels=3, window=16, detector="residual_linear"))
    assert not created and (await store.streams.sections("p")).get("s") == b"state"
    await store.streams.put(StreamMeta(stream="p", channels=3, window=32,
                                      detector="residual_linear"))
    assert await store.streams.sections("p") == {}
    with pytest.raises(Conflict) as exc:
        await store.streams.put(StreamMeta(stream="p", channels=2, window=32,
                                          detector="residual_linear"))
    assert exc.value.loc[-1] == "channels"


async def test_list_and_delete(store):
    await append(store, "b", batch([1]))
    await append(store, "a", batch([1]))
    assert [m.stream for m in await store.streams.list()] == ["a", "b"]
    assert await store.streams.delete("a")
    assert not await store.streams.delete("a")
    assert [m.stream for m in await store.streams.list()] == ["b"]
    assert await store.streams.get("a") is None


async def test_state_round_trip(store):
    await append(store, "s", batch([1]))
    assert await store.streams.sections("s") == {}
    await commit(store, "s", {"s": b"\x00\x01binary"})
    assert (await store.streams.sections("s")).get("s") == b"\x00\x01binary"


async def test_concurrent_appends_lose_and_duplicate_nothing(store):
    """Many writers race on one stream: every accepted point is stored exactly once."""
    accepted: list[float] = []

    async def writer(k: int) -> None:
        for j in range(10):
            ts = float(k * 10 + j + 1)
            try:
                await append(store, "race", batch([ts]))
                accepted.append(ts)
            except InvalidInput:
                pass  # lost the race to a later timestamp: rejected whole, fine

    await asyncio.gather(*(writer(k) for k in range(16)))
    meta = await store.streams.get("race")
    window = await store.streams.window("race")
    assert meta.points_seen == len(accepted)
    assert list(window[:, 0]) == sorted(accepted)[-W:]
    assert np.all(np.diff(window[:, 0]) > 0)


async def test_lock_serialises(store):
    order: list[str] = []

    async def critical(name: str) -> None:
        async with store.streams.lock("L"):
            order.append(f"{name}-in")
            await asyncio.sleep(0.02)
            order.append(f"{name}-out")

    await asyncio.gather(critical("a"), critical("b"))
    assert order in (["a-in", "a-out", "b-in", "b-out"], ["b-in", "b-out", "a-in", "a-out"])


async def test_ttl_expires_idle_streams(backend):
    store = backend.build(replace(POLICY, ttl_seconds=1))
    await append(store, "ttl", batch([1, 2]))
    await commit(store, "ttl", {"s": b"x"})
    assert await store.streams.get("ttl") is not None
    await asyncio.sleep(2.2)
    assert await store.streams.get("ttl") is None
    assert await store.streams.sections("ttl") == {}
    assert await store.streams.list() == []
    await store.close()


async def test_redis_keys_of_a_stream_carry_its_hash_tag(redis_url):
    """One stream's keys share a slot (its scripts and commits touch them together)."""
    store = BackendUnderTest("redis", redis_url).build(POLICY)
    await append(store, "my.stream:1", batch([1, 2]))
    await commit(store, "my.stream:1", {"s": b"x"}, scored=2, receipt=("k", b"r"))
    async with store.streams.lock("my.stream:1"):
        keys = [k.decode() for k in redis.Redis.from_url(redis_url).keys("*")]
    own = sorted(k for k in keys if k != "tsad:streams")
    assert [k.split("}:")[1].split(":")[0] for k in own] == ["idem", "lock", "meta",
                                                              "sections", "win"]
    assert all(k.startswith("tsad:{my.stream:1}:") for k in own), own
    await store.close()


# --- repeated and backward timestamps (plan_append, shared by both stores) ---------------
async def test_nudge_stores_repeated_and_backward_stamps_just_after_the_previous(store):
    await append(store, "n", batch([1, 2, 3]))
    points = batch([3, 2, 5, 5, 6])
    points[:, 1] += 0.5  # not copies of stored points: new data with bad stamps
    result = await append(store, "n", points, timestamps="nudge")
    assert result.actions == ["nudged", "nudged", "stored", "nudged", "stored"]
    assert result.stamps == [3.001, 3.001 + 0.001, 5.0, 5.001, 6.0]
    assert (result.accepted, result.duplicates) == (5, 0)
    window = await store.streams.window("n")
    np.testing.assert_array_equal(window[:, 0], [1, 2, 3, *result.stamps])
    np.testing.assert_array_equal(window[3:, 1:], points[:, 1:])  # values as sent
    np.testing.assert_array_equal(result.points[-5:], window[3:])
    meta = await store.streams.get("n")
    assert (meta.points_seen, meta.last_timestamp) == (8, 6.0)


async def test_drop_and_reject_timestamp_policies(store):
    await append(store, "d", batch([1, 2, 3]))
    points = batch([3, 4, 4, 2, 5])
    points[:, 1] += 0.5
    result = await append(store, "d", points, timestamps="drop")
    assert result.actions == ["dropped", "stored", "dropped", "dropped", "stored"]
    assert result.stamps == [None, 4.0, None, None, 5.0] and result.accepted == 2
    np.testing.assert_array_equal((await store.streams.window("d"))[:, 0], [1, 2, 3, 4, 5])
    before = (await store.streams.get("d"), await store.streams.window("d"))
    for bad, i in ((batch([6, 6]), 1), (batch([7, 6.5]), 1), (batch([4.5]), 0)):
        with pytest.raises(InvalidInput) as exc:
            await append(store, "d", bad)  # policy reject: the store's default
        assert exc.value.loc == ("body", "points", i, "timestamp")
    after = (await store.streams.get("d"), await store.streams.window("d"))
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])


async def test_a_retried_batch_is_recognised_even_where_it_was_nudged(store):
    first = batch([1, 2, 2, 2, 3])
    first[:, 1] = [10, 11, 12, 13, 14]
    stored = await append(store, "r", first, timestamps="nudge")
    assert stored.actions == ["stored", "stored", "nudged", "nudged", "stored"]
    retry = np.vstack([first[2:], batch([4])])  # resent from the first nudged point on
    result = await append(store, "r", retry, duplicates="drop", timestamps="nudge")
    assert result.actions == ["duplicate", "duplicate", "duplicate", "stored"]
    assert result.stamps == [*stored.stamps[2:], 4.0] and result.duplicates == 3
    # duplicates "reject": a retry of stored points alone is answered (its sender cannot
    # know they were stored), one that goes on with new points is refused
    only = await append(store, "r", first[3:], timestamps="nudge")
    assert only.actions == ["duplicate", "duplicate"] and only.accepted == 0
    with pytest.raises(InvalidInput) as exc:
        await append(store, "r", np.vstack([first[3:], batch([5])]), timestamps="nudge")
    assert exc.value.loc == ("body", "points", 0, "timestamp")
    # the same stamp and value again, after its stored copy: a new point, not a retry
    last = (await store.streams.window("r"))[-1:]
    again = await append(store, "r", np.vstack([last, last]), duplicates="drop", timestamps="nudge")
    assert again.actions == ["duplicate", "nudged"] and again.stamps[1] == 4.001
    # values of a nudged point, but not the stamp it was sent with: new data, not a retry
    late = np.array([[1.5, 12.0, 4.0]])
    result = await append(store, "r", late, duplicates="drop", timestamps="nudge")
    assert result.actions == ["nudged"] and result.stamps == [4.001 + 0.001]
    assert (await store.streams.get("r")).points_seen == 8


async def test_a_streams_own_policy_overrides_the_default(store):
    meta, _ = await store.streams.put(StreamMeta(stream="o", channels=2, window=W,
                                                detector="residual_linear", timestamps="drop"))
    assert meta.timestamps == "drop" and (await store.streams.get("o")).timestamps == "drop"
    result = await append(store, "o", batch([1, 1]), timestamps="nudge")
    assert result.actions == ["stored", "dropped"]
    await store.streams.put(StreamMeta(stream="o", channels=2, window=W,
                                      detector="residual_linear"))  # back to the default
    result = await append(store, "o", batch([0.5]), timestamps="nudge")
    assert result.actions == ["nudged"] and result.stamps == [1.001]


async def test_racing_writers_with_nudge_store_every_point_once(backend):
    """Every writer's points are accepted (late ones nudged); none lost or doubled."""
    store = backend.build(replace(POLICY, window=1000, timestamps="nudge"))

    async def writer(k: int) -> list[float]:
        stamps = []
        for j in range(10):
            point = np.array([[float(j + 1), float(k), float(j)]])  # values name the point
            stamps += (await store.streams.append("race", point)).stamps
        return stamps

    stamps = [s for ss in await asyncio.gather(*(writer(k) for k in range(16))) for s in ss]
    window = await store.streams.window("race")
    assert (await store.streams.get("race")).points_seen == len(window) == 160
    assert np.all(np.diff(window[:, 0]) > 0) and sorted(stamps) == window[:, 0].tolist()
    assert sorted(map(tuple, window[:, 1:].tolist())) == [
        (float(k), float(j)) for k in range(16) for j in range(10)]
    await store.close()


async def test_redis_meta_stored_before_the_policy_field_still_loads(redis_url):
    store = BackendUnderTest("redis", redis_url).build(POLICY)
    await append(store, "old", batch([1, 2]))
    # as an old version left it
    redis.Redis.from_url(redis_url).hdel("tsad:{old}:meta", "timestamps")
    assert (await store.streams.get("old")).timestamps is None
    result = await append(store, "old", batch([2.0]) + [[0, 1, 1]], timestamps="nudge")
    assert result.actions == ["nudged"]
    await store.close()


# --- state sections and the commit ---------------------------------------------------------
async def test_a_commit_writes_its_sections_and_keeps_the_others(store):
    await append(store, "c", batch([1, 2]))
    v1 = await commit(store, "c", {"det": b"d1", "thr": b"t1", "alr": b"a1"}, scored=2)
    v2 = await commit(store, "c", {"thr": b"t2"}, drop=("alr",))
    assert v2 == v1 + 1 and (await store.streams.get("c")).version == v2
    assert await store.streams.sections("c") == {"det": b"d1", "thr": b"t2"}
    assert await store.streams.sections("c", ["thr", "nope"]) == {"thr": b"t2"}
    assert (await store.streams.get("c")).points_scored == 2  # no mark: unchanged
    # a receipt alone writes no state: no version bump
    assert await commit(store, "c", receipt=("k", b"kept")) == 0
    assert (await store.streams.get("c")).version == v2
    assert await store.streams.receipt("c", "k") == b"kept"
    assert await commit(store, "gone", {"det": b"x"}) == 0  # no such stream: nothing


async def test_redis_state_kept_whole_by_an_earlier_version_reads_as_legacy(redis_url):
    store = BackendUnderTest("redis", redis_url).build(POLICY)
    await append(store, "l", batch([1]))
    plain = redis.Redis.from_url(redis_url)
    plain.set("tsad:{l}:state", b"whole blob")  # what versions before sections wrote
    assert await store.streams.sections("l") == {LEGACY_SECTION: b"whole blob"}
    await commit(store, "l", {"det": b"d"}, scored=1)  # the first commit replaces it
    assert await store.streams.sections("l") == {"det": b"d"}
    assert not plain.exists("tsad:{l}:state")
    await store.close()
