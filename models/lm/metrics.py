"""Prometheus metrics of the embedding path, defined once.

The service builds one ``EmbeddingMetrics`` on its registry and hands it to every
``CachedEncoder``; tests build one on a fresh ``CollectorRegistry``.

>>> from prometheus_client import CollectorRegistry
>>> reg = CollectorRegistry()
>>> m = EmbeddingMetrics(reg)
>>> m.hits.labels(level="lru").inc(3)
>>> reg.get_sample_value("tsad_embedding_cache_hits_total", {"level": "lru"})
3.0
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# batch: a duplicate prompt within one encode call; window: a window embedded before, by
# its values (counted per channel prompt, its prompts never built)
HIT_LEVELS = ("lru", "redis", "batch", "window")

# LM batches on CPU take 10 ms .. several s; on GPU well under 10 ms
ENCODE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EmbeddingMetrics:
    """Counters and histograms of cache hits, misses, LM time and Redis errors."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        kw = {"registry": registry}
        self.hits = Counter(
            "tsad_embedding_cache_hits_total",
            "Prompt embeddings served without the language model, by cache level",
            ["level"], **kw,
        )
        self.misses = Counter(
            "tsad_embedding_cache_misses_total",
            "Prompt embeddings computed by the language model (missed every cache level)", **kw,
        )
        self.encode_seconds = Histogram(
            "tsad_embedding_encode_seconds",
            "Wall time of one language-model call over a batch of missed prompts",
            buckets=ENCODE_BUCKETS, **kw,
        )
        self.encode_batch_prompts = Histogram(
            "tsad_embedding_encode_batch_prompts",
            "Prompts per language-model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), **kw,
        )
        self.pass_calls = Histogram(
            "tsad_embedding_pass_calls",
            "Encode calls (requests' cache misses) served by one language-model pass: above "
            "1 when micro-batching coalesced concurrent requests",
            buckets=(1, 2, 4, 8, 16, 32, 64), **kw,
        )
        self.errors = Counter(
            "tsad_embedding_cache_errors_total",
            "Cache backend failures that were absorbed (the LM answered instead)",
            ["backend", "operation"], **kw,
        )
        self.lru_bytes = Gauge(
            "tsad_embedding_lru_bytes", "Bytes of embeddings held by the in-process LRUs "
            "(summed over worker processes)", multiprocess_mode="livesum", **kw,
        )
        self.lru_entries = Gauge(
            "tsad_embedding_lru_entries", "Embeddings held by the in-process LRUs (summed "
            "over worker processes)", multiprocess_mode="livesum", **kw,
        )
        self.stride_reuses = Counter(
            "tsad_embedding_stride_reuses_total",
            "Channel embeddings reused between strided re-embeddings", **kw,
        )
        for level in HIT_LEVELS:  # export zeros from the start, so rates exist at once
            self.hits.labels(level=level)
        for op in ("get", "set"):
            self.errors.labels(backend="redis", operation=op)
