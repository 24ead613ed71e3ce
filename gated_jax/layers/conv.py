"""Short causal depthwise convolution (fla ``ShortConvolution``; Mamba arXiv 2312.00752 §3.4, DeltaNet
arXiv 2406.06484 §3.3): ``y_t = act(sum_{i<K} w_i * x_{t-K+1+i})`` per channel, kernel 4, no bias, optional
SiLU. Taps never reach into another packed segment, and the decode path keeps the last ``K - 1`` inputs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class ShortConv(nn.Module):
  """Causal depthwise conv over the sequence axis of ``x_BTHC`` (channels are ``(heads, head_dim)``).

  Attributes:
    kernel_size: number of taps K (>= 1).
    activation: apply SiLU to the output.
    dtype: compute dtype.
  """
  kernel_size: int = 4
  activation: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTHC: jax.Array, segment_ids: jax.Array | None = None,
               cache_mode: str = "off") -> jax.Array:
    """``cache_mode``: "off" (full sequence), "init" (create the cache, full sequence) or "step" (continue
    from the cached last ``K - 1`` inputs and update them)."""
    batch, seq = x_BTHC.shape[:2]
    channels = x_BTHC.shape[2:]
    kernel = self.param("kernel", nn.with_logical_partitioning(_conv_init, (None, "heads", "head_dim")),
                        (self.kernel_size, *channels), jnp.float32)
    x_BTHC = x_BTHC.astype(self.dtype)
    history = jnp.zeros((batch, self.kernel_size - 1, *channels), self.dtype)
    if cache_mode != "off":
      window = self.variable("cache", "window", jnp.zeros, history.shape, self.dtype)
      if cache_mode == "step":
        history = window.value.astype(self.dtype)
    x_ext = jnp.concatenate([history, x_BTHC], axis=1)
    if cache_mode == "step" and self.kernel_size > 1:
      window.value = x_ext[:, -(self.kernel_size - 1):]
    if segment_ids is None:
      segment_ids = jnp.zeros((batch, seq), jnp.int32)
    # History taps are treated as part of the first new token's segment (zeros outside a cache).
    seg_ext = jnp.concatenate([jnp.repeat(segment_ids[:, :1], self.kernel_size - 1, axis=1), segment_ids], 1)
    y = jnp.zeros_like(x_BTHC)
    for i in range(self.kernel_size):
      same = (seg_ext[:, i:i + seq] == segment_ids).astype(self.dtype)
      y = y + x_ext[:, i:i + seq] * kernel[i].astype(self.dtype) * same.reshape(batch, seq, *(1,) * len(channels))
    return nn.silu(y) if self.activation else y


def _conv_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """PyTorch Conv1d default for a depthwise kernel: U(-1/sqrt(K), 1/sqrt(K))."""
  bound = shape[0] ** -0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)
