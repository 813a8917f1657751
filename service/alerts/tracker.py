"""The alert lifecycle of one stream, point by point.

* **open**: the point is anomalous and either k of the last m scored points are
  anomalous, or the point alone is critical (score >= critical_ratio x threshold);
* **update**: while open, every point counts; anomalous points raise the peak, extend the
  duration and add their leading channel; an event (``alert.updated``) is emitted only
  when the severity escalates or a new channel joins, so a long incident is a handful of
  events, not one per point;
* **resolve**: after ``quiet_points`` normal points in a row or ``quiet_seconds`` of
  stream time without anomalies (whichever is configured and comes first);
* **cooldown**: an incident that starts within ``cooldown_seconds`` of the last
  resolution reopens that alert (same id, ``reopened`` + 1, ``alert.updated``) instead
  of opening a new one: a flapping signal is one alert.

The tracker's state (the k-of-m ring, the open and the last resolved alert, the normal
statistics) is part of the stream's state (its ``alr`` sections: the ring and counters,
which move with every point, apart from ``alr/alerts`` and ``alr/normal``, which move
with an alert and once a chunk), saved under the stream lock together with the alert
records and their events, so replicas continue it exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from service.alerts.evidence import NormalStats, build_evidence
from service.alerts.model import SEVERITIES, Alert, alert_id, make_event, severity_of

MAX_CHANNELS_LISTED = 32


@dataclass(frozen=True)
class AlertRules:
    k: int = 1
    m: int = 1
    critical_ratio: float = 2.0
    quiet_points: int = 12
    quiet_seconds: float = 0.0
    cooldown_seconds: float = 3600.0
    top_channels: int = 3
    prompt_strategy: str = "all"


class AlertTracker:
    def __init__(self, stream: str, channel_names: list[str], rules: AlertRules,
                 incarnation: str = "") -> None:
        self.stream = stream
        self.incarnation = incarnation  # of the stream: goes into its alerts' event ids
        self.names = channel_names
        self.rules = rules
        self.normal = NormalStats(len(channel_names))
        self._ring = np.zeros(rules.m, bool)
        self._seen = 0  # scored points observed (ring index = seen % m)
        self.quiet = 0  # normal points since the open alert's last anomaly
        self.open: Alert | None = None
        self.last_resolved: Alert | None = None
        self.changed: dict[str, Alert] = {}  # alerts to persist after this batch
        self.events: list[dict] = []  # to deliver after this batch
        self._records: np.ndarray | None = None  # the open and last alert, as state

    # --- per chunk -------------------------------------------------------------------
    def observe(self, timestamps: np.ndarray, scores: np.ndarray, thresholds: np.ndarray,
                anomalous: np.ndarray, channel_scores: np.ndarray,
                windows: np.ndarray, precedents: Mapping[int, Sequence] | None = None,
                closes_chunk: np.ndarray | None = None) -> None:
        """Scored points of one chunk: timestamps/scores/thresholds/anomalous (B,),
        channel_scores (B, C), windows (B, W, C); precedents: point -> its nearest normal
        windows; closes_chunk (B,): the chunk's last scored point, whose window, when
        normal, updates the normal statistics (None: the last normal point's does)."""
        precedents = precedents or {}
        start = 0
        if self.open is None:  # normal points before the first anomaly only fill the ring
            anomalies = np.flatnonzero(anomalous)
            start = int(anomalies[0]) if len(anomalies) else len(scores)
            self._ring[(self._seen + np.arange(start)) % self.rules.m] = False
            self._seen += start
        if start < len(scores):  # an alert is open, or may open: its record moves
            self._records = None
        for i in range(start, len(scores)):
            self._point(float(timestamps[i]), float(scores[i]), float(thresholds[i]),
                        bool(anomalous[i]), channel_scores[i], windows[i], precedents.get(i))
        if closes_chunk is None:
            closes_chunk = np.zeros(len(scores), bool)
            closes_chunk[-1:] = True
        # once a chunk, whatever the batching: one window in a chunk of overlapping ones
        # loses little, and keeps the statistics off the per-point path
        normal = np.flatnonzero(closes_chunk & ~anomalous)
        if len(normal):
            self.normal.update(windows[normal[-1]])

    def drain(self) -> tuple[list[Alert], list[dict]]:
        alerts, events = list(self.changed.values()), self.events
        self.changed, self.events = {}, []
        return alerts, events

    # --- per point -------------------------------------------------------------------
    def _point(self, ts: float, score: float, threshold: float, anomalous: bool,
               cs: np.ndarray, window: np.ndarray, prec: Sequence | None = None) -> None:
        r = self.rules
        self._ring[self._seen % r.m] = anomalous
        self._seen += 1
        ratio = score / threshold if threshold > 0 else math.inf
        alert = self.open
        if alert is not None:
            alert.points += 1
            alert.updated_at = ts
            self.changed[alert.id] = alert
            if anomalous:
                self._grow(alert, ts, score, threshold, ratio, cs, window, prec)
            else:
                self.quiet += 1
                quiet_seconds = ts - alert.last_anomaly_at
                if (r.quiet_points and self.quiet >= r.quiet_points) or (
                        r.quiet_seconds and quiet_seconds >= r.quiet_seconds):
                    self._resolve(alert, ts)
            return
        if not anomalous:
            return
        if int(self._ring.sum()) < r.k and ratio < r.critical_ratio:
            return
        last = self.last_resolved
        if last is not None and ts - (last.resolved_at or ts) <= r.cooldown_seconds:
            last.state, last.resolved_at, last.updated_at = "open", None, ts
            last.reopened += 1
            self.open, self.last_resolved, self.quiet = last, None, 0
            self._grow(last, ts, score, threshold, ratio, cs, window, prec,
                       force_event="reopened")
            return
        name = self._leader(cs)
        alert = Alert(
            id=alert_id(self.stream, ts, self.incarnation), stream=self.stream, state="open",
            severity=severity_of(ratio, r.critical_ratio), opened_at=ts, updated_at=ts,
            last_anomaly_at=ts, peak_score=score, peak_at=ts, threshold=threshold,
            peak_ratio=_round(ratio), anomalous_points=int(self._ring.sum()), points=1,
            channels=[name], incarnation=self.incarnation)
        alert.evidence = self._evidence(ts, score, threshold, cs, window, prec)
        self.open, self.quiet = alert, 0
        self._emit("alert.opened", alert, "k-of-m" if ratio < r.critical_ratio else "critical")

    def _grow(self, alert: Alert, ts: float, score: float, threshold: float, ratio: float,
              cs: np.ndarray, window: np.ndarray, prec: Sequence | None = None,
              force_event: str | None = None) -> None:
        self.quiet = 0
        alert.anomalous_points += 1
        alert.last_anomaly_at = ts
        reasons = [force_event] if force_event else []
        if score > alert.peak_score or force_event:
            alert.peak_score, alert.peak_at, alert.threshold = score, ts, threshold
            alert.peak_ratio = _round(ratio)
            alert.evidence = self._evidence(ts, score, threshold, cs, window, prec)
        severity = severity_of(ratio, self.rules.critical_ratio)
        if SEVERITIES.index(severity) > SEVERITIES.index(alert.severity):
            alert.severity = severity
            reasons.append("escalated")
        name = self._leader(cs)
        if name not in alert.channels and len(alert.channels) < MAX_CHANNELS_LISTED:
            alert.channels.append(name)
            reasons.append("new channel")
        self.changed[alert.id] = alert
        if reasons:
            self._emit("alert.updated", alert, ", ".join(reasons))

    def _resolve(self, alert: Alert, ts: float) -> None:
        alert.state, alert.resolved_at = "resolved", ts
        self.open, self.last_resolved = None, alert
        self._emit("alert.resolved", alert, "quiet")

    def _emit(self, kind: str, alert: Alert, reason: str) -> None:
        alert.version += 1
        self.changed[alert.id] = alert
        self.events.append(make_event(kind, alert, reason))

    def _leader(self, cs: np.ndarray) -> str:
        return self.names[int(np.argmax(cs))]

    def _evidence(self, ts: float, score: float, threshold: float, cs: np.ndarray,
                  window: np.ndarray, prec: Sequence | None = None) -> dict:
        """What the alert shows; ``prec``: the point's nearest normal precedents."""
        evidence = build_evidence(window, cs, self.names, self.normal, at=ts, score=score,
                                  threshold=threshold, top=self.rules.top_channels,
                                  strategy=self.rules.prompt_strategy)
        if prec:
            evidence["precedents"] = [asdict(p) for p in prec]
        return evidence

    # --- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        if self._records is None:
            alerts = {"open": _plain(self.open) if self.open else None,
                      "last": _plain(self.last_resolved) if self.last_resolved else None}
            self._records = np.frombuffer(json.dumps(alerts).encode(), dtype=np.uint8)
        state = {"ring": self._ring.astype(np.uint8),
                 "counters": np.array([self._seen, self.quiet]),
                 "alerts/records": self._records}
        return state | {f"normal/{k}": v for k, v in self.normal.state_dict().items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "ring" not in state:
            return
        if len(state["ring"]) == self.rules.m:  # a changed m starts a fresh ring
            self._ring = state["ring"].astype(bool)
            self._seen = int(state["counters"][0])
        self.quiet = int(state["counters"][1])
        # "alerts" and "normal.*": the keys of state written before alr had sections
        records = state["alerts/records"] if "alerts/records" in state else state["alerts"]
        alerts = json.loads(records.tobytes().decode())
        self.open = Alert.from_dict(alerts["open"]) if alerts["open"] else None
        self.last_resolved = Alert.from_dict(alerts["last"]) if alerts["last"] else None
        self._records = None
        self.normal.load_state_dict({k[7:]: v for k, v in state.items()
                                     if k.startswith(("normal/", "normal."))})


def _plain(alert: Alert) -> dict:
    """``Alert.to_dict`` without its deep copy: the record as JSON writes it."""
    return {f.name: getattr(alert, f.name) for f in fields(alert)} | {
        "duration_seconds": alert.duration_seconds}


def _round(x: float) -> float:
    return round(x, 4) if math.isfinite(x) else 1e9
