"""SPEAR: soft-prompt anomaly recognition with a frozen language model (Wei et al.).

    window (W,) --scale--> z (W,) --quantise--> bins (W,) --vocab--> token ids (W,)
    token ids --frozen LM input embedding table--> E (W, d)
    S = [p_1 .. p_m, e_1 .. e_W]                  (m + W, d)   m learnable soft prompts
    H = frozen LM(inputs_embeds=S, attention_mask) (m + W, d)
    position head: y_t = sigmoid(w . h_{m+t} + b)  per point (the paper's eq. 2-3)
    window head:   y   = sigmoid(w . mean_t h_{m+t} + b)  per window

Only the m soft prompts (m x d) and the head (d + 1) train, with binary cross-entropy,
AdamW and a linear learning-rate schedule (``models.training``); the LM's weights never
change. Windows may be shorter than ``window`` (1..window points): they are padded on
the right and masked out of attention, the loss and the pooling.

Scaling. ``window`` (default): each channel window is centred on its median and divided
by its robust spread (1.4826 MAD, floored at a tenth of its std), so the model reads the
window's *shape* and an artifact serves any stream whatever its units or channel count;
a window that is wholly at an unusual level looks normal to it, and on heavy-tailed
series (MSL telemetry: a window's MAD a few hundredths of the series' std) ordinary
excursions land in the clipped end bins beside the injected anomalies, so the synthetic
labels cannot be learnt (benchmarks/results/spear_diagnosis.md). ``series``: per-channel
mean and std of the training data (the paper's "range of the series"); the artifact is
then bound to the training channels: the choice for a model fitted per stream. Scaled
values in [-clip, clip] go to ``n_bins`` equal bins (``models.lm.quantizer``), values
beyond to the end bins, and bin b is the LM's token for the string "b".

Labels. ``fit(train)`` gets unlabelled normal data (the service's and MSL's case), so
training windows are labelled by the paper's context-anomaly rules (``models.labelling``:
trend, spike against the series' own jumps, level shift, volatility change; each rule
only on the ``label_top_share`` of the series' windows where it is strongest, since the
plain tests fire on most windows of any smooth or autocorrelated series) and, with
``labels`` containing ``inject``, a share of windows gets one synthetic anomaly of those
four kinds (spike, level shift, ramp, volatility burst) with its points marked.
``fit_labelled(train, point_labels)`` adds a dataset's given point labels. The minority
class is oversampled with T-SMOTE (``models.oversampling``). The last ``val_fraction`` of
the training series (by time) is the validation split: early stopping, and the
probability cut with the best F1 on it becomes ``threshold`` (the service's default).

Scores. ``channel_scores`` is the anomaly probability per channel window: of the newest
point (position head; the max over the newest ``score_last`` points for a scorer that
scores every ``score_last``-th window) or of the window (window head), or with
``score="log_odds"`` the same on the log-odds scale, ``-log(1 - p)``; ``score`` aggregates
channels (``max`` by default: "is any channel anomalous"). ``predict_proba`` takes windows
of any length up to ``window``.

Where each part lives: the network (soft prompts, head, frozen LM) in ``spear_net``, the
few-label tuning of a stream's copy in ``spear_tuning``, synthetic anomalies in
``models.synthesis``, context-rule labels in ``models.labelling``; this file is the
detector: scaling, tokens, training, scoring and state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from models.detectors.base import (
    Adaptable,
    DetectorConfig,
    LearnsFromLabels,
    as_series,
    sliding_windows,
)
from models.detectors.spear_net import SoftPromptClassifier, frozen_lm
from models.detectors.spear_tuning import FewLabelTuning
from models.synthesis import INJECT_KINDS, inject_anomalies, random_suffixes

if TYPE_CHECKING:
    import torch

HEADS = ("position", "window")
SCORES = ("probability", "log_odds")
SCALINGS = ("window", "series")
LABEL_SOURCES = ("context", "inject")


@dataclass(frozen=True)
class SpearConfig(DetectorConfig):
    window: int = 64  # longest window (tokens after the prompts); shorter ones are padded
    aggregate: str = "max"  # channel probabilities -> one: max | mean
    # tokeniser
    n_bins: int = 100  # N; MiniLM/BERT have single tokens for "0".."99"
    scaling: str = "window"  # window | series (see the module docstring)
    clip: float = 5.0  # scaled range binned uniformly
    # model
    model_path: str | None = None  # local HF directory; None = bundled all-MiniLM-L6-v2
    n_prompts: int = 20  # m soft prompts (the paper's best)
    head: str = "position"  # position (per point, eq. 2) | window (pooled)
    # position head: a window's score is the max over its newest score_last points'
    # probabilities (1 = the newest point, the online score; a scorer that skips windows,
    # stride s, needs s so that every point is judged by some window)
    score_last: int = 1
    # what a window scores on: probability (the head's sigmoid, in [0, 1]) | log_odds
    # (softplus of the head's logit = -log(1 - p): the same order, non-negative, and not
    # saturated: float32 probabilities reach exactly 1.0 at logit 17, tying every clear
    # anomaly, and a bounded score normalised per stream by its held-out spread puts
    # streams with a wide normal spread and a flat one on different scales)
    score: str = "probability"
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    # labels for unlabelled training data
    labels: str = "context+inject"  # "+"-joined subset of: context, inject
    inject_fraction: float = 0.5  # share of windows copied with one injected anomaly
    inject_kinds: str = "spike+shift+trend+volatility"  # "+"-joined subset
    label_correction: str = "bonferroni"  # context rules: none (paper) | bonferroni
    label_top_share: float = 0.02  # a rule fires on at most this share of a series' windows
    oversample: float = 1.0  # T-SMOTE until minority = this x majority (0 = off)
    smote_k: int = 5
    # data
    train_stride: int = 0  # between training windows; 0 = window // 4
    min_length: int = 0  # >0: train on random lengths min_length..window (newest kept)
    val_fraction: float = 0.2  # last share of the training series (by time)
    max_train_windows: int = 4096  # channel windows kept for training (random subsample)
    max_val_windows: int = 64
    # optimisation (small defaults so a fit is quick on a CPU; configs/train sets more)
    max_steps: int = 30  # 0 = no training (the zero-shot baseline)
    epochs: int = 40
    batch_size: int = 16
    lr: float = 5e-2
    weight_decay: float = 0.01
    eval_every: int = 10
    patience: int = 5
    seed: int = 0
    progress: bool = False
    score_batch: int = 64

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head: unknown {self.head!r}; known: {HEADS}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling: unknown {self.scaling!r}; known: {SCALINGS}")
        bad = set(self.label_sources) - set(LABEL_SOURCES)
        if bad:
            raise ValueError(f"labels: unknown {sorted(bad)}; known: {LABEL_SOURCES}")
        bad = set(self.inject_kinds.split("+")) - set(INJECT_KINDS)
        if bad:
            raise ValueError(f"inject_kinds: unknown {sorted(bad)}; known: {INJECT_KINDS}")
        if self.n_prompts < 0 or self.window < 1 or self.min_length > self.window:
            raise ValueError("need n_prompts >= 0, window >= 1, min_length <= window")
        if self.score not in SCORES:
            raise ValueError(f"score: unknown {self.score!r}; known: {SCORES}")
        if not 1 <= self.score_last <= self.window:
            raise ValueError("score_last: in 1..window")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction: in (0, 1)")

    @property
    def label_sources(self) -> tuple[str, ...]:
        return tuple(s for s in self.labels.split("+") if s)


class Spear(FewLabelTuning, Adaptable, LearnsFromLabels):
    """Streams tune their own soft prompts from feedback (``Adaptable``, through
    ``FewLabelTuning``); ``tsad train`` fits it on labelled series (``LearnsFromLabels``)."""

    name = "spear"
    Config = SpearConfig

    # --- scaling and tokens ------------------------------------------------------------
    def scale(self, windows: np.ndarray, channel: np.ndarray | int = 0) -> np.ndarray:
        """(N, T) raw windows -> scaled (N, T); ``channel`` (N,) or one index (series)."""
        x = np.asarray(windows, dtype=np.float64)
        if self.config.scaling == "series":
            ch = np.broadcast_to(np.asarray(channel), (len(x),))
            return (x - self._center[ch][:, None]) / self._scale[ch][:, None]
        med = np.median(x, axis=1, keepdims=True)
        mad = 1.4826 * np.median(np.abs(x - med), axis=1, keepdims=True)
        spread = np.maximum(mad, 0.1 * x.std(axis=1, keepdims=True))
        return (x - med) / np.where(spread > 0, spread, 1.0)

    def tokens(self, scaled: np.ndarray) -> np.ndarray:
        """(N, T) scaled -> (N, T) LM vocabulary ids."""
        bins = np.searchsorted(self._edges, np.asarray(scaled).ravel(), side="right")
        return self._token_ids[bins].reshape(np.shape(scaled))

    # --- building -------------------------------------------------------------------------
    def _build(self, channels: int, state: dict[str, np.ndarray] | None = None) -> None:
        import torch

        from models.lm.quantizer import QuantizerConfig, SeriesQuantizer

        cfg = self.config
        enc = frozen_lm(cfg.model_path, cfg.device)
        q = SeriesQuantizer(QuantizerConfig(n_bins=cfg.n_bins, lower_q=0.0, upper_q=1.0))
        q.fit(np.array([-cfg.clip, cfg.clip]))  # fixed, uniform edges in scaled units
        self._edges = q.edges[0]  # (N-1,)
        self._token_ids = q.bind(enc.tokenizer, "numbers")  # (N,)
        self._lm_id = enc.model_id
        d = enc.model.get_input_embeddings().weight.shape[1]
        if state is None:  # soft prompts start as embeddings of random vocabulary tokens
            g = torch.Generator().manual_seed(cfg.seed)
            table = enc.model.get_input_embeddings().weight.detach().cpu()
            ids = torch.randint(min(1000, len(table) - 1), len(table), (cfg.n_prompts,),
                                generator=g)
            init = table[ids].clone()
            torch.manual_seed(cfg.seed)
        else:
            init = torch.from_numpy(np.asarray(state["prompts"], dtype=np.float32))
        net = SoftPromptClassifier(enc.model, cfg.n_prompts, cfg.head, init.reshape(-1, d))
        if state is not None:
            with torch.no_grad():
                net.head_layer.weight.copy_(torch.from_numpy(
                    np.asarray(state["head.weight"], dtype=np.float32)))
                net.head_layer.bias.copy_(torch.from_numpy(
                    np.asarray(state["head.bias"], dtype=np.float32)))
        self._net = net
        self._channels = channels
        if cfg.scaling == "series" and state is None:
            self._center, self._scale = np.zeros(channels), np.ones(channels)
        self._threshold = 0.5

    # --- torch helpers -----------------------------------------------------------------
    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        import torch

        return torch.as_tensor(x, device=self._net.prompts.device)

    def _logits(self, tokens: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        return self._net.logits(self._tensor(tokens), self._tensor(lengths))

    def _proba(self, tokens: np.ndarray, lengths: np.ndarray,
               scale: str = "probability") -> np.ndarray:
        """(N, T) tokens -> (N, T) probabilities (position head) or (N,) (window head);
        ``scale="log_odds"``: softplus of the logits instead (see ``SpearConfig.score``)."""
        import torch

        squash = torch.sigmoid if scale == "probability" else torch.nn.functional.softplus
        out = []
        with torch.no_grad():
            for lo in range(0, len(tokens), self.config.score_batch):
                sl = slice(lo, lo + self.config.score_batch)
                out.append(squash(self._logits(tokens[sl], lengths[sl])).cpu().numpy())
        if not out:
            return np.zeros((0, tokens.shape[1]) if self.config.head == "position" else (0,))
        return np.concatenate(out).astype(np.float64)

    # --- the contract ------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "_net")

    def _fit(self, train: np.ndarray) -> None:
        self._fit_with_labels(list(train.T), None, train.shape[1])

    def fit_labelled(self, train: np.ndarray, point_labels: np.ndarray) -> Spear:
        """Fit with a dataset's point labels (T,) or (T, C) added to the derived ones."""
        train = as_series(train, "train")
        lab = np.asarray(point_labels)
        lab = np.broadcast_to(lab[:, None] if lab.ndim == 1 else lab, train.shape)
        if len(train) < self.config.window:
            raise ValueError(f"train: need at least window={self.config.window} points")
        self._fit_with_labels(list(train.T), list(lab.astype(bool).T), train.shape[1])
        return self

    def fit_series(self, series: list[np.ndarray],
                   point_labels: list[np.ndarray | None] | None = None) -> Spear:
        """Fit one model on many univariate series of different lengths (e.g. every MSL
        channel, every NAB file); each is split by time into train and validation on its
        own. Needs window scaling (series scaling is per channel of one series)."""
        if self.config.scaling != "window":
            raise ValueError("fit_series: needs scaling='window'")
        series = [as_series(x, f"series[{i}]")[:, 0] for i, x in enumerate(series)]
        labels = point_labels or [None] * len(series)
        if len(labels) != len(series):
            raise ValueError("point_labels: one per series (or None)")
        labels = [None if lab is None else np.asarray(lab).astype(bool).ravel()
                  for lab in labels]
        self._fit_with_labels(series, labels, 1)
        return self

    def _channel_scores(self, windows: np.ndarray) -> np.ndarray:
        b, w, c = windows.shape
        if c != self._channels and self.config.scaling == "series":
            raise ValueError(f"windows: {c} channels, model fitted on {self._channels}")
        flat = windows.transpose(0, 2, 1).reshape(b * c, w)  # (B*C, W), channel-major rows
        chan = np.tile(np.arange(c), b)
        p = self._proba(self.tokens(self.scale(flat, chan)), np.full(b * c, w),
                        self.config.score)
        if self.config.head == "position":  # (B*C,): the newest score_last points' max
            p = p[:, w - min(self.config.score_last, w):].max(1)
        return p.reshape(b, c)

    def predict_proba(self, windows: np.ndarray | list[np.ndarray], channel: int = 0,
                      per_point: bool = False) -> np.ndarray | list[np.ndarray]:
        """Anomaly probability of windows of 1..window points (a list, or an (N, T) array).

        Per window (N,): the window head's output, or the position head's maximum over
        the window's points; ``per_point=True`` (position head) gives each window's (T_i,)
        point probabilities instead.
        """
        if not self.is_fitted:
            raise RuntimeError(f"{self.name}: call fit() before scoring")
        seqs = [np.asarray(s, dtype=np.float64).ravel() for s in windows]
        if any(not 1 <= len(s) <= self.config.window for s in seqs):
            raise ValueError(f"windows: each needs 1..{self.config.window} points")
        if any(not np.isfinite(s).all() for s in seqs):
            raise ValueError("windows: contains NaN or infinite values")
        tokens, lengths = self._pad([self.tokens(self.scale(s[None], channel))[0]
                                     for s in seqs])
        p = self._proba(tokens, lengths)
        if self.config.head == "window":
            if per_point:
                raise ValueError("per_point: needs head='position'")
            return p
        if per_point:
            return [row[:n] for row, n in zip(p, lengths, strict=True)]
        return np.array([row[:n].max() for row, n in zip(p, lengths, strict=True)])

    def _pad(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        width = int(lengths.max()) if len(seqs) else 1
        pad_id = int(self._token_ids[0])  # masked out; any real id will do
        out = np.full((len(seqs), width), pad_id, dtype=np.int64)
        for i, s in enumerate(seqs):
            out[i, :len(s)] = s
        return out, lengths

    # --- state -----------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        """The probability cut with the best F1 on the validation split (0.5 untrained)."""
        return float(self._threshold)

    @property
    def calibrated_threshold(self) -> float | None:
        """The threshold on the scale ``score`` serves (-log(1 - p) for log_odds)."""
        if self.config.score == "log_odds":
            return float(-np.log1p(-min(self.threshold, 1.0 - 1e-12)))
        return self.threshold

    @property
    def fixed_channels(self) -> int | None:
        """Channels the model is bound to (series scaling), else None (any)."""
        return self._channels if self.config.scaling == "series" else None

    def trained_parameters(self) -> int:
        return sum(p.numel() for p in self._net.parameters())

    def trained_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._net.parameters())

    def state_dict(self) -> dict[str, np.ndarray]:
        if not self.is_fitted:
            return {}
        net = self._net
        state = {
            "prompts": net.prompts.detach().cpu().numpy().astype(np.float32),  # (m, d)
            "head.weight": net.head_layer.weight.detach().cpu().numpy(),  # (1, d)
            "head.bias": net.head_layer.bias.detach().cpu().numpy(),  # (1,)
            "token_ids": self._token_ids.astype(np.int64),  # (N,)
            "threshold": np.array([self._threshold], dtype=np.float64),
            "channels": np.array([self._channels], dtype=np.int64),
            # which frozen LM the prompts were trained against (content hash)
            "lm_id": np.frombuffer(self._lm_id.encode(), dtype=np.uint8).copy(),
        }
        if self.config.scaling == "series":
            state["center"], state["scale"] = self._center.copy(), self._scale.copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._build(int(np.asarray(state["channels"])[0]), state)
        lm_id = bytes(np.asarray(state["lm_id"], dtype=np.uint8)).decode()
        if lm_id != self._lm_id:
            raise ValueError(f"artifact: soft prompts were trained with LM {lm_id}, "
                             f"but model_path gives {self._lm_id}")
        if not np.array_equal(np.asarray(state["token_ids"]), self._token_ids):
            raise ValueError("artifact: the LM's token ids of the bins differ")
        self._threshold = float(np.asarray(state["threshold"])[0])
        if self.config.scaling == "series":
            self._center = np.asarray(state["center"], dtype=np.float64)
            self._scale = np.asarray(state["scale"], dtype=np.float64)

    # --- training --------------------------------------------------------------------------
    def _fit_with_labels(self, series: list[np.ndarray],
                         point_labels: list[np.ndarray | None] | None, channels: int) -> None:
        """series: univariate (T_i,) arrays (channel i for series scaling)."""
        from models.training import seed_everything

        cfg = self.config
        seed_everything(cfg.seed)
        self._build(channels)
        t0 = time.perf_counter()
        if cfg.scaling == "series":
            self._center = np.array([x.mean() for x in series])
            sd = np.array([x.std() for x in series])
            self._scale = np.where(sd > 0, sd, 1.0)
        report: dict[str, Any] = {"trained_parameters": self.trained_parameters(),
                                  "trained_bytes": self.trained_bytes()}
        if cfg.max_steps > 0:
            data = self._training_data(series, point_labels, report)
            report["history"] = self._train(*data)
        report["threshold"] = self._threshold
        report["seconds"] = round(time.perf_counter() - t0, 2)
        self.training_report = report

    def _training_data(self, train: list[np.ndarray],
                       point_labels: list[np.ndarray | None] | None,
                       report: dict[str, Any]) -> tuple:
        """Windows per series, split by time, labelled, injected, oversampled, tokenised.
        Returns (train tokens, lengths, point masks) and the same for validation."""
        from models.labelling import LabelConfig, label_share, label_windows
        from models.oversampling import tsmote

        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        w = cfg.window
        stride = cfg.train_stride or max(1, w // 4)
        label_cfg = LabelConfig(correction=cfg.label_correction,
                                top_share=cfg.label_top_share or None)
        parts: dict[str, list] = {"train": [], "val": []}
        for c, series in enumerate(train):
            cut = int(len(series) * (1 - cfg.val_fraction))  # validation: the newest part
            starts = np.arange(0, len(series) - w + 1, stride)
            wins = sliding_windows(series[:, None], w, stride)[..., 0]  # (N, W)
            lab = None if point_labels is None else point_labels[c]
            given = None if lab is None else sliding_windows(lab[:, None], w, stride)[..., 0]
            for split, keep in (("train", starts + w <= cut), ("val", starts >= cut)):
                if not keep.any():
                    continue
                raw = wins[keep]
                masks = np.zeros(raw.shape, dtype=bool)
                if "context" in cfg.label_sources:  # spikes judged against this series
                    ref = np.diff(series[:cut])
                    _, masks, kinds = label_windows(raw, label_cfg, spike_reference=ref)
                    if split == "train":
                        report.setdefault("context_labels", []).append(
                            label_share(masks.any(1), kinds))
                if given is not None:
                    masks = masks | given[keep]
                scaled = self.scale(raw, c if self.config.scaling == "series" else 0)
                chan = c if self.config.scaling == "series" else 0
                parts[split].append((scaled, masks, raw, series[:cut].std(), chan))
        out = []
        for split in ("train", "val"):
            if not parts[split]:
                raise ValueError(f"train: too short for a {split} split of window={w} "
                                 f"(val_fraction={cfg.val_fraction})")
            x = np.concatenate([p[0] for p in parts[split]])
            m = np.concatenate([p[1] for p in parts[split]])
            if "inject" in cfg.label_sources:
                raw = np.concatenate([p[2] for p in parts[split]])
                sd = np.concatenate([np.full(len(p[2]), p[3]) for p in parts[split]])
                chan = np.concatenate([np.full(len(p[2]), p[4]) for p in parts[split]])
                xi, mi, pick = inject_anomalies(raw, sd, cfg.inject_fraction, rng,
                                                tuple(cfg.inject_kinds.split("+")))
                x = np.concatenate([x, self.scale(xi, chan[pick])])
                m = np.concatenate([m, mi])
            limit = cfg.max_train_windows if split == "train" else cfg.max_val_windows
            if len(x) > limit:
                keep = np.sort(rng.choice(len(x), limit, replace=False))
                x, m = x[keep], m[keep]
            y = m.any(1).astype(np.int64)
            report[f"{split}_windows"] = int(len(x))
            report[f"{split}_positive_share"] = float(y.mean())
            if split == "train" and cfg.oversample > 0:
                x, y, m = tsmote(x, y, k=cfg.smote_k, ratio=cfg.oversample, seed=cfg.seed,
                                 extra=m)
                report["train_windows_oversampled"] = int(len(x))
            lengths = np.full(len(x), w, dtype=np.int64)
            tokens = self.tokens(x)
            if split == "train" and cfg.min_length:
                tokens, m, lengths = random_suffixes(tokens, m, cfg.min_length, rng)
            out += [tokens, lengths, m]
        return tuple(out)

    def _train(self, tok: np.ndarray, lengths: np.ndarray, masks: np.ndarray,
               vtok: np.ndarray, vlengths: np.ndarray, vmasks: np.ndarray) -> list[dict]:
        import torch
        import torch.nn.functional as F

        from models.training import TrainConfig, train_loop

        cfg = self.config
        net = self._net
        position = cfg.head == "position"
        valid = np.arange(tok.shape[1])[None, :] < lengths[:, None]  # (N, T)
        if position:  # points are far more often normal than windows: weight positives
            pos = max(int((masks & valid).sum()), 1)
            pos_weight = float(np.clip(((~masks) & valid).sum() / pos, 1.0, 20.0))
        else:
            ratio = masks.any(1).mean()
            pos_weight = float(np.clip((1 - ratio) / max(ratio, 1e-6), 1.0, 20.0))
        pw = torch.tensor(pos_weight, device=net.prompts.device)

        def loss_of(t: np.ndarray, ln: np.ndarray, m: np.ndarray,
                    logits: torch.Tensor | None = None) -> torch.Tensor:
            logits = self._logits(t, ln) if logits is None else logits
            if position:
                real = self._tensor(np.arange(t.shape[1])[None, :] < ln[:, None]).float()
                target = self._tensor(m.astype(np.float32))
                raw = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw,
                                                         reduction="none")
                return (raw * real).sum() / real.sum()
            target = self._tensor(m.any(1).astype(np.float32))
            return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)

        vreal = np.arange(vtok.shape[1])[None, :] < vlengths[:, None]
        vy = vmasks[vreal] if position else vmasks.any(1)
        val_aucs: list[float] = []

        def val_loss() -> float:
            with torch.no_grad():
                logits = self._logits(vtok, vlengths)
                loss = float(loss_of(vtok, vlengths, vmasks, logits))
            # ranking on the validation labels, per point (position) or window: what the
            # loss alone hides when it falls by predicting the base rate
            p = logits.cpu().numpy()
            val_aucs.append(rank_auc(p[vreal] if position else p, vy))
            return loss

        history = train_loop(
            net.parameters(), lambda idx: loss_of(tok[idx], lengths[idx], masks[idx]),
            len(tok), TrainConfig(max_steps=cfg.max_steps, epochs=cfg.epochs,
                                  batch_size=cfg.batch_size, lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, eval_every=cfg.eval_every,
                                  patience=cfg.patience, seed=cfg.seed,
                                  progress=cfg.progress),
            val_loss=val_loss, desc="spear")
        for row, auc in zip(history, val_aucs, strict=True):
            row["val_auc"] = auc
        # the threshold: best F1 on validation, on what the service thresholds
        p = self._proba(vtok, vlengths)
        if position:
            real = np.arange(vtok.shape[1])[None, :] < vlengths[:, None]
            self._threshold = best_f1_cut(p[real], vmasks[real])
        else:
            self._threshold = best_f1_cut(p, vmasks.any(1))
        return history


def rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC-ROC by ranks (ties averaged); nan without both classes.

    >>> rank_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    """
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if not pos or not neg:
        return float("nan")
    r = rankdata(np.asarray(scores, dtype=np.float64))
    return float((r[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def best_f1_cut(proba: np.ndarray, labels: np.ndarray) -> float:
    """The probability cut (flag p >= cut) with the best F1; 0.5 without positives.

    >>> best_f1_cut(np.array([0.1, 0.2, 0.7, 0.9]), np.array([0, 0, 1, 1]))
    0.7
    """
    labels = np.asarray(labels).astype(bool)
    if not labels.any() or labels.all():
        return 0.5
    order = np.argsort(-proba, kind="stable")
    p, y = proba[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    f1 = 2 * tp / (tp + fp + y.sum())
    last = np.r_[p[1:] != p[:-1], True]  # only cut between distinct values
    i = int(np.argmax(np.where(last, f1, -1)))
    return float(p[i])


