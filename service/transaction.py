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

Writers of one stream queue in arrival order (per process; across processes the stream
lock is fair, ``service/stores/redis/lock.py``). Requests that queued while the stream
was busy are served together: under one lock, each is appended on its own (all or none,
its own errors, its own pending receipt), then all their points are scored in one pass
(scores never depend on batching) and committed once, with a receipt per request. Many
writers on one stream then cost about what one does, and none waits for more than the
batch in progress. Points a crash left unscored are scored with the one request that
finds them, alone, so the pending receipts they complete are answered as in a lone
request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any

import numpy as np
from pydantic_core import to_json

from service.alerts.events import record_events
from service.errors import InvalidInput, LimitReached, ServiceError, StoreUnavailable
from service.metrics import ServiceMetrics, StreamSeries
from service.quotas import check_room
from service.responses import as_dict, recovered_body, score_body
from service.scorers import Cached, ScorerCache
from service.scoring import Results, StreamScorer
from service.settings import Settings
from service.shadows.queue import ShadowQueue
from service.stores.base import (
    AppendResult,
    Backend,
    Commit,
    PendingReceipt,
    PointAction,
    StreamMeta,
)
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
    # the response of an earlier call with the same key: as its receipt kept it, or as
    # written for a batch a crash had left pending
    kept: dict | bytes | None = None
    _json: bytes | None = field(default=None, repr=False)

    def json(self, sent: Sequence[float | datetime]) -> bytes:
        """The /score answer (``ScoreResponse``'s JSON), ``sent`` the stamps as sent."""
        if isinstance(self.kept, bytes):
            return self.kept
        if self.kept is not None:
            return to_json(self.kept)
        if self._json is None:
            assert self.appended is not None
            self._json = score_body(self.stream, self.appended, self.results, sent,
                                    self.points_until_scored)
        return self._json

    def body(self, sent: Sequence[float | datetime]) -> dict[str, Any]:
        """The answer as a client parses it (``json``'s)."""
        return self.kept if isinstance(self.kept, dict) else as_dict(self.json(sent))


@dataclass
class _Job:
    """One request in its stream's queue."""

    points: np.ndarray  # (N, 1 + C)
    idempotency: Idempotency | None
    tenant: str | None  # whose stream quota a new stream counts against
    done: asyncio.Future  # of its ScoreOutcome
    taken: bool = False  # its batch is being served (no longer to be withdrawn)


@dataclass
class _Queue:
    jobs: deque[_Job] = field(default_factory=deque)
    server: asyncio.Task | None = None


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
        self._queues: dict[str, _Queue] = {}  # streams with requests queued or served

    async def __call__(self, stream: str, timestamps: np.ndarray, values: np.ndarray, *,
                       idempotency: Idempotency | None = None,
                       tenant: str | None = None) -> ScoreOutcome:
        """Store the points (N timestamps, N x C values) of ``stream`` and score them.
        ``tenant``: the caller's (its key's), whose stream quota a new stream counts
        against (``service/quotas.py``)."""
        points = np.column_stack([np.asarray(timestamps, np.float64),
                                  np.asarray(values, np.float64).reshape(len(timestamps), -1)])
        check_points(points, self.settings)
        job = _Job(points, idempotency, tenant, asyncio.get_running_loop().create_future())
        queue = self._queues.setdefault(stream, _Queue())
        queue.jobs.append(job)
        if queue.server is None:
            queue.server = asyncio.create_task(self._serve(stream, queue))
        try:  # the queue is served in its own task: a caller gone away stops nothing
            await asyncio.wait([job.done], timeout=self.settings.lock_wait_seconds)
        except asyncio.CancelledError:
            if not job.taken:  # never started: its points are not stored
                queue.jobs.remove(job)
            raise
        if not job.done.done():
            if not job.taken:
                queue.jobs.remove(job)
                raise StoreUnavailable(f"stream {stream!r} is busy (lock wait timed out)")
            await asyncio.shield(job.done)  # started: its points may be stored already
        return job.done.result()

    async def _serve(self, stream: str, queue: _Queue) -> None:
        """Serve the stream's queue, oldest first, the requests waiting together, until
        it is empty."""
        try:
            while queue.jobs:
                batch = self._take(queue)
                # without Idempotency-Keys the batch's first store call is an append, which
                # then takes the lock in its own round trip (a receipt is read holding it)
                deferred = all(job.idempotency is None for job in batch)
                try:
                    async with self.backend.streams.lock(stream, deferred) as held:
                        await self._serve_batch(stream, batch, held)
                except BaseException as exc:  # the lock, the store or the detector failed
                    for job in batch:
                        if not job.done.done():
                            job.done.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise  # cancelled: the process is stopping
        finally:
            queue.server = None
            if not queue.jobs:
                self._queues.pop(stream, None)
            else:  # cancelled with requests still queued: they fail like their batch
                for job in queue.jobs:
                    if not job.done.done():
                        job.done.set_exception(StoreUnavailable(
                            f"stream {stream!r}: the service is stopping"))

    def _take(self, queue: _Queue) -> list[_Job]:
        """The requests served together: the oldest, and those behind it while their
        points fit in one request's limits (``max_batch_points``, and the unscored
        points a store holds), stopping before an Idempotency-Key already among them."""
        limit = min(self.settings.max_batch_points, self.settings.unscored_max_points)
        batch, points, keys = [], 0, set()
        while queue.jobs:
            job = queue.jobs[0]
            key = job.idempotency.key if job.idempotency else None
            if batch and (points + len(job.points) > limit or (key and key in keys)):
                break
            queue.jobs.popleft()
            job.taken = True
            batch.append(job)
            points += len(job.points)
            keys.add(key)
        return batch

    async def _serve_batch(self, stream: str, batch: list[_Job], held: object) -> None:
        """Under the stream's lock: each request's receipt check and append, in order,
        then one scoring pass and one commit for all of them."""
        cached = self.scorers.take(stream)  # back in only once committed
        # a known meta trims the context the store returns to what the live scorer needs,
        # which is what a shadow in step with it needs too (service/shadows/queue.py, Job)
        known = cached.meta if cached else None
        appended: list[tuple[_Job, AppendResult]] = []
        pending = 0  # points appended by this batch so far: unscored until it commits
        for i, job in enumerate(batch):
            try:
                receipt = None  # the pending receipt its append writes
                if job.idempotency is not None:
                    kept = await self._receipt(stream, job.idempotency)
                    if kept is not None and "response" in kept:
                        job.done.set_result(ScoreOutcome(stream, kept=kept["response"]))
                        continue
                    if kept is None:  # a pending one is kept as its first append wrote it
                        receipt = PendingReceipt(job.idempotency.key,
                                                 partial(_encode_pending, job.idempotency))
                result = await self._append(stream, job.points, known, pending, receipt,
                                            job.tenant, held)
            except ServiceError as exc:  # this request's own: the others go on
                job.done.set_exception(exc)
                if isinstance(exc, StoreUnavailable):  # the store is gone: so are they
                    for rest in batch[i + 1:]:
                        rest.done.set_exception(exc)
                    break
                continue
            if self.after_append is not None:
                self.after_append(result)
            known, pending = result.meta, pending + result.accepted
            appended.append((job, result))
            if result.unscored > pending - result.accepted:  # a crash left points: they
                self._put_back(stream, batch[i + 1:])  # and this request, on their own
                break
        if not appended:
            if cached is not None:
                self.scorers.put(stream, cached)  # nothing written: still valid
            return
        first, writes = appended[0][1], sum(1 for _, a in appended if a.accepted)
        last, scored = await self._score(appended[-1][1], cached, writes, first.unscored)
        dropped = appended[-1][1].unscored - last.unscored  # crash-left rows skipped
        # nothing scored (a retry, dropped points): the warm-up as it stands, so a retry
        # answers what the first answer did
        until = (scored.scorer.points_until_scored if scored
                 else await self._warm_up_left(last, cached, writes))
        # a crash left points (then the batch is this one request): the pending receipts
        # of the batches they came from are completed with their results
        completed = await self._complete(last, scored) if first.unscored else {}
        outcomes, receipts = [], []
        for job, result in appended:
            mine = replace(result, unscored=result.unscored - dropped,
                           skipped=result.skipped + dropped)
            out = _outcome(stream, mine, scored, until)
            idem = job.idempotency
            if idem is not None and idem.key in completed:
                out.kept = completed[idem.key][0]  # the first request's answer
            elif idem is not None:
                receipts.append((idem.key, _encode_receipt(
                    idem.digest, mine.meta.created_at, out.json(idem.sent))))
            outcomes.append((job, out))
        await self._commit(last, scored, receipts, cached, writes, held,
                           {k: data for k, (_, data) in completed.items()})
        for job, out in outcomes:
            job.done.set_result(out)

    def _put_back(self, stream: str, jobs: list[_Job]) -> None:
        """Requests taken for a batch but not served: first in the queue again."""
        if jobs:
            queue = self._queues[stream]
            for job in reversed(jobs):
                job.taken = False
                queue.jobs.appendleft(job)

    async def recover(self, stream: str) -> int:
        """Score what a crash left stored but unscored on one stream; returns how many
        points were scored (0: nothing was pending)."""
        async with self.backend.streams.lock(stream) as held:
            meta = await self.backend.streams.get(stream)
            if meta is None or meta.points_scored is None or (
                    meta.points_scored >= meta.points_seen):
                return 0
            appended = await self._append(stream, np.empty((0, 1 + meta.channels)))
            appended, scored = await self._score(appended, None)
            completed = await self._complete(appended, scored)
            await self._commit(appended, scored, [], None, held=held,
                               completed={k: data for k, (_, data) in completed.items()})
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
                        ) -> dict[str, tuple[bytes, bytes]]:
        """The pending receipts whose batches' points were scored now, among the points
        a crash had left unscored: Idempotency-Key -> (the answer, the receipt to keep)."""
        if scored is None or not appended.unscored:
            return {}
        meta, done = appended.meta, {}
        for key, raw in (await self.backend.streams.pending_receipts(meta.stream)).items():
            kept = json.loads(zlib.decompress(raw))
            if "pending" not in kept or kept["created_at"] != meta.created_at:
                continue
            body = recovered_body(meta.stream, kept["pending"], appended, scored.results,
                                  scored.scorer.points_until_scored)
            if body is not None:
                done[key] = (body, _encode_receipt(kept["body"], meta.created_at, body))
        return done

    async def _append(self, stream: str, points: np.ndarray, known: StreamMeta | None = None,
                      pending: int = 0, receipt: PendingReceipt | None = None,
                      tenant: str | None = None, held: object = None) -> AppendResult:
        """``known``: the stream's meta as last seen (a cached scorer's, or the previous
        append's); ``pending``: points appended before in this batch (still unscored);
        ``receipt``: the request's pending receipt, written with its points; ``tenant``:
        whose stream quota a new stream counts against; ``held``: the stream's lock (a
        deferred one is taken by the append)."""
        m = self.metrics
        try:
            appended = await self.backend.streams.append(stream, points, known=known,
                                                         pending=receipt, lock=held)
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
        if appended.unscored > pending or appended.skipped:
            m.points_unscored_total.inc(appended.skipped)
            log.log(logging.WARNING if appended.skipped else logging.INFO,
                    "scoring points a crash left unscored", extra={
                        "stream": stream, "points": appended.unscored - pending,
                        "skipped": appended.skipped,
                        "limit": self.settings.unscored_max_points})
        return appended

    async def _score(self, appended: AppendResult, cached: Cached | None, writes: int = 1,
                     recovering: int | None = None) -> tuple[AppendResult, _Scored | None]:
        """Score the stored points not yet scored: those a crash left (``recovering``,
        by default all the unscored the append handed back), then the batch's
        (``appended``: the batch's last append; ``writes`` of its appends stored points).
        If the ones a crash left make the detector fail, they are skipped (logged and
        counted) rather than failing every later request of the stream."""
        recovering = appended.unscored if recovering is None else recovering
        if not (appended.to_score or appended.skipped):
            return appended, None
        scorer, sections = ScorerCache.valid(cached, appended, writes), None
        self.metrics.scorer_cache_total.labels("hit" if scorer else "miss").inc()
        if scorer is None:
            sections = await self.backend.streams.sections(appended.meta.stream)
        try:
            scored = await asyncio.to_thread(self._run, appended, sections, scorer)
        except Exception:
            if not recovering:
                raise
            log.exception("scoring points a crash left unscored failed: skipped", extra={
                "stream": appended.meta.stream, "points": recovering})
            self.metrics.points_unscored_total.inc(recovering)
            appended = replace(appended, unscored=appended.unscored - recovering,
                               skipped=appended.skipped + recovering)
            recovering = 0
            sections = await self.backend.streams.sections(appended.meta.stream)
            scored = await asyncio.to_thread(self._run, appended, sections)  # afresh
        self.metrics.points_recovered_total.inc(recovering)
        return appended, scored

    async def _warm_up_left(self, appended: AppendResult, cached: Cached | None,
                            writes: int = 1) -> int | None:
        """points_until_scored of a batch that stored nothing (a retry, dropped points):
        the stream's warm-up progress as it stands, so a retry answers what the first
        answer did. Reads the stream's state unless its scorer is cached."""
        scorer = ScorerCache.valid(cached, appended, writes)
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
                      receipts: list[tuple[str, bytes]], cached: Cached | None,
                      writes: int = 1, held: object = None,
                      completed: dict[str, bytes] | None = None) -> None:
        """Changed sections, scored-up-to mark, alerts, events, receipts and the pending
        ones it completed: one atomic write (which may release ``held``, the stream's
        lock); then the scorer goes (back) into the cache, under the version it gave
        (``appended``: the batch's last append, ``writes`` of its appends stored points)."""
        meta = appended.meta
        if scored is None:
            if receipts:
                await self.backend.commit(Commit(meta.stream, receipts=receipts))
            if ScorerCache.valid(cached, appended, writes):  # nothing written: the same state
                self.scorers.put(meta.stream, replace(cached, meta=meta))
            return
        version = await self.backend.commit(Commit(
            meta.stream, sections=scored.sections, drop=scored.drop,
            scored=meta.points_seen, receipts=receipts, completed=completed or {},
            alerts=scored.alerts, events=scored.events, release=held))
        record_events(scored.events, self.metrics, self.series)
        if self.shadows is not None and scored.scorer.shadows:
            self.shadows.committed(meta.stream, scored.scorer.shadows)
        if version:
            self.scorers.put(meta.stream, Cached(
                replace(meta, version=version, points_scored=meta.points_seen),
                scored.scorer, scored.nbytes))


def _outcome(stream: str, appended: AppendResult, scored: _Scored | None,
             until: int | None) -> ScoreOutcome:
    """One request's outcome from its batch's scoring: its rows are the first
    ``appended.to_score`` (the points before it in the batch are its unscored ones, so
    the answer indexes them as a lone request's would); points until scored counts
    from its last point (a later point of the batch that is scored says exactly)."""
    if scored is None:
        return ScoreOutcome(stream, appended, None, until)
    results, n = scored.results, appended.to_score
    later = np.flatnonzero(results.scored[n:])
    if len(later):
        until = int(later[0])
    elif until is not None:
        until += len(results) - n
    return ScoreOutcome(stream, appended, results.head(n), until)


def _encode_receipt(digest: str, created_at: float, response: bytes) -> bytes:
    """What an Idempotency-Key keeps: the batch's digest, the stream's incarnation (a
    receipt of a deleted stream of the same id does not answer) and the response (its
    JSON as /score sends it: date-times as RFC 3339 strings)."""
    return zlib.compress(b'{"body":%b,"created_at":%b,"response":%b}' % (
        to_json(digest), to_json(created_at), response))


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
