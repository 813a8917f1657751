"""The frozen encoder on the real bundled model (all-MiniLM-L6-v2), plus a tiny local GPT-2
for the decoder path (no pad token, last-token pooling)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.lm.encoder import EncoderConfig, TextEncoder, make_model_id, shared_encoder
from models.lm.prompts import PromptBuilder, PromptConfig

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def encoder() -> TextEncoder:
    return shared_encoder(EncoderConfig(device="cpu"))


@pytest.fixture(scope="module")
def prompts(encoder) -> list[str]:
    t = np.arange(32.0)
    b = PromptBuilder(PromptConfig(), encoder.tokenizer)
    return [b(np.sin(t / 3.0))[0], b(np.sin(t / 3.0) + 0.5 * (t > 20))[0],
            b(t ** 1.5)[0], b(np.zeros(32))[0]]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_shape_dtype_and_identity(encoder, prompts):
    emb = encoder.encode(prompts)
    assert emb.shape == (4, 384) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert encoder.pooling == "mean"  # an encoder model: masked mean by default
    again = encoder.encode(prompts)
    assert np.array_equal(emb, again)  # identical windows -> identical embeddings
    # different windows -> different embeddings
    assert cosine(emb[0], emb[1]) < 0.9999 and cosine(emb[0], emb[2]) < 0.99
    assert np.abs(emb[0] - emb[1]).max() > 1e-3


def test_batching_padding_and_order_do_not_change_vectors(encoder, prompts):
    together = encoder.encode(prompts, batch_size=4)
    alone = np.concatenate([encoder.encode([p]) for p in prompts[:2]])
    np.testing.assert_allclose(together[:2], alone, atol=2e-5)
    reverse = encoder.encode(prompts[::-1], batch_size=3)[::-1]
    np.testing.assert_allclose(together, reverse, atol=2e-5)


def test_left_padding_gives_the_same_vectors(encoder, prompts):
    left = TextEncoder(EncoderConfig(device="cpu", padding_side="left"))
    np.testing.assert_allclose(left.encode(prompts[:3]), encoder.encode(prompts[:3]),
                               atol=2e-4)
    assert left.model_id == encoder.model_id  # padding side does not change vectors


@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_picks_real_tokens(side):
    import torch

    from models.lm.encoder import pool

    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    lengths = [5, 2]
    mask = torch.zeros(2, 5, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1 if side == "right" else 0
        if side == "left":
            mask[i, 5 - n:] = 1
    real = [hidden[i][mask[i].bool()] for i in range(2)]
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.stack([r[-1] for r in real]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.stack([r[0] for r in real]))
    torch.testing.assert_close(pool(hidden, mask, "mean"),
                               torch.stack([r.mean(0) for r in real]))


def test_frozen_and_stable_id(encoder, prompts):
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    encoder.encode(prompts)
    assert all((before[k] == v).all() for k, v in encoder.model.state_dict().items())
    # content-based: recomputing from the files gives the same id, another pooling another
    assert encoder.model_id == make_model_id(encoder.path, "bert", "mean", 256)
    assert encoder.model_id != make_model_id(encoder.path, "bert", "last", 256)
    assert shared_encoder(EncoderConfig(device="cpu")) is encoder


def test_bad_config():
    with pytest.raises(ValueError, match="pooling"):
        EncoderConfig(pooling="max")
    with pytest.raises(FileNotFoundError):
        TextEncoder(EncoderConfig(model_path="/nonexistent/model"))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A real GPT-2 architecture and byte-level BPE tokenizer, tiny and random: the decoder
    path without downloading anything. Like GPT-2, its tokenizer has no pad token."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2Model, GPT2TokenizerFast

    path = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = ByteLevelBPETokenizer()
    corpus = [f"From t1 to t{n}, the values were {', '.join(map(str, range(n)))}. "
              "The variance was 0.5" for n in range(2, 40)]
    bpe.train_from_iterator(corpus, vocab_size=400, special_tokens=["<|endoftext|>"])
    end = "<|endoftext|>"
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=end, bos_token=end,
                            unk_token=end)
    assert tok.pad_token is None
    tok.save_pretrained(path)
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         )).save_pretrained(path)
    return path


def test_decoder_model_without_pad_token(tiny_gpt2, prompts):
    right = TextEncoder(EncoderConfig(model_path=str(tiny_gpt2), device="cpu", max_length=256))
    assert right.pooling == "last" and right.model_id.startswith("gpt2-")
    assert right.tokenizer.pad_token is not None
    short = ["From t1 to t3, the values were 0, 50, 99. The variance was 1"]
    batch = right.encode(prompts[:2] + short)
    alone = right.encode(short)
    np.testing.assert_allclose(batch[2], alone[0], atol=1e-5)  # padding is masked out
    left = TextEncoder(EncoderConfig(model_path=str(tiny_gpt2), device="cpu",
                                     padding_side="left"))
    np.testing.assert_allclose(left.encode(prompts[:2] + short), batch, atol=1e-4)


def test_embed_cli_writes_arrays_and_index(tmp_path, encoder):
    from models.lm.precompute import load_precomputed
    from service.cli import main

    series = np.stack([np.sin(np.arange(60.0) / 4), np.zeros(60)], axis=1)
    np.save(tmp_path / "tiny.npy", series)
    rc = main(["embed", "--dataset", str(tmp_path / "tiny.npy"), "--out", str(tmp_path / "o"),
               "--window", "32", "--stride", "10", "--no-progress", "--device", "cpu"])
    assert rc == 0
    arr, index = load_precomputed(tmp_path / "o", "tiny")
    assert arr.shape == (3, 2, 384) and arr.dtype == np.float16
    assert index["model_id"] == encoder.model_id
    assert index["splits"]["tiny"]["segments"][0]["count"] == 3
    b = PromptBuilder(PromptConfig(), encoder.tokenizer)
    direct = encoder.encode(b(series[10:42]))
    np.testing.assert_allclose(arr[1].astype(np.float32), direct, atol=2e-3)
