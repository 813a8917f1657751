"""Long histories stored in slices (models/slices.py): a commit writes the slices a
request changed, not the whole history. The threshold's scores and peaks, and a shadow's
comparison log; state written whole by earlier versions loads and continues the same."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from models.streaming import CHUNK
from models.thresholds import Spot, ThresholdSpec, build_threshold
from service import stream_state
from service.scoring import StreamScorer
from service.settings import Settings
from service.shadows.config import LOG_BLOCK, LOG_SLICE, section
from service.shadows.log import COMPARED, Columns
from service.stores.base import Commit, StreamMeta, retained
from tests.test_shadows import make_client, post, sections, series, settle
from tests.test_stream_state import run


def test_a_batch_1_request_past_warm_up_writes_one_small_slice_of_each_history():
    """residual_linear (no record scale: a SPOT threshold) at default settings, 2,000
    points in (past warm-up and the threshold's calibration), then one point a request.
    Measured here: a point that completes no chunk writes ``loop`` (176 B), ``lik`` (80 B),
    one likelihood slice ``lik/ring<k>`` (584 B), ``thr`` (the threshold's scalars, 368 B)
    and ``alr`` (145 B): 1,353 B, where the whole threshold section was 9,200 B (10,185 B
    in all, main d0ab229). A point that becomes one of SPOT's peaks (above t) adds its
    peaks slice ``thr/peaks<k>`` (1,160 B, not the 8 KB of peaks); an alert that changes
    adds ``alr/alerts``."""
    scorer = StreamScorer(StreamMeta("s", 1, 64, "residual_linear"), Settings())
    run(scorer, 0, 2000)
    scorer.to_commit()
    assert scorer.threshold.describe()["calibrated"]
    plain, peaks = [], Counter()
    for i in range(2000, 2256):
        run(scorer, i, i + 1)
        changed, drop, _ = scorer.to_commit()
        assert not drop
        if "det" in changed:  # a chunk's last point: the detector learnt
            continue
        thr = {n for n in changed if stream_state.owner(n) == "thr"}
        assert thr <= {"thr"} | {f"thr/peaks{k}" for k in range(8)}, thr
        assert len(thr) <= 2 and len([n for n in changed if n.startswith("lik/")]) <= 1
        assert sum(len(changed[n]) for n in thr) <= 1600, {n: len(changed[n]) for n in thr}
        peaks.update(n for n in thr if n != "thr")
        if set(changed) <= {"loop", "lik", "thr", "alr"} | {n for n in changed
                                                           if n.startswith("lik/ring")}:
            plain.append(sum(len(b) for b in changed.values()))
    assert len(plain) > 150 and max(plain) <= 1500, max(plain)
    assert peaks  # some points joined the peaks: each wrote one slice of them


SPECS = [ThresholdSpec(kind="spot", calibration=300, min_scores=50, max_peaks=100),
         ThresholdSpec(kind="dspot", calibration=300, min_scores=50, max_peaks=100, depth=20),
         ThresholdSpec(kind="quantile", history=250, min_scores=50)]


def earlier_state(threshold: object) -> dict[str, np.ndarray]:
    """The state_dict the versions before the slices wrote: each scalar an array, the
    histories whole."""
    if isinstance(threshold, Spot):
        state = {k: np.array([float(getattr(threshold, k))]) for k in Spot._SCALARS}
        state |= {"calib": threshold._calib.copy(), "peaks": threshold._peaks.copy(),
                  "censored": threshold._censored.copy(),
                  "fit": np.array([threshold.fit.gamma, threshold.fit.sigma]),
                  "kind": np.array([0 if threshold.kind == "spot" else 1]),
                  "spec": np.array([threshold.spec.fingerprint()])}
        if threshold.kind == "dspot":
            state |= {"recent": threshold._recent.copy(),
                      "n_recent": np.array([threshold.n_recent]),
                      "mean": np.array([threshold._mean])}
        return state
    return {"buf": threshold._buf.copy(), "count": np.array([threshold._count]),
            "kind": np.array([2])}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
@pytest.mark.parametrize("split_at", [120, 700])  # calibrating (SPOT), then calibrated
def test_a_threshold_written_whole_by_an_earlier_version_continues_the_same(spec, split_at):
    x = np.random.default_rng(1).exponential(size=1500)
    x[::97] += 6.0
    ts = np.arange(len(x), dtype=np.float64)
    first = build_threshold(spec)
    first.process(x[:split_at], ts[:split_at])
    sliced_state = first.state_dict()
    assert not {"calib", "peaks", "censored", "buf"} & set(sliced_state)
    loaded = []
    for state in (earlier_state(first), sliced_state):
        again = build_threshold(spec)
        again.load_state_dict(state)
        loaded.append(again)
    want = first.process(x[split_at:], ts[split_at:])
    for again in loaded:
        got = again.process(x[split_at:], ts[split_at:])
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert again.describe() == first.describe()


def log_bytes(commits: list[Commit], name: str) -> list[int]:
    """Per commit, the bytes of the shadow's comparison log it wrote."""
    log = section(name, "log/")
    return [sum(len(b) for k, b in c.sections.items() if k.startswith(log)) for c in commits]


def recording(c: object) -> tuple[list[Commit], Callable[[], None]]:
    backend = c.app.state.services.backend
    commits: list[Commit] = []
    real = backend.commit

    async def commit(change: Commit) -> int:
        commits.append(change)
        return await real(change)

    backend.commit = commit
    return commits, lambda: setattr(backend, "commit", real)


@pytest.mark.parametrize("batch", [8, 100])
def test_a_shadows_commit_writes_log_bytes_of_its_chunk_not_of_its_block(service_backend,
                                                                          batch):
    """A shadow commits each chunk it scores (at the stream's chunk ends, CHUNK = 64
    points, or the whole batch when larger): its comparison log is written in slices of
    LOG_SLICE points (about 22 B a point and a 0.6 KB header each), so a commit writes
    the slices its points reached (a chunk of 64: at most 2, 4.2 KB; of 100: at most 3,
    5.7 KB), not the block of 1,024 points they join (up to 22 KB before the slices)."""
    n = 2 * LOG_BLOCK + 4 * CHUNK  # a chunk end: the shadow has scored every point
    ts, values = series(n, spikes=[500, 1500])
    with make_client(service_backend) as c:
        assert c.put("/streams/s", json={"channels": 1}).status_code == 201
        assert c.put("/streams/s/shadows/rl", json={"detector": "residual_linear"}
                     ).status_code == 201
        commits, restore = recording(c)
        for lo in range(0, n, batch):
            post(c, "s", ts[lo:lo + batch], values[lo:lo + batch])
            settle(c)
        restore()
        got = c.get("/streams/s/shadows/rl/scores", params={"limit": 10_000}).json()
    written = [b for b in log_bytes(commits, "rl") if b]
    chunk = max(batch, CHUNK)
    assert len(written) >= n // chunk - 1
    slices = -(-chunk // LOG_SLICE) + 1  # the slices a chunk's points may reach
    bound = 22 * (chunk + LOG_SLICE) + 700 * slices
    assert max(written) <= bound, (max(written), bound)
    assert got["timestamps"] == ts  # every point logged, in order, across slices and blocks


def test_a_shadow_log_block_written_whole_by_an_earlier_version_is_read_then_continued(
        service_backend):
    """A block ``log/<k>`` written whole (the layout before slices) is read before the
    slices written after it: the shadow's scores read the same as a stream never stored
    the earlier way, and the whole block is not rewritten. (The block is rewritten whole
    at a slice's end, 512 points: a running shadow worker keeps its current slice in
    memory, which an upgrade, restarting the process, would not.)"""
    ts, values = series(900, spikes=[300, 700])
    with make_client(service_backend) as c:
        for stream in ("s", "control"):
            assert c.put(f"/streams/{stream}", json={"channels": 1}).status_code == 201
            assert c.put(f"/streams/{stream}/shadows/rl", json={"detector": "residual_linear"}
                         ).status_code == 201
            post(c, stream, ts[:512], values[:512])
        settle(c)
        held = sections(c, "s")
        prefix = section("rl", "log/0/")
        slices = sorted((k for k in held if k.startswith(prefix)),
                        key=lambda k: int(k.rsplit("/", 1)[1]))
        assert len(slices) >= 2
        rows = Columns.join([Columns.decode(stream_state.decode({k: held[k]})[k], COMPARED)
                             for k in slices], COMPARED)
        whole = {section("rl", "log/0"): stream_state.encode(rows.data)}
        services = c.app.state.services
        c.portal.call(services.backend.commit,
                      Commit("s", sections=whole, drop=tuple(slices)))
        services.scorers.evict("s")
        commits, restore = recording(c)
        for stream in ("s", "control"):
            for lo in range(512, 900, 50):
                post(c, stream, ts[lo:lo + 50], values[lo:lo + 50])
                settle(c)
        restore()
        got, want = (c.get(f"/streams/{s}/shadows/rl/scores", params={"limit": 10_000}
                           ).json() for s in ("s", "control"))
        assert section("rl", "log/0") in sections(c, "s")
    got.pop("stream"), want.pop("stream")
    assert got == want and got["timestamps"] == ts
    assert not any(section("rl", "log/0") in m.sections for m in commits)


WIDE = Settings(detector_params={"*": {"warmup": 64, "memory_points": 256}})


def wide_points(lo: int, hi: int, channels: int = 8) -> np.ndarray:
    """A wide stream like MSL's: one noisy channel, the rest one-hot command flags."""
    t = np.arange(lo, hi, dtype=np.float64)
    flags = np.zeros((hi - lo, channels - 1))
    flags[np.arange(hi - lo), (t // 40).astype(int) % (channels - 1)] = (t % 7 < 3)
    return np.column_stack([t, np.sin(t / 5) + 0.1 * np.cos(t * 1.7), flags])


def test_a_wide_streams_chunk_writes_one_slice_of_the_detectors_memory():
    """The default ensemble's memory (its ring of raw values and keep flags) is stored as
    a circular buffer in slices of one chunk (``det/memory<k>``), its block history in
    slices of a few blocks (``det/history<k>``): a chunk's end writes the slice
    its 64 points entered, round the ring, and the one its block's statistics entered,
    not the whole ring and history (2,048 x 55 float64 values, 901 KB, and 197 KB for
    MSL); a scorer decoded from what the store holds after any commit is the live one,
    array for array, and scores the same."""
    meta = StreamMeta("w", 8, 16, "ensemble")
    scorer = StreamScorer(meta, WIDE)
    scorer.meta.points_seen = 320
    scorer.process(wide_points(0, 320), 320)
    stored = scorer.to_commit()[0]
    memory = sorted(n for n in stored if n.startswith("det/memory"))
    assert memory == [f"det/memory{k}" for k in range(4)]  # 256 rows: 4 slices of 64
    assert scorer.detector._history_slice() == 8  # 448 bytes a block: 8 in 4 KB
    entered = []
    for lo in range(320, 960, 32):  # half a chunk a request: a chunk ends every other
        scorer.meta.points_seen = lo + 32
        scorer.process(wide_points(lo + 1 - retained(16), lo + 32), 32)
        changed, drop, _ = scorer.to_commit()
        stored |= changed
        assert not drop
        det = sorted(n for n in changed if stream_state.owner(n) == "det")
        if (lo + 32) % CHUNK:
            assert not det
            continue
        # the slice of the chunk that ended: its points lo + 32 - CHUNK .. lo + 31, mod 256
        chunk = (lo + 32) // CHUNK - 1
        block = int(scorer.detector._blocks[0]) - 1  # the block the chunk was
        history = f"det/history{block % 64 // scorer.detector._history_slice()}"
        assert det == ["det", history, f"det/memory{chunk % 4}"], (lo, det)
        assert len(changed[det[2]]) < 64 * 8 * 9 + 300  # its values, keep flags, header
        entered.append(det[2])
        decoded = StreamScorer.from_sections(StreamMeta("w", 8, 16, "ensemble"), WIDE, stored)
        live, back = scorer.detector.state_dict(), decoded.detector.state_dict()
        assert set(live) == set(back)
        for k in live:
            np.testing.assert_array_equal(back[k], live[k], err_msg=k)
        for attr in ("_ring", "_keep"):
            np.testing.assert_array_equal(getattr(decoded.detector, attr),
                                          getattr(scorer.detector, attr))
    assert len(set(entered)) == 4  # round the ring
    decoded.meta.points_seen = scorer.meta.points_seen = 1100
    got = decoded.process(wide_points(960 + 1 - retained(16), 1100), 140).scores
    want = scorer.process(wide_points(960 + 1 - retained(16), 1100), 140).scores
    np.testing.assert_array_equal(got, want)


def test_a_detector_memory_written_whole_by_an_earlier_version_continues_the_same():
    """``det`` and ``det/memory`` as versions before the slices wrote them (the block
    history whole in ``det``, the ring oldest first in ``det/memory``): they load, score
    the same, and the first commit drops ``det/memory`` for the slices."""
    scorer = StreamScorer(StreamMeta("w", 8, 16, "ensemble"), WIDE)
    scorer.meta.points_seen = 700
    scorer.process(wide_points(0, 700), 700)
    held = scorer.sections()
    whole = {k: v for k, v in held.items() if stream_state.owner(k) != "det"}
    det = scorer.detector
    whole["det"] = stream_state.encode({"n": det._n, "blocks": det._blocks, "lo": det._lo,
                                        "hi": det._hi, "step": det._step,
                                        "level_top": det._level_top,
                                        "memory_mid": det._memory_mid,
                                        "typical": det._typical_at})
    whole["det/memory"] = stream_state.encode({"ring": det._ring, "keep": det._keep})
    a, b = (StreamScorer.from_sections(StreamMeta("w", 8, 16, "ensemble"), WIDE, s)
            for s in (held, whole))
    for s in (a, b):
        s.meta.points_seen = 900
    context = wide_points(700 + 1 - retained(16), 900)
    np.testing.assert_array_equal(b.process(context, 200).scores,
                                  a.process(context, 200).scores)
    changed, drop, _ = b.to_commit()
    assert drop == ("det/memory",)
    history = {f"det/history{k}" for k in range(64 // b.detector._history_slice())}
    assert {f"det/memory{k}" for k in range(4)} | history <= set(changed)
