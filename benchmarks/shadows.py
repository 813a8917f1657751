"""What shadow detectors cost the live path: the service as its own process (uvicorn),
real HTTP, in-memory and Redis stores.

1. Live latency with 0, 1 and 3 cheap shadows: NAB's nyc_taxi into one stream per
   configuration, each on its own service process (the default detector live; shadows:
   residual_linear, then also ensemble with its own warm-up and raw_knn), one client
   posting back to back (the worst case for work in the background), the three taking
   turns in blocks of 100 requests (so they see the same stretches of a shared machine;
   a block's shadows finish before the next block), batch 1 and batch 100, after the
   detectors' warm-up.
2. The lag of a language-model shadow: ``streams`` streams (100), each the default live
   and an embedding-memory shadow (TSAD_SHADOWS_ALLOW_COSTLY), each sent one point a
   second for ``seconds``, from ``--lm-warm-points`` on (each stream a different stretch
   of nyc_taxi, scaled differently, so their prompts do not share the embedding cache).
   The lag of each point, from its storing to the shadow's score, is the service's own
   histogram (tsad_shadow_lag_seconds{kind="costly"}) over the paced phase; the points
   each shadow has not scored at the end say whether the shadows keep up; the /score
   latency of the same phase, beside the same streams without shadows, says whether the
   lagging shadows held requests back.

    python benchmarks/shadows.py --data-dir ../shared/datasets

Prints markdown tables and writes benchmarks/results/shadows.{json,md}; the 1-minute
load average is recorded before and after each part (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from throughput import load_nab, start_redis  # noqa: E402

from models.data import run_main  # noqa: E402
from models.reporting import results_dir, save_report  # noqa: E402
from service.process import ServiceProcess, free_port  # noqa: E402
from service.settings import Settings  # noqa: E402

CHEAP = [("rl", {"detector": "residual_linear"}),
         ("ens", {"detector": "ensemble", "params": {"warmup": 128}}),
         ("knn", {"detector": "raw_knn"})]
WARM = 640  # the default's warm-up (320 points) and a few chunks more


def load() -> float:
    return round(os.getloadavg()[0], 2)


def stats(ms: list[float]) -> dict:
    a = np.array(ms)
    return {"requests": len(a), "mean_ms": round(float(a.mean()), 3),
            "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p95_ms": round(float(np.percentile(a, 95)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3)}


def body(stream: str, rows: np.ndarray) -> dict:
    return {"stream": stream, "timestamps": rows[:, 0].tolist(),
            "values": rows[:, 1:].tolist()}


# --- 1. live latency with 0, 1, 3 cheap shadows ------------------------------------------------
BLOCK = 100  # requests per block at most; the configurations take turns
CATCH_UP_SECONDS = Settings.model_fields["shadow_catch_up_seconds"].default


def caught_up(http: httpx.Client, stream: str) -> bool:
    """Every shadow of the stream has scored every chunk the stream completed."""
    shadows = http.get(f"/streams/{stream}/shadows").json()["shadows"]
    return all(s["lag_points"] < 64 for s in shadows)


def wait_caught_up(http: httpx.Client, stream: str) -> None:
    """Until ``caught_up``: first a sleep as long as a cheap shadow's longest wait for a
    catch-up (TSAD_SHADOW_CATCH_UP_SECONDS, 1 s), then a poll every 50 ms, so that the
    polls' own CPU (counted to the block's requests) is about one request per block
    whichever the tree."""
    time.sleep(CATCH_UP_SECONDS)
    while not caught_up(http, stream):
        time.sleep(0.05)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time (user + system) of a process, and of its children alive now (the shadows'
    worker process): /proc, Linux."""
    def one(p: int) -> float:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        kids += [int(k) for k in task.read_text().split()]
    return one(pid), sum(one(k) for k in kids)


def cheap_shadows(series: np.ndarray, store: str, env: dict, batches: tuple[int, ...],
                  requests: int, trees: dict[str, Path | None]) -> list[dict]:
    """One service process per tree and configuration (0, 1, 3 shadows: a shadow's
    background work must not slow another configuration's requests), taking turns in
    blocks of at most BLOCK requests (at least 12 turns); a block's shadows finish their
    work before the next block starts, and the CPU time the service process and its
    children (the shadows' worker) spent over the block is counted to its requests."""
    rows = []
    configs = [(tree, n) for tree in trees for n in (0, 1, 3)]
    envs = [{**env, "TSAD_REDIS_PREFIX": f"bench{k}"} for k in range(len(configs))]
    procs = [ServiceProcess(e, root=trees[tree]).start()
             for e, (tree, _) in zip(envs, configs, strict=True)]
    try:
        clients = [httpx.Client(base_url=p.url, timeout=120) for p in procs]
        for batch in batches:
            stream = f"{store}-b{batch}"
            for (_, n), http in zip(configs, clients, strict=True):
                assert http.put(f"/streams/{stream}", json={"channels": 1}).status_code == 201
                for name, spec in CHEAP[:n]:
                    r = http.put(f"/streams/{stream}/shadows/{name}", json=spec)
                    assert r.status_code == 201, r.text
                http.post("/score", json=body(stream, series[:WARM])).raise_for_status()
                wait_caught_up(http, stream)
            latencies: list[list[float]] = [[] for _ in configs]
            cpu = [[0.0, 0.0] for _ in configs]  # the service process's, its children's
            before = load()
            steps = min(requests, (len(series) - WARM) // batch)
            block = max(1, min(BLOCK, steps // 12))
            done = 0
            with tqdm(total=steps * len(configs), desc=f"{store} batch {batch}",
                      leave=False) as bar:
                while done < steps:
                    for k, (http, proc) in enumerate(zip(clients, procs, strict=True)):
                        cpu0 = cpu_seconds(proc.proc.pid)
                        for i in range(done, min(done + block, steps)):
                            rows_i = series[WARM + i * batch:WARM + (i + 1) * batch]
                            t0 = time.perf_counter()
                            r = http.post("/score", json=body(stream, rows_i))
                            latencies[k].append((time.perf_counter() - t0) * 1000)
                            assert r.status_code == 200, r.text
                            bar.update()
                        wait_caught_up(http, stream)
                        for j, (a, b) in enumerate(zip(cpu0, cpu_seconds(proc.proc.pid),
                                                       strict=True)):
                            cpu[k][j] += b - a
                    done = min(done + block, steps)
            after = load()
            for k, ((tree, n), http) in enumerate(zip(configs, clients, strict=True)):
                shadows = http.get(f"/streams/{stream}/shadows").json()["shadows"]
                rows.append({"store": store, "batch": batch, "tree": tree, "shadows": n,
                             "detectors": [s["detector"] for s in shadows],
                             "shadow_points": [s["points"] for s in shadows],
                             **stats(latencies[k]),
                             "cpu_ms_per_request": round(1000 * sum(cpu[k]) / steps, 3),
                             "service_cpu_ms_per_request": round(1000 * cpu[k][0] / steps, 3),
                             "load_1m_before": before, "load_1m_after": after})
            for tree in trees:
                mine = [r for r in rows[-len(configs):] if r["tree"] == tree]
                base = mine[0]
                for row in mine[1:]:
                    for key in ("mean_ms", "p50_ms", "cpu_ms_per_request",
                                "service_cpu_ms_per_request"):
                        row[f"{key}_vs_none"] = round(row[key] / base[key] - 1, 4)
    finally:
        for p in procs:
            p.stop()
    return rows


# --- 2. a language-model shadow's lag ----------------------------------------------------------
def histogram(text: str, name: str, labels: dict) -> dict[float, float]:
    """Cumulative bucket counts of a histogram series in /metrics text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"{name}_bucket" and all(s.labels.get(k) == v
                                                  for k, v in labels.items()):
                out[float(s.labels["le"])] = s.value
    return out


def quantile(buckets: dict[float, float], q: float) -> list[float] | None:
    """The bucket a quantile lies in, (lo, hi], from cumulative bucket counts: the lag
    buckets are coarse (60, 120, 300 s), and interpolating within one (as PromQL's
    histogram_quantile) can name a lag longer than the run."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if not total:
        return None
    lo = 0.0
    for b in bounds:
        if buckets[b] >= q * total:
            return [lo, b]
        lo = b
    return None


def span(bucket: list[float] | None) -> str:
    return "" if bucket is None else f"{bucket[0]:g}–{bucket[1]:g}"


def within(buckets: dict) -> str:
    """'10 s: 9, 30 s: 66, ...': cumulative counts, up to the first bucket holding all."""
    out = []
    for le, n in sorted((float(k), v) for k, v in buckets.items()):
        if n:
            out.append(f"{le:g} s: {int(n)}")
        if n and n == max(buckets.values()):
            break
    return ", ".join(out)


def stream_series(series: np.ndarray, k: int, n: int) -> np.ndarray:
    """Stream k's points: its own stretch of the file, its own scale and noise."""
    rng = np.random.default_rng(k)
    start = (k * 97) % (len(series) - n)
    rows = series[start:start + n].copy()
    rows[:, 0] = series[:n, 0]  # one clock for all
    rows[:, 1] = rows[:, 1] * rng.uniform(0.5, 2.0) + rng.normal(0, 50, n)
    return rows


async def paced(url: str, prefix: str, streams: int, data: list[np.ndarray], seconds: float,
                first: int) -> tuple[list[float], int]:
    """Each stream one point a second (streams spread over the second)."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()

    async def one(k: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        await asyncio.sleep(k / streams)
        i = first
        while time.perf_counter() - start < seconds:
            due = start + k / streams + (i - first)
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            t0 = time.perf_counter()
            try:
                r = await http.post("/score", json=body(f"{prefix}-{k}", data[k][i:i + 1]))
                errors += r.status_code != 200
            except httpx.TransportError:  # counted: one lost request must not end the run
                errors += 1
            latencies.append((time.perf_counter() - t0) * 1000)
            i += 1

    # idle connections expire here before the service closes them (TSAD_KEEP_ALIVE_SECONDS,
    # 5 s): else a request sent as the service closes its connection fails (ReadError)
    limits = httpx.Limits(max_connections=streams, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(one(k, http) for k in range(streams)))
    return latencies, errors


def lm_lag(series: np.ndarray, env: dict, streams: int, seconds: float, warm: int) -> dict:
    n = warm + int(seconds) + 10
    data = [stream_series(series, k, n) for k in range(streams)]
    env = {**env, "TSAD_SHADOWS_ALLOW_COSTLY": "true"}
    with ServiceProcess(env, log_path=Path(tempfile.gettempdir()) / "tsad-bench-lm.log"
                        ) as svc, httpx.Client(base_url=svc.url, timeout=600) as http:

        def start(prefix: str, shadow: bool) -> None:
            for k in tqdm(range(streams), desc=f"{prefix} streams", leave=False):
                r = http.put(f"/streams/{prefix}-{k}", json={"channels": 1})
                assert r.status_code == 201, r.text
                if shadow:
                    r = http.put(f"/streams/{prefix}-{k}/shadows/memory",
                                 json={"detector": "embedding_memory"})
                    assert r.status_code == 201, r.text
                if warm:
                    http.post("/score", json=body(f"{prefix}-{k}", data[k][:warm])
                              ).raise_for_status()

        def shadows() -> list[dict]:
            return [s for k in range(streams)
                    for s in http.get(f"/streams/lm-{k}/shadows").json()["shadows"]]

        # the same streams and pace without shadows first: what /score costs anyway
        start("plain", shadow=False)
        plain_before = load()
        plain, plain_errors = asyncio.run(paced(svc.url, "plain", streams, data, seconds,
                                                warm))
        plain_after = load()
        start("lm", shadow=True)
        t0 = time.perf_counter()  # the warm-up's language-model work, on the queue
        while warm and any(s["lag_points"] for s in shadows()):
            time.sleep(2)
        warm_seconds = round(time.perf_counter() - t0, 1)
        before_text = http.get("/metrics").text
        load_before = load()
        latencies, errors = asyncio.run(paced(svc.url, "lm", streams, data, seconds, warm))
        load_after = load()
        end = shadows()
        after_text = http.get("/metrics").text
    lag = {"kind": "costly"}
    b0, b1 = (histogram(t, "tsad_shadow_lag_seconds", lag) for t in (before_text, after_text))
    phase = {le: b1[le] - b0.get(le, 0.0) for le in b1}
    hits = {t: sum(s.value for f in text_string_to_metric_families(t) for s in f.samples
                   if s.name == "tsad_embedding_cache_hits_total") for t in
            (before_text, after_text)}
    scored = int(phase.get(float("inf"), 0))
    lags = [s["lag_points"] for s in end]
    return {"streams": streams, "points_per_second_per_stream": 1, "seconds": seconds,
            "warm_up_points": warm, "warm_up_catch_up_seconds": warm_seconds,
            "points_offered": len(latencies), "points_scored_by_shadows": scored,
            "shadow_points_per_second": round(scored / seconds, 1),
            "lag_p50_s": quantile(phase, 0.5), "lag_p95_s": quantile(phase, 0.95),
            "lag_p99_s": quantile(phase, 0.99), "lag_buckets": phase,
            "lag_points_at_end_max": max(lags), "lag_points_at_end_mean":
            round(float(np.mean(lags)), 1), "lag_points_at_end_total": int(sum(lags)),
            "skipped_points": sum(s["skipped_points"] for s in end),
            "score": stats(latencies), "score_errors": errors,
            "score_without_shadows": stats(plain), "score_errors_without_shadows": plain_errors,
            "load_1m_without_shadows": [plain_before, plain_after],
            "embedding_cache_hits_in_phase": hits[after_text] - hits[before_text],
            "load_1m_before": load_before, "load_1m_after": load_after}


def table(result: dict) -> str:
    lines = ["# Shadow detectors: what they cost the live path", "",
             f"{result['created']}, {result['machine']}; `{result['command']}`", "",
             *([result["note"], ""] if result.get("note") else [])]
    if result["cheap"]:
        lines += ["## Live /score latency with 0, 1 and 3 cheap shadows", "",
                  "| store | batch | tree | shadows | mean ms | vs none | p50 ms | vs none | "
                  "p95 ms | p99 ms | service CPU ms/request | vs none | with shadow worker | "
                  "vs none | requests | load 1m |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def vs(row: dict, key: str) -> str:
        return f"{100 * row[key]:+.1f}%" if key in row else ""

    for r in result["cheap"]:
        lines.append(f"| {r['store']} | {r['batch']} | {r.get('tree', '')} | {r['shadows']} | "
                     f"{r['mean_ms']} | {vs(r, 'mean_ms_vs_none')} | {r['p50_ms']} | "
                     f"{vs(r, 'p50_ms_vs_none')} | {r['p95_ms']} | {r['p99_ms']} | "
                     f"{r.get('service_cpu_ms_per_request', '')} | "
                     f"{vs(r, 'service_cpu_ms_per_request_vs_none')} | "
                     f"{r.get('cpu_ms_per_request', '')} | "
                     f"{vs(r, 'cpu_ms_per_request_vs_none')} | {r['requests']} | "
                     f"{r['load_1m_before']} → {r['load_1m_after']} |")
    if result["cheap"]:
        lines += ["", "Shadows: 1 = residual_linear; 3 = residual_linear, ensemble (warmup "
                  "128), raw_knn. Live: the default (ensemble). Each tree and configuration "
                  "on its own service process, one client posting back to back, the "
                  "configurations taking turns in blocks of requests (100 at batch 1, 8 at "
                  "batch 100); after each turn a sleep of TSAD_SHADOW_CATCH_UP_SECONDS' "
                  "default, then polls until the shadows have caught up. Service CPU: the "
                  "service process's CPU time over each turn per request (the live path, "
                  "the shadows' commits; a tree before the child process, also its "
                  "shadows' scoring); with shadow worker: the service's and its children's "
                  "(the child process scoring the shadows), shadows' catch-up included.", ""]
    if lm := result.get("lm"):
        s = lm["score"]
        lines += ["## A language-model shadow's lag", "",
                  f"{lm['streams']} streams, one point a second each, {lm['seconds']:.0f} s, "
                  f"from {lm['warm_up_points']} points on, each stream the default live and "
                  "an `embedding_memory` shadow (costly: on the background queue), Redis.", "",
                  "| points offered | scored by the shadows | shadow points/s | lag p50 s | "
                  "lag p95 s | lag p99 s | lag at end (max, mean, total points) | skipped | "
                  "load 1m |", "|---|---|---|---|---|---|---|---|---|",
                  f"| {lm['points_offered']} | {lm['points_scored_by_shadows']} | "
                  f"{lm['shadow_points_per_second']} | {span(lm['lag_p50_s'])} | "
                  f"{span(lm['lag_p95_s'])} | {span(lm['lag_p99_s'])} | "
                  f"{lm['lag_points_at_end_max']}, "
                  f"{lm['lag_points_at_end_mean']}, {lm['lag_points_at_end_total']} | "
                  f"{lm['skipped_points']} | {lm['load_1m_before']} → {lm['load_1m_after']} |",
                  "", "Lag: from a point's storing to its score by the shadow "
                  "(`tsad_shadow_lag_seconds{kind=\"costly\"}`: the bucket each quantile "
                  "lies in), over the points the shadows scored in the phase; "
                  "a costly shadow catches up at each chunk end (64 points: about a minute "
                  "at one point a second). Lag at end: points each stream stored that its "
                  "shadow had not scored when the phase ended (at one point a second, "
                  "points = seconds behind).", "",
                  f"Points scored within: {within(lm['lag_buckets'])}.", "",
                  *([f"Points offered: the requests the clients sent. A stream sends its "
                     f"next point once the previous one is answered, so fewer than "
                     f"{lm['streams'] * lm['seconds']:.0f} means /score could not keep "
                     "the pace on this machine, with or without shadows.", ""]
                    if lm["points_offered"] < 0.95 * lm["streams"] * lm["seconds"] else []),
                  "| /score, the same pace | mean ms | p50 ms | p95 ms | p99 ms | errors | "
                  "load 1m |", "|---|---|---|---|---|---|---|"]
        b = lm["score_without_shadows"]
        lb = lm["load_1m_without_shadows"]
        lines += [f"| without shadows | {b['mean_ms']} | {b['p50_ms']} | {b['p95_ms']} | "
                  f"{b['p99_ms']} | {lm['score_errors_without_shadows']} | {lb[0]} → {lb[1]} |",
                  f"| with the language-model shadows | {s['mean_ms']} | {s['p50_ms']} | "
                  f"{s['p95_ms']} | {s['p99_ms']} | {lm['score_errors']} | "
                  f"{lm['load_1m_before']} → {lm['load_1m_after']} |", ""]
    return "\n".join(lines)


def main() -> int | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets",
                    help="a folder holding nab/ (tests/data works: results go to runs/bench)")
    ap.add_argument("--stores", default="memory,redis",
                    help="comma-separated ('': only the language-model part)")
    ap.add_argument("--batches", default="1,100", help="batch sizes of the latency part")
    ap.add_argument("--requests", type=int, default=1500,
                    help="requests per stream and batch size in the latency part")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another source tree (e.g. a checkout of main) run side by side in "
                    "the latency part, interleaved with this one")
    ap.add_argument("--lm-streams", type=int, default=100)
    ap.add_argument("--lm-seconds", type=float, default=180.0,
                    help="paced phase of the language-model part (0: skip it)")
    ap.add_argument("--lm-warm-points", type=int, default=0,
                    help="points each stream of the language-model part gets before the "
                    "paced phase, scored by the shadows before it starts (100 streams x 640 "
                    "points: tens of minutes of language model on a shared 2-core machine)")
    ap.add_argument("--out", type=Path, default=None, help="default: results dir/shadows")
    args = ap.parse_args()
    series = load_nab(args.data_dir)
    out = args.out or results_dir(args.data_dir) / "shadows"
    result: dict = {"created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
                    "command": "python " + shlex.join([Path(sys.argv[0]).as_posix(),
                                                       *sys.argv[1:]]), "cheap": []}
    batches = tuple(int(b) for b in args.batches.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        redis = start_redis(port, tmp)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            for store in filter(None, args.stores.split(",")):  # "": no latency part
                env = {"REDIS_URL": url} if store == "redis" else {}
                trees = {"this": None, **({"baseline": args.baseline} if args.baseline
                                          else {})}
                result["cheap"] += cheap_shadows(series, store, env, batches, args.requests,
                                                 trees)
                save_report(result, table(result), out, echo=False)
            if args.lm_seconds > 0:
                subprocess.run(["redis-cli", "-p", str(port), "FLUSHALL"], check=True,
                               stdout=subprocess.DEVNULL)
                result["lm"] = lm_lag(series, {"REDIS_URL": url}, args.lm_streams,
                                      args.lm_seconds, args.lm_warm_points)
        finally:
            redis.terminate()
    save_report(result, table(result), out)
    return None


if __name__ == "__main__":
    sys.exit(run_main(main))
