"""The score transaction: validate, append, score, commit, and the batch's receipt.

``ScoreTransaction`` is called with a stream and its points as arrays (timestamps (N,),
values (N, C)): the HTTP router, and any other ingest path, go through it alike. The order
is what keeps acknowledged data safe: the atomic append comes first and an answer is
given only after it; the scoring state is saved afterwards with the stream's
scored-up-to mark, its alerts and events and the batch's receipt, in one atomic commit
(``Backend.commit``). If the process dies between the two, the points are stored but
unscored: the stream's next append hands them back before its own points, so they are
scored (and their alerts raised) first; ``recover`` does the same for one stream and
``service/recovery.py`` for every stream at start-up. A retry of a stored batch is
answered (its points' results when it scored them now, else status "duplicate"), and one
sent with the same Idempotency-Key gets the kept response: a batch sent with a key is
appended with a *pending receipt* (what the append decided for each point), and whoever
scores its points after a crash completes it with their results, so the retry gets the
answer the first request would have had, whether the retry itself, another batch or the
start-up recovery scored them. Repeated and backward timestamps follow the stream's
timestamp policy (``service/stores/plan.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any

import numpy as np
from pydantic_core import to_json

from service.alerts.events import record_events
from service.errors import InvalidInput, LimitReached
from service.metrics import ServiceMetrics, StreamSeries
from service.quotas import check_room
from service.responses import recovered_response, score_response
from service.scorers import Cached, ScorerCache
from service.scoring import Results, StreamScorer
from service.settings import Settings
from service.shadows.queue import ShadowQueue
from service.stores.base import AppendResult, Backend, Commit, PendingReceipt, PointAction
from service.validation import check_points

log = logging.getLogger("tsad.pipeline")


@dataclass(frozen=True)
class Idempotency:
    """A batch sent with an Idempotency-Key: a retry with the same key and body gets the
    first response again."""

    key: str
    digest: str  # of the request body: the same key with another body is refused
    sent: Sequence[float | datetime]  # the points' timestamps as sent (the answer echoes)


@dataclass
class ScoreOutcome:
    """What one call did: the append's actions, the scorer's columns, and the answer."""

    stream: str
    appended: AppendResult | None = None
    results: Results | None = None  # a row per point scored (unscored first, then new)
    points_until_scored: int | None = None
    kept: dict | None = None  # the response of an earlier call with the same key
    _body: dict | None = field(default=None, repr=False)

    def body(self, sent: Sequence[float | datetime]) -> dict[str, Any]:
        """The /score answer (``ScoreResponse``'s shape), ``sent`` the stamps as sent."""
        if self.kept is not None:
            return self.kept
        if self._body is None:
            assert self.appended is not None
            self._body = score_response(self.stream, self.appended, self.results, sent,
                                        self.points_until_scored)
        return self._body


@dataclass
class _Scored:
    scorer: StreamScorer
    results: Results
    sections: dict[str, bytes]  # changed since loaded
    drop: tuple[str, ...]
    alerts: list
    events: list[dict]
    nbytes: int


class ScoreTransaction:
    def __init__(self, backend: Backend, settings: Settings, metrics: ServiceMetrics,
                 series: StreamSeries, scorers: ScorerCache,
                 after_append: Callable[[AppendResult], None] | None = None,
                 shadows: ShadowQueue | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.series = series
        self.scorers = scorers
        self.after_append = after_append  # tests: a crash between append and commit
        self.shadows = shadows  # shadow detectors' metrics and costly work, after commits

    async def __call__(self, stream: str, timestamps: np.ndarray, values: np.ndarray, *,
                       idempotency: Idempotency | None = None,
                       tenant: str | None = None) -> ScoreOutcome:
        """Store the points (N timestamps, N x C values) of ``stream`` and score them.
        ``tenant``: the caller's (its key's), whose stream quota a new stream counts
        against (``service/quotas.py``)."""
        points = np.column_stack([np.asarray(timestamps, np.float64),
                                  np.asarray(values, np.float64).reshape(len(timestamps), -1)])
        check_points(points, self.settings)
        async with self.backend.streams.lock(stream):
            pending = None
            if idempotency is not None:
                kept = await self._receipt(stream, idempotency)
                if kept is not None and "response" in kept:
                    return ScoreOutcome(stream, kept=kept["response"])
                if kept is None:  # a pending one is kept as its first append wrote it
                    pending = PendingReceipt(idempotency.key,
                                             partial(_encode_pending, idempotency))
            cached = self.scorers.take(stream)  # back in only once committed
            appended = await self._append(stream, points, cached, pending, tenant)
            if self.after_append is not None:
                self.after_append(appended)
            appended, scored = await self._score(appended, cached)
            completed = await self._complete(appended, scored)
            outcome = ScoreOutcome(stream, appended, scored.results if scored else None,
                                   scored.scorer.points_until_scored if scored
                                   else await self._warm_up_left(appended, cached))
            receipt = None
            if idempotency is not None and idempotency.key in completed:
                outcome.kept = completed[idempotency.key][0]  # the first request's answer
            elif idempotency is not None:
                receipt = (idempotency.key, _encode_receipt(
                    idempotency.digest, appended.meta.created_at,
                    outcome.body(idempotency.sent)))
            await self._commit(appended, scored, receipt, cached,
                               {k: data for k, (_, data) in completed.items()})
        return outcome

    async def recover(self, stream: str) -> int:
        """Score what a crash left stored but unscored on one stream; returns how many
        points were scored (0: nothing was pending)."""
        async with self.backend.streams.lock(stream):
            meta = await self.backend.streams.get(stream)
            if meta is None or meta.points_scored is None or (
                    meta.points_scored >= meta.points_seen):
                return 0
            appended = await self._append(stream, np.empty((0, 1 + meta.channels)))
            appended, scored = await self._score(appended, None)
            completed = await self._complete(appended, scored)
            await self._commit(appended, scored, None, None,
                               {k: data for k, (_, data) in completed.items()})
            return appended.unscored

    # --- the steps -----------------------------------------------------------------------
    async def _receipt(self, stream: str, idem: Idempotency) -> dict | None:
        """The receipt of the batch first sent with the key: its ``response``, or
        ``pending`` (None: none, or one of a deleted earlier stream of the same id);
        InvalidInput when this body is not that batch."""
        raw = await self.backend.streams.receipt(stream, idem.key)
        meta = await self.backend.streams.get(stream) if raw else None
        if raw is None or meta is None:
            return None
        kept = json.loads(zlib.decompress(raw))
        if kept["created_at"] != meta.created_at:
            return None
        if kept["body"] != idem.digest:
            raise InvalidInput(("header", "Idempotency-Key"), f"key {idem.key!r} was already "
                               "used for a different batch (kept "
                               f"{self.settings.idempotency_ttl_seconds} s, "
                               "TSAD_IDEMPOTENCY_TTL_SECONDS): use a new key per batch")
        if "response" in kept:
            self.metrics.idempotent_replays_total.inc()
        return kept

    async def _complete(self, appended: AppendResult, scored: _Scored | None
                        ) -> dict[str, tuple[dict, bytes]]:
        """The pending receipts whose batches' points were scored now, among the points
        a crash had left unscored: Idempotency-Key -> (the answer, the receipt to keep)."""
        if scored is None or not appended.unscored:
            return {}
        meta, done = appended.meta, {}
        for key, raw in (await self.backend.streams.pending_receipts(meta.stream)).items():
            kept = json.loads(zlib.decompress(raw))
            if "pending" not in kept or kept["created_at"] != meta.created_at:
                continue
            body = recovered_response(meta.stream, kept["pending"], appended, scored.results,
                                      scored.scorer.points_until_scored)
            if body is not None:
                done[key] = (body, _encode_receipt(kept["body"], meta.created_at, body))
        return done

    async def _append(self, stream: str, points: np.ndarray, cached: Cached | None = None,
                      pending: PendingReceipt | None = None,
                      tenant: str | None = None) -> AppendResult:
        m = self.metrics
        try:
            appended = await self.backend.streams.append(
                stream, points, known=cached.meta if cached else None, pending=pending)
        except InvalidInput:
            m.points_rejected_total.inc(len(points))
            raise
        if appended.created:  # quotas are checked after the atomic append: undone if over
            try:
                await check_room(self.backend, self.settings, tenant, ("body", "stream"))
            except LimitReached:
                await self.backend.streams.delete(stream)
                m.points_rejected_total.inc(len(points))
                raise
        m.points_ingested_total.inc(appended.accepted)
        m.points_duplicate_total.inc(appended.duplicates)
        for action in ("nudged", "dropped"):
            if n := appended.actions.count(action):
                m.points_reordered_total.labels(action).inc(n)
        if appended.created:
            m.streams_created_total.inc()
            log.info("stream created", extra={"stream": stream,
                                              "channels": appended.meta.channels})
        if appended.unscored or appended.skipped:
            m.points_unscored_total.inc(appended.skipped)
            log.log(logging.WARNING if appended.skipped else logging.INFO,
                    "scoring points a crash left unscored", extra={
                        "stream": stream, "points": appended.unscored,
                        "skipped": appended.skipped,
                        "limit": self.settings.unscored_max_points})
        return appended

    async def _score(self, appended: AppendResult, cached: Cached | None
                     ) -> tuple[AppendResult, _Scored | None]:
        """Score the stored points not yet scored: those a crash left, then the batch's.
        If the ones a crash left make the detector fail, they are skipped (logged and
        counted) rather than failing every later request of the stream."""
        if not (appended.to_score or appended.skipped):
            return appended, None
        scorer, sections = ScorerCache.valid(cached, appended), None
        self.metrics.scorer_cache_total.labels("hit" if scorer else "miss").inc()
        if scorer is None:
            sections = await self.backend.streams.sections(appended.meta.stream)
        try:
            scored = await asyncio.to_thread(self._run, appended, sections, scorer)
        except Exception:
            if not appended.unscored:
                raise
            log.exception("scoring points a crash left unscored failed: skipped", extra={
                "stream": appended.meta.stream, "points": appended.unscored})
            self.metrics.points_unscored_total.inc(appended.unscored)
            appended = replace(appended, unscored=0,
                               skipped=appended.skipped + appended.unscored)
            sections = await self.backend.streams.sections(appended.meta.stream)
            scored = await asyncio.to_thread(self._run, appended, sections)  # afresh
        self.metrics.points_recovered_total.inc(appended.unscored)
        return appended, scored

    async def _warm_up_left(self, appended: AppendResult, cached: Cached | None
                            ) -> int | None:
        """points_until_scored of a batch that stored nothing (a retry, dropped points):
        the stream's warm-up progress as it stands, so a retry answers what the first
        answer did. Reads the stream's state unless its scorer is cached."""
        scorer = ScorerCache.valid(cached, appended)
        if scorer is None:
            sections = await self.backend.streams.sections(appended.meta.stream)
            scorer = await asyncio.to_thread(StreamScorer.from_sections, appended.meta,
                                             self.settings, sections)
        return scorer.loop.points_until_scored(appended.meta.points_seen)

    def _run(self, appended: AppendResult, sections: dict[str, bytes] | None,
             scorer: StreamScorer | None = None) -> _Scored:
        """The detector's part, in a worker thread: score, then encode the state."""
        start = time.perf_counter()
        meta, m = appended.meta, self.metrics
        if scorer is None:
            scorer = StreamScorer.from_sections(meta, self.settings, sections or {})
        scorer.meta = meta  # points_seen moved on: it indexes the new points
        results = scorer.process(appended.points, appended.to_score)
        alerts, events = scorer.tracker.drain()
        threshold = scorer.threshold.value()
        if threshold is not None:
            m.threshold_value.observe(threshold)
        self._observe_series(meta.stream, results, threshold)
        m.points_scored_total.labels(meta.detector).inc(int(results.scored.sum()))
        m.anomalies_total.labels(meta.detector).inc(int(results.anomalous.sum()))
        m.scoring_duration_seconds.labels(meta.detector).observe(time.perf_counter() - start)
        changed, drop, nbytes = scorer.to_commit()
        m.stream_state_bytes.labels(meta.detector).observe(nbytes)
        return _Scored(scorer, results, changed, drop, alerts, events, nbytes)

    def _observe_series(self, stream: str, results: Results, threshold: float | None) -> None:
        if not self.series.admit(stream):
            return
        scored = results.scored.tolist()
        scores = [s if ok else None for s, ok in zip(results.scores.tolist(), scored,
                                                     strict=True)]
        leads = [e.top_channels[0].channel if (e := results.explained.get(k)) else None
                 for k in range(len(results))]
        likelihoods = [None if v != v else v for v in results.likelihood.tolist()]  # NaN
        self.series.observe(stream, scores, results.anomalous.tolist(), leads, threshold,
                            likelihoods)

    async def _commit(self, appended: AppendResult, scored: _Scored | None,
                      receipt: tuple[str, bytes] | None, cached: Cached | None,
                      completed: dict[str, bytes] | None = None) -> None:
        """Changed sections, scored-up-to mark, alerts, events, the receipt and those it
        completed: one atomic write; then the scorer goes (back) into the cache, under the
        version it gave."""
        meta = appended.meta
        if scored is None:
            if receipt is not None:
                await self.backend.commit(Commit(meta.stream, receipt=receipt))
            if ScorerCache.valid(cached, appended):  # nothing written: the same state
                self.scorers.put(meta.stream, replace(cached, meta=meta))
            return
        version = await self.backend.commit(Commit(
            meta.stream, sections=scored.sections, drop=scored.drop,
            scored=meta.points_seen, receipt=receipt, completed=completed or {},
            alerts=scored.alerts, events=scored.events))
        record_events(scored.events, self.metrics, self.series)
        if self.shadows is not None and scored.scorer.shadows:
            self.shadows.committed(meta.stream, scored.scorer.shadows)
        if version:
            self.scorers.put(meta.stream, Cached(
                replace(meta, version=version, points_scored=meta.points_seen),
                scored.scorer, scored.nbytes))


def _encode_receipt(digest: str, created_at: float, response: dict) -> bytes:
    """What an Idempotency-Key keeps: the batch's digest, the stream's incarnation (a
    receipt of a deleted stream of the same id does not answer) and the response (as
    /score sends it: date-times as RFC 3339 strings)."""
    return zlib.compress(to_json({"body": digest, "created_at": created_at,
                                  "response": response}))


def _encode_pending(idem: Idempotency, actions: list[PointAction],
                    stamps: list[float | None], created_at: float) -> bytes:
    """A pending receipt (``PendingReceipt.encode``): the batch's digest, the stream's
    incarnation, and what the append decided for each point, to answer with once the
    points are scored."""
    return zlib.compress(to_json({"body": idem.digest, "created_at": created_at, "pending": {
        "sent": idem.sent, "actions": actions, "stamps": stamps}}))


def crash_after_appends(n: int) -> Callable[[AppendResult], None]:
    """TSAD_FAULT_CRASH_AFTER_APPEND (tests only): the process dies between its n-th
    append that stored points and its commit, as a kill -9 there would."""
    stored = 0

    def after(appended: AppendResult) -> None:
        nonlocal stored
        if appended.accepted:
            stored += 1
            if stored == n:
                log.critical("fault injection: exiting after an append",
                             extra={"stream": appended.meta.stream})
                os._exit(137)

    return after


__all__ = ["Idempotency", "ScoreOutcome", "ScoreTransaction", "crash_after_appends"]
