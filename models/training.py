"""A small training loop for torch detectors: seed, device, AdamW with a linear schedule,
a tqdm bar, periodic validation and early stopping (the best parameters are restored).

The caller owns the model; the loop only sees the trainable parameters, a function that
returns the loss of a batch of sample indices, and optionally a validation loss::

    history = train_loop(params, lambda idx: loss_of(idx), n_train=len(x),
                         config=TrainConfig(max_steps=200), val_loss=lambda: val_of())
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 100  # optimiser steps at most (the binding limit on CPU)
    epochs: int = 40  # passes over the training samples at most (SPEAR: 40)
    batch_size: int = 16
    lr: float = 5e-3
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of steps with a rising learning rate, then linear to 0
    eval_every: int = 10  # steps between validations
    patience: int = 5  # validations without improvement before stopping (0 = never stop)
    seed: int = 0
    progress: bool = True  # tqdm bar (only drawn on a terminal)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str = "auto") -> str:
    """``auto``: CUDA when present, else CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def module_state(module: torch.nn.Module, prefix: str = "net.") -> dict[str, np.ndarray]:
    """A torch module's parameters and buffers as named numpy arrays (an artifact's
    weights), under ``prefix``."""
    return {f"{prefix}{k}": v.detach().cpu().numpy().copy()
            for k, v in module.state_dict().items()}


def load_module_state(module: torch.nn.Module, state: dict[str, np.ndarray],
                      prefix: str = "net.") -> None:
    """Inverse of :func:`module_state`; leaves the module in eval mode."""
    import torch

    module.load_state_dict({k[len(prefix):]: torch.from_numpy(np.array(v))
                            for k, v in state.items() if k.startswith(prefix)})
    module.eval()


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then linear decay to 0 at ``total``.

    >>> [round(linear_schedule(s, 10, 2), 2) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train_loop(params: Sequence[torch.nn.Parameter],
               loss_fn: Callable[[np.ndarray], torch.Tensor], n_train: int,
               config: TrainConfig | None = None,
               val_loss: Callable[[], float] | None = None,
               desc: str = "train") -> list[dict[str, Any]]:
    """Minimise ``loss_fn(batch_indices)``; returns the training curve (one row per
    validation: step, epoch, train_loss since the last row, val_loss, lr, seconds)."""
    import torch
    from tqdm.auto import tqdm

    cfg = config or TrainConfig()
    params = list(params)
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    total = min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    history: list[dict[str, Any]] = []
    if total <= 0 or n_train == 0 or not params:
        return history
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: linear_schedule(s, total, warmup))
    best = (math.inf, [p.detach().clone() for p in params])
    stale, running, seen, t0 = 0, 0.0, 0, time.perf_counter()
    order = rng.permutation(n_train)
    bar = tqdm(range(total), desc=desc, disable=not cfg.progress, leave=False)
    for step in bar:
        pos = (step % steps_per_epoch) * cfg.batch_size
        if pos == 0 and step > 0:
            order = rng.permutation(n_train)
        idx = order[pos:pos + cfg.batch_size]
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        seen += 1
        last = step + 1 == total
        if (step + 1) % cfg.eval_every == 0 or last:
            row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 3),
                   "train_loss": running / seen, "lr": sched.get_last_lr()[0],
                   "seconds": round(time.perf_counter() - t0, 2)}
            running, seen = 0.0, 0
            if val_loss is not None:
                v = float(val_loss())
                row["val_loss"] = v
                if v < best[0] - 1e-6:
                    best, stale = (v, [p.detach().clone() for p in params]), 0
                else:
                    stale += 1
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.4f}",
                            val=f"{row.get('val_loss', float('nan')):.4f}")
            if val_loss is not None and cfg.patience and stale >= cfg.patience:
                break
    bar.close()
    if val_loss is not None and math.isfinite(best[0]):
        with torch.no_grad():  # early stopping: keep the best validated parameters
            for p, b in zip(params, best[1], strict=True):
                p.copy_(b)
    return history
