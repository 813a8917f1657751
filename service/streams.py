"""Stream administration: create or configure (PUT), describe, list, read the window,
delete. A deleted stream's open alert resolves (event reason "stream deleted"), its
per-stream series, its cached scorer, its shadows' queued work and the rows its ingest door
held go with it."""

from __future__ import annotations

import asyncio

from service.alerts.events import record_events
from service.artifacts import Artifact, artifact_name, load_artifact
from service.errors import InvalidInput, NotFound
from service.metrics import ServiceMetrics, StreamSeries
from service.quotas import check_room
from service.schemas import StreamConfigIn, StreamList, StreamOut, WindowOut
from service.scorers import ScorerCache
from service.settings import Settings
from service.shadows.queue import ShadowQueue
from service.stores.base import Backend
from service.validation import check_shape, stream_meta


class StreamAdmin:
    def __init__(self, backend: Backend, settings: Settings, metrics: ServiceMetrics,
                 series: StreamSeries, scorers: ScorerCache,
                 shadows: ShadowQueue | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.series = series
        self.scorers = scorers
        self.shadows = shadows

    async def put(self, stream: str, cfg: StreamConfigIn,
                  tenant: str | None = None) -> tuple[StreamOut, bool]:
        """Create or configure a stream; (the stream as stored, created). ``tenant``: the
        caller's, whose stream quota a new stream counts against."""
        s = self.settings
        detector = cfg.detector or s.default_detector
        check_shape(cfg.channels, cfg.window or s.default_window, s)
        artifact = None
        if artifact_name(detector) is not None:
            artifact = await asyncio.to_thread(self.artifact, detector)
        meta = stream_meta(stream, cfg, s, artifact)
        # room for one more (checked before: a PUT has no points to lose)
        if await self.backend.streams.get(stream) is None:
            await check_room(self.backend, s, tenant, ("path", "stream"), slack=1)
        stored, created = await self.backend.streams.put(meta)
        if created:
            self.metrics.streams_created_total.inc()
        return StreamOut(**stored.to_dict()), created

    def artifact(self, detector: str) -> Artifact:
        """The artifact an ``artifact:<name>`` detector names; InvalidInput if none."""
        try:
            return load_artifact(self.settings.artifacts_dir, artifact_name(detector) or "")
        except ValueError as exc:
            raise InvalidInput(("body", "detector"), str(exc)) from None

    async def get(self, stream: str) -> StreamOut:
        meta = await self.backend.streams.get(stream)
        if meta is None:
            raise not_found(stream)
        return StreamOut(**meta.to_dict())

    async def list(self, limit: int, cursor: str | None) -> StreamList:
        """One page, by stream id; next_cursor: the last id, when more follow."""
        metas = await self.backend.streams.list(limit=limit + 1, after=cursor)
        more = len(metas) > limit
        return StreamList(streams=[StreamOut(**m.to_dict()) for m in metas[:limit]],
                          next_cursor=metas[limit - 1].stream if more else None)

    async def window(self, stream: str) -> WindowOut:
        if await self.backend.streams.get(stream) is None:
            raise not_found(stream)
        window = await self.backend.streams.window(stream)
        return WindowOut(stream=stream, timestamps=window[:, 0].tolist(),
                         values=window[:, 1:].tolist())

    async def delete(self, stream: str) -> None:
        self.series.forget(stream)
        async with self.backend.streams.lock(stream):  # no batch commits alerts between
            if not await self.backend.streams.delete(stream):
                raise not_found(stream)
            self.scorers.evict(stream)
            if self.shadows is not None:
                self.shadows.forget(stream)
            await self.backend.ingest.forget_stream(stream)  # rows a grouped stream held
            record_events(await self.backend.alerts.forget_stream(stream), self.metrics,
                          self.series)


def not_found(stream: str) -> NotFound:
    return NotFound(f"stream {stream!r} not found")
