"""Settings hold service settings only: detector tunables are the detectors' own Config
defaults, which operators override per detector with TSAD_DETECTOR_PARAMS."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from models.detectors import REGISTRY
from service.scoring import stream_detector
from service.settings import MOVED, Settings


def test_a_streams_detector_takes_its_config_defaults_then_the_overrides(monkeypatch):
    plain = stream_detector(Settings(), "ensemble", 32)
    assert plain.config == REGISTRY["ensemble"].Config(window=32)
    monkeypatch.setenv("TSAD_DETECTOR_PARAMS", '{"*": {"warmup": 64, "memory_size": 32}, '
                       '"residual_linear": {"warmup": 96, "max_lags": 8}}')
    settings = Settings()
    ensemble = stream_detector(settings, "ensemble", 32)
    assert (ensemble.config.warmup, ensemble.config.window) == (64, 32)
    linear = stream_detector(settings, "residual_linear", 32)  # its own entry wins over "*"
    assert (linear.config.warmup, linear.config.max_lags) == (96, 8)
    assert stream_detector(settings, "raw_knn", 32).config.memory_size == 32


@pytest.mark.parametrize("params,named", [
    ({"ensembel": {"warmup": 64}}, "unknown detector 'ensembel'"),
    ({"ensemble": {"warmpu": 64}}, "unknown parameters ['warmpu']"),
    ({"*": {"nope": 1}}, "unknown parameters ['nope']"),
    ({"*": {"warmup": "64"}}, "warmup: expected int"),
    ({"raw_knn": {"admit_quantile": "high"}}, "admit_quantile"),
    ({"ensemble": {"members": ["range", "magic"]}}, "members"),
    ({"*": {"window": 16}}, "window"),
])
def test_bad_detector_params_stop_the_service_naming_what(params, named):
    with pytest.raises(ValidationError, match="detector_params") as exc:
        Settings(detector_params=params)
    assert named in str(exc.value)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_removed_detector_setting_is_refused_with_its_replacement(monkeypatch, old):
    monkeypatch.setenv(old, "0" if "ADMIT" in old else "64")
    with pytest.raises(ValidationError, match=f"{old} was removed") as exc:
        Settings()
    replacement = "null" if "ADMIT" in old else "64"
    assert f'TSAD_DETECTOR_PARAMS=\'{{"*": {{"{MOVED[old]}": {replacement}}}}}\'' in str(exc.value)
