"""SPEAR's network: learnable soft prompts and a linear head around a frozen language
model (``models.detectors.spear`` trains and serves it).

    S = [p_1 .. p_m, e_1 .. e_W]                  (m + W, d)   m learnable soft prompts
    H = frozen LM(inputs_embeds=S, attention_mask) (m + W, d)
    position head: y_t = w . h_{m+t} + b   per point;   window head: w . mean_t h + b
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from models.lm.encoder import frozen_lm

if TYPE_CHECKING:
    import torch

__all__ = ["SoftPromptClassifier", "frozen_lm"]


class SoftPromptClassifier:
    """The trainable part: soft prompts + linear head, around a frozen LM."""

    def __init__(self, lm: Any, n_prompts: int, head: str, init: torch.Tensor) -> None:
        import torch

        self.lm = lm  # frozen HF model (eval mode, requires_grad False)
        self.embed = lm.get_input_embeddings()  # (V, d) frozen table
        d = self.embed.weight.shape[1]
        device = self.embed.weight.device
        self.prompts = torch.nn.Parameter(init.to(device).clone())  # (m, d)
        self.head_layer = torch.nn.Linear(d, 1).to(device)  # w (1, d), b (1,)
        self.head = head
        self.n_prompts = n_prompts

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.prompts, *self.head_layer.parameters()]

    def logits(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """token_ids (B, T) right-padded, lengths (B,) -> logits (B, T) per position (head
        position) or (B,) per window (head window)."""
        import torch

        b, t = token_ids.shape
        m = self.n_prompts
        tok = self.embed(token_ids)  # (B, T, d)
        x = torch.cat([self.prompts.expand(b, m, -1), tok], dim=1)  # (B, m+T, d)
        real = torch.arange(t, device=tok.device)[None, :] < lengths[:, None]  # (B, T)
        mask = torch.cat([torch.ones(b, m, dtype=torch.bool, device=tok.device), real], 1)
        h = self.lm(inputs_embeds=x, attention_mask=mask.long()).last_hidden_state[:, m:]
        if self.head == "position":
            return self.head_layer(h).squeeze(-1)  # (B, T)
        w = real.unsqueeze(-1).to(h.dtype)
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)  # (B, d)
        return self.head_layer(pooled).squeeze(-1)  # (B,)
