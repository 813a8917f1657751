"""False alerts on clean data: how often the default detector alerts on streams with no
anomaly in them.

Three kinds of clean stream, one point a minute (so 1,440 points are a simulated day):

* ``noise``: stationary Gaussian noise around a level;
* ``random_walk``: Gaussian steps (a drifting level: it does reach new extremes, which
  the default reports as records);
* ``daily_sine``: a daily sine (period 1,440 points) plus noise.

Each stream runs through the service's own per-stream scorer (``service.scoring.
StreamScorer``: the online loop, the stream's threshold and the real alert tracker with the
service's default alert rules), in batches of ``--batch`` points, in process (no HTTP,
no Redis: the detection path is the same code the service runs per request). Every alert
opened counts once, by severity; a reopened alert (the cool-down joins a flapping signal
to its alert) does not open a new one. The rates are per stream per simulated day of
*scored* points (the warm-up is excluded), and per week.

    python benchmarks/false_alerts.py --streams 10000 --points 2000

Writes benchmarks/results/false_alerts.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from models.reporting import save_report  # noqa: E402
from service.scoring import StreamScorer  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.stores.base import StreamMeta  # noqa: E402

KINDS = ("noise", "random_walk", "daily_sine")
POINTS_PER_DAY = 1440  # one point a minute
START = 1_700_000_000.0


def clean_stream(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """One clean stream of ``n`` points (values only)."""
    level, scale = rng.uniform(-100, 100), 10 ** rng.uniform(-2, 2)
    noise = rng.standard_normal(n)
    if kind == "noise":
        return level + scale * noise
    if kind == "random_walk":
        return level + scale * np.cumsum(noise)
    if kind == "daily_sine":
        phase = rng.uniform(0, 2 * np.pi)
        t = np.arange(n) * 2 * np.pi / POINTS_PER_DAY + phase
        return level + scale * (5.0 * np.sin(t) + noise)
    raise ValueError(f"kind: unknown {kind!r}; known: {KINDS}")


def run_stream(values: np.ndarray, settings: Settings, batch: int, name: str
               ) -> tuple[dict[str, int], int, int]:
    """Alerts opened by severity, verdict points and scored points of one stream."""
    meta = StreamMeta(stream=name, channels=1, window=settings.default_window,
                      detector=settings.default_detector, created_at=START)
    scorer = StreamScorer(meta, settings)
    stamps = START + 60.0 * np.arange(len(values))
    opened: dict[str, int] = {}
    anomalies = scored = 0
    context = meta.window + 64  # what the store keeps: a chunk more than the window
    for lo in range(0, len(values), batch):
        hi = min(lo + batch, len(values))
        first = max(0, lo - context)
        points = np.stack([stamps[first:hi], values[first:hi]], axis=1)
        meta.points_seen = hi
        results = scorer.process(points, hi - lo)
        anomalies += int(results.anomalous.sum())
        scored += int(results.scored.sum())
        for alert in scorer.tracker.drain()[0]:
            if alert.reopened == 0 and alert.opened_at >= stamps[lo]:
                opened[alert.severity] = opened.get(alert.severity, 0) + 1
    return opened, anomalies, scored


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=10_000, help="streams per kind")
    ap.add_argument("--points", type=int, default=2_000, help="points per stream")
    ap.add_argument("--batch", type=int, default=500, help="points per scored request")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of "
                    + ", ".join(KINDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="what this run measures (its title)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/false_alerts")
    args = ap.parse_args()
    settings = Settings()
    kinds = [k for k in args.kinds.split(",") if k]
    rows = []
    for kind in kinds:
        rng = np.random.default_rng([args.seed, KINDS.index(kind)])
        opened: dict[str, int] = {}
        anomalies = scored = 0
        t0 = time.perf_counter()
        for i in tqdm(range(args.streams), desc=kind, unit="stream"):
            got, a, s = run_stream(clean_stream(kind, args.points, rng), settings,
                                   args.batch, f"{kind}-{i}")
            for sev, n in got.items():
                opened[sev] = opened.get(sev, 0) + n
            anomalies, scored = anomalies + a, scored + s
        days = scored / POINTS_PER_DAY  # stream-days of scored points, all streams
        rows.append({
            "kind": kind, "streams": args.streams, "points": args.points,
            "scored_points": scored, "anomalous_points": anomalies,
            "alerts": opened, "stream_days": days,
            "warnings_per_stream_day": opened.get("warning", 0) / days,
            "criticals_per_stream_day": opened.get("critical", 0) / days,
            "alerts_per_stream_week": sum(opened.values()) / days * 7,
            "warnings_per_stream_week": opened.get("warning", 0) / days * 7,
            "anomalous_point_share": anomalies / max(scored, 1),
            "seconds": time.perf_counter() - t0,
        })
    result = {"detector": settings.default_detector, "label": args.label,
              "points_per_day": POINTS_PER_DAY,
              "batch": args.batch, "seed": args.seed, "rows": rows,
              "machine": platform.platform(),
              "date": datetime.now(UTC).isoformat(timespec="seconds")}
    save_report(result, table(result), args.out)
    return 0


def table(result: dict) -> str:
    r0 = result["rows"][0] if result["rows"] else {"streams": 0, "points": 0}
    lines = [
        f"# False alerts on clean data ({result.get('label') or result['detector']}, "
        "default settings)",
        "",
        f"`python benchmarks/false_alerts.py` ({result['date']}): {r0['streams']:,} streams "
        f"of {r0['points']:,} points per kind, one point a minute, each through the "
        "service's per-stream scorer (online loop, threshold, alert tracker, default "
        f"alert rules) in batches of {result['batch']}. Rates per stream per simulated day "
        "(week) of scored points; the warm-up is not counted.",
        "",
        "| stream | anomalous points | warnings / stream / day | criticals / stream / day "
        "| warnings / stream / week | all alerts / stream / week | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['kind']} | {100 * r['anomalous_point_share']:.3f}% | "
            f"{r['warnings_per_stream_day']:.3f} | {r['criticals_per_stream_day']:.3f} | "
            f"{r['warnings_per_stream_week']:.2f} | {r['alerts_per_stream_week']:.2f} | "
            f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
