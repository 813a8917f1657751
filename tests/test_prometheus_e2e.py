"""tsad beside a real Prometheus server (the Debian package's binary, `make prometheus`),
all of them processes started here: Prometheus scrapes a small exporter whose synthetic
metric shifts level at a known time, remote-writes it to tsad (an ingest key as its
Bearer credentials), and receives tsad's score write-back; a watch in the same tsad
reads the same series back with PromQL. tsad is killed twice while remote-write flows:
once between storing a batch and scoring it (TSAD_FAULT_CRASH_AFTER_APPEND, which exits
as a kill -9 there would), once by SIGKILL at an arbitrary moment while scores are being
written back; each time it is restarted on the same Redis and Prometheus' retries carry
on.

Then: the remote-write stream raised the alert at the shift and the webhook was
delivered; the score series are queryable with PromQL, labelled like the source; the
watch's stream gives the same verdict; no sample was lost or stored twice, all were
scored once; the watch went on after each restart without a gap or a double; the
dashboard panel's queries find the series.
"""

from __future__ import annotations

import json
import os
import signal
import time
from http.client import HTTPMessage
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from service.ingest.local import Exporter, PrometheusServer, prometheus_binary
from service.process import ServiceProcess, free_port
from service.webhooks.signing import verify
from tests.conftest import wait_for
from tests.loopback import Answer, LoopbackServer

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    prometheus_binary() is None,
    reason="no prometheus binary: `make prometheus` unpacks it from the Debian package")]

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "e2e-admin-" + "a" * 32
INGEST = "e2e-ingest-" + "i" * 32
SECRET = "e2e-webhook-secret-0123"
STEP = 0.2  # scrape interval and watch step, seconds
SHIFT_AFTER = 45.0  # seconds after Prometheus starts: the level shift
END_AFTER = 12.0  # seconds of shifted level before the exporter stops
KILL_AFTER = 36.0  # the SIGKILL, seconds after Prometheus starts: scores are flowing
METRIC = "synthetic_level"
ENV = {"TSAD_AUTH": "keys", "TSAD_ADMIN_KEY": ADMIN, "TSAD_INGEST_KEY": INGEST,
       "TSAD_DEFAULT_DETECTOR": "residual_linear",
       "TSAD_DETECTOR_PARAMS": '{"*": {"warmup": 64}}', "TSAD_DEFAULT_WINDOW": "16",
       "TSAD_THRESHOLD_MIN_SCORES": "50",
       "TSAD_THRESHOLD_CALIBRATION_POINTS": "200", "TSAD_ALERT_QUIET_POINTS": "10",
       "TSAD_WEBHOOK_POLL_SECONDS": "0.05", "TSAD_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
       "TSAD_WRITEBACK_FLUSH_SECONDS": "0.1", "TSAD_WATCH_DELAY_SECONDS": "1",
       "TSAD_LOCK_LEASE_SECONDS": "1", "TSAD_METRICS_STREAMS": "*"}


class Signal:
    """10 + a slow sine + small noise; +5 from ``shift_at`` (epoch s) on."""

    def __init__(self, shift_at: float) -> None:
        self.shift_at = shift_at
        self.rng = np.random.default_rng(7)
        self.stopped = False

    def render(self) -> str:
        if self.stopped:  # the target is gone: Prometheus marks the series stale
            return ""
        now = time.time()
        value = 10 + 0.3 * np.sin(2 * np.pi * now / 6) + self.rng.normal(0, 0.02)
        value += 5 if now >= self.shift_at else 0
        return f"# TYPE {METRIC} gauge\n{METRIC} {value:.6f}\n"


class Receiver:
    """A webhook endpoint recording what it gets."""

    def __init__(self) -> None:
        self.got: list[dict] = []
        self.server = LoopbackServer(self._answer)
        self.url = self.server.url("/hook")

    def _answer(self, path: str, headers: HTTPMessage, body: bytes) -> Answer:
        self.got.append({"body": json.loads(body),
                         "verified": verify(SECRET, headers["X-Tsad-Timestamp"],
                                            headers["X-Tsad-Signature"], body)})
        return 204, {}, b""


def _auth(key: str = ADMIN) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def run(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prom-e2e")
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    signal_ = Signal(shift_at=time.time() + 3600)  # set once Prometheus runs
    exporter = Exporter(signal_.render).start()
    receiver = Receiver()
    prom_port = free_port()
    watch_file = tmp / "ingest.yml"
    watch_file.write_text(yaml.safe_dump({"watches": [
        {"name": "w", "query": METRIC, "step": STEP, "backfill": 120}]}))
    env = {**ENV, "REDIS_URL": redis_server.url,
           "TSAD_WRITEBACK_URL": f"http://127.0.0.1:{prom_port}/api/v1/write",
           "TSAD_PROMETHEUS_URL": f"http://127.0.0.1:{prom_port}",
           "TSAD_INGEST_CONFIG": str(watch_file)}
    log = tmp / "tsad.log"
    # the first instance dies between storing and scoring its 40th batch
    tsad = ServiceProcess({**env, "TSAD_FAULT_CRASH_AFTER_APPEND": "40"}, log_path=log)
    tsad.start()
    port = tsad.port
    r = httpx.post(f"{tsad.url}/webhooks", headers=_auth(), json={
        "url": receiver.url, "secret": SECRET, "streams": "*"})
    assert r.status_code == 201, r.text
    prom = PrometheusServer({
        "global": {"scrape_interval": f"{int(STEP * 1000)}ms",
                   "scrape_timeout": f"{int(STEP * 800)}ms"},
        "scrape_configs": [{"job_name": "synthetic",
                            "static_configs": [{"targets": [exporter.target]}]},
                           {"job_name": "tsad", "scrape_interval": "1s",
                            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
        "remote_write": [{
            "url": f"http://127.0.0.1:{port}/api/v1/write",
            "authorization": {"credentials": INGEST},
            "queue_config": {"batch_send_deadline": "200ms", "min_backoff": "50ms",
                             "max_backoff": "1s"},
            # only the source metric: never tsad's own scores back to tsad
            "write_relabel_configs": [{"source_labels": ["__name__"], "regex": METRIC,
                                       "action": "keep"}]}]},
        port=prom_port, log_path=tmp / "prometheus.log")
    started = time.time()
    signal_.shift_at = started + SHIFT_AFTER
    prom.start()
    exits = []
    try:
        wait_for(lambda: tsad.proc.poll() is not None, timeout=60, interval=0.05)
        exits.append(tsad.proc.returncode)  # the fault injection: 137, like kill -9
        tsad = ServiceProcess(env, port=port, log_path=log).start()
        # scores flow from about 30 s on (warm-up): the kill also cuts the write-back
        time.sleep(max(0.0, started + KILL_AFTER - time.time()))
        os.kill(tsad.proc.pid, signal.SIGKILL)  # wherever it is
        killed_at = time.time()
        tsad.proc.wait()
        exits.append(tsad.proc.returncode)
        tsad = ServiceProcess(env, port=port, log_path=log).start()
        time.sleep(max(0.0, signal_.shift_at + END_AFTER - time.time()))
        signal_.stopped = True
        rw = _stream(tsad, lambda s: s.startswith(f"{METRIC}."))
        w = _stream(tsad, lambda s: s.startswith(f"w.{METRIC}."))
        # quiescent: Prometheus' last samples remote-written, the watch past them
        last = _prom_samples(prom)[-1][0]
        wait_for(lambda: _meta(tsad, rw)["last_timestamp"] == last, timeout=30)
        wait_for(lambda: _meta(tsad, w)["last_timestamp"] >= last - STEP, timeout=30)
        time.sleep(1.0)  # the last write-back flush
        yield {"tsad": tsad, "prom": prom, "rw": rw, "w": w, "exits": exits,
               "receiver": receiver, "shift_at": signal_.shift_at, "killed_at": killed_at,
               "samples": _prom_samples(prom), "log": log}
    finally:
        tsad.stop()
        prom.cleanup()
        exporter.stop()
        receiver.server.close()


def _stream(tsad: ServiceProcess, pick) -> str:  # noqa: ANN001
    streams = httpx.get(f"{tsad.url}/streams", headers=_auth()).json()["streams"]
    (sid,) = [s["stream"] for s in streams if pick(s["stream"])]
    return sid


def _meta(tsad: ServiceProcess, stream: str) -> dict:
    return httpx.get(f"{tsad.url}/streams/{stream}", headers=_auth()).json()


def _alerts(tsad: ServiceProcess, stream: str) -> list[dict]:
    return httpx.get(f"{tsad.url}/alerts", params={"stream": stream},
                     headers=_auth()).json()["alerts"]


def _prom_samples(prom: PrometheusServer) -> list[tuple[float, float]]:
    (series,) = prom.query(f"{METRIC}[10m]")
    return [(float(t), float(v)) for t, v in series["values"]]


def test_both_kills_happened_and_tsad_came_back(run):
    assert run["exits"] == [137, -signal.SIGKILL]
    assert "fault injection: exiting after an append" in run["log"].read_text()


def test_remote_write_raises_the_alert_and_delivers_the_webhook(run):
    alerts = _alerts(run["tsad"], run["rw"])
    assert len(alerts) == 1, alerts
    assert run["shift_at"] <= alerts[0]["opened_at"] <= run["shift_at"] + 2 * STEP + 1
    got = wait_for(lambda: [r for r in run["receiver"].got
                            if r["body"]["alert"]["id"] == alerts[0]["id"]
                            and r["body"]["type"] == "alert.opened"], timeout=20)
    assert all(r["verified"] for r in got)


def test_scores_are_queryable_back_with_promql(run):
    prom, rw = run["prom"], run["rw"]
    (score,) = prom.query(f'tsad_anomaly_score{{stream="{rw}"}}[10m]')
    labels = score["metric"]
    assert labels["for"] == METRIC and labels["job"] == "synthetic" and labels["instance"]
    stamps = [float(t) for t, _ in score["values"]]
    source = [t for t, _ in run["samples"] if t >= stamps[0]]
    assert stamps[0] < run["killed_at"] - 2, "no score was written back before the kill"
    assert set(stamps) <= set(source)  # scored at the samples' own stamps, none nudged
    # the write-back queue lives in the process: a kill loses what it held unsent (a
    # gap in the score series, never a wrong or doubled value; alerts are committed)
    print(f"write-back across the kill -9: {len(source) - len(stamps)} of {len(source)} "
          "scores lost")
    assert len(stamps) >= 0.95 * len(source), (len(stamps), len(source))
    (flagged,) = prom.query(
        f'max_over_time(tsad_anomaly{{stream="{rw}"}}[3s])',
        at=run["shift_at"] + 2)
    assert flagged["value"][1] == "1"
    assert prom.query(f'tsad_anomaly_likelihood{{stream="{rw}"}}[10m]')


def test_watch_gives_the_same_verdict(run):
    rw_alerts, w_alerts = _alerts(run["tsad"], run["rw"]), _alerts(run["tsad"], run["w"])
    assert len(w_alerts) == len(rw_alerts) == 1, (rw_alerts, w_alerts)
    assert abs(w_alerts[0]["opened_at"] - rw_alerts[0]["opened_at"]) <= 2 * STEP + 1e-6


def test_kill_9_loses_no_sample_and_scores_none_twice(run):
    meta, samples = _meta(run["tsad"], run["rw"]), run["samples"]
    print(f"kill -9: {len(samples)} samples in Prometheus, {meta['points_seen']} stored, "
          f"{meta['points_seen'] - len(samples)} extra")
    assert meta["points_seen"] == len(samples)  # fewer: lost; more: stored twice
    assert meta["last_timestamp"] == samples[-1][0]
    window = httpx.get(f"{run['tsad'].url}/streams/{run['rw']}/window",
                       headers=_auth()).json()
    held = len(window["timestamps"])
    assert window["timestamps"] == [t for t, _ in samples[-held:]]
    assert [v[0] for v in window["values"]] == pytest.approx([v for _, v in samples[-held:]])
    metrics = httpx.get(f"{run['tsad'].url}/metrics").text
    assert 'tsad_points_reordered_total{action="nudged"} 0.0' in metrics


def test_watch_resumes_after_each_restart_without_gap_or_double(run):
    meta = _meta(run["tsad"], run["w"])
    first = np.ceil(run["samples"][0][0] / STEP) * STEP  # the first step with a value
    # the steps Prometheus evaluates the query at to a value: every step, unless a scrape
    # failed on a loaded machine (Prometheus then marks the series stale until the next)
    (evaluated,) = run["prom"].query_range(METRIC, start=float(first),
                                           end=meta["last_timestamp"], step=STEP)
    up = run["prom"].query('min_over_time(up{job="synthetic"}[10m])')
    assert meta["points_seen"] == len(evaluated["values"]), up
    window = httpx.get(f"{run['tsad'].url}/streams/{run['w']}/window",
                       headers=_auth()).json()["timestamps"]
    # the window's stamps are the last evaluated steps (a step Prometheus skipped after a
    # failed scrape is skipped here too; one tsad dropped or doubled is not)
    steps = [float(t) for t, _ in evaluated["values"]]
    assert np.allclose(window, steps[-len(window):]), up
    watch = httpx.get(f"{run['tsad'].url}/watches/w", headers=_auth()).json()
    assert watch["source"] == "file" and watch["running_here"] and not watch["last_error"]


def test_the_dashboard_panel_finds_the_series(run):
    board = json.loads((ROOT / "configs/grafana/dashboards/tsad-prometheus.json").read_text())
    variables = {"metric": METRIC, "stream": run["rw"], "__rate_interval": "1m",
                 "__interval": "15s", "__range": "10m"}
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in board["annotations"]["list"] if a.get("expr")]
    assert len(exprs) >= 4
    for expr in exprs:
        for name, value in variables.items():
            expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
        shift = run["shift_at"]
        assert run["prom"].query_range(expr, shift - 5, shift + 10, STEP), expr
