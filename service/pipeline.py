"""What the routers call: validation beyond the schema, the append, scoring, metrics.

The order inside ``score`` is what keeps acknowledged data safe: the atomic append comes
first and the response is sent only after it; scoring state is saved afterwards, with
the stream's scored-up-to mark, its alerts and events, and the batch's receipt, in one
atomic commit. If the process dies between the two, the points are stored but unscored:
the stream's next append hands them back before its own points, so they are scored (and
their alerts raised) first; ``recover_all`` does the same for every stream at start-up.
A retry of a stored batch is answered (its points' results when it scored them now, else
status "duplicate"), and one sent with the same Idempotency-Key gets the kept response.
Repeated and backward timestamps follow the stream's timestamp policy (``plan_append`` in
service/stores/base.py): each affected point says so in its result.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic_core import to_json

from models.detectors import REGISTRY
from models.detectors.base import Online, aggregate_channels
from service.alerts.store import AlertStore, build_alert_store
from service.artifacts import Artifact, artifact_name, load_artifact
from service.errors import field_error
from service.feedback import (
    LABELS,
    TARGETS,
    adaptation_info,
    info_dict,
    recent_windows,
    windows_ending_in,
)
from service.metrics import ServiceMetrics, StreamSeries
from service.schemas import (
    AdaptationOut,
    FeedbackOut,
    FeedbackRangeOut,
    FeedbackRequest,
    Point,
    ScoreRequest,
    StreamConfigIn,
    StreamList,
    StreamOut,
    WindowOut,
    columnar_loc,
    epoch,
)
from service.scoring import StreamScorer
from service.settings import Settings
from service.stores.base import (
    AppendResult,
    StoreRejection,
    StoreUnavailable,
    StreamMeta,
    WindowStore,
)

log = logging.getLogger("tsad.pipeline")


@dataclass
class _Scored:
    results: list  # PointResult per scored point: the unscored a crash left, then the new
    blob: bytes
    alerts: list
    events: list[dict]
    scorer: StreamScorer


@dataclass
class _Cached:
    """A stream's scorer as committed, kept decoded between requests: valid while the
    store's version of the stream is ``meta.version`` (plus our own append)."""

    meta: StreamMeta
    scorer: StreamScorer
    nbytes: int  # its state blob's size: what the cache's bound counts


def _encode_receipt(digest: str, created_at: float, response: dict) -> bytes:
    """What an Idempotency-Key keeps: the batch's digest, the stream's incarnation (a
    receipt of a deleted stream of the same id does not answer) and the response (as
    /score sends it: date-times as RFC 3339 strings)."""
    return zlib.compress(to_json({"body": digest, "created_at": created_at,
                                  "response": response}))


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
        # tuning runs the LM forward and backward: one adaptation at a time per process,
        # so feedback cannot starve scoring of CPU
        self._adapt_slot = asyncio.Semaphore(1)
        self._appends_stored = 0  # for TSAD_FAULT_CRASH_AFTER_APPEND
        # stream -> its scorer as last committed by this process, least recently used first
        self._scorers: OrderedDict[str, _Cached] = OrderedDict()
        self._scorer_bytes = 0

    # --- /score ------------------------------------------------------------------------
    async def score(self, req: ScoreRequest, idempotency_key: str | None = None
                    ) -> dict:
        """The response body in ScoreResponse's shape, as plain dicts and lists: no model
        object per point (the router serialises it in one call)."""
        points = self._validate_batch(req)
        stream = req.stream
        digest = "" if idempotency_key is None else hashlib.sha256(
            req.model_dump_json().encode()).hexdigest()
        async with self.store.lock(stream):
            if idempotency_key is not None and (
                    kept := await self._receipt(stream, idempotency_key, digest)):
                return kept
            cached = self._uncache(stream)  # back in only once committed
            appended = await self._append(stream, points, cached)
            self._fault_after_append(appended)
            appended, scored = await self._score_stored(appended, cached)
            response = self._response(req, appended, scored)
            receipt = None
            if idempotency_key is not None:
                receipt = (idempotency_key, _encode_receipt(
                    digest, appended.meta.created_at, response))
            await self._commit(appended, scored, receipt, cached)
        return response

    async def recover(self, stream: str) -> int:
        """Score what a crash left stored but unscored on one stream; returns how many
        points were scored (0: nothing was pending)."""
        async with self.store.lock(stream):
            meta = await self.store.get_stream(stream)
            if meta is None or meta.points_scored is None or (
                    meta.points_scored >= meta.points_seen):
                return 0
            appended = await self._append(stream, np.empty((0, 1 + meta.channels)))
            appended, scored = await self._score_stored(appended, None)
            await self._commit(appended, scored, None, None)
            return appended.unscored

    async def recover_all(self) -> None:
        """Start-up: ``recover`` every stream the index lists, one at a time (a background
        task: requests are served meanwhile, and recover their own stream first)."""
        start, streams, points, after = time.monotonic(), 0, 0, None
        try:
            while metas := await self.store.list_streams(limit=100, after=after):
                after = metas[-1].stream
                for m in metas:
                    if m.points_scored is None or m.points_scored >= m.points_seen:
                        continue
                    try:
                        points += await self.recover(m.stream)
                        streams += 1
                    except StoreUnavailable as exc:  # a busy lock, or the store gone
                        log.warning("recovery of a stream failed",
                                    extra={"stream": m.stream, "error": str(exc)})
                        await self.store.ping()  # gone: stop here
                    except Exception:  # one stream's failure must not stop the others
                        log.exception("recovery of a stream failed",
                                      extra={"stream": m.stream})
        except StoreUnavailable as exc:  # its streams recover on their next request
            log.warning("start-up recovery stopped: store unavailable",
                        extra={"error": str(exc)})
        log.info("start-up recovery done", extra={
            "streams": streams, "points": points,
            "seconds": round(time.monotonic() - start, 3)})

    async def _receipt(self, stream: str, key: str, digest: str) -> dict | None:
        """The kept response of the batch first sent with ``key`` (None: none, or one of
        a deleted earlier stream of the same id); 422 when this body is not that batch."""
        raw = await self.store.get_receipt(stream, key)
        meta = await self.store.get_stream(stream) if raw else None
        if raw is None or meta is None:
            return None
        kept = json.loads(zlib.decompress(raw))
        if kept["created_at"] != meta.created_at:
            return None
        if kept["body"] != digest:
            raise StoreRejection(("header", "Idempotency-Key"), f"key {key!r} was already "
                                 "used for a different batch (kept "
                                 f"{self.settings.idempotency_ttl_seconds} s, "
                                 "TSAD_IDEMPOTENCY_TTL_SECONDS): use a new key per batch")
        self.metrics.idempotent_replays_total.inc()
        return kept["response"]

    async def _append(self, stream: str, points: np.ndarray,
                      cached: _Cached | None = None) -> AppendResult:
        try:
            appended = await self.store.append(
                stream, points, default_window=self.settings.default_window,
                default_detector=self.settings.default_detector,
                duplicates=self.settings.duplicates,
                default_timestamps=self.settings.timestamps,
                max_back_seconds=self.settings.timestamp_max_back_seconds,
                known=cached.meta if cached else None)
        except StoreRejection:
            self.metrics.points_rejected_total.inc(len(points))
            raise
        if appended.created and await self._over_stream_cap():
            await self.store.delete_stream(stream)  # undo: the cap is checked after
            self.metrics.points_rejected_total.inc(len(points))  # the atomic append
            raise self._stream_cap_error(("body", "stream"))
        self.metrics.points_ingested_total.inc(appended.accepted)
        self.metrics.points_duplicate_total.inc(appended.duplicates)
        for action in ("nudged", "dropped"):
            if n := appended.actions.count(action):
                self.metrics.points_reordered_total.labels(action).inc(n)
        if appended.created:
            self.metrics.streams_created_total.inc()
            log.info("stream created", extra={"stream": stream,
                                              "channels": appended.meta.channels})
        if appended.unscored or appended.skipped:
            self.metrics.points_unscored_total.inc(appended.skipped)
            log.log(logging.WARNING if appended.skipped else logging.INFO,
                    "scoring points a crash left unscored", extra={
                        "stream": stream, "points": appended.unscored,
                        "skipped": appended.skipped,
                        "limit": self.settings.unscored_max_points})
        return appended

    def _fault_after_append(self, appended: AppendResult) -> None:
        """TSAD_FAULT_CRASH_AFTER_APPEND (tests only): die between the append and the
        commit, as a kill -9 there would."""
        n = self.settings.fault_crash_after_append
        if n and appended.accepted:
            self._appends_stored += 1
            if self._appends_stored == n:
                log.critical("fault injection: exiting after an append",
                             extra={"stream": appended.meta.stream})
                os._exit(137)

    async def _score_stored(self, appended: AppendResult, cached: _Cached | None
                            ) -> tuple[AppendResult, _Scored | None]:
        """Score the stored points not yet scored: those a crash left, then the batch's.
        If the ones a crash left make the detector fail, they are skipped (logged and
        counted) rather than failing every later request of the stream."""
        if not (appended.to_score or appended.skipped):
            return appended, None
        scorer, blob = self._valid(cached, appended), None
        self.metrics.scorer_cache_total.labels("hit" if scorer else "miss").inc()
        if scorer is None:
            blob = await self.store.load_state(appended.meta.stream)
        try:
            out = await asyncio.to_thread(self._run_detector, appended.meta, blob,
                                          appended.points, appended.to_score, scorer)
        except Exception:
            if not appended.unscored:
                raise
            log.exception("scoring points a crash left unscored failed: skipped", extra={
                "stream": appended.meta.stream, "points": appended.unscored})
            self.metrics.points_unscored_total.inc(appended.unscored)
            appended = replace(appended, unscored=0,
                               skipped=appended.skipped + appended.unscored)
            blob = await self.store.load_state(appended.meta.stream)  # the scorer moved
            out = await asyncio.to_thread(self._run_detector, appended.meta, blob,
                                          appended.points, appended.to_score)
        self.metrics.points_recovered_total.inc(appended.unscored)
        return appended, _Scored(*out)

    # --- the scorer cache: decoded state kept between requests, checked by version ------
    def _uncache(self, stream: str) -> _Cached | None:
        cached = self._scorers.pop(stream, None)
        if cached is not None:
            self._scorer_bytes -= cached.nbytes
        return cached

    @staticmethod
    def _valid(cached: _Cached | None, appended: AppendResult) -> StreamScorer | None:
        """The cached scorer if nothing but our own append wrote the stream since it was
        committed (another replica's append, commit, feedback or configuration change
        bumped the version; a deleted and created again stream has another created_at)."""
        if cached is None:
            return None
        ours = 1 if appended.accepted else 0
        if (cached.meta.created_at, cached.meta.version + ours) != (
                appended.meta.created_at, appended.meta.version):
            return None
        return cached.scorer

    def _cache(self, stream: str, entry: _Cached) -> None:
        limit = self.settings.scorer_cache_mb * 2**20
        if entry.nbytes > limit:
            return
        self._scorers[stream] = entry
        self._scorer_bytes += entry.nbytes
        while self._scorer_bytes > limit:  # least recently used first
            self._scorer_bytes -= self._scorers.popitem(last=False)[1].nbytes

    async def _commit(self, appended: AppendResult, scored: _Scored | None,
                      receipt: tuple[str, bytes] | None, cached: _Cached | None) -> None:
        """State, scored-up-to mark, alerts, events and receipt: one atomic write; then the
        scorer goes (back) into the cache, under the version the commit gave."""
        meta = appended.meta
        if scored is None:
            if receipt is not None:
                await self.store.put_receipt(meta.stream, *receipt)
            if self._valid(cached, appended):  # nothing written: still the same state
                self._cache(meta.stream, replace(cached, meta=meta))
            return
        version = await self.alerts.commit(meta.stream, scored.blob, scored.alerts,
                                           scored.events, scored=meta.points_seen,
                                           receipt=receipt)
        self._count_events(scored.events)
        if version:
            self._cache(meta.stream, _Cached(
                replace(meta, version=version, points_scored=meta.points_seen),
                scored.scorer, len(scored.blob)))

    def _response(self, req: ScoreRequest, appended: AppendResult,
                  scored: _Scored | None) -> dict:
        results = scored.results if scored else []
        # a retried point that a crash left unscored is answered with its result now
        stamps = appended.points[len(appended.points) - appended.to_score:, 0]
        recovered = dict(zip(stamps[:appended.unscored].tolist(),
                             results[:appended.unscored], strict=True))
        fresh = iter(results[appended.unscored:])  # one per stored point, in order
        out = []
        for ts, action, stamp in zip(req.sent_timestamps(), appended.actions,
                                     appended.stamps, strict=True):
            moved = action if action in ("nudged", "dropped") else None
            r = recovered.get(stamp) if action == "duplicate" else None
            if action == "dropped" or (action == "duplicate" and r is None):
                out.append({"timestamp": ts, "score": None, "likelihood": None,
                            "anomaly": False, "threshold": None, "status": action,
                            "top_channels": None, "precedents": None,
                            "timestamp_action": moved, "stored_timestamp": stamp})
                continue
            r = r or next(fresh)
            out.append({
                "timestamp": ts, "score": r.score, "likelihood": r.likelihood,
                "anomaly": r.anomaly, "threshold": r.threshold, "status": r.status,
                "top_channels": [{"channel": c.channel, "share": c.share}
                                 for c in r.top_channels] if r.top_channels else None,
                "precedents": [asdict(q) for q in r.precedents] if r.precedents else None,
                "timestamp_action": moved, "stored_timestamp": stamp})
        return {"stream": req.stream, "results": out, "points_until_scored": (
            scored.scorer.points_until_scored if scored else None)}

    def _run_detector(self, meta: StreamMeta, blob: bytes | None, points: np.ndarray,
                      n_new: int, scorer: StreamScorer | None = None
                      ) -> tuple[list, bytes, list, list[dict], StreamScorer]:
        start = time.perf_counter()
        if scorer is None:
            scorer = StreamScorer.from_blob(meta, self.settings, blob)
        scorer.meta = meta  # points_seen moved on: it indexes the new points
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
        return results, blob, alerts, events, scorer

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
        """Checks the schema cannot express; returns (N, 1 + C) float64, timestamp first.
        Order is the store's to judge (against the stream's last point, atomically)."""
        if req.points is None or req.timestamps is not None or req.values is not None:
            return self._validate_columns(req)
        if len(req.points) > self.settings.max_batch_points:
            raise field_error(("body", "points"), f"at most {self.settings.max_batch_points} "
                              f"points per request, got {len(req.points)}")
        channels = len(req.points[0].values)
        if channels > self.settings.max_channels:
            raise field_error(("body", "points", 0, "values"),
                              f"at most {self.settings.max_channels} channels, got {channels}")
        out = np.empty((len(req.points), 1 + channels))
        for i, p in enumerate(req.points):
            if len(p.values) != channels:
                raise field_error(("body", "points", i, "values"),
                                  f"expected {channels} values like points[0], got "
                                  f"{len(p.values)}")
            out[i, 0] = p.epoch()
            out[i, 1:] = p.values
        self._check_bounds(out, ("body", "points"))
        return out

    def _validate_columns(self, req: ScoreRequest) -> np.ndarray:
        """The columnar form: the same checks as points, whole arrays at a time, each
        error naming timestamps.i or values.i[.j]."""
        if req.points is not None:
            raise field_error(("body", "points"), "give either points or timestamps and "
                              "values (the columnar form), not both")
        ts, values = req.timestamps, req.values
        if ts is None or values is None:
            missing = ("points" if ts is None and values is None else
                       "values" if values is None else "timestamps")
            raise field_error(("body", missing), "required: give points, or timestamps "
                              "and values (one row of channel values per timestamp)")
        if len(values) != len(ts):
            raise field_error(("body", "values"), f"expected {len(ts)} rows, one per "
                              f"timestamp, got {len(values)}")
        if len(ts) > self.settings.max_batch_points:
            raise field_error(("body", "timestamps"), f"at most "
                              f"{self.settings.max_batch_points} points per request, got "
                              f"{len(ts)}")
        channels = len(values[0])
        if channels > self.settings.max_channels:
            raise field_error(("body", "values", 0),
                              f"at most {self.settings.max_channels} channels, got {channels}")
        try:
            rows = np.array(values, dtype=np.float64)
        except ValueError:  # ragged: name the first row of another length
            rows = None
        if rows is None or rows.ndim != 2:
            i = next(i for i, row in enumerate(values) if len(row) != channels)
            raise field_error(("body", "values", i), f"expected {channels} values like "
                              f"values[0], got {len(values[i])}")
        out = np.empty((len(ts), 1 + channels))
        try:
            out[:, 0] = ts  # epoch seconds; RFC 3339 stamps below
        except TypeError:
            out[:, 0] = [epoch(t) for t in ts]
        out[:, 1:] = rows
        try:
            self._check_bounds(out, ("body", "points"))
        except RequestValidationError as exc:
            err = exc.errors()[0]
            raise field_error(columnar_loc(tuple(err["loc"])), err["msg"]) from None
        return out

    # --- limits (TSAD_MAX_*): what one stream, and the store, may hold ---------------------
    async def _over_stream_cap(self, slack: int = 0) -> bool:
        """More than TSAD_MAX_STREAMS - slack streams? The index count is cheap; the exact
        count (which tidies streams expired by TTL out of the index) runs only past it."""
        cap = self.settings.max_streams - slack
        if not self.settings.max_streams or await self.store.count_streams() <= cap:
            return False
        return await self.store.count_streams(exact=True) > cap

    def _stream_cap_error(self, loc: tuple[str, ...]) -> StoreRejection:
        return StoreRejection(loc, f"at most {self.settings.max_streams} streams "
                              "(TSAD_MAX_STREAMS): delete one or raise the limit", status=429)

    def _check_shape(self, channels: int, window: int) -> None:
        s = self.settings
        if channels > s.max_channels:
            raise field_error(("body", "channels"), f"at most {s.max_channels} channels "
                              f"per stream (TSAD_MAX_CHANNELS), got {channels}")
        if window > s.max_window:
            raise field_error(("body", "window"), f"at most {s.max_window} points per "
                              f"window (TSAD_MAX_WINDOW), got {window}")

    def _check_bounds(self, points: np.ndarray, loc: tuple[str | int, ...]) -> None:
        """One point must not brick a stream: a stamp far in the future would bar every
        later point, a huge value overflows the detectors' arithmetic for good."""
        s = self.settings
        ts = points[:, 0]
        latest = time.time() + s.timestamp_max_lead_seconds
        for bad, why in ((~np.isfinite(ts), "must be finite"),
                         (ts > latest, f"more than {s.timestamp_max_lead_seconds:g} s ahead "
                          "of the server clock (TSAD_TIMESTAMP_MAX_LEAD_SECONDS)"),
                         (ts < s.timestamp_min, f"before {s.timestamp_min!r} "
                          "(TSAD_TIMESTAMP_MIN)")):
            if bad.any():
                i = int(np.argmax(bad))
                raise field_error((*loc, i, "timestamp"), f"{float(ts[i])!r}: {why}")
        huge = np.abs(points[:, 1:]) > s.value_max_abs
        if huge.any():
            i, j = np.argwhere(huge)[0]
            raise field_error((*loc, int(i), "values", int(j)),
                              f"{float(points[i, 1 + j])!r}: magnitude above "
                              f"{s.value_max_abs:g} (TSAD_VALUE_MAX_ABS)")

    # --- /streams ----------------------------------------------------------------------
    async def put_stream(self, stream: str, cfg: StreamConfigIn) -> tuple[StreamOut, bool]:
        detector = cfg.detector or self.settings.default_detector
        window = cfg.window or self.settings.default_window
        self._check_shape(cfg.channels, window)
        artifact = None
        if artifact_name(detector) is not None:
            artifact = await asyncio.to_thread(self._artifact, detector)
            window = self._artifact_window(artifact, cfg)
        elif detector not in REGISTRY:
            raise field_error(("body", "detector"),
                              f"unknown detector {detector!r}; known: {sorted(REGISTRY)} or "
                              f"'artifact:<name>'")
        elif not issubclass(REGISTRY[detector], Online):
            online = sorted(n for n, cls in REGISTRY.items() if issubclass(cls, Online))
            raise field_error(("body", "detector"),
                              f"detector {detector!r} is trained offline: fit it with `tsad "
                              f"train` and bind 'artifact:<name>', or pick one that learns "
                              f"online: {online}")
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
                          alert_budget_per_day=cfg.alert_budget_per_day,
                          timestamps=cfg.timestamps)
        # room for one more (checked before: a PUT has no points to lose)
        if await self._over_stream_cap(slack=1) and await self.store.get_stream(stream) is None:
            raise self._stream_cap_error(("path", "stream"))
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

    # --- /streams/{id}/feedback -----------------------------------------------------
    async def feedback(self, stream: str, req: FeedbackRequest) -> FeedbackOut | None:
        """Store labelled ranges (as windows) in the stream's state; with ``adapt``, tune
        the stream's own soft prompts on all its feedback. None: no such stream."""
        s = self.settings
        if len(req.ranges) > s.feedback_max_ranges:
            raise field_error(("body", "ranges"), f"at most {s.feedback_max_ranges} ranges "
                              f"per request, got {len(req.ranges)}")
        for i, r in enumerate(req.ranges):
            if epoch(r.end) < epoch(r.start):
                raise field_error(("body", "ranges", i, "end"), "must not be before start")
        if req.steps is not None and not req.adapt:
            raise field_error(("body", "steps"), "steps needs adapt: true")
        if req.steps is not None and req.steps > s.feedback_max_steps:
            raise field_error(("body", "steps"), f"at most {s.feedback_max_steps} "
                              f"(TSAD_FEEDBACK_MAX_STEPS), got {req.steps}")
        inline = sum(len(r.points or ()) for r in req.ranges)
        if inline > s.max_batch_points:
            raise field_error(("body", "ranges"), f"at most {s.max_batch_points} inline "
                              f"points per request, got {inline}")
        async with self.store.lock(stream):
            meta = await self.store.get_stream(stream)
            if meta is None:
                return None
            artifact = None
            if artifact_name(meta.detector) is not None:
                artifact = await asyncio.to_thread(
                    load_artifact, self.settings.artifacts_dir, artifact_name(meta.detector))
            if req.adapt and (artifact is None or not artifact.adaptable):
                raise StoreRejection(
                    ("body", "adapt"), f"stream {stream!r} is scored by {meta.detector!r}: "
                    "only a stream bound to a SPEAR artifact ('artifact:<name>') can adapt; "
                    "send adapt: false to store the feedback alone", status=409)
            held = await self.store.window(stream)
            blob = await self.store.load_state(stream)
            blob, added = await asyncio.to_thread(self._store_feedback, meta, blob, held, req)
            await self.store.save_state(stream, blob)
        for r in req.ranges:
            self.metrics.feedback_ranges_total.labels(r.label).inc()
        log.info("feedback stored", extra={"stream": stream, "ranges": len(req.ranges),
                                           "adapt": req.adapt})
        if req.adapt:
            blob = await self._adapt(meta, req.steps or s.feedback_steps)
        return self._feedback_out(meta, blob, *added)

    async def get_feedback(self, stream: str) -> FeedbackOut | None:
        meta = await self.store.get_stream(stream)
        if meta is None:
            return None
        blob = await self.store.load_state(stream)
        return await asyncio.to_thread(self._feedback_out, meta, blob)

    def _store_feedback(self, meta: StreamMeta, blob: bytes | None, held: np.ndarray,
                        req: FeedbackRequest) -> tuple[bytes, tuple[int, int, int]]:
        """Resolve the ranges to labelled windows (422 naming the range when it has none),
        add negatives, store all in the blob. Runs in a worker thread (it may score)."""
        s = self.settings
        scorer = StreamScorer.from_blob(meta, s, blob)
        w = meta.window
        ranges, sources = [], [held]
        for i, r in enumerate(req.ranges):
            start, end = epoch(r.start), epoch(r.end)
            points = held
            if r.points is not None:
                points = self._inline_points(r.points, meta.channels, i)
                sources.append(points)
            wins = windows_ending_in(points, start, end, w, s.feedback_windows_per_range)
            if not len(wins):
                where = ("its inline points" if r.points is not None else
                         f"the {len(held)} points the service holds for the stream "
                         + (f"({held[0, 0]!r} to {held[-1, 0]!r})" if len(held) else "")
                         + "; send the range's points and the window - 1 before them as "
                         f"ranges.{i}.points")
                raise field_error(("body", "ranges", i),
                                  f"no full window of {w} points ends in [{start!r}, "
                                  f"{end!r}] in {where}")
            ranges.append((start, end, r.label, wins))
        negatives = np.zeros((0, w, meta.channels))
        if scorer.artifact is not None and scorer.artifact.adaptable:
            negatives = self._recent_normal(scorer, sources, ranges)
        scorer.feedback.add(ranges, negatives, s.feedback_max_ranges)
        return scorer.to_blob(), (len(ranges), sum(len(r[3]) for r in ranges),
                                  len(negatives))

    def _inline_points(self, points: list[Point], channels: int, i: int) -> np.ndarray:
        out = np.empty((len(points), 1 + channels))
        previous = -np.inf
        for k, p in enumerate(points):
            loc = ("body", "ranges", i, "points", k)
            if len(p.values) != channels:
                raise field_error((*loc, "values"), f"the stream has {channels} channels, "
                                  f"got {len(p.values)} values")
            ts = p.epoch()
            if not np.isfinite(ts) or ts <= previous:
                raise field_error((*loc, "timestamp"), "timestamps must be finite and "
                                  "strictly increase")
            previous = out[k, 0] = ts
            out[k, 1:] = p.values
        self._check_bounds(out, ("body", "ranges", i, "points"))
        return out

    def _recent_normal(self, scorer: StreamScorer, sources: list[np.ndarray],
                       ranges: list[tuple]) -> np.ndarray:
        """Up to feedback_windows_per_range windows outside the labelled ranges that the
        stream's current model scores below its threshold: negatives that keep a few
        labels from teaching the model that everything is anomalous."""
        limit = self.settings.feedback_windows_per_range
        spans = [(a, b, TARGETS[label]) for a, b, label, _ in ranges]
        cands = [c for src in sources if len(c := recent_windows(src, scorer.meta.window,
                                                                 spans, limit))]
        if not cands:
            return np.zeros((0, scorer.meta.window, scorer.meta.channels))
        cands = np.concatenate(cands)
        det = scorer.detector
        scores = aggregate_channels(det.channel_scores(cands), det.config.aggregate)
        cut = scorer.threshold.value()
        if cut is None:
            cut = scorer.artifact.threshold if scorer.artifact.threshold is not None else 0.5
        return cands[scores < cut][:limit]

    async def _adapt(self, meta: StreamMeta, steps: int) -> bytes:
        """Tune outside the stream's lock (scoring goes on meanwhile), then install the
        result under the lock if the stream is still bound to the same artifact."""
        stream = meta.stream
        async with self._adapt_slot:
            blob = await self.store.load_state(stream)
            adaptation = await asyncio.to_thread(self._tune, meta, blob, steps)
        async with self.store.lock(stream):
            now = await self.store.get_stream(stream)
            if now is None or (now.detector, now.window, now.created_at) != (
                    meta.detector, meta.window, meta.created_at):
                raise StoreRejection(
                    ("body", "adapt"), f"stream {stream!r} was deleted or rebound while "
                    "adapting; nothing was installed", status=409)
            blob = await self.store.load_state(stream)
            blob = await asyncio.to_thread(self._install, now, blob, adaptation)
            await self.store.save_state(stream, blob)
        return blob

    def _tune(self, meta: StreamMeta, blob: bytes | None, steps: int) -> dict[str, np.ndarray]:
        s = self.settings
        scorer = StreamScorer.from_blob(meta, s, blob)
        art, fb = scorer.artifact, scorer.feedback
        assert art is not None
        det = art.detector.with_parameters()  # from the artifact, not the last adaptation
        report = det.finetune(fb.windows, fb.window_target, steps=steps, lr=s.feedback_lr,
                              max_seconds=s.feedback_max_seconds)
        self.metrics.feedback_adaptation_seconds.observe(report["seconds"])
        state = det.adaptable_state()
        nbytes = sum(v.nbytes for v in state.values())
        log.info("stream adapted", extra={"stream": meta.stream, "steps": report["steps"],
                                          "seconds": round(report["seconds"], 3),
                                          "loss_before": round(report["loss_before"], 4),
                                          "loss_after": round(report["loss_after"], 4)})
        return state | {
            "base": np.frombuffer(art.digest.encode(), dtype=np.uint8).copy(),
            "info": adaptation_info(report, fb.window_target, nbytes)}

    def _install(self, meta: StreamMeta, blob: bytes | None,
                 adaptation: dict[str, np.ndarray]) -> bytes:
        scorer = StreamScorer.from_blob(meta, self.settings, blob)
        if not scorer.set_adaptation(adaptation):
            raise StoreRejection(("body", "adapt"), f"artifact of stream {meta.stream!r} "
                                 "changed while adapting; nothing was installed", status=409)
        return scorer.to_blob()

    def _feedback_out(self, meta: StreamMeta, blob: bytes | None, stored: int = 0,
                      windows: int = 0, negatives: int = 0) -> FeedbackOut:
        scorer = StreamScorer.from_blob(meta, self.settings, blob)
        fb = scorer.feedback
        ranges = [FeedbackRangeOut(start=float(r[1]), end=float(r[2]),
                                   label=LABELS[int(r[3])], received_at=float(r[4]),
                                   windows=fb.windows_of(int(r[0]))) for r in fb.ranges]
        ada = scorer.adaptation
        adaptation = None
        if ada is not None:
            info = info_dict(ada["info"])
            adaptation = AdaptationOut(**info)
        return FeedbackOut(stream=meta.stream, stored=stored, windows=windows,
                           negatives=negatives, ranges=ranges, adapted=ada is not None,
                           adaptation=adaptation)

    async def list_streams(self, limit: int, cursor: str | None) -> StreamList:
        """One page, by stream id; next_cursor: the last id, when more follow."""
        metas = await self.store.list_streams(limit=limit + 1, after=cursor)
        more = len(metas) > limit
        return StreamList(streams=[StreamOut(**m.to_dict()) for m in metas[:limit]],
                          next_cursor=metas[limit - 1].stream if more else None)

    async def delete_stream(self, stream: str) -> bool:
        self.stream_series.forget(stream)
        async with self.store.lock(stream):  # no batch commits alerts in between
            if not await self.store.delete_stream(stream):
                return False
            self._count_events(await self.alerts.forget_stream(stream))
        return True


__all__ = ["ScoringPipeline", "StoreRejection"]
