"""Per-stream series stay bounded (allow-list and cap), follow the stream's life, and the
open-alerts gauge counts what the store holds; on both stores."""

from __future__ import annotations

import pytest

from tests.test_alerts import W, make_client, spiky


@pytest.fixture
def client(service_backend):
    with make_client(service_backend, metrics_streams="web-*, db-01",
                     metrics_max_streams=2) as c:
        yield c


def sample(client, name: str, **labels: str) -> float | None:
    return client.app.state.metrics.registry.get_sample_value(name, labels)


def series_of(client, stream: str) -> list[str]:
    return sorted({s.name for m in client.app.state.metrics.registry.collect()
                   for s in m.samples if s.labels.get("stream") == stream
                   and not s.name.endswith("_created")})


def test_per_stream_series_for_allow_listed_streams_up_to_the_cap(client):
    client.put("/streams/web-1", json={"channels": 2, "channel_names": ["cpu", "disk"],
                                       "window": W})
    results = {}
    for stream in ("web-1", "api-1", "db-01", "web-2"):
        r = client.post("/score", json={"stream": stream, "points": spiky(400, [350])})
        assert r.status_code == 200 and r.json()["results"][350]["anomaly"]
        results[stream] = r.json()["results"]
    assert series_of(client, "api-1") == []  # not in the allow-list
    assert series_of(client, "web-2") == []  # allowed, but the cap (2) is reached
    assert series_of(client, "web-1") == [
        "tsad_stream_alerts_opened_total", "tsad_stream_anomalies_total",
        "tsad_stream_anomaly", "tsad_stream_likelihood",
        "tsad_stream_points_scored_total", "tsad_stream_score", "tsad_stream_threshold",
        "tsad_stream_top_channel_total"]
    # the series count what the responses said
    assert sample(client, "tsad_stream_points_scored_total", stream="web-1") == sum(
        r["status"] == "scored" for r in results["web-1"])
    assert sample(client, "tsad_stream_anomalies_total", stream="web-1") == sum(
        r["anomaly"] for r in results["web-1"])
    last = [r for r in results["web-1"] if r["score"] is not None][-1]
    assert sample(client, "tsad_stream_score", stream="web-1") == last["score"]
    # the pull alternative to write-back: the last point's likelihood and verdict
    assert sample(client, "tsad_stream_likelihood", stream="web-1") == last["likelihood"]
    assert sample(client, "tsad_stream_anomaly", stream="web-1") == float(last["anomaly"])
    assert sample(client, "tsad_stream_alerts_opened_total", stream="web-1") >= 1
    # the spike is on the second channel, named "disk" for web-1 and "1" for db-01
    assert sample(client, "tsad_stream_top_channel_total", stream="web-1", channel="disk") >= 1
    assert sample(client, "tsad_stream_top_channel_total", stream="db-01", channel="1") >= 1
    assert sample(client, "tsad_stream_threshold", stream="web-1") > 0
    # deleting a stream drops its series and frees its place under the cap
    assert client.delete("/streams/web-1").status_code == 204
    assert series_of(client, "web-1") == []
    client.post("/score", json={"stream": "web-2", "points": spiky(400, [], start=400)})
    assert sample(client, "tsad_stream_points_scored_total", stream="web-2") > 0


def test_open_alerts_gauge_counts_the_store_at_scrape_time(client):
    client.post("/score", json={"stream": "api-1", "points": spiky(360, [350])})
    text = client.get("/metrics").text
    assert "tsad_alerts_open 1.0" in text  # opened at 350, not resolved yet
    client.post("/score", json={"stream": "api-1", "points": spiky(100, [], start=360)})
    assert "tsad_alerts_open 0.0" in client.get("/metrics").text
    # the embedding path's metrics live on the service's registry
    assert 'tsad_embedding_cache_hits_total{level="lru"} 0.0' in text
    assert "tsad_embedding_encode_seconds_count 0.0" in text
