"""Wraps any window store with latency and error metrics, so the stores stay plain."""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager
from typing import Any

from service.metrics import ServiceMetrics
from service.stores.base import StoreUnavailable, WindowStore

_TIMED = ("ping", "put_stream", "get_stream", "list_streams", "count_streams",
          "delete_stream", "append", "window", "load_state", "save_state", "get_receipt",
          "put_receipt")


class InstrumentedStore:
    def __init__(self, store: WindowStore, metrics: ServiceMetrics) -> None:
        self.inner = store
        self.backend = store.backend
        self.metrics = metrics
        for op in _TIMED:
            setattr(self, op, self._timed(op, getattr(store, op)))

    def _timed(self, op: str, fn: Any) -> Any:
        hist = self.metrics.store_operation_duration_seconds.labels(self.backend, op)
        errors = self.metrics.store_errors_total.labels(self.backend, op)
        up = self.metrics.store_up.labels(self.backend)

        async def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                result = await fn(*args, **kwargs)
            except StoreUnavailable:
                errors.inc()
                up.set(0)
                raise
            hist.observe(time.perf_counter() - start)
            up.set(1)
            return result

        return call

    def lock(self, stream: str) -> AbstractAsyncContextManager[None]:
        return self.inner.lock(stream)

    async def close(self) -> None:
        await self.inner.close()
