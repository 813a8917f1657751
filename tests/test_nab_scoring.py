"""NAB scoring (models/nab.py): the official NAB scorer's numbers on this project's
reference scores, and NAB's rules on small constructed files."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from models import nab

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "nab_reference"
# numenta/NAB run.py --optimize --score --normalize (tests/data/nab_reference/README.md)
OFFICIAL_FINAL = {
    "standard": (23.53, 0.651843),
    "reward_low_FP_rate": (15.49, 0.651843),
    "reward_low_FN_rate": (27.39, 0.489642),
}
TOL = 0.05


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[nab.NabFile]:
    """The 35 reference files rebuilt in NAB's layout (their timestamps; values 0, which
    scoring never reads) and read back by load_corpus, as a copy of NAB would be."""
    root = tmp_path_factory.mktemp("nab")
    shutil.copy(REFERENCE / "combined_windows.json", root)
    with np.load(REFERENCE / "timestamps.npz") as stored:
        for key in stored.files:
            stamps = np.datetime_as_string(np.cumsum(stored[key]).astype("datetime64[s]"))
            path = root / key
            path.parent.mkdir(exist_ok=True)
            path.write_text("timestamp,value\n" + "".join(
                f"{s.replace('T', ' ')},0\n" for s in stamps))
    return nab.load_corpus(root)


@pytest.fixture(scope="module")
def reference_scores() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "reference_scores.npz") as z:
        return {key: z[key] for key in z.files}


@pytest.mark.parametrize("profile", sorted(OFFICIAL_FINAL))
def test_official_scores_reproduced(corpus, reference_scores, profile: str) -> None:
    with (REFERENCE / f"official_{profile}_per_file.csv").open(newline="") as fh:
        official = {row["File"] or row["Detector"]: row for row in csv.DictReader(fh)}
    totals = official.pop("Totals")
    final, threshold = OFFICIAL_FINAL[profile]

    result = nab.score_corpus(reference_scores, corpus, profile)

    assert result.score == pytest.approx(final, abs=TOL)
    assert result.threshold == pytest.approx(threshold, abs=TOL)
    assert result.raw == pytest.approx(float(totals["Score"]), abs=TOL)
    assert result.null == -nab.PROFILES[profile].fn * 55  # 55 windows in the 35 files
    assert sorted(r.key for r in result.files) == sorted(official)
    for row in result.files:
        want = official[row.key]
        assert row.raw == pytest.approx(float(want["Score"]), abs=TOL), row.key
        assert (row.tp, row.tn, row.fp, row.fn) == tuple(
            int(want[c]) for c in ("TP", "TN", "FP", "FN")), row.key
    # scoring at the official threshold gives the same numbers
    fixed = nab.score_corpus(reference_scores, corpus, profile, threshold=threshold)
    assert fixed.score == pytest.approx(final, abs=TOL)
    assert fixed.files == result.files


def test_load_corpus_reads_a_partial_copy(corpus) -> None:
    # tests/data/nab_tiny: rows 1850..2249 of one file (real values), its windows listed
    (tiny,) = nab.load_corpus(DATA / "nab_tiny")
    (full,) = [f for f in corpus if f.key == tiny.key]
    np.testing.assert_array_equal(tiny.timestamps, full.timestamps[1850:2250])
    assert tiny.timestamps[0] == 1394718660.0  # 2014-03-13 13:51:00 UTC
    assert tiny.values[0] == 45.68
    # only the first window lies in the slice
    assert tiny.windows == [(full.windows[0][0] - 1850, full.windows[0][1] - 1850)]


def test_load_corpus_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="combined_windows.json"):
        nab.load_corpus(tmp_path)
    shutil.copy(DATA / "nab" / "combined_windows.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="no CSV listed"):
        nab.load_corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match="realKnownCause/nyc_taxi.csv"):
        nab.load_corpus(tmp_path, keys=["realKnownCause/nyc_taxi.csv"])
    with pytest.raises(KeyError, match="art_noisy"):
        nab.load_corpus(tmp_path, keys=["artificialNoAnomaly/art_noisy.csv"])


# --- the rules, on a constructed 1000-row file: probation 150 rows, one 50-row window

ROWS, FIRST, LAST = 1000, 400, 449


def one_file(*rows: int) -> tuple[list[nab.NabFile], dict[str, np.ndarray]]:
    f = nab.NabFile("t.csv", np.arange(ROWS, dtype=float), np.zeros(ROWS), [(FIRST, LAST)])
    scores = np.zeros(ROWS)
    scores[list(rows)] = 1.0
    return [f], {"t.csv": scores}


def raw(*rows: int, profile: str = "standard") -> float:
    corpus, scores = one_file(*rows)
    return nab.score_corpus(scores, corpus, profile, threshold=0.5).raw


@pytest.mark.parametrize("profile", sorted(nab.PROFILES))
def test_window_rewards_and_costs(profile: str) -> None:
    p = nab.PROFILES[profile]
    assert nab.probation_length(ROWS) == 150
    assert raw(FIRST, profile=profile) == pytest.approx(p.tp)  # first row: the full reward
    assert raw(profile=profile) == -p.fn  # a missed window
    assert 0 < raw(425, profile=profile) < raw(FIRST, profile=profile)  # later, less
    # before any window an FP costs the full weight; after one, less the nearer it is
    assert raw(300, FIRST, profile=profile) == pytest.approx(p.tp - p.fp)
    near, far = raw(FIRST, LAST + 5, profile=profile), raw(FIRST, LAST + 400, profile=profile)
    assert far == pytest.approx(p.tp - p.fp)
    assert p.tp - p.fp < near < p.tp
    # NAB's scaled sigmoid of the distance past the window in (width - 1) rows
    assert near == pytest.approx(p.tp + p.fp * (2 / (1 + np.exp(5 * 5 / 49)) - 1))
    # inside, of the distance to the window's end in widths (one row past the end = 0)
    s = 2 / (1 + np.exp(5 * np.array([-1.0, -25 / 50]))) - 1
    assert raw(425, profile=profile) == pytest.approx(p.tp * s[1] / s[0])


def test_probationary_period_is_not_scored() -> None:
    assert raw(10) == raw() == -1.0  # a detection at row 10 costs nothing
    corpus, scores = one_file(10, 149, 150)
    row = nab.score_corpus(scores, corpus, "standard", threshold=0.5).files[0]
    assert (row.tp, row.fp, row.fn, row.tn) == (0, 1, 50, ROWS - 150 - 50 - 1)
    assert nab.probation_length(10_000) == 750  # capped


def test_only_the_first_detection_in_a_window_counts() -> None:
    assert raw(FIRST, 420, LAST) == raw(FIRST)
    assert raw(420, 430) == raw(420)
    corpus, scores = one_file(FIRST, 420, LAST)
    assert nab.score_corpus(scores, corpus, "standard", threshold=0.5).files[0].tp == 3  # rows


@pytest.mark.parametrize("profile", sorted(nab.PROFILES))
def test_perfect_is_100_and_never_firing_is_0(profile: str) -> None:
    corpus, perfect = one_file(FIRST)
    result = nab.score_corpus(perfect, corpus, profile)
    assert result.score == pytest.approx(100.0)
    assert result.threshold == 1.0
    never = {"t.csv": np.zeros(ROWS)}
    assert nab.score_corpus(never, corpus, profile).score == 0.0
    assert nab.score_corpus(never, corpus, profile, threshold=0.5).score == 0.0


def test_binary_detections() -> None:
    # alerts opened at the window's first row and at two far rows after it
    corpus, alerts = one_file(FIRST, 800, 900)
    detections = nab.score_detections(alerts, corpus, "standard")
    assert detections.raw == pytest.approx(1.0 - 2 * 0.11)
    assert detections.files[0].fp == 2
    # the optimiser on {0, 1} scores chooses among: nothing, the alerts, every row
    optimised = nab.score_corpus(alerts, corpus, "standard")
    assert optimised.threshold == 1.0
    assert optimised.score == detections.score


def test_equal_scores_keep_the_highest_threshold() -> None:
    corpus, _ = one_file()
    scores = np.zeros(ROWS)
    scores[FIRST], scores[420] = 0.9, 0.8  # 0.8 adds nothing: the window is already won
    assert nab.score_corpus({"t.csv": scores}, corpus, "standard").threshold == 0.9


def test_sweep_matches_scoring_every_threshold() -> None:
    """The one-pass sweep finds the same best raw score as scoring the corpus at every
    candidate threshold, on random scores with ties over files with several windows."""
    rng = np.random.default_rng(0)
    corpus, scores = [], {}
    for i, windows in enumerate([[(100, 119), (200, 201), (250, 250)], [], [(380, 399)]]):
        key = f"f{i}.csv"
        corpus.append(nab.NabFile(key, np.arange(400.0), np.zeros(400), windows))
        s = np.round(rng.random(400) ** 6, 2)
        for first, _ in windows:
            s[first + 3] = 0.97  # hits worth finding
        scores[key] = s
    for profile in nab.PROFILES:
        best = nab.score_corpus(scores, corpus, profile)
        candidates = np.unique(np.concatenate(list(scores.values())))
        brute = [nab.score_corpus(scores, corpus, profile, threshold=t).raw
                 for t in [*candidates, 1.1]]
        assert best.raw == pytest.approx(max(brute))
        assert best.raw > -nab.PROFILES[profile].fn * 5  # better than never firing


def test_bad_scores_are_named() -> None:
    corpus, scores = one_file()
    with pytest.raises(KeyError, match="t.csv"):
        nab.score_corpus({}, corpus, "standard")
    with pytest.raises(ValueError, match="t.csv"):
        nab.score_corpus({"t.csv": np.zeros(ROWS - 1)}, corpus, "standard")
    with pytest.raises(KeyError, match="profile"):
        nab.score_corpus(scores, corpus, "nope")
