"""The ensemble's two exact nearest-window searches.

Each search answers, for a batch of query windows, the nearest remembered window's value
of one formula, to the last bit of that formula (``CosineMemory``: the largest cosine
similarity of integer shapes; ``SquaredMemory``: the smallest squared Euclidean distance
of raw windows): a float32 product with the whole memory, then the formula on the few
windows within that product's error of the nearest, or on the whole memory where more
than ``CANDIDATES`` per query are that close (a flat or exactly repeating stream).

Before it, ``CosineMemory`` keeps one row per distinct remembered shape and searches
each distinct query once (``distinct_rows``): the answer is a best value, not an index,
so duplicates never change it. A channel that is constant most of the time (MSL's one-hot
command channels) remembers one or a few shapes, which all tie with a flat query: without
this, every query took the whole-memory formula. The level search is left whole: its
whole-memory formula is a float64 BLAS product whose rounding may depend on the matrix's
shape (a one-column product is a matrix-vector one), so fewer columns could move a bit.

Both are prepared once per block and kept from block to block: a block adds a chunk's
windows and drops the oldest, so only the new windows' rows are computed (the caller
keeps ``CosineMemory``'s unit-scaled shapes slot by slot; ``SquaredMemory.follow``).
"""

from __future__ import annotations

import functools

import numpy as np
from numpy.lib.stride_tricks import as_strided

# The search: exact on the windows within its float32 error of the nearest (that error is
# below 2e-5 relative; SEARCH_SLACK is five times it and more), or on the whole memory
# where more than CANDIDATES per query are that close.
SEARCH_SLACK = 1e-4
CANDIDATES = 8
# rows a level memory's buffer holds beyond its windows: 8 chunks of 64 new windows before
# its rows move to a new buffer (one copy per 8 blocks; a buffer twice the memory would
# hold twice its bytes in every cached scorer)
FOLLOW_ROOM = 512


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


class CosineMemory:
    """The memory member's search over one channel's remembered shapes ``mem`` (N, W),
    uint8 (zeros: empty), with their norms (N,): prepared per block, searched by every
    scoring call until the next."""

    def __init__(self, mem: np.ndarray, norms: np.ndarray,
                 unit_t: np.ndarray | None = None) -> None:
        """``unit_t``: the shapes' ``unit_t`` (W, N) where the caller keeps it (any
        float32 within rounding of it would do: the answer is the formula's whatever
        the product's rounding, see ``nearest``)."""
        # the answer is a best value, not an index: one row per distinct shape gives the
        # same (a one-hot command channel's memory is one or two shapes)
        distinct = distinct_rows(mem, norms)
        self.distinct = distinct is not None  # searched as its distinct shapes
        if distinct is not None:
            firsts = distinct[0]
            mem, norms = mem[firsts], norms[firsts]
            unit_t = None if unit_t is None else unit_t[:, firsts]
        self.mem, self.norms = mem, norms
        if unit_t is not None:
            self.unit_t = unit_t  # the cached property, given

    @functools.cached_property
    def unit_t(self) -> np.ndarray:
        """(W, N), C-ordered: the unit-scaled shapes the full float32 search runs on (its
        product runs faster on them than on the transposed (N, W))."""
        return np.ascontiguousarray(unit_shapes(self.mem, unit_inverse(self.norms)).T)

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
        return self.full_nearest(q, q_norms)

    def _similarity(self, q: np.ndarray, q_norms: np.ndarray, rows: np.ndarray,
                    cols: np.ndarray) -> np.ndarray:
        """The formula for the pairs (rows of q, cols of the memory)."""
        dots = (q[rows] * self.mem[cols]).sum(axis=1, dtype=np.float32)
        return dots / np.maximum(q_norms[rows] * self.norms[cols], 1.0)

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
        rows, cols = _near(approx, first, top * np.float32(1 - SEARCH_SLACK), largest=True)
        if len(rows) > CANDIDATES * len(q):
            return self.formula(q, q_norms)
        best = np.full(len(q), -np.inf)
        np.maximum.at(best, rows, self._similarity(q, q_norms, rows, cols))
        return best


class SquaredMemory:
    """The level member's search over the windows of ``ring`` (R,) (one channel's raw
    values, centred as the queries will be) that start at ``kept``: prepared per block
    (whole, or following the last block's), searched by every scoring call until the
    next."""

    def __init__(self, ring: np.ndarray, kept: np.ndarray, w: int) -> None:
        self.ring, self.windows = ring, _windows_of(ring, w)  # (R - W + 1, W), a view
        self.kept, self.w = kept, w
        # the search matrix [m, |m|^2] (N, W + 1) is rows [lo, hi) of a buffer with room
        # to grow, so that the next block's memory (``follow``) writes only its new rows
        self._rows = np.empty((len(self.windows) + FOLLOW_ROOM, w + 1), np.float32)
        self._lo, self._hi = 0, 0
        self._owner = [self]  # the buffer's rows past _hi belong to this memory alone
        self._append(kept)

    def follow(self, ring: np.ndarray, kept: np.ndarray, shift: int) -> SquaredMemory:
        """The memory of ``ring``, which is this memory's ring moved on by ``shift``
        values (bit for bit the same values before its last ``shift``: the caller's
        promise), with windows ``kept``: the windows that stayed keep their rows, only
        the new ones are computed. Row for row, byte for byte, what ``SquaredMemory(ring,
        kept, w)`` builds (the rows are the same values, each computed by the same
        operations), so every search gives the same bits."""
        drop = int(np.searchsorted(self.kept, shift))  # windows that left the ring
        stayed = self.kept[drop:] - shift
        if (self._owner[0] is not self or len(kept) < len(stayed)
                or not np.array_equal(kept[:len(stayed)], stayed)):
            return SquaredMemory(ring, kept, self.w)
        out = object.__new__(SquaredMemory)
        out.ring, out.windows, out.kept, out.w = ring, _windows_of(ring, self.w), kept, self.w
        out._rows, out._lo, out._hi, out._owner = self._rows, self._lo + drop, self._hi, self._owner
        self._owner[0] = out
        out._append(kept[len(stayed):])
        return out

    def _append(self, new: np.ndarray) -> None:
        """Rows for the windows starting at ``new`` (after every row kept so far)."""
        w, hi = self.w, self._hi
        if hi + len(new) > len(self._rows):  # out of room: the rows move to a new buffer
            rows = np.empty((max(len(self.windows) + FOLLOW_ROOM,
                                 self._hi - self._lo + len(new)), w + 1), np.float32)
            rows[:hi - self._lo] = self._rows[self._lo:hi]
            self._rows, self._lo, hi = rows, 0, hi - self._lo
        part = self._rows[hi:hi + len(new)]
        # float64 values rounded to float32 as astype rounds them; |m|^2 by einsum, row by
        # row over the same strided layout as a whole-memory build
        part[:, :w] = self.windows[new] if len(new) < len(self.windows) else self.windows
        part[:, w] = np.einsum("ij,ij->i", part[:, :w], part[:, :w])
        self._hi = hi + len(new)
        mem = self._rows[self._lo:self._hi]
        self.mem_t = mem.T  # (W + 1, N)
        self.msq_max = mem[:, w].max() if len(mem) else np.float32(np.nan)

    def nearest(self, q: np.ndarray) -> np.ndarray:
        """(B,) the smallest squared Euclidean distance ``|q|^2 + |m|^2 - 2 q.m``
        (float64) of each window q (B, W) to the remembered windows. The float32
        search's error is below 2e-5 of |q|^2 plus the largest |m|^2 (and nothing where
        the windows are small multiples of 1/2: ``HALVES_MAX``)."""
        w, windows, kept = q.shape[1], self.windows, self.kept
        search = np.empty((len(q), w + 1), np.float32)  # [-2 q, 1]: times [m, |m|^2]
        search[:, :w] = -2.0 * q  # gives |m|^2 - 2 q.m
        search[:, w] = 1.0
        approx = search @ self.mem_t  # (B, N)
        qsq = (q**2).sum(axis=1)
        if self.halves and _halves(q):  # the product is exact: its least is the answer
            return qsq + approx.min(axis=1)
        first = approx.argmin(axis=1)
        low = approx[np.arange(len(q)), first]
        rows, cols = _near(approx, first, low + 2.0 * SEARCH_SLACK * (qsq + self.msq_max))
        if len(rows) > CANDIDATES * len(q):
            m = windows[kept]
            return (qsq[:, None] + (m**2).sum(1)[None] - 2.0 * q @ m.T).min(axis=1)
        m = windows[kept[cols]]
        d2 = (qsq[rows] + (m**2).sum(axis=1)) - (2.0 * q[rows] * m).sum(axis=1)
        best = np.full(len(q), np.inf)
        np.minimum.at(best, rows, d2)
        return best

    @functools.cached_property
    def halves(self) -> bool:
        """Whether the remembered windows are small multiples of 1/2 (``_halves``): a
        one-hot or small-count channel centred on its range (centres are halves)."""
        if not len(self.kept) or self.w > 64:  # the bound below is for up to 64 values
            return False
        first, last = self.kept[0], self.kept[-1] + self.w  # every kept window's values
        return _halves(self.ring[first:last])


# Exact level searches: where every value of the queries and the remembered windows is a
# multiple of 1/2 at most HALVES_MAX / 2 in size, each term of |m|^2 - 2 q.m is a multiple
# of 1/4 and their sum over a window of 64 is at most 64 * 3 * HALVES_MAX^2 quarters <
# 2^24: the float32 product with [m, |m|^2] and every partial sum in it are exact, in any
# order, and so are the formulas the searches end with. The product's least is then the
# answer bit for bit: what the candidates' formula and the whole-memory product give too
# (+0.0 for a window met again: x - x is +0.0). A one-hot channel (0/1 centred on 1/2)
# skips the candidates and the whole-memory fallback its flat windows always took.
HALVES_MAX = 295


def _halves(x: np.ndarray) -> bool:
    """Whether every value of ``x`` is a multiple of 1/2 of size at most HALVES_MAX / 2
    (NaN and infinities are not)."""
    twice = 2.0 * x
    return bool((np.abs(twice) <= HALVES_MAX).all() and np.array_equal(twice, np.rint(twice)))


def _windows_of(x: np.ndarray, w: int) -> np.ndarray:
    """The sliding windows of a 1-D array, (len - w + 1, w), as a read-only view (what
    ``sliding_window_view`` gives, without its checks: this runs per chunk)."""
    return as_strided(x, (len(x) - w + 1, w), (x.strides[0], x.strides[0]),
                      writeable=False)


def _near(approx: np.ndarray, first: np.ndarray, bound: np.ndarray, largest: bool = False
          ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the entries of ``approx`` (B, N; overwritten) at or below
    ``bound`` (B,) (``largest``: at or above it), given each row's smallest (largest):
    ``first``; usually that one alone, told by the row's second smallest (largest)."""
    rows = np.arange(len(first))
    approx[rows, first] = -np.inf if largest else np.inf
    if largest:
        more = np.flatnonzero(approx.max(axis=1) >= bound)
    else:
        more = np.flatnonzero(approx.min(axis=1) <= bound)
    if not len(more):
        return rows, first
    near = approx[more] >= bound[more, None] if largest else approx[more] <= bound[more, None]
    more_rows, more_cols = np.nonzero(near)
    return np.concatenate([rows, more[more_rows]]), np.concatenate([first, more_cols])


def unit_inverse(norms: np.ndarray) -> np.ndarray:
    """1 / norm (float64), 0 for an empty slot (norm 0)."""
    return np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)


def unit_shapes(mem: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """(..., N, W) shapes scaled to unit norm by their ``inverse`` (..., N), float32."""
    return np.multiply(mem, inverse.astype(np.float32)[..., None], dtype=np.float32)
