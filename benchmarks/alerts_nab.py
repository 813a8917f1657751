"""Alerts per day on NAB realKnownCause at the service's default settings, and how many
labelled anomaly windows they hit.

Each series is replayed through the real app in process (POST /score in batches, the
in-memory store, default Settings unless overridden with --set KEY=VALUE), then its
alerts are read back from GET /alerts. A labelled window is *hit* when an alert is
active during it (opened before its end and not resolved before its start); an alert
*in a window* is one that opened inside a labelled window (NAB windows are wide: about
10% of each series). Points whose timestamp does not increase (a few NAB files repeat
timestamps) are dropped before the replay, as a producer would have to. Alerts/day
counts every opened alert over the series' time span, warm-up and calibration included
(that is what an operator would receive).

    python benchmarks/alerts_nab.py --data-dir ../shared/datasets

Prints a markdown table and writes benchmarks/results/alerts_nab.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from models.data import DataNotFound, load_nab, run_main  # noqa: E402
from models.reporting import results_dir, save_report  # noqa: E402
from service.app import create_app  # noqa: E402
from service.metrics import ServiceMetrics  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.stores.base import StreamMeta  # noqa: E402

BATCH = 1000
DAY = 86_400.0


def replay(client: TestClient, stream: str, series) -> None:  # noqa: ANN001
    for lo in range(0, len(series), BATCH):
        points = [{"timestamp": float(r[0]), "values": [float(r[1])]}
                  for r in series[lo:lo + BATCH]]
        r = client.post("/score", json={"stream": stream, "points": points})
        if r.status_code != 200:
            raise SystemExit(f"{stream}: {r.status_code} {r.text[:300]}")


def all_alerts(client: TestClient, stream: str) -> list[dict]:
    out, cursor = [], None
    while True:
        params = {"stream": stream, "limit": 500} | ({"cursor": cursor} if cursor else {})
        page = client.get("/alerts", params=params).json()
        out += page["alerts"]
        cursor = page["next_cursor"]
        if cursor is None:
            return out


def evaluate(name: str, series, windows: list[tuple[float, float]],  # noqa: ANN001
             alerts: list[dict], seconds: float) -> dict:
    end = float(series[-1, 0])
    spans = [(a["opened_at"], a["resolved_at"] or end) for a in alerts]
    hit = sum(any(o <= w1 and r >= w0 for o, r in spans) for w0, w1 in windows)
    inside = sum(any(w0 <= a["opened_at"] <= w1 for w0, w1 in windows) for a in alerts)
    days = (end - float(series[0, 0])) / DAY
    return {
        "series": name, "points": len(series), "days": round(days, 2),
        "alerts": len(alerts), "alerts_per_day": round(len(alerts) / days, 3) if days else None,
        "critical": sum(a["severity"] == "critical" for a in alerts),
        "alerts_in_windows": inside, "windows": len(windows), "windows_hit": hit,
        "replay_seconds": round(seconds, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True,
                   help="folder holding nab/ (NAB's layout; tests/data: the nyc_taxi slice)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting (e.g. alert_k=2); results go to *_custom files")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for alerts_nab.{json,md} (default benchmarks/results, "
                   "runs/bench for tests/data)")
    args = p.parse_args()

    overrides = dict(kv.split("=", 1) for kv in args.set)
    settings = Settings(max_batch_points=BATCH, **overrides)
    files = [s for s in load_nab(args.data_dir) if s.name.startswith("realKnownCause/")]
    if not files:
        raise DataNotFound(f"--data-dir {args.data_dir}: no realKnownCause file of NAB's "
                           "combined_windows.json there; try --data-dir tests/data")
    rows = []
    with TestClient(create_app(settings, ServiceMetrics(CollectorRegistry()))) as client:
        for s in files:
            name = Path(s.name).stem
            raw = np.column_stack([s.timestamps.astype(np.float64), s.values])
            # a few NAB files repeat timestamps; the API (rightly) refuses those points
            keep = np.concatenate([[True], raw[1:, 0] > np.maximum.accumulate(raw[:-1, 0])])
            series = raw[keep]
            windows = [(float(a.astype(np.float64)), float(b.astype(np.float64)))
                       for a, b in s.windows]
            start = time.perf_counter()
            replay(client, name, series)
            seconds = time.perf_counter() - start
            rows.append(evaluate(name, series, windows, all_alerts(client, name),
                                 seconds) | {"dropped_points": int((~keep).sum())})
            print(json.dumps(rows[-1]), flush=True)

    total_days = sum(r["days"] for r in rows)
    total = {"alerts": sum(r["alerts"] for r in rows),
             "alerts_per_day": (round(sum(r["alerts"] for r in rows) / total_days, 3)
                                if total_days else None),
             "alerts_in_windows": sum(r["alerts_in_windows"] for r in rows),
             "windows": sum(r["windows"] for r in rows),
             "windows_hit": sum(r["windows_hit"] for r in rows)}
    keys = ("threshold_kind", "threshold_q", "threshold_calibration_points",
            "threshold_level", "default_detector", "default_window", "alert_k", "alert_m",
            "alert_critical_ratio", "alert_quiet_points", "alert_cooldown_seconds")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    result = {"settings": {k: getattr(settings, k) for k in keys}, "overrides": overrides,
              "threshold": threshold_in_force(settings), "rows": rows, "total": total,
              "commit": commit, "date": datetime.now(UTC).strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "data_dir": str(args.data_dir)}
    stem = "alerts_nab" + ("_custom" if overrides else "")
    save_report(result, render(result), (args.out or results_dir(args.data_dir)) / stem)
    return 0


def threshold_in_force(settings: Settings) -> str:
    """The threshold the default detector's streams run, in words: a detector whose
    scores are ratios to the stream's record brings a fixed cut; others fit SPOT."""
    from models.detectors import build_detector
    from models.thresholds import verdict_spec
    from service.scoring import stream_spec

    meta = StreamMeta(stream="x", channels=1, window=settings.default_window,
                      detector=settings.default_detector)
    spec = verdict_spec(stream_spec(settings, meta), build_detector(settings.default_detector),
                        chosen=False)
    if spec.kind == "fixed":
        return f"a fixed cut at {spec.value:g} (the {settings.default_detector} record line)"
    return (f"{spec.kind} q={spec.q}, calibration {spec.calibration} scores after the "
            f"{settings.default_detector} detector's warm-up")


def render(result: dict) -> str:
    s = result["settings"]
    when = f", {result['date']}" if result.get("date") else ""
    lines = [
        "# Alerts on NAB realKnownCause",
        "",
        f"Default settings{' with ' + str(result['overrides']) if result['overrides'] else ''}"
        f": detector {s['default_detector']}, threshold "
        f"{result.get('threshold', s['threshold_kind'])}, window {s['default_window']}, "
        f"k-of-m {s['alert_k']}/{s['alert_m']}, "
        f"critical at {s['alert_critical_ratio']}x, quiet {s['alert_quiet_points']} points, "
        f"cooldown {s['alert_cooldown_seconds']:g} s. `python benchmarks/alerts_nab.py "
        f"--data-dir ../shared/datasets` (commit {result['commit']}{when}).",
        "",
        "A window is *hit* when an alert is active during it; *in windows* counts alerts "
        "that opened inside a labelled window.",
        "",
        "| series | points | days | alerts | alerts/day | critical | in windows | "
        "windows hit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['series']} | {r['points']} | {r['days']} | {r['alerts']} | "
                     f"{r['alerts_per_day']} | {r['critical']} | {r['alerts_in_windows']} | "
                     f"{r['windows_hit']}/{r['windows']} |")
    t = result["total"]
    lines.append(f"| **all** | | | {t['alerts']} | {t['alerts_per_day']} | | "
                 f"{t['alerts_in_windows']} | {t['windows_hit']}/{t['windows']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(run_main(main))
