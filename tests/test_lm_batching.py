"""Micro-batching (models/lm/batching.py) with the real language model: concurrent calls
share passes, every caller gets exactly its own rows, and errors reach every caller."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from models.lm.batching import MicroBatcher
from models.lm.cache import CachedEncoder
from models.lm.encoder import EncoderConfig, shared_encoder
from models.lm.metrics import EmbeddingMetrics
from models.lm.prompts import PromptBuilder, PromptConfig
from tests.test_embedding_cache import Recording, prompts_for


@pytest.fixture(scope="module")
def lm():
    return shared_encoder(EncoderConfig(device="cpu"))


@pytest.fixture(scope="module")
def builder(lm) -> PromptBuilder:
    return PromptBuilder(PromptConfig(), lm.tokenizer)


def run_concurrently(encode, jobs: list[list[str]]) -> list[np.ndarray]:
    out: list[np.ndarray | BaseException] = [None] * len(jobs)  # type: ignore[list-item]
    start = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        start.wait()
        try:
            out[i] = encode(jobs[i])
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out  # type: ignore[return-value]


def test_concurrent_calls_share_passes_and_get_their_own_rows(lm, builder):
    rec = Recording(lm)
    registry = CollectorRegistry()
    metrics = EmbeddingMetrics(registry)
    batcher = MicroBatcher(rec, window_seconds=0.2, metrics=metrics)
    prompts = prompts_for(builder, 12)
    jobs = [prompts[i:i + 4] for i in range(0, 12, 4)] + [prompts[:2]]  # one repeats
    try:
        got = run_concurrently(batcher.encode, jobs)
    finally:
        batcher.close()
    direct = lm.encode(prompts)
    for job, rows in zip(jobs, got, strict=True):
        want = direct[[prompts.index(p) for p in job]]
        np.testing.assert_allclose(rows, want, atol=1e-4)  # batch padding: float noise only
    assert len(rec.calls) < len(jobs)  # coalesced
    assert sum(len(c) for c in rec.calls) == 12  # each distinct prompt encoded once
    assert registry.get_sample_value("tsad_embedding_pass_calls_sum") == len(jobs)
    assert registry.get_sample_value("tsad_embedding_pass_calls_count") == len(rec.calls)


def test_a_failing_pass_fails_every_caller_and_the_batcher_goes_on(lm, builder):
    class Flaky(Recording):
        def encode(self, texts, batch_size=None):
            if any("boom" in t for t in texts):
                raise ValueError("boom")
            return super().encode(texts, batch_size)

    batcher = MicroBatcher(Flaky(lm), window_seconds=0.2)
    try:
        got = run_concurrently(batcher.encode, [["boom"], prompts_for(builder, 1)])
        assert all(isinstance(g, ValueError) for g in got)  # they shared the failed pass
        again = batcher.encode(prompts_for(builder, 1))
        assert again.shape == (1, lm.dim)
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.encode(["x"])


def test_cached_encoder_over_a_batcher_answers_like_the_encoder(lm, builder):
    batcher = MicroBatcher(lm, window_seconds=0.0)
    cached = CachedEncoder(batcher)
    prompts = prompts_for(builder, 5, offset=1.0)
    try:
        np.testing.assert_allclose(cached.encode(prompts), CachedEncoder(lm).encode(prompts),
                                   atol=1e-3)
        assert cached.model_id == lm.model_id and cached.dim == lm.dim
    finally:
        batcher.close()
