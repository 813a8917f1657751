"""`tsad embed`: precompute prompt embeddings for a whole dataset.

Light at import time (argparse only); the model and numpy work load when the command runs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DESCRIPTION = """\
Precompute the language-model prompt embeddings of a dataset, so training never calls the
LM twice for the same prompt.

Every stream is cut into windows (--window points, one every --stride points); every
channel of a window becomes a statistical text prompt (--strategy) that the frozen
encoder turns into one vector. Written to --out:
  index.json     model id, pooling, prompt config, and which rows belong to which
                 stream and window start
  <split>.npy    float16 array (windows, channels, dim)

Datasets: a folder in the MSL layout named by --dataset (msl, smap, ...: per-entity
streams, splits train and test; channel 0 = telemetry by default; --entities picks some),
nab (one stream per CSV, split "all"), or a path to a .npy file of shape (T,) or (T, C)
(one stream, split = file name). A clone has no ../shared/datasets: --data-dir tests/data
holds small MSL and NAB slices. With --redis-url the shared embedding cache is
filled too, so serving replicas start warm.

Examples:
  tsad embed --dataset msl --data-dir ../shared/datasets --out artifacts/emb/msl-w64
  tsad embed --dataset nab --data-dir ../shared/datasets --out artifacts/emb/nab \\
      --window 32 --stride 1 --strategy all --backend onnx-int8
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "embed", help="precompute prompt embeddings for a dataset",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True,
                   help="nab | a dataset folder in the MSL layout (msl, smap, ...) | path to a "
                   ".npy series (T,) or (T, C)")
    p.add_argument("--data-dir", default="../shared/datasets",
                   help="folder holding the dataset folder (or that folder itself)")
    p.add_argument("--entities", default="",
                   help="MSL layout: the first N entities or comma-separated names (e.g. "
                   "C-1,T-5); default all")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--window", type=int, default=64, help="points per window (default 64)")
    p.add_argument("--stride", type=int, default=10,
                   help="points between window starts (default 10)")
    p.add_argument("--strategy", default="variance",
                   choices=["variance", "trend", "autocorr", "all"],
                   help="statistic closing each prompt (default variance, CMA-TSAD's best)")
    p.add_argument("--max-values", type=int, default=100,
                   help="at most this many values per prompt (default 100)")
    p.add_argument("--channels", default=None,
                   help="comma-separated channel indices or 'all' (default: msl 0, else all)")
    p.add_argument("--model-path", default=None,
                   help="local Hugging Face model dir (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--pooling", default="auto", choices=["auto", "last", "mean", "cls"],
                   help="auto: last token for decoder LMs, masked mean for encoders")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnx-int8"],
                   help="torch (default), ONNX Runtime fp32, or int8 per-channel")
    p.add_argument("--batch-size", type=int, default=32, help="LM batch size (default 32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (torch backend)")
    p.add_argument("--limit", type=int, default=None,
                   help="at most this many windows per stream and split (quick runs)")
    p.add_argument("--redis-url", default=None, help="also fill this Redis embedding cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_channels(text: str | None, n_channels: int, default: list[int]) -> list[int]:
    """
    >>> parse_channels("0,3", 55, [0]), parse_channels("all", 3, [0]), parse_channels(None, 3, [0])
    ([0, 3], [0, 1, 2], [0])
    """
    if text is None:
        return default
    if text == "all":
        return list(range(n_channels))
    chans = [int(c) for c in text.split(",") if c.strip()]
    bad = [c for c in chans if not 0 <= c < n_channels]
    if bad or not chans:
        raise SystemExit(f"--channels: {bad or text!r} outside 0..{n_channels - 1}")
    return chans


def load_streams(dataset: str, data_dir: str, channels: str | None,
                 entities: str = "") -> tuple[list[Any], list[int]]:
    """The streams to embed and the dataset channels they hold (in that order)."""
    import numpy as np

    from models.data import DataNotFound, load_msl, load_nab, select_entities
    from models.lm.precompute import Stream

    path = Path(dataset)
    if (dataset == "nab" or path.suffix == ".npy") and entities:
        raise SystemExit("--entities: only for datasets in the MSL layout")
    if dataset == "nab":
        parse_channels(channels, 1, [0])
        return [Stream(s.name, "all", s.values[:, None]) for s in load_nab(data_dir)], [0]
    if path.suffix != ".npy":  # a dataset folder in the MSL layout
        picked = select_entities(load_msl(data_dir, dataset), entities)
        chans = parse_channels(channels, picked[0].train.shape[1], [0])
        return [Stream(e.name, split, getattr(e, split)[:, chans])
                for split in ("train", "test") for e in picked], chans
    if not path.is_file():
        raise DataNotFound(f"--dataset: no file {path}")
    series = np.load(path)
    series = series[:, None] if series.ndim == 1 else series
    if series.ndim != 2:
        raise SystemExit(f"--dataset: {path} has shape {series.shape}; need (T,) or (T, C)")
    chans = parse_channels(channels, series.shape[1], list(range(series.shape[1])))
    return [Stream(path.stem, path.stem, np.asarray(series[:, chans], dtype=np.float64))], chans


def build_encoder(args: argparse.Namespace) -> Any:
    if args.backend == "torch":
        from models.lm.encoder import TextEncoder

        return TextEncoder(model_path=args.model_path, pooling=args.pooling,
                           batch_size=args.batch_size, device=args.device)
    from models.lm.onnx_encoder import OnnxTextEncoder

    return OnnxTextEncoder(model_path=args.model_path, pooling=args.pooling,
                           batch_size=args.batch_size,
                           quantize="int8" if args.backend == "onnx-int8" else "none")


def run(args: argparse.Namespace) -> int:
    import time

    from models.lm.cache import CacheConfig, CachedEncoder
    from models.lm.precompute import precompute
    from models.lm.prompts import PromptBuilder, PromptConfig

    if args.window < 2 or args.stride < 1:
        raise SystemExit("--window must be >= 2 and --stride >= 1")
    streams, chans = load_streams(args.dataset, args.data_dir, args.channels, args.entities)
    encoder = build_encoder(args)
    builder = PromptBuilder(PromptConfig(strategy=args.strategy, max_values=args.max_values),
                            encoder.tokenizer)
    cached = CachedEncoder(encoder, CacheConfig(redis_url=args.redis_url))
    t0 = time.perf_counter()
    index = precompute(
        streams, cached, builder, args.out, args.window, args.stride, limit=args.limit,
        progress=not args.no_progress,
        extra={"dataset": args.dataset, "backend": args.backend, "channels": chans,
               **({"entities": args.entities} if args.entities else {})},
    )
    stats = cached.stats
    for split, info in index["splits"].items():
        log.info("%s: %s -> %s", split, info["shape"], Path(args.out) / info["file"])
    log.info("%d prompts in %.1fs: %d computed by the LM, %d served by the cache",
             stats.lookups, time.perf_counter() - t0, stats.misses,
             stats.lookups - stats.misses)
    return 0
