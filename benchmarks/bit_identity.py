"""Are the service's results bit-identical to a recorded run? A check for changes that
must not move a score (speed work on the scoring path, state encodings).

``--record FILE`` replays a few NAB and MSL series through ``POST /score`` (the app in
this process over the in-memory store, no sockets) at batch sizes 1, 10 and 500, and
with the scorer cache off (the state encoded, stored and decoded on every request), and
keeps every point's score, likelihood, threshold, verdict and status, and every alert's
times, peak and severity. ``--check FILE`` runs the same and compares bit for bit:

    python benchmarks/bit_identity.py --data-dir ../shared/datasets --record runs/bits.npz
    # ... change the code ...
    python benchmarks/bit_identity.py --data-dir ../shared/datasets --check runs/bits.npz

Exit status 1 and one line per difference when anything moved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.data import DataNotFound, run_main  # noqa: E402
from models.data import load_msl as load_msl_entities  # noqa: E402
from models.data import load_nab as load_nab_series  # noqa: E402

NAB = ("realKnownCause/nyc_taxi.csv", "realKnownCause/ec2_request_latency_system_failure.csv")
MSL_ENTITIES = 2  # the first two entities of MSL's test set, all 55 channels
STATUS = ("warming_up", "scored", "duplicate", "dropped")


def series_to_run(data_dir: Path, quick: bool) -> list[tuple[str, np.ndarray, str | None]]:
    """(name, (T, 1 + C) stamps and values, detector or None for the default)."""
    out = []
    found = {s.name: s for s in load_nab_series(data_dir)}
    for name in NAB[:1] if quick else NAB:
        if name not in found:
            raise DataNotFound(f"--data-dir {data_dir}: no {name} in its NAB folder")
        s = found[name]
        rows = np.column_stack([s.timestamps.astype(np.float64), s.values])
        out.append((name, rows, None))
    out.append((NAB[0] + "+residual_linear", out[0][1][:4000], "residual_linear"))
    for e in load_msl_entities(data_dir)[:1 if quick else MSL_ENTITIES]:
        test = e.test.astype(np.float64)
        out.append((f"msl/{e.name}", np.column_stack([np.arange(len(test), dtype=np.float64),
                                                     test]), None))
    return out


async def replay(app, http, stream: str, rows: np.ndarray, batch: int,
                 detector: str | None) -> dict[str, np.ndarray]:
    if detector is not None:
        r = await http.put(f"/streams/{stream}", json={"channels": rows.shape[1] - 1,
                                                       "detector": detector})
        r.raise_for_status()
    cols: dict[str, list] = {k: [] for k in ("score", "likelihood", "threshold", "anomaly",
                                             "status")}
    for lo in range(0, len(rows), batch):
        part = rows[lo:lo + batch]
        r = await http.post("/score", content=json.dumps({
            "stream": stream, "timestamps": part[:, 0].tolist(),
            "values": part[:, 1:].tolist()}), headers={"content-type": "application/json"})
        if r.status_code != 200:
            raise RuntimeError(f"{stream} batch at {lo}: {r.status_code} {r.text[:300]}")
        for p in r.json()["results"]:
            for k in ("score", "likelihood", "threshold"):
                cols[k].append(np.nan if p[k] is None else p[k])
            cols["anomaly"].append(p["anomaly"])
            cols["status"].append(STATUS.index(p["status"]))
    alerts = (await http.get("/alerts", params={"stream": stream, "limit": 500})).json()
    found = sorted((a["opened_at"], a.get("resolved_at") or np.nan, a["peak_score"],
                    a["peak_at"], ["warning", "critical"].index(a["severity"]))
                   for a in alerts["alerts"])
    return {"score": np.array(cols["score"], np.float64),
            "likelihood": np.array(cols["likelihood"], np.float64),
            "threshold": np.array(cols["threshold"], np.float64),
            "anomaly": np.array(cols["anomaly"], bool),
            "status": np.array(cols["status"], np.int8),
            "alerts": np.array(found, np.float64).reshape(-1, 5)}


def run_all(runs, batches: list[int]) -> dict[str, np.ndarray]:
    import httpx
    from prometheus_client import CollectorRegistry

    from service.app import create_app
    from service.metrics import ServiceMetrics
    from service.settings import Settings

    out: dict[str, np.ndarray] = {}
    variants = [(b, True) for b in batches] + [(10, False)]

    async def go(cache: bool, items) -> None:
        settings = Settings(max_batch_points=10_000, scorer_cache_mb=256 if cache else 0)
        app = create_app(settings, ServiceMetrics(CollectorRegistry()))
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://bits",
                timeout=600) as http:
            for name, rows, detector, batch in items:
                start = time.perf_counter()
                stream = f"s{len(out)}"
                res = await replay(app, http, stream, rows, batch, detector)
                tag = f"{name}|batch={batch}|cache={'on' if cache else 'off'}"
                for k, v in res.items():
                    out[f"{tag}|{k}"] = v
                print(f"{tag}: {len(rows)} points, {int(res['anomaly'].sum())} anomalous, "
                      f"{len(res['alerts'])} alerts, {time.perf_counter() - start:.1f} s",
                      flush=True)

    for cache in (True, False):
        items = [(n, r, d, b) for b, c in variants if c == cache for n, r, d in runs]
        asyncio.run(go(cache, items))
    return out


def compare(recorded: dict[str, np.ndarray], now: dict[str, np.ndarray]) -> list[str]:
    problems = []
    for key in sorted(set(recorded) | set(now)):
        if key not in now or key not in recorded:
            problems.append(f"{key}: only in {'the record' if key in recorded else 'this run'}")
            continue
        a, b = recorded[key], now[key]
        if a.shape != b.shape:
            problems.append(f"{key}: shape {a.shape} recorded, {b.shape} now")
        elif a.dtype == np.float64:
            same = a.view(np.uint64) == b.view(np.uint64)
            if not same.all():
                i = int(np.argmin(same.reshape(-1)))
                problems.append(f"{key}: {int((~same).sum())} values differ, first at "
                                f"{i}: {a.reshape(-1)[i]!r} recorded, {b.reshape(-1)[i]!r} now")
        elif not np.array_equal(a, b):
            problems.append(f"{key}: {int((a != b).sum())} values differ")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, help="write the results to this .npz")
    mode.add_argument("--check", type=Path, help="compare with this recorded .npz")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10, 500])
    ap.add_argument("--quick", action="store_true",
                    help="one NAB series and one MSL entity (the batch-1 runs are the slow ones)")
    args = ap.parse_args()
    os.environ.setdefault("TSAD_LOG_LEVEL", "WARNING")
    runs = series_to_run(args.data_dir, args.quick)
    now = run_all(runs, args.batch_sizes)
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.record, **now)
        print(f"recorded {len(now)} arrays -> {args.record}")
        return
    recorded = dict(np.load(args.check))
    problems = compare(recorded, now)
    for p in problems:
        print(p)
    print(f"{len(now)} arrays compared with {args.check}: "
          + ("bit-identical" if not problems else f"{len(problems)} differ"))
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(run_main(main))
