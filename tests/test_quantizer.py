"""SPEAR quantiser on constructed series."""

from __future__ import annotations

import numpy as np
import pytest

from models.lm.encoder import default_model_path
from models.lm.quantizer import QuantizerConfig, SeriesQuantizer


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


def test_uniform_bins_ignore_training_outliers():
    train = np.concatenate([np.linspace(0.0, 10.0, 1001), [1e6]])  # one wild outlier
    q = SeriesQuantizer(n_bins=10, lower_q=0.0, upper_q=0.99).fit(train)
    bins = q.transform(np.array([0.0, 0.5, 5.0, 9.85, 1e6, -5.0])).ravel()
    assert bins.tolist() == [0, 0, 5, 9, 9, 0]  # outlier did not stretch the bins
    assert q.edges.shape == (1, 9) and (np.diff(q.edges) > 0).all()


def test_quantile_bins_are_equally_full():
    rng = np.random.default_rng(0)
    train = rng.exponential(size=20_000)  # skewed: uniform bins would crowd the low end
    q = SeriesQuantizer(n_bins=8, method="quantile").fit(train)
    counts = np.bincount(q.transform(train).ravel(), minlength=8)
    assert counts.min() > 0.9 * len(train) / 8 and counts.max() < 1.1 * len(train) / 8


def test_per_channel_edges_and_range():
    t = np.linspace(0, 1, 500)
    train = np.stack([t, 1000.0 * t - 500.0], axis=1)
    q = SeriesQuantizer(n_bins=5, lower_q=0.0, upper_q=1.0).fit(train)
    out = q.transform(np.array([[0.1, -400.0], [0.95, 450.0]]))
    assert out.tolist() == [[0, 0], [4, 4]] and out.dtype == np.int64
    assert q.transform(train).min() == 0 and q.transform(train).max() == 4
    with pytest.raises(ValueError, match="channels"):
        q.transform(np.zeros((3, 3)))


def test_constant_channel_does_not_break():
    q = SeriesQuantizer(n_bins=4, method="quantile").fit(np.ones((100, 1)))
    assert q.transform(np.array([0.0, 1.0, 2.0])).ravel().tolist() == [0, 3, 3]


def test_numbers_scheme_one_distinct_token_per_bin(tokenizer):
    q = SeriesQuantizer(n_bins=100).fit(np.random.default_rng(1).normal(size=500))
    ids = q.bind(tokenizer, "numbers")
    assert len(ids) == 100 and len(set(ids.tolist())) == 100
    for b in (0, 7, 42, 99):  # bin b is the token of the string "b", and only that token
        assert tokenizer.convert_ids_to_tokens(int(ids[b])) == str(b)
    x = np.array([-10.0, 0.0, 10.0])
    np.testing.assert_array_equal(q.to_token_ids(x), ids[q.transform(x)])


def test_unused_scheme_and_too_many_bins(tokenizer):
    ids = SeriesQuantizer(n_bins=50).fit(np.arange(10.0)).bind(tokenizer, "unused")
    assert tokenizer.convert_ids_to_tokens(int(ids[49])) == "[unused49]"
    with pytest.raises(ValueError, match="not one known token"):  # "342" is two BERT tokens
        SeriesQuantizer(n_bins=500).fit(np.arange(10.0)).bind(tokenizer, "numbers")
    with pytest.raises(ValueError, match="not one known token"):  # only 994 unused slots
        SeriesQuantizer(n_bins=1000).fit(np.arange(10.0)).bind(tokenizer, "unused")


def test_save_load_round_trip(tmp_path, tokenizer):
    rng = np.random.default_rng(2)
    train = rng.normal(size=(300, 2))
    q = SeriesQuantizer(QuantizerConfig(n_bins=32, method="quantile")).fit(train)
    q.bind(tokenizer)
    loaded = SeriesQuantizer.load(q.save(tmp_path / "q.json"))
    assert loaded.config == q.config and loaded.scheme == "numbers"
    np.testing.assert_array_equal(loaded.edges, q.edges)
    x = rng.normal(size=(50, 2))
    np.testing.assert_array_equal(loaded.to_token_ids(x), q.to_token_ids(x))
    np.testing.assert_array_equal(loaded.to_indices(x), q.transform(x))


def test_misuse_is_explained():
    with pytest.raises(RuntimeError, match="fit"):
        SeriesQuantizer().transform(np.zeros(3))
    with pytest.raises(RuntimeError, match="bind"):
        SeriesQuantizer(n_bins=4).fit(np.arange(8.0)).to_token_ids(np.zeros(3))
    with pytest.raises(ValueError, match="method"):
        QuantizerConfig(method="kmeans")
    with pytest.raises(ValueError, match="NaN"):
        SeriesQuantizer().fit(np.array([1.0, np.nan]))
