"""The process's language-model encoders, shared by every detector that embeds prompts.

One cached encoder per (model path, pooling) per process: the weights load once, and the
embedding cache (LRU, plus Redis when configured) is shared by all streams. The service
calls ``configure`` at start-up to put the shared Redis cache and its metrics behind them.
"""

from __future__ import annotations

import threading
from typing import Any

from models.lm.cache import CacheConfig, CachedEncoder

_ENCODERS: dict[tuple[str | None, str], CachedEncoder] = {}
_LOCK = threading.Lock()
_SETTINGS: dict[str, Any] = {"cache": CacheConfig(), "metrics": None}


def configure(cache: CacheConfig | None = None, metrics: Any = None) -> None:
    """Set the cache (e.g. a Redis URL) and Prometheus metrics for encoders built from now
    on; encoders built earlier are dropped so the next call rebuilds them."""
    with _LOCK:
        _SETTINGS["cache"] = cache or CacheConfig()
        _SETTINGS["metrics"] = metrics
        _ENCODERS.clear()


def cached_encoder(model_path: str | None = None, pooling: str = "auto") -> CachedEncoder:
    from models.lm.encoder import shared_encoder

    key = (model_path, pooling)
    with _LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = CachedEncoder(
                shared_encoder(model_path=model_path, pooling=pooling),
                _SETTINGS["cache"], _SETTINGS["metrics"])
        return _ENCODERS[key]
