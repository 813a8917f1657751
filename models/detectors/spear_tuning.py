"""Few-label adaptation of a fitted SPEAR model: a stream's own copy of the soft prompts
and head, tuned in place on its labelled windows while the LM and the shared artifact stay
as they are (``POST /streams/{id}/feedback`` with ``adapt``: service/feedback.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from models.detectors.spear_net import SoftPromptClassifier

if TYPE_CHECKING:
    import torch


class FewLabelTuning:
    """Mixed into ``Spear``: needs its ``_net``, ``config``, ``scale``, ``tokens``,
    ``_logits`` and ``_tensor``."""

    def adaptable_state(self) -> dict[str, np.ndarray]:
        """The part a stream may adapt: soft prompts and head (float32)."""
        net = self._net
        return {"prompts": net.prompts.detach().cpu().numpy().astype(np.float32),
                "head.weight": net.head_layer.weight.detach().cpu().numpy().astype(np.float32),
                "head.bias": net.head_layer.bias.detach().cpu().numpy().astype(np.float32)}

    def with_parameters(self, state: dict[str, np.ndarray] | None = None) -> Self:
        """A copy sharing this fitted detector's frozen LM, tokens and scaling, with its
        own soft prompts and head (``state`` from ``adaptable_state``; None = a copy of
        this detector's). Cheap: the LM is shared, only m x d + d + 1 numbers are new.
        Training the copy never changes this detector."""
        import copy

        import torch

        if not self.is_fitted:
            raise RuntimeError(f"{self.name}: call fit() before adapting")
        state = state or self.adaptable_state()
        d = self._net.prompts.shape[1]
        clone = copy.copy(self)  # shallow: config, edges, token ids, scaling are read-only
        net = SoftPromptClassifier(self._net.lm, self.config.n_prompts, self.config.head,
                                   torch.from_numpy(np.asarray(state["prompts"],
                                                               dtype=np.float32)).reshape(-1, d))
        with torch.no_grad():
            for name, param in (("head.weight", net.head_layer.weight),
                                ("head.bias", net.head_layer.bias)):
                value = np.asarray(state[name], dtype=np.float32).reshape(param.shape)
                param.copy_(torch.from_numpy(value))
        clone._net = net
        return clone

    def window_logits(self, windows: np.ndarray) -> torch.Tensor:
        """(B, W, C) raw windows -> (B, C) logits of what ``channel_scores`` returns (the
        newest ``score_last`` points' max for the position head, the window for the window
        head), with gradients to the prompts and head."""
        b, w, c = windows.shape
        flat = windows.transpose(0, 2, 1).reshape(b * c, w)
        chan = np.tile(np.arange(c), b)
        logits = self._logits(self.tokens(self.scale(flat, chan)), np.full(b * c, w))
        if self.config.head == "position":
            logits = logits[:, w - min(self.config.score_last, w):].max(1).values
        return logits.reshape(b, c)

    def finetune(self, windows: np.ndarray, targets: np.ndarray, *, steps: int = 20,
                 lr: float = 1e-2, batch_size: int = 16, anchor: float = 1.0,
                 max_seconds: float = 10.0, seed: int = 0) -> dict[str, Any]:
        """Tune this detector's soft prompts and head *in place* (call it on a
        ``with_parameters`` copy) on labelled windows: (N, W, C) raw windows, ``targets``
        (N,) 1 = anomalous, 0 = normal, judged on the served score (the ``aggregate`` of
        the channels' scores (newest score_last points)).

        Loss: class-balanced binary cross-entropy plus ``anchor`` x the squared distance
        to the starting parameters, relative to their size, so a few labels move the
        model only as far as they need (and cannot collapse it to one class). AdamW with
        a linear decay; stops after ``steps`` or ``max_seconds``, whichever comes first.
        The LM stays frozen. Returns steps, loss_before/after (the labelled loss alone),
        probabilities before/after (N,), seconds.
        """
        import torch
        import torch.nn.functional as F

        windows = np.asarray(windows, dtype=np.float64)
        targets = np.asarray(targets, dtype=np.float32).ravel()
        if windows.ndim != 3 or len(windows) != len(targets) or not len(windows):
            raise ValueError("windows: (N, W, C) with one target each, N >= 1")
        t0 = time.perf_counter()
        net = self._net
        params = net.parameters()
        start = [p.detach().clone() for p in params]
        scale = sum(float((s ** 2).sum()) for s in start) or 1.0
        pos = float(targets.sum())
        neg = len(targets) - pos
        # each class present weighs half of the loss, however few labels it has
        weights = np.where(targets > 0.5, 0.5 / max(pos, 1.0), 0.5 / max(neg, 1.0))
        if pos == 0 or neg == 0:
            weights = np.full(len(targets), 1.0 / len(targets))
        y_all = self._tensor(targets)
        w_all = self._tensor(weights.astype(np.float32))
        agg = self.config.aggregate

        def proba(idx: np.ndarray) -> torch.Tensor:
            p = torch.sigmoid(self.window_logits(windows[idx]))  # (b, C)
            return p.max(1).values if agg == "max" else p.mean(1)

        def labelled_loss(idx: np.ndarray) -> torch.Tensor:
            p = proba(idx).clamp(1e-6, 1 - 1e-6)
            raw = F.binary_cross_entropy(p, y_all[idx], reduction="none")
            return (raw * w_all[idx]).sum() / w_all[idx].sum()

        def evaluate() -> tuple[float, np.ndarray]:
            everything = np.arange(len(targets))
            with torch.no_grad():
                out = []
                for lo in range(0, len(targets), self.config.score_batch):
                    out.append(proba(everything[lo:lo + self.config.score_batch]))
                p = torch.cat(out).clamp(1e-6, 1 - 1e-6)
                loss = float((F.binary_cross_entropy(p, y_all, reduction="none")
                              * w_all).sum() / w_all.sum())
            return loss, p.cpu().numpy().astype(np.float64)

        loss_before, p_before = evaluate()
        # stop early enough to leave time for the final evaluation (as long as the first)
        deadline = t0 + max_seconds - (time.perf_counter() - t0)
        rng = np.random.default_rng(seed)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(steps, 1)))
        done = 0
        for _ in range(steps):
            if time.perf_counter() > deadline:
                break
            idx = np.sort(rng.choice(len(targets), min(batch_size, len(targets)),
                                     replace=False))
            drift = sum(((p - s) ** 2).sum() for p, s in zip(params, start, strict=True))
            loss = labelled_loss(idx) + anchor * drift / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
        loss_after, p_after = evaluate()
        return {"steps": done, "loss_before": loss_before, "loss_after": loss_after,
                "proba_before": p_before, "proba_after": p_after,
                "seconds": time.perf_counter() - t0}
