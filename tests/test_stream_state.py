"""A stream's state in sections: a commit writes only what changed, a detector's parts get
sections of their own, and state kept whole by earlier versions loads unchanged."""

from __future__ import annotations

import numpy as np
import safetensors.numpy

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
    # the ensemble's memory of raw values is a section of its own (det/memory)
    assert set(first) == {"det", "det/memory", "loop", "lik", "thr", "alr", "fb", "ada"}
    assert nbytes == sum(len(b) for b in first.values())
    run(scorer, 300, 310)  # within a chunk: the detector learns nothing yet
    changed, drop, _ = scorer.to_commit()
    assert not {"det", "det/memory", "fb"} & set(changed) and not drop
    assert {"loop", "alr"} <= set(changed)
    again, _, _ = scorer.to_commit()
    assert again == {}  # nothing moved since


def test_state_written_whole_by_an_earlier_version_loads_and_scores_the_same():
    meta = StreamMeta("s", 1, 16, "residual_linear")
    scorer = StreamScorer(meta, SETTINGS)
    run(scorer, 0, 400)
    sections = scorer.sections()
    # the whole-blob format: every section's arrays under "<section>.", and a version
    whole = {"version": np.array([1])}
    for name, arrays in stream_state.decode(sections).items():
        whole |= {f"{name}.{k}": v for k, v in arrays.items()}
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
