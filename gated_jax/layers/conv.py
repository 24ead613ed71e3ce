"""Causal convolutions over the sequence axis, with packed segments and a decode cache.

``causal_taps`` holds what every causal convolution shares: the ``K`` shifted copies of the input (tap ``i``
at position ``t`` is ``x_{t-K+1+i}``), zero before the start of the sequence and outside the token's packed
segment, continuing in decode from the cached last ``K - 1`` inputs. ``ShortConv`` is the depthwise one
(fla ``ShortConvolution``; Mamba arXiv 2312.00752 §3.4, DeltaNet arXiv 2406.06484 §3.3):
``y_t = act(sum_{i<K} w_i * x_{t-K+1+i} + b)`` per channel, kernel 4, no bias, optional SiLU. The gated
convolutions of ``gated_conv`` mix channels with the same taps.

``cached_long_conv`` is the sequence-long convolution of Hyena and H3 (``pallas_kernels.long_conv``) with its
decode cache: every input to the convolution so far, ``(B, max_len, C)`` float32, like attention's KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels

CACHE_MODES = ("off", "init", "step")


def causal_taps(module: nn.Module, x_BTC: jax.Array, segment_ids: jax.Array | None, cache_mode: str,
                kernel_size: int) -> jax.Array:
  """``(K, B, T, *channels)``: tap ``i`` holds ``x_{t-K+1+i}`` (zero where that token is before the sequence
  or in another packed segment).

  ``cache_mode``: "off" (full sequence), "init" (create ``module``'s ``("cache", "window")`` variable, full
  sequence) or "step" (continue from the cached last ``K - 1`` inputs and update them).
  """
  if cache_mode not in CACHE_MODES:
    raise ValueError(f"cache_mode: got {cache_mode!r}; allowed: {', '.join(map(repr, CACHE_MODES))}")
  batch, seq = x_BTC.shape[:2]
  channels = x_BTC.shape[2:]
  history = jnp.zeros((batch, kernel_size - 1, *channels), x_BTC.dtype)
  if cache_mode != "off":
    window = module.variable("cache", "window", jnp.zeros, history.shape, x_BTC.dtype)
    if cache_mode == "step":
      history = window.value.astype(x_BTC.dtype)
  x_ext = jnp.concatenate([history, x_BTC], axis=1)
  if cache_mode == "step" and kernel_size > 1:
    window.value = x_ext[:, -(kernel_size - 1):]
  if segment_ids is None:
    segment_ids = jnp.zeros((batch, seq), jnp.int32)
  # History taps are treated as part of the first new token's segment (zeros outside a cache).
  seg_ext = jnp.concatenate([jnp.repeat(segment_ids[:, :1], kernel_size - 1, axis=1), segment_ids], 1)
  taps = []
  for i in range(kernel_size):
    same = (seg_ext[:, i:i + seq] == segment_ids).astype(x_BTC.dtype)
    taps.append(x_ext[:, i:i + seq] * same.reshape(batch, seq, *(1,) * len(channels)))
  return jnp.stack(taps)


def cached_long_conv(module: nn.Module, u_BTC: jax.Array, kernel_fn: Callable[[int], jax.Array],
                     segment_ids: jax.Array | None, cache_mode: str, max_len: int, name: str = "inputs") -> jax.Array:
  """``pallas_kernels.long_conv(u, kernel_fn(T))``, continuing a decode.

  ``kernel_fn(n)`` gives the first ``n`` filter taps ``(n, C)``. ``cache_mode`` as in :func:`causal_taps`:
  "init" creates ``module``'s ``("cache", name)``, ``(B, max_len, C)`` float32 zeros; "step" writes ``u`` at
  the module's ``cache_index``, convolves the whole buffer with the ``max_len``-tap filter and returns the
  outputs of the new positions: ``O(max_len log max_len)`` per channel and call, whatever the number of new
  tokens. Decoding past ``max_len`` tokens is not supported (the write would be clamped), and a decode call
  takes no ``segment_ids`` (the buffer holds one sequence per row; the caller rejects them).
  """
  if cache_mode not in CACHE_MODES:
    raise ValueError(f"cache_mode: got {cache_mode!r}; allowed: {', '.join(map(repr, CACHE_MODES))}")
  batch, seq, channels = u_BTC.shape
  if cache_mode != "off":
    inputs = module.variable("cache", name, jnp.zeros, (batch, max_len, channels), jnp.float32)
  if cache_mode != "step":
    return pallas_kernels.long_conv(u_BTC, kernel_fn(seq), segment_ids=segment_ids)
  index = module.get_variable("cache", "cache_index")
  inputs.value = jax.lax.dynamic_update_slice_in_dim(inputs.value, u_BTC.astype(jnp.float32), index, axis=1)
  y_all = pallas_kernels.long_conv(inputs.value, kernel_fn(max_len))
  return jax.lax.dynamic_slice_in_dim(y_all, index, seq, axis=1).astype(u_BTC.dtype)


def pytorch_uniform(fan_in: int):
  """PyTorch's ``Conv1d`` default for weights and biases: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``fan_in``:
  taps times input channels per group)."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def conv_inits(init_std: float | None, fan_in: int):
  """``(kernel_init, bias_init)``: ``N(0, init_std)`` and zeros (fla's and Zoology's ``_init_weights``), or
  PyTorch's default for both when ``init_std`` is None."""
  if init_std is None:
    return pytorch_uniform(fan_in), pytorch_uniform(fan_in)
  return nn.initializers.normal(init_std), nn.initializers.zeros


class ShortConv(nn.Module):
  """Causal depthwise conv over the sequence axis of ``x_BTHC`` (channels are its trailing dims).

  Attributes:
    kernel_size: number of taps K (>= 1).
    activation: apply SiLU to the output.
    dtype: compute dtype.
    use_bias: a per-channel bias (fla ``conv_bias``; off by default as in fla).
    init_std: ``N(0, init_std)`` kernel init (fla's models re-initialise every ``Conv1d`` so); None:
      PyTorch's ``Conv1d`` default ``U(-1/sqrt(K), 1/sqrt(K))``, also for the bias.
    channel_axes: logical axis names of the channel dims.
  """
  kernel_size: int = 4
  activation: bool = True
  dtype: Any = jnp.float32
  use_bias: bool = False
  init_std: float | None = None
  channel_axes: tuple[str | None, ...] = ("heads", "head_dim")

  @nn.compact
  def __call__(self, x_BTHC: jax.Array, segment_ids: jax.Array | None = None,
               cache_mode: str = "off") -> jax.Array:
    """See :func:`causal_taps` for ``cache_mode``."""
    channels = x_BTHC.shape[2:]
    if len(channels) != len(self.channel_axes):
      raise ValueError(f"x_BTHC: got shape {tuple(x_BTHC.shape)}; allowed: (batch, seq) plus "
                       f"{len(self.channel_axes)} channel dims {self.channel_axes}")
    kernel_init, bias_init = conv_inits(self.init_std, self.kernel_size)
    kernel = self.param("kernel", nn.with_logical_partitioning(kernel_init, (None, *self.channel_axes)),
                        (self.kernel_size, *channels), jnp.float32)
    taps = causal_taps(self, x_BTHC.astype(self.dtype), segment_ids, cache_mode, self.kernel_size)
    y = jnp.sum(taps * kernel.astype(self.dtype)[:, None, None], axis=0)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(bias_init, self.channel_axes), channels, jnp.float32)
      y = y + bias.astype(self.dtype)
    return nn.silu(y) if self.activation else y
