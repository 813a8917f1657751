"""One shadow detector of a stream: a ``StreamScorer`` of its own (detector, threshold,
likelihood, alert tracker, built from its binding exactly as a live stream's would be),
the next point it scores (its mark), its counters, its alert records and its comparison
log with the live detector. Its alerts get ids of their own (the tracker's scope is the
shadow's name) and its events are never delivered: they only count."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from service import stream_state
from service.scoring import StreamScorer
from service.settings import Settings
from service.shadows.config import (
    LOG_BLOCK,
    LOG_SLICE,
    OWN_PARTS,
    ShadowConfig,
    decode_json,
    encode_json,
    log_part,
    log_sections,
    section,
)
from service.shadows.log import COMPARED, Columns, LiveResults, alerted, compared
from service.stores.base import StreamMeta

MAX_ALERTS = 200  # alert records a shadow keeps for its report, newest
# run counters, in this order in the ``run`` section
COUNTERS = ("points", "live_scored", "shadow_scored", "live_anomalies", "shadow_anomalies",
            "live_seconds", "live_costed", "shadow_seconds", "skipped", "alerts_opened",
            "alerted_both_seconds", "alerted_either_seconds", "last_ts")
# the detector's sections a shadow does not keep: feedback is the stream's
NOT_OWN = ("fb",)


@dataclass
class Run:
    """Where a shadow is: the next stream index it scores, the oldest log block kept, and
    what it has counted since it started."""

    mark: int
    log_first: int
    counters: dict[str, float]

    @classmethod
    def start(cls, index: int) -> Run:
        return cls(index, index // LOG_BLOCK, dict.fromkeys(COUNTERS, 0.0) | {"last_ts": np.nan})

    def encode(self) -> dict[str, np.ndarray]:
        return {"mark": np.array([self.mark, self.log_first], np.int64),
                "counters": np.array([self.counters[k] for k in COUNTERS], np.float64)}

    @classmethod
    def decode(cls, arrays: dict[str, np.ndarray], start: int) -> Run:
        run = cls.start(start)
        if "mark" in arrays:
            run.mark, run.log_first = (int(x) for x in arrays["mark"][:2])
            values = arrays["counters"].tolist()
            run.counters |= dict(zip(COUNTERS, values, strict=False))
        return run


@dataclass
class Caught:
    """What one catch-up did, for the metrics."""

    points: int
    skipped: int
    alerts_opened: int
    lag_seconds: np.ndarray  # per point with live results: from its storing to its score


class ShadowEngine:
    def __init__(self, config: ShadowConfig, scorer: StreamScorer, run: Run,
                 alerts: list[dict], rows: Columns, settings: Settings) -> None:
        """``rows``: the log's rows of the slice the mark is in."""
        self.config = config
        self.scorer = scorer
        self.run = run
        self.alerts = alerts
        self.settings = settings
        self.slices: dict[int, Columns] = {run.mark // LOG_SLICE: rows}  # by index slice
        self.stored: dict[str, bytes] = {}  # the sections as the store holds them
        self.dirty = True

    # --- building ------------------------------------------------------------------------
    @classmethod
    def create(cls, config: ShadowConfig, meta: StreamMeta, settings: Settings) -> ShadowEngine:
        scorer = StreamScorer(config.meta(meta), settings, alert_scope=config.name)
        return cls(config, scorer, Run.start(config.start), [], Columns.empty(COMPARED),
                   settings)

    @classmethod
    def load(cls, config: ShadowConfig, meta: StreamMeta, settings: Settings,
             parts: dict[str, bytes]) -> ShadowEngine:
        """From its sections (names without the prefix); of the log, only the slice the mark
        is in (what the next commit appends to)."""
        own = {k: v for k, v in parts.items()
               if k not in OWN_PARTS and not k.startswith("log/")}
        scorer = StreamScorer.from_sections(config.meta(meta), settings, own,
                                            alert_scope=config.name)
        decoded = {k: stream_state.decode({k: parts[k]})[k] for k in OWN_PARTS if k in parts}
        run = Run.decode(decoded.get("run", {}), config.start)
        current = log_part(run.mark // LOG_SLICE)
        rows = Columns.empty(COMPARED)
        if current in parts:
            rows = Columns.decode(stream_state.decode({current: parts[current]})[current],
                                  COMPARED)
        engine = cls(config, scorer, run, list(decode_json(decoded.get("alerts", {}), [])),
                     rows, settings)
        engine.stored = {section(config.name, k): v for k, v in parts.items()
                         if not k.startswith("log/")}
        if current in parts:
            engine.stored[section(config.name, current)] = parts[current]
        engine.dirty = False
        return engine

    def warm_up(self, held: np.ndarray, first: int) -> None:
        """Learn from the points the stream holds (first: the stream index of the first)
        as if it had scored them: no verdicts recorded, no alerts."""
        if len(held):
            self.scorer.loop.run(held[:, 1:], held[:, 0], len(held), first)
        self.run = Run.start(first + len(held))
        self.slices = {self.run.mark // LOG_SLICE: Columns.empty(COMPARED)}
        self.dirty = True

    # --- scoring -------------------------------------------------------------------------
    def catch_up(self, points: np.ndarray, first: int, live: LiveResults) -> Caught | None:
        """Score the points from the mark to the last of ``points`` (K, 1 + C: the stream's
        points from index ``first`` on, with the context the window needs before the
        mark). Points no longer held are skipped (counted)."""
        end = first + len(points)
        mark = self.run.mark
        if end <= mark:
            return None
        lo = max(mark, first)
        scorer = self.scorer
        scorer.meta = replace(scorer.meta, points_seen=end)
        start = time.perf_counter()
        results = scorer.process(points, end - lo)
        seconds = time.perf_counter() - start
        changed, events = scorer.tracker.drain()
        ts = points[len(points) - (end - lo):, 0]
        rows = compared(live, lo, {"ts": ts, "score": results.scores, "scored": results.scored,
                                   "anomaly": results.anomalous,
                                   "alerted": alerted(ts, changed)})
        opened = sum(e["type"] == "alert.opened" for e in events)
        self._count(rows, live.between(lo, end), seconds, lo - mark, opened)
        self._keep_alerts([a.to_dict() for a in changed])
        self._log(lo, rows)
        self.run.mark = end
        self.dirty = True
        walls = live.between(lo, end)["wall"]
        return Caught(end - lo, lo - mark, opened, time.time() - walls)

    def _count(self, rows: Columns, live: Columns, seconds: float, skipped: int,
               opened: int) -> None:
        c = self.run.counters
        live_on, shadow_on = rows["live_scored"] == 1, rows["shadow_scored"] == 1
        c["points"] += len(rows)
        c["live_scored"] += int(live_on.sum())
        c["shadow_scored"] += int(shadow_on.sum())
        c["live_anomalies"] += int(rows["live_anomaly"].sum())
        c["shadow_anomalies"] += int(rows["shadow_anomaly"].sum())
        c["live_seconds"] += float(live["cost"].sum())
        c["live_costed"] += len(live)
        c["shadow_seconds"] += seconds
        c["skipped"] += skipped
        c["alerts_opened"] += opened
        # alerted time: each point stands for the time since the point before it
        ts = rows["ts"]
        previous = np.concatenate([[c["last_ts"]], ts[:-1]])
        dt = np.nan_to_num(ts - previous, nan=0.0).clip(min=0.0)
        la, sa = rows["live_alerted"] == 1, rows["shadow_alerted"] == 1
        c["alerted_both_seconds"] += float(dt[la & sa].sum())
        c["alerted_either_seconds"] += float(dt[la | sa].sum())
        if len(ts):
            c["last_ts"] = float(ts[-1])

    def _keep_alerts(self, changed: list[dict]) -> None:
        if not changed:
            return
        by_id = {a["id"]: a for a in self.alerts}
        for a in changed:
            by_id[a["id"]] = {k: v for k, v in a.items() if k != "evidence"}
        self.alerts = sorted(by_id.values(), key=lambda a: a["opened_at"])[-MAX_ALERTS:]

    def _log(self, first: int, rows: Columns) -> None:
        """Append rows (stream indices from ``first``) to the log's slices."""
        pos = 0
        while pos < len(rows):
            k = (first + pos) // LOG_SLICE
            take = min(len(rows) - pos, (k + 1) * LOG_SLICE - (first + pos))
            held = self.slices.get(k, Columns.empty(COMPARED))
            self.slices[k] = held.concat(rows.rows(pos, pos + take))
            pos += take

    # --- state ---------------------------------------------------------------------------
    def sections(self) -> dict[str, bytes]:
        """The shadow's sections as they are now (prefixed), but for log slices not in
        memory (written before, unchanged)."""
        name = self.config.name
        parts = {k: v for k, v in self.scorer.sections().items() if k not in NOT_OWN}
        out = {section(name, k): v for k, v in parts.items()}
        out[section(name, "cfg")] = stream_state.encode(self.config.encode())
        out[section(name, "run")] = stream_state.encode(self.run.encode())
        out[section(name, "alerts")] = stream_state.encode(encode_json(self.alerts))
        for k, rows in self.slices.items():
            out[section(name, log_part(k))] = stream_state.encode(rows.data)
        return out

    def to_commit(self) -> tuple[dict[str, bytes], tuple[str, ...]]:
        """(changed sections, sections to drop: log blocks past the kept length and
        sections the state no longer has, such as a threshold's calibration scores once
        fitted); then only the log slice the mark is in stays in memory."""
        if not self.dirty:
            return {}, ()
        name = self.config.name
        keep_from = max(self.run.log_first,
                        (self.run.mark - self.settings.shadow_log_points) // LOG_BLOCK)
        drop = tuple(n for k in range(self.run.log_first, keep_from)
                     for n in log_sections(name, k))
        self.run.log_first = keep_from
        per_block = LOG_BLOCK // LOG_SLICE
        self.slices = {k: r for k, r in self.slices.items() if k // per_block >= keep_from}
        encoded = self.sections()
        changed = stream_state.changed(encoded, self.stored)
        drop += tuple(k for k in self.stored if k not in encoded and "log/" not in k)
        current = self.run.mark // LOG_SLICE
        self.slices = {current: self.slices.get(current, Columns.empty(COMPARED))}
        current_name = section(name, log_part(current))
        self.stored = {k: v for k, v in encoded.items() if "log/" not in k or k == current_name}
        self.dirty = False
        return changed, drop

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.stored.values())
