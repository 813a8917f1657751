"""Two-level prompt-embedding cache: in-process LRU (bounded in bytes), then Redis (shared by
replicas), then the language model for the misses only, in one batch.

Keys are ``<prefix>:<model_id>:<sha256(prompt)>``; the encoder's ``model_id`` already names
the weights (by content), the pooling and the max length, so two encoders that would give
different vectors never share an entry. Values are float16 bytes (384-d: 768 bytes).

Every embedding returned, fresh from the LM or not, has gone through float16: the answer
never depends on whether it was a hit (what a detector sees in training and in serving is
the same).

Redis is an optimisation, never a dependency: any Redis error is logged, counted
(``tsad_embedding_cache_errors_total{backend="redis"}``) and absorbed; Redis is then skipped
for ``redis_retry_seconds`` so an outage costs one timeout, not one per request.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.lm.encoder import Encoder, EncoderInFront
from models.lm.metrics import HIT_LEVELS, EmbeddingMetrics
from models.lm.prompts import PromptBuilder

log = logging.getLogger(__name__)

F16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class CacheConfig:
    lru_bytes: int = 64 << 20  # in-process bound (64 MiB ~ 80k MiniLM embeddings)
    redis_url: str | None = None  # None: LRU only
    redis_cluster: bool = False  # redis_url names a node of a Redis Cluster
    ttl_seconds: int | None = 7 * 24 * 3600  # Redis expiry; None keeps entries forever
    key_prefix: str = "tsad:emb:v1"  # bump the version if the value format changes
    redis_timeout_seconds: float = 0.25  # per Redis call; a slow Redis must not stall scoring
    redis_retry_seconds: float = 5.0  # after an error, skip Redis this long
    batch_size: int | None = None  # LM batch size for misses; None: the encoder's own
    # windows already embedded, by their exact values: skips building their prompts
    window_lru_bytes: int = 16 << 20


def prompt_key(prefix: str, model_id: str, prompt: str) -> str:
    """
    >>> prompt_key("p", "m", "hello")[:40]
    'p:m:2cf24dba5fb0a30e26e83b2ac5b9e29e1b16'
    """
    return f"{prefix}:{model_id}:{hashlib.sha256(prompt.encode('utf-8')).hexdigest()}"


def to_f16_bytes(vec: np.ndarray) -> bytes:
    """float16 bytes; values beyond float16's range are clipped instead of becoming inf.

    >>> from_f16_bytes(to_f16_bytes(np.array([1.0, 1e6])), 2).tolist()
    [1.0, 65504.0]
    """
    return np.clip(vec, -F16_MAX, F16_MAX).astype("<f2").tobytes()


def from_f16_bytes(buf: bytes, dim: int) -> np.ndarray:
    if len(buf) != 2 * dim:
        raise ValueError(f"cached embedding has {len(buf)} bytes, expected {2 * dim}")
    return np.frombuffer(buf, dtype="<f2").astype(np.float32)


class ByteLRU:
    """Thread-safe LRU of bytes values, bounded by the sum of key and value sizes.

    >>> lru = ByteLRU(max_bytes=20)
    >>> lru.put("a", b"x" * 8); lru.put("b", b"y" * 8); lru.put("c", b"z" * 8)
    >>> lru.get("a") is None, lru.get("c"), lru.nbytes
    (True, b'zzzzzzzz', 18)
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(key: str, value: bytes) -> int:
        return len(key) + len(value)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        size = self._size(key, value)
        if size > self.max_bytes:
            return  # would evict everything and still not fit
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.nbytes -= self._size(key, old)
            self._data[key] = value
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                k, v = self._data.popitem(last=False)
                self.nbytes -= self._size(k, v)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data


class RedisStore:
    """MGET / pipelined SET over a sync redis-py client; every failure is absorbed."""

    def __init__(self, client: Any, config: CacheConfig, metrics: EmbeddingMetrics) -> None:
        self.client = client
        self.config = config
        self.metrics = metrics
        self._down_until = 0.0

    @classmethod
    def from_url(cls, url: str, config: CacheConfig, metrics: EmbeddingMetrics) -> RedisStore:
        import redis
        from redis.cluster import RedisCluster

        kind = RedisCluster if config.redis_cluster else redis.Redis
        client = kind.from_url(
            url, socket_timeout=config.redis_timeout_seconds,
            socket_connect_timeout=config.redis_timeout_seconds,
        )
        return cls(client, config, metrics)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, operation: str, exc: Exception) -> None:
        self.metrics.errors.labels(backend="redis", operation=operation).inc()
        first = self.available  # the first error of an outage is a warning, the rest debug
        self._down_until = time.monotonic() + self.config.redis_retry_seconds
        (log.warning if first else log.debug)(
            "embedding cache: redis %s failed (%s: %s); LRU + LM only for %.0fs",
            operation, type(exc).__name__, exc, self.config.redis_retry_seconds,
        )

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys or not self.available:
            return [None] * len(keys)
        try:
            if self.config.redis_cluster:  # prompts hash to every slot: one MGET per node
                return list(self.client.mget_nonatomic(keys))
            return list(self.client.mget(keys))
        except Exception as exc:  # any client or socket error means "no Redis": absorb it
            self._failed("get", exc)
            return [None] * len(keys)

    def set_many(self, items: dict[str, bytes]) -> None:
        if not items or not self.available:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(key, value, ex=self.config.ttl_seconds)
            pipe.execute()
        except Exception as exc:  # as above
            self._failed("set", exc)


@dataclass
class CacheStats:
    """Plain counters of one CachedEncoder (benchmarks, logs), beside the Prometheus ones."""

    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HIT_LEVELS, 0))
    misses: int = 0
    encode_seconds: float = 0.0

    @property
    def lookups(self) -> int:
        return sum(self.hits.values()) + self.misses

    @property
    def hit_rate(self) -> float:
        return sum(self.hits.values()) / self.lookups if self.lookups else 0.0


class CachedEncoder(EncoderInFront):
    """An ``Encoder`` in front of which sit the LRU and Redis.

    ``encode(prompts)`` looks every distinct prompt up in the LRU, the LRU's misses in Redis
    (one MGET), encodes what is left with one LM call, and writes those back to both levels.
    """

    def __init__(
        self,
        encoder: Encoder,
        config: CacheConfig | None = None,
        metrics: EmbeddingMetrics | None = None,
        redis_client: Any = None,
    ) -> None:
        from prometheus_client import CollectorRegistry

        self.encoder = encoder
        self.config = config or CacheConfig()
        # no metrics given: a private registry, so several encoders never collide on names
        self.metrics = metrics or EmbeddingMetrics(CollectorRegistry())
        self.lru = ByteLRU(self.config.lru_bytes)
        self.windows = ByteLRU(self.config.window_lru_bytes)
        self.stats = CacheStats()
        self.redis: RedisStore | None = None
        if redis_client is not None:
            self.redis = RedisStore(redis_client, self.config, self.metrics)
        elif self.config.redis_url:
            self.redis = RedisStore.from_url(self.config.redis_url, self.config, self.metrics)

    def key(self, prompt: str) -> str:
        return prompt_key(self.config.key_prefix, self.encoder.model_id, prompt)

    def _hit(self, level: str, n: int) -> None:
        self.metrics.hits.labels(level=level).inc(n)
        self.stats.hits[level] += n

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(N,) prompts -> (N, dim) float32 (float16-rounded), row i for texts[i]."""
        texts = list(texts)
        dim = self.encoder.dim
        keys = [self.key(t) for t in texts]
        first: dict[str, int] = {}  # key -> index of its first prompt
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        if len(first) < len(keys):
            self._hit("batch", len(keys) - len(first))

        found: dict[str, bytes] = {}
        for k in first:
            value = self.lru.get(k)
            if value is not None:
                found[k] = value
        self._hit("lru", len(found))

        missing = [k for k in first if k not in found]
        if missing and self.redis is not None:
            redis_hits = 0
            for k, value in zip(missing, self.redis.get_many(missing), strict=True):
                if value is not None and len(value) == 2 * dim:
                    found[k] = value
                    self.lru.put(k, value)
                    redis_hits += 1
                elif value is not None:  # wrong size: another format wrote this key
                    self.metrics.errors.labels(backend="redis", operation="get").inc()
            self._hit("redis", redis_hits)
            missing = [k for k in missing if k not in found]

        if missing:
            self.metrics.misses.inc(len(missing))
            self.stats.misses += len(missing)
            t0 = time.perf_counter()
            fresh = self.encoder.encode(
                [texts[first[k]] for k in missing], batch_size or self.config.batch_size
            )
            elapsed = time.perf_counter() - t0
            self.metrics.encode_seconds.observe(elapsed)
            self.stats.encode_seconds += elapsed
            self.metrics.encode_batch_prompts.observe(len(missing))
            written = {k: to_f16_bytes(v) for k, v in zip(missing, fresh, strict=True)}
            for k, value in written.items():
                self.lru.put(k, value)
            found.update(written)
            if self.redis is not None:
                self.redis.set_many(written)

        self.metrics.lru_bytes.set(self.lru.nbytes)
        self.metrics.lru_entries.set(len(self.lru))
        out = np.empty((len(texts), dim), dtype=np.float32)
        for i, k in enumerate(keys):
            out[i] = from_f16_bytes(found[k], dim)
        return out


    def encode_windows(self, windows: np.ndarray, prompts: Callable[[np.ndarray], list[str]],
                       recipe: str) -> np.ndarray:
        """(B, W, C) windows -> (B, C, dim). ``prompts`` turns windows into their B*C
        prompts (window-major) and ``recipe`` names it: a window whose exact values were
        embedded before under the same recipe is answered from the window LRU without
        building its prompts (scoring, precedents and admission see the same windows)."""
        windows = np.ascontiguousarray(windows, dtype=np.float64)
        n, width, channels = windows.shape
        tag = f"{recipe}:{width}x{channels}:"
        keys = [tag + hashlib.blake2b(w.tobytes(), digest_size=16).hexdigest()
                for w in windows]
        out = np.empty((n, channels, self.dim), dtype=np.float32)
        missing = []
        for i, k in enumerate(keys):
            value = self.windows.get(k)
            if value is None:
                missing.append(i)
            else:
                out[i] = np.frombuffer(value, dtype=np.float16).reshape(channels, self.dim)
        if hits := n - len(missing):
            self._hit("window", hits * channels)
        if missing:
            fresh = self.encode(prompts(windows[missing])).reshape(len(missing), channels, -1)
            for i, rows in zip(missing, fresh, strict=True):
                out[i] = rows  # already float16-rounded: the window LRU stores it exactly
                self.windows.put(keys[i], rows.astype(np.float16).tobytes())
        return out


# --- stride: re-embed a channel only every S points ---------------------------------------
@dataclass
class StrideState:
    """Per stream and channel: points since the last embedding, and that embedding.

    Plain data, so the service can persist it next to its window store.

    >>> s = StrideState(count=3, embedding=np.array([0.5, -1.0], dtype=np.float16).tobytes())
    >>> StrideState.from_dict(s.to_dict()) == s
    True
    """

    count: int = 0
    embedding: bytes | None = field(default=None, repr=False)  # float16 bytes

    def due(self, stride: int) -> bool:
        return self.embedding is None or self.count >= stride

    def to_dict(self) -> dict[str, Any]:
        emb = None if self.embedding is None else base64.b64encode(self.embedding).decode()
        return {"count": self.count, "embedding": emb}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StrideState:
        emb = data.get("embedding")
        return cls(int(data["count"]), None if emb is None else base64.b64decode(emb))


class StridedEmbedder:
    """Windows -> per-channel prompt embeddings, re-embedding a channel every ``stride``
    points and reusing its last embedding in between (stride 1: every point)."""

    def __init__(self, encoder: CachedEncoder, builder: PromptBuilder, stride: int = 1):
        if stride < 1:
            raise ValueError("stride: need >= 1")
        self.encoder = encoder
        self.builder = builder
        self.stride = stride

    @staticmethod
    def new_states(n_channels: int) -> list[StrideState]:
        return [StrideState() for _ in range(n_channels)]

    def embed_stream(self, windows: np.ndarray, states: list[StrideState]) -> np.ndarray:
        """Consecutive windows (B, W, C) of one stream, one point apart -> (B, C, D).
        ``states`` (one per channel) are updated in place."""
        return self.embed_many([(windows, states)])[0]

    def embed_many(
        self, items: Sequence[tuple[np.ndarray, list[StrideState]]]
    ) -> list[np.ndarray]:
        """Several streams in one LM call: [(windows (B, W, C), states (C,))] -> [(B, C, D)]."""
        dim = self.encoder.dim
        prompts: list[str] = []
        plans: list[np.ndarray] = []  # per item (B, C): prompt index, or -1 = reuse previous
        for windows, states in items:
            w = np.asarray(windows, dtype=np.float64)
            if w.ndim != 3 or w.shape[2] != len(states):
                raise ValueError(f"windows: expected (B, W, {len(states)}), got {w.shape}")
            plan = np.full(w.shape[:1] + w.shape[2:], -1, dtype=np.int64)
            for c, state in enumerate(states):
                count, has = state.count, state.embedding is not None
                for b in range(w.shape[0]):
                    if not has or count >= self.stride:
                        plan[b, c] = len(prompts)
                        prompts.extend(self.builder(w[b, :, c]))
                        count, has = 1, True
                    else:
                        count += 1
            plans.append(plan)

        fresh = self.encoder.encode(prompts) if prompts else np.empty((0, dim), np.float32)
        out: list[np.ndarray] = []
        reused = 0
        for (_, states), plan in zip(items, plans, strict=True):
            emb = np.empty(plan.shape + (dim,), dtype=np.float32)
            for c, state in enumerate(states):
                for b in range(plan.shape[0]):
                    if plan[b, c] >= 0:
                        emb[b, c] = fresh[plan[b, c]]
                        state.embedding = to_f16_bytes(emb[b, c])
                        state.count = 1
                    else:
                        assert state.embedding is not None
                        emb[b, c] = from_f16_bytes(state.embedding, dim)
                        state.count += 1
                        reused += 1
            out.append(emb)
        self.encoder.metrics.stride_reuses.inc(reused)
        return out
