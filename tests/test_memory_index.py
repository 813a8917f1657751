"""Memory search backends: exact matches brute force, HNSW stays close and follows updates."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest

from models.detectors.memory_index import HNSWIndex, MemoryIndex, search

DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def clustered(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit vectors around 16 centres (like embeddings of similar windows), float16-exact."""
    centres = unit(rng.standard_normal((16, DIM)))
    x = unit(centres[rng.integers(0, 16, n)] + 0.3 * rng.standard_normal((n, DIM)))
    return x.astype(np.float16).astype(np.float32)


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want,
                                                                          strict=True)]))


def test_exact_equals_brute_force(rng: np.random.Generator) -> None:
    mem, q = unit(rng.standard_normal((300, DIM))), unit(rng.standard_normal((7, DIM)))
    sims, idx = search(mem.astype(np.float16), q, k=5)
    brute = q @ mem.astype(np.float16).astype(np.float32).T
    order = np.argsort(-brute, axis=1)[:, :5]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(sims, np.take_along_axis(brute, order, axis=1), rtol=1e-5)
    assert (np.diff(sims, axis=1) <= 0).all()  # descending
    # k larger than the memory: every entry, still sorted
    sims, idx = search(mem[:3], q, k=10)
    assert idx.shape == (7, 3) and sorted(idx[0]) == [0, 1, 2]


def test_identical_vector_is_at_distance_zero(rng: np.random.Generator) -> None:
    mem = unit(clustered(rng, 500))  # exactly unit in float32: self-similarity 1
    for sims, idx in (search(mem, mem[[42]], 1), HNSWIndex(DIM).build(mem).search(mem,
                                                                                  mem[[42]], 1)):
        assert idx[0, 0] == 42
        assert 1.0 - sims[0, 0] == pytest.approx(0.0, abs=1e-6)


def test_hnsw_recall_on_small_memory(rng: np.random.Generator) -> None:
    mem = clustered(rng, 2000)
    q = unit(mem[rng.integers(0, 2000, 100)] + 0.1 * rng.standard_normal((100, DIM)))
    sims, idx = HNSWIndex(DIM).build(mem).search(mem, q, 5)
    exact = search(mem, q, 5)
    assert recall(idx, exact[1]) >= 0.9
    assert (np.diff(sims, axis=1) <= 1e-6).all()


def test_hnsw_follows_slot_replacement(rng: np.random.Generator) -> None:
    mem = clustered(rng, 400)
    index = HNSWIndex(DIM).build(mem)
    old = mem[[10, 20]].copy()
    slots = np.array([10, 20, 30])
    mem[slots] = unit(rng.standard_normal((3, DIM)))  # far from the clusters
    index.mark_changed(slots)
    _, idx = index.search(mem, mem[slots], 1)
    np.testing.assert_array_equal(idx[:, 0], slots)  # new vectors found at their slots
    assert index.tombstones == 3 and index.size == 400 and index.rebuilds == 1
    # the overwritten vectors are gone: nothing is returned as identical to them
    sims, idx = index.search(mem, old, 5)
    assert (sims < 0.999).all()
    assert recall(idx, search(mem, old, 5)[1]) >= 0.9
    # a growing memory is indexed without mark_changed; replacing most slots rebuilds
    grown = np.concatenate([mem, clustered(rng, 50)])
    assert index.search(grown, grown[[440]], 1)[1][0, 0] == 440
    index.mark_changed(np.arange(449))  # + 3 tombstones > 450 live
    fresh = clustered(rng, 450)
    assert index.search(fresh, fresh[[5]], 1)[1][0, 0] == 5
    assert index.rebuilds == 2 and index.tombstones == 0


@pytest.mark.parametrize("backend", ["exact", "hnsw"])
def test_memory_index_per_channel(backend: str, rng: np.random.Generator) -> None:
    """(C, M, D) float16 memory as the detector keeps it; slots written online."""
    mem = np.stack([clustered(rng, 256), clustered(rng, 256)]).astype(np.float16)
    index = MemoryIndex(backend)
    q = mem[:, [3, 7]].transpose(1, 0, 2).astype(np.float32)  # (B=2, C=2, D)
    sims, idx = index.search(mem, q, 3)
    assert sims.shape == idx.shape == (2, 2, 3)
    np.testing.assert_array_equal(idx[:, :, 0], [[3, 3], [7, 7]])
    mem[:, 100] = unit(rng.standard_normal((2, DIM)))
    index.mark_changed(100)
    _, idx = index.search(mem, mem[:, [100]].transpose(1, 0, 2).astype(np.float32), 1)
    np.testing.assert_array_equal(idx[0, :, 0], [100, 100])
    index.reset()
    _, idx = index.search(mem[:, :50], q, 1)  # a refilled, smaller memory
    assert idx.max() < 50
    copy = pickle.loads(pickle.dumps(index))  # caches dropped, rebuilt on demand
    np.testing.assert_array_equal(copy.search(mem[:, :50], q, 1)[1], idx)


def test_auto_and_bad_backend() -> None:
    assert not MemoryIndex("auto", min_size=1000).uses_hnsw(999)
    assert MemoryIndex("auto", min_size=1000).uses_hnsw(1000)
    assert MemoryIndex("hnsw").uses_hnsw(10)
    with pytest.raises(ValueError, match="index must be one of"):
        MemoryIndex("annoy")


def test_without_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(ImportError, match=r"pip install 'tsad\[ann\]'"):
        MemoryIndex("hnsw")
    index = MemoryIndex("auto", min_size=8)
    mem = np.eye(DIM, dtype=np.float16)[None]  # (1, 32, 32): above min_size
    with pytest.warns(UserWarning, match="searched exactly"):
        _, idx = index.search(mem, mem[:, [4]].transpose(1, 0, 2).astype(np.float32), 1)
    assert idx[0, 0, 0] == 4
