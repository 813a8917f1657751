"""What the routers call: validation beyond the schema, the append, scoring, metrics.

The order inside ``score`` is what keeps acknowledged data safe: the atomic append comes
first and the response is sent only after it; scoring state is saved afterwards. If the
store fails between the two, the points are stored (a retry is then rejected as a
duplicate, or dropped with TSAD_DUPLICATES=drop) and the stream's detector simply learns
from the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict

import numpy as np

from models.detectors import REGISTRY
from service.alerts.store import AlertStore, build_alert_store
from service.artifacts import Artifact, artifact_name, load_artifact
from service.errors import field_error
from service.metrics import ServiceMetrics, StreamSeries
from service.schemas import (
    ChannelShareOut,
    PointResultOut,
    PrecedentOut,
    ScoreRequest,
    ScoreResponse,
    StreamConfigIn,
    StreamOut,
    WindowOut,
)
from service.scoring import StreamScorer
from service.settings import Settings
from service.stores.base import StoreRejection, StreamMeta, WindowStore

log = logging.getLogger("tsad.pipeline")


class ScoringPipeline:
    def __init__(self, store: WindowStore, settings: Settings, metrics: ServiceMetrics,
                 alerts: AlertStore | None = None) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.alerts = alerts or build_alert_store(getattr(store, "inner", store),
                                                  settings.alert_retention_seconds)
        self.stream_series = StreamSeries(metrics, settings.metrics_streams,
                                          settings.metrics_max_streams)

    # --- /score ------------------------------------------------------------------------
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        points = self._validate_batch(req)
        stream = req.stream
        async with self.store.lock(stream):
            try:
                appended = await self.store.append(
                    stream, points, default_window=self.settings.default_window,
                    default_detector=self.settings.default_detector,
                    duplicates=self.settings.duplicates)
            except StoreRejection:
                self.metrics.points_rejected_total.inc(len(points))
                raise
            self.metrics.points_ingested_total.inc(appended.accepted)
            self.metrics.points_duplicate_total.inc(appended.dropped)
            if appended.created:
                self.metrics.streams_created_total.inc()
                log.info("stream created", extra={"stream": stream,
                                                  "channels": appended.meta.channels})
            results = []
            if appended.accepted:
                blob = await self.store.load_state(stream)
                results, blob, alerts, events = await asyncio.to_thread(
                    self._run_detector, appended.meta, blob, appended.points, appended.accepted)
                await self.alerts.commit(stream, blob, alerts, events)
                self._count_events(events)
        out = [PointResultOut(timestamp=p.timestamp, score=None, anomaly=False, threshold=None,
                              status="duplicate") for p in req.points[:appended.dropped]]
        out += [
            PointResultOut(
                timestamp=p.timestamp, score=r.score, anomaly=r.anomaly, threshold=r.threshold,
                status=r.status,
                top_channels=[ChannelShareOut(channel=c.channel, share=c.share)
                              for c in r.top_channels] if r.top_channels else None,
                precedents=[PrecedentOut(**asdict(q)) for q in r.precedents]
                if r.precedents else None)
            for p, r in zip(req.points[appended.dropped:], results, strict=True)
        ]
        return ScoreResponse(stream=stream, results=out)

    def _run_detector(self, meta: StreamMeta, blob: bytes | None, points: np.ndarray,
                      n_new: int) -> tuple[list, bytes, list, list[dict]]:
        start = time.perf_counter()
        scorer = StreamScorer.from_blob(meta, self.settings, blob)
        results = scorer.process(points, n_new)
        alerts, events = scorer.tracker.drain()
        threshold = scorer.threshold.value()
        if threshold is not None:
            self.metrics.threshold_value.observe(threshold)
        self.stream_series.observe(
            meta.stream, [r.score for r in results], [r.anomaly for r in results],
            [r.top_channels[0].channel if r.top_channels else None for r in results],
            threshold)
        scored = sum(r.status == "scored" for r in results)
        self.metrics.points_scored_total.labels(meta.detector).inc(scored)
        self.metrics.anomalies_total.labels(meta.detector).inc(sum(r.anomaly for r in results))
        self.metrics.scoring_duration_seconds.labels(meta.detector).observe(
            time.perf_counter() - start)
        blob = scorer.to_blob()
        self.metrics.stream_state_bytes.labels(meta.detector).observe(len(blob))
        return results, blob, alerts, events

    def _count_events(self, events: list[dict]) -> None:
        for e in events:
            self.metrics.alert_events_total.labels(e["type"]).inc()
            if e["type"] == "alert.opened":
                self.metrics.alerts_opened_total.labels(e["alert"]["severity"]).inc()
                self.stream_series.alert_opened(e["alert"]["stream"])
            elif e["type"] == "alert.resolved":
                self.metrics.alerts_resolved_total.inc()
            log.info("alert event", extra={"event": e["type"], "alert": e["alert"]["id"],
                                           "stream": e["alert"]["stream"],
                                           "severity": e["alert"]["severity"]})

    def _validate_batch(self, req: ScoreRequest) -> np.ndarray:
        """Checks the schema cannot express; returns (N, 1 + C) float64, timestamp first."""
        if len(req.points) > self.settings.max_batch_points:
            raise field_error(("body", "points"), f"at most {self.settings.max_batch_points} "
                              f"points per request, got {len(req.points)}")
        channels = len(req.points[0].values)
        if channels > self.settings.max_channels:
            raise field_error(("body", "points", 0, "values"),
                              f"at most {self.settings.max_channels} channels, got {channels}")
        out = np.empty((len(req.points), 1 + channels))
        previous = -np.inf
        for i, p in enumerate(req.points):
            if len(p.values) != channels:
                raise field_error(("body", "points", i, "values"),
                                  f"expected {channels} values like points[0], got "
                                  f"{len(p.values)}")
            ts = p.epoch()
            if not np.isfinite(ts):
                raise field_error(("body", "points", i, "timestamp"), "must be finite")
            if ts <= previous:
                raise field_error(("body", "points", i, "timestamp"),
                                  "timestamps must strictly increase within a batch")
            previous = ts
            out[i, 0] = ts
            out[i, 1:] = p.values
        return out

    # --- /streams ----------------------------------------------------------------------
    async def put_stream(self, stream: str, cfg: StreamConfigIn) -> tuple[StreamOut, bool]:
        detector = cfg.detector or self.settings.default_detector
        window = cfg.window or self.settings.default_window
        artifact = None
        if artifact_name(detector) is not None:
            artifact = await asyncio.to_thread(self._artifact, detector)
            window = self._artifact_window(artifact, cfg)
        elif detector not in REGISTRY:
            raise field_error(("body", "detector"),
                              f"unknown detector {detector!r}; known: {sorted(REGISTRY)} or "
                              f"'artifact:<name>'")
        if cfg.channel_names is not None and len(cfg.channel_names) != cfg.channels:
            raise field_error(("body", "channel_names"),
                              f"expected {cfg.channels} names, got {len(cfg.channel_names)}")
        threshold = cfg.threshold.model_dump(exclude_none=True) if cfg.threshold else None
        kind = (threshold or {}).get("kind") or self.settings.threshold_kind
        if kind == "fixed" and (threshold or {}).get("value") is None and (
                artifact is None or artifact.threshold is None):
            raise field_error(("body", "threshold", "value"), "kind fixed needs a value")
        if cfg.alert_budget_per_day is not None and kind == "quantile":
            raise field_error(("body", "alert_budget_per_day"),
                              "an alert budget needs threshold kind spot or dspot")
        if cfg.alert_budget_per_day is not None and (threshold or {}).get("q"):
            raise field_error(("body", "alert_budget_per_day"),
                              "give either threshold.q or alert_budget_per_day, not both")
        meta = StreamMeta(stream=stream, channels=cfg.channels, window=window, detector=detector,
                          channel_names=cfg.channel_names, threshold=threshold or None,
                          alert_budget_per_day=cfg.alert_budget_per_day)
        stored, created = await self.store.put_stream(meta)
        if created:
            self.metrics.streams_created_total.inc()
        return StreamOut(**stored.to_dict()), created

    def _artifact(self, detector: str) -> Artifact:
        try:
            return load_artifact(self.settings.artifacts_dir, artifact_name(detector) or "")
        except ValueError as exc:
            raise field_error(("body", "detector"), str(exc)) from None

    @staticmethod
    def _artifact_window(artifact: Artifact, cfg: StreamConfigIn) -> int:
        if cfg.window is not None and cfg.window != artifact.window:
            raise field_error(("body", "window"), f"artifact {artifact.name!r} scores "
                              f"windows of {artifact.window} points, not {cfg.window}")
        if artifact.channels is not None and artifact.channels != cfg.channels:
            raise field_error(("body", "channels"), f"artifact {artifact.name!r} was fitted "
                              f"on {artifact.channels} channels, not {cfg.channels}")
        return artifact.window

    async def get_stream(self, stream: str) -> StreamOut | None:
        meta = await self.store.get_stream(stream)
        return StreamOut(**meta.to_dict()) if meta else None

    async def get_window(self, stream: str) -> WindowOut | None:
        if await self.store.get_stream(stream) is None:
            return None
        window = await self.store.window(stream)
        return WindowOut(stream=stream, timestamps=window[:, 0].tolist(),
                         values=window[:, 1:].tolist())

    async def list_streams(self) -> list[StreamOut]:
        return [StreamOut(**m.to_dict()) for m in await self.store.list_streams()]

    async def delete_stream(self, stream: str) -> bool:
        self.stream_series.forget(stream)
        return await self.store.delete_stream(stream)


__all__ = ["ScoringPipeline", "StoreRejection"]
