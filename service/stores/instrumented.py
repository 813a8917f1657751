"""Wraps any backend with latency and error metrics, so the backends stay plain: every
call of its streams part, its commit and its ping (``tsad_window_store_*``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from service.errors import StoreUnavailable
from service.metrics import ServiceMetrics
from service.stores.base import Backend, StreamStore

_STREAM_OPS = ("put", "get", "list", "count", "versions", "delete", "append", "window",
               "sections", "receipt", "pending_receipts")


class _Timed:
    def __init__(self, name: str, metrics: ServiceMetrics) -> None:
        self.name = name
        self.metrics = metrics

    def __call__(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        hist = self.metrics.store_operation_duration_seconds.labels(self.name, op)
        errors = self.metrics.store_errors_total.labels(self.name, op)
        up = self.metrics.store_up.labels(self.name)

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


class _InstrumentedStreams:
    def __init__(self, streams: StreamStore, timed: _Timed) -> None:
        self.inner = streams
        for op in _STREAM_OPS:
            setattr(self, op, timed(op, getattr(streams, op)))

    @property
    def policy(self) -> Any:
        return self.inner.policy

    def lock(self, stream: str, deferred: bool = False) -> AbstractAsyncContextManager[object]:
        return self.inner.lock(stream, deferred)


class InstrumentedBackend:
    def __init__(self, backend: Backend, metrics: ServiceMetrics) -> None:
        timed = _Timed(backend.name, metrics)
        self.inner = backend
        self.name = backend.name
        self.streams = _InstrumentedStreams(backend.streams, timed)
        self.alerts = backend.alerts
        self.webhooks = backend.webhooks
        self.keys = backend.keys
        self.ingest = backend.ingest
        self.commit = timed("commit", backend.commit)
        self.ping = timed("ping", backend.ping)

    async def close(self) -> None:
        await self.inner.close()
