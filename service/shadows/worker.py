"""Shadow detectors scored in a child process: the background queue's work off the
service's interpreter, so a shadow's scoring never holds the GIL a live request waits
for, and runs at a lower priority that the operating system keeps (a thread at nice 10
holding the GIL on a busy machine held the live requests behind it: priority inversion).

``ShadowWorker`` (in the service) starts the child on first use, ``python -m
service.shadows.worker``, and talks to it over its stdin/stdout in length-prefixed
pickles: the settings once, then per job (with an id: jobs overlap) the shadow's
binding, the points with their context, the live results, its mark as stored and, when
the child may not hold the shadow's engine at that mark, its sections. The child keeps
decoded engines between jobs (least recently used out), scores each job in a thread of
its own (the prompts of costly jobs sent together share the language model's forward
passes, and its embedding cache), encodes the changed sections and answers; the service
commits them under the stream's lock (``queue.py``), so the store is touched by the
service only. The child's language-model metrics (its encoder's cache hits and misses,
passes, encode time, LRU size) travel back with each answer and are made on the
service's own metrics (``RelayedMetrics``), so its /metrics shows the shadows'
language-model work too. A child that dies is started again by the next job; the service kills it
when it stops (a language-model job of minutes never holds a SIGTERM'd service), and a
child whose service is gone exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import struct
import sys
import threading
import traceback
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from service.metrics import ServiceMetrics
from service.settings import Settings
from service.shadows.config import ShadowConfig
from service.shadows.engine import Caught, ShadowEngine
from service.shadows.log import LiveResults
from service.stores.base import StreamMeta

log = logging.getLogger("tsad.shadows")
ENGINES_KEPT = 256  # decoded shadow engines the child keeps between jobs
_LENGTH = struct.Struct("<Q")
Key = tuple[str, str]


class ShadowWorkerGone(RuntimeError):
    """The child process died during a job (its points are counted as skipped)."""


@dataclass
class Scored:
    """A job's outcome: what the shadow scored, its changed sections, its new mark."""

    caught: Caught
    changed: dict[str, bytes]
    drop: tuple[str, ...]
    mark: int
    counters: dict[str, float]


def configure_lm(settings: Settings, embedding_metrics: Any) -> None:  # noqa: ANN401
    """The process's cached encoder for detectors that embed prompts: the service's Redis
    level (shared by the service and its shadow worker) and metrics."""
    from models.lm import runtime as lm_runtime
    from models.lm.cache import CacheConfig

    lm_runtime.configure(CacheConfig(redis_url=settings.redis_url,
                                     redis_cluster=settings.redis_cluster,
                                     key_prefix=f"{settings.redis_prefix}:emb:v1"),
                         embedding_metrics, settings.lm_batch_window_ms / 1000)


class RelayedMetrics:
    """Stands in for ``EmbeddingMetrics`` in the child: each call on one of its metrics
    (which, with what labels, what value) is kept until the next answer carries it to the
    service, which makes the same call on its own (``ShadowWorker.replay``)."""

    def __init__(self) -> None:
        self.calls: deque[tuple[str, tuple, str, float]] = deque()

    def __getattr__(self, name: str) -> _Relayed:
        return _Relayed(self.calls, name, ())

    def take(self) -> list[tuple[str, tuple, str, float]]:
        """The calls made since the last take (jobs in other threads may add meanwhile)."""
        out = []
        with contextlib.suppress(IndexError):
            while True:
                out.append(self.calls.popleft())
        return out


class _Relayed:
    __slots__ = ("bound", "calls", "name")

    def __init__(self, calls: deque, name: str, bound: tuple) -> None:
        self.calls, self.name, self.bound = calls, name, bound

    def labels(self, **labels: str) -> _Relayed:
        return _Relayed(self.calls, self.name, tuple(sorted(labels.items())))

    def inc(self, amount: float = 1.0) -> None:
        self.calls.append((self.name, self.bound, "inc", float(amount)))

    def observe(self, value: float) -> None:
        self.calls.append((self.name, self.bound, "observe", float(value)))

    def set(self, value: float) -> None:
        self.calls.append((self.name, self.bound, "set", float(value)))


class ShadowWorker:
    """The service's end of one child process. Calls may overlap: each carries an id and
    its answer comes back with it (the child scores jobs in threads of its own, so the
    language-model prompts of jobs sent together share forward passes)."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics  # where the child's language-model metrics are made
        self.lru: dict[str, float] = {}  # the child's LRU gauges, as last relayed
        self.at: dict[Key, int] = {}  # the child holds these shadows' engines at these marks
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._waiting: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()

    async def catch_up(self, key: Key, config: ShadowConfig, mark: int, points: np.ndarray,
                       first: int, live: LiveResults,
                       load: tuple[StreamMeta, dict[str, bytes]] | None) -> Scored | None:
        """Score the shadow from ``mark`` (as stored) to the last of ``points``; ``load``:
        the stream's meta and the shadow's sections (prefix cut), when the child may not
        hold its engine at ``mark``. None: nothing to score (the engine is at ``mark``);
        KeyError: the child does not hold it (send ``load``)."""
        self.at.pop(key, None)  # unknown until it answers
        reply = await self._call(("job", key, config, mark, points, first, live, load))
        kind = reply[0]
        if kind == "error":
            raise RuntimeError(f"shadow worker: {reply[1]}")
        if kind == "stale":
            raise KeyError(key)
        if kind == "idle":
            self.at[key] = mark
            return None
        return Scored(*reply[1:])

    async def _call(self, message: tuple) -> tuple:
        if self._proc is None or self._proc.returncode is not None:
            await self._start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        call = next(self._ids)
        answer = self._waiting[call] = asyncio.get_running_loop().create_future()
        try:
            proc.stdin.write(_frame((call, *message)))
            await proc.stdin.drain()
        except ConnectionError as exc:
            self._waiting.pop(call, None)
            raise ShadowWorkerGone("the shadow worker process died") from exc
        try:
            return await answer
        finally:
            self._waiting.pop(call, None)

    async def _start(self) -> None:
        await self.stop()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.shadows.worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=2**20)
        assert self._proc.stdin is not None
        self._proc.stdin.write(_frame(self.settings))
        self._reader = asyncio.create_task(self._answers(self._proc))
        log.info("shadow worker started", extra={"pid": self._proc.pid})

    async def _answers(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                (n,) = _LENGTH.unpack(await proc.stdout.readexactly(_LENGTH.size))
                call, reply, relayed = pickle.loads(await proc.stdout.readexactly(n))
                self.replay(relayed)
                answer = self._waiting.get(call)
                if answer is not None and not answer.done():
                    answer.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError):  # it died: calls fail
            self.at.clear()
            self._lru_gone()
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(ShadowWorkerGone("the shadow worker process died"))
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def stop(self) -> None:
        """Kill the child (a job it runs is not waited for: the shadow resumes from its
        committed mark)."""
        proc, self._proc = self._proc, None
        reader, self._reader = self._reader, None
        self.at.clear()
        self._lru_gone()
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(ShadowWorkerGone("the shadow worker was stopped"))

    def replay(self, relayed: list[tuple[str, tuple, str, float]]) -> None:
        """The child's language-model metrics, made on the service's: counters and
        histograms as the child made them (its cache hits count with the service's own);
        its LRU's size in gauges of their own (tsad_shadow_embedding_lru_*, summed over
        the children), which the service's encoder would otherwise overwrite."""
        if self.metrics is None:
            return
        embedding = self.metrics.embedding
        for name, bound, method, value in relayed:
            if method == "set":  # lru_bytes, lru_entries
                gauge = getattr(self.metrics, f"shadow_embedding_{name}", None)
                if gauge is not None:
                    gauge.inc(value - self.lru.get(name, 0.0))
                    self.lru[name] = value
                continue
            metric = getattr(embedding, name)
            getattr(metric.labels(**dict(bound)) if bound else metric, method)(value)

    def _lru_gone(self) -> None:
        """The child is gone, and its LRU with it."""
        if self.metrics is not None:
            for name, value in self.lru.items():
                getattr(self.metrics, f"shadow_embedding_{name}").dec(value)
        self.lru.clear()


def _frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def _read(stream: BinaryIO) -> Any:  # noqa: ANN401
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError
    (n,) = _LENGTH.unpack(head)
    return pickle.loads(stream.read(n))


# --- the child ---------------------------------------------------------------------------
class _Engines:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.kept: OrderedDict[Key, ShadowEngine] = OrderedDict()
        self.lock = threading.Lock()  # jobs run in threads: the kept engines are shared

    def job(self, key: Key, config: ShadowConfig, mark: int, points: np.ndarray,
            first: int, live: LiveResults,
            load: tuple[StreamMeta, dict[str, bytes]] | None) -> tuple:
        with self.lock:
            engine = self.kept.pop(key, None)
        if load is not None:
            engine = ShadowEngine.load(config, load[0], self.settings, load[1])
        elif engine is None or engine.run.mark != mark:
            return ("stale",)
        caught = engine.catch_up(points, first, live)
        with self.lock:
            self.kept[key] = engine
            while len(self.kept) > ENGINES_KEPT:
                self.kept.popitem(last=False)
        if caught is None:
            return ("idle",)
        changed, drop = engine.to_commit()
        return ("done", caught, changed, drop, engine.run.mark, dict(engine.run.counters))


def main() -> None:
    out = os.fdopen(os.dup(1), "wb")  # the replies; a stray print goes to stderr
    os.dup2(2, 1)
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 10)  # below the service's requests
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    stdin = sys.stdin.buffer
    try:
        settings: Settings = _read(stdin)
    except EOFError:
        return
    from threadpoolctl import threadpool_limits

    threadpool_limits(settings.blas_threads, user_api="blas")
    relayed = RelayedMetrics()
    configure_lm(settings, relayed)
    engines = _Engines(settings)
    sending = threading.Lock()

    def run(call: int, message: tuple) -> None:
        try:
            reply = engines.job(*message[1:])
        except Exception:  # the service logs it: one shadow's failure skips its points
            reply = ("error", traceback.format_exc(limit=8))
        with sending:
            out.write(_frame((call, reply, relayed.take())))
            out.flush()

    # jobs sent together run together: their language-model prompts share passes
    # (models.lm.batching); daemon threads, so a killed service's child ends with stdin
    pool = ThreadPoolExecutor(settings.shadow_costly_together + 1)
    while True:
        try:
            call, *message = _read(stdin)
        except EOFError:  # the service is gone
            os._exit(0)  # not waiting for a job in progress
        pool.submit(run, call, tuple(message))


if __name__ == "__main__":
    main()
