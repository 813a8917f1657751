"""State-space x language-model cross alignment (the SSM x LLM paper, turned into a
reconstruction detector on our contract).

Shapes: B windows, W points per window, C channels, N = B*C channel windows (every channel
is its own sample: all weights are shared, so one model fits any channel count),
F = W//2 frequency bins (the Nyquist bin dropped), d model width, D language-model width,
K memory slots.

    windows (B, W, C)
      -> RevIN per window and channel                 xn (B, W, C)
         (normalise "series": the training split's
          per-channel mean and std instead)
      -> frequency branch: rFFT per channel           spec (N, F, 2)  real, imag
           -> Linear(2 -> d) + bin embedding          (N, F, d)
           -> [use_mamba] Mamba blocks over the bins  (N, F, d)  x + Mamba(LN(x)), scan
              (ablation: a token-wise Linear(d, d)     over frequency, low to high
               in each block's place)
           -> Linear(F*d -> d)                        h  (N, d)
      -> [use_lm] semantic branch: the frozen LM's
         embedding of each channel's statistical
         prompt (cached, tsad embed output)           e  (N, D)
         or (semantic "patches") the channel window
         cut into W/P patches, each projected into
         the LM's input space, through the frozen
         LM, mean-pooled (last token for decoders):
           xn (N, W) -> (N, W/P, P) -> Linear(P, D)
           -> LM(inputs_embeds) (N, W/P, D) -> pool  e  (N, D)
           -> [use_memory] principal memory read:     r  (N, D)  mu + coef @ M,
              coefficients of e - mu on the memory               coef (N, K)
              rows M (K, D), initialised to the K
              principal directions of the training
              windows' embeddings (PCA, std-scaled)
           -> Linear(D -> d) + LayerNorm              s  (N, d)
      -> fusion                                       z  (N, d)  h + Linear(d, d)(s)
      -> reconstruction head                          x^ (B, W, C)  Linear(d -> W)
      -> [residual_linear] + low-rank linear map over time of xn (as CMA)

    loss = MSE(x^, xn)                                (reconstruction, RevIN units)
         + align_weight   * mean(1 - cos(h, s))       (cross alignment of the branches)
         + distill_weight * |e - r|^2 / |e - mu|^2    (principal memory distillation: the
                                                       memory must keep the principal part
                                                       of what the LM says while the other
                                                       losses move it toward what helps
                                                       reconstruct the series)
    score of the newest point, per channel: mean squared error of the last ``score_last``
    points / mean training error (+ ``disagreement_weight`` * (1 - cos(h, s)) / its mean
    on training windows), square-rooted.

Why the pieces:

* Mamba runs over the *spectrum*: periodic and structural patterns are a few bins, and the
  selective scan decides per bin what to keep. ``mamba_ssm`` (CUDA kernels) is imported
  only on CUDA; elsewhere ``mambapy`` (pure PyTorch) runs the same block with the same
  parameter names and shapes, so an artifact trained on one loads on the other.
* With prompts the LM is never run in training steps: its embeddings are computed once per
  prompt (the process-wide cached encoder, warmed from ``tsad embed`` output when
  ``embeddings`` names one), so the LM weights cannot change and training costs what the
  small network costs. With patch tokens (``semantic="patches"``, the LLM-as-encoder
  recipe of Time-LLM / GPT4TS) the LM runs in every step, frozen (no gradient to its
  weights, never in the artifact), and learns only the patch projection: short sequences
  (W/P tokens, 8 at W=64) where a prompt has about 100.
* Ablations by flag on the same network and training: ``use_lm=False`` (no semantic
  branch, no alignment, no memory), ``use_mamba=False`` (a linear layer in each Mamba
  block's place), ``use_memory=False`` (the LM embedding projected directly);
  ``semantic="stats"`` reads the window's mean, std, min and max instead of the LM (a control);
  ``semantic="patches"`` feeds the LM the window's numbers as patch vectors instead of text.
"""

from __future__ import annotations

import copy
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.detectors.base import Detector, DetectorConfig, as_series, sliding_windows
from models.detectors.cma import revin

log = logging.getLogger(__name__)
SEMANTICS = ("lm", "stats", "patches")
NORMALISATIONS = ("window", "series")

# encoder -> the `tsad embed` directories already put into its cache (an encoder rebuilt by
# models.lm.runtime.configure starts with an empty cache, and with no entry here)
_WARMED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SSMLLMConfig(DetectorConfig):
    window: int = 64
    # --- branches (the ablations)
    use_lm: bool = True  # False: no semantic branch (no LM call, no alignment, no memory)
    use_mamba: bool = True  # False: a token-wise linear layer in each Mamba block's place
    use_memory: bool = True  # False: no principal memory (the LM embedding projected as is)
    residual_linear: bool = True  # low-rank linear path over time beside the branches
    # window: RevIN, each window by its own mean and std (the paper; any stream, any
    # level) | series: every window by the training split's per-channel mean and std, so
    # a window's level and spread are part of what is reconstructed (a window wholly at an
    # unseen level is not centred away); binds the model to its training channels
    normalise: str = "window"
    # what the semantic branch reads: lm (the frozen LM's prompt embedding) | stats (the
    # numbers a prompt states, the window's mean, std, min and max, without the LM: a
    # control that tells the language model's part from the statistics' part) | patches
    # (patch_len-point patches of the normalised window, projected into the LM's input
    # space and run through the frozen LM in every step)
    semantic: str = "lm"
    patch_len: int = 8
    # --- prompts (models/lm/prompts.py) and the frozen LM
    strategy: str = "variance"
    max_values: int = 100
    model_path: str | None = None  # local Hugging Face directory; None = bundled MiniLM
    pooling: str = "last"  # as CMA (shares its cache entries)
    # a `tsad embed` output of the same model and pooling: its vectors are put into the
    # encoder's cache before the first LM call (prompts it lacks are embedded by the LM)
    embeddings: str | None = None
    # --- network (the CPU size: the selective scan over (N, F, d*expand, d_state) is
    # memory-bound on CPU; d_state 4 and expand 1 made a step 2.5x cheaper than 8 and 2)
    d_model: int = 16
    mamba_layers: int = 1
    d_state: int = 4
    d_conv: int = 4
    expand: int = 1
    mamba_backend: str = "auto"  # auto (mamba_ssm on CUDA, else mambapy) | mambapy | mamba_ssm
    memory_size: int = 8  # K principal memory slots
    linear_rank: int = 8
    align_weight: float = 0.1
    distill_weight: float = 0.1
    # --- training (models/training.py)
    train_stride: int = 8
    val_share: float = 0.2
    max_steps: int = 200
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    eval_every: int = 20
    patience: int = 5
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 1  # torch intra-op threads while training (0 = leave as is); see CMA
    progress: bool = False
    # --- scoring
    score_last: int = 1
    disagreement_weight: float = 0.0  # branch disagreement added to the score (0 = off)
    min_std: float = 1e-3

    def __post_init__(self) -> None:
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise: unknown {self.normalise!r}; known: "
                             f"{NORMALISATIONS}")
        if self.semantic not in SEMANTICS:
            raise ValueError(f"semantic: unknown {self.semantic!r}; known: {SEMANTICS}")
        if self.semantic == "patches" and (self.patch_len < 1
                                           or self.window % self.patch_len):
            raise ValueError(f"patch_len: must divide the window ({self.window})")


def mamba_mixer(d_model: int, d_state: int, d_conv: int, expand: int, backend: str) -> Any:
    """One Mamba mixer (B, L, d) -> (B, L, d). Both backends name and shape their parameters
    alike (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj)."""
    if backend == "mamba_ssm":
        from mamba_ssm import Mamba  # CUDA only: imported here, never at module import

        return Mamba(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    if backend != "mambapy":
        raise ValueError(f"mamba_backend: unknown {backend!r} (auto | mambapy | mamba_ssm)")
    from mambapy.mamba import MambaBlock, MambaConfig

    return MambaBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=d_state,
                                  d_conv=d_conv, expand_factor=expand))


def resolve_backend(backend: str, device: str) -> str:
    """``auto``: the CUDA kernels when on CUDA and installed, else pure PyTorch."""
    if backend != "auto":
        return backend
    if device.startswith("cuda"):
        try:
            import mamba_ssm  # noqa: F401
            return "mamba_ssm"
        except ImportError:
            log.info("mamba_ssm is not installed: mambapy on CUDA")
    return "mambapy"


def build_net(cfg: SSMLLMConfig, lm_dim: int, backend: str, lm: Any = None) -> Any:
    """The network; ``lm`` (semantic "patches"): the frozen Hugging Face model the patch
    tokens go through, held outside the module's parameters and state."""
    import torch
    from torch import nn

    from models.lm.encoder import is_decoder, pool

    # rFFT bins without the Nyquist bin: W=64 gives 32, a power of two, which the parallel
    # scan of mambapy would otherwise pad to (33 -> 64, twice the cost)
    n_bins = max(1, cfg.window // 2)

    class Block(nn.Module):
        """Pre-norm residual block: x + mixer(LN(x)), mixer = Mamba or (ablation) Linear."""

        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(cfg.d_model)
            self.mixer = (mamba_mixer(cfg.d_model, cfg.d_state, cfg.d_conv, cfg.expand,
                                      backend) if cfg.use_mamba
                          else nn.Linear(cfg.d_model, cfg.d_model))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mixer(self.norm(x))

    class SSMLLMNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w, d = cfg.window, cfg.d_model
            self.bin_in = nn.Linear(2, d)  # (real, imag) of a bin -> d
            self.bin_embed = nn.Parameter(torch.zeros(n_bins, d))
            self.blocks = nn.ModuleList([Block() for _ in range(cfg.mamba_layers)])
            self.freq_norm = nn.LayerNorm(d)
            self.freq_out = nn.Linear(n_bins * d, d)  # (N, F*d) -> h (N, d)
            if cfg.use_lm:
                if cfg.semantic == "patches":
                    self.patch_in = nn.Linear(cfg.patch_len, lm_dim)  # (P) -> LM input (D)
                    self.lm = (lm,)  # a tuple: not a submodule, not in the state_dict
                    self.lm_pooling = "last" if is_decoder(lm.config) else "mean"
                if cfg.use_memory:
                    # set from the training embeddings before training (init_memory)
                    self.memory = nn.Parameter(torch.zeros(cfg.memory_size, lm_dim))
                    self.register_buffer("lm_mean", torch.zeros(lm_dim))
                self.sem_in = nn.Sequential(nn.Linear(lm_dim, d), nn.LayerNorm(d))
                self.sem_fuse = nn.Linear(d, d)
            self.head = nn.Linear(d, w)
            if cfg.residual_linear:
                self.down = nn.Linear(w, cfg.linear_rank, bias=False)
                self.up = nn.Linear(cfg.linear_rank, w)

        def frequency(self, tokens: torch.Tensor) -> torch.Tensor:
            """(N, W) normalised channel windows -> h (N, d)."""
            spec = torch.fft.rfft(tokens, dim=-1)[:, :n_bins] / tokens.shape[-1] ** 0.5
            x = self.bin_in(torch.stack([spec.real, spec.imag], dim=-1)) + self.bin_embed
            for block in self.blocks:  # spec (N, F) complex -> x (N, F, d)
                x = block(x)
            return self.freq_out(self.freq_norm(x).flatten(1))  # (N, d)

        def patch_embed(self, tokens: torch.Tensor) -> torch.Tensor:
            """(N, W) normalised channel windows -> (N, D) the frozen LM's pooled output
            over the window's patches (gradients reach patch_in, never the LM)."""
            n, w = tokens.shape
            x = self.patch_in(tokens.reshape(n, w // cfg.patch_len, cfg.patch_len))
            mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)  # (N, W/P)
            h = self.lm[0](inputs_embeds=x, attention_mask=mask).last_hidden_state
            return pool(h, mask, self.lm_pooling)  # (N, D)

        def read_memory(self, e: torch.Tensor) -> torch.Tensor:
            """(N, D) embeddings -> (N, D): their part on the memory rows (a projection
            onto the principal directions at initialisation)."""
            m = self.memory  # (K, D)
            coef = (e - self.lm_mean) @ m.T / (m.pow(2).sum(dim=1) + 1e-6)  # (N, K)
            return self.lm_mean + coef @ m

        def forward(self, xn: torch.Tensor, emb: torch.Tensor | None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            b, w, c = xn.shape
            tokens = xn.transpose(1, 2).reshape(b * c, w)  # (N, W)
            h = self.frequency(tokens)  # (N, d)
            aux: dict[str, torch.Tensor] = {"h": h}
            z = h
            if cfg.use_lm:
                e = (self.patch_embed(tokens) if cfg.semantic == "patches"
                     else emb.reshape(b * c, -1))  # (B, C, D) -> (N, D)
                if cfg.use_memory:
                    r = self.read_memory(e)
                    aux["distill"] = ((e - r).pow(2).sum(1).mean()
                                      / ((e - self.lm_mean).pow(2).sum(1).mean() + 1e-9))
                    e = r
                s = self.sem_in(e)  # (N, d)
                aux["s"] = s
                z = z + self.sem_fuse(s)
            out = self.head(z)  # (N, W)
            if cfg.residual_linear:
                out = out + self.up(self.down(tokens))
            return out.reshape(b, c, w).transpose(1, 2), aux  # (B, W, C)

    return SSMLLMNet()


def disagreement(aux: dict[str, Any]) -> Any:
    """(N,) 1 - cos(h, s): how far the two branches' views of a channel window are."""
    import torch.nn.functional as F

    return 1.0 - F.cosine_similarity(aux["h"], aux["s"], dim=-1)


class SSMLLM(Detector):
    name = "ssm_llm"
    Config = SSMLLMConfig

    @property
    def costly(self) -> bool:
        """A language-model call per window, unless the LM branch is removed."""
        return self.config.use_lm and self.config.semantic in ("lm", "patches")

    # --- state -------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "_net")

    def state_dict(self) -> dict[str, np.ndarray]:
        if not self.is_fitted:
            return {}
        from models.training import module_state

        state = module_state(self._net)
        state["lm_dim"] = np.array([self._lm_dim])
        state["err_scale"] = np.array([self._err_scale])
        state["dis_scale"] = np.array([self._dis_scale])
        if self.config.normalise == "series":
            state["series_mean"], state["series_std"] = self._series
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        from models.training import load_module_state

        if not state:
            return
        self._build(int(state["lm_dim"][0]))
        load_module_state(self._net, state)
        self._err_scale = float(state["err_scale"][0])
        self._dis_scale = float(state["dis_scale"][0])
        if self.config.normalise == "series":
            self._series = (np.asarray(state["series_mean"], dtype=np.float32).copy(),
                            np.asarray(state["series_std"], dtype=np.float32).copy())

    def _build(self, lm_dim: int) -> None:
        from models.training import pick_device, seed_everything

        seed_everything(self.config.seed)
        self._lm_dim = lm_dim
        self._device = pick_device(self.config.device)
        self._backend = resolve_backend(self.config.mamba_backend, self._device)
        lm = self._patch_lm().model if self._patches else None
        self._net = build_net(self.config, lm_dim, self._backend, lm).to(self._device)
        self._err_scale = 1.0
        self._dis_scale = 1.0

    @property
    def fixed_channels(self) -> int | None:
        """Channels the model is bound to (series normalisation), else None (any)."""
        if self.config.normalise == "series" and hasattr(self, "_series"):
            return len(self._series[0])
        return None

    def _normalised(self, x: Any) -> Any:
        """(B, W, C) raw windows (tensor) -> (B, W, C) in the units the network reads."""
        import torch

        if self.config.normalise == "window":
            return revin(x, self.config.min_std)[0]
        mean, std = (torch.as_tensor(a, device=x.device) for a in self._series)
        if x.shape[-1] != len(mean):
            raise ValueError(f"windows: {x.shape[-1]} channels, model fitted on {len(mean)}")
        return (x - mean) / std

    def save(self, path: str | Path) -> Path:
        """The artifact without ``embeddings``: where a training run read its cached prompt
        embeddings from is no part of the model (and absent where it is served)."""
        if self.config.embeddings is None:
            return super().save(path)
        plain = copy.copy(self)
        plain.config = replace(self.config, embeddings=None)
        return Detector.save(plain, path)

    @property
    def training_report(self) -> dict[str, Any]:
        """What ``tsad train`` writes to training_curve.json."""
        return {"curve": getattr(self, "history", []),
                "windows": getattr(self, "_n_windows", None),
                "train_seconds": getattr(self, "_train_seconds", None),
                "mamba_backend": getattr(self, "_backend", None)}

    # --- prompts -----------------------------------------------------------------------
    @property
    def _patches(self) -> bool:
        return self.config.use_lm and self.config.semantic == "patches"

    def _patch_lm(self) -> Any:
        from models.lm.encoder import frozen_lm

        return frozen_lm(self.config.model_path, self.config.device)  # picks as _build

    def _encoder(self) -> Any:
        from models.lm.runtime import cached_encoder

        encoder = cached_encoder(self.config.model_path, self.config.pooling)
        path = self.config.embeddings
        warmed = _WARMED.setdefault(encoder, set())
        if path and path not in warmed:  # once per encoder and directory
            from models.lm.precompute import warm_cache

            if Path(path, "index.json").is_file():
                n = warm_cache(encoder, path)
                log.info("embedding cache warmed with %d vectors from %s", n, path)
            else:  # e.g. an artifact served where the run's embeddings are not
                log.warning("embeddings: no tsad embed output in %s; the LM embeds every "
                            "prompt", path)
            warmed.add(path)
        return encoder

    def embed(self, windows: np.ndarray, chunk: int = 512) -> np.ndarray | None:
        """(B, W, C) -> (B, C, D) float32 prompt embeddings; None without the LM branch
        (``semantic: stats``: (B, C, 4) mean, std, min, max of each channel window), and
        None with patch tokens (the network runs the LM itself)."""
        if not self.config.use_lm or self.config.semantic == "patches":
            return None
        if self.config.semantic == "stats":
            return np.stack([windows.mean(1), windows.std(1), windows.min(1),
                             windows.max(1)], axis=-1).astype(np.float32)
        from tqdm.auto import tqdm

        from models.lm.prompts import PromptBuilder, PromptConfig

        encoder = self._encoder()
        builder = PromptBuilder(PromptConfig(strategy=self.config.strategy,
                                             max_values=self.config.max_values))
        b, _, c = windows.shape
        out = np.empty((b, c, encoder.dim), dtype=np.float32)
        per = max(1, chunk // c)
        for lo in tqdm(range(0, b, per), desc="prompts", unit="chunk", leave=False,
                       disable=not self.config.progress or b <= per):
            block = windows[lo:lo + per]
            prompts = [p for per_window in builder.batch(block) for p in per_window]
            out[lo:lo + len(block)] = encoder.encode(prompts).reshape(len(block), c, -1)
        return out

    # --- learning ----------------------------------------------------------------------
    def _fit(self, train: np.ndarray) -> None:
        self.fit_many([train])

    def fit_many(self, series: Sequence[np.ndarray]) -> SSMLLM:
        """One model on several series (windows never straddle two)."""
        import torch

        from models.training import TrainConfig, train_loop

        cfg = self.config
        series = [as_series(s, "train") for s in series]
        windows = np.concatenate([sliding_windows(s, cfg.window, cfg.train_stride)
                                  for s in series if len(s) >= cfg.window])
        if len(windows) == 0:
            raise ValueError(f"train: need at least window={cfg.window} points")
        t0 = time.perf_counter()
        emb = self.embed(windows)  # (N, C, D) once: every epoch reuses these
        self._build(emb.shape[-1] if emb is not None else self._lm_width())
        if cfg.normalise == "series":  # per channel, over every training point
            points = np.concatenate(series)
            self._series = (points.mean(axis=0).astype(np.float32),
                            np.maximum(points.std(axis=0), cfg.min_std).astype(np.float32))
        net = self._net
        x = torch.tensor(windows, dtype=torch.float32, device=self._device)
        e = None if emb is None else torch.as_tensor(emb, device=self._device)
        n_val = int(len(x) * cfg.val_share) if len(x) >= 10 else 0
        n_train = len(x) - n_val
        train_idx = np.arange(n_train)
        if cfg.use_lm and cfg.use_memory:  # patches: what the untrained projection gives
            self._init_memory(emb[:n_train] if emb is not None
                              else self._patch_embeddings(x[:n_train]))

        def loss_of(idx: np.ndarray) -> torch.Tensor:
            idx_t = torch.as_tensor(idx, device=self._device)
            xn = self._normalised(x[idx_t])
            out, aux = net(xn, None if e is None else e[idx_t])
            loss = torch.mean((out - xn) ** 2)
            if cfg.use_lm:
                loss = loss + cfg.align_weight * disagreement(aux).mean()
                if cfg.use_memory:
                    loss = loss + cfg.distill_weight * aux["distill"]
            return loss

        def val_loss() -> float:
            net.eval()
            with torch.no_grad():
                v = float(loss_of(np.arange(n_train, len(x))))
            net.train()
            return v

        net.train()
        threads = torch.get_num_threads()
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        tc = TrainConfig(max_steps=cfg.max_steps, epochs=cfg.epochs, batch_size=cfg.batch_size,
                         lr=cfg.lr, weight_decay=cfg.weight_decay, eval_every=cfg.eval_every,
                         patience=cfg.patience, seed=cfg.seed, progress=cfg.progress)
        try:
            self.history = train_loop(net.parameters(), lambda i: loss_of(train_idx[i]),
                                      n_train, tc, val_loss if n_val else None, desc=self.name)
        finally:
            torch.set_num_threads(threads)
        net.eval()
        self._n_windows = {"train": n_train, "validation": n_val}
        self._train_seconds = round(time.perf_counter() - t0, 1)
        err, dis = self._window_errors(windows, emb)
        self._err_scale = max(float(err.mean()), 1e-12)
        self._dis_scale = max(float(dis.mean()), 1e-12) if dis is not None else 1.0
        return self

    def _lm_width(self) -> int:
        """The LM's hidden size where the network needs it (patch tokens), else 0."""
        return self._patch_lm().dim if self._patches else 0

    def _patch_embeddings(self, x: Any, batch: int = 256) -> np.ndarray:
        """(B, W, C) raw windows -> (B, C, D) the LM's view of their patches, as the
        network is now (the memory's initial principal directions)."""
        import torch

        with torch.no_grad():
            out = []
            for lo in range(0, len(x), batch):
                xn = self._normalised(x[lo:lo + batch])
                b, w, c = xn.shape
                e = self._net.patch_embed(xn.transpose(1, 2).reshape(b * c, w))
                out.append(e.reshape(b, c, -1).cpu().numpy())
        return np.concatenate(out)

    def _init_memory(self, emb: np.ndarray) -> None:
        """Memory rows = the K principal directions of the training embeddings, each
        scaled by its standard deviation; slots beyond their rank stay 0."""
        import torch

        flat = emb.reshape(-1, emb.shape[-1]).astype(np.float64)  # (N, D)
        mean = flat.mean(axis=0)
        _, sv, vt = np.linalg.svd(flat - mean, full_matrices=False)
        k = min(self.config.memory_size, len(sv))
        rows = vt[:k] * (sv[:k, None] / np.sqrt(max(len(flat) - 1, 1)))
        with torch.no_grad():
            self._net.lm_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            self._net.memory.zero_()
            self._net.memory[:k] = torch.as_tensor(rows, dtype=torch.float32)

    # --- scoring -----------------------------------------------------------------------
    def _window_errors(self, windows: np.ndarray, emb: np.ndarray | None,
                       batch: int = 1024) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, W, C) -> (B, C) error of the newest score_last points / the training error
        scale, and (B, C) branch disagreement / its training scale (None without LM)."""
        import torch

        k = max(1, min(self.config.score_last, self.config.window))
        b, _, c = windows.shape
        err = np.empty((b, c), dtype=np.float64)
        dis = np.empty((b, c), dtype=np.float64) if self.config.use_lm else None
        with torch.no_grad():
            for lo in range(0, b, batch):
                x = torch.tensor(windows[lo:lo + batch], dtype=torch.float32,
                                 device=self._device)
                xn = self._normalised(x)
                p = None if emb is None else torch.as_tensor(emb[lo:lo + batch],
                                                             device=self._device)
                out, aux = self._net(xn, p)
                e2 = (out - xn)[:, -k:, :] ** 2  # (b, k, C)
                err[lo:lo + len(x)] = e2.mean(dim=1).double().cpu().numpy()
                if dis is not None:
                    dis[lo:lo + len(x)] = disagreement(aux).reshape(len(x), c).double(
                    ).cpu().numpy()
        return err / self._err_scale, None if dis is None else dis / self._dis_scale

    def _channel_scores(self, windows: np.ndarray) -> np.ndarray:
        err, dis = self._window_errors(windows, self.embed(windows))
        if dis is not None and self.config.disagreement_weight > 0:
            err = err + self.config.disagreement_weight * dis
        return np.sqrt(np.maximum(err, 0.0))
