"""The evaluation protocol of `tsad evaluate`: point-wise scores against point labels, TSB-AD's
metric implementations ("The Elephant in the Room", NeurIPS 2024), no point adjustment.

Metrics: AUC-ROC, Standard-F1 (best F1 over thresholds, no point adjustment),
Affiliation-F1 (best over TSB-AD's 100 thresholds), VUS-ROC and VUS-PR (the headline).

Protocol for a dataset of entities (MSL's 27 channels, NAB files): every entity is its
own stream. A detector is fitted on the entity's *training* split only; its test scores
are normalised with statistics of scores on held-out training data (the last
``calibration`` share of the training split, scored by a model fitted on the rest), so
entities are comparable when concatenated. No test label is used anywhere but in the
metrics.

Degenerate entities are handled and noted (``EntityScores.notes``, in the report): a
training split too short for a held-out tail of one window is calibrated on the model's
own training scores; one shorter than a window is not scored (0); channels constant in
training score 0 in the detectors that learn a per-channel scale (``constant_channels``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from models.detectors import Detector, build_detector
from models.detectors.base import aggregate_channels, sliding_windows

METRICS = ("AUC-ROC", "Standard-F1", "Affiliation-F1", "VUS-ROC", "VUS-PR")


def evaluate_scores(scores: np.ndarray, labels: np.ndarray,
                    sliding_window: int = 100) -> dict[str, float]:
    """The five protocol metrics (fractions in [0, 1]) of point scores against labels."""
    from TSB_AD.evaluation.basic_metrics import basic_metricor
    from TSB_AD.evaluation.metrics import generate_curve

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ")
    grader = basic_metricor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, _, _, _, _, vus_roc, vus_pr = generate_curve(labels, scores, sliding_window,
                                                           "opt", 250)
        return {
            "AUC-ROC": float(grader.metric_ROC(labels, scores)),
            "Standard-F1": float(grader.metric_PointF1(labels, scores)),
            "Affiliation-F1": float(grader.metric_Affiliation(labels, scores)),
            "VUS-ROC": float(vus_roc),
            "VUS-PR": float(vus_pr),
        }


def spread_window_scores(window_scores: np.ndarray, n_points: int, window: int,
                         stride: int, how: str = "max") -> np.ndarray:
    """Window scores -> point scores. Window i covers points [i*stride, i*stride+window).

    ``newest``: a point takes the score of the window it ends (stride 1 detectors that
    score their newest point); ``max`` / ``mean``: a point takes the max / mean of the
    windows covering it. Points no window covers take the nearest window's score.

    >>> spread_window_scores(np.array([1.0, 5.0]), 6, window=4, stride=2).tolist()
    [1.0, 1.0, 5.0, 5.0, 5.0, 5.0]
    >>> spread_window_scores(np.array([1.0, 5.0, 2.0]), 6, 4, 1, how="newest").tolist()
    [1.0, 1.0, 1.0, 1.0, 5.0, 2.0]
    """
    window_scores = np.asarray(window_scores, dtype=np.float64)
    starts = np.arange(len(window_scores)) * stride
    out = np.full(n_points, np.nan)
    if how == "newest":
        out[starts + window - 1] = window_scores
    elif how in ("max", "mean"):
        total = np.zeros(n_points)
        count = np.zeros(n_points)
        for s, v in zip(starts, window_scores, strict=True):
            if how == "max":
                seg = out[s:s + window]
                out[s:s + window] = np.where(np.isnan(seg), v, np.maximum(seg, v))
            else:
                total[s:s + window] += v
                count[s:s + window] += 1
        if how == "mean":
            out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    else:
        raise ValueError(f"spread: unknown {how!r} (newest | max | mean)")
    # Fill uncovered points (before the first window, after the last) from neighbours.
    idx = np.arange(n_points)
    known = ~np.isnan(out)
    if not known.any():
        return np.zeros(n_points)
    return np.interp(idx, idx[known], out[known], left=out[known][0], right=out[known][-1])


@dataclass
class DetectorSpec:
    """One row of an evaluation table: a registered detector and how to run it."""

    label: str
    detector: str = ""  # empty for a fusion row
    params: dict = field(default_factory=dict)
    columns: Sequence[int] | None = None  # input columns; None = all
    stride: int = 1  # test windows scored every `stride` points
    spread: str = "newest"  # how window scores become point scores
    calibration: float = 0.2  # held-out share of the training split for normalisation
    # memory rows: read features from this `tsad embed` output instead of running the LM
    # (window and stride come from it; the row's columns must be among its channels)
    embeddings: str | None = None
    # fusion rows: labels of earlier rows whose normalised scores are fused per entity
    # (models.fusion: method z | rank, weights train | equal, from training scores only)
    fuse: Sequence[str] | None = None
    method: str = "z"
    weights: str = "train"
    # rescore rows: the label of an earlier row whose fitted models (held-out and full)
    # this row scores again, with ``params`` replacing scoring-only config fields (e.g.
    # SPEAR's ``score``): two scorings of one fit, side by side, at the cost of one fit
    rescore: str | None = None
    # a short name other rows (`fuse`, `rescore`) and `tsad evaluate --rows` may use
    id: str | None = None

    def build(self) -> Detector:
        return build_detector(self.detector, **self.params)


@dataclass
class EntityScores:
    """One row's normalised scores of one entity: test points, and its training data's
    calibration scores on the same scale (what fusion weights are learnt from)."""

    test: np.ndarray
    calibration: np.ndarray
    notes: list[str] = field(default_factory=list)  # how a degenerate entity was handled
    # the fitted models ("full"; "held": fitted without the calibration tail), kept only
    # for rows a rescore row names
    models: dict[str, Detector] = field(default_factory=dict)


def rescored(det: Detector, params: dict) -> Detector:
    """A shallow copy of a fitted detector with scoring-only config fields replaced (its
    learnt state is shared, never changed); the config is checked as any config is."""
    copy_ = copy.copy(det)
    copy_.config = type(det).from_config_dict({**asdict(det.config), **params}).config
    return copy_


def select(x: np.ndarray, columns: Sequence[int] | None) -> np.ndarray:
    return x if columns is None else x[:, list(columns)]


def score_series(det: Detector, series: np.ndarray, stride: int, spread: str) -> np.ndarray:
    """Point scores of a whole series with a fitted detector."""
    window = det.config.window
    windows = sliding_windows(series, window, stride)
    return spread_window_scores(det.score(windows), len(series), window, stride, spread)


def score_entity(spec: DetectorSpec, train: np.ndarray, test: np.ndarray,
                 on_model: Callable[[Detector], None] | None = None) -> np.ndarray:
    """Normalised point scores of one entity's test split (fit on its train split only)."""
    return score_entity_full(spec, train, test, on_model).test


def score_entity_full(spec: DetectorSpec, train: np.ndarray, test: np.ndarray,
                      on_model: Callable[[Detector], None] | None = None,
                      entity: str | None = None, keep_models: bool = False,
                      fitted: EntityScores | None = None) -> EntityScores:
    """``score_entity`` plus the normalised calibration scores; ``entity`` names the
    stream in ``spec.embeddings``. ``keep_models`` keeps the fitted models in the result;
    ``fitted`` (a rescore row) is an earlier result with kept models, scored again."""
    if spec.embeddings:
        return _score_entity_features(spec, entity, len(test))
    train, test = select(train, spec.columns), select(test, spec.columns)
    if fitted is not None and not fitted.models:  # the source row did not score it
        return EntityScores(np.zeros(len(test)), np.zeros(1), list(fitted.notes))
    window = (fitted.models["full"] if fitted is not None else spec.build()).config.window
    if len(train) < window:
        return EntityScores(np.zeros(len(test)), np.zeros(1), [
            f"training split of {len(train)} points is shorter than the window ({window}): "
            "not scored (all 0)"])

    def fit(part: np.ndarray, role: str) -> Detector:
        if fitted is not None:
            return rescored(fitted.models[role], spec.params)
        return spec.build().fit(part)

    det = fit(train, "full")
    models = {"full": det}
    notes = [f"channels {det.constant_channels} constant in training: scored 0"
             ] if det.constant_channels else []
    if on_model is not None:
        on_model(det)
    center, scale, cal = 0.0, 1.0, None
    if spec.calibration > 0:
        if (normal := det.calibration_scores()) is not None:  # memories: leave-one-out
            cal = aggregate_channels(normal, det.config.aggregate)
        else:  # a model fitted on the rest scores the held-out end of the training split
            share = len(train) - int(len(train) * (1 - spec.calibration))
            tail = max(share, window)  # at least one window to score
            if len(train) - tail >= window:
                if tail > share:
                    notes.append(f"training split of {len(train)} points: calibration tail "
                                 f"widened to one window ({window} points)")
                held = models["held"] = fit(train[:-tail], "held")
                cal = score_series(held, train[-tail:], spec.stride, spec.spread)
            else:  # no room for both parts: the model's own (optimistic) training scores
                notes.append(f"training split of {len(train)} points is shorter than two "
                             f"windows ({2 * window}): calibrated on the model's own "
                             "training scores")
                cal = score_series(det, train, spec.stride, spec.spread)
        if cal is not None and len(cal):
            center, scale = robust_center_scale(cal)
    test_scores = score_series(det, test, spec.stride, spec.spread)
    cal = np.zeros(0) if cal is None else np.asarray(cal, dtype=np.float64)
    return EntityScores((test_scores - center) / scale, (cal - center) / scale, notes,
                        models if keep_models else {})


def check_embeddings(spec: DetectorSpec, dataset: str, data_dir: str | Path) -> None:
    """A row that reads ``tsad embed`` output fails early, naming the command that makes it."""
    if spec.embeddings and not (Path(spec.embeddings) / "index.json").is_file():
        from models.data import DataNotFound

        raise DataNotFound(
            f"{spec.label}: no embeddings in {spec.embeddings} (index.json); make them with "
            f"`tsad embed --dataset {dataset} --data-dir {data_dir} --window W --stride S "
            f"--out {spec.embeddings}` (the config's comments give the flags; `make "
            "bench-memory-msl` makes those of configs/eval/msl_memory.yaml)")


def _score_entity_features(spec: DetectorSpec, entity: str | None,
                           n_test: int) -> EntityScores:
    """A memory row on precomputed embeddings: memory = the entity's training windows,
    normalised by their leave-one-out distances (training data only)."""
    from models.lm.precompute import load_precomputed

    if entity is None:
        raise ValueError(f"{spec.label}: embeddings need the entity's name")
    train, index = load_precomputed(spec.embeddings, "train")
    test, _ = load_precomputed(spec.embeddings, "test")
    window, stride = index["window"], index["stride"]
    if spec.params.get("window", window) != window:
        raise ValueError(f"{spec.label}: window {spec.params['window']} but the embeddings "
                         f"in {spec.embeddings} have window {window}")
    channels = index.get("channels") or list(range(train.shape[1]))
    wanted = list(spec.columns) if spec.columns is not None else channels
    missing = sorted(set(wanted) - set(channels))
    if missing:
        raise ValueError(f"{spec.label}: columns {missing} are not in {spec.embeddings}")
    cols = [channels.index(c) for c in wanted]
    rows = {}
    for split, arr in (("train", train), ("test", test)):
        seg = {s["stream"]: s for s in index["splits"][split]["segments"]}[entity]
        rows[split] = np.asarray(arr[seg["row"]:seg["row"] + seg["count"]][:, cols],
                                 dtype=np.float32)
    det = build_detector(spec.detector, **{**spec.params, "window": window, "stride": stride,
                                           "memory_size": max(len(rows["train"]), 1)})
    det.fit_features(rows["train"])
    agg = det.config.aggregate
    window_scores = aggregate_channels(det.score_features(rows["test"]), agg)
    test_scores = spread_window_scores(window_scores, n_test, window, stride, spec.spread)
    cal = aggregate_channels(det.calibration_scores(), agg)
    center, scale = robust_center_scale(cal) if spec.calibration > 0 else (0.0, 1.0)
    return EntityScores((test_scores - center) / scale, (cal - center) / scale)


def fuse_entity(spec: DetectorSpec, members: Sequence[EntityScores]) -> EntityScores:
    """A fusion row for one entity from its member rows (``models.fusion``), calibrated
    and weighted by the members' training-data scores."""
    from models.fusion import Calibration, fuse, weights_from_training

    if any(len(m.calibration) == 0 for m in members):
        raise ValueError(f"{spec.label}: every fused row needs calibration scores: set "
                         "calibration > 0 on the rows it fuses")
    cals = [Calibration.of(m.calibration) for m in members]
    weights = weights_from_training(cals, spec.weights)
    return EntityScores(fuse([m.test for m in members], cals, weights, spec.method),
                        np.zeros(0))


def robust_center_scale(cal: np.ndarray) -> tuple[float, float]:
    """Median and IQR (std, then 1, where the IQR is 0) of calibration scores.

    >>> robust_center_scale(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    (3.0, 2.0)
    """
    iqr = float(np.quantile(cal, 0.75) - np.quantile(cal, 0.25))
    return float(np.median(cal)), iqr or float(np.std(cal)) or 1.0
