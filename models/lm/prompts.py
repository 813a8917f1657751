"""Statistical text prompts, one per channel of a window (CMA-TSAD, section II).

Shape of a prompt (the paper's template, the statistic sentence last so that the final
token is the statistic's value, which is what last-token pooling keeps)::

    From t1 to t8, the values were 0, 14, 28, 42, 57, 71, 85, 99 (scaled 0-99 between 1
    and 8). The variance was 5.25

Why this format:

* values are rescaled per channel to integers ``0..scale_max`` across the window's
  min..max: two-digit integers are one token each in BERT and GPT-2 vocabularies, so a
  prompt's length is predictable, and windows of the same shape share text (and cache
  entries) whatever their level; the real range is stated once, with 4 significant digits;
* long windows are downsampled to at most ``max_values`` values (per contiguous bucket the
  value farthest from the window mean, so a spike survives downsampling);
* the statistic is computed on the full window, never on the downsampled values;
* with a tokenizer, a prompt that would not fit ``max_tokens - margin`` loses values from
  the list, never its statistic sentence;
* time labels are relative (t1..tn), not wall-clock: identical windows give identical
  text, so the embedding cache can serve them.

>>> cfg = PromptConfig(strategy="variance")
>>> channel_prompt(np.arange(1.0, 9.0), cfg)
'From t1 to t8, the values were 0, 14, 28, 42, 57, 71, 85, 99 (scaled 0-99 between 1 and 8). The variance was 5.25'
>>> channel_prompt(np.full(4, 2.5), PromptConfig(strategy="trend"))
'From t1 to t4, the values were 0, 0, 0, 0 (constant at 2.5). The trend slope was 0'
"""  # noqa: E501

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

STRATEGIES = ("variance", "trend", "autocorr", "all")
DOWNSAMPLE = ("extreme", "mean")


class Tokenizer(Protocol):
    """What prompt fitting needs from a Hugging Face tokenizer."""

    def __call__(self, text: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class PromptConfig:
    strategy: str = "variance"  # variance | trend | autocorr | all (variance was best in CMA-TSAD)
    max_values: int = 100  # at most this many values listed; longer windows are downsampled
    scale_max: int = 99  # values become integers 0..scale_max across the window's range
    downsample: str = "extreme"  # extreme (keeps spikes) | mean (per contiguous bucket)
    max_tokens: int = 256  # encoder budget incl. special tokens (MiniLM was trained at 256)
    margin: int = 8  # tokens kept free under max_tokens
    digits: int = 4  # significant digits of the range and the statistic

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: unknown {self.strategy!r}; known: {STRATEGIES}")
        if self.downsample not in DOWNSAMPLE:
            raise ValueError(f"downsample: unknown {self.downsample!r}; known: {DOWNSAMPLE}")
        if self.max_values < 2:
            raise ValueError("max_values: need at least 2")
        if not 1 <= self.scale_max <= 999:
            raise ValueError("scale_max: need 1..999")
        if self.max_tokens - self.margin < 32:
            raise ValueError("max_tokens - margin: need at least 32 tokens")


# --- statistics (on the full window) -------------------------------------------------------
def variance(x: np.ndarray) -> float:
    """Population variance.

    >>> variance(np.array([1.0, 2.0, 3.0, 4.0]))
    1.25
    """
    return float(np.var(x))


def ols_slope(x: np.ndarray) -> float:
    """Least-squares slope of x against its index (units of x per step).

    >>> ols_slope(np.array([1.0, 3.0, 5.0, 7.0]))
    2.0
    """
    t = np.arange(len(x), dtype=np.float64)
    tc = t - t.mean()
    denom = float(tc @ tc)
    return float(tc @ (x - x.mean()) / denom) if denom > 0 else 0.0


def lag1_autocorr(x: np.ndarray) -> float:
    """Lag-1 autocorrelation; 0 for a constant window (undefined there, and 0 says "no
    structure" without putting 'nan' in a prompt).

    >>> round(lag1_autocorr(np.array([1.0, 2.0, 3.0, 4.0])), 4)
    0.25
    >>> lag1_autocorr(np.ones(5))
    0.0
    """
    xc = x - x.mean()
    denom = float(xc @ xc)
    return float(xc[:-1] @ xc[1:] / denom) if denom > 0 and len(x) > 1 else 0.0


def fmt(x: float, digits: int = 4) -> str:
    """Deterministic short number text: fixed significant digits, no '-0', no 'nan'.

    >>> [fmt(v) for v in (1234567.0, 0.000123456, -0.0, 2.5, 3.0)]
    ['1.235e+06', '0.0001235', '0', '2.5', '3']
    """
    if not math.isfinite(x):
        raise ValueError(f"cannot put a non-finite value ({x}) in a prompt")
    text = format(x, f".{digits}g")
    return "0" if text in ("-0", "0") else text


def statistic_sentence(x: np.ndarray, strategy: str, digits: int = 4) -> str:
    """The closing sentence; its last token is the statistic's value.

    >>> statistic_sentence(np.array([1.0, 2.0, 3.0, 4.0]), "all")
    'The variance was 1.25, the trend slope was 1 and the lag-1 autocorrelation was 0.25'
    """
    var, slope, ac = (
        fmt(variance(x), digits), fmt(ols_slope(x), digits), fmt(lag1_autocorr(x), digits)
    )
    if strategy == "variance":
        return f"The variance was {var}"
    if strategy == "trend":
        return f"The trend slope was {slope}"
    if strategy == "autocorr":
        return f"The lag-1 autocorrelation was {ac}"
    if strategy == "all":
        return f"The variance was {var}, the trend slope was {slope} and the lag-1 " \
               f"autocorrelation was {ac}"
    raise ValueError(f"strategy: unknown {strategy!r}; known: {STRATEGIES}")


# --- values ------------------------------------------------------------------------------
def downsample(x: np.ndarray, k: int, how: str = "extreme") -> np.ndarray:
    """At most k values, one per contiguous bucket (np.array_split: deterministic sizes).

    >>> downsample(np.array([0.0, 0.0, 9.0, 0.0, 0.0, 0.0]), 3).tolist()
    [0.0, 9.0, 0.0]
    >>> downsample(np.array([0.0, 2.0, 4.0, 6.0]), 2, "mean").tolist()
    [1.0, 5.0]
    """
    if len(x) <= k:
        return x
    center = x.mean()
    out = np.empty(k)
    for i, bucket in enumerate(np.array_split(x, k)):
        out[i] = bucket.mean() if how == "mean" else bucket[np.argmax(np.abs(bucket - center))]
    return out


def scale_to_ints(x: np.ndarray, lo: float, hi: float, scale_max: int) -> np.ndarray:
    """Map [lo, hi] onto integers 0..scale_max (all 0 when the window is constant).

    >>> scale_to_ints(np.array([1.0, 1.5, 2.0]), 1.0, 2.0, 99).tolist()
    [0, 50, 99]
    """
    if hi <= lo:
        return np.zeros(len(x), dtype=np.int64)
    # rint is round-half-to-even: deterministic for the same floats on every platform
    return np.rint((x - lo) / (hi - lo) * scale_max).clip(0, scale_max).astype(np.int64)


def render(x: np.ndarray, k: int, config: PromptConfig, stat: str) -> str:
    """The prompt for window x listing at most k values, closing with ``stat``."""
    lo, hi = float(x.min()), float(x.max())
    shown = downsample(x, k, config.downsample)
    values = ", ".join(map(str, scale_to_ints(shown, lo, hi, config.scale_max).tolist()))
    if hi > lo:
        scale = f"scaled 0-{config.scale_max} between {fmt(lo, config.digits)} and " \
                f"{fmt(hi, config.digits)}"
    else:
        scale = f"constant at {fmt(lo, config.digits)}"
    samples = "" if len(shown) == len(x) else f" ({len(shown)} samples)"
    return f"From t1 to t{len(x)}, the values{samples} were {values} ({scale}). {stat}"


def count_tokens(texts: Sequence[str], tokenizer: Tokenizer) -> list[int]:
    """Token counts as the encoder sees them (special tokens included, no truncation)."""
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    return [len(row) for row in ids]


def channel_prompt(
    values: np.ndarray, config: PromptConfig, tokenizer: Tokenizer | None = None
) -> str:
    """One channel's prompt. With a tokenizer, guaranteed to fit max_tokens - margin by
    listing fewer values; the statistic sentence is never cut."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if len(x) < 2:
        raise ValueError("window: need at least 2 values per channel")
    if not np.isfinite(x).all():
        raise ValueError("window: contains NaN or infinite values")
    stat = statistic_sentence(x, config.strategy, config.digits)
    k = min(len(x), config.max_values)
    text = render(x, k, config, stat)
    if tokenizer is None:
        return text
    budget = config.max_tokens - config.margin
    while (n := count_tokens([text], tokenizer)[0]) > budget:
        if k == 2:
            raise ValueError(f"prompt needs {n} tokens even with 2 values; budget {budget}")
        # a listed value costs at least 2 tokens ("57" and ","): shrink by the overflow
        k = max(2, k - max(1, math.ceil((n - budget) / 2)))
        text = render(x, k, config, stat)
    return text


class PromptBuilder:
    """Per-channel prompts for windows; holds the config and (optionally) the tokenizer
    that fixes the length budget.

    >>> b = PromptBuilder(PromptConfig(strategy="autocorr"))
    >>> w = np.stack([np.arange(6.0), np.ones(6)], axis=1)  # (W=6, C=2)
    >>> b(w)[1]
    'From t1 to t6, the values were 0, 0, 0, 0, 0, 0 (constant at 1). The lag-1 autocorrelation was 0'
    """  # noqa: E501

    def __init__(self, config: PromptConfig | None = None, tokenizer: Tokenizer | None = None):
        self.config = config or PromptConfig()
        self.tokenizer = tokenizer

    def __call__(self, window: np.ndarray) -> list[str]:
        """(W, C) or (W,) window -> C prompts, channel order kept."""
        w = np.asarray(window, dtype=np.float64)
        if w.ndim == 1:
            w = w[:, None]
        if w.ndim != 2:
            raise ValueError(f"window: expected shape (W, C), got {w.shape}")
        return [channel_prompt(w[:, c], self.config, self.tokenizer) for c in range(w.shape[1])]

    def batch(self, windows: np.ndarray) -> list[list[str]]:
        """(B, W, C) -> B lists of C prompts."""
        return [self(w) for w in np.asarray(windows)]
