"""Throughput of POST /score: the service runs as its own process (uvicorn), clients post
concurrently, one stream each. In-memory and Redis stores side by side, batch sizes 1, 100
and 1000, a NAB series (1 channel) and the MSL test set (55 channels), plus
redis-benchmark's pipelined LPUSH from the same run as the ceiling.

    python benchmarks/throughput.py --data-dir ../shared/datasets

Prints a markdown table and writes benchmarks/results/throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.reporting import save_report  # noqa: E402
from service.process import ServiceProcess, free_port  # noqa: E402
from service.settings import Settings  # noqa: E402


def load_nab(data_dir: Path) -> np.ndarray:
    with open(data_dir / "nab" / "realKnownCause" / "nyc_taxi.csv") as f:
        rows = list(csv.reader(f))[1:]
    ts = [datetime.fromisoformat(r[0]).replace(tzinfo=UTC).timestamp() for r in rows]
    return np.column_stack([ts, [float(r[1]) for r in rows]])


def load_msl(data_dir: Path) -> np.ndarray:
    test = np.load(data_dir / "msl" / "test.npy").astype(np.float64)
    return np.column_stack([np.arange(len(test), dtype=np.float64), test])


def to_points(rows: np.ndarray) -> list[dict]:
    return [{"timestamp": float(r[0]), "values": r[1:].tolist()} for r in rows]


async def run_load(url: str, series: np.ndarray, batch: int, clients: int,
                   max_requests: int, tag: str) -> dict:
    """Each client replays the series into its own stream, sequential batches."""
    per_client = max(1, min(max_requests // clients, len(series) // batch))
    latencies: list[float] = []
    errors = 0
    payloads = [to_points(series[i * batch:(i + 1) * batch]) for i in range(per_client)]

    async def client(k: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        for points in payloads:
            t0 = time.perf_counter()
            r = await http.post("/score", json={"stream": f"{tag}-{k}", "points": points})
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
        "points_per_s": round(len(latencies) * batch / elapsed, 1),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p95_ms": round(float(np.percentile(lat, 95)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
    }


def redis_benchmark_lpush(port: int, n: int) -> float | None:
    if not shutil.which("redis-benchmark"):
        return None
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-t", "lpush", "-P", "16", "-n",
                          str(n), "-q"], capture_output=True, text=True, timeout=300).stdout
    match = re.search(r"LPUSH: ([\d.]+) requests per second", out.replace("\r", "\n"))
    return float(match.group(1)) if match else None


def start_redis(port: int, workdir: str) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL)
    for _ in range(100):
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                          text=True).stdout.strip() == "PONG":
            return proc
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def markdown(rows: list[dict], lpush: float | None) -> str:
    lines = ["| store | dataset | channels | batch | requests | points/s | requests/s | "
             "p50 ms | p95 ms | p99 ms | errors |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['store']} | {r['dataset']} | {r['channels']} | {r['batch']} | "
                     f"{r['requests']} | {r['points_per_s']} | {r['requests_per_s']} | "
                     f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['errors']} |")
    ceiling = f"{lpush:,.0f} LPUSH/s" if lpush else "redis-benchmark not available"
    lines.append(f"\nCeiling: redis-benchmark -t lpush -P 16 on the same Redis: {ceiling}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets",
                    help="folder holding nab/ and msl/")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (one stream each)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 100, 1000])
    ap.add_argument("--max-requests", type=int, default=800,
                    help="requests per configuration, spread over the clients")
    ap.add_argument("--max-points", type=int, default=40_000,
                    help="points per configuration (bounds batch 1000 on MSL)")
    ap.add_argument("--stores", nargs="+", default=["memory", "redis"])
    args = ap.parse_args()

    datasets = {"nab/nyc_taxi": load_nab(args.data_dir), "msl/test": load_msl(args.data_dir)}
    redis_port = free_port()
    workdir = tempfile.mkdtemp(prefix="tsad-bench-")
    redis = start_redis(redis_port, workdir)
    rows: list[dict] = []
    try:
        for store in args.stores:
            env = {"TSAD_MAX_BATCH_POINTS": "10000", "TSAD_LOG_LEVEL": "WARNING"}
            if store == "redis":
                env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            with ServiceProcess(env) as service:
                for name, series in datasets.items():
                    for batch in args.batch_sizes:
                        max_req = min(args.max_requests, max(args.clients,
                                                             args.max_points // batch))
                        tag = f"{store}-{name.replace('/', '.')}-{batch}"
                        result = asyncio.run(run_load(service.url, series, batch,
                                                      args.clients, max_req, tag))
                        row = {"store": store, "dataset": name,
                               "channels": series.shape[1] - 1, "batch": batch, **result}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        lpush = redis_benchmark_lpush(redis_port, 200_000)
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    report = {
        "benchmark": "throughput", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "clients": args.clients, "redis_benchmark_lpush_per_s": lpush, "results": rows,
    }
    save_report(report, (
        f"# POST /score throughput\n\n{args.clients} concurrent clients, one stream each, "
        f"service and clients on the same {report['machine']['cpus']}-core machine, "
        f"the default detector ({Settings().default_detector}). "
        f"`python benchmarks/throughput.py`.\n\n"
        f"{markdown(rows, lpush)}"), args.out / "throughput")


if __name__ == "__main__":
    main()
