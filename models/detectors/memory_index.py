"""k-nearest search over a memory detector's bounded memory: exact or approximate (HNSW).

``search`` is the exact backend: one matrix product and an ``argpartition``. ``HNSWIndex``
is the approximate one, a FAISS ``IndexHNSWFlat`` on inner product (``pip install
'tsad[ann]'``, a faiss-cpu wheel), built once per memory and kept in step with it as slots
are overwritten online. ``MemoryIndex`` serves a detector's whole (C, M, D) memory, one
search per channel, and picks the backend (``auto``: exact below ``AUTO_MIN_SIZE`` entries,
on a float32 mirror of the float16 memory).
``benchmarks/memory_search.py`` measured where the crossover lies.

Memory rows are unit vectors, so inner product = cosine similarity; every function returns
similarities in descending order with the memory slot (row) of each.

>>> mem = np.eye(4, dtype=np.float32)
>>> sims, idx = search(mem, mem[[2]], k=2)
>>> idx[0, 0], float(sims[0, 0])
(np.int64(2), 1.0)
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

BACKENDS = ("auto", "exact", "hnsw")
# Entries per channel from which `auto` uses HNSW (benchmarks/results/memory_search.md, one
# thread): against the exact product on a float32 mirror HNSW is faster from 4096 entries
# for single queries and from 16384 for batches of 64; below 16384 the exact product is under
# a millisecond per query and HNSW would trade recall for little.
AUTO_MIN_SIZE = 16384
_INSTALL_HINT = "the hnsw memory index needs faiss-cpu: pip install 'tsad[ann]'"


def search(memory: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-nearest by inner product. memory (M, D), queries (B, D), both unit rows ->
    (similarities (B, k) descending, memory rows (B, k)); k is capped at M."""
    memory = np.asarray(memory, dtype=np.float32)  # float16 has no BLAS product
    sims = np.asarray(queries, dtype=np.float32) @ memory.T  # (B, M)
    return top_k(sims, k)


def top_k(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest of each row of ``sims`` (..., M), sorted: (values, positions)."""
    k = min(k, sims.shape[-1])
    if k < sims.shape[-1]:  # argpartition: O(M), a full sort is O(M log M)
        part = np.argpartition(-sims, k - 1, axis=-1)[..., :k]
    else:
        part = np.broadcast_to(np.arange(k), sims.shape).copy()
    vals = np.take_along_axis(sims, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(vals, order, axis=-1), np.take_along_axis(part, order, axis=-1)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return faiss


def ann_available() -> bool:
    try:
        _faiss()
    except ImportError:
        return False
    return True


class HNSWIndex:
    """Approximate k-nearest over one memory (M, D) whose rows change online.

    FAISS HNSW graphs cannot delete or overwrite a node, so a changed slot is handled the
    way hnswlib's ``mark_deleted`` does it: the slot's old node becomes a tombstone (kept
    for navigation, filtered out of results by an ``IDSelector``) and its new vector is
    added as a new node, an O(log M) insertion instead of an O(M log M) rebuild. Changes
    are only recorded by ``mark_changed`` (O(1)) and applied at the next search, in one
    batched ``add``; the graph is rebuilt from the memory once tombstones outnumber live
    nodes, which bounds both its size (at most 2x) and the recall lost to tombstones.
    Rows past the ones indexed (a memory still filling) count as changed automatically.
    """

    def __init__(self, dim: int, m: int = 32, ef_construction: int = 64,
                 ef_search: int = 64) -> None:
        self.faiss = _faiss()
        self.dim, self.m = dim, m
        self.ef_construction, self.ef_search = ef_construction, ef_search
        self.rebuilds = 0
        self._reset()

    def _reset(self) -> None:
        self._index = self.faiss.IndexHNSWFlat(self.dim, self.m, self.faiss.METRIC_INNER_PRODUCT)
        self._index.hnsw.efConstruction = self.ef_construction
        self._slot_of = np.zeros(0, dtype=np.int64)  # node -> memory slot
        self._node_of = np.zeros(0, dtype=np.int64)  # memory slot -> live node
        self._dead: list[int] = []  # tombstoned nodes
        self._changed: set[int] = set()
        self._selector: Any = None  # kept referenced: the SWIG params do not own it

    @property
    def size(self) -> int:
        """Live entries (memory slots indexed)."""
        return len(self._node_of)

    @property
    def tombstones(self) -> int:
        return len(self._dead)

    def mark_changed(self, slots: int | np.ndarray) -> None:
        """Slots overwritten in the memory since the last search."""
        self._changed.update(np.atleast_1d(slots).astype(int).tolist())

    def build(self, memory: np.ndarray) -> HNSWIndex:
        """(Re)index the whole memory from scratch."""
        self._reset()
        self.rebuilds += 1
        self._add(np.arange(len(memory)), memory)
        return self

    def _add(self, slots: np.ndarray, memory: np.ndarray) -> None:
        if not len(slots):
            return
        nodes = self._index.ntotal + np.arange(len(slots))
        grown = max(len(self._node_of), int(slots.max()) + 1)
        if grown > len(self._node_of):
            self._node_of = np.concatenate(
                [self._node_of, np.full(grown - len(self._node_of), -1, dtype=np.int64)])
        old = self._node_of[slots]
        self._dead += old[old >= 0].tolist()
        self._node_of[slots] = nodes
        self._slot_of = np.concatenate([self._slot_of, slots.astype(np.int64)])
        self._index.add(np.ascontiguousarray(memory[slots], dtype=np.float32))
        self._selector = None

    def _sync(self, memory: np.ndarray) -> None:
        if len(memory) < self.size:  # the memory was replaced (load, refit): start over
            self.build(memory)
            return
        changed = self._changed | set(range(self.size, len(memory)))
        self._changed = set()
        if not changed:
            return
        if len(self._dead) + len(changed) > self.size:  # tombstones would outnumber live
            self.build(memory)
            return
        self._add(np.array(sorted(changed), dtype=np.int64), memory)

    def search(self, memory: np.ndarray, queries: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like ``search``: memory (M, D) as it is now, queries (B, D) unit rows ->
        (similarities (B, k) descending, memory slots (B, k)); approximate."""
        self._sync(memory)
        k = min(k, self.size)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = self.faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, k)
        if self._dead:
            if self._selector is None:
                self._selector = self.faiss.IDSelectorNot(
                    self.faiss.IDSelectorBatch(np.asarray(self._dead, dtype=np.int64)))
            params.sel = self._selector
        sims, nodes = self._index.search(queries, k, params=params)
        short = (nodes < 0).any(axis=1)  # fewer than k live nodes reached: rare, do it exactly
        if short.any():
            exact = search(memory[: self.size], queries[short], k)
            sims[short], slots = exact[0], exact[1]
            nodes[short] = self._node_of[slots]
        return sims, self._slot_of[nodes]


class _Float32Mirror:
    """A float32 copy of a float16 memory (C, M, D), kept in step slot by slot. Numpy casts
    float16 at a few ns an element, which costs more than the product itself at every size
    measured (benchmarks/results/memory_search.md): paying 2x the bytes once beats it."""

    def __init__(self) -> None:
        self.data = np.zeros((0, 0, 0), dtype=np.float32)
        self._changed: set[int] = set()

    def mark_changed(self, slot: int) -> None:
        self._changed.add(slot)

    def sync(self, memory: np.ndarray) -> np.ndarray:
        size = memory.shape[1]
        if memory.shape[0] != self.data.shape[0] or size < self.data.shape[1]:
            self.data = np.zeros((memory.shape[0], 0, memory.shape[2]), dtype=np.float32)
            self._changed = set()
        if size > self.data.shape[1]:  # a filling memory: append the new rows
            self.data = np.concatenate(
                [self.data, memory[:, self.data.shape[1]:].astype(np.float32)], axis=1)
        stale = [s for s in self._changed if s < size]
        if stale:
            self.data[:, stale] = memory[:, stale]
        self._changed = set()
        return self.data[:, :size]


class MemoryIndex:
    """Search over a detector's memory (C, M, D): one search per channel.

    ``backend``: ``exact`` (one product over all channels), ``hnsw`` (an ``HNSWIndex`` per
    channel; needs faiss-cpu) or ``auto`` (hnsw from ``min_size`` entries when faiss is
    installed, else exact). ``mirror``: exact search on a float32 copy of a float16 memory
    (2x the bytes, several times faster) instead of converting it on every call. The
    detector calls ``mark_changed(slot)`` when it writes a slot (all channels at once) and
    ``reset()`` when it replaces the whole memory.
    """

    def __init__(self, backend: str = "auto", *, min_size: int = AUTO_MIN_SIZE,
                 mirror: bool = True, m: int = 32, ef_construction: int = 64,
                 ef_search: int = 64) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"index must be one of {BACKENDS}, got {backend!r}")
        if backend == "hnsw":
            _faiss()  # fail at construction, with the install hint
        self.backend, self.min_size = backend, min_size
        self._hnsw_args = {"m": m, "ef_construction": ef_construction, "ef_search": ef_search}
        self._channels: list[HNSWIndex] = []
        self._mirror = _Float32Mirror() if mirror else None
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:
        # a faiss index does not pickle; both caches rebuild from the memory on next search
        state = self.__dict__.copy()
        state["_channels"] = []
        state["_mirror"] = _Float32Mirror() if self._mirror is not None else None
        return state

    def reset(self) -> None:
        self._channels = []
        if self._mirror is not None:
            self._mirror = _Float32Mirror()

    def mark_changed(self, slot: int) -> None:
        for index in self._channels:
            index.mark_changed(slot)
        if self._mirror is not None:
            self._mirror.mark_changed(slot)

    def uses_hnsw(self, size: int) -> bool:
        if self.backend != "auto":
            return self.backend == "hnsw"
        if size < self.min_size:
            return False
        if not ann_available():
            if not self._warned:
                warnings.warn(f"memory of {size} entries searched exactly: {_INSTALL_HINT}",
                              stacklevel=3)
                self._warned = True
            return False
        return True

    def search(self, memory: np.ndarray, queries: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        """memory (C, M, D) filled rows only, queries (B, C, D) unit rows ->
        (similarities (B, C, k) descending, memory slots (B, C, k))."""
        channels, size, dim = memory.shape
        if not self.uses_hnsw(size):
            mem32 = (self._mirror.sync(memory) if self._mirror is not None
                     else memory.astype(np.float32))
            # batched matmul: (C, B, D) @ (C, D, M), one BLAS call per channel
            sims = np.matmul(queries.astype(np.float32).transpose(1, 0, 2),
                             mem32.transpose(0, 2, 1)).transpose(1, 0, 2)
            return top_k(sims, k)
        self._channels = self._channels if len(self._channels) == channels else [
            HNSWIndex(dim, **self._hnsw_args).build(memory[c]) for c in range(channels)]
        out = [self._channels[c].search(memory[c], queries[:, c], k) for c in range(channels)]
        return np.stack([o[0] for o in out], axis=1), np.stack([o[1] for o in out], axis=1)
