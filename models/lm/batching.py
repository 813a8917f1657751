"""Micro-batching: the prompts of every in-flight request go through one LM forward pass.

The service scores requests in worker threads; each one that misses the embedding cache
would otherwise run its own small forward pass, and concurrent passes only fight over the
same cores. ``MicroBatcher`` wraps an encoder: ``encode`` queues the call and blocks; one
worker thread takes everything queued (waiting up to ``window_seconds`` after the first
call for others to join, and never more than ``max_prompts`` prompts), encodes the distinct
prompts in one call, and hands each caller its rows. While a pass runs, new calls queue
up and form the next batch, so under load batches grow by themselves, and a lone call
waits at most ``window_seconds``.

>>> import numpy as np
>>> class Lengths:  # a stand-in encoder: one number per text, its length
...     model_id, pooling, dim = "len", "mean", 1
...     def encode(self, texts, batch_size=None):
...         return np.array([[len(t)] for t in texts], dtype=np.float32)
>>> batcher = MicroBatcher(Lengths(), window_seconds=0.001)
>>> batcher.encode(["a", "abc", "a"]).ravel().tolist()
[1.0, 3.0, 1.0]
>>> batcher.close()
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.lm.encoder import Encoder, EncoderInFront
from models.lm.metrics import EmbeddingMetrics


@dataclass
class _Call:
    texts: list[str]
    batch_size: int | None
    done: threading.Event = field(default_factory=threading.Event)
    rows: np.ndarray | None = None
    error: BaseException | None = None


class MicroBatcher(EncoderInFront):
    """An ``Encoder`` that coalesces concurrent ``encode`` calls (thread-safe)."""

    def __init__(self, encoder: Encoder, window_seconds: float = 0.002,
                 max_prompts: int = 256, metrics: EmbeddingMetrics | None = None) -> None:
        if window_seconds < 0 or max_prompts < 1:
            raise ValueError("window_seconds >= 0 and max_prompts >= 1 required")
        self.encoder = encoder
        self.window_seconds = window_seconds
        self.max_prompts = max_prompts
        self.metrics = metrics
        self._queue: deque[_Call] = deque()
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(N,) prompts -> (N, dim), as the wrapped encoder gives them."""
        call = _Call(list(texts), batch_size)
        if not call.texts:
            return self.encoder.encode([], batch_size)
        with self._cond:
            if self._closed:
                raise RuntimeError("MicroBatcher is closed")
            self._queue.append(call)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="lm-batcher",
                                                daemon=True)
                self._worker.start()
            self._cond.notify()
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.rows is not None
        return call.rows

    def close(self) -> None:
        """Stop the worker once the queue is empty; later calls raise."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._worker is not None:
            self._worker.join(timeout=5)

    # --- the worker ----------------------------------------------------------------------
    def _next_batch(self) -> list[_Call] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            deadline = time.monotonic() + self.window_seconds
            while (sum(len(c.texts) for c in self._queue) < self.max_prompts
                   and (left := deadline - time.monotonic()) > 0 and not self._closed):
                self._cond.wait(left)
            batch = [self._queue.popleft()]  # the oldest call goes, whatever its size
            size = len(batch[0].texts)
            while self._queue and size + len(self._queue[0].texts) <= self.max_prompts:
                size += len(self._queue[0].texts)
                batch.append(self._queue.popleft())
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            distinct = list(dict.fromkeys(t for c in batch for t in c.texts))
            try:
                rows = self.encoder.encode(distinct, batch[0].batch_size)
                at = {t: i for i, t in enumerate(distinct)}
                for c in batch:
                    c.rows = rows[[at[t] for t in c.texts]]
            except BaseException as exc:  # noqa: BLE001 - every caller gets the error
                for c in batch:
                    c.error = exc
            finally:
                if self.metrics is not None:
                    self.metrics.pass_calls.observe(len(batch))
                for c in batch:
                    c.done.set()
