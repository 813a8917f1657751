"""The per-process scorer cache: decoded stream state kept between requests, valid while
the stream's version in the store matches, so it never changes a result and another
replica's write is never missed."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.metrics import ServiceMetrics
from service.services import build_services
from service.settings import Settings
from service.stores import build_backend
from service.stores.base import StreamPolicy
from tests.conftest import BackendUnderTest


def client(backend: BackendUnderTest, **overrides) -> TestClient:
    settings = Settings(**backend.settings, detector_params={"*": {"warmup": 64}},
                        threshold_min_scores=20, **overrides)
    return TestClient(create_app(settings, ServiceMetrics(CollectorRegistry())))


def batch(start: int, n: int) -> dict:
    pts = [{"timestamp": float(t), "values": [math.sin(t / 5) + (3.0 if t % 97 == 0 else 0)]}
           for t in range(start, start + n)]
    return {"stream": "c", "points": pts}


BATCHES = [(a, 40) for a in range(0, 600, 40)]


def metric(c: TestClient, name: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


def test_the_cache_changes_no_result(service_backend):
    with client(service_backend, scorer_cache_mb=0) as off:
        want = [off.post("/score", json=batch(*b)).json() for b in BATCHES]
        assert metric(off, 'tsad_scorer_cache_total{result="hit"}') == 0
    with client(service_backend) as on:
        if service_backend.redis_url:
            on.delete("/streams/c")  # the same Redis database as the run above
        got = [on.post("/score", json=batch(*b)).json() for b in BATCHES]
        assert metric(on, 'tsad_scorer_cache_total{result="hit"}') == len(BATCHES) - 1
        assert metric(on, 'tsad_scorer_cache_total{result="miss"}') == 1
        alerts = on.get("/alerts", params={"stream": "c"}).json()["alerts"]
    assert got == want
    assert any(p["anomaly"] for r in got for p in r["results"]) and alerts


def test_another_replicas_writes_are_never_missed(redis_url):
    """Two processes' worth of service on one Redis take turns on a stream: every batch
    finds the other's write (a miss) and the results are those of a single process."""
    with client(BackendUnderTest("redis", redis_url)) as single:
        want = [single.post("/score", json=batch(*b)).json() for b in BATCHES]
        single.delete("/streams/c")
    redis_backend = BackendUnderTest("redis", redis_url)
    with client(redis_backend) as a, client(redis_backend) as b:
        got = [(a if i % 2 else b).post("/score", json=batch(*x)).json()
               for i, x in enumerate(BATCHES)]
        for c in (a, b):
            assert metric(c, 'tsad_scorer_cache_total{result="hit"}') == 0
        # now only one of them writes: from its second batch on, it hits
        more = [a.post("/score", json=batch(600 + 40 * i, 40)) for i in range(3)]
        assert all(r.status_code == 200 for r in more)
        assert metric(a, 'tsad_scorer_cache_total{result="hit"}') == 2
    assert got == want


def test_a_configuration_change_reaches_a_cached_stream(service_backend):
    with client(service_backend) as c:
        for b in BATCHES[:8]:
            assert c.post("/score", json=batch(*b)).status_code == 200
        r = c.put("/streams/c", json={"channels": 1, "threshold": {"kind": "fixed",
                                                                   "value": 1e-9}})
        assert r.status_code == 200
        results = c.post("/score", json=batch(320, 40)).json()["results"]
        assert all(p["anomaly"] and p["threshold"] == 1e-9 for p in results)
        assert metric(c, 'tsad_scorer_cache_total{result="miss"}') == 2


async def test_an_append_on_known_meta_is_one_round_trip(redis_url):
    """With the meta of its cached scorer, an append is one script call: no read of the
    meta before it nor after it."""
    store = BackendUnderTest("redis", redis_url).build(StreamPolicy(window=8,
                                                                    detector="zscore"))
    ts = np.arange(10.0)[:, None]
    first = await store.streams.append("rt", np.hstack([ts, ts]))
    plain = redis.Redis.from_url(redis_url)
    plain.config_resetstat()
    more = np.hstack([ts + 10, ts])
    second = await store.streams.append("rt", more, known=first.meta)
    stats = plain.info("commandstats")  # counts the commands scripts run, too
    calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}
    # one script call, and no read of the meta at all: the script checks the meta the
    # append was planned on, and the caller moves that on by the batch
    assert calls["evalsha"] == 1 and "hgetall" not in calls, calls
    assert second.meta == await store.streams.get("rt")
    assert (second.meta.points_seen, second.meta.version) == (20, first.meta.version + 1)
    # a stale meta (another writer got in first) is found out and the append planned again
    third = await store.streams.append("rt", np.hstack([ts + 20, ts]), known=first.meta)
    assert third.accepted == 10 and third.meta.points_seen == 30
    await store.close()
    plain.close()


async def test_a_deleted_streams_scorer_leaves_every_replicas_cache(backend):
    """Replica a scores three streams; replica b deletes one and writes another. Within
    a cache check, a's cache holds only the third (was: a deleted stream's scorer stayed
    in every other replica's cache, 288 -> 378 MB after 5,000 deletes and creates)."""
    settings = Settings(**backend.settings, default_detector="residual_linear",
                        default_window=16, scorer_cache_check_seconds=0.05)
    shared = build_backend(settings) if backend.kind == "memory" else None  # one process
    a, b = (build_services(settings, ServiceMetrics(CollectorRegistry()),
                           shared or build_backend(settings)) for _ in range(2))
    t = np.arange(100, dtype=float)
    try:
        for stream in ("gone", "moved", "kept"):
            await a.score(stream, t, np.sin(t / 5)[:, None])
        assert len(a.scorers) == 3
        await b.streams.delete("gone")
        await b.score("moved", t + 100, np.sin(t / 5)[:, None])
        checks = asyncio.create_task(a.scorers.run_checks(a.backend.streams, 0.05))
        deadline = time.monotonic() + 10
        while len(a.scorers) > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        checks.cancel()
        assert len(a.scorers) == 1 and a.scorers.take("kept") is not None
    finally:
        for services in (a, b):
            await services.backend.close()


def test_a_shadows_commit_reaches_a_scorer_a_request_has_taken():
    """The stream's lock is taken by the request's append (one script), after the request
    took its scorer out of the cache: a shadow committing its own sections in between
    bumps the stream's version, and the scorer must stay valid (or the request decodes
    the whole state again, at every chunk of a stream with a shadow)."""
    from dataclasses import replace

    from service.scorers import Cached, ScorerCache
    from service.stores.base import AppendResult, StreamMeta

    cache = ScorerCache(limit_bytes=1 << 20)
    meta = StreamMeta("s", channels=1, window=16, detector="residual_linear", version=5)
    scorer = object()  # the cache never looks inside a scorer
    cache.put("s", Cached(meta, scorer, nbytes=100))
    cached = cache.take("s")
    cache.bumped("s", 6)  # the shadow's commit, while the request waits for the lock
    appended = AppendResult(meta=replace(meta, version=7), created=False, duplicates=0,
                            accepted=1, points=np.zeros((1, 2)), actions=["stored"],
                            stamps=[0.0])
    assert ScorerCache.valid(cached, appended) is scorer
    # another writer's bump (not the version just after ours) still invalidates
    cache.put("s", replace(cached, meta=appended.meta))
    cached = cache.take("s")
    cache.bumped("s", 9)
    assert ScorerCache.valid(cached, replace(appended, meta=replace(meta, version=10))) is None
    # once put back, nothing of the taken entry lingers
    cache.put("s", cached)
    assert len(cache._out) == 0
