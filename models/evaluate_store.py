"""Finished `tsad evaluate` rows on disk, so a crash keeps them and a rerun skips them.

Each row is saved as soon as it is scored (``<key>.npz``: its normalised scores per
entity, test and calibration, which fusion rows read; ``<key>.json``: seconds, notes,
per-entity AUC-ROC) and again when its metrics are done. The key is a digest of
everything the row's scores depend on: its spec (not its label), the dataset's arrays,
the rows it fuses or rescores, the embeddings it reads, and the source of its detector's
module and of the protocol (models/evaluation.py), so a changed row, changed data or
changed detector code is computed again, and anything else is read back.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from models.evaluation import DetectorSpec, EntityScores


def data_digest(entities: list) -> str:
    """The entities' names and arrays (the full MSL: about 30 MB, a fraction of a second)."""
    h = hashlib.sha256()
    for e in entities:
        h.update(e.name.encode())
        for arr in (e.train, e.test, e.labels):
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _source_digest(detector: str) -> str:
    """The code a row's scores come from: the detector's module and the protocol."""
    import models.evaluation as protocol
    from models.detectors import REGISTRY

    h = hashlib.sha256(inspect.getsource(protocol).encode())
    if detector in REGISTRY:
        h.update(inspect.getsource(inspect.getmodule(REGISTRY[detector])).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


def row_keys(specs: list[DetectorSpec], dataset: str, data: str) -> dict[str, str]:
    """label -> key of every row (members' keys go into fusion and rescore rows' keys)."""
    keys: dict[str, str] = {}
    by_label = {s.label: s for s in specs}
    for spec in specs:
        what = {k: v for k, v in asdict(spec).items() if k not in ("label", "id")}
        what["fuse"] = [keys[m] for m in spec.fuse or []]
        what["rescore"] = keys[spec.rescore] if spec.rescore else None
        detector = by_label[spec.rescore].detector if spec.rescore else spec.detector
        parts = {"spec": what, "dataset": dataset, "data": data,
                 "code": _source_digest(detector),
                 "embeddings": _file_digest(Path(spec.embeddings) / "index.json")
                 if spec.embeddings else None}
        keys[spec.label] = hashlib.sha256(
            json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return keys


def artifact_key(path: Path, dataset: str, data: str) -> str:
    parts = {"artifact": str(path.resolve()), "dataset": dataset, "data": data,
             "files": {f.name: _file_digest(f) for f in sorted(path.glob("*"))
                       if f.is_file()}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


class RowStore:
    """Finished rows in a folder (by default runs/eval/<OUT name>/), one pair of files
    per row key."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def load(self, key: str) -> tuple[dict, list[EntityScores]] | None:
        """The row's record and its per-entity scores, or None if never scored."""
        meta, arrays = self.folder / f"{key}.json", self.folder / f"{key}.npz"
        if not (meta.is_file() and arrays.is_file()):
            return None
        record = json.loads(meta.read_text())
        with np.load(arrays) as z:
            parts = [EntityScores(z[f"test_{i}"], z[f"cal_{i}"], notes)
                     for i, notes in enumerate(record["entity_notes"])]
        return record, parts

    def save(self, key: str, record: dict, parts: list[EntityScores] | None = None) -> dict:
        """The record (and, when given, the scores; the record as saved is returned);
        written to a temporary name first, so a crash mid-write leaves the previous
        state, never half a file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if parts is not None:
            arrays = {f"{kind}_{i}": np.asarray(a, dtype=np.float64)
                      for i, p in enumerate(parts)
                      for kind, a in (("test", p.test), ("cal", p.calibration))}
            tmp = self.folder / f"{key}.tmp.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, self.folder / f"{key}.npz")
            record = record | {"entity_notes": [list(p.notes) for p in parts]}
        tmp = self.folder / f"{key}.json.tmp"
        tmp.write_text(json.dumps(record, indent=1, default=float))
        os.replace(tmp, self.folder / f"{key}.json")
        return record
