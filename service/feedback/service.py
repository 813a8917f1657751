"""Feedback on a stream (POST/GET /streams/{id}/feedback): labelled ranges stored as
windows in the stream's state (``fb``), and few-label adaptation of a SPEAR stream's own
soft prompts and head (``ada``), tuned outside the stream's lock. What the labels and
windows are: ``labels.py``."""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from models.detectors.base import Adaptable, aggregate_channels
from service.artifacts import artifact_name, load_artifact
from service.errors import Conflict, InvalidInput, NotFound
from service.feedback.labels import (
    LABELS,
    TARGETS,
    adaptation_info,
    info_dict,
    recent_windows,
    windows_ending_in,
)
from service.feedback.schemas import AdaptationOut, FeedbackOut, FeedbackRangeOut, FeedbackRequest
from service.metrics import ServiceMetrics
from service.schemas import epoch
from service.scoring import StreamScorer
from service.settings import Settings
from service.stores.base import Backend, Commit, StreamMeta
from service.validation import check_feedback, inline_points

log = logging.getLogger("tsad.pipeline")


class FeedbackService:
    def __init__(self, backend: Backend, settings: Settings, metrics: ServiceMetrics) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        # tuning runs the LM forward and backward: one adaptation at a time per process,
        # so feedback cannot starve scoring of CPU
        self._adapt_slot = asyncio.Semaphore(1)

    async def post(self, stream: str, req: FeedbackRequest) -> FeedbackOut:
        """Store labelled ranges (as windows) in the stream's state; with ``adapt``, tune
        the stream's own soft prompts on all its feedback."""
        check_feedback(req, self.settings)
        streams = self.backend.streams
        async with streams.lock(stream):
            meta = await streams.get(stream)
            if meta is None:
                raise NotFound(f"stream {stream!r} not found")
            artifact = None
            if (name := artifact_name(meta.detector)) is not None:
                artifact = await asyncio.to_thread(load_artifact, self.settings.artifacts_dir,
                                                   name)
            if req.adapt and (artifact is None or not artifact.adaptable):
                raise Conflict(("body", "adapt"), f"stream {stream!r} is scored by "
                               f"{meta.detector!r}: only a stream bound to a SPEAR artifact "
                               "('artifact:<name>') can adapt; send adapt: false to store "
                               "the feedback alone")
            held = await streams.window(stream)
            sections = await streams.sections(stream)
            scorer, added = await asyncio.to_thread(self._store, meta, sections, held, req)
            await self._save(stream, scorer)
        for r in req.ranges:
            self.metrics.feedback_ranges_total.labels(r.label).inc()
        log.info("feedback stored", extra={"stream": stream, "ranges": len(req.ranges),
                                           "adapt": req.adapt})
        if req.adapt:
            scorer = await self._adapt(meta, req.steps or self.settings.feedback_steps)
        return self._out(meta, scorer, *added)

    async def get(self, stream: str) -> FeedbackOut:
        meta = await self.backend.streams.get(stream)
        if meta is None:
            raise NotFound(f"stream {stream!r} not found")
        sections = await self.backend.streams.sections(stream, ("fb", "ada"))
        scorer = await asyncio.to_thread(StreamScorer.from_sections, meta, self.settings,
                                         sections)
        return self._out(meta, scorer)

    async def _save(self, stream: str, scorer: StreamScorer) -> None:
        scorer.touch("fb", "ada")  # what feedback changes, scoring never does
        changed, drop, _ = scorer.to_commit()
        await self.backend.commit(Commit(stream, sections=changed, drop=drop))

    def _store(self, meta: StreamMeta, sections: dict[str, bytes], held: np.ndarray,
               req: FeedbackRequest) -> tuple[StreamScorer, tuple[int, int, int]]:
        """Resolve the ranges to labelled windows (InvalidInput naming a range that has
        none when adapting), add negatives, keep all in the state. A worker thread (it may
        score)."""
        s = self.settings
        scorer = StreamScorer.from_sections(meta, s, sections)
        w = meta.window
        ranges, sources = [], [held]
        for i, r in enumerate(req.ranges):
            start, end = epoch(r.start), epoch(r.end)
            points = held
            if r.points is not None:
                points = inline_points(r.points, meta.channels, i, s)
                sources.append(points)
            wins = windows_ending_in(points, start, end, w, s.feedback_windows_per_range)
            # a range of points no longer held still labels the timeline (shadow reports
            # score on it); only adaptation needs its windows
            if not len(wins) and req.adapt:
                where = ("its inline points" if r.points is not None else
                         f"the {len(held)} points the service holds for the stream "
                         + (f"({held[0, 0]!r} to {held[-1, 0]!r})" if len(held) else "")
                         + "; send the range's points and the window - 1 before them as "
                         f"ranges.{i}.points")
                raise InvalidInput(("body", "ranges", i), f"no full window of {w} points "
                                   f"ends in [{start!r}, {end!r}] in {where}")
            ranges.append((start, end, r.label, wins))
        negatives = np.zeros((0, w, meta.channels))
        if scorer.artifact is not None and scorer.artifact.adaptable:
            negatives = self._recent_normal(scorer, sources, ranges)
        scorer.feedback.add(ranges, negatives, s.feedback_max_ranges)
        return scorer, (len(ranges), sum(len(r[3]) for r in ranges), len(negatives))

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

    async def _adapt(self, meta: StreamMeta, steps: int) -> StreamScorer:
        """Tune outside the stream's lock (scoring goes on meanwhile), then install the
        result under the lock if the stream is still bound to the same artifact."""
        stream, streams = meta.stream, self.backend.streams
        async with self._adapt_slot:
            sections = await streams.sections(stream)
            adaptation = await asyncio.to_thread(self._tune, meta, sections, steps)
        async with streams.lock(stream):
            now = await streams.get(stream)
            if now is None or (now.detector, now.window, now.created_at) != (
                    meta.detector, meta.window, meta.created_at):
                raise Conflict(("body", "adapt"), f"stream {stream!r} was deleted or "
                               "rebound while adapting; nothing was installed")
            sections = await streams.sections(stream)
            scorer = await asyncio.to_thread(self._install, now, sections, adaptation)
            await self._save(stream, scorer)
        return scorer

    def _tune(self, meta: StreamMeta, sections: dict[str, bytes],
              steps: int) -> dict[str, np.ndarray]:
        s = self.settings
        scorer = StreamScorer.from_sections(meta, s, sections)
        art, fb = scorer.artifact, scorer.feedback
        assert art is not None and isinstance(art.detector, Adaptable)
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

    def _install(self, meta: StreamMeta, sections: dict[str, bytes],
                 adaptation: dict[str, np.ndarray]) -> StreamScorer:
        scorer = StreamScorer.from_sections(meta, self.settings, sections)
        if not scorer.set_adaptation(adaptation):
            raise Conflict(("body", "adapt"), f"artifact of stream {meta.stream!r} changed "
                           "while adapting; nothing was installed")
        return scorer

    def _out(self, meta: StreamMeta, scorer: StreamScorer, stored: int = 0,
             windows: int = 0, negatives: int = 0) -> FeedbackOut:
        fb = scorer.feedback
        ranges = [FeedbackRangeOut(start=float(r[1]), end=float(r[2]),
                                   label=LABELS[int(r[3])], received_at=float(r[4]),
                                   windows=fb.windows_of(int(r[0]))) for r in fb.ranges]
        ada = scorer.adaptation
        return FeedbackOut(stream=meta.stream, stored=stored, windows=windows,
                           negatives=negatives, ranges=ranges, adapted=ada is not None,
                           adaptation=AdaptationOut(**info_dict(ada["info"])) if ada else None)
