"""RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467 eq. 4): ``y = x / sqrt(mean(x^2) + eps) * scale``.

Normalises over the last axis, in float32, with a learnable scale initialised to 1. ``RMSNorm`` carries one
scale per channel of the residual stream (logical axis ``embed``); ``HeadRMSNorm`` works on ``(B, T, H, D)``
and normalises each head separately: with ``scale_axes=("head_dim",)`` (one scale shared by the heads) it is
Qwen3's QK-norm, and with ``scale_axes=("heads", "head_dim")`` (one scale per channel) it is the "SDPA
GroupNorm" control of Gated Attention (Qiu et al., arXiv 2505.06708 §4.1, Table 3: RMSNorm per head on the
SDPA output).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """RMSNorm over the last axis; the scale has the trailing ``len(scale_axes)`` dims of the input.

  Attributes:
    eps: added to the mean square.
    dtype: output dtype (None: the input's); the arithmetic is float32.
    param_dtype: dtype of the scale.
    scale_axes: logical axis names of the scale, one per trailing input dim it spans.
  """
  eps: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_axes: tuple[str, ...] = ("embed",)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x`` ``(..., F)`` -> same shape, in ``dtype`` (default: ``x.dtype``)."""
    span = len(self.scale_axes)
    if x.ndim < max(span, 1):
      raise ValueError(f"x: got shape {tuple(x.shape)}; allowed: rank >= {max(span, 1)} for scale_axes "
                       f"{self.scale_axes}")
    init = nn.with_logical_partitioning(nn.initializers.ones, self.scale_axes)
    scale = self.param("scale", init, tuple(x.shape[x.ndim - span:]), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype or x.dtype)


class HeadRMSNorm(RMSNorm):
  """RMSNorm of each head of a ``(B, T, H, D)`` tensor over ``D`` (QK-norm by default; see module doc)."""
  scale_axes: tuple[str, ...] = ("head_dim",)
