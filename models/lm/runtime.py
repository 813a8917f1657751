"""The process's language-model encoders, shared by every detector that embeds prompts.

One cached encoder per (model path, pooling) per process: the weights load once, and the
embedding cache (LRU, plus Redis when configured) is shared by all streams. The service
calls ``configure`` at start-up to put the shared Redis cache and its metrics behind them.
"""

from __future__ import annotations

import threading
from typing import Any

from models.lm.batching import MicroBatcher
from models.lm.cache import CacheConfig, CachedEncoder

_ENCODERS: dict[tuple[str | None, str], CachedEncoder] = {}
_LOCK = threading.Lock()
_SETTINGS: dict[str, Any] = {"cache": CacheConfig(), "metrics": None, "batch_window": None}


def configure(cache: CacheConfig | None = None, metrics: Any = None,
              batch_window_seconds: float | None = None) -> None:
    """Set the cache (e.g. a Redis URL), Prometheus metrics and micro-batching for
    encoders built from now on; encoders built earlier are dropped so the next call
    rebuilds them. ``batch_window_seconds``: coalesce concurrent LM calls (the service,
    many requests at once; ``models.lm.batching``); None: each call runs its own pass
    (one caller, e.g. ``tsad embed``)."""
    with _LOCK:
        _SETTINGS["cache"] = cache or CacheConfig()
        _SETTINGS["metrics"] = metrics
        _SETTINGS["batch_window"] = batch_window_seconds
        for encoder in _ENCODERS.values():
            if isinstance(encoder.encoder, MicroBatcher):
                encoder.encoder.close()
        _ENCODERS.clear()


def cached_encoder(model_path: str | None = None, pooling: str = "auto") -> CachedEncoder:
    from models.lm.encoder import shared_encoder

    key = (model_path, pooling)
    with _LOCK:
        if key not in _ENCODERS:
            encoder = shared_encoder(model_path=model_path, pooling=pooling)
            if _SETTINGS["batch_window"] is not None:
                encoder = MicroBatcher(encoder, _SETTINGS["batch_window"],
                                       metrics=_SETTINGS["metrics"])
            _ENCODERS[key] = CachedEncoder(encoder, _SETTINGS["cache"], _SETTINGS["metrics"])
        return _ENCODERS[key]
