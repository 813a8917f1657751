"""ONNX Runtime backend of the prompt encoder (extra ``onnx``: ``pip install 'tsad[onnx]'``).

The PyTorch model *with its pooling* is exported once (torch.onnx, dynamic batch and
sequence axes) to ``cache_dir/<model_id>.onnx``; with ``quantize="int8"`` the weights of
that graph are quantised dynamically to int8, per output channel by default
(``onnxruntime.quantization.quantize_dynamic(per_channel=True)``). Later loads reuse the
files. Same ``encode`` interface, tokenizer and pooling as ``TextEncoder``.

int8 accuracy (all-MiniLM-L6-v2, real MSL prompts, cosine to PyTorch fp32, AVX2 CPU):
quantising every linear layer per channel gives a minimum of about 0.979-0.989; keeping
the FFN down-projections (the layers after GELU, whose inputs carry the activation
outliers that a per-tensor activation scale clips) in fp32 lifts typical prompts above
0.99 but not the longest (100 values, ~230 tokens: min 0.988); also keeping the first
transformer block in fp32 gives min 0.994 there. That is the default
(``keep_down_proj_fp32`` and ``keep_first_block_fp32``; about 60% of the linear weights
stay int8). Activations are quantised per batch, so int8 vectors also move slightly with
batch composition (padding included).

Cache ids: the fp32 graph reproduces PyTorch fp32 to ~1e-6 (far below the float16 the cache
stores), so it shares the torch ``model_id`` and its cache entries; int8 gives different
vectors and gets its own id (``<model_id>-onnx-int8pc-fp32b0dp`` for the default recipe).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.lm.encoder import EncoderConfig, TextEncoder, length_order

log = logging.getLogger(__name__)

QUANTIZE = ("none", "int8")
OPSET = 17


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            "the ONNX backend needs onnx and onnxruntime: pip install 'tsad[onnx]' "
            "(or pip install onnx onnxruntime)"
        ) from exc
    return onnxruntime


def default_cache_dir() -> Path:
    base = os.environ.get("TSAD_CACHE_DIR") or Path.home() / ".cache" / "tsad"
    return Path(base) / "onnx"


@dataclass(frozen=True)
class OnnxEncoderConfig:
    model_path: str | None = None  # local HF directory; None -> bundled all-MiniLM-L6-v2
    pooling: str = "auto"  # auto | last | mean | cls (as TextEncoder)
    max_length: int = 256
    batch_size: int = 32
    quantize: str = "none"  # none (fp32) | int8 (dynamic, weights only)
    per_channel: bool = True  # int8 scales per output channel (much closer to fp32)
    keep_down_proj_fp32: bool = True  # leave FFN down-projections in fp32 (see above)
    keep_first_block_fp32: bool = True  # leave the first transformer block in fp32
    cache_dir: str | None = None  # exported graphs; None -> $TSAD_CACHE_DIR/onnx or ~/.cache
    threads: int = 0  # intra-op threads; 0 lets onnxruntime use every core
    padding_side: str = "right"
    sort_by_length: bool = True

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize: unknown {self.quantize!r}; known: {QUANTIZE}")


def export_onnx(encoder: TextEncoder, path: str | Path) -> Path:
    """Trace ``encoder.module`` (model + pooling) to an ONNX file with dynamic axes."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = encoder.tokenize(["From t1 to t2, the values were 0, 99", "a longer one, to pad"])
    names = list(sample)
    axes = {k: {0: "batch", 1: "sequence"} for k in names} | {"embedding": {0: "batch"}}
    module = encoder.module
    tmp = Path(tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")[1])
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter warns about its own deprecation and about python
            # booleans it folds; the fold is exact here (masks are always given)
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, tuple(sample[k] for k in names), str(tmp), input_names=names,
                output_names=["embedding"], dynamic_axes=axes, opset_version=OPSET,
                dynamo=False,  # the dynamo exporter needs onnxscript, not a dependency
            )
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; other users of the cache dir read it
        os.replace(tmp, path)  # atomic: a concurrent loader never sees half a file
    finally:
        module.eval()  # the exporter leaves modules in training mode (dropout on!)
        tmp.unlink(missing_ok=True)
    return path


def fp32_nodes(path: str | Path, down_proj: bool, first_block: bool) -> list[str]:
    """MatMul nodes to leave in fp32, found by graph structure, not by any model's names.

    Down-projections: weights mapping a wider space to a narrower one (in > out): BERT
    output.dense, GPT-2 mlp.c_proj, Llama down_proj. First block: every MatMul up to the
    first down-projection in the (topologically sorted) graph.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    weighted = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in shapes]
    down = [n.name for n in weighted if len(s := shapes[n.input[1]]) == 2 and s[0] > s[1]]
    keep: list[str] = list(down) if down_proj else []
    if first_block and down:
        for node in weighted:
            if node.name not in keep:
                keep.append(node.name)
            if node.name == down[0]:
                break
    return keep


def quantize_int8(
    src: str | Path, dst: str | Path, per_channel: bool = True, keep_down_proj_fp32: bool = True,
    keep_first_block_fp32: bool = True,
) -> Path:
    """Dynamic int8 quantisation of the weights (activations are quantised per batch at run
    time)."""
    require_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exclude = fp32_nodes(src, keep_down_proj_fp32, keep_first_block_fp32)
    dst = Path(dst)
    tmp = Path(tempfile.mkstemp(dir=dst.parent, suffix=".onnx.tmp")[1])
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # it logs a pre-processing hint on root
    try:
        quantize_dynamic(str(src), str(tmp), per_channel=per_channel,
                         weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        root.setLevel(level)
        tmp.unlink(missing_ok=True)
    return dst


class OnnxTextEncoder:
    """``TextEncoder``'s interface on ONNX Runtime (CPU provider, or CUDA when the GPU
    build is installed)."""

    def __init__(self, config: OnnxEncoderConfig | None = None, **overrides: Any) -> None:
        ort = require_onnxruntime()
        self.config = cfg = replace(config or OnnxEncoderConfig(), **overrides)
        t0 = time.perf_counter()
        # the torch encoder gives the tokenizer, the pooling and the id; it is dropped
        # after export (eager attention: the plainest graph to trace)
        torch_cfg = EncoderConfig(
            model_path=cfg.model_path, pooling=cfg.pooling, max_length=cfg.max_length,
            device="cpu", dtype="float32", padding_side=cfg.padding_side,
            attn_implementation="eager",
        )
        torch_encoder = TextEncoder(torch_cfg)
        self.tokenizer = torch_encoder.tokenizer
        self.pooling = torch_encoder.pooling
        self.dim = torch_encoder.dim
        self.uses_token_type_ids = torch_encoder.uses_token_type_ids
        base_id = torch_encoder.model_id
        cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        fp32 = cache / f"{base_id}.onnx"
        if not fp32.is_file():
            log.info("exporting %s to %s", base_id, fp32)
            export_onnx(torch_encoder, fp32)
        self._tokenize = torch_encoder.tokenize
        del torch_encoder
        if cfg.quantize == "int8":
            kept = ("b0" if cfg.keep_first_block_fp32 else "") + \
                ("dp" if cfg.keep_down_proj_fp32 else "")
            suffix = ("int8pc" if cfg.per_channel else "int8") + (f"-fp32{kept}" if kept else "")
            self.model_id = f"{base_id}-onnx-{suffix}"
            self.path = cache / f"{self.model_id}.onnx"
            if not self.path.is_file():
                log.info("quantising %s to %s", fp32, self.path)
                quantize_int8(fp32, self.path, cfg.per_channel, cfg.keep_down_proj_fp32,
                              cfg.keep_first_block_fp32)
        else:
            self.model_id, self.path = base_id, fp32
        options = ort.SessionOptions()
        options.intra_op_num_threads = cfg.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        log.info("onnx encoder %s ready in %.1fs (%s)", self.model_id,
                 time.perf_counter() - t0, self.session.get_providers()[0])

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(N,) prompts -> (N, dim) float32, row i for texts[i]."""
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        bs = batch_size or self.config.batch_size
        order = length_order(texts) if self.config.sort_by_length else np.arange(len(texts))
        for start in range(0, len(texts), bs):
            idx = order[start:start + bs]
            batch = self._tokenize([texts[i] for i in idx], tensors="np")
            feed = {k: np.asarray(batch[k], dtype=np.int64) for k in self.input_names}
            out[idx] = self.session.run(["embedding"], feed)[0]
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "onnxruntime", "model_id": self.model_id, "path": str(self.path),
            "pooling": self.pooling, "dim": self.dim, "quantize": self.config.quantize,
            "per_channel": self.config.per_channel,
            "keep_down_proj_fp32": self.config.keep_down_proj_fp32,
            "keep_first_block_fp32": self.config.keep_first_block_fp32,
            "provider": self.session.get_providers()[0],
        }
