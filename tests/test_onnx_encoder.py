"""ONNX Runtime backend against PyTorch fp32 on real prompts (a NAB slice)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from models.data import load_nab
from models.lm.encoder import EncoderConfig, shared_encoder
from models.lm.onnx_encoder import OnnxTextEncoder, require_onnxruntime
from models.lm.prompts import PromptBuilder, PromptConfig

DATA = Path(__file__).parent / "data"
# measured (AVX2 CPU): per-channel int8 of every linear layer does not reach 0.99: min
# cosine 0.989 on this file's prompts and batches, 0.979 on 100-value MSL prompts
# (benchmarks/results/embeddings.md); the default recipe (first block and FFN
# down-projections fp32) gives >= 0.993 on both
ALL_LAYERS_INT8_MIN_COSINE = 0.985


@pytest.fixture(scope="module")
def torch_encoder():
    return shared_encoder(EncoderConfig(device="cpu"))


@pytest.fixture(scope="module")
def prompts(torch_encoder) -> list[str]:
    (series,) = load_nab(DATA / "nab_tiny")
    x = series.values
    out = []
    for strategy, window in (("variance", 64), ("all", 32), ("trend", 100)):
        b = PromptBuilder(PromptConfig(strategy=strategy), torch_encoder.tokenizer)
        out += [b(x[s:s + window])[0] for s in range(0, 400 - window, 90)]
    return out


@pytest.fixture(scope="module")
def reference(torch_encoder, prompts) -> np.ndarray:
    return torch_encoder.encode(prompts)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_fp32_matches_pytorch(cache_dir, prompts, reference, torch_encoder):
    enc = OnnxTextEncoder(cache_dir=str(cache_dir))
    got = enc.encode(prompts, batch_size=8)
    assert got.shape == reference.shape and got.dtype == np.float32
    assert cosine(got, reference).min() >= 0.9999
    assert np.abs(got - reference).max() < 1e-3
    assert enc.model_id == torch_encoder.model_id and enc.pooling == "mean"
    exported = enc.path.stat().st_mtime_ns
    again = OnnxTextEncoder(cache_dir=str(cache_dir))  # reuses the exported graph
    assert again.path.stat().st_mtime_ns == exported
    np.testing.assert_array_equal(again.encode(prompts[:2]), enc.encode(prompts[:2]))


def test_int8_per_channel_default_reaches_099(cache_dir, prompts, reference, torch_encoder):
    enc = OnnxTextEncoder(cache_dir=str(cache_dir), quantize="int8")
    cos = cosine(enc.encode(prompts, batch_size=8), reference)
    print(f"int8 per-channel (default recipe): min {cos.min():.4f} mean {cos.mean():.4f}")
    assert cos.min() >= 0.99
    # never shares cache keys with fp32
    assert enc.model_id == f"{torch_encoder.model_id}-onnx-int8pc-fp32b0dp"


def test_int8_per_channel_all_layers_measured_bound(cache_dir, prompts, reference):
    enc = OnnxTextEncoder(cache_dir=str(cache_dir), quantize="int8", keep_down_proj_fp32=False,
                          keep_first_block_fp32=False)
    cos = cosine(enc.encode(prompts, batch_size=8), reference)
    print(f"int8 per-channel (all layers): min {cos.min():.4f} mean {cos.mean():.4f}")
    assert cos.min() >= ALL_LAYERS_INT8_MIN_COSINE
    assert enc.model_id.endswith("-onnx-int8pc")


def test_missing_onnxruntime_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now fails
    with pytest.raises(RuntimeError, match=r"pip install 'tsad\[onnx\]'"):
        require_onnxruntime()
