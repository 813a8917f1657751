"""A scored batch as /score answers it: ``ScoreResponse``'s JSON, written from the
append's actions and the scorer's columns.

No Python object is made per point: each column (timestamps as sent, scores,
likelihoods, thresholds, stored stamps) is serialised once, whole, by pydantic-core's
JSON encoder (in Rust), split into its values' tokens, and the tokens are joined into
the points' objects; only anomalous points, which carry explanations, have their own
small lists. The bytes are those ``to_json`` gives the same response built as dicts (the
same encoder formats every number: ``tests/test_responses.py``). Measured against that,
per batch: ``benchmarks/results/response_cost.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

import numpy as np
from pydantic_core import to_json

from service.scoring import Results
from service.stores.base import AppendResult

_NULL = b"null"
_NOT_SCORED = {status: f'"score":null,"likelihood":null,"anomaly":false,"threshold":null,'
               f'"status":"{status}","top_channels":null,"precedents":null'.encode()
               for status in ("warming_up", "duplicate", "dropped")}
_TIMESTAMP_ACTION = {"nudged": b'"nudged"', "dropped": b'"dropped"'}


def score_body(stream: str, appended: AppendResult, results: Results | None,
               sent: Sequence[float | datetime], points_until_scored: int | None) -> bytes:
    """One result per point sent (``sent``: their timestamps as sent, echoed), in order.
    ``results`` has a row per point scored: those a crash left unscored (a retried point
    among them is answered with its result now), then the batch's stored points."""
    actions = appended.actions
    if appended.accepted == len(actions):  # every point stored (the usual batch)
        rows = np.arange(appended.unscored, appended.unscored + len(actions))
    else:
        recovered = _recovered_rows(appended)
        fresh = iter(range(appended.unscored, appended.to_score))  # one per stored point
        rows = np.fromiter((recovered.get(stamp, -1) if action == "duplicate"
                            else -1 if action == "dropped" else next(fresh)
                            for action, stamp in zip(actions, appended.stamps, strict=True)),
                           np.int64, len(actions))
    return _write(stream, sent, actions, appended.stamps, rows, results, points_until_scored)


def recovered_body(stream: str, pending: dict[str, list], appended: AppendResult,
                   results: Results, points_until_scored: int | None) -> bytes | None:
    """The answer a batch sent with an Idempotency-Key would have had, had its process
    not died before its commit: its append's decisions (``pending``: the points' ``sent``
    stamps, ``actions`` and ``stamps``, as its pending receipt kept them) with the results
    of its stored points, scored now among the points the crash left unscored. None when
    some of them were not among those (skipped, or scored earlier)."""
    recovered = _recovered_rows(appended)
    rows = np.full(len(pending["actions"]), -1, np.int64)
    for i, (action, stamp) in enumerate(zip(pending["actions"], pending["stamps"],
                                            strict=True)):
        row = None if action == "dropped" else recovered.get(stamp)
        if row is None and action in ("stored", "nudged"):
            return None
        rows[i] = -1 if row is None else row
    return _write(stream, pending["sent"], pending["actions"], pending["stamps"], rows,
                  results, points_until_scored)


def _recovered_rows(appended: AppendResult) -> dict[float, int]:
    """Stored stamp -> row of ``results``, for the points a crash had left unscored."""
    to_score = appended.points[len(appended.points) - appended.to_score:, 0]
    return dict(zip(to_score[:appended.unscored].tolist(), range(appended.unscored),
                    strict=True))


def _write(stream: str, sent: Sequence, actions: Sequence[str],
           stamps: Sequence[float | None], rows: np.ndarray, results: Results | None,
           points_until_scored: int | None) -> bytes:
    """The response's bytes: point i is row ``rows[i]`` of ``results`` (-1: none, its
    action is its status; a row not scored: warming up)."""
    n = len(rows)
    scored = np.zeros(n, bool)
    if results is not None:
        has = rows >= 0
        scored[has] = results.scored[rows[has]]
    # each point's fields from score to precedents: constant unless scored
    if scored.all():
        middle = [b""] * n
    else:
        middle = [_NOT_SCORED["warming_up"] if row >= 0 else _NOT_SCORED[action]
                  for row, action in zip(rows.tolist(), actions, strict=True)]
    if scored.any():
        assert results is not None
        at = np.flatnonzero(scored)
        picked = rows[at]
        columns = zip(_tokens(results.scores[picked].tolist()),
                      _tokens(_nan_none(results.likelihood[picked])),
                      results.anomalous[picked].tolist(),
                      _tokens(_nan_none(results.thresholds[picked])), strict=True)
        for i, row, (score, lik, anomaly, threshold) in zip(at.tolist(), picked.tolist(),
                                                            columns, strict=True):
            explained = results.explained.get(row)
            middle[i] = b'"score":%b,"likelihood":%b,"anomaly":%b,"threshold":%b,' \
                b'"status":"scored","top_channels":%b,"precedents":%b' % (
                    score, lik, b"true" if anomaly else b"false", threshold,
                    *_explanation(explained))
    points = b",".join([
        b'{"timestamp":%b,%b,"timestamp_action":%b,"stored_timestamp":%b}' % (
            ts, mid, _TIMESTAMP_ACTION.get(action, _NULL), stamp)
        for ts, mid, action, stamp in zip(_tokens(sent), middle, actions, _tokens(stamps),
                                          strict=True)])
    return b'{"stream":%b,"results":[%b],"points_until_scored":%b}' % (
        to_json(stream), points, to_json(points_until_scored))


def _tokens(values: Sequence[Any]) -> list[bytes]:
    """Each value's JSON, as ``to_json`` writes it inside a list: the list serialised in
    one call and split at its commas (numbers, null, booleans and timestamps hold none;
    anything else is serialised one value at a time)."""
    if not len(values):
        return []
    tokens = to_json(list(values))[1:-1].split(b",")
    if len(tokens) != len(values):  # a comma inside a value: one value at a time
        return [to_json(v) for v in values]
    return tokens


def _nan_none(column: np.ndarray) -> list[float | None]:
    """A float column as values, NaN (none) as None."""
    values = column.tolist()
    if np.isnan(column).any():
        return [None if v != v else v for v in values]
    return values


def _explanation(explained: Any) -> tuple[bytes, bytes]:
    """An anomalous point's top_channels and precedents (null when none)."""
    if not explained:
        return _NULL, _NULL
    channels = to_json([{"channel": c.channel, "share": c.share}
                        for c in explained.top_channels], fallback=numpy_scalar)
    precedents = (to_json([asdict(p) for p in explained.precedents], fallback=numpy_scalar)
                  if explained.precedents else _NULL)
    return channels, precedents


def numpy_scalar(value: object) -> object:
    """A numpy scalar a detector let through (np.bool_, np.float32) as its Python value."""
    return value.item()  # type: ignore[attr-defined]


def as_dict(body: bytes) -> dict[str, Any]:
    """A response's bytes as the dict a client parses (tests, kept receipts)."""
    return json.loads(body)
