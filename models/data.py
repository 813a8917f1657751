"""Dataset loaders: MSL (per-channel entities) and NAB (one CSV per stream).

Both accept either the dataset folder itself or a parent holding it (``datasets/``), so
``--data-dir ../shared/datasets`` works for every dataset.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class MSLEntity:
    """One MSL channel (its own stream): column 0 telemetry, 1..54 one-hot commands."""

    name: str
    train: np.ndarray  # (T_train, 55) float32
    test: np.ndarray  # (T_test, 55) float32
    labels: np.ndarray  # (T_test,) uint8, 1 = anomalous
    train_start: int  # row offsets in the concatenated train.npy / test.npy
    test_start: int


@dataclass(frozen=True)
class NABSeries:
    """One NAB file: a univariate stream with its labelled anomaly windows."""

    name: str  # path relative to the NAB root, e.g. realKnownCause/nyc_taxi.csv
    timestamps: np.ndarray  # (T,) datetime64[s]
    values: np.ndarray  # (T,) float64
    windows: list[tuple[np.datetime64, np.datetime64]]  # inclusive anomaly windows
    labels: np.ndarray  # (T,) uint8: 1 inside a window

    @property
    def probation(self) -> int:
        """NAB's probationary period: the first 15% of points are for learning only."""
        return int(0.15 * len(self.values))


def _dataset_dir(data_dir: str | Path, name: str, marker: str) -> Path:
    path = Path(data_dir)
    if (path / marker).exists():
        return path
    if (path / name / marker).exists():
        return path / name
    raise FileNotFoundError(f"data_dir: no {name} dataset ({marker}) in {path} or {path / name}")


def load_msl(data_dir: str | Path) -> list[MSLEntity]:
    """Per-entity train/test/labels of MSL, in entities.csv order."""
    root = _dataset_dir(data_dir, "msl", "entities.csv")
    train = np.load(root / "train.npy", mmap_mode="r")
    test = np.load(root / "test.npy", mmap_mode="r")
    labels = np.load(root / "test_label.npy", mmap_mode="r")
    if len(labels) != len(test):
        raise ValueError(f"msl: {len(labels)} labels for {len(test)} test rows")
    entities = []
    with (root / "entities.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            a, b = int(row["train_start"]), int(row["train_end"])
            c, d = int(row["test_start"]), int(row["test_end"])
            if not (0 <= a < b <= len(train) and 0 <= c < d <= len(test)):
                raise ValueError(f"msl: entity {row['chan_id']} has rows outside the arrays")
            entities.append(MSLEntity(
                name=row["chan_id"], train=np.asarray(train[a:b], dtype=np.float32),
                test=np.asarray(test[c:d], dtype=np.float32),
                labels=np.asarray(labels[c:d], dtype=np.uint8), train_start=a, test_start=c,
            ))
    return entities


def _read_nab_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    stamps, values = [], []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            stamps.append(row["timestamp"].replace(" ", "T"))
            values.append(float(row["value"]))
    return np.array(stamps, dtype="datetime64[s]"), np.array(values, dtype=np.float64)


def load_nab(data_dir: str | Path) -> list[NABSeries]:
    """Every CSV listed in combined_windows.json that exists under the NAB root, sorted."""
    root = _dataset_dir(data_dir, "nab", "combined_windows.json")
    windows_by_file = json.loads((root / "combined_windows.json").read_text())
    out = []
    for name in sorted(windows_by_file):
        path = root / name
        if not path.is_file():
            continue  # the corpus here is a subset of NAB
        ts, values = _read_nab_csv(path)
        windows = [
            (np.datetime64(a.replace(" ", "T")[:19]), np.datetime64(b.replace(" ", "T")[:19]))
            for a, b in windows_by_file[name]
        ]
        labels = np.zeros(len(ts), dtype=np.uint8)
        for a, b in windows:
            labels[(ts >= a) & (ts <= b)] = 1
        out.append(NABSeries(name, ts, values, windows, labels))
    return out
