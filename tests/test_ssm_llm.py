"""SSM x LLM detector (models/detectors/ssm_llm.py) on the real MSL slice (tests/data/msl)
with the real MiniLM: `tsad train` writes an artifact that carries its config and loss
curve, the loss goes down, the frozen LM is unchanged by training, the artifact reloads to
identical scores, the principal memory starts on the embeddings' principal directions, a
mambapy state_dict loads into the mamba_ssm module (CUDA) with equal outputs, and the
`tsad embed` output serves the detector's prompts without the LM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.data import load_msl
from models.detectors import build_detector, load_detector
from models.detectors.base import sliding_windows
from models.detectors.ssm_llm import build_net, mamba_mixer
from service.cli import main as tsad

DATA = Path(__file__).parent / "data"
W = 16
TINY = {"window": W, "d_model": 8, "memory_size": 4, "linear_rank": 4, "train_stride": 4,
        "max_steps": 40, "eval_every": 10, "patience": 0, "batch_size": 32, "lr": 0.01,
        "seed": 3}
# what mamba_ssm.Mamba names its parameters (v2): the CPU module must match to share weights
MAMBA_SSM_KEYS = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                  "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight"}


def lm_state() -> dict[str, torch.Tensor]:
    from models.lm.encoder import shared_encoder

    model = shared_encoder(model_path=None, pooling="last").model  # what cached_encoder wraps
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny artifact from `tsad train`, and the LM's weights from before training."""
    before = lm_state()
    root = tmp_path_factory.mktemp("artifacts")
    cfg = {"name": "ssm-llm-tiny", "detector": "ssm_llm", "params": TINY,
           "data": {"dataset": "msl", "columns": [0]}, "calibration": 0.2}
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert tsad(["train", "--config", str(config), "--data-dir", str(DATA),
                 "--out", str(root / "ssm-llm-tiny")]) == 0
    return root / "ssm-llm-tiny", before


def test_tsad_train_artifact_carries_config_and_curve_and_loss_goes_down(trained):
    artifact, _ = trained
    meta = json.loads((artifact / "config.json").read_text())
    assert meta["detector"] == "ssm_llm"
    assert {k: meta["config"][k] for k in TINY} == TINY  # the config travels
    det = load_detector(artifact)
    assert det.config.d_model == 8 and det.config.use_lm and det.config.use_mamba
    report = json.loads((artifact / "training_curve.json").read_text())
    curve = report["curve"]
    assert len(curve) == TINY["max_steps"] // TINY["eval_every"]
    assert curve[-1]["train_loss"] < 0.8 * curve[0]["train_loss"]
    assert report["mamba_backend"] == "mambapy"


def test_the_language_model_is_unchanged_by_training(trained):
    _, before = trained
    after = lm_state()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_artifact_reloads_to_identical_scores(trained):
    artifact, _ = trained
    det = load_detector(artifact)
    windows = sliding_windows(load_msl(DATA)[0].test[:, :1].astype(np.float64), W, 8)
    again = load_detector(artifact)
    scores = det.channel_scores(windows)
    assert scores.shape == (len(windows), 1) and np.isfinite(scores).all()
    np.testing.assert_array_equal(again.channel_scores(windows), scores)


def test_shapes_and_the_memory_starts_on_the_principal_directions():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((300, 2)).cumsum(axis=0)
    det = build_detector("ssm_llm", **{**TINY, "max_steps": 0}).fit(train)
    windows = sliding_windows(train, W, 4)
    emb = det.embed(windows)  # (B, C, D)
    assert emb.shape == (len(windows), 2, det._lm_dim)
    # the memory is initialised before training; 0 steps leave it as initialised
    n_train = len(windows) - int(len(windows) * det.config.val_share)
    flat = emb[:n_train].reshape(-1, emb.shape[-1]).astype(np.float64)
    _, _, vt = np.linalg.svd(flat - flat.mean(0), full_matrices=False)
    memory = det._net.memory.detach().numpy().astype(np.float64)
    unit = memory / np.linalg.norm(memory, axis=1, keepdims=True)
    np.testing.assert_allclose(np.abs((unit * vt[:4]).sum(1)), 1.0, atol=1e-3)
    x = torch.tensor(windows[:5], dtype=torch.float32)
    out, aux = det._net(x, torch.as_tensor(emb[:5]))
    assert out.shape == (5, W, 2) and aux["h"].shape == aux["s"].shape == (10, 8)
    assert det.channel_scores(windows[:5]).shape == (5, 2)


def test_ablations_change_the_network_not_the_training():
    no_lm = build_detector("ssm_llm", **TINY, use_lm=False)
    assert not no_lm.costly and build_detector("ssm_llm", **TINY).costly
    stats = build_detector("ssm_llm", **{**TINY, "max_steps": 5}, semantic="stats")
    assert not stats.costly  # the control reads the window's numbers, never the LM
    windows = np.random.default_rng(1).standard_normal((3, W, 2))
    assert stats.embed(windows).shape == (3, 2, 4)
    keys = set(build_net(build_detector("ssm_llm", **TINY, use_mamba=False).config, 384,
                         "mambapy").state_dict())
    assert not any("A_log" in k for k in keys) and "memory" in keys
    keys = set(build_net(build_detector("ssm_llm", **TINY, use_memory=False).config, 384,
                         "mambapy").state_dict())
    assert "memory" not in keys and any("A_log" in k for k in keys)
    keys = set(build_net(no_lm.config, 0, "mambapy").state_dict())
    assert not any(k.startswith(("sem_", "memory")) for k in keys)


def test_patch_tokens_train_the_projection_through_the_frozen_lm(tmp_path):
    """semantic "patches": the window's patches go through the LM in every step; the
    projection learns, the loss goes down, the LM's weights do not move and stay out of
    the artifact, and the artifact reloads to identical scores."""
    from models.lm.encoder import frozen_lm

    lm = frozen_lm(None, "cpu").model
    before = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    train = load_msl(DATA)[0].train[:600, :1].astype(np.float64)
    det = build_detector("ssm_llm", **{**TINY, "max_steps": 30}, semantic="patches",
                         patch_len=4)
    assert det.costly
    initial = build_detector("ssm_llm", **{**TINY, "max_steps": 0}, semantic="patches",
                             patch_len=4).fit(train)._net.patch_in.weight.detach().clone()
    det.fit(train)
    assert not torch.equal(det._net.patch_in.weight.detach(), initial)  # it learnt
    curve = det.history
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]
    for k, v in lm.state_dict().items():
        assert torch.equal(v, before[k]), k
    state = det.state_dict()
    assert "net.patch_in.weight" in state  # the projection travels, the LM does not:
    assert not any(k.startswith(("net.lm.", "net.encoder.", "net.embeddings.")) for k in state)
    assert sum(v.size for v in state.values()) < 10_000
    assert det.embed(np.zeros((2, W, 1))) is None  # nothing precomputed: the net runs the LM
    windows = sliding_windows(load_msl(DATA)[0].test[:200, :1].astype(np.float64), W, 8)
    det.save(tmp_path / "patches")
    np.testing.assert_array_equal(load_detector(tmp_path / "patches").score(windows),
                                  det.score(windows))
    with pytest.raises(ValueError, match="patch_len"):
        build_detector("ssm_llm", window=W, semantic="patches", patch_len=5)


def test_series_normalisation_sees_a_window_wholly_at_an_unusual_level(tmp_path):
    """Window RevIN reads each window against itself: a window moved wholly to a new level
    is the same window to it. Series normalisation reads it in the training split's units."""
    t = np.arange(1500.0)
    train = (np.sin(t / 5.0) + 0.05 * np.random.default_rng(0).standard_normal(1500))[:, None]
    clean = sliding_windows(train[1000:], W, 8).copy()
    moved = clean + 4.0  # four training stds above anywhere the series went
    fast = {**TINY, "use_lm": False, "max_steps": 60}
    revin_model = build_detector("ssm_llm", **fast).fit(train[:1000])
    np.testing.assert_allclose(revin_model.score(moved), revin_model.score(clean), rtol=1e-3)
    series_model = build_detector("ssm_llm", **fast, normalise="series").fit(train[:1000])
    assert series_model.score(moved).min() > series_model.score(clean).max()
    assert series_model.fixed_channels == 1 and revin_model.fixed_channels is None
    again = load_detector(series_model.save(tmp_path / "series"))
    np.testing.assert_array_equal(again.score(moved), series_model.score(moved))
    with pytest.raises(ValueError, match="channels"):
        series_model.score(np.zeros((2, W, 2)))


def test_the_cpu_mamba_names_its_parameters_as_mamba_ssm():
    assert set(mamba_mixer(8, 4, 4, 2, "mambapy").state_dict()) == MAMBA_SSM_KEYS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mamba_ssm kernels need CUDA")
def test_a_mambapy_state_dict_gives_equal_outputs_through_mamba_ssm():
    cfg = build_detector("ssm_llm", **TINY).config
    cpu = build_net(cfg, 384, "mambapy").eval()
    gpu = build_net(cfg, 384, "mamba_ssm").cuda().eval()
    gpu.load_state_dict(cpu.state_dict())  # strict: every name and shape matches
    x, e = torch.randn(4, W, 3), torch.randn(4, 3, 384)
    with torch.no_grad():
        want = cpu(x, e)[0]
        got = gpu(x.cuda(), e.cuda())[0].cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_tsad_embed_output_serves_the_prompts_without_the_lm(tmp_path):
    from models.lm.cache import CachedEncoder
    from models.lm.encoder import shared_encoder
    from models.lm.precompute import load_precomputed, warm_cache
    from models.lm.prompts import PromptBuilder, PromptConfig

    out = tmp_path / "emb"
    assert tsad(["embed", "--dataset", "msl", "--data-dir", str(DATA), "--window", str(W),
                 "--stride", "8", "--limit", "6", "--pooling", "last", "--no-progress",
                 "--out", str(out)]) == 0
    fresh = CachedEncoder(shared_encoder(model_path=None, pooling="last"))  # an empty cache
    assert warm_cache(fresh, out) == 2 * 2 * 6  # 2 entities x 2 splits x 6 windows
    vectors, index = load_precomputed(out, "test")
    seg = index["splits"]["test"]["segments"][1]
    series = load_msl(DATA)[1].test[:, :1].astype(np.float64)
    windows = sliding_windows(series, W, 8)[:6]
    # the detector's prompts (built without a tokenizer) are tsad embed's prompts
    prompts = [p for w in PromptBuilder(PromptConfig()).batch(windows) for p in w]
    got = fresh.encode(prompts)
    assert fresh.stats.misses == 0
    np.testing.assert_array_equal(got, np.asarray(vectors[seg["row"]:seg["row"] + 6, 0],
                                                  dtype=np.float32))
    with pytest.raises(ValueError, match="pooling"):
        warm_cache(CachedEncoder(shared_encoder(model_path=None, pooling="mean")), out)


def test_service_scores_a_stream_with_the_artifact(trained):
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from service.app import create_app
    from service.metrics import ServiceMetrics
    from service.settings import Settings

    artifact, _ = trained
    settings = Settings(artifacts_dir=artifact.parent, costly_score_stride=4)
    series = load_msl(DATA)[1].train[:120, :1].astype(np.float64)
    series[100, 0] += 5.0  # a spike at a freshly scored point
    with TestClient(create_app(settings, ServiceMetrics(CollectorRegistry()))) as client:
        r = client.put("/streams/rover", json={"channels": 1,
                                               "detector": f"artifact:{artifact.name}",
                                               "threshold": {"kind": "fixed", "value": 1e9}})
        assert r.status_code == 201, r.text
        assert r.json()["window"] == W
        points = [{"timestamp": float(t), "values": row.tolist()}
                  for t, row in enumerate(series)]
        res = client.post("/score", json={"stream": "rover", "points": points})
        assert res.status_code == 200, res.text
    scored = [p for p in res.json()["results"] if p["status"] == "scored"]
    assert len(scored) == len(series) - W + 1
    assert all(np.isfinite(p["score"]) and p["score"] >= 0 for p in scored)
    assert res.json()["results"][100]["score"] > 3 * np.median([p["score"] for p in scored])


def test_the_committed_pretrained_artifact_is_served_by_name():
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from service.app import create_app
    from service.metrics import ServiceMetrics
    from service.settings import Settings

    root = Path(__file__).parent.parent / "models" / "pretrained"
    det = load_detector(root / "ssm-llm-msl")
    assert det.config.use_lm and det.config.window == 64 and det.config.embeddings is None
    series = load_msl(DATA)[0].test[:96, :1].astype(np.float64)
    settings = Settings(artifacts_dir=root, costly_score_stride=8)
    with TestClient(create_app(settings, ServiceMetrics(CollectorRegistry()))) as client:
        r = client.put("/streams/msl", json={"channels": 1, "detector": "artifact:ssm-llm-msl"})
        assert r.status_code == 201, r.text
        assert r.json()["window"] == 64
        points = [{"timestamp": float(t), "values": row.tolist()}
                  for t, row in enumerate(series)]
        res = client.post("/score", json={"stream": "msl", "points": points})
        assert res.status_code == 200, res.text
    scored = [p for p in res.json()["results"] if p["status"] == "scored"]
    assert len(scored) == len(series) - 64 + 1
    assert all(np.isfinite(p["score"]) and p["score"] >= 0 for p in scored)
