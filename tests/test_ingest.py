"""The Prometheus-native doors in process: remote-write bodies in (good, bad, retried,
refused by policy, grouped into multichannel streams, on a store that goes down), keys,
the watch API, the score writer against a real HTTP receiver, and the vendored protos.
tests/test_prometheus_e2e.py runs all of it against a real Prometheus server."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from google.protobuf import descriptor_pb2
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.ingest.prompb import remote_pb2, types_pb2
from service.ingest.wire import STALE_NAN_BITS, decode_remote_write, encode_remote_write
from service.ingest.writeback import ScoreWriter
from service.metrics import ServiceMetrics
from service.process import free_port
from service.settings import Settings
from tests.loopback import Answer, LoopbackServer

ROOT = Path(__file__).resolve().parent.parent
NOW = int(time.time() * 1000) - 600_000  # ms, ten minutes ago
FAST = {"default_detector": "residual_linear", "detector_params": {"*": {"warmup": 64}},
        "default_window": 16}
STALE = np.array([STALE_NAN_BITS], dtype=np.uint64).view(np.float64)[0]


def body(*series: tuple[dict, list[tuple[int, float]]]) -> bytes:
    return encode_remote_write([(sorted(labels.items()), samples) for labels, samples in series])


def sine(n: int, start: int = 0) -> list[tuple[int, float]]:
    return [(NOW + (start + i) * 1000, float(np.sin((start + i) / 5))) for i in range(n)]


CPU = {"__name__": "cpu", "instance": "web-1", "job": "node"}
CPU_ID = "cpu.instance:web-1.job:node"


def client(**settings: object) -> TestClient:
    return TestClient(create_app(Settings(**(FAST | settings)),
                                 ServiceMetrics(CollectorRegistry())))


def samples_metric(c: TestClient, outcome: str, door: str = "remote_write") -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(f'tsad_ingest_samples_total{{door="{door}",outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_vendored_protos_are_what_the_generated_modules_hold(tmp_path):
    import grpc_tools
    from grpc_tools import protoc

    folder = ROOT / "service" / "ingest" / "prompb"
    out = tmp_path / "set.pb"
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # descriptor.proto
    assert protoc.main(["protoc", f"-I{folder}", f"-I{well_known}", f"--descriptor_set_out={out}",
                        "--include_imports", str(folder / "remote.proto")]) == 0
    compiled = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(
        out.read_bytes()).file}
    def no_json_names(messages) -> None:  # noqa: ANN001 - protoc adds them, CopyToProto not
        for m in messages:
            for f in m.field:
                f.ClearField("json_name")
            no_json_names(m.nested_type)

    for module in (remote_pb2, types_pb2):
        held = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(held)
        fresh = compiled[module.DESCRIPTOR.name]
        no_json_names(fresh.message_type)
        assert held == fresh, module.__name__
        assert len(held.message_type) >= 5


def test_remote_write_stores_and_scores_a_series_and_a_retry_changes_nothing(service_backend):
    with client(**service_backend.settings) as c:
        payload = body((CPU, sine(300)))
        assert c.post("/api/v1/write", content=payload).status_code == 204
        meta = c.get(f"/streams/{CPU_ID}").json()
        assert meta["points_seen"] == 300 and meta["channels"] == 1
        assert meta["last_timestamp"] == (NOW + 299_000) / 1000
        assert c.post("/api/v1/write", content=payload).status_code == 204  # a retry
        assert c.get(f"/streams/{CPU_ID}").json()["points_seen"] == 300
        window = c.get(f"/streams/{CPU_ID}/window").json()
        assert window["values"][-1][0] == pytest.approx(np.sin(299 / 5))
        assert samples_metric(c, "accepted") == 600


def test_bad_samples_are_dropped_and_counted_their_neighbours_stored():
    future = int((time.time() + 3 * 86400) * 1000)
    samples = [*sine(3), (NOW + 3000, float("nan")), (NOW + 4000, STALE),
               (NOW + 5000, 1e300), (future, 1.0), *sine(2, start=6)]
    with client() as c:
        assert c.post("/api/v1/write", content=body((CPU, samples))).status_code == 204
        assert c.get(f"/streams/{CPU_ID}").json()["points_seen"] == 5
        assert samples_metric(c, "non_finite") == samples_metric(c, "stale") == 1
        assert samples_metric(c, "out_of_bounds") == 2


def test_malformed_bodies_are_4xx_naming_the_problem_and_change_nothing():
    with client() as c:
        r = c.post("/api/v1/write", content=b"not snappy at all")
        assert r.status_code == 400 and "snappy" in r.json()["message"]
        import cramjam
        r = c.post("/api/v1/write", content=bytes(cramjam.snappy.compress_raw(b"\xff" * 9)))
        assert r.status_code == 400 and "WriteRequest" in r.json()["message"]
        r = c.post("/api/v1/write", content=body((CPU, sine(3))),
                   headers={"Content-Encoding": "gzip"})
        assert r.status_code == 415
        r = c.post("/api/v1/write", content=body((CPU, sine(3))),
                   headers={"X-Prometheus-Remote-Write-Version": "2.0.0"})
        assert r.status_code == 415
        assert c.get("/streams").json()["streams"] == []
        # a series without a metric name is skipped and counted; the others are data
        r = c.post("/api/v1/write", content=body(({"job": "x"}, sine(2)), (CPU, sine(2))))
        assert r.status_code == 204 and samples_metric(c, "invalid") == 2
        assert [s["stream"] for s in c.get("/streams").json()["streams"]] == [CPU_ID]


def test_a_bomb_is_refused_before_it_is_inflated():
    with client(max_body_bytes=4096) as c:
        import cramjam
        bomb = bytes(cramjam.snappy.compress_raw(b"\0" * 100_000))
        r = c.post("/api/v1/write", content=bomb)
        assert r.status_code == 413 and "TSAD_MAX_BODY_BYTES" in r.json()["message"]


def test_a_policy_refusal_is_a_2xx_counted_and_the_other_series_are_stored():
    other = {"__name__": "mem", "instance": "web-1", "job": "node"}
    with client() as c:
        assert c.post("/api/v1/write", content=body((CPU, sine(10)))).status_code == 204
        two_days_back = [(NOW - 2 * 86_400_000, 1.0)]  # older data sent again: a 422
        r = c.post("/api/v1/write", content=body((CPU, two_days_back), (other, sine(4))))
        assert r.status_code == 204
        assert samples_metric(c, "rejected") == 1
        assert c.get(f"/streams/{CPU_ID}").json()["points_seen"] == 10
        assert c.get("/streams/mem.instance:web-1.job:node").json()["points_seen"] == 4


def test_keys_ingest_scope_tenant_prefix_and_the_bootstrap_ingest_key():
    admin, ingest = "a" * 40, "i" * 40
    with client(auth="keys", admin_key=admin, ingest_key=ingest) as c:
        payload = body((CPU, sine(5)))
        assert c.post("/api/v1/write", content=payload).status_code == 401
        hdr = {"Authorization": f"Bearer {ingest}"}
        assert c.post("/api/v1/write", content=payload, headers=hdr).status_code == 204
        assert c.get("/streams", headers=hdr).status_code == 403  # ingest only
        key = c.post("/keys", json={"name": "acme", "scopes": ["ingest"], "tenant": "acme"},
                     headers={"Authorization": f"Bearer {admin}"}).json()["key"]
        r = c.post("/api/v1/write", content=payload,
                   headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 204
        ids = [s["stream"] for s in c.get(
            "/streams", headers={"Authorization": f"Bearer {admin}"}).json()["streams"]]
        assert ids == [f"acme.{CPU_ID}", CPU_ID]


def test_grouped_streams_assemble_rows_across_requests(tmp_path, service_backend):
    rules = tmp_path / "ingest.yml"
    rules.write_text("rules:\n  - name: host\n    match: {job: node}\n"
                     "    group_by: [instance]\n    channels: [cpu, mem]\n")
    mem = CPU | {"__name__": "mem"}
    with client(ingest_config=rules, **service_backend.settings) as c:
        # Prometheus shards series: one host's cpu and mem come in different requests
        assert c.post("/api/v1/write", content=body((CPU, sine(5)))).status_code == 204
        meta = c.get("/streams/host.instance:web-1").json()
        assert meta["channels"] == 2 and meta["channel_names"] == ["cpu", "mem"]
        assert meta["points_seen"] == 0  # every row waits for its mem
        mem_values = [(t, v + 100) for t, v in sine(5)]
        assert c.post("/api/v1/write", content=body((mem, mem_values))).status_code == 204
        window = c.get("/streams/host.instance:web-1/window").json()
        assert window["timestamps"] == [(NOW + i * 1000) / 1000 for i in range(5)]
        assert window["values"][2] == pytest.approx([np.sin(2 / 5), np.sin(2 / 5) + 100])
        late = body((mem, [(NOW + 1000, 7.0)]))  # its row is stored already
        assert c.post("/api/v1/write", content=late).status_code == 204
        assert samples_metric(c, "late") == 1
        # a row still missing mem after a newer complete one gets mem's last value
        c.post("/api/v1/write", content=body((CPU, sine(2, start=5)),
                                             (mem, [(NOW + 6000, 5.0)])))
        window = c.get("/streams/host.instance:web-1/window").json()
        assert np.allclose(window["values"][-2:], [[np.sin(1), mem_values[-1][1]],
                                                   [np.sin(6 / 5), 5.0]])


def test_store_outage_is_a_503_and_the_retry_stores_each_point_once(redis_url,
                                                                    redis_server):
    with client(redis_url=redis_url, redis_timeout_seconds=0.5) as c:
        assert c.post("/api/v1/write", content=body((CPU, sine(5)))).status_code == 204
        # Redis stops answering for 2 s (paused, its data kept): the client times out
        subprocess.run(["redis-cli", "-p", str(redis_server.port), "CLIENT", "PAUSE",
                        "2000", "ALL"], check=True, capture_output=True)
        r = c.post("/api/v1/write", content=body((CPU, sine(5, start=5))))
        assert r.status_code == 503 and r.headers["Retry-After"]
        time.sleep(2.0)
        assert c.post("/api/v1/write", content=body((CPU, sine(5, start=5)))).status_code \
            == 204
        assert c.get(f"/streams/{CPU_ID}").json()["points_seen"] == 10


def test_watch_api_needs_prometheus_and_refuses_file_watches(tmp_path):
    with client() as c:
        r = c.put("/watches/a", json={"query": "up", "step": "30s"})
        assert r.status_code == 409 and "TSAD_PROMETHEUS_URL" in r.json()["message"]
    config = tmp_path / "ingest.yml"
    config.write_text("watches:\n  - {name: f, query: up, step: 1m}\n")
    dead = "http://127.0.0.1:9"  # nothing listens: the watch backs off, says why
    with client(prometheus_url=dead, ingest_config=config) as c:
        r = c.put("/watches/a", json={"query": "rate(x[1m])", "step": "30s",
                                      "backfill": "2h"})
        assert r.status_code == 201, r.text
        assert r.json()["step"] == 30 and r.json()["backfill"] == 7200
        assert c.put("/watches/a", json={"query": "y", "step": 30}).status_code == 200
        assert c.put("/watches/f", json={"query": "y", "step": 30}).status_code == 409
        assert c.put("/watches/b", json={"query": "y", "step": "soon"}).status_code == 422
        deadline = time.monotonic() + 10
        while not c.get("/watches/a").json()["last_error"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "ConnectError" in c.get("/watches/a").json()["last_error"]
        assert [w["name"] for w in c.get("/watches").json()["watches"]] == ["a", "f"]
        assert c.delete("/watches/a").status_code == 204
        assert c.get("/watches/a").status_code == 404
        assert c.delete("/watches/f").status_code == 409


class RemoteWriteTarget:
    """A real HTTP remote-write receiver that fails on demand: 503 for the first
    ``unavailable`` requests, 400 for any request holding a sample at ``refuse_ms``."""

    def __init__(self, unavailable: int = 0, refuse_ms: int | None = None) -> None:
        self.unavailable, self.refuse_ms = unavailable, refuse_ms
        self.got: list[tuple[str, int, float]] = []
        self.requests = 0
        self.server = LoopbackServer(self._answer)
        self.url = self.server.url("/api/v1/write")

    def _answer(self, path: str, headers: object, raw: bytes) -> Answer:
        self.requests += 1
        decoded = decode_remote_write(raw, 2**24)
        stamps = {int(round(t * 1000)) for s in decoded.series for t in s.timestamps}
        if self.requests <= self.unavailable:
            return 503, {}, b""
        if self.refuse_ms in stamps:
            return 400, {}, b""
        for s in decoded.series:
            self.got += [(s.labels["__name__"], round(t * 1000), v)
                         for t, v in zip(s.timestamps, s.values, strict=True)]
        return 204, {}, b""


def test_score_writer_retries_then_isolates_a_refused_point(redis_url):
    target = RemoteWriteTarget(unavailable=2, refuse_ms=NOW + 7000)
    settings = Settings(writeback_url=target.url, writeback_flush_seconds=0.05,
                        writeback_backoff_seconds=0.01, writeback_batch_points=16)
    metrics = ServiceMetrics(CollectorRegistry())

    async def go() -> ScoreWriter:
        writer = ScoreWriter(settings, metrics)
        await writer.start()
        writer.enqueue({"stream": "s", "for": "cpu"},
                       [((NOW + i * 1000) / 1000, 1.0 + i, 0.5, i == 3) for i in range(10)])
        writer.enqueue({"stream": "s", "for": "cpu"}, [((NOW + 2000) / 1000, 9.0, 0.5, False)])
        await writer.stop(flush_seconds=5)
        return writer

    asyncio.run(go())
    scores = [(t, v) for name, t, v in target.got if name == "tsad_anomaly_score"]
    assert [t - NOW for t, _ in scores] == [i * 1000 for i in range(10) if i != 7]
    anomaly = {t - NOW: v for name, t, v in target.got if name == "tsad_anomaly"}
    assert anomaly[3000] == 1.0 and anomaly[4000] == 0.0
    dropped = metrics.writeback_points_dropped_total
    assert dropped.labels("rejected")._value.get() == 1
    assert dropped.labels("out_of_order")._value.get() == 1  # the late point for 2 s
    assert metrics.writeback_points_sent_total._value.get() == 9
    target.server.close()


def test_score_writer_queue_is_bounded_oldest_dropped():
    settings = Settings(writeback_url="http://127.0.0.1:9/api/v1/write",
                        writeback_max_points=100)
    metrics = ServiceMetrics(CollectorRegistry())
    writer = ScoreWriter(settings, metrics)
    writer.enqueue({"stream": "s"}, [(float(i), 1.0, None, False) for i in range(150)])
    assert len(writer.queue) == 100 and writer.queue[0][1] == 50_000
    assert metrics.writeback_points_dropped_total.labels("queue_full")._value.get() == 50


def test_score_writer_bound_counts_the_batch_in_flight():
    """While the target is down a batch stays in flight, retried; the points queued behind
    it and the batch together stay within TSAD_WRITEBACK_MAX_POINTS."""
    settings = Settings(writeback_url=f"http://127.0.0.1:{free_port()}/api/v1/write",
                        writeback_max_points=100, writeback_batch_points=40,
                        writeback_flush_seconds=0.01, writeback_backoff_seconds=0.01)
    metrics = ServiceMetrics(CollectorRegistry())

    async def go() -> tuple[int, int, float]:
        writer = ScoreWriter(settings, metrics)
        await writer.start()
        writer.enqueue({"stream": "s"}, [(float(i), 1.0, None, False) for i in range(40)])
        while not writer.inflight:
            await asyncio.sleep(0.01)
        writer.enqueue({"stream": "s"}, [(float(i), 1.0, None, False) for i in range(40, 200)])
        held = (len(writer.queue), writer.inflight, metrics.writeback_queue_points._value.get())
        await writer.stop(flush_seconds=0)
        return held

    queued, inflight, gauge = asyncio.run(go())
    assert (queued, inflight, gauge) == (60, 40, 100)
    assert metrics.writeback_points_dropped_total.labels("queue_full")._value.get() == 100


def test_readme_point_prometheus_section_is_valid_as_written(tmp_path):
    """Its remote_write stanza is a valid Prometheus configuration (promtool), its watch
    is a valid PUT /watches body, and the dashboard it names exists."""
    import json
    import re
    import shutil
    import sys

    import yaml

    from service.ingest.watch import WatchIn

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Point Prometheus at tsad", 1)[1].split("\n## ", 1)[0]
    stanza = re.search(r"```yaml\n(.*?)```", section, re.S)[1]
    config = yaml.safe_load(stanza.replace("<ingest key>", "k" * 40))
    (write,) = config["remote_write"]
    assert write["url"].endswith("/api/v1/write")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump({"scrape_configs": [], **config}))
    promtool = shutil.which("promtool") or shutil.which(
        "promtool", path=str(Path(sys.executable).parent))
    assert promtool, "run `make promtool`"
    check = subprocess.run([promtool, "check", "config", str(path)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    curl = re.search(r"-d '(\{.*?\})'", section, re.S)[1]
    assert WatchIn(**json.loads(curl)).step == 30
    boards = [json.loads(p.read_text())["title"]
              for p in (ROOT / "configs/grafana/dashboards").glob("*.json")]
    assert " ".join(re.search(r"\*\*(tsad / [^*]+)\*\*", section)[1].split()) in boards


def test_the_stream_cap_drops_new_streams_with_a_2xx(tmp_path):
    rules = tmp_path / "ingest.yml"
    rules.write_text("rules:\n  - {name: host, group_by: [instance], channels: [mem]}\n")
    mem = CPU | {"__name__": "mem"}
    with client(max_streams=1, ingest_config=rules) as c:
        r = c.post("/api/v1/write", content=body((CPU, sine(3)), (mem, sine(3))))
        assert r.status_code == 204
        assert len(c.get("/streams").json()["streams"]) == 1
        assert samples_metric(c, "rejected") == 3


def test_stored_points_sent_again_with_new_ones_store_the_new_ones():
    """A watch evaluating again after a crash, or a sender replaying its log, sends
    stored points followed by new ones: one /score batch would be refused whole."""
    with client() as c:
        assert c.post("/api/v1/write", content=body((CPU, sine(10)))).status_code == 204
        again = body((CPU, sine(10) + sine(5, start=10)))
        assert c.post("/api/v1/write", content=again).status_code == 204
        assert c.get(f"/streams/{CPU_ID}").json()["points_seen"] == 15
        assert samples_metric(c, "rejected") == 0


def test_a_deleted_grouped_stream_forgets_the_rows_it_held(tmp_path, service_backend):
    rules = tmp_path / "ingest.yml"
    rules.write_text("rules:\n  - {name: host, group_by: [instance], channels: [cpu, mem]}\n")
    mem = CPU | {"__name__": "mem"}
    with client(ingest_config=rules, **service_backend.settings) as c:
        c.post("/api/v1/write", content=body((CPU, sine(3)), (mem, sine(3))))  # stored
        c.post("/api/v1/write", content=body((CPU, sine(2, start=3))))  # held for mem
        assert c.get("/streams/host.instance:web-1").json()["points_seen"] == 3
        assert c.delete("/streams/host.instance:web-1").status_code == 204
        # the same host again, later: its cpu rows from before the delete are gone
        later = [(t + 60_000, v) for t, v in sine(2)]
        c.post("/api/v1/write", content=body((CPU, later), (mem, later)))
        window = c.get("/streams/host.instance:web-1/window").json()
        assert window["timestamps"] == [(t + 60_000) / 1000 for t, _ in sine(2)]
