"""Repeated and backward timestamps through POST /score, against both window stores: the
timestamp policies (nudge, drop, reject; server default and per stream), retries, the
metric, and real NAB files replayed as published."""

from __future__ import annotations

import numpy as np
import pytest

from service.replay import load_series, parse_timestamp
from tests.conftest import DATA_DIR
from tests.test_api import MEMORY, make_client, post, sine_points


def bad_stamps() -> list[dict]:
    """100 points after 0..199 (warm-up done); point 10 repeats point 9's stamp, point 50
    goes back 30 s."""
    points = sine_points(200, 100)
    points[10]["timestamp"] = 209.0
    points[50]["timestamp"] = 220.0
    return points


def metric(client, line: str) -> float:
    for row in client.get("/metrics").text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    raise AssertionError(f"{line} not exported")


def test_repeated_and_backward_stamps_are_nudged_and_scored(service_backend):
    with make_client(service_backend) as client:
        assert post(client, "n", sine_points(0, 200)).status_code == 200
        r = post(client, "n", bad_stamps())
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [i for i, p in enumerate(results) if p["timestamp_action"]] == [10, 50]
        assert [results[i]["timestamp_action"] for i in (10, 50)] == ["nudged", "nudged"]
        assert results[10]["timestamp"] == 209.0 and results[10]["stored_timestamp"] == 209.001
        assert results[50]["stored_timestamp"] == 249.001  # just after point 49 (249)
        assert results[11]["stored_timestamp"] == 211.0  # later points keep their stamps
        assert all(p["status"] == "scored" and p["score"] is not None for p in results)
        stream = client.get("/streams/n").json()
        assert (stream["points_seen"], stream["timestamps"]) == (300, None)
        window = client.get("/streams/n/window").json()
        assert 249.001 in window["timestamps"] and np.all(np.diff(window["timestamps"]) > 0)
        assert metric(client, 'tsad_points_reordered_total{action="nudged"}') == 2
        assert metric(client, 'tsad_points_reordered_total{action="dropped"}') == 0


def test_drop_policy_skips_the_point_and_says_so(service_backend):
    with make_client(service_backend, timestamps="drop") as client:
        post(client, "d", sine_points(0, 200))
        results = post(client, "d", bad_stamps()).json()["results"]
        for i in (10, 50):
            assert results[i] == {**results[i], "status": "dropped", "score": None,
                                  "timestamp_action": "dropped", "stored_timestamp": None}
        assert sum(p["status"] == "scored" for p in results) == 98
        assert client.get("/streams/d").json()["points_seen"] == 298
        assert 220.0 not in client.get("/streams/d/window").json()["timestamps"]
        assert metric(client, 'tsad_points_reordered_total{action="dropped"}') == 2


REJECTED = [  # policy reject: today's strict 422, naming the point's timestamp
    ([{"timestamp": 1001, "values": [1]}, {"timestamp": 1001, "values": [2]}],
     "body.points.1.timestamp"),
    ([{"timestamp": 1001, "values": [1]}, {"timestamp": 1000, "values": [2]}],
     "body.points.1.timestamp"),
    ([{"timestamp": 5, "values": [1]}], "body.points.0.timestamp"),  # the stream is at 99
]


@pytest.mark.parametrize("points,field", REJECTED)
def test_reject_policy_is_a_422_that_changes_nothing(service_backend, points, field):
    with make_client(service_backend, timestamps="reject") as client:
        post(client, "s", sine_points(0, 100))
        before = (client.get("/streams/s").json(), client.get("/streams/s/window").json())
        r = post(client, "s", points)
        assert r.status_code == 422 and field in r.json()["message"], r.text
        assert "not after" in r.json()["message"]
        assert before == (client.get("/streams/s").json(),
                          client.get("/streams/s/window").json())
        assert metric(client, 'tsad_points_reordered_total{action="nudged"}') == 0


def test_a_streams_own_policy_overrides_the_server_default(service_backend):
    with make_client(service_backend) as client:  # server default: nudge
        r = client.put("/streams/strict", json={"channels": 1, "timestamps": "reject"})
        assert r.status_code == 201 and r.json()["timestamps"] == "reject"
        post(client, "strict", sine_points(0, 200))
        r = post(client, "strict", bad_stamps())
        assert r.status_code == 422 and "body.points.10.timestamp" in r.json()["message"]
        client.put("/streams/strict", json={"channels": 1, "timestamps": "drop"})
        statuses = [p["status"] for p in post(client, "strict", bad_stamps()).json()["results"]]
        assert statuses.count("dropped") == 2
        r = client.put("/streams/strict", json={"channels": 1})  # omitted: server default
        assert r.status_code == 200 and r.json()["timestamps"] is None
        r = post(client, "strict", [{"timestamp": 250.0, "values": [0.5]}])
        assert r.json()["results"][0]["timestamp_action"] == "nudged"
        r = client.put("/streams/strict", json={"channels": 1, "timestamps": "sometimes"})
        assert r.status_code == 422 and "body.timestamps" in r.json()["message"]


def test_a_retry_is_a_duplicate_even_where_it_was_nudged(service_backend):
    with make_client(service_backend, duplicates="drop") as client:
        post(client, "r", sine_points(0, 200))
        batch = bad_stamps()
        first = post(client, "r", batch).json()["results"]
        # resent from point 40 on (the stored window holds the last 64 points: 236..299)
        retry = post(client, "r", batch[40:] + sine_points(300, 5)).json()["results"]
        assert [p["status"] for p in retry[:60]] == ["duplicate"] * 60
        assert [p["stored_timestamp"] for p in retry[:60]] == [
            p["stored_timestamp"] for p in first[40:]]
        assert retry[10]["stored_timestamp"] == 249.001  # point 50, stored nudged
        assert all(p["timestamp_action"] is None for p in retry)  # not nudged in again
        assert client.get("/streams/r").json()["points_seen"] == 305
        assert metric(client, 'tsad_points_reordered_total{action="nudged"}') == 2
        assert metric(client, "tsad_points_duplicate_total") == 60
    with make_client(service_backend) as client:  # duplicates reject: answered, unless
        post(client, "r2", sine_points(0, 200))    # the retry goes on with new points
        batch = bad_stamps()
        post(client, "r2", batch)
        r = post(client, "r2", batch[50:])
        assert r.status_code == 200
        assert {p["status"] for p in r.json()["results"]} == {"duplicate"}
        r = post(client, "r2", batch[50:] + sine_points(300, 5))
        assert r.status_code == 422 and "body.points.0.timestamp" in r.json()["message"]
        assert "duplicate" in r.json()["message"]
        assert client.get("/streams/r2").json()["points_seen"] == 300


@pytest.mark.parametrize("name,affected,batch", [
    # 12 points on 2014-03-09 03:00:00 (a daylight-saving hour), a batch boundary among them
    ("ec2_request_latency_dst_excerpt.csv", 11, 160),
    # the stamp goes back from 02:55 to 02:00: the 12 points of the repeated hour
    ("machine_temperature_backward_excerpt.csv", 12, 1000),
])
def test_nab_files_replay_as_published(service_backend, name, affected, batch):
    series = load_series(DATA_DIR / "nab" / name)
    ts = series[:, 0]  # as published: points not after an earlier one
    assert (ts[1:] <= np.maximum.accumulate(ts[:-1])).sum() == affected
    with make_client(service_backend) as client:
        results = []
        for lo in range(0, len(series), batch):
            r = post(client, "nab", [{"timestamp": t, "values": v} for t, *v in
                                     series[lo:lo + batch].tolist()])
            assert r.status_code == 200, r.text
            results += r.json()["results"]
        assert client.get("/streams/nab").json()["points_seen"] == len(series)
    nudged = [p for p in results if p["timestamp_action"] == "nudged"]
    assert len(nudged) == affected
    stored = [p["stored_timestamp"] for p in results]
    assert np.all(np.diff(stored) > 0)  # every point kept, in the order sent
    first = next(i for i, p in enumerate(results) if p["timestamp_action"])
    base = stored[first - 1]
    assert stored[first:first + affected] == pytest.approx(
        [base + 0.001 * (k + 1) for k in range(affected)], abs=1e-6)
    assert results[first + affected]["timestamp_action"] is None  # then stamps as sent
    assert stored[first + affected] == results[first + affected]["timestamp"]
    if "dst" in name:
        assert base == parse_timestamp("2014-03-09 03:00:00")


def test_bounds_are_settings():
    with make_client(MEMORY, value_max_abs=100.0, timestamp_max_lead_seconds=60,
                     timestamp_min=1e9) as client:
        ok = [{"timestamp": 1.7e9, "values": [-100.0]}]
        assert post(client, "b", ok).status_code == 200
        for points, field in (([{"timestamp": 1.7e9 + 1, "values": [100.5]}],
                               "body.points.0.values.0"),
                              ([{"timestamp": 9e8, "values": [1.0]}], "body.points.0.timestamp"),
                              ([{"timestamp": 4e9, "values": [1.0]}], "body.points.0.timestamp")):
            r = post(client, "b", points)
            assert r.status_code == 422 and field in r.json()["message"], r.text
        assert client.get("/streams/b").json()["points_seen"] == 1


def test_older_data_sent_again_is_refused_not_nudged(service_backend):
    """A point further behind than TSAD_TIMESTAMP_MAX_BACK_SECONDS is a series sent again,
    not a reordered stamp: 422 naming it under every policy, nothing stored."""
    with make_client(service_backend, timestamp_max_back_seconds=60) as client:
        assert post(client, "old", sine_points(0, 200)).status_code == 200
        again = sine_points(100, 50)  # 99 s behind the last stored stamp (199)
        for p in again:  # other values: not a retry of stored points
            p["values"] = [v + 1.0 for v in p["values"]]
        r = post(client, "old", again)
        assert r.status_code == 422, r.text
        assert "body.points.0.timestamp" in r.text and "--reset" in r.text
        assert client.get("/streams/old").json()["points_seen"] == 200
        within = [{"timestamp": 150.0, "values": [0.0]}]  # 49 s behind: nudged
        assert post(client, "old", within).json()["results"][0]["timestamp_action"] == "nudged"
