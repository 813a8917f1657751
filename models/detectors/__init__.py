"""Detector registry: name -> class.

Every registered detector passes tests/test_detector_contract.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
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
    its config (else ValueError); ``defaults`` apply only to detectors whose config has
    the field, under ``config`` (one override for every detector that has a warm-up)."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"detector: unknown {name!r}; known: {sorted(REGISTRY)}") from None
    known = cls.config_fields()
    applied = {k: v for k, v in (defaults or {}).items() if k in known}
    return cls.from_config_dict(applied | dict(config))


def check_params(name: str, params: Mapping[str, object]) -> None:
    """ValueError naming what is wrong with config overrides for detector ``name``, or
    for every detector that has the field when ``name`` is "*": an unknown detector or
    key, a value not of the type of the field's default, or one its config refuses.

    >>> check_params("ensemble", {"warmup": 64})
    >>> check_params("*", {"warmup": "64"})
    Traceback (most recent call last):
    ValueError: ensemble.warmup: expected int, got '64'
    """
    classes = REGISTRY if name == "*" else {name: REGISTRY.get(name)}
    if None in classes.values():
        raise ValueError(f"unknown detector {name!r}; known: {sorted(REGISTRY)} or '*'")
    known = set().union(*(cls.config_fields() for cls in classes.values()))
    if unknown := sorted(set(params) - known):
        raise ValueError(f"{name}: unknown parameters {unknown}; known: {sorted(known)}")
    for det, cls in classes.items():
        default = cls.Config()
        for f in fields(default):
            expected = getattr(default, f.name)
            if f.name in params and not _fits(params[f.name], expected):
                raise ValueError(f"{det}.{f.name}: expected {type(expected).__name__}, "
                                 f"got {params[f.name]!r}")
        build_detector(det, defaults=params)  # what the config's own checks refuse


def _fits(value: object, default: object) -> bool:
    """Whether ``value`` may stand where the config has ``default`` (JSON's types)."""
    if default is None or value is None:
        return True  # an optional field (None: off), or switching one off
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, float):
        return isinstance(value, int | float)
    if isinstance(default, tuple):
        return isinstance(value, list | tuple)
    return isinstance(value, type(default))


def load_detector(path: str | Path) -> Detector:
    """Rebuild a detector from an artifact directory written by ``Detector.save``."""
    from safetensors.numpy import load_file

    path = Path(path)
    meta = json.loads((path / ARTIFACT_CONFIG).read_text())
    detector = build_detector(meta["detector"], **meta["config"])
    detector.load_state_dict(load_file(str(path / ARTIFACT_WEIGHTS)))
    return detector


__all__ = ["REGISTRY", "Detector", "build_detector", "check_params", "load_detector"]
