"""Command events (models/detectors/command_events.py) on the real MSL slice: the one-hot
command columns are found and scored as events, telemetry is left alone, and a command
never sent in training outweighs the usual ones."""

from __future__ import annotations

import numpy as np
import pytest

from models.data import load_msl
from models.detectors import build_detector, load_detector
from models.detectors.base import sliding_windows
from tests.conftest import DATA_DIR

W = 32


@pytest.fixture(scope="module")
def c1() -> tuple[np.ndarray, np.ndarray]:
    entity = load_msl(DATA_DIR)[0]  # C-1: telemetry in column 0, four command columns
    return entity.train.astype(np.float64), entity.test.astype(np.float64)


def test_the_command_columns_are_the_event_channels_and_telemetry_scores_zero(c1):
    train, test = c1
    det = build_detector("command_events", window=W).fit(train)
    assert det.event_channels == [1, 2, 3, 4]  # column 0 has 188 distinct values
    scores = det.channel_scores(sliding_windows(test, W, 8))
    assert (scores[:, 0] == 0).all() and (scores >= 0).all() and scores[:, 1:].any()


def test_a_command_never_sent_in_training_outweighs_usual_ones(c1):
    train, test = c1
    train = train.copy()
    train[:, 4] = 0.0  # column 4's command never sent in training
    det = build_detector("command_events", window=W).fit(train)
    windows = sliding_windows(test, W, 8)
    quiet = windows[(windows[:, :, 1:] == 0).all(axis=(1, 2))][:1].copy()
    assert len(quiet) == 1 and det.score(quiet)[0] == 0.0  # no command: no news
    usual, novel = quiet.copy(), quiet.copy()
    usual[0, -1, 1] = 1.0  # the most frequent training command
    novel[0, -1, 4] = 1.0
    s_usual, s_novel = det.score(usual)[0], det.score(novel)[0]
    assert 0 < s_usual < 1 < s_novel
    burst = quiet.copy()
    burst[0, -8:, 1] = 1.0  # eight of the usual command in a row: rarer than one
    assert det.score(burst)[0] > s_usual


def test_the_artifact_keeps_which_channels_are_events(c1, tmp_path):
    train, test = c1
    det = build_detector("command_events", window=W, max_states=1).fit(train)
    assert det.event_channels == []  # every column of C-1 takes two or more values here
    det = build_detector("command_events", window=W).fit(train)
    again = load_detector(det.save(tmp_path / "events"))
    windows = sliding_windows(test, W, 8)
    assert again.event_channels == det.event_channels
    np.testing.assert_array_equal(again.score(windows), det.score(windows))
    with pytest.raises(ValueError, match="channels"):
        det.score(windows[:, :, :3])
