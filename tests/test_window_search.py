"""The default detector's nearest-window searches answer what the formula over the whole
memory answers, to the last bit, on ordinary and adversarial memories (ties, flat and
exactly repeating windows, empty slots, a ring still filling up, NaN queries), with
duplicate shapes and queries searched once."""

from __future__ import annotations

import numpy as np
import pytest

from models.detectors.ensemble import _norms
from models.detectors.raw_knn import scale_windows
from models.detectors.window_search import CosineMemory, SquaredMemory, distinct_rows

W = 64
RING = 1024


def _series(kind: str, rng: np.random.Generator, n: int = RING + 200) -> np.ndarray:
    t = np.arange(n, dtype=np.float64)
    if kind == "smooth":
        return 300.0 * np.sin(t / 17.0) + rng.normal(0, 0.01, n)
    if kind == "offset":  # a small wave on a large level: centring cancels digits
        return 1e4 + np.sin(t / 11.0)
    if kind == "noise":
        return rng.normal(0, 1, n)
    if kind == "repeat":  # exact repeats: many windows tie for the nearest
        return np.tile(rng.normal(0, 1, 48), n // 48 + 1)[:n]
    if kind == "flat":  # steps: flat windows, all one shape
        return np.repeat(rng.integers(0, 3, n // 100 + 1).astype(np.float64), 100)[:n]
    raise ValueError(kind)


def _cosine_formula(mem: np.ndarray, norms: np.ndarray, q: np.ndarray,
                    q_norms: np.ndarray) -> np.ndarray:
    """The brute force: every slot's dot / max(|q| |m|, 1) (exact integer dots)."""
    dots = q @ mem.astype(np.float32).T
    return (dots / np.maximum(np.outer(q_norms, norms), 1.0)).max(axis=1)


def _squared_formula(ring: np.ndarray, kept: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The brute force: every kept window's (|q|^2 + |m|^2) - 2 q.m, pair by pair."""
    windows = np.lib.stride_tricks.sliding_window_view(ring, W)[kept]
    qsq = (q**2).sum(axis=1)
    return np.array([((qsq[i] + (windows**2).sum(axis=1))
                      - (2.0 * q[i] * windows).sum(axis=1)).min() for i in range(len(q))])


def _squared_product(ring: np.ndarray, kept: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The brute force as one product: (|q|^2 + |m|^2) - 2 q @ m.T."""
    windows = np.lib.stride_tricks.sliding_window_view(ring, W)[kept]
    return ((q**2).sum(axis=1)[:, None] + (windows**2).sum(axis=1)[None]
            - 2.0 * q @ windows.T).min(axis=1)


@pytest.mark.parametrize("kind", ["smooth", "offset", "noise", "repeat", "flat"])
@pytest.mark.parametrize("kept_share", [1.0, 0.3])
def test_searches_answer_the_formula(kind: str, kept_share: float) -> None:
    rng = np.random.default_rng(7)
    x = _series(kind, rng)
    raw = np.lib.stride_tricks.sliding_window_view(x[:RING], W)  # (N, W)
    keep = rng.random(len(raw)) < kept_share
    keep[0] = True
    kept = np.flatnonzero(keep)
    queries = np.lib.stride_tricks.sliding_window_view(x[RING - 63:RING + 64], W).copy()

    # level: centred on the ring's middle, as the detector centres on its range
    centre = float((x[:RING].max() + x[:RING].min()) / 2.0)
    got = SquaredMemory(x[:RING] - centre, kept, W).nearest(queries - centre)
    pairs = _squared_formula(x[:RING] - centre, kept, queries - centre)
    # where more than a few windows tie (exact repeats) the search runs the formula as one
    # product with the whole memory, whose rounding is the product's
    assert (np.array_equal(got, pairs)
            or np.array_equal(got, _squared_product(x[:RING] - centre, kept, queries - centre)))
    assert kind == "repeat" or np.array_equal(got, pairs)

    # memory: shapes, empty slots (zeros) where a window is not kept
    mem = scale_windows(raw[:, :, None])[:, 0].astype(np.uint8) * keep[:, None].astype(np.uint8)
    norms = _norms(mem)
    q = scale_windows(queries[:, :, None])[:, 0].astype(np.float32)
    q_norms = _norms(q)
    got = CosineMemory(mem, norms).nearest(q, q_norms)
    assert np.array_equal(got, _cosine_formula(mem, norms, q, q_norms))


def test_empty_memory_and_nan_queries_answer_the_formula() -> None:
    mem = np.zeros((50, W), np.uint8)  # nothing remembered yet
    norms = _norms(mem)
    q = np.ones((3, W), np.float32)  # a NaN window's shape: all ones
    got = CosineMemory(mem, norms).nearest(q, _norms(q))
    assert np.array_equal(got, _cosine_formula(mem, norms, q, _norms(q)))
    assert np.array_equal(got, np.zeros(3))

    rng = np.random.default_rng(1)
    x = _series("smooth", rng)
    ring = x[:RING].copy()
    ring[:300] = np.nan  # a ring still filling up: its first windows are not kept
    kept = np.arange(300, RING - W + 1)
    queries = np.lib.stride_tricks.sliding_window_view(x[RING - 63:RING + 64], W).copy()
    queries[5, 10] = np.nan
    got = SquaredMemory(ring, kept, W).nearest(queries)
    assert np.isnan(got[5]) and not np.isnan(np.delete(got, 5)).any()
    ok = np.arange(len(queries)) != 5
    assert np.array_equal(got[ok], _squared_formula(ring, kept, queries[ok]))


def _one_hot(rng: np.random.Generator, n: int) -> np.ndarray:
    """A command channel: 0 most of the time, 1 for a few short stretches."""
    x = np.zeros(n)
    for start in rng.integers(0, n - 30, 6):
        x[start:start + rng.integers(3, 30)] = 1.0
    return x


@pytest.mark.parametrize("kind", ["one_hot", "flat", "repeat", "smooth"])
def test_duplicate_shapes_and_queries_answer_the_formula(kind: str) -> None:
    """Memories of a few distinct shapes (one-hot command channels, flat steps, exact
    repeats) and batches of equal queries: one search per distinct shape and query
    answers the whole-memory formula bit for bit, empty slots included."""
    rng = np.random.default_rng(11)
    x = _one_hot(rng, RING + 200) if kind == "one_hot" else _series(kind, rng)
    raw = np.lib.stride_tricks.sliding_window_view(x[:RING], W)
    keep = (rng.random(len(raw)) < 0.8).astype(np.uint8)  # zeros: empty slots
    mem = scale_windows(raw[:, :, None])[:, 0].astype(np.uint8) * keep[:, None]
    norms = _norms(mem)
    queries = np.lib.stride_tricks.sliding_window_view(x[RING - 63:RING + 64], W)
    q = scale_windows(queries[:, :, None])[:, 0].astype(np.float32)
    q = np.concatenate([q, q[::-1], np.ones((5, W), np.float32)])  # equal queries
    q_norms = _norms(q)
    search = CosineMemory(mem, norms)
    want = _cosine_formula(mem, norms, q, q_norms)
    assert np.array_equal(search.nearest(q, q_norms), want)
    for i in (0, 7, len(q) - 1):  # one query at a time: the same bits
        assert np.array_equal(search.nearest(q[i:i + 1], q_norms[i:i + 1]), want[i:i + 1])
    distinct = len(np.unique(mem, axis=0))
    if kind in ("one_hot", "flat"):  # searched: one row per distinct shape
        assert distinct < len(mem) / 4 and len(search.mem) == distinct


def test_a_memory_of_one_shape_is_searched_as_that_shape() -> None:
    mem = np.ones((2000, W), np.uint8)  # a constant channel: every window the same shape
    norms = _norms(mem)
    search = CosineMemory(mem, norms)
    assert len(search.mem) == 1
    q = np.ones((64, W), np.float32)
    q[3, :10] = 100.0
    got = search.nearest(q, _norms(q))
    assert np.array_equal(got, _cosine_formula(mem, norms, q, _norms(q)))
    assert got[0] == 1.0 and got[3] < 1.0


def test_distinct_rows_merges_only_rows_equal_byte_for_byte() -> None:
    rows = np.ones((40, W), np.float32)
    rows[::2, 0] = -0.0 * rows[::2, 0] * 0.0  # -0.0: equal in value to 0.0, not in bytes
    rows[1::2, 0] = 0.0
    assert distinct_rows(rows, _norms(rows)) is None  # a hash tie it refuses to merge
    rows[:, 0] = 0.0
    rows[5, 1] = np.nan
    rows[6, 1] = np.nan
    firsts, inverse = distinct_rows(rows, _norms(rows))
    assert np.array_equal(rows[firsts][inverse].view(np.uint8), rows.view(np.uint8))
    assert len(firsts) == 3  # the plain rows, and each NaN row alone


def test_rows_of_one_norm_that_differ_stay_apart() -> None:
    """Grouping by norm is checked: shapes that are permutations of each other share a
    norm and are still two shapes."""
    shape = np.arange(1, W + 1, dtype=np.uint8)
    mem = np.stack([shape, shape[::-1]] * 500 + [np.zeros(W, np.uint8)] * 24)
    norms = _norms(mem)
    firsts, inverse = distinct_rows(mem, norms)
    assert len(firsts) == 3 and np.array_equal(mem[firsts][inverse], mem)
    q = np.stack([shape, shape[::-1], np.ones(W)]).astype(np.float32)
    search = CosineMemory(mem, norms)
    assert len(search.mem) == 3
    assert np.array_equal(search.nearest(q, _norms(q)), _cosine_formula(mem, norms, q, _norms(q)))


def test_a_level_memory_that_follows_its_ring_is_the_one_built_whole() -> None:
    """``SquaredMemory.follow``: block after block (the ring moved on by 64 values, some
    windows not kept, a buffer that fills and moves), its search matrix is byte for byte
    the one a whole build makes, so its searches give the same bits."""
    rng = np.random.default_rng(3)
    x = _series("smooth", rng, 6 * RING)
    keep = rng.random(len(x)) < 0.9
    memory = None
    for end in range(RING, len(x) - 64, 64):
        ring = x[end - RING:end] - 5.0
        kept = np.flatnonzero(keep[end - RING + W - 1:end])
        whole = SquaredMemory(ring, kept, W)
        memory = whole if memory is None else memory.follow(ring, kept, 64)
        assert memory.mem_t.tobytes() == whole.mem_t.tobytes()
        assert memory.msq_max.tobytes() == whole.msq_max.tobytes()
        queries = np.lib.stride_tricks.sliding_window_view(x[end - W + 1:end + 64], W) - 5.0
        assert np.array_equal(memory.nearest(queries), whole.nearest(queries))
    # a memory already followed is not written again: the second follower builds whole
    later = memory.follow(ring, kept, 0)
    again = memory.follow(ring, kept, 0)
    assert again.mem_t.tobytes() == later.mem_t.tobytes() == memory.mem_t.tobytes()
    assert again._rows is not later._rows


@pytest.mark.parametrize("kind", ["one_hot", "counts", "flat"])
def test_level_searches_of_small_halves_are_the_products_least(kind: str) -> None:
    """A one-hot or small-count channel centred on its range (multiples of 1/2): the
    float32 product is exact, so its least is the answer, and it is the bits both
    formulas give (the pairs' and the whole-memory product's)."""
    rng = np.random.default_rng(5)
    if kind == "one_hot":
        x = _one_hot(rng, RING + 200)
    elif kind == "counts":
        x = rng.poisson(40.0, RING + 200).astype(np.float64)
    else:
        x = np.repeat(rng.integers(0, 3, RING // 100 + 3).astype(np.float64), 100)[:RING + 200]
    centre = float((x[:RING].max() + x[:RING].min()) / 2.0)
    keep = rng.random(RING - W + 1) < 0.8
    keep[0] = True
    kept = np.flatnonzero(keep)
    queries = np.lib.stride_tricks.sliding_window_view(x[RING - 63:RING + 64], W) - centre
    search = SquaredMemory(x[:RING] - centre, kept, W)
    assert search.halves
    got = search.nearest(queries)
    assert np.array_equal(got, _squared_formula(x[:RING] - centre, kept, queries))
    assert np.array_equal(got, _squared_product(x[:RING] - centre, kept, queries))
    assert not SquaredMemory(x[:RING] - centre + 0.1, kept, W).halves
    assert not SquaredMemory(1000.0 * (x[:RING] - centre + 1.0), kept, W).halves


def test_the_ensembles_kept_search_memories_are_the_ones_a_load_builds() -> None:
    """Block after block (past the ring's wrap, two channels), the memories the ensemble
    keeps for its searches are byte for byte what it builds from its ring after a load."""
    from models.detectors.base import sliding_windows
    from models.detectors.ensemble import Ensemble

    rng = np.random.default_rng(9)
    t = np.arange(2000.0)
    x = np.column_stack([np.sin(t / 9.0) + rng.normal(0, 0.05, len(t)), _one_hot(rng, len(t))])
    det = Ensemble(window=W, memory_points=512, warmup=128)
    windows = sliding_windows(x, W)
    for lo in range(0, len(windows) - 64, 64):
        if det.is_fitted:
            det.score(windows[lo:lo + 64])
        det.partial_fit(windows[lo:lo + 64])
    assert det._shapes and det._shapes["head"] != 0 and det._level_prep
    kept_unit = [None if u is None else u.copy() for u in det._shapes["unit_t"]]
    assert kept_unit[0] is not None and kept_unit[1] is None  # the flag: a few shapes
    det.score(windows[-64:])
    fresh = Ensemble(window=W, memory_points=512, warmup=128)
    fresh.load_state_dict(det.state_dict())
    fresh.score(windows[-64:])
    # slots are circular: the kept memory is the rebuilt one rolled by the head
    built = fresh._shapes["unit_t"][0]
    assert np.roll(built, det._shapes["head"], axis=1).tobytes() == kept_unit[0].tobytes()
    for mine, built in zip(det._level_prep["memories"], fresh._level_prep["memories"],
                           strict=True):
        assert mine.mem_t.tobytes() == built.mem_t.tobytes()
