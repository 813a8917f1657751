"""SPEAR tokeniser: a scaled series -> N bins -> one language-model token id per bin.

Bin edges are fitted per channel on training data only:

* ``uniform``: N equal-width bins between robust bounds (the ``lower_q``/``upper_q``
  quantiles), so a few outliers in training do not squeeze every normal value into a
  couple of bins; values outside the bounds fall into the end bins;
* ``quantile``: N equal-mass bins (each bin about as frequent in training).

Bins then map to token ids with a tokenizer (``bind``):

* ``numbers``: the tokens of the strings "0".."N-1" (BERT and GPT-2 have single tokens for
  small integers, and their embeddings already encode order),
* ``unused``: BERT's reserved ``[unused0]``.. tokens (no prior meaning to fight),

or to plain indices 0..N-1 for a learned embedding table (no tokenizer). ``bind`` checks
that every bin is exactly one token and that the ids are distinct.

>>> q = SeriesQuantizer(QuantizerConfig(n_bins=4, lower_q=0.0, upper_q=1.0))
>>> q = q.fit(np.array([0.0, 1.0, 2.0, 3.0, 4.0]))
>>> q.transform(np.array([-9.0, 0.5, 1.5, 2.5, 3.9, 99.0])).ravel().tolist()
[0, 0, 1, 2, 3, 3]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("uniform", "quantile")
SCHEMES = ("numbers", "unused")


@dataclass(frozen=True)
class QuantizerConfig:
    n_bins: int = 100  # N: SPEAR tunes it per dataset
    method: str = "uniform"  # uniform | quantile
    lower_q: float = 0.005  # robust bounds for uniform bins (0 and 1: plain min/max)
    upper_q: float = 0.995

    def __post_init__(self) -> None:
        if self.n_bins < 2:
            raise ValueError("n_bins: need at least 2")
        if self.method not in METHODS:
            raise ValueError(f"method: unknown {self.method!r}; known: {METHODS}")
        if not 0.0 <= self.lower_q < self.upper_q <= 1.0:
            raise ValueError("need 0 <= lower_q < upper_q <= 1")


class SeriesQuantizer:
    """Fit per-channel bin edges; map values to bins, bins to token ids."""

    def __init__(self, config: QuantizerConfig | None = None, **overrides: Any) -> None:
        self.config = replace(config or QuantizerConfig(), **overrides)
        self.edges: np.ndarray | None = None  # (C, N-1) interior edges, ascending
        self.token_ids: np.ndarray | None = None  # (N,) int64 once bound to a tokenizer
        self.scheme: str | None = None

    @property
    def is_fitted(self) -> bool:
        return self.edges is not None

    @staticmethod
    def _as_2d(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        x = x[:, None] if x.ndim == 1 else x
        if x.ndim != 2:
            raise ValueError(f"series: expected (T,) or (T, C), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("series: contains NaN or infinite values")
        return x

    def fit(self, train: np.ndarray) -> SeriesQuantizer:
        """Learn edges from a training series (T,) or (T, C)."""
        x = self._as_2d(train)
        n = self.config.n_bins
        if self.config.method == "uniform":
            lo = np.quantile(x, self.config.lower_q, axis=0)
            hi = np.quantile(x, self.config.upper_q, axis=0)
            frac = np.arange(1, n) / n
            self.edges = lo[:, None] + (hi - lo)[:, None] * frac[None, :]
        else:
            # repeated edges (a channel with few distinct values) just leave bins empty
            self.edges = np.quantile(x, np.arange(1, n) / n, axis=0).T
        self.edges = np.ascontiguousarray(self.edges, dtype=np.float64)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(T,) or (T, C) -> (T, C) int64 bins in 0..N-1.

        A value equal to an edge goes to the upper bin; a constant training channel puts
        values below its level in bin 0 and the rest in the top bin.
        """
        if self.edges is None:
            raise RuntimeError("quantizer: call fit() first")
        x = self._as_2d(x)
        if x.shape[1] != self.edges.shape[0]:
            raise ValueError(f"series: {x.shape[1]} channels, quantizer fit on "
                             f"{self.edges.shape[0]}")
        out = np.empty(x.shape, dtype=np.int64)
        for c in range(x.shape[1]):
            out[:, c] = np.searchsorted(self.edges[c], x[:, c], side="right")
        return out

    # --- token ids -----------------------------------------------------------------------
    def bind(self, tokenizer: Any, scheme: str = "numbers") -> np.ndarray:
        """Choose one vocabulary id per bin; raises if a bin is not exactly one token or two
        bins share an id. Returns (N,) ids."""
        if scheme not in SCHEMES:
            raise ValueError(f"scheme: unknown {scheme!r}; known: {SCHEMES}")
        n = self.config.n_bins
        texts = [str(i) for i in range(n)] if scheme == "numbers" else \
            [f"[unused{i}]" for i in range(n)]
        ids = []
        unk = getattr(tokenizer, "unk_token_id", None)
        for text in texts:
            if scheme == "numbers":  # what the tokenizer makes of the text
                got = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            else:  # reserved entries are looked up in the vocabulary, not tokenised
                got = [tokenizer.convert_tokens_to_ids(text)]
            if len(got) != 1 or got[0] is None or (unk is not None and got[0] == unk):
                raise ValueError(
                    f"bin {text!r} is not one known token with this tokenizer (got {got}); "
                    f"use fewer bins or another scheme"
                )
            ids.append(got[0])
        if len(set(ids)) != n:
            raise ValueError("token ids of the bins are not distinct")
        self.token_ids = np.asarray(ids, dtype=np.int64)
        self.scheme = scheme
        return self.token_ids

    def to_token_ids(self, x: np.ndarray) -> np.ndarray:
        """(T,) or (T, C) values -> (T, C) vocabulary ids (after ``bind``)."""
        if self.token_ids is None:
            raise RuntimeError("quantizer: call bind(tokenizer) first")
        return self.token_ids[self.transform(x)]

    def to_indices(self, x: np.ndarray) -> np.ndarray:
        """(T,) or (T, C) -> (T, C) indices into a learned (N, d) embedding table."""
        return self.transform(x)

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "edges": None if self.edges is None else self.edges.tolist(),
            "token_ids": None if self.token_ids is None else self.token_ids.tolist(),
            "scheme": self.scheme,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SeriesQuantizer:
        q = cls(QuantizerConfig(**state["config"]))
        if state.get("edges") is not None:
            q.edges = np.asarray(state["edges"], dtype=np.float64).reshape(
                -1, q.config.n_bins - 1)
        if state.get("token_ids") is not None:
            q.token_ids = np.asarray(state["token_ids"], dtype=np.int64)
        q.scheme = state.get("scheme")
        return q

    def save(self, path: str | Path) -> Path:
        """JSON (float64 edges round-trip exactly through repr)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.state_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SeriesQuantizer:
        return cls.from_state_dict(json.loads(Path(path).read_text()))
