"""/streams/{id}/shadows: start (PUT), list and describe (GET), stop (DELETE) a stream's
shadow detectors, compare one with the live detector (report, scores) and promote it.

Every change runs under the stream's lock, on a stream whose stored points are all
scored (what a crash left is scored first), and is one commit; then the stream's cached
scorer is dropped, so its next request sees the change.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import replace

from service import stream_state
from service.alerts.events import record_events
from service.alerts.query import AlertQuery
from service.artifacts import artifact_name
from service.errors import Conflict, InvalidInput, LimitReached, NotFound
from service.feedback.labels import FeedbackSet
from service.metrics import ServiceMetrics, StreamSeries
from service.schemas import StreamConfigIn, StreamOut
from service.scorers import ScorerCache
from service.scoring import StreamScorer
from service.settings import Settings
from service.shadows import report as rep
from service.shadows.config import (
    LOG_BLOCK,
    REGISTRY,
    ShadowConfig,
    decode_json,
    log_sections,
    section,
    split,
)
from service.shadows.engine import Run, ShadowEngine
from service.shadows.handover import switch
from service.shadows.log import COMPARED, Columns, LiveResults
from service.shadows.queue import ShadowQueue
from service.shadows.schemas import (
    PromotedOut,
    ScoresOut,
    ShadowIn,
    ShadowList,
    ShadowOut,
    ShadowReport,
)
from service.shadows.stream import StreamShadows
from service.stores.base import Backend, Commit, StreamMeta, retained
from service.streams import StreamAdmin, not_found
from service.transaction import ScoreTransaction
from service.validation import stream_meta

log = logging.getLogger("tsad.shadows")


class ShadowService:
    def __init__(self, backend: Backend, settings: Settings, metrics: ServiceMetrics,
                 series: StreamSeries, scorers: ScorerCache, queue: ShadowQueue,
                 transaction: ScoreTransaction, streams: StreamAdmin) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.series = series
        self.scorers = scorers
        self.queue = queue
        self.transaction = transaction
        self.streams = streams

    # --- PUT / DELETE --------------------------------------------------------------------
    async def put(self, stream: str, name: str, body: ShadowIn) -> tuple[ShadowOut, bool]:
        """Start a shadow (or replace one of another binding); (it, created)."""
        s = self.settings
        meta = await self._meta(stream)
        binding = await self._binding(meta, body)
        await self.transaction.recover(stream)  # scored up to the last stored point
        async with self.backend.streams.lock(stream):
            meta = await self._meta(stream)
            stored = await self.backend.streams.sections(stream)
            shadows = StreamShadows.load(meta, s, stored)
            old = shadows.configs.get(name)
            if old is not None and old.binding() == binding:
                return self._out(stream, old, self._run(stored, old), meta), False
            others = len(shadows.configs) - (old is not None)
            if others >= s.shadows_max_per_stream:
                raise LimitReached(("path", "name"), f"at most {s.shadows_max_per_stream} "
                                   "shadows per stream (TSAD_SHADOWS_MAX_PER_STREAM): delete "
                                   "one first")
            config = ShadowConfig(name, **binding, start=meta.points_seen)
            held = await self.backend.streams.window(stream, last=retained(meta.window))
            engine = await asyncio.to_thread(self._start, config, meta, held)
            changed, _ = engine.to_commit()
            drop = tuple(k for k in stored if k.startswith(section(name, "")) and
                         k not in changed)
            shadows.configs[name] = engine.config
            changed[REGISTRY] = stream_state.encode(shadows.registry())
            await self.backend.commit(Commit(stream, sections=changed, drop=drop))
            self._changed(stream, old)
        log.info("shadow started", extra={"stream": stream, "shadow": name,
                                          "detector": config.detector})
        return self._out(stream, engine.config, engine.run, meta), old is None

    async def _binding(self, meta: StreamMeta, body: ShadowIn) -> dict:
        """The shadow's binding, checked as PUT /streams/{id} checks a stream's."""
        artifact = None
        if artifact_name(body.detector) is not None:
            artifact = await asyncio.to_thread(self.streams.artifact, body.detector)
        cfg = StreamConfigIn(channels=meta.channels, detector=body.detector,
                             params=body.params, threshold=body.threshold,
                             alert_budget_per_day=body.alert_budget_per_day)
        try:
            checked = stream_meta(meta.stream, cfg, self.settings, artifact)
        except InvalidInput as exc:
            if exc.loc in (("body", "window"), ("body", "channels")):  # the stream's
                raise InvalidInput(("body", "detector"), exc.message) from None
            raise
        if checked.window != meta.window:
            raise InvalidInput(("body", "detector"), f"{body.detector!r} scores windows of "
                               f"{checked.window} points; the stream's are {meta.window}")
        return ShadowConfig("-", checked.detector, checked.params, checked.threshold,
                            checked.alert_budget_per_day).binding()

    def _start(self, config: ShadowConfig, meta: StreamMeta, held) -> ShadowEngine:  # noqa: ANN001
        """A new engine, warmed up on the points the stream holds (a worker thread)."""
        engine = ShadowEngine.create(config, meta, self.settings)
        costly = engine.scorer.detector.costly
        if costly and not self.settings.shadows_allow_costly:
            raise InvalidInput(("body", "detector"), f"{config.detector!r} runs a language "
                               "model or torch per window: costly shadows need "
                               "TSAD_SHADOWS_ALLOW_COSTLY=true")
        engine.config = replace(config, costly=costly)
        engine.warm_up(held, meta.points_seen - len(held))
        return engine

    async def delete(self, stream: str, name: str) -> None:
        async with self.backend.streams.lock(stream):
            meta = await self._meta(stream)
            stored = await self.backend.streams.sections(stream)
            shadows = StreamShadows.load(meta, self.settings, stored)
            config = self._config(shadows, stream, name)
            del shadows.configs[name]
            drop = tuple(k for k in stored if k.startswith(section(name, "")))
            registry = {REGISTRY: stream_state.encode(shadows.registry())}
            await self.backend.commit(Commit(stream, sections=registry, drop=drop))
            self._changed(stream, config)
        self.series.forget_shadow(stream, name)
        log.info("shadow deleted", extra={"stream": stream, "shadow": name})

    def _changed(self, stream: str, gone: ShadowConfig | None) -> None:
        self.scorers.evict(stream)  # its next request loads the shadows as they are now
        if gone is not None:
            self.queue.forget(stream, gone.id)

    # --- GET -----------------------------------------------------------------------------
    async def list(self, stream: str) -> ShadowList:
        meta = await self._meta(stream)
        names = await self._names(stream)
        wanted = [section(n, p) for n in names for p in ("cfg", "run")]
        stored = await self.backend.streams.sections(stream, wanted)
        out = []
        for name in names:
            if section(name, "cfg") in stored:
                config = _config(stored, name)
                out.append(self._out(stream, config, self._run(stored, config), meta))
        return ShadowList(stream=stream, shadows=out)

    async def get(self, stream: str, name: str) -> ShadowOut:
        meta = await self._meta(stream)
        stored = await self.backend.streams.sections(
            stream, [section(name, "cfg"), section(name, "run")])
        if section(name, "cfg") not in stored:
            raise NotFound(f"stream {stream!r} has no shadow {name!r}")
        config = _config(stored, name)
        return self._out(stream, config, self._run(stored, config), meta)

    async def report(self, stream: str, name: str) -> ShadowReport:
        meta = await self._meta(stream)
        config, run, alerts, logged = await self._read(stream, name)
        fb = await self.backend.streams.sections(stream, ["fb"])
        ranges = FeedbackSet.from_state(stream_state.decode(fb).get("fb", {}), meta.window,
                                        meta.channels).ranges
        since, until = (float(logged["ts"][0]), float(logged["ts"][-1])) if len(logged) else (
            None, None)
        live_alerts = await self._live_alerts(stream, since, until)
        sides = {"live": live_alerts, "shadow": alerts}
        covered = ranges[(ranges[:, 2] >= (since or 0)) & (ranges[:, 1] <= (until or 0))] \
            if len(logged) else ranges[:0]
        incidents, nab = rep.incidents(logged, covered, sides)
        c = run.counters
        out = {}
        for side, detector in (("live", meta.detector), ("shadow", config.detector)):
            shown = rep.overlapping(sides[side], since, until) if since is not None else []
            seconds, points = ((c["live_seconds"], c["live_costed"]) if side == "live" else
                               (c["shadow_seconds"], c["points"]))
            out[side] = {
                "detector": detector, "points_scored": int(c[f"{side}_scored"]),
                "anomalies": int(c[f"{side}_anomalies"]),
                "alerts_opened": int(c["alerts_opened"]) if side == "shadow" else sum(
                    a["opened_at"] >= since for a in shown),
                "alerts": [rep.alert_summary(a) for a in shown][-200:],
                "cost_ms_per_point": round(1e3 * seconds / points, 4) if points else None,
                "nab_score": nab[side], **rep.side_scores(logged, covered, side)}
        return ShadowReport(
            stream=stream, config=self._out(stream, config, run, meta), since=since,
            until=until, points=int(c["points"]), logged_points=len(logged),
            agreement=rep.agreement(c), score_rank_correlation=rep.rank_correlation(logged),
            labelled_ranges=len(covered), live=out["live"], shadow=out["shadow"],
            incidents=incidents)

    async def scores(self, stream: str, name: str, limit: int) -> ScoresOut:
        await self._meta(stream)
        _, _, _, logged = await self._read(stream, name)
        logged = logged.rows(max(0, len(logged) - limit), len(logged))

        def floats(col: str, on: str) -> list[float | None]:
            return [float(x) if ok else None for x, ok in zip(
                logged[col].tolist(), (logged[on] == 1).tolist(), strict=True)]

        return ScoresOut(
            stream=stream, shadow=name, timestamps=logged["ts"].tolist(),
            live_scores=floats("live_score", "live_scored"),
            shadow_scores=floats("shadow_score", "shadow_scored"),
            live_anomalies=(logged["live_anomaly"] == 1).tolist(),
            shadow_anomalies=(logged["shadow_anomaly"] == 1).tolist(),
            live_alerted=(logged["live_alerted"] == 1).tolist(),
            shadow_alerted=(logged["shadow_alerted"] == 1).tolist())

    async def _read(self, stream: str, name: str
                    ) -> tuple[ShadowConfig, Run, list[dict], Columns]:
        """The shadow's binding, run, alerts and comparison log (one read for the first
        three, one for the log's blocks)."""
        parts = ["cfg", "run", "alerts"]
        stored = await self.backend.streams.sections(stream, [section(name, p) for p in parts])
        if section(name, "cfg") not in stored:
            raise NotFound(f"stream {stream!r} has no shadow {name!r}")
        config = _config(stored, name)
        decoded = stream_state.decode(stored)
        run = Run.decode(decoded.get(section(name, "run"), {}), config.start)
        alerts = list(decode_json(decoded.get(section(name, "alerts"), {}), []))
        names = [n for k in range(run.log_first, run.mark // LOG_BLOCK + 1)
                 for n in log_sections(name, k)]
        blocks = await self.backend.streams.sections(stream, names)
        logged = Columns.join([Columns.decode(stream_state.decode({n: blocks[n]})[n], COMPARED)
                               for n in names if n in blocks], COMPARED)
        return config, run, alerts, logged

    async def _live_alerts(self, stream: str, since: float | None,
                           until: float | None) -> list[dict]:
        if since is None:
            return []
        found, _ = await self.backend.alerts.list(AlertQuery(stream=stream, until=until,
                                                             limit=500))
        return sorted(rep.overlapping(found, since, until), key=lambda a: a["opened_at"])

    # --- promotion -----------------------------------------------------------------------
    async def promote(self, stream: str, name: str, demote_as: str | None) -> PromotedOut:
        s, streams = self.settings, self.backend.streams
        await self._meta(stream)
        head = await streams.sections(stream, [section(name, "cfg")])
        if head:  # its queued points first (an unknown name is a 404 below)
            await self.queue.settle(stream, _config(head, name).id)
        await self.transaction.recover(stream)
        async with streams.lock(stream):
            meta = await self._meta(stream)
            if meta.points_scored is not None and meta.points_scored < meta.points_seen:
                raise Conflict(None, "points a crash left are being scored: retry")
            stored = await streams.sections(stream)
            shadows = StreamShadows.load(meta, s, stored)
            config = self._config(shadows, stream, name)
            if demote_as is not None and demote_as != name and demote_as in shadows.configs:
                raise Conflict(("body", "demote_as"), f"stream {stream!r} already has a "
                               f"shadow {demote_as!r}: name another, or delete it first")
            _, parts = split(stored)
            engine = await asyncio.to_thread(ShadowEngine.load, config, meta, s, parts[name])
            lag = meta.points_seen - engine.run.mark
            held = await streams.window(stream, last=lag + retained(meta.window))
            live_sections, _ = split(stored)
            live_sections.pop(REGISTRY, None)
            done = await asyncio.to_thread(self._switch, meta, live_sections, engine, held,
                                           shadows.recent, demote_as, stored)
            del shadows.configs[name]
            if done.demoted is not None:
                shadows.configs[done.demoted.config.name] = done.demoted.config
            done.sections[REGISTRY] = stream_state.encode(shadows.registry())
            self._fault("before-commit")
            await self.backend.commit(Commit(
                stream, sections=done.sections, drop=done.drop, binding=done.binding,
                alerts=done.alerts, events=done.events))
            self._fault("after-commit")
            self._changed(stream, config)
        record_events(done.events, self.metrics, self.series)
        self.series.forget_shadow(stream, name)
        log.info("shadow promoted", extra={"stream": stream, "shadow": name,
                                           "detector": config.detector,
                                           "demoted_as": demote_as})
        now = replace(meta, **done.binding)
        demoted = done.demoted
        return PromotedOut(
            stream=StreamOut(**now.to_dict()), open_alert=done.open_alert,
            demoted=self._out(stream, demoted.config, demoted.run, now) if demoted else None,
            events=[e["id"] for e in done.events])

    def _switch(self, meta: StreamMeta, live_sections: dict[str, bytes],
                engine: ShadowEngine, held, recent: LiveResults,  # noqa: ANN001
                demote_as: str | None, stored: dict[str, bytes]):  # noqa: ANN202
        """In a worker thread: the shadow caught up, the live scorer loaded, the switch."""
        engine.catch_up(held, meta.points_seen - len(held), recent)
        live = StreamScorer.from_sections(meta, self.settings, live_sections)
        demoted = None
        if demote_as is not None:
            demoted = ShadowConfig(demote_as, meta.detector, meta.params, meta.threshold,
                                   meta.alert_budget_per_day, costly=live.detector.costly,
                                   start=meta.points_seen)
            if demoted.costly and not self.settings.shadows_allow_costly:
                raise InvalidInput(("body", "demote_as"), f"the live detector "
                                   f"{meta.detector!r} is costly: it can stay as a shadow "
                                   "only with TSAD_SHADOWS_ALLOW_COSTLY=true (or send "
                                   "demote_as: null to drop it)")
        prefix = section(engine.config.name, "")
        return switch(live, set(live_sections), engine,
                      {k for k in stored if k.startswith(prefix)}, demoted, self.settings)

    def _fault(self, where: str) -> None:
        """TSAD_FAULT_KILL_IN_PROMOTION (tests only): a real kill -9, at that instant."""
        if self.settings.fault_kill_in_promotion == where:
            log.critical("fault injection: SIGKILL in a promotion", extra={"at": where})
            os.kill(os.getpid(), signal.SIGKILL)

    # --- helpers -------------------------------------------------------------------------
    async def _meta(self, stream: str) -> StreamMeta:
        meta = await self.backend.streams.get(stream)
        if meta is None:
            raise not_found(stream)
        return meta

    async def _names(self, stream: str) -> list[str]:
        stored = await self.backend.streams.sections(stream, [REGISTRY])
        if REGISTRY not in stored:
            return []
        return sorted(decode_json(stream_state.decode(stored)[REGISTRY], {}))

    @staticmethod
    def _config(shadows: StreamShadows, stream: str, name: str) -> ShadowConfig:
        if name not in shadows.configs:
            raise NotFound(f"stream {stream!r} has no shadow {name!r}")
        return shadows.configs[name]

    @staticmethod
    def _run(stored: dict[str, bytes], config: ShadowConfig) -> Run:
        blob = stored.get(section(config.name, "run"))
        arrays = stream_state.decode({"run": blob})["run"] if blob else {}
        return Run.decode(arrays, config.start)

    @staticmethod
    def _out(stream: str, config: ShadowConfig, run: Run, meta: StreamMeta) -> ShadowOut:
        return ShadowOut(
            stream=stream, name=config.name, detector=config.detector, params=config.params,
            threshold=config.threshold, alert_budget_per_day=config.alert_budget_per_day,
            costly=config.costly, created_at=config.created_at,
            start=config.start, points=int(run.counters["points"]),
            lag_points=max(meta.points_seen - run.mark, 0),
            skipped_points=int(run.counters["skipped"]))


def _config(stored: dict[str, bytes], name: str) -> ShadowConfig:
    key = section(name, "cfg")
    return ShadowConfig.decode(stream_state.decode({key: stored[key]})[key])
