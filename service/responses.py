"""A scored batch as /score answers it (``ScoreResponse``'s shape, as plain dicts and
lists: no model object per point), from the append's actions and the scorer's columns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from service.scoring import Results
from service.stores.base import AppendResult


def score_response(stream: str, appended: AppendResult, results: Results | None,
                   sent: Sequence[float | datetime],
                   points_until_scored: int | None) -> dict[str, Any]:
    """One result per point sent (``sent``: their timestamps as sent, echoed), in order.
    ``results`` has a row per point scored: those a crash left unscored (a retried point
    among them is answered with its result now), then the batch's stored points."""
    rows = _Rows(results)
    recovered = _recovered_rows(appended)
    fresh = iter(range(appended.unscored, appended.to_score))  # one per stored point
    out = []
    for ts, action, stamp in zip(sent, appended.actions, appended.stamps, strict=True):
        row = (recovered.get(stamp) if action == "duplicate"
               else None if action == "dropped" else next(fresh))
        out.append(_result(ts, action, stamp, rows, row))
    return {"stream": stream, "results": out, "points_until_scored": points_until_scored}


def recovered_response(stream: str, pending: dict[str, list], appended: AppendResult,
                       results: Results,
                       points_until_scored: int | None) -> dict[str, Any] | None:
    """The answer a batch sent with an Idempotency-Key would have had, had its process
    not died before its commit: its append's decisions (``pending``: the points' ``sent``
    stamps, ``actions`` and ``stamps``, as its pending receipt kept them) with the results
    of its stored points, scored now among the points the crash left unscored. None when
    some of them were not among those (skipped, or scored earlier)."""
    rows = _Rows(results)
    recovered = _recovered_rows(appended)
    out = []
    for ts, action, stamp in zip(pending["sent"], pending["actions"], pending["stamps"],
                                 strict=True):
        row = None if action == "dropped" else recovered.get(stamp)
        if row is None and action in ("stored", "nudged"):
            return None
        out.append(_result(ts, action, stamp, rows, row))
    return {"stream": stream, "results": out, "points_until_scored": points_until_scored}


def _recovered_rows(appended: AppendResult) -> dict[float, int]:
    """Stored stamp -> row of ``results``, for the points a crash had left unscored."""
    to_score = appended.points[len(appended.points) - appended.to_score:, 0]
    return dict(zip(to_score[:appended.unscored].tolist(), range(appended.unscored),
                    strict=True))


def _result(ts: float | datetime | str, action: str, stamp: float | None, rows: _Rows,
            row: int | None) -> dict[str, Any]:
    """One point's result: its scorer row's, or (no row: dropped, or a retried point whose
    result is not at hand) its action as status."""
    if row is None:
        point = {"score": None, "likelihood": None, "anomaly": False, "threshold": None,
                 "status": action, "top_channels": None, "precedents": None}
    else:
        point = rows.point(row)
    return {"timestamp": ts, **point,
            "timestamp_action": action if action in ("nudged", "dropped") else None,
            "stored_timestamp": stamp}


class _Rows:
    """The scorer's columns as Python values, converted once."""

    def __init__(self, results: Results | None) -> None:
        self.results = results
        if results is not None:
            self.scored = results.scored.tolist()
            self.scores = results.scores.tolist()
            self.likelihood = results.likelihood.tolist()
            self.thresholds = results.thresholds.tolist()
            self.anomalous = results.anomalous.tolist()

    def point(self, k: int) -> dict[str, Any]:
        if self.results is None or not self.scored[k]:
            return {"score": None, "likelihood": None, "anomaly": False, "threshold": None,
                    "status": "warming_up", "top_channels": None, "precedents": None}
        lik, thr = self.likelihood[k], self.thresholds[k]
        explained = self.results.explained.get(k)
        return {
            "score": self.scores[k], "likelihood": None if lik != lik else lik,  # NaN: none
            "anomaly": bool(self.anomalous[k]), "threshold": None if thr != thr else thr,
            "status": "scored",
            "top_channels": [{"channel": c.channel, "share": c.share}
                             for c in explained.top_channels] if explained else None,
            "precedents": [asdict(p) for p in explained.precedents]
            if explained and explained.precedents else None}
