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
# a point's object: these constants between its fields' values (then a comma)
_KEYS = (b'{"timestamp":', b',"score":', b',"likelihood":', b',"anomaly":', b',"threshold":',
         b',"status":', b',"top_channels":', b',"precedents":', b',"timestamp_action":',
         b',"stored_timestamp":', b"},")
_BOOL = np.array([b"false", b"true"], dtype=object)
_STATUS = {"scored": b'"scored"', "warming_up": b'"warming_up"', "duplicate": b'"duplicate"',
           "dropped": b'"dropped"'}
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
    action is its status; a row not scored: warming up). Each field is a column of JSON
    tokens; the points' objects are the columns interleaved with the constants between
    them (list slices, joined once)."""
    n = len(rows)
    has = rows >= 0
    scored = np.zeros(n, bool)
    if results is not None:
        scored[has] = results.scored[rows[has]]
    at = np.flatnonzero(scored)
    picked = rows[at]
    null = [_NULL] * n
    values = [list(sent), list(stamps)]  # then, for the points scored, their numbers
    if len(at):
        assert results is not None
        values += [results.scores[picked].tolist(), _nan_none(results.likelihood[picked]),
                   _nan_none(results.thresholds[picked])]
    tokens = _token_columns(values)
    score = likelihood = threshold = top_channels = precedents = null
    anomaly = [b"false"] * n
    if len(at):
        assert results is not None
        score, likelihood, threshold = (_scatter(n, at, t) for t in tokens[2:])
        anomaly = _scatter(n, at, _BOOL[results.anomalous[picked].astype(np.intp)],
                           b"false")
        explained = [(i, results.explained[row]) for i, row in zip(
            at.tolist(), picked.tolist(), strict=True) if row in results.explained] if (
            results.explained) else []
        if explained:
            top_channels, precedents = list(null), list(null)
            for i, e in explained:
                top_channels[i], precedents[i] = _explanation(e)
    if len(at) == n:
        status = [_STATUS["scored"]] * n
    else:
        status = [_STATUS["scored"] if ok else _STATUS["warming_up"] if row >= 0
                  else _STATUS[action]
                  for ok, row, action in zip(scored.tolist(), rows.tolist(), actions,
                                             strict=True)]
    timestamp_action = (null if "nudged" not in actions and "dropped" not in actions
                        else [_TIMESTAMP_ACTION.get(a, _NULL) for a in actions])
    columns = (tokens[0], score, likelihood, anomaly, threshold, status, top_channels,
               precedents, timestamp_action, tokens[1])
    width = 2 * len(columns) + 1  # a point: each field's key and value, then its end
    parts: list[bytes] = [b""] * (n * width)
    for k, (key, column) in enumerate(zip(_KEYS, columns, strict=False)):
        parts[2 * k::width] = [key] * n
        parts[2 * k + 1::width] = column
    parts[width - 1::width] = [_KEYS[-1]] * n  # "}," (the last point's comma cut below)
    points = b"".join(parts)[:-1]
    return b'{"stream":%b,"results":[%b],"points_until_scored":%b}' % (
        to_json(stream), points, to_json(points_until_scored))


def _scatter(n: int, at: np.ndarray, tokens: Sequence[bytes],
             fill: bytes = _NULL) -> list[bytes]:
    """A column of n tokens: ``tokens`` at ``at``, ``fill`` elsewhere."""
    if len(at) == n:
        return list(tokens)
    column = np.full(n, fill, dtype=object)
    column[at] = tokens
    return column.tolist()


def _token_columns(columns: list[list[Any]]) -> list[list[bytes]]:
    """Each value's JSON, as ``to_json`` writes it inside a list, column by column: the
    columns serialised in one call and split (numbers, null, booleans and timestamps
    hold no comma nor bracket; a column where a value does is serialised value by
    value)."""
    blob = to_json(columns)[2:-2]  # [[a,b],[c,d]] -> a,b],[c,d
    out = [part.split(b",") if part else [] for part in blob.split(b"],[")]
    if len(out) == len(columns) and all(len(t) == len(c) for t, c in zip(out, columns,
                                                                          strict=True)):
        return out
    return [[to_json(v) for v in column] for column in columns]


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
