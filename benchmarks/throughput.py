"""Throughput of POST /score: the service runs as its own process (uvicorn), clients post
concurrently, one stream each. In-memory and Redis stores side by side, one and two worker
processes (`tsad serve --workers 2`, Redis), batch sizes 1, 10, 100 and 1000, the list
of points and the columnar form (timestamps + values), a NAB series (1 channel) and the
MSL test set (55 channels); the 1-minute load average after each row, and on Redis the
bytes the service sent Redis per request (its INFO total_net_input_bytes: every command
and its arguments, reads included). References from the same run: River's
HalfSpaceTrees scoring and learning the NAB series in process (one core, no HTTP),
redis-benchmark's pipelined LPUSH as the store's ceiling, and the service's own
ceiling: streams configured with ``none``, a detector registered for this benchmark only
(benchmarks/ceiling_app.py). ``--baseline DIR`` runs the same store rows again with the
code of another checkout (e.g. a clone of main), side by side in the same run, each row
measured on one code then the other.

    python benchmarks/throughput.py --data-dir ../shared/datasets

Prints a markdown table and writes benchmarks/results/throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
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
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.data import DataNotFound, run_main  # noqa: E402
from models.data import load_msl as load_msl_entities  # noqa: E402
from models.data import load_nab as load_nab_series  # noqa: E402
from models.reporting import results_dir, save_report  # noqa: E402
from service.process import ServiceProcess, free_port  # noqa: E402
from service.settings import Settings  # noqa: E402


def load_nab(data_dir: Path) -> np.ndarray:
    """NAB's nyc_taxi: (T, 2) epoch seconds and values."""
    for s in load_nab_series(data_dir):
        if s.name == "realKnownCause/nyc_taxi.csv":
            return np.column_stack([s.timestamps.astype(np.float64), s.values])
    raise DataNotFound(f"--data-dir {data_dir}: no realKnownCause/nyc_taxi.csv in its NAB "
                       "folder; try --data-dir tests/data")


def load_msl(data_dir: Path) -> np.ndarray:
    """The MSL test set, every entity in order: (T, 1 + 55) row numbers and values."""
    test = np.concatenate([e.test for e in load_msl_entities(data_dir)]).astype(np.float64)
    return np.column_stack([np.arange(len(test), dtype=np.float64), test])


def to_points(rows: np.ndarray) -> list[dict]:
    return [{"timestamp": float(r[0]), "values": r[1:].tolist()} for r in rows]


def to_body(rows: np.ndarray, form: str) -> dict:
    """A /score body without the stream: a list of points, or columns."""
    if form == "columnar":
        return {"timestamps": rows[:, 0].tolist(), "values": rows[:, 1:].tolist()}
    return {"points": to_points(rows)}


def warm_points() -> int:
    """Points before a stream of the default detector scores with a fitted detector: its
    window, its windows to fit and a chunk."""
    from service.scoring import stream_detector

    settings = Settings()
    det = stream_detector(settings, settings.default_detector, settings.default_window)
    return settings.default_window + (det.windows_to_fit or 0) + 64


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its descendants (a
    service's workers), from /proc; 0.0 where /proc is not there."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    tree, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in tree} - tree
        grew = bool(more)
        tree |= more
    return sum(used.get(p, 0.0) for p in tree)


def redis_cpu_seconds(r: redis.Redis) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


class _Answer:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.content = status, body
        self.is_success = 200 <= status < 300

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class RawClient:
    """The least a client can do over HTTP/1.1: a kept-alive connection per concurrent
    request, the JSON body and its Content-Length written, the status line and the body
    of Content-Length read back (``--client raw``). The service gets the same requests
    as from httpx (the same bodies, the same Content-Type), at a small part of httpx's
    CPU per request, which on a shared 2-core machine is CPU taken from the service."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port, self.timeout = host, int(port), timeout
        self._free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for _, writer in self._free:
            writer.close()

    async def put(self, path: str, json: dict) -> _Answer:
        return await self._call("PUT", path, json)

    async def post(self, path: str, json: dict) -> _Answer:
        return await self._call("POST", path, json)

    async def _call(self, method: str, path: str, body: dict) -> _Answer:
        data = json.dumps(body).encode()
        async with asyncio.timeout(self.timeout):
            reader, writer = (self._free.pop() if self._free else
                              await asyncio.open_connection(self.host, self.port))
            writer.write(b"%b %b HTTP/1.1\r\nhost: %b:%d\r\ncontent-type: application/json"
                         b"\r\ncontent-length: %d\r\n\r\n%b" % (
                             method.encode(), path.encode(), self.host.encode(), self.port,
                             len(data), data))
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            fields = dict(line.lower().split(": ", 1) for line in head[1:] if line)
            answer = _Answer(int(head[0].split()[1]),
                             await reader.readexactly(int(fields.get("content-length", 0))))
        if fields.get("connection") == "close":
            writer.close()
        else:
            self._free.append((reader, writer))
        return answer


async def run_load(url: str, series: np.ndarray, batch: int, clients: int,
                   max_requests: int, tag: str, form: str = "points",
                   detector: str | None = None, stats: redis.Redis | None = None,
                   pid: int | None = None, client_kind: str = "httpx") -> dict:
    """Each client replays the series into its own stream, sequential batches; with
    ``detector``, each stream is configured with it first (PUT /streams/{id}). The first
    ``warm_points()`` of the series go in untimed, one request per stream: the rows
    measure streams past their warm-up, as a running stream is. ``stats``: the Redis
    whose input bytes (and CPU) are counted over the timed requests; ``pid``: the
    service's process, whose CPU (its workers' included) is counted likewise.
    ``client_kind``: httpx, or raw (``RawClient``)."""
    warm = warm_points()
    per_client = max(1, min(max_requests // clients, (len(series) - warm) // batch))
    latencies: list[float] = []
    errors = 0
    payloads = [to_body(series[warm + i * batch:warm + (i + 1) * batch], form)
                for i in range(per_client)]
    warmed, go = asyncio.Queue(), asyncio.Event()

    async def client(k: int, http: httpx.AsyncClient | RawClient) -> None:
        nonlocal errors
        stream = f"{tag}-{k}"
        if detector is not None:  # a row that silently ran another detector would lie
            r = await http.put(f"/streams/{stream}", json={
                "channels": series.shape[1] - 1, "detector": detector})
            if r.status_code not in (200, 201):
                raise RuntimeError(f"PUT /streams/{stream}: {r.status_code} {r.text}")
        try:  # a stream whose warm-up fails or hangs: its requests count as errors
            warm_up = await http.post("/score", json={"stream": stream,
                                                      **to_body(series[:warm], form)})
            ok = warm_up.is_success
        except (httpx.TimeoutException, TimeoutError):
            ok = False
        finally:
            warmed.put_nowait(k)
        if not ok:
            errors += len(payloads)
            return
        await go.wait()
        for body in payloads:
            t0 = time.perf_counter()
            try:
                ok = (await http.post("/score", json={"stream": stream, **body})).is_success
            except (httpx.TimeoutException, TimeoutError):  # counted, and the row goes on
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    limits = httpx.Limits(max_connections=clients)
    async with (RawClient(url) if client_kind == "raw" else
                httpx.AsyncClient(base_url=url, timeout=120, limits=limits)) as http:
        tasks = [asyncio.create_task(client(k, http)) for k in range(clients)]
        for _ in range(clients):
            await warmed.get()
        sent = stats.info("stats")["total_net_input_bytes"] if stats else 0
        redis_cpu = redis_cpu_seconds(stats) if stats else 0.0
        service_cpu = tree_cpu_seconds(pid) if pid else 0.0
        client_cpu = time.process_time()  # this process: the clients, nothing else runs
        start = time.perf_counter()
        go.set()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        client_cpu = time.process_time() - client_cpu
        if pid:
            service_cpu = tree_cpu_seconds(pid) - service_cpu
        if stats:
            sent = stats.info("stats")["total_net_input_bytes"] - sent
            redis_cpu = redis_cpu_seconds(stats) - redis_cpu
    lat = np.array(latencies) * 1000
    result = {
        "requests": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
        "points_per_s": round(len(latencies) * batch / elapsed, 1),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p95_ms": round(float(np.percentile(lat, 95)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "load_1m": round(os.getloadavg()[0], 2),
    }
    # the load's own cost (httpx, JSON bodies): on a shared machine it competes with the
    # service for the same cores, so it bounds the rates a row can show
    result["client_cpu_ms_per_request"] = round(client_cpu / max(len(latencies), 1) * 1000, 3)
    if pid:
        result["service_cpu_ms_per_request"] = round(service_cpu / max(len(latencies), 1)
                                                     * 1000, 3)
    if stats:
        result["redis_bytes_per_request"] = round(sent / max(len(latencies), 1))
        result["redis_cpu_ms_per_request"] = round(redis_cpu / max(len(latencies), 1)
                                                   * 1000, 3)
    return result


def river_reference(series: np.ndarray) -> dict | None:
    """River's HalfSpaceTrees (min-max scaled, its documented set-up) scoring then learning
    each point of the series in this process: the rate of a pure in-process online
    detector, without HTTP, JSON or a store. None when river is not installed."""
    try:
        from river import anomaly, compose, preprocessing
    except ImportError:
        return None
    model = compose.Pipeline(preprocessing.MinMaxScaler(),
                             anomaly.HalfSpaceTrees(n_trees=10, height=8, window_size=250,
                                                    seed=42))
    xs = [{"x": float(v)} for v in series[:, 1]]
    start = time.perf_counter()
    for x in xs:
        model.score_one(x)
        model.learn_one(x)
    elapsed = time.perf_counter() - start
    return {"points": len(xs), "seconds": round(elapsed, 2),
            "points_per_s": round(len(xs) / elapsed, 1),
            "load_1m": round(os.getloadavg()[0], 2)}


class _Inline(concurrent.futures.ThreadPoolExecutor):
    """Runs submitted work at once in the calling thread: the profiled event loop's
    ``asyncio.to_thread`` (the detector) then shows in the profile."""

    def submit(self, fn, /, *args, **kwargs):  # noqa: ANN001, ANN202 - Executor's signature
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
            future.set_exception(exc)
        return future


def state_bytes(series: np.ndarray, requests: int) -> dict:
    """The stream state a batch-1 request writes: one univariate stream of the default
    detector past its warm-up, ``requests`` single points through the app in process
    (in-memory store); each commit's changed sections, by name, in bytes per request
    (the point itself is appended to the window besides: 16 bytes)."""
    from prometheus_client import CollectorRegistry

    from service.app import create_app
    from service.metrics import ServiceMetrics

    written: dict[str, int] = {}
    warm = warm_points()

    async def run() -> None:
        app = create_app(Settings(max_batch_points=10_000), ServiceMetrics(CollectorRegistry()))
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://bench") as http:
            (await http.post("/score", json={"stream": "b", **to_body(
                series[:warm], "columnar")})).raise_for_status()
            backend = app.state.services.score.backend
            commit = backend.commit

            async def recording(c):  # noqa: ANN001, ANN202 - the backend's commit
                for name, blob in c.sections.items():
                    written[name] = written.get(name, 0) + len(blob)
                return await commit(c)

            backend.commit = recording
            for i in range(requests):
                (await http.post("/score", json={"stream": "b", **to_body(
                    series[warm + i:warm + i + 1], "columnar")})).raise_for_status()

    asyncio.run(run())
    per = {name: round(n / requests) for name, n in sorted(written.items(),
                                                           key=lambda kv: -kv[1])}
    return {"requests": requests, "sections_bytes_per_request": per,
            "total_bytes_per_request": round(sum(written.values()) / requests)}


def profile_in_process(series: np.ndarray, batch: int, requests: int,
                       top: int = 16) -> list[dict]:
    """Where a request's time goes: the service app in this process and thread (in-memory
    store, ASGI without sockets, the detector run inline), one stream, ``requests``
    sequential batches after its warm-up, under cProfile; the functions with the largest
    cumulative share of the profiled time."""
    import cProfile
    import pstats

    from prometheus_client import CollectorRegistry

    from service.app import create_app
    from service.metrics import ServiceMetrics

    settings = Settings(max_batch_points=10_000)
    from service.scoring import stream_detector

    # the stream's window, then its detector's warm-up, then a chunk
    det = stream_detector(settings, settings.default_detector, settings.default_window)
    warm = settings.default_window + (det.windows_to_fit or 0) + 64
    bodies = [{"stream": "p", **to_body(series[lo:lo + n], "points")} for lo, n in
              [(0, warm)] + [(warm + i * batch, batch) for i in range(requests)]]
    profiler = cProfile.Profile()

    async def run() -> None:
        asyncio.get_running_loop().set_default_executor(_Inline())
        app = create_app(settings, ServiceMetrics(CollectorRegistry()))
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://bench") as http:
            (await http.post("/score", json=bodies[0])).raise_for_status()
            profiler.enable()
            for body in bodies[1:]:
                (await http.post("/score", json=body)).raise_for_status()
            profiler.disable()

    asyncio.run(run())
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    total = sum(tt for _, _, tt, _, _ in stats.values())
    ours = str(ROOT)
    rows = sorted(((ct, f"{Path(f).relative_to(ours)}:{name}")
                   for (f, _, name), (_, _, _, ct, _) in stats.items()
                   if f.startswith(ours) and "/.venv/" not in f), reverse=True)
    own = sorted(((tt, f"{Path(f).name}:{name}") for (f, _, name), (_, _, tt, _, _)
                  in stats.items()), reverse=True)  # self time, every module
    return ([{"function": name, "kind": "cumulative", "share": round(ct / total, 3),
              "ms_per_request": round(ct / requests * 1000, 2)} for ct, name in rows[:top]]
            + [{"function": name, "kind": "self", "share": round(tt / total, 3),
                "ms_per_request": round(tt / requests * 1000, 2)} for tt, name in own[:10]])


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


def markdown(rows: list[dict], lpush: float | None, river: dict | None,
             profile: list[dict] | None = None, state: dict | None = None) -> str:
    lines = ["| code | store | workers | detector | form | dataset | channels | batch | "
             "requests | points/s | requests/s | p50 ms | p95 ms | p99 ms | errors | "
             "service CPU ms/request | Redis CPU ms/request | Redis bytes/request | "
             "client CPU ms/request | load 1m |",
             "|" + "---|" * 20]
    for r in rows:
        lines.append(f"| {r.get('code', 'this')} | {r['store']} | {r['workers']} | "
                     f"{r['detector']} | {r['form']} | "
                     f"{r['dataset']} | "
                     f"{r['channels']} | {r['batch']} | {r['requests']} | "
                     f"{r['points_per_s']} | {r['requests_per_s']} | {r['p50_ms']} | "
                     f"{r['p95_ms']} | {r['p99_ms']} | {r['errors']} | "
                     f"{r.get('service_cpu_ms_per_request', '')} | "
                     f"{r.get('redis_cpu_ms_per_request', '')} | "
                     f"{r.get('redis_bytes_per_request', '')} | "
                     f"{r.get('client_cpu_ms_per_request', '')} | {r['load_1m']} |")
    reference = ("river not installed (`pip install river`)" if river is None else
                 f"{river['points_per_s']:,.0f} points/s ({river['points']} points of "
                 f"nab/nyc_taxi scored then learnt, one at a time, in "
                 f"{river['seconds']} s; load {river['load_1m']})")
    ceiling = f"{lpush:,.0f} LPUSH/s" if lpush else "redis-benchmark not available"
    lines.append("\nload 1m: the machine's 1-minute load average after the row. Above the "
                 "core count, other processes shared the CPUs with the service and its "
                 "clients: every rate of the run, River's and Redis's included, is then "
                 "below an idle machine's; compare rows of one run, not runs.")
    lines.append(f"\nReference: River HalfSpaceTrees in process, one core: {reference}.")
    lines.append(f"\nCeiling: redis-benchmark -t lpush -P 16 on the same Redis: {ceiling}.")
    lines.append("\nservice CPU ms/request: the service process's CPU time (user + "
                 "system, its workers' included, from /proc) over the row's timed requests, "
                 "per request; Redis CPU likewise (INFO cpu). Under load these hold better "
                 "than rates: they count the work, not the wait for a core.")
    kinds = sorted({r.get("client", "httpx") for r in rows})
    lines.append(f"\nclient CPU ms/request: the benchmark's own clients ({', '.join(kinds)}; "
                 "one process, its CPU time over the row's timed requests, per request). They "
                 "share the machine's cores with the service and Redis: a row's rate is "
                 "bounded by cores / (service + Redis + client CPU per request).")
    lines.append("\nRedis bytes/request: what the service sent Redis over the row's timed "
                 "requests (INFO total_net_input_bytes: commands, key names, scripts' "
                 "arguments, the lock's calls, reads included) per request.")
    if state:
        parts = ", ".join(f"{k} {v}" for k, v in state["sections_bytes_per_request"].items())
        lines.append(f"\nStream state written per batch-1 request (default detector, "
                     f"univariate, past its warm-up, {state['requests']} requests): "
                     f"{state['total_bytes_per_request']} bytes of changed sections "
                     f"({parts}), plus the point appended to the window.")
    if profile:
        lines += ["\n## Where the time goes\n",
                  "One univariate stream of the default detector, in process "
                  "(the app over the in-memory store, no sockets, the detector inline), "
                  "cProfile (its overhead inflates the times; the shares are what to read). "
                  "Cumulative: tsad's functions with the largest share, callees included "
                  "(nested). Self: the time spent in the function itself, any module.",
                  "", "| batch | kind | function | share | ms per request |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p.get('batch', 1000)} | {p['kind']} | `{p['function']}` | "
                  f"{p['share']:.1%} | {p['ms_per_request']} |" for p in profile]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets",
                    help="folder holding nab/ and msl/")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder (default benchmarks/results, runs/bench for tests/data)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (one stream each)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10, 100, 1000])
    ap.add_argument("--max-requests", type=int, default=800,
                    help="requests per configuration, spread over the clients")
    ap.add_argument("--max-points", type=int, default=40_000,
                    help="points per configuration (bounds batch 1000 on MSL)")
    ap.add_argument("--stores", nargs="+", default=["memory", "redis", "redis-2"],
                    help="memory, redis (one worker) and redis-2 (tsad serve --workers 2)")
    ap.add_argument("--forms", nargs="+", default=["points", "columnar"],
                    choices=["points", "columnar"], help="request bodies")
    ap.add_argument("--datasets", nargs="+", default=["nab/nyc_taxi", "msl/test"],
                    choices=["nab/nyc_taxi", "msl/test"])
    ap.add_argument("--detectors", nargs="*", default=["none", "residual_linear"],
                    help="besides the default detector: rows on the Redis store (one worker, "
                    "columnar, NAB); none: the service's ceiling (benchmarks/ceiling_app.py); "
                    "the embedding memory at batch 100 and 1000 only, bounded by "
                    "--costly-points")
    ap.add_argument("--costly-points", type=int, default=4000,
                    help="points per row for the embedding memory (a language-model call "
                    "per scored window)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of earlier code (e.g. `git clone -q . /tmp/base && git "
                    "-C /tmp/base checkout main`): its service runs the same store rows in "
                    "this run, beside this code's, each row measured on one then the other "
                    "(labelled code=baseline)")
    ap.add_argument("--profile-batches", type=int, nargs="*", default=[1, 1000],
                    help="batch sizes profiled in process after the rows")
    ap.add_argument("--client", choices=["httpx", "raw"], default="httpx",
                    help="the load's HTTP client: httpx, or raw (a minimal HTTP/1.1 client "
                    "of the same requests, RawClient): the client's own CPU per request is "
                    "in each row")
    ap.add_argument("--name", default="throughput",
                    help="output file name under --out (.json and .md)")
    args = ap.parse_args()

    loaders = {"nab/nyc_taxi": load_nab, "msl/test": load_msl}
    datasets = {name: loaders[name](args.data_dir) for name in args.datasets}
    river = river_reference(load_nab(args.data_dir))
    print(json.dumps({"river_halfspacetrees": river}), flush=True)
    redis_port = free_port()
    workdir = tempfile.mkdtemp(prefix="tsad-bench-")
    redis_server = start_redis(redis_port, workdir)
    rows: list[dict] = []
    stats = redis.Redis(port=redis_port)
    codes = [("this", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    try:
        for config in args.stores:  # each row run by every code in turn: interleaved
            rows += store_rows(config, codes, redis_port, stats, datasets, args)
        lpush = redis_benchmark_lpush(redis_port, 200_000)
    finally:
        redis_server.terminate()
        redis_server.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    profile, state = [], None
    if "nab/nyc_taxi" in datasets:
        state = state_bytes(datasets["nab/nyc_taxi"], 400)
        print(json.dumps({"state_bytes": state}), flush=True)
        for batch in args.profile_batches:
            requests = 8 if batch >= 100 else 200
            profile += [{"batch": batch, **p} for p in
                        profile_in_process(datasets["nab/nyc_taxi"], batch, requests)]
        print(json.dumps({"profile": profile}), flush=True)
    report = {
        "benchmark": "throughput", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "clients": args.clients, "redis_benchmark_lpush_per_s": lpush,
        "baseline": str(args.baseline) if args.baseline else None,
        "river_halfspacetrees": river, "results": rows, "profile": profile,
        "state_bytes": state,
    }
    save_report(report, (
        f"# POST /score throughput\n\n{args.clients} concurrent clients, one stream each, "
        f"service and clients on the same {report['machine']['cpus']}-core machine, "
        f"the default detector ({Settings().default_detector}). "
        f"`python benchmarks/{' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}`.\n\n"
        f"{markdown(rows, lpush, river, profile, state)}"),
                (args.out or results_dir(args.data_dir)) / args.name)


def store_rows(config: str, codes: list[tuple[str, Path | None]], redis_port: int,
               stats: redis.Redis, datasets: dict[str, np.ndarray],
               args: argparse.Namespace) -> list[dict]:
    """One service per code (``config``: memory, redis or redis-<workers>; ``codes``:
    (label, the checkout whose code runs, None for this one)), under every dataset, batch
    size and form; on the one-worker Redis service, the other detectors' rows too (a
    baseline's with its own code: its ceiling app is its own
    benchmarks/ceiling_app.py). The services run side by side, each row measured on
    each code in turn (the first code alternating), so that the codes' rows of one
    configuration share the machine's load of the moment."""
    store, _, workers = config.partition("-")
    env = {"TSAD_MAX_BATCH_POINTS": "10000", "TSAD_LOG_LEVEL": "WARNING"}
    if store == "redis":
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    detectors = args.detectors if (config == "redis" and "nab/nyc_taxi" in datasets) else []
    app = "benchmarks.ceiling_app:app" if "none" in detectors else "service.main:app"
    plan = []  # (row, series, batch, max requests, form, detector)
    for name, series in datasets.items():
        for batch in args.batch_sizes:
            for form in args.forms:
                max_req = min(args.max_requests, max(args.clients, args.max_points // batch))
                plan.append(({"store": store, "workers": int(workers or 1),
                              "detector": "default", "form": form, "dataset": name,
                              "channels": series.shape[1] - 1, "batch": batch},
                             series, batch, max_req, form, None))
    for detector in detectors:
        costly = detector == "embedding_memory"
        for batch in [b for b in args.batch_sizes if not costly or b >= 100]:
            points = args.costly_points if costly else args.max_points
            max_req = min(args.max_requests, max(args.clients, points // batch))
            plan.append(({"store": "redis", "workers": 1, "detector": detector,
                          "form": "columnar", "dataset": "nab/nyc_taxi", "channels": 1,
                          "batch": batch}, datasets["nab/nyc_taxi"], batch, max_req,
                         "columnar", detector))
    rows = []
    with contextlib.ExitStack() as stack:
        services = [(code, stack.enter_context(ServiceProcess(
            env, workers=int(workers or 1), app=app, root=root))) for code, root in codes]
        for i, (row, series, batch, max_req, form, detector) in enumerate(plan):
            for code, service in services if i % 2 == 0 else services[::-1]:  # who goes
                # first alternates: neither code always meets the load a row leaves
                tag = (f"{code}-{config}-{row['detector']}-{form}-"
                       f"{row['dataset'].replace('/', '.')}-{batch}")
                rows.append(measured({"code": code, **row},
                                     stats if store == "redis" else None, service.url,
                                     series, batch, args.clients, max_req, tag, form,
                                     detector, pid=service.proc.pid, client=args.client))
    return sorted(rows, key=lambda r: [c for c, _ in codes].index(r["code"]))


def measured(row: dict, stats: redis.Redis | None, url: str, series: np.ndarray,
             batch: int, clients: int, max_requests: int, tag: str, form: str,
             detector: str | None = None, pid: int | None = None,
             client: str = "httpx") -> dict:
    """``row`` with its load's figures (the service's CPU per request; on Redis, the
    bytes sent to it and its CPU per request); ``client``: the load's HTTP client."""
    row = {**row, "client": client, **asyncio.run(run_load(
        url, series, batch, clients, max_requests, tag, form, detector, stats, pid, client))}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    sys.exit(run_main(main))
