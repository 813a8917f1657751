"""POST /streams/{id}/feedback: labelled ranges stored with the stream, and few-label
adaptation of a SPEAR stream's own soft prompts (tiny artifact trained here, the real
MiniLM, a real redis-server for the restart). Bad input is a 422 naming the field with
nothing changed; the adapted stream scores differently, its neighbour on the same artifact
does not; the adaptation survives a restart of the service."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from models.detectors.base import sliding_windows
from service import artifacts as artifacts_mod
from service.app import create_app
from service.metrics import ServiceMetrics
from service.scoring import StreamScorer
from service.settings import Settings
from tests.conftest import SPEAR_TINY_WINDOW

W = SPEAR_TINY_WINDOW
PERIOD = 16  # the test series repeats every 16 points: windows 160 points apart are equal
SPIKE, FLAT = 60, (80, 95)  # in the first 100 points: a spike, then a stuck sensor


@pytest.fixture(scope="module")
def artifacts_dir(spear_tiny):
    return spear_tiny[0]  # tests/conftest.py: a tiny SPEAR artifact, trained once


def value(t: int) -> float:
    """A sine of period 16 with a spike at SPIKE and a flat stretch in FLAT (mod 160)."""
    k = t % 160
    if FLAT[0] <= k <= FLAT[1]:
        k = FLAT[0]
    v = math.sin(2 * math.pi * k / PERIOD)
    return v + 3.0 if k == SPIKE else v


def points(lo: int, hi: int) -> list[dict]:
    return [{"timestamp": float(t), "values": [value(t)]} for t in range(lo, hi)]


def make_client(artifacts_dir, **overrides) -> TestClient:
    settings = Settings(artifacts_dir=artifacts_dir, **overrides)
    return TestClient(create_app(settings, ServiceMetrics(CollectorRegistry())))


@pytest.fixture
def client(artifacts_dir):
    with make_client(artifacts_dir, feedback_max_ranges=4) as c:
        for name in ("sp", "rl"):
            detector = "artifact:spear-tiny" if name == "sp" else "residual_linear"
            assert c.put(f"/streams/{name}", json={"channels": 1, "detector": detector,
                                                   "window": W}).status_code == 201
            assert c.post("/score", json={"stream": name, "points": points(0, 40)}
                          ).status_code == 200
        yield c


def state(client: TestClient, stream: str) -> dict[str, bytes]:
    """The stream's stored state sections."""
    return client.portal.call(client.app.state.services.backend.streams.sections, stream)


def scorer(client: TestClient, stream: str) -> StreamScorer:
    """The stream's scorer as its stored state sections make it."""
    streams = client.app.state.services.backend.streams
    meta = client.portal.call(streams.get, stream)
    sections = client.portal.call(streams.sections, stream)
    return StreamScorer.from_sections(meta, client.app.state.settings, sections)


HELD = {"start": 39, "end": 39, "label": "normal"}  # the newest held point: a full window


@pytest.mark.parametrize(("body", "field"), [
    ({"ranges": []}, "body.ranges"),
    ({"ranges": [HELD | {"label": "bogus"}]}, "body.ranges.0.label"),
    ({"ranges": [HELD | {"start": 39, "end": 38}]}, "body.ranges.0.end"),
    # adapting needs windows: points 0-10 end none (the window is 32)
    ({"ranges": [HELD, HELD | {"start": 0, "end": 10}], "adapt": True}, "body.ranges.1"),
    ({"ranges": [HELD] * 5}, "body.ranges"),
    ({"ranges": [HELD], "steps": 5}, "body.steps"),
    ({"ranges": [HELD], "adapt": True, "steps": 100_000}, "body.steps"),
    ({"ranges": [HELD | {"points": [{"timestamp": 1, "values": [0.0]},
                                    {"timestamp": 2, "values": [0.0, 1.0]}]}]},
     "body.ranges.0.points.1.values"),
    ({"ranges": [HELD | {"points": [{"timestamp": 2, "values": [0.0]},
                                    {"timestamp": 1, "values": [0.0]}]}]},
     "body.ranges.0.points.1.timestamp"),
    ({"ranges": [HELD | {"points": [{"timestamp": 1, "values": [0.0]},
                                    {"timestamp": 2, "values": [1e308]}]}]},
     "body.ranges.0.points.1.values.0"),  # would overflow the detectors' arithmetic
    ({"ranges": [HELD], "extra": 1}, "body.extra"),
])
def test_bad_feedback_names_the_field_and_changes_nothing(client, body, field):
    before = state(client, "sp")
    r = client.post("/streams/sp/feedback", json=body)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"], r.json()["message"]
    assert state(client, "sp") == before
    assert client.get("/streams/sp/feedback").json()["ranges"] == []


def test_unknown_stream_and_detectors_that_cannot_adapt(client):
    assert client.post("/streams/nope/feedback", json={"ranges": [HELD]}).status_code == 404
    assert client.get("/streams/nope/feedback").status_code == 404
    before = state(client, "rl")
    r = client.post("/streams/rl/feedback", json={"ranges": [HELD], "adapt": True})
    assert r.status_code == 409 and "body.adapt" in r.json()["message"], r.text
    assert "SPEAR" in r.json()["message"] and state(client, "rl") == before
    # feedback alone is stored for any detector, from the points the service holds
    r = client.post("/streams/rl/feedback", json={"ranges": [HELD]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["stored"], out["windows"], out["adapted"]) == (1, 1, False)
    assert out["ranges"][0] | {"received_at": 0} == {
        "start": 39.0, "end": 39.0, "label": "normal", "received_at": 0, "windows": 1}
    # a range no held window ends in still labels the timeline (shadow reports use it)
    r = client.post("/streams/rl/feedback", json={"ranges": [HELD | {"start": 0, "end": 10,
                                                                      "label": "anomaly"}]})
    assert r.status_code == 200 and r.json()["windows"] == 0, r.text
    assert r.json()["ranges"][-1]["windows"] == 0


def test_ranges_are_bounded_oldest_dropped(client):
    for k in range(6):
        r = client.post("/streams/sp/feedback", json={"ranges": [
            HELD | {"label": ["normal", "anomaly"][k % 2]}]})
        assert r.status_code == 200, r.text
    kept = client.get("/streams/sp/feedback").json()["ranges"]
    assert len(kept) == 4  # feedback_max_ranges
    assert [x["label"] for x in kept] == ["normal", "anomaly"] * 2
    fb = scorer(client, "sp").feedback
    assert set(fb.window_range) <= set(fb.ranges[:, 0].astype(int))


def scores(c: TestClient, stream: str, batch: list[dict]) -> np.ndarray:
    r = c.post("/score", json={"stream": stream, "points": batch})
    assert r.status_code == 200, r.text
    return np.array([p["score"] for p in r.json()["results"]])


def test_adaptation_moves_only_that_stream_and_survives_a_restart(artifacts_dir, redis_url):
    history = points(0, 100)
    ranges = [{"start": SPIKE, "end": SPIKE + 1, "label": "false_positive",
               "points": history},
              {"start": FLAT[0] + 8, "end": FLAT[1], "label": "missed_anomaly",
               "points": history}]
    # a generous time limit: the assertions need all the steps, on a busy CPU too
    with make_client(artifacts_dir, redis_url=redis_url, feedback_max_seconds=300) as c:
        for name in ("a", "b"):
            assert c.put(f"/streams/{name}", json={
                "channels": 1, "detector": "artifact:spear-tiny"}).status_code == 201
            scores(c, name, history)
        shared = c.app.state.services.streams.artifact("artifact:spear-tiny")
        before = {k: v.copy() for k, v in shared.detector.adaptable_state().items()}
        r = c.post("/streams/a/feedback", json={"ranges": ranges, "adapt": True,
                                                "steps": 30})
        assert r.status_code == 200, r.text
        out = r.json()
        ada = out["adaptation"]
        assert out["adapted"] and out["stored"] == 2 and out["windows"] == 2 + 8
        assert out["negatives"] > 0 and ada["windows"] == out["windows"] + out["negatives"]
        assert ada["positives"] == 8 and ada["steps"] == 30
        assert ada["loss_after"] < ada["loss_before"]
        assert ada["anomalous_probability_after"] > ada["anomalous_probability_before"]
        assert ada["normal_probability_after"] < ada["normal_probability_before"]
        assert ada["bytes"] == (4 * 384 + 385) * 4  # float32 prompts and head
        # the shared artifact is untouched
        for k, v in shared.detector.adaptable_state().items():
            np.testing.assert_array_equal(v, before[k])
        metrics = c.get("/metrics").text
        assert 'tsad_feedback_ranges_total{label="false_positive"} 1.0' in metrics
        assert 'tsad_feedback_ranges_total{label="missed_anomaly"} 1.0' in metrics
        assert "tsad_feedback_adaptation_seconds_count 1.0" in metrics

    artifacts_mod.clear_cache()  # a new process: the artifact and streams load afresh
    with make_client(artifacts_dir, redis_url=redis_url) as c:
        got = c.get("/streams/a/feedback").json()
        assert got["adapted"] and got["adaptation"] == ada
        assert [x["label"] for x in got["ranges"]] == ["false_positive", "missed_anomaly"]
        assert not c.get("/streams/b/feedback").json()["adapted"]
        # the same shapes again, 160 points later: equal windows to the labelled ones
        later = points(160, 260)
        sa, sb = scores(c, "a", later), scores(c, "b", later)
        spike, flat = SPIKE, FLAT[1]  # indices in `later` (t = 160 + index)
        assert sa[spike] < sb[spike], (sa[spike], sb[spike])
        assert sa[flat] > sb[flat], (sa[flat], sb[flat])
        # b scores exactly as the artifact does; a exactly as its stored adaptation does
        # the stored context (the last W - 1 points of history), then the new points
        series = np.array([[value(t)] for t in [*range(100 - W + 1, 100), *range(160, 260)]])
        windows = sliding_windows(series, W)
        artifact = c.app.state.services.streams.artifact("artifact:spear-tiny").detector
        np.testing.assert_allclose(sb, artifact.channel_scores(windows)[:, 0], rtol=1e-5)
        adapted = scorer(c, "a").detector
        np.testing.assert_allclose(sa, adapted.channel_scores(windows)[:, 0], rtol=1e-5)
