"""The comparison of a shadow with the live detector over the same points: plain
functions of the shadow's counters, its comparison log and the two sides' alerts, and,
where the operator labelled ranges (POST /streams/{id}/feedback), precision, recall,
time to detect and NAB-style early detection on them.

Definitions (the report's fields say the same):

* agreement: the Jaccard index of the two sides' alerted time (a point under an open
  alert stands for the time since the point before it), since the shadow started;
* rank correlation: Spearman's, over the logged points both sides scored;
* labels: a point is labelled by the last range received that holds it (anomaly or
  missed_anomaly: 1; normal or false_positive: 0); unlabelled points count nowhere.
  Precision and recall are point-wise over the logged points both sides scored, without
  point adjustment;
* an incident is a range labelled anomalous: per side, its first flagged point, the time
  from the range's start to it, the first alert overlapping it, and NAB's reward for the
  earliest detection (1 at the range's first point, less further in, -1 when missed);
  the NAB-style score adds them and takes NAB's standard false-positive weight (0.11)
  off per flagged point in a range labelled normal, normalised as NAB does: 0 never
  fires, 100 every incident caught at its first point and no normal point flagged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from models.nab import PROFILES, detection_reward
from service.feedback.labels import LABELS, TARGETS
from service.shadows.log import Columns

SIDES = ("live", "shadow")
NAB = PROFILES["standard"]


def agreement(counters: dict[str, float]) -> float | None:
    """Jaccard index of the alerted time (None while neither side alerted).

    >>> agreement({"alerted_both_seconds": 60.0, "alerted_either_seconds": 240.0})
    0.25
    """
    either = counters["alerted_either_seconds"]
    return round(counters["alerted_both_seconds"] / either, 6) if either else None


def rank_correlation(log: Columns) -> float | None:
    """Spearman's rank correlation of the scores both sides gave (None: too few, or a side
    constant)."""
    both = _both(log) & np.isfinite(log["live_score"]) & np.isfinite(log["shadow_score"])
    if both.sum() < 3:
        return None
    rho = spearmanr(log["live_score"][both], log["shadow_score"][both]).statistic
    return None if not math.isfinite(rho) else round(float(rho), 6)


def point_labels(ts: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Per stamp: 1 anomalous, 0 normal, -1 unlabelled; ranges rows (id, start, end, label
    code, received_at) in the order received (the last one holding a point wins).

    >>> point_labels(np.arange(6.0), np.array([[0, 1, 3, 1, 0], [1, 3, 4, 0, 0]])).tolist()
    [-1, 1, 1, 0, 0, -1]
    """
    out = np.full(len(ts), -1, np.int8)
    for _, start, end, code, _ in ranges:
        out[(ts >= start) & (ts <= end)] = TARGETS[LABELS[int(code)]]
    return out


def side_scores(log: Columns, ranges: np.ndarray, side: str) -> dict[str, Any]:
    """Precision and recall on the labelled points both sides scored."""
    target = point_labels(log["ts"], ranges)
    both = _both(log)
    flagged = log[f"{side}_anomaly"] == 1
    tp = int((flagged & both & (target == 1)).sum())
    fp = int((flagged & both & (target == 0)).sum())
    fn = int((~flagged & both & (target == 1)).sum())
    return {"true_positives": tp, "false_positives": fp, "false_negatives": fn,
            "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn)}


def incidents(log: Columns, ranges: np.ndarray, alerts: dict[str, list[dict]]
              ) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """Each anomalous range the log covers, per side; and each side's NAB-style score."""
    ts = log["ts"]
    target = point_labels(ts, ranges)
    out, rewards = [], {s: 0.0 for s in SIDES}
    for _, start, end, code, _ in ranges:
        label = LABELS[int(code)]
        rows = np.flatnonzero((ts >= start) & (ts <= end))
        if TARGETS[label] != 1 or not len(rows):
            continue
        first, last = int(rows[0]), int(rows[-1])
        item: dict[str, Any] = {"start": float(start), "end": float(end), "label": label}
        for side in SIDES:
            hits = rows[log[f"{side}_anomaly"][rows] == 1]
            reward = (float(detection_reward(first, last, int(hits[0]), NAB)) if len(hits)
                      else -NAB.fn)
            rewards[side] += reward
            detected = float(ts[hits[0]]) if len(hits) else None
            item[side] = {"detected_at": detected,
                          "time_to_detect_seconds": None if detected is None
                          else round(detected - float(start), 3),
                          "nab_reward": round(reward, 6),
                          "alert": _overlapping(alerts[side], float(start), float(end))}
        out.append(item)
    if not out:
        return out, dict.fromkeys(SIDES)
    null, perfect = -NAB.fn * len(out), NAB.tp * len(out)
    scores = {}
    for side in SIDES:
        false = int(((log[f"{side}_anomaly"] == 1) & (target == 0)).sum())
        raw = rewards[side] - NAB.fp * false
        scores[side] = round(100.0 * (raw - null) / (perfect - null), 3)
    return out, scores


def alert_summary(alert: dict) -> dict[str, Any]:
    return {k: alert.get(k) for k in ("id", "state", "severity", "opened_at", "resolved_at",
                                      "peak_score", "peak_at", "anomalous_points")}


def overlapping(alerts: list[dict], start: float, end: float) -> list[dict]:
    """Alerts whose life ([opened_at, resolved_at], or open) overlaps [start, end]."""
    return [a for a in alerts if a["opened_at"] <= end
            and (a.get("resolved_at") is None or a["resolved_at"] >= start)]


def _overlapping(alerts: list[dict], start: float, end: float) -> str | None:
    found = overlapping(alerts, start, end)
    return min(found, key=lambda a: a["opened_at"])["id"] if found else None


def _both(log: Columns) -> np.ndarray:
    return (log["live_scored"] == 1) & (log["shadow_scored"] == 1)


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 6) if b else None
