"""The ensemble's two exact nearest-window searches, pruned by a lower bound.

Each search answers, for a batch of query windows, the nearest remembered window's value
of one formula, to the last bit of that formula (``CosineMemory``: the largest cosine
similarity of integer shapes; ``SquaredMemory``: the smallest squared Euclidean distance
of raw windows). Two ways reach it:

* **the full search** (``full_nearest``): a float32 product with the whole memory, then
  the formula on the few windows within that product's error of the nearest, or on the
  whole memory where more than ``CANDIDATES`` per query are that close (a flat or exactly
  repeating stream);
* **the pruned search**, tried first where the caller passes the memory's projections:
  windows projected on the ``BASIS_SIZE`` lowest frequencies of the orthonormal DCT-II.
  For any orthonormal projection P with residual R, ``u.v = Pu.Pv + Ru.Rv <= Pu.Pv + |Ru|
  |Rv|`` (Cauchy-Schwarz), so a product of ``BASIS_SIZE + 1`` columns bounds every
  window's similarity from above (its distance from below). The formula runs on each
  query's best window by that bound, then only on the windows whose bound, widened by far
  more than its float error, could still beat it.

A smooth stream keeps most of a window's energy in its lowest frequencies: a few windows
per query survive (NAB's nyc_taxi: about 2 of 2,000). On a noisy one the bound is loose,
so the pruned search gives up (more than ``PRUNE_MAX_PER_QUERY`` survivors per query) and
the full one answers; the caller then skips the pruned search for a while. Either way the
answer is the formula's best over the whole memory: the pruning only skips windows that
provably cannot win. The projections are the callers' to keep up to date (64 new windows
per block): computing them for the whole memory every block cost more than the product
they save (measured on commit fe90e51, reverted). Even so the passes over the (B, N)
bound matrix cost about what the product saves: benchmarks/results/search_pruning.md.

Before either, ``CosineMemory`` keeps one row per distinct remembered shape and searches
each distinct query once (``distinct_rows``): the answer is a best value, not an index,
so duplicates never change it. A channel that is constant most of the time (MSL's one-hot
command channels) remembers one or a few shapes, which all tie with a flat query: without
this, every query took the whole-memory formula. The level search is left whole: its
whole-memory formula is a float64 BLAS product whose rounding may depend on the matrix's
shape (a one-column product is a matrix-vector one), so fewer columns could move a bit.
"""

from __future__ import annotations

import functools

import numpy as np
from numpy.lib.stride_tricks import as_strided

# The full search: exact on the windows within its float32 error of the nearest (that
# error is below 2e-5 relative; SEARCH_SLACK is five times it and more), or on the whole
# memory where more than CANDIDATES per query are that close.
SEARCH_SLACK = 1e-4
CANDIDATES = 8
# The pruned search: DCT frequencies kept (8 of 4, 8, 16 on NAB: nyc_taxi keeps about 4
# windows per query at 8 and 2 at 16, for twice the product's columns), and the most
# survivors per query before it gives up (the formula on that many windows, gathered one
# by one, costs about what the full product does).
BASIS_SIZE = 16
PRUNE_MAX_PER_QUERY = 16
# a give-up where this share of the memory survived says the bound does not fit the stream
# (noise: 40-90% survive), not that this block was unlucky (a smooth one: under 2%)
HOPELESS_SHARE = 0.1
# Projections and residual norms are computed in float64, so the bounds' only error is
# their float32 product with BASIS_SIZE + 2 terms (under 1e-6 of the scale below). Margins:
COSINE_MARGIN = SEARCH_SLACK  # similarity units: unit-scaled windows
# squared distance, in units of |q|^2 + the largest |m|^2: the full search's candidate
# band (2 * SEARCH_SLACK) plus twice its error and this search's, so a survivor set within
# CANDIDATES per query proves that the full search would have taken its exact candidates
# too (and not the whole-memory formula)
SQUARED_MARGIN = 3 * SEARCH_SLACK
# the float64 error of a residual's squared norm, relative to the scale it comes from: a
# query's |q|^2 or a unit shape's 1 (sums of 64 products: ~1e-14), and the level memory's
# largest |m|^2 (running sums over the ring, projections cancelling a centre of up to
# CENTRE_MAX of that scale: ~1e-10)
RESIDUAL_FLOOR = 1e-12
LEVEL_RESIDUAL_FLOOR = 1e-9
CENTRE_MAX = 1e3  # |centre| sqrt(W) over the largest |m|: beyond it, no pruning


@functools.cache
def dct_basis(size: int, k: int) -> np.ndarray:
    """(size, k): the k lowest-frequency vectors of the orthonormal DCT-II."""
    n = np.arange(size)
    basis = np.cos(np.pi * (n[:, None] + 0.5) * np.arange(k)[None, :] / size)
    basis[:, 0] *= np.sqrt(1.0 / size)
    basis[:, 1:] *= np.sqrt(2.0 / size)
    return basis


def project(x: np.ndarray) -> np.ndarray:
    """Windows (..., W) -> their DCT projections (..., k), float64."""
    return x.astype(np.float64) @ dct_basis(x.shape[-1], min(BASIS_SIZE, x.shape[-1]))


def _residual(total: np.ndarray, proj: np.ndarray, floor: float | np.ndarray) -> np.ndarray:
    """An upper bound on the norm of what the projection ``proj`` (..., k, N) leaves out
    of vectors of squared norms ``total`` (..., N), given a bound ``floor`` on the error
    of ``total`` minus the projection's squared norm (a square root magnifies it)."""
    kept = np.einsum("...ij,...ij->...j", proj, proj)
    return np.sqrt(np.maximum(total - kept, 0.0) + floor)


def cosine_bounds(shapes: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Integer shapes (..., N, W) with norms (..., N) -> the pruned cosine search's
    memory (..., k + 1, N), float32: per shape, the unit-scaled shape's projection and
    an upper bound on its residual's norm (zeros for an empty slot)."""
    inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    proj = np.swapaxes(project(shapes) * inverse[..., None], -1, -2)  # (..., k, N)
    residual = _residual((norms > 0).astype(np.float64), proj, RESIDUAL_FLOOR)
    return np.concatenate([proj, residual[..., None, :]], axis=-2).astype(np.float32)


def _survivors(bound: np.ndarray, threshold: np.ndarray, limit: int
               ) -> tuple[np.ndarray, np.ndarray] | float | None:
    """(rows, cols) where ``bound`` (B, N) <= ``threshold`` (B,), rows ascending; the
    share that survives when more than ``limit`` do; None when a row has none (a NaN)."""
    found = np.flatnonzero(bound <= threshold[:, None])  # 2-D nonzero is 10x slower
    if len(found) > limit:
        return len(found) / bound.size
    rows, cols = np.divmod(found, bound.shape[1])
    if len(rows) < len(bound) or np.count_nonzero(np.diff(rows)) != len(bound) - 1:
        return None
    return rows, cols


# Deduplication: one search per distinct row, where at most this share of the rows is
# distinct (above it, the gather and the scatter cost about what the rows they save do)
DISTINCT_SHARE = 0.75
FEW_NORMS = 32  # up to this many distinct norms, rows are grouped by norm (then checked)
# odd 64-bit multipliers: a uint8 row of W bytes hashes as W / 8 words, multiplied and
# xor-ed (wrapping); other rows as an exact float64 sum of integer-weighted values
_WORD_KEYS = np.random.default_rng(24).integers(1, 2**63, 128, dtype=np.uint64) | np.uint64(1)
_VALUE_KEYS = np.random.default_rng(25).integers(1, 2**38, 1024).astype(np.float64)


def distinct_rows(rows: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """One index per distinct row of ``rows`` (N, W) with its ``norms`` (N,), and each
    row's place among them (``rows[firsts][inverse]`` is ``rows`` byte for byte); None
    where more than DISTINCT_SHARE of the rows are distinct. Cheap first: rows of
    different norms differ, so the norms alone tell most memories apart, and where a few
    norms are all there is (a constant channel), rows are grouped by norm. Otherwise by a
    hash. Either grouping is checked byte for byte: rows equal in value but not in bytes
    (-0.0, NaN) or a hash collision keep every row (None), never merge two."""
    n = len(rows)
    if n < 2:
        return None
    ordered = np.sort(norms)  # NaNs last, each apart
    starts = np.empty(n, dtype=bool)
    starts[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    kinds = np.count_nonzero(starts)
    if kinds > DISTINCT_SHARE * n:
        return None
    if kinds <= FEW_NORMS and not np.isnan(ordered[-1]):
        inverse = np.searchsorted(ordered[starts], norms)
        firsts = np.empty(kinds, dtype=np.intp)
        firsts[inverse] = np.arange(n)  # any row of each norm (verified below)
        if _grouped(rows, norms, firsts, inverse):
            return firsts, inverse
    hashes = _hashes(rows)
    order = np.argsort(hashes)
    np.not_equal(hashes[order[1:]], hashes[order[:-1]], out=starts[1:])
    if np.count_nonzero(starts) > DISTINCT_SHARE * n:
        return None
    firsts = order[starts]
    inverse = np.empty(n, dtype=np.intp)
    inverse[order] = np.cumsum(starts) - 1
    return (firsts, inverse) if _grouped(rows, norms, firsts, inverse) else None


def _grouped(rows: np.ndarray, norms: np.ndarray, firsts: np.ndarray, inverse: np.ndarray
             ) -> bool:
    """Whether every row and norm is its group's first, byte for byte."""
    if len(firsts) == 1:
        return _all_equal(rows) and _all_equal(norms)
    back = firsts[inverse]
    return (np.array_equal(_bytes(rows[back]), _bytes(rows))
            and np.array_equal(_bytes(norms[back]), _bytes(norms)))


def _hashes(rows: np.ndarray) -> np.ndarray:
    """(N,) a hash of each row: equal rows hash equally wherever they sit."""
    if rows.dtype == np.uint8 and rows.shape[1] % 8 == 0 and rows.shape[1] <= 8 * 128:
        words = np.ascontiguousarray(rows).view(np.uint64)
        out = words[:, 0] * _WORD_KEYS[0]
        for j in range(1, words.shape[1]):
            out ^= words[:, j] * _WORD_KEYS[j]
        return out
    if rows.shape[1] > len(_VALUE_KEYS):
        return np.arange(len(rows), dtype=np.float64)  # no hash: every row apart
    # integer values up to 255 sum exactly (64 * 255 * 2^38 < 2^53): equal rows hash
    # equally; other values are rounded, and equal rows that hash apart stay apart
    return rows.astype(np.float64) @ _VALUE_KEYS[:rows.shape[1]]


def _bytes(x: np.ndarray) -> np.ndarray:
    """The bytes of ``x``'s elements (compared as bytes: -0.0 is not 0.0, NaN is NaN)."""
    return np.ascontiguousarray(x).view(np.uint8)


def _all_equal(x: np.ndarray) -> bool:
    """Whether every entry of ``x`` along its first axis is the first, byte for byte."""
    rows = _bytes(x).reshape(len(x), -1)
    return bool((rows == rows[0]).all())


def _row_starts(rows: np.ndarray) -> np.ndarray:
    """Where each row's run starts in ``rows`` (ascending, every row present)."""
    return np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]]))


class CosineMemory:
    """The memory member's search over one channel's remembered shapes ``mem`` (N, W),
    uint8 (zeros: empty), with their norms (N,): prepared once per block, searched by
    every scoring call until the next. ``bounds``: the shapes' ``cosine_bounds`` (k + 1,
    N), to try the pruned search first (None: the full search only)."""

    def __init__(self, mem: np.ndarray, norms: np.ndarray, bounds: np.ndarray | None = None
                 ) -> None:
        # the answer is a best value, not an index: one row per distinct shape gives the
        # same (a one-hot command channel's memory is one or two shapes)
        distinct = distinct_rows(mem, norms)
        if distinct is not None:
            firsts = distinct[0]
            mem, norms = mem[firsts], norms[firsts]
            bounds = bounds[:, firsts] if bounds is not None else None
        self.mem, self.norms = mem, norms
        self.inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        self.prune = bounds is not None and len(norms) > CANDIDATES
        self.pruned = 0  # calls answered by the pruned search
        self.gave_up = False  # a pruned search found the bound too loose
        self.hopeless = False  # .. and far too loose: HOPELESS_SHARE of the memory survived
        if self.prune:
            self.bounds_t = bounds

    @functools.cached_property
    def unit_t(self) -> np.ndarray:
        """(W, N): the unit-scaled shapes the full float32 search runs on."""
        return np.multiply(self.mem, self.inverse.astype(np.float32)[:, None],
                           dtype=np.float32).T

    def nearest(self, q: np.ndarray, q_norms: np.ndarray) -> np.ndarray:
        """(B,) the largest cosine similarity ``dot / max(|q| |m|, 1)`` of each shape q
        (B, W), float32 integers, to the remembered shapes. Dot products of integer shapes
        are exact in float32, so the result is the formula's to the last bit."""
        distinct = distinct_rows(q, q_norms)
        if distinct is not None:  # equal queries: one search, the answer scattered back
            firsts, inverse = distinct
            return self._nearest(q[firsts], q_norms[firsts])[inverse]
        return self._nearest(q, q_norms)

    def _nearest(self, q: np.ndarray, q_norms: np.ndarray) -> np.ndarray:
        if len(self.norms) <= CANDIDATES:  # a few shapes: the formula on all of them
            return self.formula(q, q_norms)
        if self.prune and len(q):
            out = self._pruned(q, q_norms)
            if out is not None:
                self.pruned += 1
                return out
            self.prune, self.gave_up = False, True  # the bound is loose: full searches
        return self.full_nearest(q, q_norms)

    def _similarity(self, q: np.ndarray, q_norms: np.ndarray, rows: np.ndarray,
                    cols: np.ndarray) -> np.ndarray:
        """The formula for the pairs (rows of q, cols of the memory)."""
        dots = (q[rows] * self.mem[cols]).sum(axis=1, dtype=np.float32)
        return dots / np.maximum(q_norms[rows] * self.norms[cols], 1.0)

    def _pruned(self, q: np.ndarray, q_norms: np.ndarray) -> np.ndarray | None:
        mine = -cosine_bounds(q, q_norms).T  # (B, k + 1); shapes: no empty query
        lower = mine @ self.bounds_t  # (B, N) <= minus the similarity (+ float32 error)
        rows = np.arange(len(q))
        first = lower.argmin(axis=1)
        floor = self._similarity(q, q_norms, rows, first)  # reached: the answer is above
        # a window can win only if its bound reaches the floor, less the margin
        found = _survivors(lower, (COSINE_MARGIN - floor).astype(np.float32),
                           PRUNE_MAX_PER_QUERY * len(q))
        if not isinstance(found, tuple):
            self.hopeless = found is not None and found > HOPELESS_SHARE
            return None
        rows, cols = found
        return np.maximum.reduceat(self._similarity(q, q_norms, rows, cols),
                                   _row_starts(rows))

    def formula(self, q: np.ndarray, q_norms: np.ndarray) -> np.ndarray:
        """``nearest`` by the formula on every remembered shape."""
        sims = (q @ self.mem.astype(np.float32).T) / np.maximum(np.outer(q_norms, self.norms),
                                                                1.0)
        return sims.max(axis=1)

    def full_nearest(self, q: np.ndarray, q_norms: np.ndarray) -> np.ndarray:
        """``nearest`` by a float32 product with the whole memory."""
        approx = q @ self.unit_t
        first = approx.argmax(axis=1)
        top = approx[np.arange(len(q)), first]
        rows, cols = _near(-approx, first, -top * np.float32(1 - SEARCH_SLACK))
        if len(rows) > CANDIDATES * len(q):
            return self.formula(q, q_norms)
        best = np.full(len(q), -np.inf)
        np.maximum.at(best, rows, self._similarity(q, q_norms, rows, cols))
        return best


class SquaredMemory:
    """The level member's search over the windows of ``ring`` (R,) (one channel's raw
    values, centred as the queries will be: ``ring - centre``) that start at ``kept``:
    prepared once per block, searched by every scoring call until the next.
    ``projections``: ``project`` of the kept windows of the uncentred ring, transposed (k,
    len(kept)), to try the pruned search first (None: the full search only)."""

    def __init__(self, ring: np.ndarray, kept: np.ndarray, w: int,
                 projections: np.ndarray | None = None, centre: float = 0.0) -> None:
        self.ring, self.w = ring, w
        self.windows = _windows_of(ring, w)  # (R - W + 1, W), a view
        self.kept = kept
        self.prune = projections is not None and len(kept) > 0
        self.pruned = 0
        self.gave_up = self.hopeless = False
        if self.prune:
            # the centred windows' squared norms from running sums (error under 1e-9 of
            # the largest), their projections by linearity: P(m - c) = Pm - c P1
            proj = projections - centre * project(np.ones(w))[:, None]  # (k, N)
            # (a ring still filling up starts with NaN: no kept window holds it)
            csum = np.concatenate([[0.0], np.cumsum(np.nan_to_num(ring * ring))])
            msq = np.maximum(csum[kept + w] - csum[kept], 0.0)
            self.msq_max64 = float(msq.max())
            residual = _residual(msq, proj, LEVEL_RESIDUAL_FLOOR * self.msq_max64)
            # [Pm, |Rm|, |m|^2] times [-2 Pq, -2 |Rq|, 1]: a lower bound of |m|^2 - 2 q.m;
            # the projections' own error (c P1 cancelling) must stay far under the margin
            self.prune = (bool(np.isfinite(residual).all()) and np.isfinite(self.msq_max64)
                          and abs(centre) * np.sqrt(w) < CENTRE_MAX * np.sqrt(self.msq_max64))
            if self.prune:
                self.bounds_t = np.empty((len(proj) + 2, len(kept)), np.float32)
                self.bounds_t[:-2], self.bounds_t[-2], self.bounds_t[-1] = proj, residual, msq

    def _search_windows(self) -> np.ndarray:
        """(N, W) float32: the remembered windows, contiguous."""
        search_windows = _windows_of(self.ring.astype(np.float32), self.w)
        return (np.ascontiguousarray(search_windows) if len(self.kept) == len(self.windows)
                else search_windows[self.kept])

    @functools.cached_property
    def _full(self) -> tuple[np.ndarray, np.float32]:
        """The full search's memory (W + 1, N): [m, |m|^2] per column, and the largest
        |m|^2 (both as the float32 search computes them)."""
        w = self.w
        mem = np.empty((len(self.kept), w + 1), np.float32)  # [m, |m|^2]
        mem[:, :w] = self._search_windows()
        msq = np.einsum("ij,ij->i", mem[:, :w], mem[:, :w])  # |m|^2 (the search's)
        mem[:, w] = msq
        return mem.T, msq.max()

    def nearest(self, q: np.ndarray) -> np.ndarray:
        """(B,) the smallest squared Euclidean distance ``|q|^2 + |m|^2 - 2 q.m``
        (float64) of each window q (B, W) to the remembered windows."""
        if self.prune and len(q) and np.isfinite(q).all():
            out = self._pruned(q)
            if out is not None:
                self.pruned += 1
                return out
            self.prune, self.gave_up = False, True
        return self.full_nearest(q)

    def _distance(self, q: np.ndarray, qsq: np.ndarray, rows: np.ndarray, cols: np.ndarray
                  ) -> np.ndarray:
        """The formula for the pairs (rows of q, cols = indices into ``kept``)."""
        m = self.windows[self.kept[cols]]
        return (qsq[rows] + (m**2).sum(axis=1)) - (2.0 * q[rows] * m).sum(axis=1)

    def _pruned(self, q: np.ndarray) -> np.ndarray | None:
        """``nearest`` through the lower bound, or None where the full search's answer
        could come from its whole-memory formula (more than CANDIDATES per query within
        its band) or too many windows survive."""
        qsq = (q**2).sum(axis=1)
        proj = project(q)  # (B, k)
        search = np.empty((len(q), len(self.bounds_t)), np.float32)  # [-2 Pq, -2 |Rq|, 1]
        search[:, :-2] = -2.0 * proj
        search[:, -2] = -2.0 * _residual(qsq, proj.T, RESIDUAL_FLOOR * qsq)
        search[:, -1] = 1.0
        lower = search @ self.bounds_t  # (B, N) <= |m|^2 - 2 q.m (+ float32 error)
        rows = np.arange(len(q))
        first = lower.argmin(axis=1)
        ceiling = self._distance(q, qsq, rows, first)  # reached: the answer is below
        margin = SQUARED_MARGIN * (qsq + self.msq_max64)
        found = _survivors(lower, (ceiling + margin - qsq).astype(np.float32),
                           CANDIDATES * len(q))
        if not isinstance(found, tuple):
            self.hopeless = found is not None and found > HOPELESS_SHARE
            return None
        rows, cols = found
        return np.minimum.reduceat(self._distance(q, qsq, rows, cols), _row_starts(rows))

    def full_nearest(self, q: np.ndarray) -> np.ndarray:
        """``nearest`` by a float32 product with the whole memory. That product's error
        is below 2e-5 of |q|^2 plus the largest |m|^2."""
        w, windows, kept = q.shape[1], self.windows, self.kept
        mem_t, msq_max = self._full
        search = np.empty((len(q), w + 1), np.float32)  # [-2 q, 1]: times [m, |m|^2]
        search[:, :w] = -2.0 * q  # gives |m|^2 - 2 q.m
        search[:, w] = 1.0
        approx = search @ mem_t  # (B, N)
        qsq = (q**2).sum(axis=1)
        first = approx.argmin(axis=1)
        low = approx[np.arange(len(q)), first]
        rows, cols = _near(approx, first, low + 2.0 * SEARCH_SLACK * (qsq + msq_max))
        if len(rows) > CANDIDATES * len(q):
            m = windows[kept]
            return (qsq[:, None] + (m**2).sum(1)[None] - 2.0 * q @ m.T).min(axis=1)
        best = np.full(len(q), np.inf)
        np.minimum.at(best, rows, self._distance(q, qsq, rows, cols))
        return best


def _windows_of(x: np.ndarray, w: int) -> np.ndarray:
    """The sliding windows of a 1-D array, (len - w + 1, w), as a read-only view (what
    ``sliding_window_view`` gives, without its checks: this runs per chunk)."""
    return as_strided(x, (len(x) - w + 1, w), (x.strides[0], x.strides[0]),
                      writeable=False)


def _near(approx: np.ndarray, first: np.ndarray, bound: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the entries of ``approx`` (B, N; overwritten) at or below
    ``bound`` (B,), given each row's smallest (``first``): usually that one alone, told
    by the row's second smallest."""
    rows = np.arange(len(first))
    approx[rows, first] = np.inf
    more = np.flatnonzero(approx.min(axis=1) <= bound)
    if not len(more):
        return rows, first
    more_rows, more_cols = np.nonzero(approx[more] <= bound[more, None])
    return np.concatenate([rows, more[more_rows]]), np.concatenate([first, more_cols])
