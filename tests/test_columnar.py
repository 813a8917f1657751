"""POST /score's columnar form (timestamps + values) beside the list of points: the same
results, the same checks, each error naming the column and index sent."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import BackendUnderTest
from tests.test_api import make_client, sine_points


@pytest.fixture
def client(service_backend):
    with make_client(service_backend, timestamps="nudge") as c:
        yield c


def columns(points: list[dict]) -> dict:
    return {"timestamps": [p["timestamp"] for p in points],
            "values": [p["values"] for p in points]}


def test_columnar_and_list_forms_give_identical_results(client):
    rng = np.random.default_rng(1)
    points = sine_points(0, 400, channels=2)
    for p in points:
        p["values"] = [v + 0.05 * rng.standard_normal() for v in p["values"]]
    points[300]["values"][1] += 5.0  # an anomaly, explained by its channel
    points[200]["timestamp"] = points[199]["timestamp"]  # a repeated stamp: nudged
    points[250]["timestamp"] = "1970-01-01T00:04:10Z"  # RFC 3339, echoed as sent
    for start, stop in ((0, 150), (150, 151), (151, 400)):  # batch 150, 1, 249
        listed = client.post("/score", json={"stream": "a", "points": points[start:stop]})
        col = client.post("/score", json={"stream": "b", **columns(points[start:stop])})
        assert listed.status_code == col.status_code == 200, (listed.text, col.text)
        assert col.headers["content-type"] == "application/json"
        assert listed.json()["results"] == col.json()["results"]
        assert col.json()["stream"] == "b"
    results = col.json()["results"]
    assert results[300 - 151]["anomaly"] and results[300 - 151]["top_channels"]
    assert results[250 - 151]["timestamp"] == "1970-01-01T00:04:10Z"
    assert results[200 - 151]["timestamp_action"] == "nudged"
    assert client.get("/streams/a/window").json()["values"] == client.get(
        "/streams/b/window").json()["values"]


BAD_COLUMNAR = [
    # (body, field the message must name)
    ({"timestamps": [1000.0, 1001.0], "values": [[1.0], [1.0, 2.0]]}, "body.values.1"),
    ({"timestamps": [1000.0], "values": [[1.0, 2.0]]}, "body.values.0"),  # 1-channel stream
    ({"timestamps": [1000.0, 1001.0], "values": [[1.0]]}, "body.values"),
    ({"timestamps": [1000.0]}, "body.values"),
    ({"values": [[1.0]]}, "body.timestamps"),
    ({}, "body.points"),
    ({"timestamps": [1000.0], "values": [[1.0]], "points": [{"timestamp": 1000,
                                                             "values": [1]}]}, "body.points"),
    ({"timestamps": [], "values": []}, "body.timestamps"),
    ({"timestamps": [1000.0], "values": [[]]}, "body.values.0"),
    ({"timestamps": [1000.0, "x"], "values": [[1.0], [1.0]]}, "body.timestamps.1"),
    ({"timestamps": [1000.0, True], "values": [[1.0], [1.0]]}, "body.timestamps.1"),
    ({"timestamps": [1000.0, 1001.0], "values": [[1.0], [False]]}, "body.values.1.0"),
    ({"timestamps": [1000.0, 1001.0], "values": [[1.0], ["1.5"]]}, "body.values.1.0"),
    ({"timestamps": [1000.0, 4102444800.0], "values": [[1.0], [1.0]]}, "body.timestamps.1"),
    ({"timestamps": [1000.0, -1.0], "values": [[1.0], [1.0]]}, "body.timestamps.1"),
    ({"timestamps": [1000.0, 1001.0], "values": [[1.0], [-2e15]]}, "body.values.1.0"),
    ({"timestamps": [float(t) for t in range(1000, 3001)],
      "values": [[1.0]] * 2001}, "body.timestamps"),  # max_batch_points is 2000
]


@pytest.mark.parametrize("body,field", BAD_COLUMNAR)
def test_bad_columnar_input_is_422_naming_the_field_and_changes_nothing(client, body, field):
    assert client.post("/score", json={"stream": "s", "points": sine_points(0, 100)}
                       ).status_code == 200
    before = (client.get("/streams").json(), client.get("/streams/s/window").json())
    r = client.post("/score", content=json.dumps({"stream": "s", **body}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in r.json()["message"], r.json()["message"]
    after = (client.get("/streams").json(), client.get("/streams/s/window").json())
    assert before == after


def test_columnar_order_errors_name_the_timestamp(redis_url):
    """The store's checks (here timestamp policy reject) name timestamps.i, not points.i."""
    with make_client(BackendUnderTest("redis", redis_url), timestamps="reject") as client:
        assert client.post("/score", json={"stream": "r", "timestamps": [5.0, 6.0],
                                           "values": [[1.0], [2.0]]}).status_code == 200
        r = client.post("/score", json={"stream": "r", "timestamps": [7.0, 7.0],
                                        "values": [[1.0], [2.0]]})
        assert r.status_code == 422 and "body.timestamps.1" in r.json()["message"], r.text
        r = client.post("/score", json={"stream": "r", "timestamps": [8.0],
                                        "values": [[1.0, 2.0]]})
        assert r.status_code == 422 and "body.values.0" in r.json()["message"], r.text
