"""The service scores a stream with a SPEAR artifact trained here (tiny) by `tsad train`'s
code path, on both window stores: probability scores, the calibrated cut as threshold,
names validated, and the shared artifact kept out of the stream's state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.metrics import ServiceMetrics
from service.settings import Settings
from tests.conftest import SPEAR_TINY_WINDOW

W = SPEAR_TINY_WINDOW


@pytest.fixture(scope="module")
def artifacts(spear_tiny):
    return spear_tiny  # (artifacts dir, calibration): tests/conftest.py


@pytest.fixture
def client(service_backend, artifacts):
    settings = Settings(**service_backend.settings, artifacts_dir=artifacts[0],
                        detector_params={"*": {"warmup": 64}}, threshold_min_scores=20)
    with TestClient(create_app(settings, ServiceMetrics(CollectorRegistry()))) as c:
        yield c


def test_artifact_directory_has_everything(artifacts):
    root, calibration = artifacts
    files = {p.name for p in (root / "spear-tiny").iterdir()}
    assert {"config.json", "weights.safetensors", "calibration.json", "training_curve.json",
            "versions.json"} <= files
    assert calibration["source"] == "detector's validation cut"
    assert 0 < calibration["threshold"] < 1
    curve = json.loads((root / "spear-tiny" / "training_curve.json").read_text())
    assert curve["history"] and curve["trained_parameters"] == 4 * 384 + 385


def test_stream_scored_by_a_spear_artifact(client, artifacts):
    _, calibration = artifacts
    r = client.put("/streams/sp", json={"channels": 1, "detector": "artifact:spear-tiny"})
    assert r.status_code == 201, r.text
    assert r.json()["window"] == W and r.json()["detector"] == "artifact:spear-tiny"
    points = [{"timestamp": float(t), "values": [math.sin(t / 4.0)]} for t in range(120)]
    points[100]["values"][0] += 3.0  # a spike
    res = client.post("/score", json={"stream": "sp", "points": points}).json()["results"]
    assert all(p["status"] == "warming_up" for p in res[:W - 1])
    scored = res[W - 1:]
    assert all(p["status"] == "scored" for p in scored)
    scores = np.array([p["score"] for p in scored])
    assert ((scores >= 0) & (scores <= 1)).all()  # an anomaly probability
    assert all(p["threshold"] == pytest.approx(calibration["threshold"]) for p in scored)
    assert res[100]["score"] > np.median(scores)
    assert all(p["anomaly"] == (p["score"] >= p["threshold"]) for p in scored)
    # the next batch continues the stream; the artifact is not copied into its state
    more = [{"timestamp": float(t), "values": [math.sin(t / 4.0)]} for t in range(120, 140)]
    again = client.post("/score", json={"stream": "sp", "points": more})
    assert again.status_code == 200 and again.json()["results"][0]["status"] == "scored"
    sections = client.portal.call(client.app.state.services.backend.streams.sections, "sp")
    assert {"loop", "lik", "thr", "alr"} <= set(sections)
    assert not any(name.startswith("det") for name in sections)


def test_an_explicit_threshold_overrides_the_calibrated_cut(client):
    r = client.put("/streams/sp2", json={"channels": 1, "detector": "artifact:spear-tiny",
                                         "threshold": {"kind": "fixed", "value": 0.99}})
    assert r.status_code == 201, r.text
    points = [{"timestamp": float(t), "values": [math.sin(t / 4.0)]} for t in range(40)]
    res = client.post("/score", json={"stream": "sp2", "points": points}).json()["results"]
    assert res[-1]["threshold"] == 0.99


@pytest.mark.parametrize(("body", "field"), [
    ({"channels": 1, "detector": "artifact:nope"}, "body.detector"),
    ({"channels": 1, "detector": "artifact:../spear-tiny"}, "body.detector"),
    ({"channels": 1, "detector": "artifact:"}, "body.detector"),
    ({"channels": 1, "detector": "artifact:spear-tiny", "window": 32}, "body.window"),
    ({"channels": 1, "threshold": {"kind": "fixed"}}, "body.threshold.value"),
])
def test_bad_artifact_requests_name_the_field_and_change_nothing(client, body, field):
    r = client.put("/streams/bad", json=body)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"]
    assert client.get("/streams/bad").status_code == 404
