"""What a cheap shadow's catch-up costs by its size: the work of the shadows' child process
(``service/shadows/worker.py``) per 100 points, and the bytes its commits write, when a
shadow catches up every ``job`` points (TSAD_SHADOW_CATCH_UP_POINTS; at batch 100 before
it, every request: 100).

NAB's nyc_taxi in one stream, the shadow's engine (``ShadowEngine``, the same the child
runs) warmed up on the first 640 points, then caught up ``job`` points at a time over the
next 8,192 points (the live results it compares with are made up: they do not change its
work). CPU is this process's (``time.process_time``), in one run for every size.

    python benchmarks/shadow_catch_up.py --data-dir ../shared/datasets

Writes benchmarks/results/shadow_catch_up.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from throughput import load_nab  # noqa: E402

from models.data import run_main  # noqa: E402
from models.reporting import results_dir, save_report  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.shadows.config import ShadowConfig  # noqa: E402
from service.shadows.engine import ShadowEngine  # noqa: E402
from service.shadows.log import LIVE, Columns, LiveResults  # noqa: E402
from service.stores.base import StreamMeta, retained  # noqa: E402

WARM = 640
POINTS = 8192


def live(first: int, ts: np.ndarray) -> LiveResults:
    n = len(ts)
    return LiveResults(first, Columns.of(
        LIVE, ts=ts, wall=np.full(n, time.time()), score=np.zeros(n),
        scored=np.ones(n, bool), anomaly=np.zeros(n, bool), alerted=np.zeros(n, bool),
        cost=np.full(n, 1e-4)))


def one(series: np.ndarray, detector: str, job: int, settings: Settings) -> dict:
    meta = StreamMeta("s", 1, settings.default_window, "ensemble")
    engine = ShadowEngine.create(ShadowConfig("shadow", detector, start=WARM), meta, settings)
    engine.warm_up(series[:WARM], 0)
    engine.to_commit()
    context = retained(meta.window) - 1
    catch_up = commit = 0.0
    written = commits = 0
    mark = WARM
    while mark + job <= WARM + POINTS:
        lo = mark - context
        t0 = time.process_time()
        engine.catch_up(series[lo:mark + job], lo, live(mark, series[mark:mark + job, 0]))
        t1 = time.process_time()
        changed, _ = engine.to_commit()
        t2 = time.process_time()
        catch_up, commit = catch_up + t1 - t0, commit + t2 - t1
        written += sum(len(b) for b in changed.values())
        commits += 1
        mark += job
    points = mark - WARM
    per100 = 100 / points
    return {"detector": detector, "job_points": job, "points": points, "commits": commits,
            "catch_up_cpu_ms_per_100_points": round(1000 * catch_up * per100, 3),
            "encode_cpu_ms_per_100_points": round(1000 * commit * per100, 3),
            "cpu_ms_per_100_points": round(1000 * (catch_up + commit) * per100, 3),
            "bytes_per_100_points": round(written * per100)}


def table(result: dict) -> str:
    lines = ["# A cheap shadow's catch-up: its cost by size", "",
             f"{result['created']}, {result['machine']}, load 1m {result['load_1m_before']} "
             f"→ {result['load_1m_after']}; `{result['command']}`", "",
             "| detector | points per catch-up | catch-ups | scoring CPU ms/100 points | "
             "encoding CPU ms/100 points | total CPU ms/100 points | bytes committed/100 "
             "points |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['detector']} | {r['job_points']} | {r['commits']} | "
              f"{r['catch_up_cpu_ms_per_100_points']} | {r['encode_cpu_ms_per_100_points']} | "
              f"{r['cpu_ms_per_100_points']} | {r['bytes_per_100_points']} |"
              for r in result["rows"]]
    lines += ["", "The work of the shadows' child process per 100 points of the stream "
              "(scoring: the shadow's StreamScorer and its comparison log; encoding: its "
              "changed sections), and the bytes of the sections each catch-up commits. "
              "100 points a catch-up is what a shadow did at batch 100 when it caught up at "
              "every chunk end; 512 is TSAD_SHADOW_CATCH_UP_POINTS' default."]
    return "\n".join(lines)


def main() -> int | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets",
                    help="a folder holding nab/ (tests/data works: results go to runs/bench)")
    ap.add_argument("--detectors", default="residual_linear", help="comma-separated")
    ap.add_argument("--jobs", default="64,100,256,512,1024",
                    help="points per catch-up, comma-separated")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: results dir/shadow_catch_up")
    args = ap.parse_args()
    series = load_nab(args.data_dir)
    settings = Settings()
    result = {"created": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
              "command": "python " + shlex.join([Path(sys.argv[0]).as_posix(),
                                                 *sys.argv[1:]]),
              "load_1m_before": round(os.getloadavg()[0], 2)}
    result["rows"] = [one(series, d, int(j), settings) for d in args.detectors.split(",")
                      for j in args.jobs.split(",")]
    result["load_1m_after"] = round(os.getloadavg()[0], 2)
    save_report(result, table(result), args.out or results_dir(args.data_dir) /
                "shadow_catch_up")
    return None


if __name__ == "__main__":
    sys.exit(run_main(main))
