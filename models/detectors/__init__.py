"""Detector registry: name -> class.

Every registered detector passes tests/test_detector_contract.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from models.detectors.base import ARTIFACT_CONFIG, ARTIFACT_WEIGHTS, Detector
from models.detectors.cma import CMA
from models.detectors.command_events import CommandEvents
from models.detectors.embedding_memory import EmbeddingMemory
from models.detectors.ensemble import Ensemble
from models.detectors.fusion import Fusion
from models.detectors.isolation_forest import IsolationForest
from models.detectors.pca import PcaReconstruction
from models.detectors.raw_knn import RawKnn
from models.detectors.residual_linear import ResidualLinear
from models.detectors.spear import Spear
from models.detectors.ssm_llm import SSMLLM

REGISTRY: dict[str, type[Detector]] = {cls.name: cls for cls in (
    Ensemble, ResidualLinear, RawKnn, PcaReconstruction, IsolationForest, EmbeddingMemory,
    Spear, CMA, Fusion, SSMLLM, CommandEvents)}


def build_detector(name: str, *, defaults: Mapping[str, object] | None = None,
                   **config: object) -> Detector:
    """A fresh, unfitted detector by registered name. ``config`` keys must be fields of
    its config (else ValueError); ``defaults`` are service-wide knobs (warm-up, memory
    size) applied only to detectors whose config has them, under ``config``."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"detector: unknown {name!r}; known: {sorted(REGISTRY)}") from None
    known = cls.config_fields()
    applied = {k: v for k, v in (defaults or {}).items() if k in known}
    return cls.from_config_dict(applied | dict(config))


def load_detector(path: str | Path) -> Detector:
    """Rebuild a detector from an artifact directory written by ``Detector.save``."""
    from safetensors.numpy import load_file

    path = Path(path)
    meta = json.loads((path / ARTIFACT_CONFIG).read_text())
    detector = build_detector(meta["detector"], **meta["config"])
    detector.load_state_dict(load_file(str(path / ARTIFACT_WEIGHTS)))
    return detector


__all__ = ["REGISTRY", "Detector", "build_detector", "load_detector"]
