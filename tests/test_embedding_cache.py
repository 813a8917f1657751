"""Two-level embedding cache on the real model and a real Redis; stride reuse; metrics."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from models.lm.cache import (
    ByteLRU,
    CacheConfig,
    CachedEncoder,
    StridedEmbedder,
    StrideState,
    to_f16_bytes,
)
from models.lm.encoder import EncoderConfig, shared_encoder
from models.lm.metrics import EmbeddingMetrics
from models.lm.prompts import PromptBuilder, PromptConfig


class Recording:
    """The real encoder, recording each LM call (to count calls, not to fake results)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []
        self.model_id, self.pooling, self.dim = inner.model_id, inner.pooling, inner.dim

    def encode(self, texts, batch_size=None):
        self.calls.append(list(texts))
        return self.inner.encode(texts, batch_size)


@pytest.fixture(scope="module")
def lm():
    return shared_encoder(EncoderConfig(device="cpu"))


@pytest.fixture
def rec(lm) -> Recording:
    return Recording(lm)


@pytest.fixture(scope="module")
def builder(lm) -> PromptBuilder:
    return PromptBuilder(PromptConfig(), lm.tokenizer)


def prompts_for(builder, n: int, offset: float = 0.0) -> list[str]:
    t = np.arange(16.0)
    return [builder(np.sin(t / (i + 2)) + offset)[0] for i in range(n)]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_misses_go_to_the_lm_once_then_lru_hits(rec, builder):
    reg = CollectorRegistry()
    cache = CachedEncoder(rec, CacheConfig(), EmbeddingMetrics(reg))
    p = prompts_for(builder, 2)
    first = cache.encode([p[0], p[1], p[0]])
    assert rec.calls == [[p[0], p[1]]]  # one LM batch, duplicates encoded once
    np.testing.assert_array_equal(first[0], first[2])
    # what the LM said, rounded through float16, whether it was a hit or not
    direct = rec.inner.encode(p)
    np.testing.assert_array_equal(first[:2], direct.astype(np.float16).astype(np.float32))
    second = cache.encode(p)
    assert len(rec.calls) == 1 and np.array_equal(second, first[:2])
    assert sample(reg, "tsad_embedding_cache_misses_total") == 2
    assert sample(reg, "tsad_embedding_cache_hits_total", level="batch") == 1
    assert sample(reg, "tsad_embedding_cache_hits_total", level="lru") == 2
    assert sample(reg, "tsad_embedding_encode_seconds_count") == 1
    assert cache.stats.hit_rate == pytest.approx(3 / 5)


def test_redis_hit_returns_exactly_what_was_stored(rec, builder, redis_url):
    p = prompts_for(builder, 3, offset=1.0)
    writer = CachedEncoder(rec, CacheConfig(redis_url=redis_url, ttl_seconds=600))
    stored = writer.encode(p)
    client = redis.Redis.from_url(redis_url)
    raw = client.get(writer.key(p[1]))
    assert raw == to_f16_bytes(stored[1]) and len(raw) == 2 * 384
    assert 0 < client.ttl(writer.key(p[1])) <= 600

    reg = CollectorRegistry()
    replica = CachedEncoder(rec, CacheConfig(redis_url=redis_url), EmbeddingMetrics(reg))
    calls = len(rec.calls)
    got = replica.encode(p)
    assert len(rec.calls) == calls  # no LM call: a replica starts warm from Redis
    assert np.array_equal(got, stored)
    assert sample(reg, "tsad_embedding_cache_hits_total", level="redis") == 3
    assert replica.encode(p[:1]).tobytes() == stored[:1].tobytes()  # now from its LRU
    assert sample(reg, "tsad_embedding_cache_hits_total", level="lru") == 1


def test_keys_separate_models_and_poolings(rec):
    other = Recording(rec.inner)
    other.model_id = rec.model_id.replace("-mean-", "-last-")
    a, b = CachedEncoder(rec), CachedEncoder(other)
    assert a.key("x") != b.key("x") and a.key("x") == CachedEncoder(rec).key("x")


def test_lru_is_bounded_in_bytes(rec, builder):
    entry = len(CachedEncoder(rec).key("x")) + 2 * 384
    cache = CachedEncoder(rec, CacheConfig(lru_bytes=3 * entry))
    p = prompts_for(builder, 5, offset=2.0)
    cache.encode(p)
    assert len(cache.lru) == 3 and cache.lru.nbytes <= 3 * entry
    assert cache.key(p[0]) not in cache.lru and cache.key(p[4]) in cache.lru  # LRU order
    lru = ByteLRU(10)
    lru.put("big", b"x" * 100)  # larger than the bound: not stored, nothing evicted
    assert len(lru) == 0 and lru.nbytes == 0


def test_redis_unreachable_degrades_to_lru_and_lm(rec, builder):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    reg = CollectorRegistry()
    cfg = CacheConfig(redis_url=f"redis://127.0.0.1:{port}/0", redis_retry_seconds=60)
    cache = CachedEncoder(rec, cfg, EmbeddingMetrics(reg))
    p = prompts_for(builder, 2, offset=3.0)
    out = cache.encode(p)  # never raises
    assert out.shape == (2, 384) and np.isfinite(out).all()
    errors = sample(reg, "tsad_embedding_cache_errors_total", backend="redis", operation="get")
    assert errors == 1
    np.testing.assert_array_equal(cache.encode(p), out)  # LRU still serves
    cache.encode(prompts_for(builder, 1, offset=4.0))  # in back-off: no new timeout/error
    assert sample(reg, "tsad_embedding_cache_errors_total", backend="redis",
                  operation="get") == 1


def test_redis_going_down_mid_flight(rec, builder, redis_server, redis_url):
    reg = CollectorRegistry()
    cache = CachedEncoder(rec, CacheConfig(redis_url=redis_url), EmbeddingMetrics(reg))
    cache.encode(prompts_for(builder, 1, offset=5.0))
    redis_server.stop()
    try:
        out = cache.encode(prompts_for(builder, 1, offset=6.0))
        assert out.shape == (1, 384)
        assert sample(reg, "tsad_embedding_cache_errors_total", backend="redis",
                      operation="get") == 1
    finally:
        redis_server.start()


def test_stride_reuses_between_re_embeddings(rec, builder):
    reg = CollectorRegistry()
    cache = CachedEncoder(rec, CacheConfig(), EmbeddingMetrics(reg))
    strided = StridedEmbedder(cache, builder, stride=3)
    t = np.arange(40.0)
    series = np.stack([np.sin(t / 2), np.cos(t / 3)], axis=1)
    windows = np.lib.stride_tricks.sliding_window_view(series, 16, axis=0)[:7].transpose(0, 2, 1)
    states = strided.new_states(2)
    emb = strided.embed_stream(windows, states)  # (7, 2, 384)
    assert emb.shape == (7, 2, 384)
    assert sum(len(c) for c in rec.calls) == 6  # points 0, 3, 6 x 2 channels
    for b in (1, 2):
        np.testing.assert_array_equal(emb[b], emb[0])
    assert not np.array_equal(emb[3], emb[0])
    assert sample(reg, "tsad_embedding_stride_reuses_total") == 8
    np.testing.assert_array_equal(emb[3], cache.encode(
        [builder(windows[3, :, c])[0] for c in range(2)]))

    # states persist (JSON-able dicts) and carry on where they stopped
    restored = [StrideState.from_dict(s.to_dict()) for s in states]
    assert [s.count for s in restored] == [1, 1]
    nxt = np.lib.stride_tricks.sliding_window_view(series, 16, axis=0)[7:9].transpose(0, 2, 1)
    cont = strided.embed_stream(nxt, restored)
    np.testing.assert_array_equal(cont[0], emb[6])
    np.testing.assert_array_equal(cont[1], emb[6])
    assert [s.count for s in restored] == [3, 3]


def test_stride_one_embeds_every_point(rec, builder):
    strided = StridedEmbedder(CachedEncoder(rec), builder, stride=1)
    w = np.stack([np.sin(np.arange(16.0) / (k + 1)) for k in range(3)])[:, :, None]
    strided.embed_stream(w, strided.new_states(1))
    assert sum(len(c) for c in rec.calls) == 3
    with pytest.raises(ValueError):
        StridedEmbedder(CachedEncoder(rec), builder, stride=0)


def test_known_windows_skip_prompt_building(rec, builder):
    reg = CollectorRegistry()
    cached = CachedEncoder(rec, metrics=EmbeddingMetrics(reg))
    built: list[int] = []

    def prompts(windows):  # (B, W, C) -> B*C prompts, window-major; counts what it builds
        built.append(len(windows))
        return [p for w in windows for p in builder.batch(w[None])[0]]

    windows = np.sin(np.arange(40.0) / 3)[None, :, None] + np.arange(6.0)[:, None, None]
    windows = np.concatenate([windows, -windows], axis=2)  # (6, 40, 2)
    first = cached.encode_windows(windows, prompts, "variance:100")
    again = cached.encode_windows(windows[[4, 1]], prompts, "variance:100")
    assert built == [6] and len(rec.calls) == 1  # the second call built no prompt
    np.testing.assert_array_equal(again, first[[4, 1]])  # exactly what was returned first
    assert sample(reg, "tsad_embedding_cache_hits_total", level="window") == 4  # 2 x 2
    np.testing.assert_array_equal(first.reshape(12, -1),
                                  CachedEncoder(rec).encode(prompts(windows)))
    cached.encode_windows(windows[:1], prompts, "trend:100")  # another recipe: rebuilt
    assert built[-1] == 1
