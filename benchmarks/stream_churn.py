"""Memory of a service under stream churn: the same number of live streams throughout,
while streams are deleted and others created (the audit: 288 -> 378 MB after 5,000
deletes and 5,000 creates, because deleted streams' scorers stayed in the process's
scorer cache).

Two set-ups on one Redis, side by side:

- ``one``: one process scores the streams and deletes them;
- ``two``: replica A scores (creates) the streams, replica B deletes them, as a load
  balancer spreads requests: A never sees the deletes, so only a check of its cache
  against the store can drop their scorers.

Each process is a real ``uvicorn service.main:app``; the figure is A's resident memory
(VmRSS) after the live streams are created, and after the churn.

    python benchmarks/stream_churn.py --live 500 --churn 5000

Prints a markdown table and writes benchmarks/results/stream_churn.{json,md}.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import start_redis  # noqa: E402
from models import reporting  # noqa: E402
from service.process import ServiceProcess, free_port  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def points(k: int, n: int) -> list[dict]:
    return [{"timestamp": 1.7e9 + 60.0 * i, "values": [50 + 10 * math.sin((i + k) / 9)]}
            for i in range(n)]


def run(setup: str, redis_url: str, live: int, churn: int, n_points: int,
        settle: float) -> dict:
    env = {"REDIS_URL": redis_url, "TSAD_REDIS_PREFIX": f"churn-{setup}"}  # defaults
    a = ServiceProcess(env).start()
    b = ServiceProcess(env).start() if setup == "two" else a
    try:
        with httpx.Client(timeout=60) as http:
            for k in tqdm(range(live), desc=f"{setup}: live streams", leave=False):
                r = http.post(f"{a.url}/score", json={"stream": f"s{k}",
                                                      "points": points(k, n_points)})
                r.raise_for_status()
            time.sleep(3)
            before = rss_mb(a.proc.pid)
            start = time.monotonic()
            for k in tqdm(range(churn), desc=f"{setup}: delete + create", leave=False):
                http.delete(f"{b.url}/streams/s{k}").raise_for_status()
                http.post(f"{a.url}/score", json={"stream": f"s{live + k}", "points": points(
                    live + k, n_points)}).raise_for_status()
            seconds = time.monotonic() - start
            time.sleep(settle)  # a cache check (TSAD_SCORER_CACHE_CHECK_SECONDS)
            after = rss_mb(a.proc.pid)
            count = len(http.get(f"{a.url}/streams", params={"limit": 1000}).json()["streams"])
            metrics = http.get(f"{a.url}/metrics").text
    finally:
        a.stop()
        if b is not a:
            b.stop()
    hits = {k: _sample(metrics, f'tsad_scorer_cache_total{{result="{k}"}}')
            for k in ("hit", "miss")}
    return {"setup": setup, "live": live, "live_after": count, "churn": churn,
            "points_per_stream": n_points, "rss_before_mb": round(before, 1),
            "rss_after_mb": round(after, 1), "growth_mb": round(after - before, 1),
            "churn_seconds": round(seconds, 1), "scorer_cache": hits}


def _sample(metrics: str, name: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def main() -> None:
    ap = reporting.service_benchmark_parser(__doc__, "stream_churn", baseline=False)
    ap.add_argument("--live", type=int, default=500, help="streams alive throughout")
    ap.add_argument("--churn", type=int, default=5000, help="deletes (and as many creates)")
    ap.add_argument("--points", type=int, default=300,
                    help="points posted to each new stream (the default detector warms "
                    "up on 256)")
    ap.add_argument("--setups", nargs="+", default=["one", "two"], choices=["one", "two"])
    ap.add_argument("--settle", type=float, default=15.0,
                    help="seconds between the churn's end and the memory reading (the "
                    "cache check runs every TSAD_SCORER_CACHE_CHECK_SECONDS, 10 s)")
    ap.add_argument("--before", type=Path, default=None,
                    help="the JSON of a run of an earlier commit, shown beside this one")
    args = ap.parse_args()
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server not found: `make redis-server` installs it")
    workdir = tempfile.mkdtemp(prefix="tsad-churn-")
    port = free_port()
    redis = start_redis(port, workdir)
    try:
        rows = [run(s, f"redis://127.0.0.1:{port}/0", args.live, args.churn, args.points,
                    args.settle) for s in args.setups]
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    commit = reporting.git_commit()
    lines = [f"# Stream churn: resident memory at the same live count ({commit})", "",
             f"{datetime.now(UTC):%Y-%m-%d}, {platform.node()}; `python "
             f"benchmarks/stream_churn.py --live {args.live} --churn {args.churn} "
             f"--points {args.points}`", "",
             "| set-up | live streams | deletes + creates | RSS before (MB) | RSS after (MB) "
             "| growth (MB) | churn (s) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    before = json.loads(args.before.read_text()) if args.before else None
    for run_ in ([before] if before else []) + [{"commit": commit, "rows": rows}]:
        for r in run_["rows"]:
            who = ("one process" if r["setup"] == "one"
                   else "two replicas (A scores, B deletes): A's memory")
            lines.append(f"| {who}, {run_['commit']} | {r['live']} | {r['churn']:,} | "
                         f"{r['rss_before_mb']} | {r['rss_after_mb']} | {r['growth_mb']:+} "
                         f"| {r['churn_seconds']} |")
    reporting.save_report({"commit": commit, "rows": rows, "before": before}, "\n".join(lines),
                ROOT / "benchmarks" / "results" / args.name)


if __name__ == "__main__":
    main()
