"""Prompt builder and dataset loaders: determinism, strategies, the token budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.data import load_msl, load_nab
from models.lm.encoder import default_model_path
from models.lm.prompts import (
    PromptBuilder,
    PromptConfig,
    channel_prompt,
    count_tokens,
    lag1_autocorr,
    ols_slope,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def nab_values() -> np.ndarray:
    (series,) = load_nab(DATA / "nab_tiny")
    return series.values


def test_same_window_same_text_different_window_different_text(nab_values):
    b = PromptBuilder(PromptConfig())
    w = nab_values[:64, None]
    assert b(w) == b(w.copy()) == b(w + 0.0)
    assert b(w) != b(nab_values[1:65, None])


@pytest.mark.parametrize("strategy,phrase", [
    ("variance", "The variance was"), ("trend", "The trend slope was"),
    ("autocorr", "The lag-1 autocorrelation was"), ("all", "the lag-1 autocorrelation was"),
])
def test_strategies_close_with_their_statistic(strategy, phrase, nab_values):
    text = channel_prompt(nab_values[:32], PromptConfig(strategy=strategy))
    assert text.startswith("From t1 to t32, the values were ")
    stat = text.rsplit(". ", 1)[1]
    assert phrase in stat and stat[-1].isdigit()  # the value is the last token


def test_statistics_are_right():
    t = np.arange(50.0)
    assert ols_slope(3.0 * t + 7.0) == pytest.approx(3.0)
    alternating = np.where(t % 2 == 0, 1.0, -1.0)
    assert lag1_autocorr(alternating) == pytest.approx(-0.98)  # -(n-1)/n


def test_values_scaled_per_channel_to_integers():
    w = np.stack([np.linspace(-5, 5, 11), np.linspace(1e6, 2e6, 11)], axis=1)
    a, b = PromptBuilder(PromptConfig(strategy="trend"))(w)
    listed = lambda p: p.split(" were ")[1].split(" (")[0]  # noqa: E731
    assert listed(a) == listed(b) == "0, 10, 20, 30, 40, 50, 59, 69, 79, 89, 99"
    assert "between -5 and 5" in a and "between 1e+06 and 2e+06" in b


@pytest.mark.parametrize("window", [32, 64, 100, 400])
@pytest.mark.parametrize("strategy", ["variance", "all"])
def test_prompts_fit_the_encoder_budget(window, strategy, tokenizer, nab_values):
    cfg = PromptConfig(strategy=strategy)
    b = PromptBuilder(cfg, tokenizer)
    series = np.concatenate([nab_values, nab_values * 3.7 - 11.0])
    prompts = [b(series[s:s + window])[0] for s in range(0, len(series) - window, 97)]
    counts = count_tokens(prompts, tokenizer)
    assert max(counts) <= cfg.max_tokens - cfg.margin
    assert all(p.startswith(f"From t1 to t{window},") for p in prompts)


def test_tight_budget_drops_values_never_the_statistic(tokenizer, nab_values):
    cfg = PromptConfig(strategy="all", max_tokens=96, margin=4)
    text = channel_prompt(nab_values[:100], cfg, tokenizer)
    full = channel_prompt(nab_values[:100], PromptConfig(strategy="all"))
    assert count_tokens([text], tokenizer)[0] <= 92
    assert text.endswith(full.rsplit(". ", 1)[1])  # statistic sentence intact
    assert "samples) were" in text
    assert channel_prompt(nab_values[:100], cfg, tokenizer) == text  # still deterministic


def test_downsampling_keeps_a_spike():
    x = np.zeros(300)
    x[151] = 10.0
    text = channel_prompt(x, PromptConfig(max_values=20))
    assert "(20 samples)" in text and ", 99," in text


def test_constant_channel_and_bad_input():
    assert "constant at 0" in channel_prompt(np.zeros(8), PromptConfig())
    with pytest.raises(ValueError, match="NaN"):
        channel_prompt(np.array([1.0, np.nan, 2.0]), PromptConfig())
    with pytest.raises(ValueError, match="strategy"):
        PromptConfig(strategy="median")


def test_load_nab_labels_the_window():
    (s,) = load_nab(DATA / "nab_tiny")
    assert s.name == "realKnownCause/ec2_request_latency_system_failure.csv"
    assert len(s.values) == 400 and s.values.dtype == np.float64
    start, end = np.datetime64("2014-03-14T03:31:00"), np.datetime64("2014-03-14T14:41:00")
    inside = (s.timestamps >= start) & (s.timestamps <= end)
    assert inside.sum() > 50 and s.labels[inside].all() and not s.labels[~inside].any()


def test_load_msl_layout(tmp_path):
    # the MSL layout (entities.csv row ranges) on a small made-up array
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", rng.normal(size=(30, 55)).astype(np.float32))
    np.save(tmp_path / "test.npy", rng.normal(size=(40, 55)).astype(np.float32))
    np.save(tmp_path / "test_label.npy", (np.arange(40) >= 35).astype(np.uint8))
    (tmp_path / "entities.csv").write_text(
        "chan_id,train_start,train_end,test_start,test_end\nA-1,0,10,0,25\nB-2,10,30,25,40\n")
    a, b = load_msl(tmp_path)
    assert (a.name, a.train.shape, a.test.shape, b.test.shape) == ("A-1", (10, 55), (25, 55),
                                                                  (15, 55))
    assert b.labels.sum() == 5 and a.labels.sum() == 0
    with pytest.raises(FileNotFoundError):
        load_msl(tmp_path / "nowhere")


def test_budget_too_small_for_the_statistic_raises(tokenizer, nab_values):
    cfg = PromptConfig(strategy="all", max_tokens=64, margin=4)
    with pytest.raises(ValueError, match="even with 2 values"):
        channel_prompt(nab_values[:100], cfg, tokenizer)
