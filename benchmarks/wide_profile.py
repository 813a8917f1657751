"""Where a wide stream's request time goes: MSL's test set (55 channels) through POST
/score in this process (the app over the in-memory store, no sockets, the detector run
inline), one stream of the default detector past its warm-up, sequential batches. The
CPU time of each request is split by the functions it runs (each wrapped with a process-
time counter, not cProfile: the shares are not inflated by a profiler), and the rows of
``--baseline DIR`` (another checkout, e.g. main before a change) come from the same run,
the two codes taking turns request set by request set.

    python benchmarks/wide_profile.py --data-dir ../shared/datasets --baseline /tmp/base

Nested rows: the search classes' own time is part of the ``_memory_distance`` and
``_level_distance`` rows, which are part of ``_channel_scores``, itself part of the loop.
Writes benchmarks/results/wide_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (label, module, class or None, function): what each request's CPU is split by
TIMED = (
    ("loop (the whole scoring pass)", "models.streaming", "OnlineLoop", "run"),
    ("detector: channel scores (all)", "models.detectors.ensemble", "Ensemble",
     "_channel_scores"),
    ("detector: memory member, its loop and searches", "models.detectors.ensemble",
     "Ensemble", "_memory_distance"),
    ("detector: level member, its loop and searches", "models.detectors.ensemble",
     "Ensemble", "_level_distance"),
    ("searches: CosineMemory.nearest", "models.detectors.ensemble", "CosineMemory",
     "nearest"),
    ("searches: CosineMemory prepared (per block)", "models.detectors.ensemble",
     "CosineMemory", "__init__"),
    ("searches: SquaredMemory.nearest", "models.detectors.ensemble", "SquaredMemory",
     "nearest"),
    ("searches: SquaredMemory prepared (per block)", "models.detectors.ensemble",
     "SquaredMemory", "__init__"),
    ("detector: range member", "models.detectors.ensemble", "Ensemble", "_range_excess"),
    ("detector: learning (partial_fit)", "models.detectors.ensemble", "Ensemble",
     "partial_fit"),
    ("scorer: alerts and explanations", "service.scoring", "StreamScorer", "_observe"),
    ("scorer: state sections encoded", "service.scoring", "StreamScorer", "to_commit"),
)


def measure(root: Path, data_dir: Path, batch: int, requests: int, skip: int) -> dict:
    """In this process, with ``root``'s code: CPU ms per request, in all and per TIMED
    row, over ``requests`` batches after the warm-up and ``skip`` untimed batches."""
    os.environ.setdefault("TSAD_LOG_LEVEL", "WARNING")
    import asyncio
    import importlib
    import time
    from collections import defaultdict

    import httpx
    from prometheus_client import CollectorRegistry

    from benchmarks.throughput import _Inline, load_msl, to_body, warm_points
    from service.app import create_app
    from service.metrics import ServiceMetrics
    from service.settings import Settings

    if not Path(importlib.import_module("models.streaming").__file__).is_relative_to(root):
        raise RuntimeError(f"--measure {root}: the code imported is another checkout's")
    spent: dict[str, float] = defaultdict(float)
    for label, module, cls, name in TIMED:
        owner = getattr(importlib.import_module(module), cls)
        setattr(owner, name, _timed(getattr(owner, name), label, spent))
    series = load_msl(data_dir)
    warm = warm_points()
    spans = [(0, warm)] + [(warm + i * batch, batch) for i in range(skip + requests)]
    bodies = [json.dumps({"stream": "w", **to_body(series[lo:lo + n], "columnar")})
              for lo, n in spans]
    total = 0.0

    async def run() -> None:
        nonlocal total
        asyncio.get_running_loop().set_default_executor(_Inline())
        app = create_app(Settings(max_batch_points=10_000), ServiceMetrics(CollectorRegistry()))
        headers = {"content-type": "application/json"}
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://bench",
                timeout=600) as http:
            for i, body in enumerate(bodies):
                if i == 1 + skip:
                    spent.clear()
                    start = time.process_time()
                (await http.post("/score", content=body, headers=headers)).raise_for_status()
            total = time.process_time() - start

    asyncio.run(run())
    per = {label: round(spent[label] / requests * 1000, 2) for label, *_ in TIMED}
    return {"cpu_ms_per_request": round(total / requests * 1000, 2),
            "points_per_cpu_s": round(batch * requests / total, 1), "rows_ms": per,
            "load_1m": round(os.getloadavg()[0], 2)}


def _timed(fn, label: str, spent: dict):  # noqa: ANN001, ANN202 - wraps any function
    import functools
    import time

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] += time.process_time() - start
    return wrapper


def markdown(runs: dict[str, list[dict]], batch: int, requests: int) -> str:
    codes = list(runs)
    mean = {c: _mean(runs[c]) for c in codes}
    lines = [f"| function (CPU ms per request of {batch:,} points) | "
             + " | ".join(codes) + " |", "|---|" + "---:|" * len(codes)]
    lines.append("| **whole request** | " + " | ".join(
        f"**{mean[c]['cpu_ms_per_request']:.0f}**" for c in codes) + " |")
    for label, *_ in TIMED:
        cells = []
        for c in codes:
            ms, whole = mean[c]["rows_ms"][label], mean[c]["cpu_ms_per_request"]
            cells.append(f"{ms:.1f} ({ms / whole:.0%})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| points per CPU-second | " + " | ".join(
        f"{mean[c]['points_per_cpu_s']:,.0f}" for c in codes) + " |")
    loads = [r["load_1m"] for c in codes for r in runs[c]]
    lines.append(f"\n{len(runs[codes[0]])} rounds per code of {requests} requests each, "
                 f"the codes taking turns; mean of the rounds. Load average (1 min) "
                 f"{min(loads)}-{max(loads)} on {os.cpu_count()} cores: CPU time, not "
                 "wall time, is what to compare.")
    return "\n".join(lines)


def _mean(rounds: list[dict]) -> dict:
    n = len(rounds)
    return {"cpu_ms_per_request": sum(r["cpu_ms_per_request"] for r in rounds) / n,
            "points_per_cpu_s": sum(r["points_per_cpu_s"] for r in rounds) / n,
            "rows_ms": {k: sum(r["rows_ms"][k] for r in rounds) / n
                        for k in rounds[0]["rows_ms"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets",
                    help="folder holding msl/")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of earlier code, profiled in the same run")
    ap.add_argument("--batch", type=int, default=1000, help="points per request")
    ap.add_argument("--requests", type=int, default=4, help="timed requests per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per code, taking turns")
    ap.add_argument("--out", type=Path, default=None,
                    help="output path without suffix (default benchmarks/results/wide_profile)")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # a child's code root
    args = ap.parse_args()
    if args.measure:  # a child process: one round with one code, JSON on stdout
        print(json.dumps(measure(args.measure.resolve(), args.data_dir.resolve(),
                                 args.batch, args.requests, skip=1)))
        return

    from models.data import load_msl
    from models.reporting import results_dir, save_report

    load_msl(args.data_dir)  # missing data: one line saying how to get it, before any child
    codes = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    runs: dict[str, list[dict]] = {c: [] for c in codes}
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    for r in range(args.rounds):
        for code, root in codes.items():
            out = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--measure", str(root),
                 "--data-dir", str(args.data_dir), "--batch", str(args.batch),
                 "--requests", str(args.requests)],
                capture_output=True, text=True, env=env, check=True, cwd=root)
            runs[code].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps({"round": r, "code": code, **runs[code][-1]}), flush=True)
    report = {"benchmark": "wide_profile", "dataset": "msl/test", "channels": 55,
              "batch": args.batch, "requests_per_round": args.requests,
              "baseline": str(args.baseline) if args.baseline else None, "runs": runs}
    command = " ".join(["python benchmarks/wide_profile.py"] + sys.argv[1:])
    save_report(report, f"# Where a wide stream's request goes\n\nMSL test set (55 "
                f"channels), the default detector, POST /score in process. `{command}`."
                f"\n\n{markdown(runs, args.batch, args.requests)}\n",
                args.out or results_dir(args.data_dir) / "wide_profile")


if __name__ == "__main__":
    # a child imports the code it measures (``--measure ROOT``), the parent this checkout's
    code = sys.argv[sys.argv.index("--measure") + 1] if "--measure" in sys.argv else ROOT
    sys.path.insert(0, str(Path(code).resolve()))
    from models.data import run_main

    sys.exit(run_main(main))
