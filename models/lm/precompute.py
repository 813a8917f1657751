"""Precompute prompt embeddings of a whole dataset once, so training never calls the LM
twice for the same prompt.

Output directory::

    index.json     model id, pooling, prompt config, window, stride, and per split the
                   segments: which stream, which rows of the array, where its windows start
    <split>.npy    float16 (N, C, D): window n, channel c -> the channel's prompt embedding
    <split>.keys.npy  uint8 (N, C, 32): the sha256 of each prompt, so ``warm_cache`` can
                   put every vector into an encoder's cache under its prompt key (a
                   detector that builds the same prompt is then served without the LM)

Window ``j`` of a segment covers rows ``first_start + j*stride .. + window`` of its stream's
series and is row ``row + j`` of the split's array.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.lm.cache import CachedEncoder
from models.lm.prompts import PromptBuilder

INDEX = "index.json"


@dataclass(frozen=True)
class Stream:
    name: str  # e.g. MSL entity "C-1" or NAB file name
    split: str  # train | test | all | the .npy file's stem
    series: np.ndarray  # (T, C): only the channels to embed


def window_starts(length: int, window: int, stride: int, limit: int | None = None) -> np.ndarray:
    """Starts of the windows (newest point last) a stream of this length yields.

    >>> window_starts(10, 4, 3).tolist()
    [0, 3, 6]
    >>> window_starts(3, 4, 1).tolist()
    []
    """
    starts = np.arange(0, max(length - window + 1, 0), stride)
    return starts[:limit] if limit is not None else starts


def precompute(
    streams: Sequence[Stream],
    encoder: CachedEncoder,
    builder: PromptBuilder,
    out_dir: str | Path,
    window: int,
    stride: int,
    limit: int | None = None,
    chunk: int = 256,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed every (window, channel) of every stream; write arrays + index; return index."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[Stream]] = {}
    for s in streams:
        splits.setdefault(s.split, []).append(s)
    index: dict[str, Any] = {
        "model_id": encoder.model_id, "pooling": encoder.pooling, "dim": encoder.dim,
        "dtype": "float16", "window": window, "stride": stride, "limit": limit,
        "prompt": asdict(builder.config), **(extra or {}), "splits": {},
    }
    total = sum(len(window_starts(len(s.series), window, stride, limit)) * s.series.shape[1]
                for s in streams)
    bar = tqdm(total=total, desc="embed", unit="prompt", disable=not progress)
    for split, members in splits.items():
        channels = {s.series.shape[1] for s in members}
        if len(channels) != 1:
            raise ValueError(f"split {split}: streams differ in channel count {channels}")
        n_ch = channels.pop()
        plans = [(s, window_starts(len(s.series), window, stride, limit)) for s in members]
        n_rows = sum(len(st) for _, st in plans)
        path = out / f"{split}.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                        shape=(n_rows, n_ch, encoder.dim))
        keys = np.zeros((n_rows, n_ch, 32), dtype=np.uint8)
        segments, row = [], 0
        for stream, starts in plans:
            segments.append({"stream": stream.name, "row": row, "count": len(starts),
                             "first_start": 0, "stride": stride, "length": len(stream.series)})
            for block in _chunks(starts, max(1, chunk // n_ch)):
                prompts = [p for s0 in block for p in builder(stream.series[s0:s0 + window])]
                emb = encoder.encode(prompts).reshape(len(block), n_ch, encoder.dim)
                arr[row:row + len(block)] = emb.astype(np.float16)
                keys[row:row + len(block)] = np.frombuffer(b"".join(
                    hashlib.sha256(p.encode("utf-8")).digest() for p in prompts),
                    dtype=np.uint8).reshape(len(block), n_ch, 32)
                row += len(block)
                bar.update(len(prompts))
        arr.flush()
        del arr
        np.save(out / f"{split}.keys.npy", keys)
        index["splits"][split] = {"file": path.name, "shape": [n_rows, n_ch, encoder.dim],
                                  "segments": segments}
    bar.close()
    (out / INDEX).write_text(json.dumps(index, indent=2))
    return index


def _chunks(x: np.ndarray, size: int) -> Iterable[np.ndarray]:
    for i in range(0, len(x), size):
        yield x[i:i + size]


def load_precomputed(out_dir: str | Path, split: str) -> tuple[np.ndarray, dict[str, Any]]:
    """(N, C, D) float16 memory-mapped embeddings of a split, and the index."""
    out = Path(out_dir)
    index = json.loads((out / INDEX).read_text())
    if split not in index["splits"]:
        raise KeyError(f"split {split!r} not in {sorted(index['splits'])}")
    return np.load(out / index["splits"][split]["file"], mmap_mode="r"), index


def warm_cache(encoder: CachedEncoder, out_dir: str | Path) -> int:
    """Put every embedding of a ``tsad embed`` output into ``encoder``'s in-process cache
    under its prompt's key; returns how many. Training and evaluation then read the
    precomputed vectors for every prompt they share with it (the LM runs for the others).
    The output must come from the same model and pooling (``model_id``)."""
    from models.lm.cache import to_f16_bytes

    out = Path(out_dir)
    index = json.loads((out / INDEX).read_text())
    if index["model_id"] != encoder.model_id:
        raise ValueError(f"embeddings: {out} holds {index['model_id']}, the detector's "
                         f"encoder is {encoder.model_id} (model or pooling differ)")
    prefix = f"{encoder.config.key_prefix}:{encoder.model_id}:"  # as cache.prompt_key
    n = 0
    for split, info in index["splits"].items():
        keys_path = out / f"{split}.keys.npy"
        if not keys_path.is_file():
            raise ValueError(f"embeddings: {out} has no {keys_path.name}; re-run tsad embed")
        vectors = np.load(out / info["file"], mmap_mode="r")
        keys = np.load(keys_path)
        for vec, key in zip(vectors.reshape(-1, vectors.shape[-1]),
                            keys.reshape(-1, 32), strict=True):
            encoder.lru.put(prefix + key.tobytes().hex(), to_f16_bytes(vec))
            n += 1
    return n
