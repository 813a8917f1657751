"""Prompt-embedding speed and cache effectiveness on MSL.

1. Throughput: prompts/s for LM batch 1/16/64 and window 32/64/100, PyTorch fp32 vs ONNX
   Runtime fp32 vs ONNX int8 per channel (default recipe: first block and FFN
   down-projections fp32; and every layer int8), with each backend's cosine to PyTorch
   fp32.
2. Token counts per window size and prompt strategy (all-MiniLM-L6-v2 tokenizer).
3. Streaming replay of the first N points of the MSL test set, all 55 channels, one point
   at a time, with stride 1, 10 and 50: cache hit rate and effective embeddings/s, first
   cold (empty LRU and Redis), then as a second replica (empty LRU, warm Redis).

    python benchmarks/embeddings.py --data-dir ../shared/datasets [--quick]

Prints markdown and writes benchmarks/results/embeddings.{json,md}. Bounded to run in
about 10 minutes on 2 CPU cores; the bounds are printed with the results.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from models.data import load_msl, run_main  # noqa: E402
from models.lm.cache import CacheConfig, CachedEncoder, StridedEmbedder  # noqa: E402
from models.lm.encoder import EncoderConfig, TextEncoder  # noqa: E402
from models.lm.prompts import STRATEGIES, PromptBuilder, PromptConfig, count_tokens  # noqa: E402
from models.reporting import results_dir, save_report  # noqa: E402

WINDOWS = (32, 64, 100)
BATCHES = (1, 16, 64)
STRIDES = (50, 10, 1)  # cheapest first


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def telemetry_windows(entities: list, window: int, n: int) -> np.ndarray:
    """n distinct channel-0 windows spread over all entities' test splits."""
    per = max(1, -(-n // len(entities)))
    out = []
    for e in entities:
        x = e.test[:, 0].astype(np.float64)
        starts = np.linspace(0, len(x) - window, per).astype(int)
        out += [x[s:s + window] for s in starts]
    return np.stack(out[:n])


# --- 1. throughput ---------------------------------------------------------------------------
def build_backends(names: list[str], cache_dir: str) -> dict[str, Any]:
    backends: dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        if name == "torch-fp32":
            backends[name] = TextEncoder(EncoderConfig(device="cpu"))
        else:
            from models.lm.onnx_encoder import OnnxTextEncoder

            kw = {"onnx-fp32": {}, "onnx-int8pc": {"quantize": "int8"},
                  "onnx-int8pc-all": {"quantize": "int8", "keep_down_proj_fp32": False,
                                      "keep_first_block_fp32": False}}[name]
            backends[name] = OnnxTextEncoder(cache_dir=cache_dir, **kw)
        print(f"  {name}: ready in {time.perf_counter() - t0:.1f}s", flush=True)
    return backends


def throughput(backends: dict[str, Any], entities: list, n_prompts: int) -> list[dict]:
    tokenizer = backends["torch-fp32"].tokenizer
    builder = PromptBuilder(PromptConfig(), tokenizer)
    rows = []
    for window in WINDOWS:
        prompts = [builder(w)[0] for w in telemetry_windows(entities, window, n_prompts)]
        tokens = count_tokens(prompts, tokenizer)
        reference = backends["torch-fp32"].encode(prompts, batch_size=16)
        for name, enc in backends.items():
            enc.encode(prompts[:4], batch_size=4)  # warm-up: allocator, thread pools
            full = enc.encode(prompts, batch_size=16)
            cos = cosine(full, reference)
            for bs in BATCHES:
                n = max(bs, n_prompts // 2) if bs == 1 else max(bs, n_prompts)
                n = min(n, len(prompts))
                t0 = time.perf_counter()
                enc.encode(prompts[:n], batch_size=bs)
                dt = time.perf_counter() - t0
                rows.append({
                    "backend": name, "window": window, "batch": bs, "prompts": n,
                    "mean_tokens": round(float(np.mean(tokens[:n])), 1),
                    "prompts_per_s": round(n / dt, 1),
                    "cosine_min": round(float(cos.min()), 4),
                    "cosine_mean": round(float(cos.mean()), 4),
                })
                print(f"  {name:16s} W={window:3d} batch={bs:2d}: "
                      f"{rows[-1]['prompts_per_s']:6.1f} prompts/s  (cos min "
                      f"{rows[-1]['cosine_min']:.4f})", flush=True)
    return rows


# --- 2. token counts ---------------------------------------------------------------------------
def command_columns(channels: int) -> list[int]:
    """Three command-flag columns of MSL (5, 7, 9), or those a narrower slice has."""
    return [c for c in (5, 7, 9) if c < channels] or list(range(1, channels))[:3]


def token_counts(tokenizer: Any, entities: list, n_windows: int) -> list[dict]:
    rows = []
    for window in WINDOWS:
        telemetry = telemetry_windows(entities, window, n_windows)
        command = np.stack([e.test[:window, c].astype(np.float64)
                            for e in entities for c in command_columns(e.test.shape[1])]
                           )[:n_windows]
        for strategy in STRATEGIES:
            cfg = PromptConfig(strategy=strategy)
            b = PromptBuilder(cfg, tokenizer)
            for kind, ws in (("telemetry", telemetry), ("command", command)):
                prompts = [b(w)[0] for w in ws]
                n = np.array(count_tokens(prompts, tokenizer))
                listed = [len(p.split(" were ")[1].split(" (")[0].split(", ")) for p in prompts]
                rows.append({
                    "window": window, "strategy": strategy, "channel": kind,
                    "prompts": len(prompts), "mean_tokens": round(float(n.mean()), 1),
                    "max_tokens": int(n.max()), "budget": cfg.max_tokens - cfg.margin,
                    "min_values_listed": int(min(listed)),
                })
    return rows


# --- 3. streaming replay ------------------------------------------------------------------------
class LocalRedis:
    """A throwaway redis-server on a free loopback port (only when no --redis-url)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def replay_once(encoder: TextEncoder, series: np.ndarray, window: int, stride: int,
                redis_url: str | None, prefix: str) -> dict:
    cache = CachedEncoder(encoder, CacheConfig(redis_url=redis_url, key_prefix=prefix))
    strided = StridedEmbedder(cache, PromptBuilder(PromptConfig(), encoder.tokenizer), stride)
    states = strided.new_states(series.shape[1])
    views = np.lib.stride_tricks.sliding_window_view(series, window, axis=0)  # (N, C, W)
    t0 = time.perf_counter()
    for i in range(len(views)):  # one point at a time, as a stream arrives
        strided.embed_stream(views[i:i + 1].transpose(0, 2, 1), states)
    wall = time.perf_counter() - t0
    s = cache.stats
    served = len(views) * series.shape[1]
    return {
        "points": len(views), "channels": series.shape[1], "embeddings_served": served,
        "prompts_looked_up": s.lookups, "stride_reuses": served - s.lookups,
        "hits_lru": s.hits["lru"], "hits_redis": s.hits["redis"], "hits_batch": s.hits["batch"],
        "lm_prompts": s.misses, "hit_rate": round(s.hit_rate, 4),
        "lm_share_of_served": round(s.misses / served, 4),
        "lm_seconds": round(s.encode_seconds, 2), "wall_seconds": round(wall, 2),
        "embeddings_per_s": round(served / wall, 1),
    }


def replay(encoder: TextEncoder, entities: list, n_points: int, window: int,
           redis_url: str | None) -> list[dict]:
    test = np.concatenate([e.test for e in entities]).astype(np.float64)
    series = test[: n_points + window - 1]  # n_points windows, all 55 channels
    rows = []
    for stride in STRIDES:
        prefix = f"bench:{uuid.uuid4().hex[:8]}"  # fresh namespace: a cold Redis
        passes = [("cold", redis_url)] + ([("replica", redis_url)] if redis_url else [])
        for phase, url in passes:
            r = replay_once(encoder, series, window, stride, url, prefix)
            rows.append({"stride": stride, "phase": phase,
                         "levels": "lru+redis" if url else "lru", **r})
            print(f"  stride={stride:2d} {phase:7s}: hit rate {r['hit_rate']:.3f}, "
                  f"{r['lm_prompts']} LM prompts, {r['embeddings_per_s']:.0f} embeddings/s",
                  flush=True)
    return rows


# --- report ---------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# Prompt-embedding benchmark", "",
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']} ({meta['torch_threads']} "
        f"threads), onnxruntime {meta['onnxruntime']}, model `{meta['model_id']}` "
        f"(all-MiniLM-L6-v2, 384-d, mean pooling). Load average before/after: "
        f"{meta['loadavg_start']} / {meta['loadavg_end']} (the 2 cores are shared). "
        f"Total {meta['seconds']:.0f}s.", "",
        "Bounds: " + "; ".join(meta["bounds"]) + ".", "",
        "## Throughput (prompts/s, variance prompts of MSL channel-0 windows)", "",
    ]
    tp = result["throughput"]
    backends = list(dict.fromkeys(r["backend"] for r in tp))
    lines += ["| backend | cosine to torch fp32 (min / mean) | "
              + " | ".join(f"W={w} b={b}" for w in WINDOWS for b in BATCHES) + " |",
              "| --- | --- | " + " | ".join("---:" for _ in WINDOWS for _ in BATCHES) + " |"]
    for name in backends:
        rs = [r for r in tp if r["backend"] == name]
        cos = min(r["cosine_min"] for r in rs), np.mean([r["cosine_mean"] for r in rs])
        cells = []
        for w in WINDOWS:
            for b in BATCHES:
                cells += [f"{r['prompts_per_s']:.1f}" for r in rs
                          if r["window"] == w and r["batch"] == b]
        lines.append(f"| {name} | {cos[0]:.4f} / {cos[1]:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "Mean tokens per prompt: " + ", ".join(
        f"W={w}: {next(r['mean_tokens'] for r in tp if r['window'] == w)}" for w in WINDOWS),
        "", "## Token counts (special tokens included; budget = max_tokens - margin)", "",
        "| window | strategy | channel | mean | max | budget | fewest values listed |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in result["tokens"]:
        lines.append(f"| {r['window']} | {r['strategy']} | {r['channel']} | {r['mean_tokens']} "
                     f"| {r['max_tokens']} | {r['budget']} | {r['min_values_listed']} |")
    lines += ["", f"## Streaming replay: MSL test, first {meta['replay_points']} points, all "
              f"55 channels, window {meta['replay_window']}, one point per call, torch fp32",
              "",
              "| stride | phase | cache levels | embeddings served | looked up | LRU hits | "
              "Redis hits | in-call duplicates | LM prompts | hit rate | LM s | wall s | "
              "embeddings/s |",
              "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
              "| ---: |"]
    for r in result["replay"]:
        lines.append(
            f"| {r['stride']} | {r['phase']} | {r['levels']} | {r['embeddings_served']} | "
            f"{r['prompts_looked_up']} | {r['hits_lru']} | {r['hits_redis']} | "
            f"{r['hits_batch']} | {r['lm_prompts']} | {r['hit_rate']:.3f} | "
            f"{r['lm_seconds']} | {r['wall_seconds']} | {r['embeddings_per_s']:.0f} |")
    lines += ["", "Hit rate = (LRU + Redis + in-call duplicate hits) / prompts looked up; "
              "with stride S a channel is looked up every S points and its last embedding "
              "is reused in between (embeddings served = points x 55)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding msl/")
    p.add_argument("--out", default=None,
                   help="folder (default benchmarks/results, runs/bench for tests/data)")
    p.add_argument("--quick", action="store_true", help="smaller counts (about 3 minutes)")
    p.add_argument("--prompts", type=int, default=None,
                   help="prompts per throughput cell (default 48, quick 24)")
    p.add_argument("--points", type=int, default=None,
                   help="MSL test points replayed (default 400, quick 150)")
    p.add_argument("--replay-window", type=int, default=32)
    p.add_argument("--backends", default="torch-fp32,onnx-fp32,onnx-int8pc,onnx-int8pc-all")
    p.add_argument("--redis-url", default=None,
                   help="Redis for the replay (default: start a local redis-server if any)")
    args = p.parse_args()
    # a SIGTERM (CI timeout, kill) unwinds like Ctrl-C, so the local redis-server is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    n_prompts = args.prompts or (24 if args.quick else 48)
    n_points = args.points or (150 if args.quick else 400)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    if names[0] != "torch-fp32":
        names = ["torch-fp32"] + [n for n in names if n != "torch-fp32"]
    t_start = time.perf_counter()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    entities = load_msl(args.data_dir)

    print("backends:", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as cache_dir:
        backends = build_backends(names, cache_dir)
        print(f"throughput ({n_prompts} prompts per cell; batch 1: {n_prompts // 2}):",
              flush=True)
        tp = throughput(backends, entities, n_prompts)
    torch_enc = backends["torch-fp32"]
    for name in names[1:]:
        del backends[name]
    print("token counts:", flush=True)
    tokens = token_counts(torch_enc.tokenizer, entities, 200)

    local = None
    redis_url = args.redis_url
    if redis_url is None:
        try:
            local = LocalRedis()
            redis_url = local.url
        except (FileNotFoundError, RuntimeError) as exc:
            print(f"  no Redis for the replay ({exc}): LRU only", flush=True)
    print(f"replay ({n_points} points x {entities[0].test.shape[1]} channels):", flush=True)
    try:
        rep = replay(torch_enc, entities, n_points, args.replay_window, redis_url)
    finally:
        if local is not None:
            local.stop()

    import onnxruntime
    import torch

    result = {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} {os.cpu_count()} CPU cores",
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
            "model_id": torch_enc.model_id, "quick": args.quick,
            "replay_points": n_points, "replay_window": args.replay_window,
            "loadavg_start": load_start,
            "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "seconds": round(time.perf_counter() - t_start, 1),
            "bounds": [
                f"throughput: {n_prompts} prompts per cell ({max(1, n_prompts // 2)} at "
                f"batch 1), one timed pass after a warm-up",
                "token counts: 200 telemetry and up to 200 command-channel windows per size",
                f"replay: first {n_points} points of the MSL test set (entity C-1), "
                f"{'with' if redis_url else 'without'} Redis",
            ],
        },
        "throughput": tp, "tokens": tokens, "replay": rep,
    }
    save_report(result, markdown(result),
                Path(args.out or results_dir(args.data_dir)) / "embeddings")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
