"""Cross-modality reconstruction detector (CMA-TSAD: TimeCMA turned into a reconstructor).

Shapes: B windows, W points per window, C channels, d model width, D language-model width.

    windows (B, W, C)
      -> RevIN per window and channel              xn (B, W, C), mean/std (B, 1, C)
      -> inverted embedding: a channel's whole
         window is one token                        h  (B, C, d)   Linear(W -> d)
      -> time-series encoder (transformer over
         the C channel tokens)                      ts (B, C, d)
      -> [use_lm] prompt encoder over the channels'
         last-token LM embeddings of their prompts  p  (B, C, d)   Linear(D -> d) + transformer
      -> [use_lm] cross-modality attention:
         query = ts, key = value = p                z  (B, C, d)   ts + attn(ts, p, p)
      -> decoder (transformer over channel tokens)  z  (B, C, d)
      -> projection back to the window              x^ (B, C, W)   Linear(d -> W)
      -> [residual_linear] + low-rank linear map
         over time of the normalised window         x^ += up(down(xn))  W -> rank -> W
    loss: MSE(x^, xn) over all W x C (the paper's L_rec, in RevIN units)
    score of the newest point, per channel: mean squared error of the last ``score_last``
    points, divided by the mean training error, square-rooted (1 ~ a typical training
    window), aggregated over channels by ``aggregate``.

Why the pieces:

* RevIN: every window is judged on its shape, so one model serves streams of any level and
  scale (the pretrained artifact is shared by all MSL channels). The error is measured in
  RevIN units: scale-free, so the model has no per-channel state and fits any channel
  count (channel tokens share every weight; attention over channels is permutation
  equivariant).
* Residual-linear path (Curse of Attention): attention under-learns residual,
  sign-inconsistent structure that a linear map learns easily, so a linear path with the
  level removed (the window mean, by RevIN) and added back sits beside the attention
  branch. It is low-rank on purpose: a full W x W map would learn the identity and
  reconstruct anomalies as well as normal data.
* ``use_lm=False`` removes the whole language-model branch (the ablation): same network,
  same training, no prompts, no LM call.
* Prompt embeddings come from the process-wide cached encoder (LRU + Redis) and are
  computed once per training window before the first step, so training never calls the
  LM twice for the same prompt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.detectors.base import Detector, DetectorConfig, as_series, sliding_windows


@dataclass(frozen=True)
class CMAConfig(DetectorConfig):
    window: int = 64
    # --- branches
    use_lm: bool = True  # False: the ablation without the language-model branch
    residual_linear: bool = True  # low-rank linear path beside the attention branch
    # --- prompts (models/lm/prompts.py) and the frozen LM
    strategy: str = "variance"  # variance | trend | autocorr | all (variance was best)
    max_values: int = 100  # values listed per prompt (longer windows are downsampled)
    model_path: str | None = None  # local Hugging Face directory; None = bundled MiniLM
    pooling: str = "last"  # the paper keeps the last token's embedding
    # --- network
    d_model: int = 32
    n_heads: int = 4
    layers: int = 1  # per encoder / decoder
    dropout: float = 0.1
    linear_rank: int = 8  # rank of the residual-linear path (its bottleneck)
    # --- training (models/training.py)
    train_stride: int = 4  # points between training windows (one LM call per channel each)
    val_share: float = 0.2  # newest share of the training windows held out for validation
    max_steps: int = 300
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    eval_every: int = 20
    patience: int = 5
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    # torch intra-op threads while training (process-wide, restored after; 0 = leave as
    # is): the model is tiny, and on a busy 2-core machine 2 threads made training 5-20x
    # slower than 1 (thread oversubscription), measured
    threads: int = 1
    progress: bool = False  # tqdm bars while embedding and training
    # --- scoring
    score_last: int = 1  # newest points whose error makes a window's score
    min_std: float = 1e-3  # RevIN floor on a window's std (flat windows stay finite)


def revin(x: Any, min_std: float) -> tuple[Any, Any, Any]:
    """Per window and channel: (B, W, C) -> normalised (B, W, C), mean (B, 1, C), std."""
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, keepdim=True, unbiased=False).clamp(min=min_std)
    return (x - mean) / std, mean, std


def build_net(cfg: CMAConfig, lm_dim: int) -> Any:
    import torch
    from torch import nn

    def stack(d: int) -> nn.Module:
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, 4 * d, cfg.dropout,
                                           batch_first=True, norm_first=True)
        return nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)

    class CMANet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w, d = cfg.window, cfg.d_model
            self.embed = nn.Linear(w, d)  # inverted embedding: (B, C, W) -> (B, C, d)
            self.ts_encoder = stack(d)
            if cfg.use_lm:
                self.prompt_in = nn.Sequential(nn.Linear(lm_dim, d), nn.LayerNorm(d))
                self.prompt_encoder = stack(d)
                self.cross_norm = nn.LayerNorm(d)
                self.cross = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout,
                                                   batch_first=True)
            self.decoder = stack(d)
            self.project = nn.Linear(d, w)  # (B, C, d) -> (B, C, W)
            if cfg.residual_linear:
                self.down = nn.Linear(w, cfg.linear_rank, bias=False)
                self.up = nn.Linear(cfg.linear_rank, w)

        def forward(self, xn: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
            tokens = xn.transpose(1, 2)  # (B, W, C) -> (B, C, W)
            z = self.ts_encoder(self.embed(tokens))  # (B, C, d)
            if cfg.use_lm:
                p = self.prompt_encoder(self.prompt_in(prompts))  # (B, C, D) -> (B, C, d)
                q = self.cross_norm(z)
                z = z + self.cross(q, p, p, need_weights=False)[0]  # query ts, key/value p
            out = self.project(self.decoder(z))  # (B, C, W)
            if cfg.residual_linear:
                out = out + self.up(self.down(tokens))  # linear map over time, level added
            return out.transpose(1, 2)  # (B, W, C)

    return CMANet()


class CMA(Detector):
    name = "cma"
    Config = CMAConfig

    @property
    def costly(self) -> bool:
        """A language-model call per window, unless the LM branch is removed."""
        return self.config.use_lm

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
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        from models.training import load_module_state

        if not state:
            return
        self._build(int(state["lm_dim"][0]))
        load_module_state(self._net, state)
        self._err_scale = float(state["err_scale"][0])

    def _build(self, lm_dim: int) -> None:
        from models.training import pick_device, seed_everything

        seed_everything(self.config.seed)  # the initial weights depend on the seed only
        self._lm_dim = lm_dim
        self._device = pick_device(self.config.device)
        self._net = build_net(self.config, lm_dim).to(self._device)
        self._err_scale = 1.0

    @property
    def training_report(self) -> dict[str, Any]:
        """What ``tsad train`` writes to training_curve.json."""
        return {"curve": getattr(self, "history", []),
                "windows": getattr(self, "_n_windows", None),
                "train_seconds": getattr(self, "_train_seconds", None)}

    # --- prompts -----------------------------------------------------------------------
    def _encoder(self) -> Any:
        from models.lm.runtime import cached_encoder

        return cached_encoder(self.config.model_path, self.config.pooling)

    def prompts(self, windows: np.ndarray) -> list[str]:
        """(B, W, C) -> B*C prompts, window-major."""
        from models.lm.prompts import PromptBuilder, PromptConfig

        builder = PromptBuilder(PromptConfig(strategy=self.config.strategy,
                                             max_values=self.config.max_values))
        return [p for per_window in builder.batch(windows) for p in per_window]

    def embed(self, windows: np.ndarray, chunk: int = 512) -> np.ndarray | None:
        """(B, W, C) -> (B, C, D) float32 prompt embeddings; None without the LM branch."""
        if not self.config.use_lm:
            return None
        from tqdm.auto import tqdm

        encoder = self._encoder()
        b, _, c = windows.shape
        out = np.empty((b, c, encoder.dim), dtype=np.float32)
        per = max(1, chunk // c)
        for lo in tqdm(range(0, b, per), desc="prompts", unit="chunk", leave=False,
                       disable=not self.config.progress or b <= per):
            block = windows[lo:lo + per]
            out[lo:lo + len(block)] = encoder.encode(self.prompts(block)).reshape(
                len(block), c, -1)
        return out

    # --- learning ----------------------------------------------------------------------
    def _fit(self, train: np.ndarray) -> None:
        self.fit_many([train])

    def fit_many(self, series: Sequence[np.ndarray]) -> CMA:
        """Train one model on several series (e.g. every MSL entity): windows never
        straddle two series. ``fit(train)`` is ``fit_many([train])``."""
        import torch

        from models.training import TrainConfig, train_loop

        cfg = self.config
        series = [as_series(s, "train") for s in series]
        windows = np.concatenate([sliding_windows(s, cfg.window, cfg.train_stride)
                                  for s in series if len(s) >= cfg.window])
        if len(windows) == 0:
            raise ValueError(f"train: need at least window={cfg.window} points")
        t0 = time.perf_counter()
        emb = self.embed(windows)  # once: every epoch reuses these
        self._build(emb.shape[-1] if emb is not None else 0)
        x = torch.tensor(windows, dtype=torch.float32, device=self._device)
        e = None if emb is None else torch.as_tensor(emb, device=self._device)
        # validation: the last val_share of the windows in order. For one series that is
        # its newest stretch; for several (fit_many) it is the tail of the last series
        # given (known limitation: a per-series tail would be fairer)
        n_val = int(len(x) * cfg.val_share) if len(x) >= 10 else 0
        n_train = len(x) - n_val
        train_idx = np.arange(n_train)

        def loss_of(idx: np.ndarray) -> torch.Tensor:
            idx_t = torch.as_tensor(idx, device=self._device)
            xn, _, _ = revin(x[idx_t], cfg.min_std)
            out = self._net(xn, None if e is None else e[idx_t])
            return torch.mean((out - xn) ** 2)  # L_rec

        def val_loss() -> float:
            self._net.eval()
            with torch.no_grad():
                v = float(loss_of(np.arange(n_train, len(x))))
            self._net.train()
            return v

        self._net.train()
        threads = torch.get_num_threads()
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        tc = TrainConfig(max_steps=cfg.max_steps, epochs=cfg.epochs, batch_size=cfg.batch_size,
                         lr=cfg.lr, weight_decay=cfg.weight_decay, eval_every=cfg.eval_every,
                         patience=cfg.patience, seed=cfg.seed, progress=cfg.progress)
        try:
            self.history = train_loop(self._net.parameters(),
                                      lambda i: loss_of(train_idx[i]), n_train, tc,
                                      val_loss if n_val else None, desc="cma")
        finally:
            torch.set_num_threads(threads)
        self._net.eval()
        self._n_windows = {"train": n_train, "validation": n_val}
        self._train_seconds = round(time.perf_counter() - t0, 1)
        self._err_scale = 1.0
        err = self._window_errors(windows, emb)  # (N, C)
        self._err_scale = max(float(err.mean()), 1e-12)
        return self

    # --- scoring -----------------------------------------------------------------------
    def _window_errors(self, windows: np.ndarray, emb: np.ndarray | None,
                       batch: int = 1024) -> np.ndarray:
        """(B, W, C) -> (B, C) mean squared RevIN-unit error of the newest score_last
        points, divided by the training error scale."""
        import torch

        k = max(1, min(self.config.score_last, self.config.window))
        out = np.empty(windows.shape[::2], dtype=np.float64)
        with torch.no_grad():
            for lo in range(0, len(windows), batch):
                x = torch.tensor(windows[lo:lo + batch], dtype=torch.float32,
                                 device=self._device)
                xn, _, _ = revin(x, self.config.min_std)
                p = None if emb is None else torch.as_tensor(emb[lo:lo + batch],
                                                             device=self._device)
                err = (self._net(xn, p) - xn)[:, -k:, :] ** 2  # (b, k, C)
                out[lo:lo + len(x)] = err.mean(dim=1).double().cpu().numpy()
        return out / self._err_scale

    def _channel_scores(self, windows: np.ndarray) -> np.ndarray:
        return np.sqrt(self._window_errors(windows, self.embed(windows)))
