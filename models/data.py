"""Dataset loaders: the MSL layout (per-channel entities) and NAB (one CSV per stream).

The MSL layout is a folder with ``entities.csv`` (chan_id, train_start, train_end,
test_start, test_end: row ranges), ``train.npy`` and ``test.npy`` (T, C) float arrays and
``test_label.npy`` (T,) 0/1: MSL and SMAP as published by the OmniAnomaly line of work, or
any data written that way. A dataset is named by its folder (``msl``, ``SMAP``, any case).
NAB is a folder with ``combined_windows.json`` and the CSVs it names.

Both accept either the dataset folder itself or a parent holding it (``datasets/``), so
``--data-dir ../shared/datasets`` works for every dataset. A clone has no
``../shared/datasets``; ``tests/data`` holds small MSL and NAB slices to try commands on.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
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


class DataNotFound(FileNotFoundError):
    """Input data that is not there; the message says where it was looked for and how to
    get it (the CLI prints it as one line)."""


# Where each dataset comes from, for the one line that says it is missing.
SOURCES = {
    "nab": "NAB's data/ folder (github.com/numenta/NAB) with labels/combined_windows.json "
           "copied into it",
    "msl": "NASA's MSL telemetry (telemanom, Hundman et al. 2018) in the layout of "
           "models/data.py",
}


def _dataset_dir(data_dir: str | Path, name: str, marker: str) -> Path:
    path = Path(data_dir)
    if (path / marker).exists():
        return path
    children = sorted(path.iterdir()) if path.is_dir() else []
    for child in children:  # the folder's name in any case: msl, MSL
        if child.name.lower() == name.lower() and (child / marker).exists():
            return child
    layout = "NAB" if marker == "combined_windows.json" else "MSL"
    source = SOURCES.get(name.lower(), f"a folder {name}/ in the {layout} layout "
                         "(models/data.py)")
    raise DataNotFound(
        f"--data-dir: no {name} dataset ({marker}) in {path} or {path / name}; get "
        f"{source} and point --data-dir at it (`make bench-*`: DATA=...), or try "
        f"--data-dir tests/data (DATA=tests/data: small MSL and NAB slices in the "
        f"repository)")


def nab_path(root: Path, key: str) -> Path | None:
    """The CSV of a ``combined_windows.json`` key (``realKnownCause/nyc_taxi.csv``) under
    the NAB folder ``root``: at that path, else a file of that name beside the JSON (the
    repository's slices keep one file per category without its folder); None if neither.
    """
    for path in (root / key, root / Path(key).name):
        if path.is_file():
            return path
    return None


def run_main(main: Callable[[], int | None]) -> int:
    """A benchmark script's entry point: data that is not there is one line on stderr
    naming what is missing and how to get it (exit 2), not a traceback."""
    try:
        return int(main() or 0)
    except DataNotFound as exc:
        print(f"{Path(sys.argv[0]).name}: {exc}", file=sys.stderr)
        return 2


def load_msl(data_dir: str | Path, name: str = "msl") -> list[MSLEntity]:
    """Per-entity train/test/labels of a dataset in the MSL layout (the folder ``name``
    under ``data_dir``, or ``data_dir`` itself), in entities.csv order."""
    root = _dataset_dir(data_dir, name, "entities.csv")
    train = np.load(root / "train.npy", mmap_mode="r")
    test = np.load(root / "test.npy", mmap_mode="r")
    labels = np.load(root / "test_label.npy", mmap_mode="r")
    if len(labels) != len(test):
        raise ValueError(f"{name}: {len(labels)} labels for {len(test)} test rows")
    entities = []
    with (root / "entities.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            a, b = int(row["train_start"]), int(row["train_end"])
            c, d = int(row["test_start"]), int(row["test_end"])
            if not (0 <= a < b <= len(train) and 0 <= c < d <= len(test)):
                raise ValueError(f"{name}: entity {row['chan_id']} has rows outside the "
                                 "arrays")
            entities.append(MSLEntity(
                name=row["chan_id"], train=np.asarray(train[a:b], dtype=np.float32),
                test=np.asarray(test[c:d], dtype=np.float32),
                labels=np.asarray(labels[c:d], dtype=np.uint8), train_start=a, test_start=c,
            ))
    return entities


def select_entities(entities: list[MSLEntity], which: str | int | None) -> list[MSLEntity]:
    """``--entities``: all (None, 0, "", "all"), the first N (a number), or names
    (comma-separated, in the given order).

    >>> es = [MSLEntity(n, np.zeros(0), np.zeros(0), np.zeros(0), 0, 0) for n in "ABC"]
    >>> [e.name for e in select_entities(es, "2")], [e.name for e in select_entities(es, "C,A")]
    (['A', 'B'], ['C', 'A'])
    """
    text = str(which or "").strip()
    if text in ("", "0", "all"):
        return entities
    if text.isdigit():
        return entities[: int(text)]
    by_name = {e.name: e for e in entities}
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"--entities: {unknown} not in the dataset (it has "
                         f"{', '.join(by_name)})")
    return [by_name[n] for n in names]


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
        path = nab_path(root, name)
        if path is None:
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
