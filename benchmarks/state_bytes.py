"""Bytes of state a commit writes, this code beside another checkout's (``--baseline``):

1. a batch-1 request of residual_linear (a SPOT threshold: no record scale) at default
   settings, in process, 2,000 points in (past its warm-up and the threshold's
   calibration), then 256 requests of one point: the changed sections per commit, all
   of them and the threshold's (``thr``, ``thr/<slice>``);
2. a cheap shadow (residual_linear beside the default, the in-memory store, real app in
   process): what each of the shadow's commits writes (one per chunk it scores), its
   comparison log (``log/...``) and all its sections, at batch 8 and 100.

3. with ``--data-dir``, a wide stream: MSL's test set (55 channels) on the default
   detector at default settings, in process, past its warm-up and a full memory (2,400
   points), then requests of 100 and of 1,000 points: the changed sections per request
   and per chunk, all of them and the detector's (``det``, ``det/...``).

Counts bytes, not time: the load of a shared machine does not move them.

    python benchmarks/state_bytes.py --baseline /work/base-d0ab229 --data-dir ../shared/datasets

Prints a markdown table and writes benchmarks/results/state_bytes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHADOW_POINTS = 3072


def batch_1_request() -> dict:
    from service.scoring import StreamScorer
    from service.settings import Settings
    from service.stores.base import StreamMeta, retained

    scorer = StreamScorer(StreamMeta("s", 1, 64, "residual_linear"), Settings())
    t = np.arange(2300, dtype=np.float64)
    data = np.column_stack([t, np.sin(t / 5) + (t % 97 == 0) * 3.0])
    context = retained(64) - 1

    def score(lo: int, hi: int) -> None:
        scorer.meta.points_seen = hi
        scorer.process(data[max(0, lo - context):hi], hi - lo)

    score(0, 2000)
    scorer.to_commit()
    total, thr = [], []
    for i in range(2000, 2256):
        score(i, i + 1)
        changed, _, _ = scorer.to_commit()
        total.append(sum(len(b) for b in changed.values()))
        thr.append(sum(len(b) for n, b in changed.items() if n.partition("/")[0] == "thr"))
    return {"requests": len(total), "bytes_mean": round(float(np.mean(total))),
            "bytes_median": round(float(np.median(total))),
            "thr_bytes_median": round(float(np.median(thr))), "thr_bytes_max": max(thr)}


def shadow_commits(batch: int) -> dict:
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from service.app import create_app
    from service.metrics import ServiceMetrics
    from service.settings import Settings

    t = np.arange(SHADOW_POINTS)
    values = np.sin(t / 6.0) + 0.05 * np.random.default_rng(0).standard_normal(len(t))
    stamps = (1_700_000_000 + 60.0 * t).tolist()
    settings = Settings(redis_url=None, default_window=16, max_batch_points=5000)
    commits = []
    with TestClient(create_app(settings, ServiceMetrics(CollectorRegistry()))) as c:
        assert c.put("/streams/s", json={"channels": 1}).status_code == 201
        assert c.put("/streams/s/shadows/rl", json={"detector": "residual_linear"}
                     ).status_code == 201
        services = c.app.state.services
        real = services.backend.commit

        async def commit(change):  # noqa: ANN001, ANN202
            commits.append(change)
            return await real(change)

        services.backend.commit = commit
        for lo in range(0, SHADOW_POINTS, batch):
            r = c.post("/score", json={"stream": "s", "timestamps": stamps[lo:lo + batch],
                                       "values": values[lo:lo + batch, None].tolist()})
            assert r.status_code == 200, r.text
            assert c.portal.call(services.shadow_queue.drained, 120.0)
    own = [{k: len(b) for k, b in m.sections.items() if k.startswith("shadow.rl.")}
           for m in commits]
    own = [o for o in own if o]
    log = [sum(v for k, v in o.items() if k.startswith("shadow.rl.log/")) for o in own]
    every = [sum(o.values()) for o in own]
    return {"batch": batch, "shadow_commits": len(own), "log_bytes_mean": round(np.mean(log)),
            "log_bytes_max": max(log), "shadow_bytes_mean": round(np.mean(every)),
            "shadow_bytes_max": max(every)}


WIDE_WARM = 2400  # past the default's warm-up, with its 2,048-point memory full


def wide_requests(data_dir: Path, batch: int, requests: int) -> dict:
    """MSL's 55 channels on the default detector: bytes of the sections each request's
    commit writes (after the first ``WIDE_WARM`` points and one untimed request)."""
    from models.data import load_msl
    from service.scoring import StreamScorer
    from service.settings import Settings
    from service.stores.base import StreamMeta, retained

    test = np.concatenate([e.test for e in load_msl(data_dir)]).astype(np.float64)
    data = np.column_stack([np.arange(len(test), dtype=np.float64), test])
    settings = Settings()
    meta = StreamMeta("w", test.shape[1], settings.default_window, settings.default_detector)
    scorer = StreamScorer(meta, settings)
    context = retained(meta.window) - 1
    spans = [(0, WIDE_WARM)] + [(WIDE_WARM + i * batch, batch) for i in range(requests + 1)]
    total, det = [], []
    for i, (lo, n) in enumerate(spans):
        scorer.meta.points_seen = lo + n
        scorer.process(data[max(0, lo - context):lo + n], n)
        changed, _, _ = scorer.to_commit()
        if i >= 2:
            total.append(sum(len(b) for b in changed.values()))
            det.append(sum(len(b) for k, b in changed.items() if k.partition("/")[0] == "det"))
    chunks = batch * requests / 64
    return {"batch": batch, "channels": test.shape[1], "requests": requests,
            "bytes_mean": round(float(np.mean(total))),
            "det_bytes_mean": round(float(np.mean(det))),
            "bytes_per_chunk": round(sum(total) / chunks),
            "det_bytes_per_chunk": round(sum(det) / chunks)}


def measure(data_dir: Path | None) -> dict:
    out = {"batch_1": batch_1_request(), "shadow": [shadow_commits(b) for b in (8, 100)]}
    if data_dir is not None:
        out["wide"] = [wide_requests(data_dir, 100, 20), wide_requests(data_dir, 1000, 3)]
    return out


def run_in(tree: Path, data_dir: Path | None) -> dict:
    """This script's measurements with the code of ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TSAD_LOG_LEVEL": "ERROR"}
    wide = ["--data-dir", str(data_dir.resolve())] if data_dir else []
    out = subprocess.run([sys.executable, __file__, "--measure", *wide], cwd=tree, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(rows: dict[str, dict]) -> str:
    lines = ["| code | batch-1 request: bytes (median / mean) | of which thr (median / max) | "
             "shadow commit, batch 8: log bytes (mean / max) | all shadow sections | "
             "batch 100: log bytes (mean / max) | all shadow sections |",
             "|---|---|---|---|---|---|---|"]
    for code, r in rows.items():
        b, (s8, s100) = r["batch_1"], r["shadow"]
        lines.append(
            f"| {code} | {b['bytes_median']:,} / {b['bytes_mean']:,} | "
            f"{b['thr_bytes_median']:,} / {b['thr_bytes_max']:,} | "
            f"{s8['log_bytes_mean']:,} / {s8['log_bytes_max']:,} | "
            f"{s8['shadow_bytes_mean']:,} / {s8['shadow_bytes_max']:,} | "
            f"{s100['log_bytes_mean']:,} / {s100['log_bytes_max']:,} | "
            f"{s100['shadow_bytes_mean']:,} / {s100['shadow_bytes_max']:,} |")
    return "\n".join(lines)


def wide_table(rows: dict[str, dict]) -> str:
    lines = ["| code | batch | sections written per request: all (mean) | of which the "
             "detector's | per chunk of 64 points: all | the detector's |",
             "|---|---:|---:|---:|---:|---:|"]
    for code, r in rows.items():
        for w in r.get("wide", []):
            lines.append(f"| {code} | {w['batch']:,} | {w['bytes_mean']:,} | "
                         f"{w['det_bytes_mean']:,} | {w['bytes_per_chunk']:,} | "
                         f"{w['det_bytes_per_chunk']:,} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, help="a checkout of earlier code, measured too")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--data-dir", type=Path,
                    help="folder holding msl/: adds the wide stream's rows")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.data_dir)))
        return
    rows = {"this": run_in(ROOT, args.data_dir)}
    if args.baseline:
        rows["baseline"] = run_in(args.baseline.resolve(), args.data_dir)
    command = "python benchmarks/state_bytes.py" + (
        f" --baseline {args.baseline}" if args.baseline else "") + (
        f" --data-dir {args.data_dir}" if args.data_dir else "")
    md = (f"# Bytes of state a commit writes\n\n`{command}` (benchmarks/state_bytes.py: "
          f"what it measures). A batch-1 request: residual_linear at default settings, "
          f"past warm-up and calibration, 256 requests of one point. A shadow commit: "
          f"residual_linear as a shadow of the default, {SHADOW_POINTS:,} points, one "
          f"commit per chunk the shadow scores.\n\n{table(rows)}\n")
    if args.data_dir:
        md += (f"\nA wide stream: MSL's test set (55 channels), the default detector at "
               f"default settings, {WIDE_WARM:,} points in, then 20 requests of 100 points "
               f"and 3 of 1,000 (state sections only: the points appended to the window "
               f"come on top).\n\n{wide_table(rows)}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "state_bytes.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "state_bytes.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
