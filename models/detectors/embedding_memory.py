"""Embedding memory: nearest normal precedents in language-model embedding space.

Each channel window becomes the statistical prompt of CMA-TSAD ("From t1 to t64, the
values were 0, 14, ... (scaled 0-99 between a and b). The variance was v"), the frozen
language model embeds it (cached: identical prompts are never encoded twice), and the
score is the cosine distance to the k nearest embeddings of normal windows kept in a
bounded per-channel memory. No training: ``fit`` fills the memory from training data, and
a served stream fills it online during warm-up (see ``memory_base``).

Why it works where raw nearest neighbours work less well: the prompt carries the window's
shape (the scaled values), its real range and a summary statistic, and the encoder maps
windows that *read* alike close together, so "normal" generalises beyond exact shapes.
``raw_knn`` is the same detector without the language model (the ablation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.detectors.memory_base import MemoryConfig, MemoryDetector


@dataclass(frozen=True)
class EmbeddingMemoryConfig(MemoryConfig):
    strategy: str = "variance"  # prompt statistic: variance | trend | autocorr | all
    max_values: int = 100  # values listed in a prompt (longer windows are downsampled)
    model_path: str | None = None  # local Hugging Face directory; None = bundled MiniLM
    pooling: str = "mean"  # mean (encoder models) | last (decoder models) | cls | auto


class EmbeddingMemory(MemoryDetector):
    name = "embedding_memory"
    Config = EmbeddingMemoryConfig

    @property
    def costly(self) -> bool:
        """A language-model call per window (cached by prompt)."""
        return True

    def prompts(self, windows: np.ndarray) -> list[str]:
        """(B, W, C) -> B*C prompts, window-major (the text a person can read)."""
        from models.lm.prompts import PromptBuilder, PromptConfig

        builder = PromptBuilder(PromptConfig(strategy=self.config.strategy,
                                             max_values=self.config.max_values))
        return [p for per_window in builder.batch(windows) for p in per_window]

    def _features(self, windows: np.ndarray) -> np.ndarray:
        from models.lm.runtime import cached_encoder

        encoder = cached_encoder(self.config.model_path, self.config.pooling)
        recipe = f"{self.config.strategy}:{self.config.max_values}"
        return encoder.encode_windows(windows, self.prompts, recipe)  # (B, C, D)
