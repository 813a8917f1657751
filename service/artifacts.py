"""Fitted detector artifacts served by name: ``detector: "artifact:<name>"``.

An artifact is a directory under ``TSAD_ARTIFACTS_DIR`` (default ``models/pretrained``)
written by ``tsad train`` (or ``Detector.save``): ``config.json`` + ``weights.safetensors``,
optionally ``calibration.json`` whose ``threshold`` becomes the default threshold of the
streams bound to it (SPEAR: the probability cut chosen on validation data).

Loaded artifacts are read-only and shared by every stream that uses them, so each is
loaded once per process (cached by path and modification time: a retrained artifact is
picked up on its next use) and is *not* copied into the streams' state blobs.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from models.detectors import Detector, load_detector
from models.detectors.base import ARTIFACT_CONFIG, ARTIFACT_WEIGHTS, Adaptable

PREFIX = "artifact:"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CALIBRATION = "calibration.json"


@dataclass(frozen=True)
class Artifact:
    name: str
    path: Path
    detector: Detector
    threshold: float | None  # calibrated default threshold, if the artifact has one
    # sha256 (hex, 16 chars) of the weights: a stream's adaptation of an artifact records
    # it, so an adaptation of an older version of the artifact is never applied
    digest: str = ""

    @property
    def window(self) -> int:
        return int(self.detector.config.window)

    @property
    def adaptable(self) -> bool:
        """Streams bound to it may tune their own copy of its soft prompts (SPEAR)."""
        return isinstance(self.detector, Adaptable)

    @property
    def channels(self) -> int | None:
        """Channel count the artifact is bound to (None: any)."""
        return self.detector.fixed_channels


def artifact_name(detector: str) -> str | None:
    """``"artifact:x"`` -> ``"x"``; a plain registered name -> None."""
    return detector[len(PREFIX):] if detector.startswith(PREFIX) else None


def artifact_path(root: str | Path, name: str) -> Path:
    """The artifact's directory; ValueError (naming what is wrong) if invalid or absent."""
    if not NAME_RE.match(name) or ".." in name:
        raise ValueError(f"artifact name {name!r} must be 1-64 of A-Z a-z 0-9 _ . - "
                         "(starting with a letter or digit)")
    path = Path(root) / name
    if not (path / ARTIFACT_CONFIG).is_file() or not (path / ARTIFACT_WEIGHTS).is_file():
        known = list_artifacts(root)
        raise ValueError(f"no artifact {name!r} in {root}; known: {known}")
    return path


def list_artifacts(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if (p / ARTIFACT_CONFIG).is_file() and NAME_RE.match(p.name))


_CACHE: dict[tuple[str, float], Artifact] = {}
_LOCK = threading.Lock()


def load_artifact(root: str | Path, name: str) -> Artifact:
    """The artifact, loaded once per process (per path and weights mtime)."""
    path = artifact_path(root, name)
    key = (str(path.resolve()), (path / ARTIFACT_WEIGHTS).stat().st_mtime)
    with _LOCK:
        if key not in _CACHE:
            detector = load_detector(path)
            threshold = None
            cal = path / CALIBRATION
            if cal.is_file():
                threshold = json.loads(cal.read_text()).get("threshold")
            digest = hashlib.sha256((path / ARTIFACT_WEIGHTS).read_bytes()).hexdigest()
            _CACHE[key] = Artifact(name, path, detector,
                                   None if threshold is None else float(threshold),
                                   digest[:16])
        return _CACHE[key]


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
