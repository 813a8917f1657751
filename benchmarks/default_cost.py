"""The default detector's cost beside another checkout's (the previous default), in one run.

On a shared machine a rate measured now and one measured later are not comparable, and
even rates of one run move with other people's load. So the two checkouts take turns
(``--rounds``), and beside each end-to-end rate this reports the CPU seconds the service
process spent per point, which other processes' load moves much less:

* ``POST /score`` of NAB's nyc_taxi (one channel), one client, batch 1,000 (the series,
  columnar) and batch 1 (``--batch1-points`` points, one request each), each checkout's
  service as its own process (``python -m uvicorn service.main:app``) over its own Redis;
* the offline loop (``models.streaming.stream_scores``, the service's loop with the
  threshold the service gives the stream) over three NAB files, CPU per point;
* the state one univariate stream keeps after 5,000 points, by section (bytes).

    git worktree add /tmp/prev <commit of the previous default>
    python benchmarks/default_cost.py --data-dir ../shared/datasets --previous /tmp/prev

Writes benchmarks/results/default_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from throughput import load_nab, start_redis, to_body  # noqa: E402

from models.data import run_main  # noqa: E402
from models.reporting import results_dir, save_report  # noqa: E402
from service.process import free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
OFFLINE_FILES = ("realKnownCause/nyc_taxi.csv", "artificialWithAnomaly/art_daily_jumpsup.csv",
                 "realAWSCloudwatch/ec2_cpu_utilization_5f5533.csv")
# run inside a checkout (its own code): the offline loop's CPU per point, and the state of
# one univariate stream after 5,000 points of nyc_taxi, by section; BLAS threads limited as
# the service limits them (on a loaded machine idle BLAS threads spin: 10x the CPU)
PROBE = """
import json, sys, time
import numpy as np
from models import nab
from models.detectors import build_detector
from models.streaming import stream_scores
from models.thresholds import build_threshold, verdict_spec
from service.scoring import StreamScorer, stream_spec
from service.settings import Settings
from service.stores.base import StreamMeta
settings = Settings()
from threadpoolctl import threadpool_limits
threadpool_limits(settings.blas_threads, user_api="blas")  # as the service does
corpus = {f.key: f for f in nab.load_corpus(sys.argv[1])}
files = [corpus[k] for k in json.loads(sys.argv[2])]
cpu = []
for _ in range(3):
    t = time.process_time()
    for f in files:
        det = build_detector(settings.default_detector, window=settings.default_window)
        meta = StreamMeta("s", 1, det.config.window, settings.default_detector)
        spec = verdict_spec(stream_spec(settings, meta), det, chosen=False)
        stream_scores(det, f.values, 0, build_threshold(spec), timestamps=f.timestamps)
    cpu.append(time.process_time() - t)
f = corpus["realKnownCause/nyc_taxi.csv"]
meta = StreamMeta("s", 1, settings.default_window, settings.default_detector)
scorer = StreamScorer(meta, settings)
for lo in range(0, 5000, 500):
    meta.points_seen = lo + 500
    first = max(0, lo - 200)
    scorer.process(np.column_stack([f.timestamps[first:lo + 500], f.values[first:lo + 500]]),
                   500)
sections = {k: len(v) for k, v in scorer.sections().items()}
print(json.dumps({"points": sum(len(f.values) for f in files), "cpu_s": min(cpu),
                  "sections": sections}))
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def start_service(root: Path, redis_url: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "TSAD_LOG_LEVEL": "WARNING",
           "TSAD_PORT": str(port), "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.main:app", "--host",
                             "127.0.0.1", "--port", str(port), "--no-access-log"],
                            env=env, cwd=root, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{root}: the service exited ({log})")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"{root}: the service did not become healthy ({log})")


def replay(url: str, pid: int, series: np.ndarray, batch: int, stream: str) -> dict:
    """Post the series in order, one request at a time: wall rate and the service's CPU
    per point."""
    with httpx.Client(base_url=url, timeout=600) as http:
        http.delete(f"/streams/{stream}")
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        for lo in range(0, len(series), batch):
            r = http.post("/score", json={"stream": stream,
                                          **to_body(series[lo:lo + batch], "columnar")})
            if r.status_code != 200:
                raise RuntimeError(f"POST /score {r.status_code}: {r.text[:200]}")
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return {"batch": batch, "points": len(series), "points_per_s": len(series) / wall,
            "cpu_us_per_point": 1e6 * cpu / len(series), "load_1m": os.getloadavg()[0]}


def measure(root: Path, series: np.ndarray, batch1_points: int, workdir: Path) -> list[dict]:
    redis_port = free_port()
    redis = start_redis(redis_port, str(workdir))
    proc, url = start_service(root, f"redis://127.0.0.1:{redis_port}/0",
                              workdir / "service.log")
    try:
        return [replay(url, proc.pid, series, 1000, "cost-1000"),
                replay(url, proc.pid, series[:batch1_points], 1, "cost-1")]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        redis.terminate()
        redis.wait()


def probe(root: Path, nab_dir: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(nab_dir.resolve()),
                          json.dumps(OFFLINE_FILES)],
                         cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{root}: the probe failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True, help="folder holding nab/")
    ap.add_argument("--previous", type=Path, required=True,
                    help="a checkout of the previous default (git worktree add ...)")
    ap.add_argument("--rounds", type=int, default=3, help="turns each checkout takes")
    ap.add_argument("--batch1-points", type=int, default=1000,
                    help="points posted one per request")
    ap.add_argument("--out", type=Path, default=None,
                    help="output path without suffix (default benchmarks/results/default_cost)")
    args = ap.parse_args()
    series = load_nab(args.data_dir)  # missing data: one line (run_main)
    nab_dir = args.data_dir / "nab" if (args.data_dir / "nab").is_dir() else args.data_dir
    out = args.out or results_dir(args.data_dir) / "default_cost"
    roots = {"previous": args.previous.resolve(), "new": ROOT}
    commits = {k: subprocess.run(["git", "-C", str(r), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip()
               for k, r in roots.items()}
    runs: dict[str, list[dict]] = {k: [] for k in roots}
    offline: dict[str, list[dict]] = {k: [] for k in roots}
    with tempfile.TemporaryDirectory(prefix="tsad-cost-") as tmp:
        for rnd in range(args.rounds):
            for name, root in roots.items():
                print(f"round {rnd + 1}/{args.rounds}: {name}", file=sys.stderr)
                runs[name] += measure(root, series, args.batch1_points, Path(tmp))
                offline[name].append(probe(root, nab_dir))
    result = {"roots": {k: str(v) for k, v in roots.items()}, "commits": commits,
              "rounds": args.rounds, "runs": runs, "offline": offline,
              "machine": platform.platform(), "cores": os.cpu_count(),
              "date": datetime.now(UTC).isoformat(timespec="seconds")}
    save_report(result, table(result), out)
    return 0


def table(result: dict) -> str:
    def med(name: str, batch: int, key: str) -> float:
        return float(np.median([r[key] for r in result["runs"][name] if r["batch"] == batch]))

    def offline_rate(name: str) -> float:
        return float(np.median([o["points"] / o["cpu_s"] for o in result["offline"][name]]))

    c = result["commits"]
    lines = [
        "# The default detector's cost beside the previous default",
        "",
        f"`python benchmarks/default_cost.py --previous ...` ({result['date']}): previous = "
        f"{c['previous']}, new = {c['new']}; {result['rounds']} rounds, the two taking "
        f"turns, medians shown. NAB nyc_taxi (1 channel) through POST /score (Redis, one "
        f"client, one request at a time); CPU = the service process's CPU seconds per "
        f"point (other processes' load moves it much less than the wall rate); offline = "
        f"the service's loop in process over three NAB files, CPU per point. "
        f"{result['cores']} cores; load average after each run in the JSON.",
        "",
        "| measure | previous | new | new / previous (rate) |",
        "|---|---|---|---|",
    ]
    for batch in (1000, 1):
        p, n = med("previous", batch, "points_per_s"), med("new", batch, "points_per_s")
        lines.append(f"| batch {batch:,}: points/s end to end | {p:,.0f} | {n:,.0f} | "
                     f"{n / p:.2f} |")
        p, n = (med("previous", batch, "cpu_us_per_point"),
                med("new", batch, "cpu_us_per_point"))
        lines.append(f"| batch {batch:,}: service CPU us per point | {p:,.1f} | {n:,.1f} | "
                     f"{p / n:.2f} |")
    p, n = offline_rate("previous"), offline_rate("new")
    lines.append(f"| offline loop: points per CPU second | {p:,.0f} | {n:,.0f} | {n / p:.2f} |")
    loads = [r["load_1m"] for runs in result["runs"].values() for r in runs]
    lines += ["", f"Load average (1 min) during the runs: {min(loads):.1f} to "
              f"{max(loads):.1f}.", "", "State of one univariate stream after 5,000 points "
              "(bytes, by section):", "", "| section | previous | new |", "|---|---|---|"]
    prev, new = result["offline"]["previous"][0]["sections"], result["offline"]["new"][0][
        "sections"]
    for name in sorted(set(prev) | set(new)):
        lines.append(f"| {name} | {prev.get(name, 0):,} | {new.get(name, 0):,} |")
    lines.append(f"| all | {sum(prev.values()):,} | {sum(new.values()):,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
