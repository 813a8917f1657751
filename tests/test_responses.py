"""/score's answer written from columns (service/responses.py) is byte for byte what
pydantic serialises for the same answer as ScoreResponse models: every status (scored,
warming up, duplicate with and without its result, dropped, nudged), points a crash left
unscored, NaN likelihoods and thresholds, anomalies with their explanations, timestamps
sent as numbers or date-times, and numbers whose JSON spelling differs between encoders."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from service.explain import ChannelShare, Explanation, Precedent
from service.responses import recovered_body, score_body
from service.schemas import ScoreResponse
from service.scoring import Results
from service.stores.base import AppendResult, StreamMeta

ODD_NUMBERS = [1e-7, 1e-5, 1e16, 1.2345678901234568e17, 0.1, -0.0, 5e-324, 1e21, 100.0]


def _case(seed: int, n: int, *, unscored: int = 0, datetimes: bool = False):  # noqa: ANN202
    """A batch of n points sent with random actions, its append and its results."""
    rng = np.random.default_rng(seed)
    actions = rng.choice(["stored", "stored", "stored", "nudged", "dropped", "duplicate"],
                         n).tolist()
    base = 1.7e9
    sent = [base + i * 60 + float(rng.choice(ODD_NUMBERS)) for i in range(n)]
    if datetimes:
        sent = [datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=60 * i)
                for i in range(n)]
    crash_left = [base - 1000 + i for i in range(unscored)]  # stored earlier, unscored
    stamps: list[float | None] = []
    fresh = []
    for i, action in enumerate(actions):
        if action == "dropped":
            stamps.append(None)
        elif action == "duplicate":  # a retry: of a crash-left point, or of an older one
            stamps.append(crash_left[i % unscored] if unscored and i % 2 else base - 5e6 + i)
        else:
            stamps.append(base + i * 60 + (0.001 if action == "nudged" else 0.0))
            fresh.append(stamps[-1])
    rows = unscored + len(fresh)
    points = np.column_stack([np.array([base - 2e6] * 3 + crash_left + fresh, float),
                              rng.random(3 + rows)])
    meta = StreamMeta(stream="s", channels=1, window=4, detector="ensemble")
    appended = AppendResult(meta=meta, created=False, duplicates=actions.count("duplicate"),
                            accepted=len(fresh), points=points, actions=actions,
                            stamps=stamps, unscored=unscored)
    scores = rng.choice([*ODD_NUMBERS, 3.5, 0.25], rows)
    likelihood = np.where(rng.random(rows) < 0.3, np.nan, rng.random(rows))
    thresholds = np.where(rng.random(rows) < 0.2, np.nan, rng.choice(ODD_NUMBERS, rows))
    scored = rng.random(rows) < 0.8
    anomalous = scored & (rng.random(rows) < 0.3)
    explained = {int(k): Explanation(
        [ChannelShare("cpu", 0.75), ChannelShare("1", float(rng.choice(ODD_NUMBERS)))],
        [Precedent("cpu", base, base + 630.5, 1e-7)] if k % 2 else None)
        for k in np.flatnonzero(anomalous)}
    results = Results(scored, scores, likelihood, thresholds, anomalous, explained)
    return sent, appended, results


def _expected(sent, appended, results, until, rows) -> bytes:  # noqa: ANN001
    """The same answer as ScoreResponse models, serialised by pydantic."""
    out = []
    for ts, action, stamp, row in zip(sent, appended.actions, appended.stamps, rows,
                                      strict=True):
        point = {"timestamp": ts, "score": None, "likelihood": None, "anomaly": False,
                 "threshold": None, "status": action, "top_channels": None,
                 "precedents": None,
                 "timestamp_action": action if action in ("nudged", "dropped") else None,
                 "stored_timestamp": stamp}
        if row is not None:
            point["status"] = "warming_up"
        if row is not None and results is not None and results.scored[row]:
            lik, thr = float(results.likelihood[row]), float(results.thresholds[row])
            e = results.explained.get(row)
            point |= {"score": float(results.scores[row]),
                      "likelihood": None if lik != lik else lik,
                      "anomaly": bool(results.anomalous[row]),
                      "threshold": None if thr != thr else thr, "status": "scored",
                      "top_channels": [vars(c) for c in e.top_channels] if e else None,
                      "precedents": [vars(p) for p in e.precedents]
                      if e and e.precedents else None}
        out.append(point)
    return ScoreResponse(stream="s", results=out,
                         points_until_scored=until).model_dump_json().encode()


def _rows(appended: AppendResult) -> list[int | None]:
    crash = appended.points[len(appended.points) - appended.to_score:, 0][:appended.unscored]
    recovered = {s: i for i, s in enumerate(crash.tolist())}
    fresh = iter(range(appended.unscored, appended.to_score))
    return [recovered.get(stamp) if action == "duplicate" else None
            if action == "dropped" else next(fresh)
            for action, stamp in zip(appended.actions, appended.stamps, strict=True)]


@pytest.mark.parametrize("seed", range(12))
def test_the_answer_is_what_pydantic_writes_for_its_models(seed):
    n = [1, 2, 10, 100, 257][seed % 5]
    sent, appended, results = _case(seed, n, unscored=seed % 3, datetimes=seed % 4 == 3)
    until = [None, 0, 17][seed % 3]
    assert score_body("s", appended, results, sent, until) == _expected(
        sent, appended, results, until, _rows(appended))


def test_a_batch_scored_whole_and_one_nothing_scored():
    sent, appended, _ = _case(7, 50)
    appended.actions[:] = ["stored"] * 50
    appended.stamps[:] = [float(s) for s in sent]
    appended.accepted = 50
    appended.points = np.column_stack([sent, sent])
    rng = np.random.default_rng(1)
    results = Results(np.ones(50, bool), rng.random(50), rng.random(50), rng.random(50),
                      np.zeros(50, bool))
    rows = list(range(50))
    assert score_body("s", appended, results, sent, 0) == _expected(
        sent, appended, results, 0, rows)
    assert score_body("s", appended, None, sent, 3) == _expected(
        sent, appended, None, 3, rows)


def test_a_pending_batch_recovered_after_a_crash():
    sent, appended, results = _case(3, 30, unscored=30)
    crash = appended.points[len(appended.points) - appended.to_score:, 0][:30].tolist()
    pending = {"sent": [float(s) for s in sent], "actions": ["stored"] * 30 + ["dropped"],
               "stamps": crash + [None]}
    pending["sent"].append(1.0)
    appended.actions[:] = pending["actions"]
    appended.stamps[:] = pending["stamps"]
    body = recovered_body("s", pending, appended, results, 5)
    assert body == _expected(pending["sent"], appended, results, 5, list(range(30)) + [None])
    pending["stamps"][0] = 12.5  # a point of the batch that was not among those scored now
    assert recovered_body("s", pending, appended, results, 5) is None
