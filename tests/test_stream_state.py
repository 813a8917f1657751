"""A stream's state in sections: a commit writes only what changed, a detector's parts get
sections of their own, and state kept whole by earlier versions loads unchanged."""

from __future__ import annotations

import numpy as np
import safetensors.numpy

from models.calibration import RING_SLICE
from models.detectors.ensemble import MEMORY_SLICE
from service import stream_state
from service.scoring import StreamScorer
from service.settings import Settings
from service.stores.base import LEGACY_SECTION, StreamMeta, retained

SETTINGS = Settings(detector_params={"*": {"warmup": 64}}, threshold_min_scores=20)


def points(lo: int, hi: int) -> np.ndarray:
    t = np.arange(lo, hi, dtype=np.float64)
    return np.column_stack([t, np.sin(t / 5) + (t % 97 == 0) * 3.0])


def run(scorer: StreamScorer, lo: int, hi: int) -> np.ndarray:
    """Score points lo..hi-1 as the transaction would (with the retained context)."""
    scorer.meta.points_seen = hi
    context = max(0, lo - retained(scorer.meta.window) + 1)
    return scorer.process(points(context, hi), hi - lo).scores


def test_a_commit_writes_only_the_sections_that_changed():
    scorer = StreamScorer(StreamMeta("s", 1, 16, "ensemble"), SETTINGS)
    run(scorer, 0, 300)
    first, _, nbytes = scorer.to_commit()
    # the ensemble's memory of raw values and its block history are in sections of their
    # own (det/memory<k>: one chunk of rows each; det/history<k>: a few KB each), and
    # so are the loop's recent rows, the tracker's alerts and its normal-window sample
    lik_slices = {f"lik/ring{k}" for k in range(-(-SETTINGS.likelihood_history // RING_SLICE))}
    memory = {f"det/memory{k}" for k in range(2048 // MEMORY_SLICE)}
    memory |= {"det/history0"}  # a univariate stream's history: one slice
    assert set(first) == {"det", "loop", "loop/recent", "lik", "thr", "alr", "alr/alerts",
                          "alr/normal", "fb", "ada"} | lik_slices | memory
    assert nbytes == sum(len(b) for b in first.values())
    run(scorer, 300, 310)  # within a chunk: the detector learns nothing yet
    changed, drop, _ = scorer.to_commit()
    assert not ({"det", "fb"} | memory) & set(changed) and not drop
    assert {"loop", "alr"} <= set(changed)
    assert set(changed) - lik_slices <= {"loop", "loop/recent", "lik", "alr", "alr/alerts"}
    again, _, _ = scorer.to_commit()
    assert again == {}  # nothing moved since
    run(scorer, 310, 320)  # completes the chunk of points 256-319: the detector learns
    changed, drop, _ = scorer.to_commit()
    assert {"det", "alr/normal"} <= set(changed) and not drop
    # the slices of the memory and of the history the chunk entered
    assert len(memory & set(changed)) == 2, memory & set(changed)


def test_a_point_that_completes_no_chunk_writes_nothing_of_the_detector():
    """The batch-1 path at default settings: a univariate stream of the default detector,
    scored past its warm-up, no alert open: each point's commit writes the loop's verdict
    and pending chunk, the tracker's counters and the likelihood's count and the slice of
    its recent scores the point entered (``lik/ring<k>``, not the whole 8 KB history):
    under a kilobyte together, nothing of the detector."""
    settings = Settings()
    scorer = StreamScorer(StreamMeta("s", 1, 64, settings.default_detector), settings)
    t = np.arange(2000, dtype=np.float64)
    series = np.column_stack([t, np.sin(t / 7) + 0.01 * np.cos(t * 1.3)])
    context = retained(64) - 1

    def score(lo: int, hi: int) -> None:
        scorer.meta.points_seen = hi
        scorer.process(series[max(0, lo - context):hi], hi - lo)

    score(0, 1200)
    scorer.to_commit()
    written, written_all = [], []
    for i in range(1200, 1264):
        score(i, i + 1)
        changed, drop, _ = scorer.to_commit()
        assert not drop
        if (i + 1) % 64:
            assert {stream_state.owner(n) for n in changed} <= {"loop", "lik", "alr"}, set(changed)
            assert len([n for n in changed if n.startswith("lik/")]) <= 1, set(changed)
            written.append(len(changed["loop"]) + len(changed.get("alr", b"")))
            written_all.append(sum(len(b) for b in changed.values()))
        else:  # a chunk's last point: the detector learnt
            assert "det" in changed
    assert scorer.tracker.open is None and max(written) <= 1024, written
    assert max(written_all) <= 1024, written_all  # the likelihood's slice and count too


def test_state_written_whole_by_an_earlier_version_loads_and_scores_the_same():
    meta = StreamMeta("s", 1, 16, "residual_linear")
    scorer = StreamScorer(meta, SETTINGS)
    run(scorer, 0, 400)
    sections = scorer.sections()
    # the whole-blob format: every section's arrays under "<section>.", and a version
    whole = {"version": np.array([1])}
    parts = stream_state.decode(sections)
    for owner in ("det", "loop", "lik", "thr", "alr", "fb", "ada"):
        whole |= {f"{owner}.{k}": v for k, v in stream_state.merge(owner, parts).items()}
    legacy = {LEGACY_SECTION: safetensors.numpy.save(whole)}
    a = StreamScorer.from_sections(StreamMeta("s", 1, 16, "residual_linear"), SETTINGS,
                                   sections)
    b = StreamScorer.from_sections(StreamMeta("s", 1, 16, "residual_linear"), SETTINGS,
                                   legacy)
    np.testing.assert_array_equal(run(a, 400, 500), run(b, 400, 500))
    changed, drop, _ = b.to_commit()  # the first commit writes every section
    assert set(changed) == set(a.sections()) and not drop


def test_a_detectors_parts_get_sections_of_their_own():
    state = {"n": np.zeros(1), "memory/vectors": np.ones((4, 8)), "memory/stamps": np.ones(4)}
    parts = stream_state.detector_sections(state)
    assert set(parts) == {"det", "det/memory"}
    back = stream_state.detector_state(parts)
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
