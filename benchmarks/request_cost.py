"""What one POST /score costs the service in CPU, and where it goes: the app in this
process (the ASGI call made directly, no sockets, no HTTP client), on a real Redis, one
univariate stream past its warm-up, sequential requests of one point (or ``--batch``).

For each detector (the default; ``none``, the benchmark's ceiling detector of
``benchmarks/ceiling_app.py``, which scores every window 0 and learns nothing) it
reports the service's CPU milliseconds per request (``time.process_time``: the detector
runs inline, as it does in a worker thread), Redis's own CPU per request (INFO cpu), the
Redis commands a request sends (INFO commandstats: scripts, reads, the lock's calls), and
a CPU profile (cProfile on process time) broken down into the request's layers, each
with its callees: the ASGI middleware, the body's validation, the transaction's
lock, append, scoring and commit, the response. ``--baseline DIR`` measures another
checkout's code (e.g. /work/base-d0ab229) in the same run, interleaved.

    python benchmarks/request_cost.py --data-dir ../shared/datasets

Prints a markdown table and writes benchmarks/results/request_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (label, file suffix, function): a layer's cumulative CPU, callees included. Nested
# layers are listed after their parent; a function missing from a checkout shows as 0.
LAYERS = [
    ("whole request (ASGI app)", "service/http.py", "__call__"),
    ("auth gate", "service/auth/gate.py", "authenticate"),
    ("FastAPI: body parse + validation", "fastapi/dependencies/utils.py",
     "request_body_to_args"),
    ("FastAPI: dependencies", "fastapi/dependencies/utils.py", "solve_dependencies"),
    ("route: /score handler (FastAPI's way)", "service/routers/score.py", "score"),
    ("route: /score, ScoreRoute's short way (body, principal, _score)",
     "service/routers/score.py", "handler"),
    ("body -> arrays (score_points)", "service/validation.py", "score_points"),
    ("transaction (queue, lock, append, score, commit)", "service/transaction.py",
     "_serve"),
    ("lock: acquire", "service/stores/redis/lock.py", "_wait_for"),
    ("append (plan + script)", "service/stores/redis/streams.py", "append"),
    ("scoring (StreamScorer.process + state encode)", "service/transaction.py", "_run"),
    ("  detector + loop (OnlineLoop.run)", "models/streaming.py", "run"),
    ("  state sections encoded (to_commit)", "service/scoring.py", "to_commit"),
    ("commit (backend.commit)", "service/stores/redis/__init__.py", "commit"),
    ("response body (score_response)", "service/responses.py", "score_response"),
    ("response body (score_body)", "service/responses.py", "score_body"),
    ("JSON encode", "pydantic_core", "to_json"),
    ("redis-py: command send/parse", "redis/asyncio/client.py", "execute_command"),
]


def _series(data_dir: Path):  # noqa: ANN202 - numpy array
    import numpy as np

    from models.data import load_nab
    for s in load_nab(data_dir):
        if s.name == "realKnownCause/nyc_taxi.csv":
            return np.column_stack([s.timestamps.astype(np.float64), s.values])
    raise SystemExit(f"--data-dir {data_dir}: no NAB nyc_taxi")


def worker(args: argparse.Namespace) -> dict:
    """Runs in a child process whose sys.path starts with the measured checkout."""
    import cProfile
    import pstats

    import redis
    from prometheus_client import CollectorRegistry

    import benchmarks.ceiling_app  # noqa: F401 - registers the detector "none"
    from service.app import create_app
    from service.metrics import ServiceMetrics
    from service.settings import Settings

    series = _series(args.data_dir)
    settings = Settings(redis_url=f"redis://127.0.0.1:{args.redis_port}/0",
                        redis_prefix=f"cost{os.getpid()}", max_batch_points=10_000,
                        log_level="WARNING")
    stats = redis.Redis(port=args.redis_port)
    warm = 1200  # past the default detector's warm-up (window, windows to fit, a chunk)
    out: dict = {}

    async def call(app, body: bytes) -> int:  # noqa: ANN001
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/score", "raw_path": b"/score",
                 "root_path": "", "query_string": b"", "server": ("127.0.0.1", 80),
                 "client": ("127.0.0.1", 5000),
                 "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]}
        sent = False
        status = 0

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(scope, receive, send)
        return status

    def body(stream: str, rows, detector: str) -> bytes:  # noqa: ANN001
        return json.dumps({"stream": stream, "timestamps": rows[:, 0].tolist(),
                           "values": rows[:, 1:].tolist()}).encode()

    import redis.asyncio.client as aioclient

    # the detector's asyncio.to_thread run inline: in the profile and this thread's CPU
    from benchmarks.throughput import _Inline as Inline

    # round trips from the service: one per command or pipeline sent
    trips: dict[str, int] = {}
    command, pipeline = aioclient.Redis.execute_command, aioclient.Pipeline.execute

    async def counted_command(self, *a, **kw):  # noqa: ANN001, ANN202
        name = str(a[0]).lower()
        trips[name] = trips.get(name, 0) + 1
        return await command(self, *a, **kw)

    async def counted_pipeline(self, *a, **kw):  # noqa: ANN001, ANN202
        key = "multi/exec" if self.is_transaction else "pipeline"
        trips[key] = trips.get(key, 0) + 1
        return await pipeline(self, *a, **kw)

    aioclient.Redis.execute_command = counted_command
    aioclient.Pipeline.execute = counted_pipeline

    async def run() -> None:
        asyncio.get_running_loop().set_default_executor(Inline())
        app = create_app(settings, ServiceMetrics(CollectorRegistry()))
        async with app.router.lifespan_context(app):
            for detector in args.detectors:
                stream = f"{detector}-{os.getpid()}"
                streams = app.state.services.streams
                if detector != "default":
                    from service.schemas import StreamConfigIn
                    await streams.put(stream, StreamConfigIn(channels=1, detector=detector))
                assert await call(app, body(stream, series[:warm], detector)) == 200
                bodies = [body(stream, series[warm + i * args.batch:
                                              warm + (i + 1) * args.batch], detector)
                          for i in range(2 * args.requests)]
                for b in bodies[:20]:  # the scorer cache and the code paths warm
                    assert await call(app, b) == 200
                bodies = bodies[20:]
                half = args.requests
                trips.clear()
                before_cmd = _commandstats(stats)
                before_cpu = _redis_cpu(stats)
                t0, w0 = time.process_time(), time.perf_counter()
                for b in bodies[:half]:
                    assert await call(app, b) == 200
                cpu, wall = time.process_time() - t0, time.perf_counter() - w0
                redis_cpu = _redis_cpu(stats) - before_cpu
                cmds = _diff(_commandstats(stats), before_cmd)
                sent = dict(trips)
                profiler = cProfile.Profile(time.process_time)
                profiler.enable()
                for b in bodies[half:]:
                    assert await call(app, b) == 200
                profiler.disable()
                if args.dump:
                    profiler.dump_stats(f"{args.dump}.{detector}")
                st = pstats.Stats(profiler).stats
                total = sum(tt for _, _, tt, _, _ in st.values())
                layers = []
                for label, suffix, name in LAYERS:
                    ct = sum(v[3] for (f, _, fn), v in st.items()
                             if (fn == name and suffix in f)
                             or (f == "~" and suffix in fn and name in fn))
                    layers.append({"layer": label, "ms_per_request":
                                   round(ct / half * 1000, 3), "share": round(ct / total, 3)})
                own = sorted(((v[2], f"{Path(f).name}:{fn}") for (f, _, fn), v in st.items()),
                             reverse=True)[:15]
                out[detector] = {
                    "requests": half, "batch": args.batch,
                    "cpu_ms_per_request": round(cpu / half * 1000, 3),
                    "wall_ms_per_request": round(wall / half * 1000, 3),
                    "redis_cpu_ms_per_request": round(redis_cpu / half * 1000, 3),
                    "redis_commands_per_request": {k: round(v / half, 2)
                                                   for k, v in sorted(cmds.items())},
                    "redis_calls_per_request": round(sum(cmds.values()) / half, 2),
                    "round_trips_per_request": round(sum(sent.values()) / half, 2),
                    "round_trips": {k: round(v / half, 2) for k, v in sorted(sent.items())},
                    "profiled_cpu_ms_per_request": round(total / half * 1000, 3),
                    "layers": layers,
                    "self": [{"function": n, "ms_per_request": round(t / half * 1000, 3)}
                             for t, n in own],
                }

    asyncio.run(run())
    return out


def _commandstats(r) -> dict[str, int]:  # noqa: ANN001
    return {k.removeprefix("cmdstat_"): v["calls"]
            for k, v in r.info("commandstats").items()
            if k not in ("cmdstat_info",)}


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _redis_cpu(r) -> float:  # noqa: ANN001
    # throughput.redis_cpu_seconds's twin: the worker cannot import throughput, which
    # puts this tree first on sys.path (the worker measures --baseline's tree)
    cpu = r.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def markdown(runs: list[dict]) -> str:
    lines = ["| code | detector | batch | service CPU ms/request | wall ms/request | "
             "Redis CPU ms/request | round trips/request | Redis commands/request | load 1m |",
             "|" + "---|" * 9]
    for r in runs:
        for det, m in r["detectors"].items():
            lines.append(f"| {r['code']} | {det} | {m['batch']} | {m['cpu_ms_per_request']} | "
                         f"{m['wall_ms_per_request']} | {m['redis_cpu_ms_per_request']} | "
                         f"{m.get('round_trips_per_request', '')} | "
                         f"{m['redis_calls_per_request']} | {r['load_1m']} |")
    lines.append("\nRound trips per request (commands and pipelines the service sent; "
                 "`evalsha` is a script call):\n")
    for r in runs:
        for det, m in r["detectors"].items():
            trips = ", ".join(f"{k} {v}" for k, v in m.get("round_trips", {}).items())
            lines.append(f"- {r['code']}, {det}: {trips}")
    lines.append("\nRedis commands per request (INFO commandstats: a script's own commands "
                 "included):\n")
    for r in runs:
        for det, m in r["detectors"].items():
            cmds = ", ".join(f"{k} {v}" for k, v in m["redis_commands_per_request"].items())
            lines.append(f"- {r['code']}, {det}: {cmds}")
    lines.append("\n## Where the CPU goes\n\ncProfile on process time (its own overhead "
                 "inflates the figures: read the shares), cumulative per layer, callees "
                 "included; indented and later layers are parts of earlier ones.\n")
    dets = list(runs[0]["detectors"])
    head = " | ".join(f"{r['code']} {d} ms" for d in dets for r in runs)
    lines += [f"| layer | {head} |", "|---|" + "---|" * (len(dets) * len(runs))]
    for i, (label, _, _) in enumerate(LAYERS):
        cells = [r["detectors"][d]["layers"][i]["ms_per_request"] for d in dets for r in runs]
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(str(c) for c in cells) + " |")
    cells = [r["detectors"][d]["profiled_cpu_ms_per_request"] for d in dets for r in runs]
    lines.append("| everything profiled (with the ASGI call's driver) | "
                 + " | ".join(str(c) for c in cells) + " |")
    for r in runs:
        for det, m in r["detectors"].items():
            lines.append(f"\nSelf time, {r['code']}, {det}: " + ", ".join(
                f"`{s['function']}` {s['ms_per_request']}" for s in m["self"][:10]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--requests", type=int, default=300,
                    help="timed requests per detector (as many again profiled)")
    ap.add_argument("--batch", type=int, default=1, help="points per request")
    ap.add_argument("--detectors", nargs="+", default=["none", "default"])
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout, measured in the same run")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds, this code and the baseline alternating")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="request_cost")
    ap.add_argument("--dump", default="", help="write each detector's profile (pstats) to "
                    "DUMP.<detector> (one round, this code)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--redis-port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    from throughput import start_redis

    from service.process import free_port
    port = free_port()
    server = start_redis(port, tempfile.mkdtemp(prefix="tsad-cost-"))  # answers PING
    codes = [("this", ROOT)] + ([("baseline", args.baseline.resolve())]
                                if args.baseline else [])
    runs: dict[str, list[dict]] = {c: [] for c, _ in codes}
    try:
        for _ in range(args.rounds):
            for code, root in codes:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
                       "--redis-port", str(port), "--data-dir", str(args.data_dir.resolve()),
                       "--requests", str(args.requests), "--batch", str(args.batch),
                       "--detectors", *args.detectors]
                if args.dump and code == "this":
                    cmd += ["--dump", args.dump]
                env = {**os.environ, "PYTHONPATH": str(root), "TSAD_LOG_LEVEL": "WARNING"}
                done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(done.stderr[-4000:])
                res = json.loads(done.stdout.strip().splitlines()[-1])
                runs[code].append({"code": code, "root": str(root), "detectors": res,
                                   "load_1m": round(os.getloadavg()[0], 2)})
                print(json.dumps({"code": code, **{d: m["cpu_ms_per_request"]
                                                   for d, m in res.items()}}), flush=True)
    finally:
        server.terminate()
        server.wait()
    # each code's round with the least CPU per request of the default (the least disturbed)
    best = [min(rs, key=lambda r: sum(m["cpu_ms_per_request"]
                                      for m in r["detectors"].values())) for rs in runs.values()]
    from models.reporting import save_report
    report = {"benchmark": "request_cost", "date": datetime.now(UTC).isoformat(
        timespec="seconds"), "cpus": os.cpu_count(), "runs": best,
        "all_rounds": {c: [{d: m["cpu_ms_per_request"] for d, m in r["detectors"].items()}
                           for r in rs] for c, rs in runs.items()}}
    text = (f"# CPU per POST /score request, in process on Redis\n\n"
            f"`python benchmarks/{' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}`: "
            f"the app called through ASGI in this process (no sockets, no HTTP client), a "
            f"real Redis, one univariate stream (NAB nyc_taxi) past its warm-up, "
            f"{args.requests} sequential requests timed and as many profiled; of "
            f"{args.rounds} interleaved rounds, each code's least disturbed.\n\n"
            + markdown(best))
    save_report(report, text, args.out / args.name)


if __name__ == "__main__":
    main()
