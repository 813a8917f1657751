"""The docker compose topology as local processes: a real redis-server (the fixture), the
service (service/process.py), the demo webhook receiver (`tsad receive`, subscribing
itself) and the replay tool (`tsad replay`) on a NAB slice with a synthetic anomaly.

Then the monitoring contract: every metric that a Grafana dashboard or a Prometheus rule
queries is in the running service's /metrics, with the labels the queries use.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.process import ServiceProcess, free_port
from service.replay import load_series
from tests.conftest import DATA_DIR, wait_for

pytestmark = pytest.mark.slow  # real processes; `make test` runs them

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "configs" / "grafana" / "dashboards").glob("*.json"))
RULES = sorted((ROOT / "configs" / "prometheus" / "rules").glob("*.yml"))
SECRET = "stack-test-secret-0123"
SPIKE_ROW = 500
# the compose stack's settings, with a short warm-up so a 700-point slice raises an alert.
# Residual linear: the default ensemble flags new records, and two weeks of taxi demand
# after a one-day warm-up still set weekly records (tests/test_batching.py and
# tests/test_api.py test the default end to end).
ENV = {"TSAD_METRICS_STREAMS": "nyc_*", "TSAD_METRICS_MAX_STREAMS": "5",
       "TSAD_DEFAULT_DETECTOR": "residual_linear",
       "TSAD_DETECTOR_PARAMS": '{"*": {"warmup": 64}}', "TSAD_DEFAULT_WINDOW": "16",
       "TSAD_THRESHOLD_MIN_SCORES": "50", "TSAD_THRESHOLD_CALIBRATION_POINTS": "200",
       "TSAD_ALERT_QUIET_POINTS": "10", "TSAD_WEBHOOK_POLL_SECONDS": "0.05",
       "TSAD_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"}  # the receiver is on loopback


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    """Runs the whole demo once; the tests below read what it left."""
    tmp = tmp_path_factory.mktemp("stack")
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    series = load_series(DATA_DIR / "nab" / "nyc_taxi.csv")[:700]
    series[SPIKE_ROW, 1] *= 3  # taxi demand triples for half an hour
    csv = tmp / "nyc_taxi_spike.csv"
    np.savetxt(csv, series, delimiter=",", header="timestamp,value", comments="", fmt="%.1f")
    log = tmp / "received.jsonl"
    port = free_port()
    with ServiceProcess({"REDIS_URL": redis_server.url, **ENV}) as service:
        receiver = subprocess.Popen(
            cli("receive", "--port", str(port), "--subscribe", service.url,
                "--secret", SECRET, "--log", str(log), "--wait", "20"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        try:
            # the receiver answers 204 once it has subscribed itself
            wait_for(lambda: _status(f"http://127.0.0.1:{port}/") == 204, timeout=20.0)
            replay = subprocess.run(
                cli("replay", str(csv), "--stream", "nyc_taxi", "--url", service.url,
                    "--batch", "50", "--reset", "--plot", str(tmp / "replay.png")),
                capture_output=True, text=True, timeout=120, cwd=ROOT)
            assert replay.returncode == 0, replay.stdout + replay.stderr

            def received() -> list[dict]:
                lines = log.read_text().splitlines() if log.exists() else []
                return [json.loads(line) for line in lines]

            # deliveries run concurrently: wait for both the opening and the resolution
            got = wait_for(lambda: {"alert.opened", "alert.resolved"} <= {
                r["body"]["type"] for r in received()} and received(), timeout=20.0)
            alerts = httpx.get(f"{service.url}/alerts").json()["alerts"]
            # a shadow detector beside the live one: the per-stream dashboard's shadow
            # panels query its series (a chunk more of the file: it catches up once)
            assert httpx.put(f"{service.url}/streams/nyc_taxi/shadows/candidate",
                             json={"detector": "ensemble"}).status_code == 201
            more = load_series(DATA_DIR / "nab" / "nyc_taxi.csv")[700:764]
            assert httpx.post(f"{service.url}/score", json={
                "stream": "nyc_taxi", "timestamps": more[:, 0].tolist(),
                "values": more[:, 1:].tolist()}).status_code == 200
            metrics = httpx.get(f"{service.url}/metrics").text
        finally:
            receiver.terminate()
            out, _ = receiver.communicate(timeout=10)
    return {"replay": replay, "received": got, "receiver_out": out, "metrics": metrics,
            "alerts": alerts, "png": tmp / "replay.png", "spike_ts": float(series[SPIKE_ROW, 0])}


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.HTTPError:
        return 0


def test_replayed_anomaly_reaches_the_subscribed_receiver_signed(stack):
    got = stack["received"]
    opened = [r for r in got if r["body"]["type"] == "alert.opened"]
    assert len(opened) == 1, [r["body"]["type"] for r in got]
    alert = opened[0]["body"]["alert"]
    assert alert["stream"] == "nyc_taxi"
    assert alert["opened_at"] <= stack["spike_ts"] <= alert["updated_at"]
    assert all(r["verified"] for r in got)  # the secret the receiver subscribed with
    opened_line = [line for line in stack["receiver_out"].splitlines()
                   if line.startswith(f"alert.opened stream=nyc_taxi severity={alert['severity']}")]
    assert opened_line and opened_line[0].endswith(" signature ok"), stack["receiver_out"]


def test_replay_prints_the_alerts_and_a_summary_and_plots(stack):
    lines = stack["replay"].stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["points"] == 700 and 500 < summary["scored"] < 700  # after warm-up
    assert summary["anomalies"] >= 1 and summary["alerts"] == len(stack["alerts"]) == 1
    assert summary["alerts_open"] == 0 and summary["latency_ms"]["p50"] > 0
    alert = stack["alerts"][0]
    assert any(line.startswith(f"alert {alert['id']} {alert['severity']}: opened")
               for line in lines)
    assert any(line.startswith("anomaly at ") for line in lines)
    png = stack["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


# --- every metric queried by a dashboard or a rule exists in /metrics ----------------------
NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
               "unless", "bool", "offset", "inf", "nan"}
BUILTIN = {"up"}  # written by Prometheus itself for every scrape target
# written back to Prometheus by remote-write (TSAD_WRITEBACK_URL), not on /metrics:
# tests/test_prometheus_e2e.py queries them, and every panel of their dashboard, in a
# real Prometheus
WRITTEN_BACK = {"tsad_anomaly_score", "tsad_anomaly_likelihood", "tsad_anomaly"}


def selectors(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """PromQL -> ([(metric name, label names it matches on)], labels in by/without/on).

    >>> selectors('sum by (le) (rate(a_bucket{route=~"$r"}[$__rate_interval])) / b')
    ([('a_bucket', {'route'}), ('b', set())], {'le'})
    """
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, $variables
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges and subqueries: [5m], [$__range]
    grouping: set[str] = set()
    for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)",
                         e):
        grouping |= {x.strip() for x in m.group(1).split(",") if x.strip()}
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    out = []
    for m in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?\s*(\()?", e):
        name, matchers, call = m.groups()
        if call or name in NOT_METRICS:  # a function or an aggregation
            continue
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers or ""))
        out.append((name, labels))
    return out, grouping


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard target, template variable and alert rule."""
    found = []

    def walk(panels: list, board: str) -> None:
        for p in panels:
            for t in p.get("targets", []):
                found.append((f"{board}: {p.get('title')}", t["expr"]))
            walk(p.get("panels", []), board)

    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        walk(board["panels"], path.name)
        for var in board.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                m = re.fullmatch(r"label_values\((\w+)(\{[^}]*\})?\s*,\s*(\w+)\)",
                                 q.strip())
                assert m, f"{path.name}: variable {var['name']}: unexpected query {q!r}"
                matchers = m[2][1:-1] + "," if m[2] else ""
                found.append((f"{path.name}: ${var['name']}",
                              f"{m[1]}{{{matchers}{m[3]}!=\"\"}}"))
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                found.append((f"{path.name}: {rule.get('alert') or rule.get('record')}",
                              rule["expr"]))
    return found


def test_the_query_collection_sees_every_dashboard_and_rule():
    found = queries()
    assert len(DASHBOARDS) >= 2 and RULES
    assert sum(w.startswith("tsad-overview") for w, _ in found) >= 25
    assert sum(w.startswith("tsad-stream") for w, _ in found) >= 10
    assert sum(w.startswith("tsad.yml") for w, _ in found) >= 5


def test_every_queried_metric_and_label_is_exported(stack):
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(stack["metrics"]):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    jobs = {c["job_name"] for c in yaml.safe_load(
        (ROOT / "configs" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]}
    problems = []
    for where, expr in queries():
        names, grouping = selectors(expr)
        assert names, f"{where}: no metric in {expr!r}"
        if any(n in WRITTEN_BACK for n, _ in names):
            continue  # its labels are the source series' (tests/test_prometheus_e2e.py)
        available = {"le", "instance", "job", "service"}  # le: buckets; the rest: scrape
        for name, labels in names:
            if name in WRITTEN_BACK:
                continue
            if name in BUILTIN:
                job = re.search(r'job\s*=\s*"([^"]+)"', expr)
                if not job or job[1] not in jobs:
                    problems.append(f"{where}: up{{}} without a configured job: {expr}")
                continue
            if name not in exported:
                problems.append(f"{where}: {name} is not in /metrics")
                continue
            available |= exported[name]
            if missing := labels - exported[name] - {"instance", "job", "service"}:
                problems.append(f"{where}: {name} has no label {sorted(missing)}")
        if missing := grouping - available:
            problems.append(f"{where}: grouping by {sorted(missing)} matches no label")
    assert not problems, "\n".join(problems)


def test_per_stream_alert_and_embedding_series_are_exported(stack):
    text = stack["metrics"]
    assert 'tsad_stream_score{stream="nyc_taxi"}' in text
    assert 'tsad_stream_anomalies_total{stream="nyc_taxi"}' in text
    assert 'tsad_stream_top_channel_total{channel="0",stream="nyc_taxi"}' in text
    assert 'tsad_stream_alerts_opened_total{stream="nyc_taxi"} 1.0' in text
    assert "tsad_alerts_open 0.0" in text
    assert 'tsad_embedding_cache_hits_total{level="lru"}' in text
    assert 'tsad_shadow_lag_points{shadow="candidate",stream="nyc_taxi"}' in text
