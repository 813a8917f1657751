"""Real processes: the service under uvicorn, a real redis-server, real HTTP clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from service.process import ServiceProcess
from service.replay import iso
from tests.conftest import DATA_DIR, RedisServer

pytestmark = pytest.mark.slow  # real processes; `make test` runs them

ROOT = DATA_DIR.parents[1]

W = 64
FAST_WARMUP = '{"*": {"warmup": 64}}'  # TSAD_DETECTOR_PARAMS: scores from point 128


@pytest.fixture
def live_service(redis_url):
    env = {"REDIS_URL": redis_url, "TSAD_DEFAULT_WINDOW": str(W),
           "TSAD_DETECTOR_PARAMS": FAST_WARMUP}
    with ServiceProcess(env) as service:
        yield service


def batch(start: int, n: int) -> list[dict]:
    return [{"timestamp": float(t), "values": [float(t % 17), float(t % 5)]}
            for t in range(start, start + n)]


@pytest.mark.parametrize("policy", ["reject", "nudge"])
def test_32_concurrent_clients_lose_and_duplicate_nothing(redis_url, policy):
    """32 clients post interleaved batches to one stream; every acknowledged point is in
    the window exactly once, in order, and rejected batches left no trace. With the
    timestamp policy nudge, batches that lose the race are stored after the winners."""
    clients, rounds, size = 32, 8, 5
    accepted: dict[float, list[float]] = {}  # stored timestamp -> values sent
    statuses: list[int] = []

    async def client(k: int, http: httpx.AsyncClient) -> None:
        for r in range(rounds):
            start = (r * clients + k) * size  # client k owns every 32nd batch
            points = batch(start, size)
            resp = await http.post("/score", json={"stream": "shared", "points": points})
            statuses.append(resp.status_code)
            if resp.status_code == 200:
                results = resp.json()["results"]
                assert len(results) == size
                for p, res in zip(points, results, strict=True):
                    assert res["stored_timestamp"] not in accepted
                    accepted[res["stored_timestamp"]] = p["values"]
            else:
                assert policy == "reject" and resp.status_code == 422, resp.text
                assert "body.points.0.timestamp" in resp.json()["message"]

    async def main(url: str) -> None:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
            await asyncio.gather(*(client(k, http) for k in range(clients)))

    env = {"REDIS_URL": redis_url, "TSAD_DEFAULT_WINDOW": str(W),
           "TSAD_DETECTOR_PARAMS": FAST_WARMUP,
           "TSAD_TIMESTAMPS": policy}
    with ServiceProcess(env) as service:
        asyncio.run(main(service.url))
        meta = httpx.get(f"{service.url}/streams/shared").json()
        window = httpx.get(f"{service.url}/streams/shared/window").json()
    assert len(statuses) == clients * rounds and accepted
    if policy == "nudge":
        assert statuses == [200] * clients * rounds
    assert meta["points_seen"] == len(accepted)
    expected = sorted(accepted)[-W:]
    assert window["timestamps"] == expected
    assert window["values"] == [accepted[t] for t in expected]


def test_redis_outage_gives_503_and_recovers_by_itself():
    redis = RedisServer()
    redis.start()
    env = {"REDIS_URL": redis.url, "TSAD_DETECTOR_PARAMS": FAST_WARMUP,
           "TSAD_REDIS_TIMEOUT_SECONDS": "1"}
    try:
        with ServiceProcess(env) as service:
            url = service.url
            assert httpx.post(f"{url}/score", json={"stream": "o", "points": batch(0, 100)},
                              timeout=10).status_code == 200
            redis.stop()
            r = httpx.post(f"{url}/score", json={"stream": "o", "points": batch(100, 10)},
                           timeout=10)
            assert r.status_code == 503
            assert "store unavailable" in r.json()["message"]
            assert int(r.headers["Retry-After"]) > 0
            assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503
            assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
            assert "tsad_window_store_up" in httpx.get(f"{url}/metrics").text

            redis.start()  # same port, empty (no persistence in tests)
            deadline = time.monotonic() + 20
            while True:
                r = httpx.post(f"{url}/score", json={"stream": "o", "points": batch(200, 10)},
                               timeout=10)
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert r.status_code == 200, r.text
            assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
            metrics = httpx.get(f"{url}/metrics").text
            assert 'tsad_window_store_up{backend="redis"} 1.0' in metrics
            assert "tsad_window_store_errors_total{" in metrics
    finally:
        redis.stop()


def test_replay_cli_posts_a_nab_series_and_reports(live_service, tmp_path):
    """`tsad replay` against the running service: the README's first-contact path, with
    `--plot` (the labelled windows found beside the file) into runs/plots/, then the same
    file again, which the stream refuses with a hint to start over."""
    out = tmp_path / "results.jsonl"
    replay = [sys.executable, "-m", "service.cli", "replay",
              str(DATA_DIR / "nab" / "nyc_taxi.csv"), "--stream", "nyc_taxi",
              "--url", live_service.url, "--batch", "500"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*replay, "--out", str(out), "--plot"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["points"] == 10320 and summary["scored"] > 10000
    assert summary["anomalies"] > 0
    flagged = [line for line in lines if line.startswith("anomaly at ")]
    assert flagged and all(re.match(r"anomaly at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: ", line)
                           for line in flagged), flagged[:3]
    windows = summary["windows"]
    assert windows["labelled"] == 5 and windows["hit"] + len(windows["missed"]) == 5
    assert windows["hit"] >= 1  # tests/test_api.py checks how well, at these settings too
    assert summary["plot"] == "runs/plots/nyc_taxi.png"
    assert (tmp_path / "runs/plots/nyc_taxi.png").stat().st_size > 10_000
    results = out.read_text().splitlines()
    assert len(results) == 10320 and json.loads(results[-1])["status"] == "scored"

    again = subprocess.run(replay, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                           env=env)
    assert again.returncode == 1
    (hint,) = again.stderr.strip().splitlines()[-1:]  # the hint alone, no 422 body first
    assert "already holds points up to 2015-01-31T23:30:00Z" in hint and "--reset" in hint
    assert "error 422" not in again.stderr + again.stdout and "{" not in again.stderr


def test_demo_ends_in_one_anomaly_and_one_alert(redis_url, tmp_path):
    """`tsad demo` against a service at default settings (the README's first contact):
    the stream warms up, the spike is the one anomaly, and it opens one alert."""
    from service.demo import POINTS, SPIKE

    demo = [sys.executable, "-m", "service.cli", "demo", "--url"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with ServiceProcess({"REDIS_URL": redis_url}) as service:
        proc = subprocess.run([*demo, service.url], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env=env)
        # again (the stream deleted first): the first run's alert, kept, is not counted
        (tmp_path / "again").mkdir()
        again = subprocess.run([*demo, service.url], capture_output=True, text=True,
                               timeout=120, cwd=tmp_path / "again", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(again.stdout.splitlines()[-1])["alerts"] == 1, again.stdout
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["points"] == POINTS and summary["scored"] == POINTS - 320
    assert summary["anomalies"] == 1 and summary["alerts"] == 1
    spike = json.loads((tmp_path / "runs/demo/demo.csv").read_text().splitlines()[SPIKE + 1]
                       .split(",")[0])
    assert any(line.startswith(f"anomaly at {iso(spike)}") for line in lines), lines
    assert any(line.startswith("alert ") and f"opened {iso(spike)}" in line for line in lines)
