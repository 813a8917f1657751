"""Language-model features: statistical prompts, a frozen encoder, a two-level cache.

Import the submodules directly; none of them loads torch or a model at import time.

* ``prompts``: ``PromptConfig``, ``PromptBuilder`` (window (W, C) -> C prompts),
  ``count_tokens``
* ``encoder``: ``EncoderConfig``, ``TextEncoder`` (prompts -> (N, D) float32),
  ``shared_encoder`` (one per config per process)
* ``onnx_encoder``: ``OnnxEncoderConfig``, ``OnnxTextEncoder`` (same interface; fp32 or
  int8 per channel; needs the ``onnx`` extra)
* ``cache``: ``CacheConfig``, ``CachedEncoder`` (LRU -> Redis -> LM),
  ``StridedEmbedder`` / ``StrideState`` (re-embed a channel every S points)
* ``metrics``: ``EmbeddingMetrics`` (Prometheus, defined once)
* ``quantizer``: ``QuantizerConfig``, ``SeriesQuantizer`` (SPEAR: values -> bins -> token ids)
* ``precompute`` / ``embed_cli``: ``tsad embed``, ``load_precomputed``
"""
