"""`tsad replay`: post a recorded series to a running service, as a live producer would.

CSV files need a header; the first column is the timestamp (epoch seconds or an ISO 8601 /
RFC 3339 date-time, naive = UTC), the others are channel values. ``.npy`` files are
(T, C) arrays; their timestamps are the row numbers (or --start + row * --step).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay", help="post a CSV/NPY series to /score in batches",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help="CSV (timestamp,value[,value...]) or .npy (T, C)")
    p.add_argument("--stream", required=True, help="stream id to post to")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    p.add_argument("--batch", type=int, default=100, help="points per request (default 100)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="points per second to send; 0 = as fast as the service answers")
    p.add_argument("--start", type=float, default=0.0, help=".npy: first timestamp")
    p.add_argument("--step", type=float, default=1.0, help=".npy: seconds between rows")
    p.add_argument("--out", type=Path, help="write every result as JSON lines here")
    p.set_defaults(func=run)


def load_series(path: Path, start: float = 0.0, step: float = 1.0) -> np.ndarray:
    """(T, 1 + C): timestamps (epoch seconds) then values."""
    if path.suffix == ".npy":
        values = np.load(path).astype(np.float64)
        values = values[:, None] if values.ndim == 1 else values
        return np.column_stack([start + step * np.arange(len(values)), values])
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f)][1:]
    return np.array([[parse_timestamp(r[0]), *map(float, r[1:])] for r in rows if r])


def parse_timestamp(text: str) -> float:
    """Epoch seconds or ISO 8601 (naive means UTC).

    >>> parse_timestamp("2014-07-01 00:30:00")
    1404174600.0
    >>> parse_timestamp("1404174600")
    1404174600.0
    """
    try:
        return float(text)
    except ValueError:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()


def run(args: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    series = load_series(args.file, args.start, args.step)
    latencies: list[float] = []
    scored = anomalies = 0
    out = open(args.out, "w") if args.out else None  # noqa: SIM115
    began = time.monotonic()
    with httpx.Client(base_url=args.url, timeout=60) as http, tqdm(
        total=len(series), unit="pt", desc=args.stream
    ) as bar:
        for lo in range(0, len(series), args.batch):
            chunk = series[lo:lo + args.batch]
            body = {"stream": args.stream, "points": [
                {"timestamp": float(r[0]), "values": r[1:].tolist()} for r in chunk]}
            t0 = time.perf_counter()
            resp = http.post("/score", json=body)
            latencies.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                bar.close()
                print(f"error {resp.status_code} at point {lo}: {resp.text}")
                return 1
            for r in resp.json()["results"]:
                scored += r["status"] == "scored"
                if r["anomaly"]:
                    anomalies += 1
                    tqdm.write(f"anomaly at {r['timestamp']}: score {r['score']:.3g} > "
                               f"threshold {r['threshold']:.3g}")
                if out:
                    out.write(json.dumps(r) + "\n")
            bar.update(len(chunk))
            if args.rate > 0:  # pace to the requested rate
                ahead = (lo + len(chunk)) / args.rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
    if out:
        out.close()
    lat = np.array(latencies) * 1000
    print(json.dumps({"stream": args.stream, "points": len(series), "scored": scored,
                      "anomalies": anomalies, "requests": len(lat),
                      "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2),
                                     "p95": round(float(np.percentile(lat, 95)), 2),
                                     "max": round(float(lat.max()), 2)}}))
    return 0
