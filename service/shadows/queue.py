"""Shadow detectors off the request path: a bounded queue of their pending points in
each process, worked by background tasks, so a shadow never adds its detector's cost to
a live request, and a lagging one never holds /score back.

After each commit the score transaction hands over each shadow's batch (``committed``):
the points with the context their windows need, and the live results to compare with.
Batches join the shadow's pending job (one per shadow: batches merge). A job is ready
once it holds a chunk end (64 points), so a detector scores at least a chunk in one
vectorised call (a language model embeds its windows in one call). A costly shadow
catches up at every chunk end: it runs at most a chunk behind plus the queue's wait. A
cheap one catches up once ``TSAD_SHADOW_CATCH_UP_POINTS`` (512) of its points wait or
its oldest has waited ``TSAD_SHADOW_CATCH_UP_SECONDS`` (1 s), whichever comes first: a
catch-up's fixed cost (its mark read, its state encoded and sent, its commit under the
stream's lock, which a live request of the stream then waits for) is paid once per
several chunks, not at every batch-100 request. Cheap shadows' jobs go first; costly
ones go together, up to ``TSAD_SHADOW_COSTLY_TOGETHER`` of them (their language-model
prompts share forward passes in the child). A worker task hands a ready job to its child
process (``worker.py``: off the service's interpreter, at a lower priority), which scores
it and encodes the shadow's changed sections outside the stream's lock; the task then
commits them under it, after checking that the shadow is still the one it scored (same id: not
deleted, promoted or replaced) and still where it started (same mark). When more
than ``TSAD_SHADOW_QUEUE_POINTS`` points wait, the oldest are dropped and counted as
skipped; after a crash, a shadow goes on from its mark with what the store holds (and
the live results committed with it, ``stream.py``), skipping what is gone, counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from models.streaming import CHUNK
from service import stream_state
from service.errors import StoreUnavailable
from service.metrics import ServiceMetrics, StreamSeries, observe_all
from service.scorers import ScorerCache
from service.settings import Settings
from service.shadows.config import ShadowConfig, section, split
from service.shadows.engine import Run
from service.shadows.stream import Offer, StreamShadows
from service.shadows.worker import Scored, ShadowWorker
from service.stores.base import Backend, Commit, StreamMeta, retained

log = logging.getLogger("tsad.shadows")
RETRY_SECONDS = 1.0  # a worker's pause after a job the store failed, put back


@dataclass
class Job(Offer):
    """A shadow's pending batches, merged: the stream's points from index ``first`` (with
    the context their windows need), the first of them not yet scored (``new``) and the
    live results known for them; ``since``: when the oldest of its pending batches came
    (monotonic seconds)."""

    since: float = field(default_factory=time.monotonic)

    @classmethod
    def of(cls, offer: Offer) -> Job:
        return cls(**vars(offer))

    @property
    def key(self) -> tuple[str, str]:
        return self.stream, self.config.id

    @property
    def end(self) -> int:
        return self.first + len(self.points)

    @property
    def pending(self) -> int:
        return self.end - self.new

    @property
    def ready(self) -> bool:
        """It holds a chunk end: a chunk of the stream is complete."""
        return self.end // CHUNK > self.new // CHUNK

    def due(self, settings: Settings, now: float) -> bool:
        """Ready, and worth a catch-up now: a costly shadow at every chunk end (its
        detector's cost is per point); a cheap one once TSAD_SHADOW_CATCH_UP_POINTS of
        its points wait or its oldest has waited TSAD_SHADOW_CATCH_UP_SECONDS, so that
        the fixed cost of a catch-up (its mark read, its state encoded and committed
        under the stream's lock, which a live request of the stream then waits for) is
        paid once per many chunks at batch 100, not at every request."""
        return self.ready and (self.config.costly
                               or self.pending >= settings.shadow_catch_up_points
                               or now - self.since >= settings.shadow_catch_up_seconds)

    def due_at(self, settings: Settings) -> float:
        """When a ready job is due at the latest (monotonic seconds)."""
        return self.since + (0.0 if self.config.costly else settings.shadow_catch_up_seconds)

    def merge(self, offer: Offer) -> None:
        if offer.first <= self.end:  # overlapping context: append what is new, and prepend
            # the older context it carries: a batch completing a chunk carries the windows
            # of the whole chunk (the store's context for it), which the shadow then learns
            # even if its job began mid-chunk with one window of context
            older = offer.points[:max(self.first - offer.first, 0)]
            self.points = np.concatenate([older, self.points,
                                          offer.points[self.end - offer.first:]])
            self.first -= len(older)
        else:  # a gap (batches offered to another process, or dropped): skipped
            self.points, self.first, self.new = offer.points, offer.first, offer.new
        self.live = self.live.extend(offer.live.since(self.live.end))

    def drop_oldest(self, n: int) -> None:
        """Forget the ``n`` oldest pending points (and the context only they needed)."""
        self.new += n
        keep_from = max(self.first, self.new - retained(self.window) + 1)
        self.points = self.points[keep_from - self.first:]
        self.first = keep_from
        self.live = self.live.since(keep_from)


class ShadowQueue:
    def __init__(self, backend: Backend, settings: Settings, metrics: ServiceMetrics,
                 series: StreamSeries, scorers: ScorerCache) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.series = series
        self.scorers = scorers
        self.jobs: OrderedDict[tuple[str, str], Job] = OrderedDict()  # oldest first
        self.workers = [ShadowWorker(settings, metrics) for _ in range(settings.shadow_workers)]
        self.offered: dict[tuple[str, str], int] = {}  # the newest point offered, per shadow
        self.marks: dict[tuple[str, str], int] = {}  # where each shadow was last committed
        self._waiting = 0  # points waiting in jobs (kept as offers come: ``waiting``)
        self._ready = asyncio.Event()  # a job became ready or due: the workers look
        self._flushing = 0  # ``drained`` waiting: every ready job is due
        self._tasks: list[asyncio.Task] = []
        self.running: set[tuple[str, str]] = set()  # shadows being scored now

    # --- from the score transaction ---------------------------------------------------------
    def committed(self, stream: str, shadows: StreamShadows) -> None:
        """A batch of ``stream`` committed: its shadows' work."""
        for offer in shadows.drain():
            self.offer(offer)

    def offer(self, offer: Offer) -> None:
        key = (offer.stream, offer.config.id)
        job = self.jobs.get(key)
        before = 0 if job is None else job.pending
        was_ready = job is not None and job.ready
        if job is None:
            job = self.jobs[key] = Job.of(offer)
        else:
            job.merge(offer)
        self._waiting += job.pending - before
        end = offer.first + len(offer.points)
        self.offered[key] = end
        self.series.shadow(offer.stream, offer.config.name,
                           lag_points=end - self.marks.get(key, offer.config.start))
        self._bound()
        if job.ready and (not was_ready or self._due(job, time.monotonic())):
            self._ready.set()  # newly ready (a worker times when it is due) or due now

    def _due(self, job: Job, now: float) -> bool:
        return job.due(self.settings, now) or (self._flushing > 0 and job.ready)

    def _bound(self) -> None:
        """At most TSAD_SHADOW_QUEUE_POINTS waiting: the longest job loses its oldest."""
        over = self._waiting - self.settings.shadow_queue_points
        while over > 0:
            job = max(self.jobs.values(), key=lambda j: j.pending)
            n = min(over, job.pending)
            job.drop_oldest(n)
            self.metrics.shadow_points_skipped_total.inc(n)
            over -= n
            self._waiting -= n
        self.metrics.shadow_queue_points.set(self._waiting)

    @property
    def waiting(self) -> int:
        return sum(j.pending for j in self.jobs.values())

    def _counted(self) -> None:
        """Jobs taken, put back or forgotten: the count of waiting points again."""
        self._waiting = self.waiting
        self.metrics.shadow_queue_points.set(self._waiting)

    def forget(self, stream: str, shadow_id: str | None = None) -> None:
        """The stream was deleted (``shadow_id`` None), or one shadow deleted, promoted or
        replaced: its pending work goes."""
        for held in (self.jobs, self.offered, self.marks, *(w.at for w in self.workers)):
            for key in [k for k in held if k[0] == stream and shadow_id in (None, k[1])]:
                del held[key]
        self._counted()

    # --- the workers ------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(w)) for w in self.workers]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for worker in self.workers:  # a job still scoring is not waited for
            await worker.stop()

    async def drained(self, timeout: float = 60.0) -> bool:
        """Wait until no ready job waits or runs (tests, benchmarks, a promotion); False on
        timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        self._flushing += 1  # meanwhile every ready job is due
        self._ready.set()
        try:
            while any(j.ready for j in self.jobs.values()) or self.running:
                if asyncio.get_running_loop().time() > deadline:
                    return False
                await asyncio.sleep(0.01)
            return True
        finally:
            self._flushing -= 1

    async def _work(self, worker: ShadowWorker) -> None:
        while True:
            now = time.monotonic()
            waiting = [(k, j) for k, j in self.jobs.items() if j.ready]
            due = [k for k, j in waiting if self._due(j, now)]  # oldest first, cheap first
            key = min(due, key=lambda k: self.jobs[k].config.costly, default=None)
            if key is None:  # sleep until one is offered, or the first ready one is due
                self._ready.clear()
                wake = min((j.due_at(self.settings) for _, j in waiting), default=None)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready.wait(),
                                           None if wake is None else max(wake - now, 0.0))
                continue
            if not self.jobs[key].config.costly:
                await self._take(key, worker)
                continue
            together = [k for k in due if self.jobs[k].config.costly]
            await asyncio.gather(*(self._take(k, worker) for k in
                                   together[:self.settings.shadow_costly_together]))

    async def settle(self, stream: str, shadow_id: str, timeout: float = 120.0) -> None:
        """Score what waits for one shadow now, ready or not (before a promotion)."""
        key = (stream, shadow_id)
        deadline = asyncio.get_running_loop().time() + timeout
        while key in self.running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if key in self.jobs and key not in self.running:
            await self._take(key, self.workers[0])

    async def _take(self, key: tuple[str, str], worker: ShadowWorker) -> None:
        job = self.jobs.pop(key, None)
        if job is None:  # taken meanwhile (a promotion settling it)
            return
        self._counted()
        self.running.add(key)
        try:
            await self._run(job, worker)
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as exc:  # transient (a busy lock, Redis away): again later
            log.warning("shadow job put back: store unavailable", extra={
                "stream": job.stream, "shadow": job.config.name, "error": str(exc)})
            worker.at.pop(job.key, None)  # it may have scored what was not committed
            self._requeue(job)
            await asyncio.sleep(RETRY_SECONDS)
        except Exception:  # one shadow's failure must not stop the others
            log.exception("shadow failed: its points are skipped",
                          extra={"stream": job.stream, "shadow": job.config.name})
            self.metrics.shadow_points_skipped_total.inc(job.pending)
            worker.at.pop(job.key, None)
        finally:
            self.running.discard(key)

    def _requeue(self, job: Job) -> None:
        """A job that could not finish goes back, ahead of what was offered meanwhile (the
        same points are scored by the next try: nothing is skipped)."""
        newer = self.jobs.pop(job.key, None)
        if newer is not None:
            job.merge(newer)
        self.jobs[job.key] = job
        self.jobs.move_to_end(job.key, last=False)
        self._counted()

    async def _run(self, job: Job, worker: ShadowWorker) -> None:
        streams, config = self.backend.streams, job.config
        mark = await self._mark(job)
        if mark is None:  # deleted, promoted or replaced meanwhile
            worker.at.pop(job.key, None)
            return
        if job.new < mark:  # another process scored some meanwhile
            job.new = mark
        load, scored = None, None
        for _ in range(2):  # the second time with its sections: the child let it go
            if load is None and worker.at.get(job.key) != mark:
                load = await self._load(job)
                if load is None:  # the stream was deleted meanwhile
                    return
            try:
                scored = await worker.catch_up(job.key, config, mark, job.points,
                                               job.first, job.live, load)
                break
            except KeyError:
                worker.at.pop(job.key, None)
        if scored is None:
            return
        async with streams.lock(job.stream):
            if await self._mark(job) != mark:  # changed meanwhile: not ours to write
                return  # (the child's engine is ahead of the store: loaded afresh next time)
            version = await self.backend.commit(Commit(job.stream, sections=scored.changed,
                                                       drop=scored.drop))
            self.scorers.bumped(job.stream, version)
        worker.at[job.key] = self.marks[job.key] = scored.mark
        newest = self.offered.get(job.key, scored.mark)
        self._record(job.stream, config, scored, newest)

    async def _load(self, job: Job) -> tuple[StreamMeta, dict[str, bytes]] | None:
        """What the child builds the shadow's engine from: the stream's meta and the
        shadow's sections (None: the stream is gone)."""
        meta = await self.backend.streams.get(job.stream)
        if meta is None:
            return None
        _, parts = split(await self.backend.streams.sections(job.stream))
        return meta, parts.get(job.config.name, {})

    async def _mark(self, job: Job) -> int | None:
        """The shadow's mark as stored, if it is still the job's shadow."""
        names = [section(job.config.name, "cfg"), section(job.config.name, "run")]
        head = await self.backend.streams.sections(job.stream, names)
        if names[0] not in head:
            return None
        parts = stream_state.decode(head)
        if ShadowConfig.decode(parts[names[0]]).id != job.config.id:
            return None
        return Run.decode(parts.get(names[1], {}), job.config.start).mark

    def _record(self, stream: str, config: ShadowConfig, scored: Scored, newest: int) -> None:
        m, caught = self.metrics, scored.caught
        kind = "costly" if config.costly else "cheap"
        observe_all(m.shadow_lag_seconds.labels(kind), caught.lag_seconds)
        m.shadow_points_skipped_total.inc(caught.skipped)
        c = scored.counters
        either = c["alerted_either_seconds"]
        self.series.shadow(stream, config.name, caught.alerts_opened,
                           c["alerted_both_seconds"] / either if either else None,
                           max(newest - scored.mark, 0))
