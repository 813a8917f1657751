"""Operator feedback on a stream: labelled time ranges, and few-label adaptation of a SPEAR
stream's soft prompts.

``POST /streams/{id}/feedback`` labels ranges of the stream's own timeline as
``false_positive`` / ``normal`` (target 0) or ``missed_anomaly`` / ``anomaly`` (target 1).
The store keeps only a stream's last ``window`` points, so a range is turned into
*labelled windows* when the feedback arrives: each window ends at a point inside the
range and holds that point and the ``window - 1`` before it (exactly what the detector
scored there). The points come from the stream's stored window, or from the range's
inline ``points`` when the service no longer holds them. At most
``TSAD_FEEDBACK_WINDOWS_PER_RANGE`` windows are kept per range (evenly spread over it),
and the stream keeps its last ``TSAD_FEEDBACK_MAX_RANGES`` ranges with their windows. A
range whose points are no longer held (and not sent inline) is kept without windows: it
still labels the stream's timeline, which shadow reports score on
(``service/shadows/report.py``); adapting on it is refused (422).

The feedback lives in the stream's state (section ``fb``), beside the detector, threshold
and alert state, so it survives a restart and every replica sees it; rebinding the stream
to another detector or window drops it with the rest of the state.

Adaptation (``adapt: true``, streams bound to a SPEAR artifact only) copies the
artifact's soft prompts and head, tunes the copy on every stored labelled window (plus
recent windows the model judged normal, as negatives) and stores the result in the
state (section ``ada``, about 31 KiB for 20 MiniLM prompts). The shared artifact and the LM
never change; the stream's next scores use its own prompts, other streams bound to the
same artifact are unaffected. Each adaptation starts again from the artifact, so the
result depends on the feedback kept, not on how often it was requested. An adaptation
records the artifact's weights digest: if the artifact is retrained, the stale adaptation
is ignored (the feedback stays, ready to adapt again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import get_args

import numpy as np

from service.feedback.schemas import FeedbackLabel

LABELS: tuple[str, ...] = get_args(FeedbackLabel)  # index = the stored label code
TARGETS = {"false_positive": 0, "normal": 0, "missed_anomaly": 1, "anomaly": 1}
# windows added as negatives (recent windows judged normal) have this label code
RECENT_NORMAL = len(LABELS)


@dataclass
class FeedbackSet:
    """A stream's labelled ranges and their windows, bounded.

    ``ranges`` rows: (id, start, end, label code, received_at); ``windows`` (N, W, C)
    float32 with ``window_range`` (N,) the id of the range each came from (negatives go
    with their request's last range) and ``window_target`` (N,) 0 or 1.
    """

    window: int
    channels: int
    ranges: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    windows: np.ndarray | None = None
    window_range: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    window_target: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    window_label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    next_id: int = 0

    def __post_init__(self) -> None:
        if self.windows is None:
            self.windows = np.zeros((0, self.window, self.channels), np.float32)

    def __len__(self) -> int:
        return len(self.ranges)

    def add(self, ranges: list[tuple[float, float, str, np.ndarray]], negatives: np.ndarray,
            max_ranges: int) -> None:
        """Append ranges (start, end, label, windows (n, W, C)) and negatives (n, W, C),
        then keep the newest ``max_ranges`` ranges and their windows."""
        now = time.time()
        rows, wins, ids, targets, labels = [], [], [], [], []
        for start, end, label, w in ranges:
            rid = self.next_id
            self.next_id += 1
            rows.append((rid, start, end, LABELS.index(label), now))
            wins.append(w)
            ids.append(np.full(len(w), rid))
            targets.append(np.full(len(w), TARGETS[label]))
            labels.append(np.full(len(w), LABELS.index(label)))
        if len(negatives) and rows:
            wins.append(negatives)
            ids.append(np.full(len(negatives), rows[-1][0]))
            targets.append(np.zeros(len(negatives)))
            labels.append(np.full(len(negatives), RECENT_NORMAL))
        self.ranges = np.concatenate([self.ranges, np.array(rows, np.float64).reshape(-1, 5)])
        self.windows = np.concatenate([self.windows, *[w.astype(np.float32) for w in wins]])
        self.window_range = np.concatenate([self.window_range, *ids]).astype(np.int64)
        self.window_target = np.concatenate([self.window_target, *targets]).astype(np.int8)
        self.window_label = np.concatenate([self.window_label, *labels]).astype(np.int8)
        if len(self.ranges) > max_ranges:
            self.ranges = self.ranges[-max_ranges:]
            keep = np.isin(self.window_range, self.ranges[:, 0].astype(np.int64))
            self.windows = self.windows[keep]
            self.window_range = self.window_range[keep]
            self.window_target = self.window_target[keep]
            self.window_label = self.window_label[keep]

    def windows_of(self, range_id: int) -> int:
        return int(((self.window_range == range_id)
                    & (self.window_label != RECENT_NORMAL)).sum())

    # --- the state section ---------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        if not len(self.ranges):
            return {}
        return {"ranges": self.ranges, "windows": self.windows,
                "window_range": self.window_range, "window_target": self.window_target,
                "window_label": self.window_label,
                "next_id": np.array([self.next_id], np.int64)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], window: int,
                   channels: int) -> FeedbackSet:
        out = cls(window, channels)
        if state and state["windows"].shape[1:] == (window, channels):
            out.ranges = np.asarray(state["ranges"], np.float64)
            out.windows = np.asarray(state["windows"], np.float32)
            out.window_range = np.asarray(state["window_range"], np.int64)
            out.window_target = np.asarray(state["window_target"], np.int8)
            out.window_label = np.asarray(state["window_label"], np.int8)
            out.next_id = int(state["next_id"][0])
        return out


def windows_ending_in(points: np.ndarray, start: float, end: float, window: int,
                      limit: int) -> np.ndarray:
    """The full windows (n <= limit, W, C) of ``points`` (K, 1 + C; timestamp first,
    increasing) whose newest point lies in [start, end], evenly spread over the range.

    >>> pts = np.c_[np.arange(10.0), np.arange(10.0)]
    >>> windows_ending_in(pts, 5, 8, window=3, limit=2)[..., 0].tolist()
    [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    """
    ts = points[:, 0]
    ends = np.flatnonzero((ts >= start) & (ts <= end) & (np.arange(len(ts)) >= window - 1))
    if len(ends) > limit:
        ends = ends[np.unique(np.round(np.linspace(0, len(ends) - 1, limit)).astype(int))]
    if not len(ends):
        return np.zeros((0, window, points.shape[1] - 1))
    return np.stack([points[j - window + 1:j + 1, 1:] for j in ends])


def recent_windows(points: np.ndarray, window: int, ranges: list[tuple[float, float, int]],
                   limit: int) -> np.ndarray:
    """Candidate negatives: the newest full windows (at most ``limit``) of ``points``
    whose newest point is in no labelled range and which overlap no range labelled
    anomalous (ranges: (start, end, target))."""
    ts = points[:, 0]
    out = []
    for j in range(len(points) - 1, window - 2, -1):
        t_first, t_last = ts[j - window + 1], ts[j]
        if any(s <= t_last <= e for s, e, _ in ranges) or any(
                target and s <= t_last and e >= t_first for s, e, target in ranges):
            continue
        out.append(points[j - window + 1:j + 1, 1:])
        if len(out) >= limit:
            break
    return np.stack(out) if out else np.zeros((0, window, points.shape[1] - 1))


# what ``ada.info`` holds, in order (NaN: none); the API's AdaptationOut fields
ADAPTATION_INFO = ("steps", "seconds", "windows", "positives", "loss_before", "loss_after",
                   "anomalous_probability_before", "anomalous_probability_after",
                   "normal_probability_before", "normal_probability_after", "bytes",
                   "created_at")


def adaptation_info(report: dict, targets: np.ndarray, nbytes: int) -> np.ndarray:
    """The finetune report as the ``ada.info`` row (ADAPTATION_INFO order)."""
    pos = np.asarray(targets) > 0

    def mean(p: np.ndarray, mask: np.ndarray) -> float:
        return float(p[mask].mean()) if mask.any() else float("nan")

    before, after = report["proba_before"], report["proba_after"]
    return np.array([report["steps"], report["seconds"], len(pos), pos.sum(),
                     report["loss_before"], report["loss_after"], mean(before, pos),
                     mean(after, pos), mean(before, ~pos), mean(after, ~pos), nbytes,
                     time.time()], dtype=np.float64)


def info_dict(info: np.ndarray) -> dict[str, float | int | None]:
    """``ada.info`` back to named fields (NaN -> None, counts as int)."""
    out: dict[str, float | int | None] = {}
    for name, value in zip(ADAPTATION_INFO, np.asarray(info, np.float64), strict=True):
        if not np.isfinite(value):
            out[name] = None
        elif name in ("steps", "windows", "positives", "bytes"):
            out[name] = int(value)
        else:
            out[name] = round(float(value), 6)
    return out
