"""Model FLOPs per token and peak device FLOP/s, for the MFU estimate of the progress bar and benchmarks.

``6 N`` FLOPs per token for the forward and backward matmuls of the ``N`` non-embedding weights (plus the
``vocab x d_model`` logits projection, tied or not), and ``12 L H D_h T`` for the ``QK^T`` and ``AV``
products of the ``L`` softmax-attention layers at sequence length ``T`` (Chowdhery et al., PaLM, arXiv
2204.02311, Appendix B). The recurrent state products of linear-attention mixers are not counted, so their
MFU is a slight underestimate. Peak figures are dense bfloat16 tensor-core/MXU throughput per device from
the vendors' data sheets; an unknown device (e.g. a CPU) has none unless ``train.peak_flops`` gives it.
"""

from __future__ import annotations

import math
from typing import Any

import jax

# device_kind substring -> dense bf16 FLOP/s per device (data sheets); first match wins.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
)
_SOFTMAX_MIXERS = ("gated_attention",)


def _param_count(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def model_flops_per_token(params: Any, model_config: Any, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward) of the LM with ``params`` (see the module docstring)."""
  embed = params["embed"]["embedding"]
  vocab, d_model = embed.shape
  lookup_only = vocab * d_model if "unembed" in params else 0  # a tied table also does the logits matmul
  matmul_params = _param_count(params) - lookup_only
  mixers = model_config["mixer"]
  names = (mixers,) if isinstance(mixers, str) else tuple(mixers)
  layers = model_config["num_layers"]
  attention_layers = sum(1 for i in range(layers) if names[i % len(names)] in _SOFTMAX_MIXERS)
  heads = model_config["num_heads"]
  head_dim = model_config.get("head_dim") or d_model // heads
  return 6.0 * matmul_params + 12.0 * attention_layers * heads * head_dim * seq_len


def peak_flops_per_device(device: jax.Device, override: float | None = None) -> float | None:
  """Peak FLOP/s of ``device`` (``override`` if given; None when unknown)."""
  if override:
    return float(override)
  kind = getattr(device, "device_kind", "")
  return next((flops for name, flops in PEAK_FLOPS if name in kind), None)
