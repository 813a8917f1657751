"""The service on a Redis Cluster: three masters from `redis-server --cluster-enabled yes`
on loopback, two service processes sharing one stream, and one killed mid-stream."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from service.process import ServiceProcess
from tests.conftest import RedisClusterNodes, wait_for
from tests.test_alerts import spiky
from tests.test_webhooks_integration import FAST, Receiver, subscribe

pytestmark = pytest.mark.slow  # real processes; `make test` runs them


@pytest.fixture(scope="module")
def cluster(redis_cluster: RedisClusterNodes) -> RedisClusterNodes:
    return redis_cluster


@pytest.fixture
def cluster_env(cluster: RedisClusterNodes) -> dict[str, str]:
    for port in cluster.ports:  # a clean cluster per test
        cluster.cli(port, "flushall")
    return {"TSAD_REDIS_URL": cluster.url, "TSAD_REDIS_CLUSTER": "true", **FAST}


BATCH = 50


def test_two_processes_on_a_cluster_score_like_one_process(redis_url, cluster,
                                                           cluster_env, tmp_path):
    """One stream's batches alternate between two processes on the cluster; results,
    alerts and webhook events are those of one process on a single Redis."""
    points = spiky(400, [350])
    batches = [points[i:i + BATCH] for i in range(0, len(points), BATCH)]

    def post(url: str, batch: list[dict], stream: str = "web-01") -> list[dict]:
        r = httpx.post(f"{url}/score", json={"stream": stream, "points": batch}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["results"]

    with ServiceProcess({"REDIS_URL": redis_url, **FAST}) as single:
        expected = [res for b in batches for res in post(single.url, b)]
        expected_alerts = httpx.get(f"{single.url}/alerts").json()["alerts"]
    assert any(r["anomaly"] for r in expected) and expected_alerts

    receiver = Receiver(tmp_path / "requests.jsonl").start()
    try:
        with ServiceProcess(cluster_env) as a, ServiceProcess(cluster_env) as b:
            subscribe(a.url, receiver.url)
            got = [res for k, batch in enumerate(batches)
                   for res in post((a, b)[k % 2].url, batch)]
            assert got == expected
            # both read the alerts the other wrote: those of one process (ids differ:
            # they carry the stream's life, and this is another stream than `single`'s)
            seen = [httpx.get(f"{s.url}/alerts").json()["alerts"] for s in (a, b)]
            assert [x["id"] for x in seen[0]] == [x["id"] for x in seen[1]]
            for alerts in seen:
                assert [(x["state"], x["opened_at"]) for x in alerts] == [
                    (x["state"], x["opened_at"]) for x in expected_alerts]
            events = wait_for(lambda: [r["body"] for r in receiver.requests()])
            assert events[0]["alert"]["id"] == seen[0][-1]["id"]
            # streams spread over the masters: listing reads every node
            streams = [f"s{k}" for k in range(12)]
            for s in streams:
                post(b.url, points[:5], stream=s)
            assert len({cluster.node_of(f"tsad:{{{s}}}:meta") for s in streams}) > 1
            listed = httpx.get(f"{a.url}/streams").json()["streams"]
            assert sorted(x["stream"] for x in listed) == sorted([*streams, "web-01"])
            assert httpx.delete(f"{a.url}/streams/s0").status_code == 204
            assert httpx.get(f"{b.url}/streams/s0").status_code == 404
    finally:
        receiver.stop()


def test_a_process_killed_mid_stream_loses_no_acknowledged_point(cluster, cluster_env):
    """Batches alternate between two processes; one is killed (SIGKILL) while a batch is
    in flight to it, and the stream goes on through the other. Every acknowledged batch is
    stored, visible from the other process at once, and the killed batch, never
    acknowledged, is stored whole or not at all (the append is atomic). A fast machine may
    answer a batch before the kill lands: that batch counts as acknowledged, and the kill
    is tried again, sooner, on the next one."""
    kill_delays = (0.3, 0.1, 0.03, 0.01, 0.0)  # seconds from sending to SIGKILL
    sizes = [200] * 5 + [5000] * len(kill_delays) + [200] * 4  # kill batches: long in flight
    stamps = [1_700_000_000.0 + 60 * t for t in range(sum(sizes))]
    points = [{"timestamp": ts, "values": [float(i % 13), float(i % 7)]}
              for i, ts in enumerate(stamps)]
    ends = [sum(sizes[:k + 1]) for k in range(len(sizes))]
    batches = [points[end - n:end] for n, end in zip(sizes, ends, strict=True)]
    before, to_kill = batches[:5], batches[5:5 + len(kill_delays)]
    after = batches[5 + len(kill_delays):]
    stored: list[float] = []  # what the stream must hold, in order

    def post(url: str, batch: list[dict]) -> httpx.Response:
        return httpx.post(f"{url}/score", json={"stream": "k", "points": batch}, timeout=60)

    def until_acknowledged(url: str, other: str, batch: list[dict]) -> None:
        deadline = time.monotonic() + 90  # a dead holder's lock lease runs out first
        while (r := post(url, batch)).status_code != 200:
            assert r.status_code == 503 and time.monotonic() < deadline, r.text
            time.sleep(0.5)
        acknowledged(r, batch)
        window = httpx.get(f"{other}/streams/k/window").json()["timestamps"]
        assert window == stored[-len(window):]  # durable in the cluster, not in one process

    def acknowledged(r: httpx.Response, batch: list[dict]) -> None:
        sent = [p["timestamp"] for p in batch]
        assert [x["stored_timestamp"] for x in r.json()["results"]] == sent
        stored.extend(sent)

    with ServiceProcess(cluster_env) as a:
        b = ServiceProcess(cluster_env).start()
        try:
            for k, batch in enumerate(before):
                first, second = (a, b) if k % 2 == 0 else (b, a)
                until_acknowledged(first.url, second.url, batch)
            for delay, batch in zip(kill_delays, to_kill, strict=True):
                answers: list[httpx.Response] = []
                failed: list[BaseException] = []

                def in_flight(url: str = b.url, batch: list[dict] = batch,
                              answers: list = answers, failed: list = failed) -> None:
                    try:
                        answers.append(post(url, batch))
                    except httpx.HTTPError as exc:
                        failed.append(exc)

                thread = threading.Thread(target=in_flight)
                thread.start()
                time.sleep(delay)  # the batch is being sent, parsed, stored or scored
                b.proc.kill()
                thread.join(timeout=30)
                if failed:  # killed in flight, never acknowledged
                    last = wait_for(lambda: httpx.get(f"{a.url}/streams/k").json())
                    if last["last_timestamp"] == batch[-1]["timestamp"]:  # stored whole
                        stored.extend(p["timestamp"] for p in batch)
                    else:  # or not at all
                        assert last["last_timestamp"] == stored[-1]
                    break
                assert answers and answers[0].status_code == 200, answers  # answered first
                acknowledged(answers[0], batch)
                b.stop()
                b = ServiceProcess(cluster_env).start()
            else:
                pytest.fail("every kill landed after the answer: the machine is too fast "
                            "for these batch sizes")
            for batch in after:
                until_acknowledged(a.url, a.url, batch)
        finally:
            b.stop()
        meta = httpx.get(f"{a.url}/streams/k").json()
        window = httpx.get(f"{a.url}/streams/k/window").json()
    assert meta["points_seen"] == len(stored)  # none lost, none twice
    assert window["timestamps"] == stored[-len(window["timestamps"]):]


def test_embedding_cache_reads_and_writes_across_the_cluster(cluster, cluster_env):
    """Prompt keys hash to every slot: one MGET per node, no cross-slot error absorbed."""
    from prometheus_client import CollectorRegistry

    from models.lm.cache import CacheConfig, RedisStore, prompt_key
    from models.lm.metrics import EmbeddingMetrics

    registry = CollectorRegistry()
    store = RedisStore.from_url(cluster.url, CacheConfig(redis_cluster=True),
                                EmbeddingMetrics(registry))
    items = {prompt_key("tsad:emb:v1", "m", f"prompt {i}"): bytes([i]) for i in range(40)}
    assert len({cluster.node_of(k) for k in items}) == 3
    store.set_many(items)
    assert store.get_many([*items, "tsad:emb:v1:m:absent"]) == [*items.values(), None]
    assert registry.get_sample_value("tsad_embedding_cache_errors_total",
                                     {"backend": "redis", "operation": "get"}) == 0
    assert registry.get_sample_value("tsad_embedding_cache_errors_total",
                                     {"backend": "redis", "operation": "set"}) == 0
