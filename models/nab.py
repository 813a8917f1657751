"""Numenta Anomaly Benchmark (NAB) scoring, written from NAB's published rules.

A detector emits one anomaly score per data row; a row *detects* when its score is at or
above a threshold. Per file:

- the probationary period, the first ``min(floor(0.15 * rows), 750)`` rows, is not scored;
- each labelled window counts once: its earliest detection earns
  ``tp * S(-(last - row + 1) / width) / S(-1)`` (``tp`` at the window's first row, less
  further in), a window with no detection costs ``fn``;
- a detection outside every window costs ``fp * S((row - prev_last) / (prev_width - 1))``
  after a window (small right after it, ``fp`` far from it) and ``fp`` before any window,
  where ``S(x) = 2 / (1 + exp(5x)) - 1`` (``-1`` for ``x > 3``) is NAB's scaled sigmoid.

One threshold is chosen for the whole corpus (the one maximising the summed raw score; on a
tie the highest), and the total is normalised as ``100 * (raw - null) / (perfect - null)``
against a never-firing detector (``null = -fn`` per window) and a perfect one (``tp`` per
window). The TP/TN/FP/FN counts are NAB's: rows (not windows) of the scored part.

>>> import numpy as np
>>> f = NabFile("demo.csv", np.arange(200.0), np.zeros(200), windows=[(100, 119)])
>>> hit = np.zeros(200); hit[100] = 0.9  # fires at the window's first row
>>> r = score_corpus({"demo.csv": hit}, [f], "standard")
>>> round(r.score, 2), r.threshold, r.files[0].tp
(100.0, 0.9, 1)
>>> round(score_corpus({"demo.csv": np.zeros(200)}, [f], "standard", threshold=0.5).score, 2)
0.0
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.data import DataNotFound, _dataset_dir, _read_nab_csv, nab_path

WINDOWS_FILE = "combined_windows.json"
PROBATION_FRACTION = 0.15
PROBATION_MAX_ROWS = 750  # NAB caps the probationary period at 15% of 5000 rows
# NAB's "nothing detects" threshold, above every score in [0, 1]
NO_DETECTION_THRESHOLD = 1.1


@dataclass(frozen=True)
class Profile:
    """Weights of a NAB application profile."""

    tp: float
    fp: float
    fn: float


PROFILES: dict[str, Profile] = {
    "standard": Profile(tp=1.0, fp=0.11, fn=1.0),
    "reward_low_FP_rate": Profile(tp=1.0, fp=0.22, fn=1.0),
    "reward_low_FN_rate": Profile(tp=1.0, fp=0.11, fn=2.0),
}


@dataclass
class NabFile:
    """One NAB data file and its labelled windows as inclusive row ranges."""

    key: str  # path relative to the NAB root, e.g. realKnownCause/nyc_taxi.csv
    timestamps: np.ndarray  # (T,) epoch seconds, UTC
    values: np.ndarray  # (T,)
    windows: list[tuple[int, int]]  # (first_row, last_row), inclusive, in time order

    @property
    def probation(self) -> int:
        return probation_length(len(self.timestamps))


@dataclass(frozen=True)
class FileRow:
    """One file's raw score and row counts (scored rows only) at the threshold."""

    key: str
    raw: float
    tp: int
    tn: int
    fp: int
    fn: int


@dataclass(frozen=True)
class NabResult:
    score: float  # normalised: 0 = never fires, 100 = perfect
    threshold: float
    raw: float
    null: float
    perfect: float
    files: list[FileRow]


def probation_length(rows: int) -> int:
    """Rows at the start of a file that NAB does not score."""
    return min(math.floor(PROBATION_FRACTION * rows), PROBATION_MAX_ROWS)


def scaled_sigmoid(x: np.ndarray) -> np.ndarray:
    """NAB's reward curve: ~+1 at x = -1 (window start), 0 at x = 0, -1 beyond x = 3."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * np.minimum(x, 3.0))) - 1.0)


def detection_reward(first: int, last: int, rows: np.ndarray | int,
                     profile: Profile | str = "standard") -> np.ndarray:
    """What a detection at ``rows`` of the window [first, last] (inclusive rows) earns:
    ``tp`` at the window's first row, less further in (NAB's scaled sigmoid).

    >>> [round(float(r), 3) for r in detection_reward(10, 19, np.array([10, 15, 19]))]
    [1.0, 0.86, 0.248]
    """
    p = PROFILES[profile] if isinstance(profile, str) else profile
    width = last - first + 1
    rows = np.asarray(rows, dtype=np.float64)
    return p.tp * scaled_sigmoid(-(last - rows + 1) / width) / float(scaled_sigmoid(-1.0))


def window_rows(timestamps: np.ndarray, limits: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """Inclusive row ranges of windows given as (start, end) epoch seconds.

    NAB matches window limits to rows by exact timestamp, first occurrence (a few NAB files
    repeat timestamps); a limit that is no row's timestamp falls back to the rows inside
    [start, end]. A window holding no row is dropped.
    """
    ts = np.asarray(timestamps, dtype=np.float64)
    out = []
    for start, end in limits:
        inside = np.flatnonzero((ts >= start) & (ts <= end))
        if inside.size == 0:
            continue
        exact_start, exact_end = np.flatnonzero(ts == start), np.flatnonzero(ts == end)
        first = int(exact_start[0]) if exact_start.size else int(inside[0])
        last = int(exact_end[0]) if exact_end.size else int(inside[-1])
        out.append((first, last))
    return out


def _epoch_seconds(stamps: np.ndarray) -> np.ndarray:
    return stamps.astype("datetime64[us]").astype(np.int64) / 1e6


def load_corpus(data_dir: Path, keys: list[str] | None = None) -> list[NabFile]:
    """Every CSV listed in combined_windows.json that exists under ``data_dir`` (or
    ``data_dir/nab``), sorted by key; ``keys`` picks some, each of which must exist."""
    root = _dataset_dir(data_dir, "nab", WINDOWS_FILE)
    limits_by_key = json.loads((root / WINDOWS_FILE).read_text())
    if keys is None:
        keys = [k for k in sorted(limits_by_key) if nab_path(root, k)]
        if not keys:
            raise DataNotFound(f"--data-dir: no CSV listed in {WINDOWS_FILE} under {root}")
    corpus = []
    for key in keys:
        if key not in limits_by_key:
            raise KeyError(f"keys: {key} is not listed in {root / WINDOWS_FILE}")
        if (path := nab_path(root, key)) is None:
            raise DataNotFound(f"keys: {root / key} does not exist")
        stamps, values = _read_nab_csv(path)
        ts = _epoch_seconds(stamps)
        limits = [
            tuple(_epoch_seconds(np.array([a.replace(" ", "T"), b.replace(" ", "T")],
                                          dtype="datetime64[us]")))
            for a, b in limits_by_key[key]
        ]
        corpus.append(NabFile(key, ts, values, window_rows(ts, limits)))
    return corpus


def _row_rewards(f: NabFile, p: Profile) -> tuple[np.ndarray, np.ndarray]:
    """For every row: the window it lies in (-1 outside) and what a detection there is
    worth (TP reward inside a window, FP cost outside)."""
    n = len(f.timestamps)
    window = np.full(n, -1, dtype=np.int64)
    reward = np.empty(n, dtype=np.float64)
    rows = np.arange(n)
    prev_last = -1
    for j, (first, last) in enumerate(f.windows):
        if not 0 <= first <= last < n or first <= prev_last:
            raise ValueError(f"{f.key}: windows must be ordered, disjoint rows in [0, {n})")
        window[first:last + 1] = j
        reward[first:last + 1] = detection_reward(first, last, rows[first:last + 1], p)
        prev_last = last
    outside = window < 0
    lasts = np.array([b for _, b in f.windows], dtype=np.int64)
    widths = np.array([b - a + 1 for a, b in f.windows], dtype=np.float64)
    prev = np.searchsorted(lasts, rows[outside], side="left") - 1  # last window ended before
    cost = np.full(prev.shape, -1.0)
    after = prev >= 0
    with np.errstate(divide="ignore"):
        # after a one-row window the distance is infinite (NAB divides by zero): full cost
        distance = (rows[outside][after] - lasts[prev[after]]) / (widths[prev[after]] - 1)
    cost[after] = scaled_sigmoid(distance)
    reward[outside] = p.fp * cost
    return window, reward


@dataclass
class _Scored:
    """The scored (post-probation) rows of one file."""

    key: str
    scores: np.ndarray
    window: np.ndarray  # file-local window index, -1 outside
    reward: np.ndarray
    windows: int  # windows with at least one scored row


def _prepare(scores: dict[str, np.ndarray], corpus: list[NabFile], p: Profile) -> list[_Scored]:
    out = []
    for f in corpus:
        if f.key not in scores:
            raise KeyError(f"scores: no scores for {f.key}")
        s = np.asarray(scores[f.key], dtype=np.float64)
        if s.shape != (len(f.timestamps),):
            raise ValueError(f"scores[{f.key}]: {s.shape} scores for {len(f.timestamps)} rows")
        if not np.isfinite(s).all():
            raise ValueError(f"scores[{f.key}]: scores must be finite")
        window, reward = _row_rewards(f, p)
        keep = slice(f.probation, None)
        w = window[keep]
        out.append(_Scored(f.key, s[keep], w, reward[keep], np.unique(w[w >= 0]).size))
    return out


def _best_threshold(files: list[_Scored], p: Profile) -> float:
    """Sweep the threshold down through every distinct score of the corpus, updating the
    total raw score one row at a time, and return the best (highest on a tie)."""
    if not files or not sum(f.scores.size for f in files):
        return NO_DETECTION_THRESHOLD
    scores = np.concatenate([f.scores for f in files])
    reward = np.concatenate([f.reward for f in files])
    # windows numbered corpus-wide: file i's window j is i * 2**32 + j
    window = np.concatenate([np.where(f.window >= 0, (i << 32) + f.window, -1)
                             for i, f in enumerate(files)])
    top = float(scores.max())
    no_detection = (NO_DETECTION_THRESHOLD if top < NO_DETECTION_THRESHOLD
                    else float(np.nextafter(top, np.inf)))
    order = np.argsort(-scores, kind="stable")
    s, r, w = scores[order], reward[order], window[order]
    # outside windows every detection adds its cost; inside, a window's value is its best
    # (earliest) detection so far, so a row adds only what it improves on that
    change = np.where(w < 0, r, 0.0)
    inside = np.flatnonzero(w >= 0)
    by_window = inside[np.lexsort((inside, w[inside]))]
    bounds = np.flatnonzero(np.diff(w[by_window])) + 1
    for rows in np.split(by_window, bounds):
        best = np.maximum.accumulate(np.maximum(r[rows], -p.fn))
        change[rows] = np.diff(best, prepend=-p.fn)
    total = np.cumsum(change)  # relative to nothing detected
    cut = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)  # last row of each score
    candidates = np.concatenate([[0.0], total[cut]])
    best = int(np.argmax(candidates))
    return no_detection if best == 0 else float(s[cut[best - 1]])


def _file_row(f: _Scored, threshold: float, p: Profile) -> FileRow:
    hit = f.scores >= threshold
    inside = f.window >= 0
    raw = float(f.reward[hit & ~inside].sum())
    for j in np.unique(f.window[inside]):
        detected = f.reward[hit & (f.window == j)]
        raw += float(detected.max()) if detected.size else -p.fn
    return FileRow(
        key=f.key, raw=raw,
        tp=int((hit & inside).sum()), tn=int((~hit & ~inside).sum()),
        fp=int((hit & ~inside).sum()), fn=int((~hit & inside).sum()),
    )


def score_corpus(scores: dict[str, np.ndarray], corpus: list[NabFile], profile: str,
                 threshold: float | None = None) -> NabResult:
    """NAB score of per-row anomaly scores (``scores[key]``, one per row of each file).

    With ``threshold`` None, the corpus-wide threshold is optimised as NAB does; otherwise
    rows with a score >= ``threshold`` detect.
    """
    if profile not in PROFILES:
        raise KeyError(f"profile: {profile!r} is not one of {sorted(PROFILES)}")
    p = PROFILES[profile]
    files = _prepare(scores, corpus, p)
    if threshold is None:
        threshold = _best_threshold(files, p)
    rows = [_file_row(f, threshold, p) for f in files]
    windows = sum(f.windows for f in files)
    raw = float(sum(r.raw for r in rows))
    null, perfect = -p.fn * windows, p.tp * windows
    score = 100.0 * (raw - null) / (perfect - null) if windows else 0.0
    return NabResult(score=score, threshold=float(threshold), raw=raw, null=null,
                     perfect=perfect, files=rows)


def score_detections(detections: dict[str, np.ndarray], corpus: list[NabFile],
                     profile: str) -> NabResult:
    """NAB score of binary detections (non-zero = the detector fired at that row), e.g. the
    rows where an alert opened; no threshold is optimised."""
    as_scores = {k: (np.asarray(v) != 0).astype(np.float64) for k, v in detections.items()}
    return score_corpus(as_scores, corpus, profile, threshold=0.5)
