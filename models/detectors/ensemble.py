"""Streaming ensemble: verdicts from the stream's own records, ranking from a memory of
its normal windows.

The default detector of the service. A point's score says how it compares with the
stream's own recent history, so it means the same on every stream:

* **above 1: a record.** Two members can break the stream's record:

  * ``range``: the newest value (and its mean over the last ``k`` points, for each ``k``
    in ``range_scales``) lies outside the range the stream held recently. The excess is
    measured in units of that range and counts only beyond ``range_noise_margin`` noise
    standard deviations (the noise from the typical step between points, over sqrt(k)):
    stationary noise sets new extremes by a fraction of its spread all the time, a spike
    or a change of level does not. The range is *robust*: the ``range_rank``-th most
    extreme block of the history sets it, so one wild value is flagged once and does not
    widen what "normal" means for the thousands of points after it.
  * ``level``: Euclidean distance of the newest window to the nearest window of the
    stream's recent past, in units of the stream's range: a pattern at a level the stream
    never showed it at (a flat line mid-range, a daily peak that stays low). It breaks a
    record when the distance beats the largest of the recent history by
    ``distance_margin``. It compares a window with the stream's own recent past, so it
    speaks only for windows that continue the stream it learnt (``_continues``).

  A record's score is ``1 + ln(ratio)``: 1 at the record line, 2 for a record 2.7 times
  the line; a record is a verdict (``record_threshold`` = 1).
* **below 1: the ranking.** ``memory``: the cosine distance of the newest window,
  shape-normalised as ``raw_knn`` does (integers 1..100 over the window's own range), to
  the nearest window of the stream's recent past, as a multiple ``q`` of the stream's
  typical such distance, squashed to ``q / (1 + q)`` (0.5 = typical). The typical
  distance is measured once, when the warm-up ends (offline, at the end of ``fit``), as
  ``raw_knn`` calibrates: a scale that moved with each block graded the first scored
  points against the warm-up's few blocks and later ones against more, and the
  likelihood, which ranks a point among the stream's earlier scores, read ordinary points
  high while it settled. The grade is therefore no calibrated scale: as the memory fills
  after the warm-up its distances shrink below that typical one (on NAB the files'
  ordinary points grade 0.34 in the median, nyc_taxi's 0.06); the likelihood is. It
  orders the stream's ordinary moments for ranking and likelihood and never raises a
  verdict. It grades what is new at the window's end: an earlier value of the window
  that broke the stream's range was reported when it came, so it is replaced by the line
  between its neighbours (a spike does not rank the W - 1 windows that still hold it as
  novel).

Both memories are the stream's last ``memory_points`` raw values: every window inside
them is a remembered window (a univariate stream's memory costs 8 bytes a point, under
the ``memory<k>/`` keys of the state, one chunk of rows each: the service keeps each in
a section of its own, so a chunk rewrites the one its points entered).
``memory_learns`` says whether windows judged anomalous stay out of them. Their
nearest-window searches (``window_search``) are exact. The records'
history is kept as per-block statistics (one block per ``partial_fit`` call: the
service's 64-point chunk), so it forgets after ``history_blocks`` blocks.

Every window is offered (``learns_from_anomalies``): a persistent new level is reported
when it appears and becomes the new normal afterwards; the alert tracker turns the first
records of an incident into one alert.

>>> import numpy as np
>>> t = np.arange(3000.0)
>>> series = np.sin(t / 10.0)[:, None]
>>> det = Ensemble(window=32).fit(series[:2000])
>>> windows = sliding_windows(series[2000:2100], 32)
>>> spiked = windows.copy(); spiked[:, -1, 0] += 3.0
>>> bool(det.score(spiked).min() > 1.0 > det.score(windows).max())
True
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.detectors.base import DetectorConfig, Online, Records, as_windows, sliding_windows
from models.detectors.raw_knn import scale_windows
from models.detectors.window_search import CosineMemory, SquaredMemory, unit_inverse, unit_shapes
from models.slices import sliced, unsliced

MEMBERS = ("range", "level", "memory")
RECORD_MEMBERS = ("range", "level")  # the others only rank
RECORD_FLOOR = 1e-3  # smallest record a distance is divided by
MIN_RECORD_BLOCKS = 4  # blocks of a member's history before it can set a record
RANK_CAP = 1.0 - 1e-9  # the ranking stays under the record line
MEMORY_SLICE = 64  # rows per stored slice of the memory's ring (the service's chunk)
# bytes per stored slice of the block history, at most (but one block): a univariate
# stream's history, 3.6 KB, is one slice; MSL's 55 channels' (3 KB a block) one per block
HISTORY_SLICE_BYTES = 4096
# E|x_t - x_t-1| = 2 sigma / sqrt(pi) for Gaussian noise
SIGMA_PER_STEP = np.sqrt(np.pi) / 2.0


@functools.cache
def _probe(size: int) -> np.ndarray:
    """(size, 2) fixed random directions that fingerprint windows of ``size`` values."""
    return np.random.default_rng(size).standard_normal((size, 2))


@dataclass(frozen=True)
class EnsembleConfig(DetectorConfig):
    window: int = 64
    aggregate: str = "max"  # one channel breaking its record is enough
    members: tuple[str, ...] = MEMBERS
    # Choices on NAB were made on its even-numbered files (half A) and checked on the odd
    # ones (benchmarks/results/nab.md has every ablation on both halves); nothing was
    # chosen on MSL's test labels (the memory's grade was chosen on MSL training splits
    # with injected anomalies).
    # the range at the value itself and at its mean over 16 points (16: the best of 4, 8,
    # 16, 32 on half A)
    range_scales: tuple[int, ...] = (1, 16)
    # the k-th most extreme block sets the range (1: the extreme itself): 2 on half A
    range_rank: int = 2
    # noise standard deviations a record must clear: set by the false-alert target (under
    # one warning a week on stationary noise: 1.0 gave 1.5, 1.5 gives 0.26;
    # benchmarks/results/false_alerts.md), not by NAB (half A preferred 0.5)
    range_noise_margin: float = 1.5
    # a value beyond the range by this many ranges stays out of it (flagged once, it does
    # not blind the stream for the history's length); a wilder block than half its
    # points is a new level and joins it. 10: far beyond any spike NAB calls normal
    wild_spans: float = 10.0
    # a level record beats the recent record by this share: 0.1 of 0, 0.1, 0.25 on half A
    distance_margin: float = 0.1
    # raw values remembered per channel (level and memory): 2,048 of 1,024, 2,048, 4,096
    # on half A
    memory_points: int = 2048
    # normal | all: which windows the memories keep (the same on NAB; normal keeps a
    # wild value's windows out of the memory)
    memory_learns: str = "normal"
    history_blocks: int = 64  # blocks of record history (one block per partial_fit call)
    block: int = 64  # fit(): points per history block (the service's chunk)
    # online: points learnt before the first score; offline, the records start after it
    warmup: int = 256
    min_std: float = 1e-6  # floor on a range's width, relative to its level

    def __post_init__(self) -> None:
        unknown = set(self.members) - set(MEMBERS)
        if not self.members or unknown:
            raise ValueError(f"members: expected a non-empty subset of {MEMBERS}, got "
                             f"{list(self.members)}")
        object.__setattr__(self, "members", tuple(self.members))  # JSON gives a list
        object.__setattr__(self, "range_scales", tuple(self.range_scales))
        if not self.range_scales or min(self.range_scales) < 1:
            raise ValueError(f"range_scales: positive point counts, got "
                             f"{list(self.range_scales)}")
        if self.range_rank < 1:
            raise ValueError(f"range_rank: must be >= 1, got {self.range_rank}")
        if self.memory_learns not in ("normal", "all"):
            raise ValueError(f"memory_learns: normal | all, got {self.memory_learns!r}")
        if self.memory_points <= self.window:
            raise ValueError(f"memory_points: need more than window={self.window}")


class Ensemble(Online, Records):
    name = "ensemble"
    Config = EnsembleConfig
    learns_from_anomalies = True
    # any record beyond the noise margin is a verdict: the best of 1.0, 1.005 and 1.01 on
    # one half of NAB, checked on the other (benchmarks/results/nab.md); the noise margin,
    # not this cut, keeps stationary noise quiet
    record_threshold = 1.0

    # --- state -------------------------------------------------------------------------
    def _init_state(self, channels: int) -> None:
        cfg = self.config
        blocks, scales = cfg.history_blocks, len(self._scales(cfg.window))
        self._n = np.zeros(1)  # points learnt
        self._blocks = np.zeros(1)  # blocks written (ring index = count % size)
        # per block: extremes of the values at every scale (blocks, K, C), the mean
        # absolute step (blocks, C), the level member's largest distance and the memory
        # member's median distance (blocks, C); NaN = not recorded
        self._lo = np.full((blocks, scales, channels), np.nan)
        self._hi = np.full((blocks, scales, channels), np.nan)
        self._step = np.full((blocks, channels), np.nan)
        self._level_top = np.full((blocks, channels), np.nan)
        self._memory_mid = np.full((blocks, channels), np.nan)
        # the memory member's typical distance, measured once (NaN = not yet: _settle)
        self._typical_at = np.full(channels, np.nan)
        # the last memory_points raw values (oldest first; NaN = not yet seen) and, per
        # position, whether the window ending there is remembered
        size = cfg.memory_points if {"level", "memory"} & set(cfg.members) else 0
        self._ring = np.full((size, channels), np.nan)
        self._keep = np.zeros(size, dtype=np.uint8)
        # fingerprints and raw surprises of the windows scored since the last block
        self._scored = (np.zeros((0, 2), np.int64), np.zeros((0, len(cfg.members), channels)))
        self._shapes: dict = {}  # derived from the ring, see _memory_shapes
        self._level_prep: dict = {}  # derived from the ring, see _level_memories
        self._memo: dict[str, tuple] = {}  # derived from the block history, see _derived

    # state keys -> attributes: the counts and the memory member's typical distance, and
    # the block history (a ring of blocks: a block's statistics sit at row blocks mod
    # history_blocks)
    _COUNTS = {"n": "_n", "blocks": "_blocks", "typical": "_typical_at"}
    _HISTORY = {"lo": "_lo", "hi": "_hi", "step": "_step", "level_top": "_level_top",
                "memory_mid": "_memory_mid"}
    # keys a state written before them may lack: rebuilt from the rest (_settle)
    _LATER = frozenset({"typical"})

    def state_dict(self) -> dict[str, np.ndarray]:
        """The counts, the block history in slices of a few blocks (``_history_slice``:
        ``"history<k>/lo"``, ...) and the memory as a circular buffer in slices of
        MEMORY_SLICE rows (``"memory<k>/ring"``, ``"memory<k>/keep"``: the value that
        entered the ring t-th sits at row t mod its size, ``_ring_turn``). A store that
        keeps ``part/name`` keys apart (service/stream_state.py) then rewrites at a
        block's end the slices its statistics and its new values entered (one of each,
        for the service's 64-point chunk), not the whole of them: MSL's 55 channels keep
        a 197 KB history and a 901 KB memory.

        >>> det = Ensemble(window=8, memory_points=200, warmup=16).fit(np.ones((64, 2)))
        >>> sorted(k for k in det.state_dict() if not k.startswith("history"))[:5]
        ['blocks', 'memory0/keep', 'memory0/ring', 'memory1/keep', 'memory1/ring']
        """
        if not hasattr(self, "_n"):
            return {}
        state = {k: getattr(self, attr).copy() for k, attr in self._COUNTS.items()}
        history = {k: getattr(self, attr) for k, attr in self._HISTORY.items()}
        state |= sliced("history", self._history_slice(), **history)
        turn = self._ring_turn()
        return state | sliced("memory", MEMORY_SLICE, ring=np.roll(self._ring, turn, axis=0),
                              keep=np.roll(self._keep, turn))

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """The state as ``state_dict`` gives it, or as versions before the slices wrote
        it (each array whole, the ring oldest first)."""
        if not state or not set(self._COUNTS) - self._LATER <= set(state):  # nothing learnt
            return
        whole = "lo" in state  # the block history written whole
        history = {k: state[k] if whole else unsliced(state, "history", k)
                   for k in self._HISTORY}
        if any(v is None for v in history.values()):  # another layout
            return
        if "memory/ring" in state:  # written whole, oldest first
            ring, keep = state["memory/ring"], state["memory/keep"]
        else:
            ring, keep = unsliced(state, "memory", "ring"), unsliced(state, "memory", "keep")
        channels = np.asarray(history["lo"]).shape[2]
        self._init_state(channels)
        for key, attr in (self._COUNTS | self._HISTORY).items():
            if key in history or key in state:
                setattr(self, attr, np.asarray(history.get(key, state.get(key)),
                                               dtype=np.float64).copy())
        if ring is None:  # a detector without memories
            ring, keep = np.zeros((0, channels)), np.zeros(0)
        self._ring = np.asarray(ring, dtype=np.float64)
        self._keep = np.asarray(keep, dtype=np.uint8)
        turn = self._ring_turn() if "memory/ring" not in state else 0
        self._ring = np.roll(self._ring, -turn, axis=0)  # copies: the state is not held
        self._keep = np.roll(self._keep, -turn)
        if "typical" not in state and self.is_fitted:  # a stream from before the key
            self._settle()

    def _history_slice(self) -> int:
        """Blocks per stored slice of the history: a power of two, the most that keep a
        slice within HISTORY_SLICE_BYTES (slices then split the ring of blocks evenly)."""
        per_block = 8 * sum(getattr(self, attr)[0].size for attr in self._HISTORY.values())
        blocks = max(1, min(HISTORY_SLICE_BYTES // per_block, len(self._lo)))
        return 1 << (blocks.bit_length() - 1)

    def _ring_turn(self) -> int:
        """Where the stored ring's oldest value sits: the count of values the ring took
        (its first window brings W - 1 values before its own), mod the ring's size."""
        size = len(self._ring)
        return (int(self._n[0]) + self.config.window - 1) % size if size else 0

    @property
    def is_fitted(self) -> bool:
        if not hasattr(self, "_n"):
            return False
        ready = self._n[0] >= self.config.warmup and self._blocks[0] > 0
        return bool(ready and (not len(self._ring) or self._memory_size() > 0))

    @property
    def windows_to_fit(self) -> int | None:
        if self.is_fitted:
            return 0
        return max(self.config.warmup - int(getattr(self, "_n", np.zeros(1))[0]), 1)

    # --- learning ----------------------------------------------------------------------
    def _fit(self, train: np.ndarray) -> None:
        self._init_state(train.shape[1])
        windows = sliding_windows(train, self.config.window)
        for lo in range(0, len(windows), self.config.block):
            self._learn(windows[lo:lo + self.config.block])
        self._typical_at[:] = np.nan  # measured on the whole training split, not its start
        self._settle()

    def partial_fit(self, windows: np.ndarray, stamps: np.ndarray | None = None) -> Ensemble:
        """Learn from windows (B, W, C), oldest first, each adding its newest point; one
        call is one block of record history (``stamps`` unused: no precedents)."""
        windows = as_windows(windows, self.config.window)
        if not hasattr(self, "_n"):
            self._init_state(windows.shape[2])
        if len(windows):
            self._learn(windows)
        return self

    def _learn(self, windows: np.ndarray) -> None:
        cfg = self.config
        fitted = self.is_fitted
        # (B, M, C) surprises before learning this block; during the warm-up the history
        # is a few points, and its surprises set no record and judge no window. The
        # memory's typical distance is measured from its first windows on, so the first
        # scored points are graded against it (not against nothing)
        raw = self._recall_raw(windows) if fitted else None
        early = None
        if not fitted and self._blocks[0] > 0 and len(self._ring) and self._memory_size():
            early = self._raw(windows)
        slot = int(self._blocks[0]) % cfg.history_blocks
        smoothed = self._newest_smoothed(windows)  # (B, K, C)
        # a wild value (beyond the range by wild_spans ranges) is flagged and kept out of
        # what the block says is normal, unless most of the block is that wild (a new
        # level: it becomes normal after one block, as any level does); the windows that
        # still hold it stay out of the memories' records too (else the level member's
        # record would be the wild value's distance for the history's length)
        wild = held = np.zeros(windows.shape[::2], dtype=bool)  # (B, C)
        if raw is not None and "range" in cfg.members:
            wild = raw[:, cfg.members.index("range")] > cfg.wild_spans
            new_level = wild.sum(axis=0) > len(windows) // 2
            wild &= ~new_level
            held = self._holds_wild(windows) & ~new_level
        kept = np.where(wild[:, None], np.nan, smoothed)
        # fmin/fmax skip NaN: a channel with every window wild reads NaN, with no warning
        self._lo[slot], self._hi[slot] = np.fmin.reduce(kept), np.fmax.reduce(kept)
        steps = np.where(wild, np.nan, np.abs(windows[:, -1] - windows[:, -2]))
        self._step[slot] = np.nanmean(steps, axis=0)
        for member, ring, stat, seen in (("level", self._level_top, np.fmax.reduce, raw),
                                         ("memory", self._memory_mid, _nanmedian,
                                          raw if raw is not None else early)):
            if member in cfg.members:
                m = cfg.members.index(member)
                ring[slot] = (stat(np.where(wild | held, np.nan, seen[:, m]), axis=0)
                              if seen is not None else np.nan)
        self._memo = {}  # the block history moved
        normal = (np.ones(len(windows), dtype=bool) if raw is None else
                  self._combine(raw).max(axis=1) <= self.record_threshold)
        self._n += len(windows)
        self._blocks += 1
        self._memo = {}
        self._scored = (self._scored[0][:0], self._scored[1][:0])  # stale now: forget
        if self.is_fitted:
            self._settle()
        if len(self._ring):
            self._remember(windows, normal if cfg.memory_learns == "normal" else None)

    def _remember(self, windows: np.ndarray, normal: np.ndarray | None) -> None:
        """Append the windows' newest values to the ring (the first window brings its
        whole past) and mark which windows the memories keep (None: all)."""
        w = windows.shape[1]
        newest = windows[:, -1, :]
        keep = np.ones(len(windows), dtype=bool) if normal is None else normal
        fresh = np.isnan(self._ring[-1]).all()
        if fresh:  # an empty ring starts with the first window
            newest = np.concatenate([windows[0, :-1], newest])
            keep = np.concatenate([np.zeros(w - 1, dtype=bool), keep])
        self._ring = _shift_in(self._ring, newest)
        self._keep = _shift_in(self._keep, keep.astype(np.uint8))
        shapes = self._shapes
        if shapes and not fresh and len(newest) < len(shapes["norms"][0]):
            # the oldest windows leave the ring, the new ones take their slots: read from
            # the ring exactly as a rebuild after a load would
            n, total = len(newest), len(shapes["norms"][0])
            slots = (shapes["head"] + np.arange(n)) % total
            scaled = scale_windows(sliding_windows(self._ring, w)[-n:]).transpose(1, 0, 2)
            if not keep.all():  # a window the memories do not keep: an empty slot
                scaled = scaled * keep[None, :, None]
            shapes["shapes"][:, slots] = scaled
            shapes["norms"][:, slots] = norms = _norms(scaled)
            start = int(slots[0])  # as at most two slices: a fancy index along the last
            first = min(n, total - start)  # axis writes element by element (30x slower)
            for c, unit_t in enumerate(shapes["unit_t"]):
                if unit_t is not None:
                    unit = unit_shapes(shapes["shapes"][c, slots], unit_inverse(norms[c])).T
                    unit_t[:, start:start + first] = unit[:, :first]
                    unit_t[:, :n - first] = unit[:, first:]
            shapes["head"] = int(slots[-1] + 1) % total
        else:
            self._shapes = {}
        if self._level_prep and not fresh:  # the level memories follow the ring
            self._level_prep["shift"] += len(newest)
        else:
            self._level_prep = {}

    # --- scoring -----------------------------------------------------------------------
    def _scales(self, window: int) -> list[int]:
        return sorted({min(k, window - 1) for k in self.config.range_scales})

    def _raw(self, windows: np.ndarray) -> np.ndarray:
        """Each member's raw surprise of the newest point: (B, M, C)."""
        members = {"range": self._range_excess, "level": self._level_distance,
                   "memory": self._memory_distance}
        return np.stack([members[m](windows) for m in self.config.members], axis=1)

    def _smoothed(self, windows: np.ndarray) -> np.ndarray:
        """(B, W, C) -> (B, K, W', C): the mean of the last k points at every position
        of the window where k points are there, for each scale k (W' = W - max(k) + 1)."""
        b, w, c = windows.shape
        ks = self._scales(w)
        tail = w - max(ks) + 1  # positions every scale can fill
        csum = _cumsum(windows)
        out = np.empty((b, len(ks), tail, c), csum.dtype)
        for i, k in enumerate(ks):  # the differences of cumulative sums k apart
            np.subtract(csum[:, w + 1 - tail:], csum[:, w + 1 - tail - k:w + 1 - k],
                        out=out[:, i])
            if k > 1:  # x / 1 is x, to the bit
                out[:, i] /= k
        return out

    def _newest_smoothed(self, windows: np.ndarray) -> np.ndarray:
        """``_smoothed(windows)[:, :, -1]`` (B, K, C), the newest position alone."""
        csum, w = _cumsum(windows), windows.shape[1]
        return np.stack([(csum[:, w] - csum[:, w - k]) / k for k in self._scales(w)], axis=1)

    def _filled(self) -> int:
        return min(int(self._blocks[0]), self.config.history_blocks)

    def _derived(self, key: str, compute: Callable[[], tuple]) -> tuple:
        """What the block history and the memories say (the range, the noise, the
        records, the searches' prepared memories), computed once per block: scoring one
        window at a time asks for it at every window."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        """(K, C) low and high ends of the history's range at each scale: the
        ``range_rank``-th most extreme block (with fewer blocks, the least extreme)."""
        def compute() -> tuple[np.ndarray, np.ndarray]:
            filled = self._filled()
            rank = min(self.config.range_rank, filled) - 1
            return (np.partition(self._lo[:filled], rank, axis=0)[rank],
                    -np.partition(-self._hi[:filled], rank, axis=0)[rank])
        return self._derived("range", compute)

    def _range_excess(self, windows: np.ndarray) -> np.ndarray:
        """(B, C): how far the newest value (or its mean over the last k points) lies
        outside the range of the recent history at that scale, beyond the noise margin,
        in units of that range; the largest over scales. The window's own earlier points
        count as history too: learning lags by up to a chunk, the window does not."""
        cfg = self.config
        sm = self._smoothed(windows)  # (B, K, W', C)
        x, own = sm[:, :, -1], sm[:, :, :-1]
        lo_h, hi_h = self._range()
        lo, hi = np.minimum(lo_h, own.min(axis=2)), np.maximum(hi_h, own.max(axis=2))
        floor = cfg.min_std * np.maximum(np.maximum(np.abs(lo), np.abs(hi)), 1.0)
        span = np.maximum(hi - lo, floor)
        excess = np.maximum(np.maximum(x - hi, lo - x), 0.0)  # (B, K, C)
        if cfg.range_noise_margin > 0:
            sigma = self._sigma()
            ks = np.asarray(self._scales(windows.shape[1]), dtype=np.float64)
            margin = cfg.range_noise_margin * sigma[None, :] / np.sqrt(ks)[:, None]
            excess = np.where(excess > margin, excess, 0.0)
        return (excess / span).max(axis=1)

    def _reported_removed(self, windows: np.ndarray) -> np.ndarray:
        """(B, W, C) the windows as the memory member grades them: an earlier value that
        breaks the history's range by more than the noise margin (the range member's
        record test at the value itself) was reported when it was the newest, so it is
        replaced by the straight line between its neighbours that do not. The newest
        value stays: the ranking says what is new at the window's end, and a spike does
        not keep reading as novel for the W - 1 windows that still hold it."""
        if "range" not in self.config.members or not self.is_fitted:
            return windows  # in the warm-up the range member reports nothing
        lo, hi = (end[0] for end in self._range())  # (C,) at the value itself
        margin = self.config.range_noise_margin * self._sigma()
        broke = (windows > hi + margin) | (windows < lo - margin)  # NaN ends break nothing
        broke[:, -1] = False
        rows = np.flatnonzero(broke.any(axis=(1, 2)))
        if not len(rows):
            return windows
        # the channels where a value broke (one or two of a wide stream's): each channel's
        # values are filled from its own alone
        cols = np.flatnonzero(broke[rows].any(axis=(0, 1)))
        w = windows.shape[1]
        at = np.arange(w)[None, :, None]
        where = (rows[:, None, None], at, cols[None, None, :])
        sub, bad = windows[where], broke[where]  # (R, W, C')
        # the nearest unbroken positions before and after (the newest never breaks)
        before = np.maximum.accumulate(np.where(bad, -1, at), axis=1)
        after = np.minimum.accumulate(np.where(bad, w, at)[:, ::-1], axis=1)[:, ::-1]
        v_after = np.take_along_axis(sub, after, axis=1)
        v_before = np.take_along_axis(sub, np.maximum(before, 0), axis=1)
        share = np.where(before >= 0, (at - before) / np.maximum(after - before, 1), 1.0)
        out = windows.copy()
        out[where] = np.where(bad, v_before + share * (v_after - v_before), sub)
        return out

    def _sigma(self) -> np.ndarray:
        """(C,) the noise standard deviation, from the typical step between points."""
        return self._derived("sigma", lambda: (
            SIGMA_PER_STEP * _nanmedian(self._step[:self._filled()], axis=0),))[0]

    def _holds_wild(self, windows: np.ndarray) -> np.ndarray:
        """(B, C): whether any value of the window lies beyond the history's range (at
        the value itself) by more than ``wild_spans`` ranges."""
        lo, hi = (end[0] for end in self._range())
        span = np.maximum(hi - lo, self.config.min_std * np.maximum(
            np.maximum(np.abs(lo), np.abs(hi)), 1.0))
        # the farthest value of each window is the window's max or min: rounding keeps
        # x - hi, lo - x and the division by span monotone, so testing those two is
        # testing every value
        top, bottom = windows.max(axis=1), windows.min(axis=1)  # (B, C)
        beyond = np.maximum(np.maximum(top - hi, lo - bottom), 0.0) / span
        return beyond > self.config.wild_spans

    # the memories: the windows inside the ring whose end is marked
    def _memory_size(self) -> int:
        """Windows the memories hold."""
        return int(self._keep[self.config.window - 1:].sum())

    def _memory_shapes(self) -> tuple[np.ndarray, np.ndarray]:
        """The memory member's remembered windows as shapes (integers 1..100 in uint8;
        zeros in a slot whose window is not kept), (C, N, W), and their norms (C, N); N =
        ring - window + 1 windows lie inside the ring. Slots are circular: built from the
        ring after a load (slot i = the window ending at ring position window - 1 + i),
        then each new window takes the slot of the oldest (``_remember``). Only the
        nearest similarity is read, so the slots' order does not matter."""
        if not self._shapes:
            w = self.config.window
            total, channels = len(self._ring) - w + 1, self._ring.shape[1]
            shapes = np.zeros((channels, total, w), np.uint8)
            ends = np.flatnonzero(self._keep[w - 1:])
            ends = ends[~np.isnan(self._ring[ends]).any(axis=1)]
            if len(ends):
                wins = sliding_windows(self._ring, w)[ends]  # (N', W, C)
                shapes[:, ends] = scale_windows(wins).transpose(1, 0, 2)
            # unit_t: per channel, the float32 search's unit-scaled shapes (W, N), kept
            # slot by slot where the channel's memory is searched whole (None: not yet,
            # or searched as its few distinct shapes, see _cosine_memories)
            self._shapes = {"shapes": shapes, "norms": _norms(shapes),
                            "unit_t": [None] * channels, "head": 0}
        return self._shapes["shapes"], self._shapes["norms"]

    def _cosine_memories(self) -> tuple[CosineMemory, ...]:
        """Each channel's ``CosineMemory`` of its remembered shapes. A memory searched
        whole keeps its unit-scaled shapes (``unit_t``) from block to block, where
        ``_remember`` updates them slot by slot; one searched as a few distinct shapes
        (``distinct_rows``) keeps none."""
        shapes, norms = self._memory_shapes()
        units = self._shapes["unit_t"]
        memories = []
        for c, unit_t in enumerate(units):
            memory = CosineMemory(shapes[c], norms[c], unit_t)
            units[c] = None if memory.distinct else memory.unit_t
            memories.append(memory)
        return tuple(memories)

    def _memory_distance(self, windows: np.ndarray) -> np.ndarray:
        """(B, C): cosine distance of each channel window's shape to the nearest
        remembered one (``CosineMemory``); an empty slot, all zeros, is never the
        nearest."""
        memories = self._derived("memory_search", self._cosine_memories)
        # (C, B, W): each channel's queries contiguous, as the search reads them
        q = scale_windows(self._reported_removed(windows)).transpose(1, 0, 2).astype(
            np.float32, order="C")
        q_norms = _norms(q)  # (C, B)
        out = np.empty((windows.shape[2], len(windows)))
        for c, memory in enumerate(memories):
            out[c] = memory.nearest(q[c], q_norms[c])
        return np.clip(1.0 - out.T, 0.0, 2.0)

    def _level_distance(self, windows: np.ndarray) -> np.ndarray:
        """(B, C): Euclidean distance of each channel window to the nearest remembered
        raw window (read from the ring; ``SquaredMemory``), per point, in units of the
        stream's range; 0 for a window that does not continue the learnt stream."""
        w = self.config.window
        kept = np.flatnonzero(self._keep[w - 1:])  # windows by their start in the ring
        out = np.zeros((len(windows), windows.shape[2]))
        if not len(kept):
            return out
        attached = self._continues(windows)
        if not attached.any():
            return out
        lo, hi = self._range()
        refs = (hi[0] + lo[0]) / 2.0  # (C,) each channel's windows centred on its range
        memories = self._derived("level_search", lambda: self._level_memories(refs, kept))
        # (C, B', W): each channel's queries contiguous, centred as its memory
        queries = np.subtract(windows[attached].transpose(2, 0, 1), refs[:, None, None],
                              order="C")
        d2 = np.empty(queries.shape[:2])
        for c, memory in enumerate(memories):
            d2[c] = memory.nearest(queries[c])
        span = np.maximum(hi[0] - lo[0], 1e-12)
        out[attached] = (np.sqrt(np.maximum(d2, 0.0) / w) / span[:, None]).T
        return out

    def _level_memories(self, refs: np.ndarray, kept: np.ndarray) -> tuple[SquaredMemory, ...]:
        """Each channel's ``SquaredMemory`` of the ring centred on ``refs`` (C,): the last
        block's, moved on by the values the ring took since (``follow``: only the new
        windows' rows are computed), where the channel's centre is the same to the bit;
        else built whole."""
        w, prep = self.config.window, self._level_prep
        same = (prep["refs"].view(np.uint64) == refs.view(np.uint64) if prep
                else np.zeros(len(refs), dtype=bool))
        memories = tuple(
            prep["memories"][c].follow(self._ring[:, c] - refs[c], kept, prep["shift"])
            if same[c] else SquaredMemory(self._ring[:, c] - refs[c], kept, w)
            for c in range(len(refs)))
        self._level_prep = {"refs": refs.copy(), "shift": 0, "memories": memories}
        return memories

    def _continues(self, windows: np.ndarray) -> np.ndarray:
        """(B,) whether each window continues the stream this detector learnt: its
        first points are the ring's last ones (it ends 1..W-1 points after them). Novelty
        against the stream's recent past means nothing for a window whose recent past is
        not that stream's (a model fitted on one split, scoring another)."""
        w = windows.shape[1]
        tail = self._ring[-(w - 1):]  # (W - 1, C)
        out = np.zeros(len(windows), dtype=bool)
        if np.isnan(tail).any():
            return out
        todo = np.arange(len(windows))
        if (len(windows) > 1 and (windows[0, :-1] == tail).all()
                and (windows[1:, :-1] == windows[:-1, 1:]).all()):
            # the scoring loop's case: consecutive windows, the first one point after the
            # tail, so the first W - 1 of them overlap it by W - 1 .. 1 points
            out[:w - 1] = True
            todo = todo[w - 1:]
        # an overlap of k points starts at tail position w - 1 - k: the window's first
        # value must equal the tail's there; each such candidate is then checked whole
        rows, starts = np.nonzero((windows[todo, :1] == tail[None]).all(axis=2))
        rows = todo[rows]
        if not len(rows):
            return out
        padded = np.concatenate([tail, np.full_like(tail, np.nan)])  # (2W - 2, C)
        shifted = sliding_windows(padded, w - 1)[starts]  # (K, W - 1, C): tail from start
        beyond = np.arange(w - 1)[None, :] >= (w - 1 - starts)[:, None]  # past the tail
        same = (windows[rows, :w - 1] == shifted).all(axis=2) | beyond
        out[rows[same.all(axis=1)]] = True
        return out

    # Online, every window is scored and then learnt with the same state (learning comes
    # at block ends): the raw surprise computed to score it is remembered, by the window's
    # values, until the next block is learnt, so learning does not compute it again.
    @staticmethod
    def _keys(windows: np.ndarray) -> np.ndarray:
        """A fingerprint per window, (B, 2) int64: the bits of two random projections of
        its values (a collision needs two different windows equal on both; a float that
        rounds differently only costs a recomputation)."""
        flat = windows.reshape(len(windows), -1)
        return np.ascontiguousarray(flat @ _probe(flat.shape[1])).view(np.int64)

    def _remember_raw(self, windows: np.ndarray, raw: np.ndarray) -> None:
        keys, raws = self._scored  # made by _init_state, which every fitted detector ran
        keep = 4 * self.config.block  # offline scoring never learns: bound it
        self._scored = (np.concatenate([keys, self._keys(windows)])[-keep:],
                        np.concatenate([raws, raw])[-keep:])

    def _recall_raw(self, windows: np.ndarray) -> np.ndarray:
        keys, raws = self._scored
        if not len(keys) or raws.shape[1:] != (len(self.config.members), windows.shape[2]):
            return self._raw(windows)
        new = self._keys(windows)
        match = ((new[:, None, 0] == keys[None, :, 0])  # both words equal (cheaper than a
                 & (new[:, None, 1] == keys[None, :, 1]))  # reduction over pairs)
        known = match.any(axis=1)
        if not known.any():
            return self._raw(windows)
        # the latest entry of a window scored more than once, as a dict would keep
        latest = len(keys) - 1 - match[:, ::-1].argmax(axis=1)
        out = np.empty((len(windows), len(self.config.members), windows.shape[2]))
        out[known] = raws[latest[known]]
        if not known.all():
            out[~known] = self._raw(windows[~known])
        return out

    def _combine(self, raw: np.ndarray) -> np.ndarray:
        """(B, M, C) raw surprises -> (B, C) scores: the largest record ratio where a
        record member breaks its record (as 1 + ln ratio), else the memory's grade."""
        cfg = self.config
        record = np.zeros(raw.shape[::2])
        rank = np.zeros(raw.shape[::2])
        for m, member in enumerate(cfg.members):
            if member == "range":  # outside the range is a record by construction
                record = np.maximum(record, np.where(raw[:, m] > 0, 1.0 + raw[:, m], 0.0))
            elif member == "level":
                top, = self._derived("level", self._level_record)
                if top is not None:  # else no record to break yet
                    record = np.maximum(record, raw[:, m] / (top * (1 + cfg.distance_margin)))
            else:  # memory: multiples q of the stream's typical distance, q / (1 + q)
                typical, = self._derived("typical", lambda: (self._typical(raw.shape[2]),))
                q = raw[:, m] / np.maximum(typical, RECORD_FLOOR)
                rank = np.minimum(q / (1.0 + q), RANK_CAP)
        return np.where(record >= 1.0, 1.0 + np.log(np.maximum(record, 1.0)), rank)

    def _level_record(self) -> tuple[np.ndarray | None]:
        """The level member's record: the largest distance of the recent blocks (None
        before MIN_RECORD_BLOCKS of them)."""
        tops = self._level_top[~np.isnan(self._level_top[:, 0])]
        if len(tops) < MIN_RECORD_BLOCKS:
            return (None,)
        return (np.maximum(tops.max(axis=0), RECORD_FLOOR),)

    def _typical(self, channels: int) -> np.ndarray:
        """The memory member's typical distance: measured once (``_settle``), else (no
        block measured yet) the median of the blocks' medians."""
        if not np.isnan(self._typical_at).any():
            return self._typical_at
        return self._blocks_typical(channels)

    def _blocks_typical(self, channels: int) -> np.ndarray:
        """The median of the recorded blocks' median distances (0 before any)."""
        mids = self._memory_mid[~np.isnan(self._memory_mid[:, 0])]
        return np.median(mids, axis=0) if len(mids) else np.zeros(channels)

    def _settle(self) -> None:
        """Measure the typical distance once: when the warm-up ends (``_learn``), at the
        end of ``fit``, or on loading a state from before it was kept. It stays fixed:
        the likelihood ranks each score among the stream's earlier ones, so a scale that
        moved under them would rank points by when they came (the first scored points,
        graded against the warm-up's few blocks, read lower than the later ones)."""
        if np.isnan(self._typical_at).any() and not np.isnan(self._memory_mid[:, 0]).all():
            self._typical_at = self._blocks_typical(len(self._typical_at))

    def _channel_scores(self, windows: np.ndarray) -> np.ndarray:
        windows = np.ascontiguousarray(windows, dtype=np.float64)
        raw = self._raw(windows)  # (B, M, C)
        self._remember_raw(windows, raw)
        return self._combine(raw)


def _nanmedian(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """``np.nanmedian(x, axis=0)`` of a 2-D array to the last bit (the mean of the two
    middle values, or the middle one added to itself and halved; NaN for a column with
    no value), without the masked arrays numpy uses for small inputs.

    >>> _nanmedian(np.array([[1.0, np.nan], [4.0, np.nan], [2.0, 5.0]])).tolist()
    [2.0, 5.0]
    """
    assert axis == 0 and x.ndim == 2
    ordered = np.sort(x, axis=0)  # NaN last
    count = np.count_nonzero(~np.isnan(x), axis=0)
    high = np.minimum(count // 2, len(x) - 1)
    low = np.maximum(np.where(count % 2 == 1, high, high - 1), 0)
    pick = np.take_along_axis(ordered, np.stack([low, high]), axis=0)
    return np.where(count > 0, (pick[0] + pick[1]) / 2.0, np.nan)


def _norms(shapes: np.ndarray) -> np.ndarray:
    """Euclidean norms along the last axis, in float64 (exact for integer shapes: their
    squares' sums are integers, so the order of the sum does not matter)."""
    s = shapes.astype(np.float64, copy=False)
    return np.sqrt(np.einsum("...i,...i->...", s, s))


def _cumsum(windows: np.ndarray) -> np.ndarray:
    """(B, W, C) -> (B, W + 1, C): 0, then the cumulative sums along the window."""
    csum = np.empty((windows.shape[0], windows.shape[1] + 1, windows.shape[2]),
                    windows.dtype)
    csum[:, 0] = 0.0
    np.cumsum(windows, axis=1, out=csum[:, 1:])
    return csum


def _shift_in(ring: np.ndarray, new: np.ndarray) -> np.ndarray:
    """A new ring: ``ring`` with ``new`` appended (along the first axis) and as many of
    its oldest entries dropped (one copy of the ring: a wide stream's is 2,048 x C)."""
    size, n = len(ring), len(new)
    if n >= size:
        return new[n - size:].astype(ring.dtype)
    out = np.empty_like(ring)
    out[:size - n] = ring[n:]
    out[size - n:] = new
    return out
