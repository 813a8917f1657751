"""POST /v1/metrics with the official OpenTelemetry Python SDK's OTLP/HTTP exporter as
the client (protobuf, gzip-compressed), against the service as a real process; then the
same SDK's encoding sent as OTLP/JSON."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from service.process import ServiceProcess

pytestmark = pytest.mark.slow  # a real process

INGEST = "otlp-ingest-" + "k" * 32
ADMIN = "otlp-admin-" + "k" * 32
ENV = {"TSAD_AUTH": "keys", "TSAD_INGEST_KEY": INGEST, "TSAD_ADMIN_KEY": ADMIN,
       "TSAD_DEFAULT_DETECTOR": "residual_linear",
       "TSAD_DETECTOR_PARAMS": '{"*": {"warmup": 64}}', "TSAD_DEFAULT_WINDOW": "16",
       "TSAD_THRESHOLD_MIN_SCORES": "50"}
GAUGE = "checkout_queue_depth.instance:pod-1.job:checkout.region:eu"
COUNTER = "checkout_orders_total.instance:pod-1.job:checkout"
SHIFT = 220  # scoring starts at point 144 (window 16, then 64-point chunks)


def _get(service: ServiceProcess, path: str, **params: object) -> dict:
    return httpx.get(service.url + path, params=params,
                     headers={"Authorization": f"Bearer {ADMIN}"}).json()


@pytest.fixture(scope="module")
def service():
    with ServiceProcess(ENV) as s:
        yield s


def test_the_sdk_exporter_feeds_gauges_and_sums_that_raise_an_alert(service):
    rng = np.random.default_rng(3)
    values = 10 + rng.normal(0, 0.05, 260)
    values[SHIFT:] += 5  # the queue backs up
    step = {"i": 0}

    def depth(_options):  # noqa: ANN001, ANN202 - the SDK's callback
        yield Observation(float(values[step["i"]]), {"region": "eu"})

    exporter = OTLPMetricExporter(endpoint=f"{service.url}/v1/metrics",
                                  headers={"Authorization": f"Bearer {INGEST}"},
                                  compression=Compression.Gzip)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create(
        {"service.name": "checkout", "service.instance.id": "pod-1"}))
    meter = provider.get_meter("shop")
    meter.create_observable_gauge("checkout.queue.depth", callbacks=[depth])
    orders = meter.create_counter("checkout.orders")
    meter.create_histogram("checkout.latency").record(0.2)  # not scored: counted
    for i in range(len(values)):
        step["i"] = i
        orders.add(2)
        assert provider.force_flush(10_000)
    gauge = _get(service, f"/streams/{GAUGE}")
    assert gauge["points_seen"] == len(values)
    window = _get(service, f"/streams/{GAUGE}/window")
    assert np.allclose([v[0] for v in window["values"]], values[-len(window["values"]):])
    counter = _get(service, f"/streams/{COUNTER}/window")
    assert counter["values"][-1] == [2.0 * len(values)]  # cumulative, monotonic: _total
    (alert,) = _get(service, "/alerts", stream=GAUGE)["alerts"]  # the shift, once
    assert alert["opened_at"] < window["timestamps"][0]  # held: the last 16, shifted
    assert alert["peak_score"] > 10 * alert["threshold"]
    metrics = httpx.get(f"{service.url}/metrics").text
    assert 'tsad_ingest_samples_total{door="otlp",outcome="unsupported"}' in metrics
    provider.shutdown()  # (exports once more)


def test_otlp_json_is_read_like_protobuf_and_answered_in_json(service):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create(
        {"service.name": "json-job", "service.instance.id": "i-7"}))
    provider.get_meter("m").create_counter("jobs.done").add(5, {"queue": "a"})
    provider.get_meter("m").create_histogram("jobs.seconds").record(1.0)
    request = encode_metrics(reader.get_metrics_data())
    doc = json_format.MessageToDict(request, use_integers_for_enums=True)
    headers = {"Authorization": f"Bearer {INGEST}", "Content-Type": "application/json"}
    r = httpx.post(f"{service.url}/v1/metrics", content=json.dumps(doc), headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["partialSuccess"]["rejectedDataPoints"] == "1"  # the histogram
    window = _get(service, "/streams/jobs_done_total.instance:i-7.job:json-job.queue:a/window")
    assert window["values"] == [[5.0]]
    bad = httpx.post(f"{service.url}/v1/metrics", content=b"{not json", headers=headers)
    assert bad.status_code == 400 and "JSON" in bad.json()["message"]
    other = httpx.post(f"{service.url}/v1/metrics", content=b"x",
                       headers={**headers, "Content-Type": "text/plain"})
    assert other.status_code == 415
