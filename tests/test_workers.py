"""`tsad serve --workers 2`: /metrics is the whole service, not the worker that answers."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from service.process import ServiceProcess

pytestmark = pytest.mark.slow  # real processes; `make test` runs them


def points_per_worker(metrics_base: Path) -> dict[str, float]:
    """tsad_points_ingested_total as each worker wrote it (its own counter file)."""
    out: dict[str, float] = {}
    for path in metrics_base.glob("tsad-metrics-*/counter_*.db"):
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == "tsad_points_ingested_total":
                out[path.stem.removeprefix("counter_")] = value
    return out


def test_metrics_merge_every_worker(redis_url, tmp_path):
    env = {"REDIS_URL": redis_url, "TSAD_DEFAULT_DETECTOR": "residual_linear",
           "TSAD_DEFAULT_WINDOW": "16", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    sent = requests = 0

    def post(k: int, start: int) -> int:
        points = [{"timestamp": float(t), "values": [float(t % 7)]}
                  for t in range(start, start + 10 + k)]
        # a new connection each time: the kernel hands it to either worker
        r = httpx.post(f"{service.url}/score", json={"stream": f"s{k}", "points": points},
                       timeout=30)
        assert r.status_code == 200, r.text
        return len(points)

    with ServiceProcess(env, workers=2) as service:
        with ThreadPoolExecutor(8) as pool:
            for rnd in range(40):  # until both workers have served some
                sent += sum(pool.map(post, range(8), [rnd * 100] * 8))
                requests += 8
                if len(per_worker := points_per_worker(tmp_path)) == 2 and all(
                        per_worker.values()):
                    break
        text = httpx.get(f"{service.url}/metrics").text
        per_worker = points_per_worker(tmp_path)
    assert len(per_worker) == 2 and all(per_worker.values()), per_worker
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("tsad_points_ingested_total", ())] == sent == sum(per_worker.values())
    assert samples[("tsad_http_requests_total", (("method", "POST"), ("route", "/score"),
                                                 ("status", "200")))] == requests
    # a gauge merged by its mode (livemin: one value, not one per worker)
    assert [k for k in samples if k[0] == "tsad_window_store_up"] == [
        ("tsad_window_store_up", (("backend", "redis"),))]
    assert samples[("tsad_window_store_up", (("backend", "redis"),))] == 1
    assert not list(tmp_path.iterdir()), "the run's metrics directory outlives it"
