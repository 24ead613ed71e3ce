"""Hyena (Poli et al., "Hyena Hierarchy", arXiv 2302.10866), order 2, as Zoology runs it (``mixers/hyena.py``).

Per token, with ``u`` the input (§3.1, the order-N recurrence with N = 2, and Algorithm 3):

    x1, x2, v = split(ShortConv_3(W_in u + b_in))      a depthwise causal conv of width 3 over the 3 D channels
    v <- x1 ⊙ v                                         the first gate
    v <- h * v + d ⊙ v                                  causal long convolution, one filter per channel
    y  = W_out (x2 ⊙ v) + b_out                         the second gate, out-projection

The filter ``h`` is implicit (§3.3): ``h_t = FFN(z_t) · exp(-α t)`` where ``z_t = (t, cos(ω t),
-sin(ω t))`` are positional features (``t`` from 0 to 1 over ``max_len`` positions), the FFN a small MLP with
sine activations ``sin(a · x)`` (``a`` learned, one per hidden unit, shared by its layers), and ``α`` a fixed
per-channel decay rate spread so that the window falls to ``decay_target`` between ``fast_decay_pct`` and
``slow_decay_pct`` of ``max_len``. ``d`` (Zoology's filter bias, ``N(0, 1)``) is the skip term ``D ⊙ v``.
The convolution is :func:`pallas_kernels.long_conv` (FFT, float32; a masked Toeplitz sum with packed
segments, which never see each other).

Zoology's initialisation: every linear map (projections and the filter MLP) ``N(0, 0.02)`` with zero bias,
the short conv PyTorch's default. Not reproduced: Zoology's trainable positional features (learning rate
1e-5; fixed here) and its per-parameter optimiser groups for the filter (lr 1e-3, no weight decay).

Decode caches the short conv's last ``K - 1`` inputs and every input to the long convolution, ``(B, max_len,
D)`` float32 (Zoology's ``state_size``: ``d_model · L``); each decode call convolves the whole cache, ``O(L
log L)`` per channel (``conv.cached_long_conv``). Sequences are at most ``max_len`` long.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels import _checks
from gated_jax.layers.conv import ShortConv, cached_long_conv
from gated_jax.layers.gated_conv import ZOOLOGY_INIT_STD, ConvMixer, dense
from gated_jax.layers.linear_base import check_positive_float
from gated_jax.layers.registry import MIXERS


def positional_features(max_len: int, num_bands: int) -> jax.Array:
  """``(max_len, 1 + 2 num_bands)``: ``t = s / (max_len - 1)``, then ``cos(f_j w_s)`` and ``-sin(f_j w_s)``
  with ``w_s = 2π s / max_len`` and ``f_j`` spaced from 1e-4 to ``num_bands - 1`` (Zoology's
  ``PositionalEmbedding``: the real and imaginary parts of ``exp(-i f w)``)."""
  t = jnp.linspace(0.0, 1.0, max_len)[:, None]
  w = 2 * math.pi * jnp.arange(max_len, dtype=jnp.float32)[:, None] / max_len
  f = jnp.linspace(1e-4, num_bands - 1, num_bands)[None, :]
  return jnp.concatenate([t, jnp.cos(f * w), -jnp.sin(f * w)], axis=1)


def decay_rates(channels: int, fast_decay_pct: float, slow_decay_pct: float, target: float) -> jax.Array:
  """``(channels,)`` rates ``α`` of the window ``exp(-α t)`` (Zoology's ``ExponentialModulation``): channel 0
  falls to ``target`` at ``t = slow_decay_pct``, the last at ``t = fast_decay_pct`` (``t`` is 1 at
  ``max_len``)."""
  return jnp.abs(jnp.linspace(math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct, channels))


class ImplicitFilter(nn.Module):
  """Hyena's implicit long filter (module docstring): ``FFN(z_t) · exp(-α t)``, ``(length, channels)``.

  Attributes:
    channels: filter channels (one filter each).
    max_len: positions the features span (``t`` = 1 at the last).
    order: hidden width of the FFN (Zoology ``filter_order``).
    num_inner: hidden-to-hidden layers of the FFN (Zoology ``num_inner_mlps``).
    num_bands: frequencies of the positional features (Zoology ``(emb_dim - 1) // 2``).
    frequency: initial sine frequency ``a`` (Zoology ``w``).
    fast_decay_pct, slow_decay_pct, decay_target: the window (``decay_rates``).
    init_std: ``N(0, init_std)`` for the FFN's weights (biases 0).
  """
  channels: int
  max_len: int
  order: int = 64
  num_inner: int = 2
  num_bands: int = 1
  frequency: float = 1.0
  fast_decay_pct: float = 0.3
  slow_decay_pct: float = 1.5
  decay_target: float = 1e-2
  init_std: float = ZOOLOGY_INIT_STD

  def __post_init__(self):
    for name in ("channels", "max_len", "order", "num_bands"):
      _checks.check_positive_int(name, getattr(self, name), allow_none=False)
    if isinstance(self.num_inner, bool) or not isinstance(self.num_inner, int) or self.num_inner < 0:
      raise ValueError(f"num_inner: got {self.num_inner!r}; allowed: an int >= 0")
    for name in ("frequency", "fast_decay_pct", "slow_decay_pct", "init_std"):
      check_positive_float(name, getattr(self, name))
    if isinstance(self.decay_target, bool) or not isinstance(self.decay_target, (int, float)) \
        or not 0 < self.decay_target < 1:
      raise ValueError(f"decay_target: got {self.decay_target!r}; allowed: a number in (0, 1)")
    super().__post_init__()

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    z = positional_features(self.max_len, self.num_bands)[:length]
    frequency = self.param("frequency", nn.initializers.constant(self.frequency), (self.order,), jnp.float32)
    linear = lambda width, name, bias=True: nn.Dense(width, use_bias=bias, name=name,
                                                     kernel_init=nn.initializers.normal(self.init_std))
    h = jnp.sin(frequency * linear(self.order, "in")(z))
    for i in range(self.num_inner):
      h = jnp.sin(frequency * linear(self.order, f"inner_{i}")(h))
    h = linear(self.channels, "out", bias=False)(h)
    rates = decay_rates(self.channels, self.fast_decay_pct, self.slow_decay_pct, self.decay_target)
    return h * jnp.exp(-z[:, :1] * rates)


class LongConvMixer(ConvMixer):
  """The fields and checks shared by the long-convolution mixers (Hyena, H3).

  Attributes:
    max_len: longest sequence (the filter's length and the decode cache's).
    init_std: ``N(0, init_std)`` for every linear map (biases 0), Zoology's init.
  """
  max_len: int = 2048
  init_std: float = ZOOLOGY_INIT_STD

  def __post_init__(self):
    _checks.check_positive_int("max_len", self.max_len, allow_none=False)
    check_positive_float("init_std", self.init_std)
    super().__post_init__()

  def _start(self, x_BTD: jax.Array, segment_ids: jax.Array | None, decode: bool) -> tuple[jax.Array, str]:
    x, mode = super()._start(x_BTD, segment_ids, decode)
    if x_BTD.shape[1] > self.max_len:
      raise ValueError(f"x_BTD: got {x_BTD.shape[1]} tokens; allowed: at most max_len={self.max_len} (the "
                       "filter's length)")
    if decode and segment_ids is not None:
      raise ValueError("segment_ids: got an array with decode=True; allowed: None (the long-convolution cache "
                       "holds one sequence per batch row)")
    return x, mode


FILTER_OPTIONS = ("order", "num_inner", "num_bands", "frequency", "fast_decay_pct", "slow_decay_pct",
                  "decay_target")


@MIXERS.register("hyena")
class Hyena(LongConvMixer):
  """Order-2 Hyena (module docstring). ``num_heads`` is unused: one filter per channel (Zoology's default
  ``num_heads=1``).

  Attributes:
    kernel_size: taps of the short convolution (Zoology ``short_filter_order``).
    filter_options: :class:`ImplicitFilter` fields (``FILTER_OPTIONS``) that differ from its defaults, which
      are Zoology's; its ``init_std`` is the layer's.
  """
  filter_options: Mapping[str, Any] | None = None

  def __post_init__(self):
    options = dict(self.filter_options or {})
    unknown = sorted(set(options) - set(FILTER_OPTIONS))
    if unknown:
      raise ValueError(f"filter_options: got unknown fields {unknown}; allowed: {', '.join(FILTER_OPTIONS)}")
    super().__post_init__()
    self.long_filter(parent=None)  # checks the options now

  def long_filter(self, **kwargs) -> ImplicitFilter:
    return ImplicitFilter(self.d_model, self.max_len, init_std=self.init_std, **dict(self.filter_options or {}),
                          **kwargs)

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """``x_BTD`` -> ``y_BTD``; ``positions`` is unused (the filter is indexed by lag)."""
    del positions
    u, mode = self._start(x_BTD, segment_ids, decode)
    h = dense(3 * self.d_model, self.init_std, self.dtype, "in_proj")(u)
    h = ShortConv(self.kernel_size, activation=False, dtype=self.dtype, use_bias=True, init_std=None,
                  channel_axes=("mlp",), name="short_conv")(h, segment_ids, mode)
    x1, x2, v = jnp.split(h, 3, axis=-1)
    v = x1 * v
    skip = self.param("skip", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("mlp",)),
                      (self.d_model,), jnp.float32)
    v = cached_long_conv(self, v, self.long_filter(name="filter"), segment_ids, mode, self.max_len) \
        + skip.astype(self.dtype) * v
    y = dense(self.d_model, self.init_std, self.dtype, "out_proj", ("mlp", "embed"))(x2 * v)
    return self._finish(y, x_BTD, mode)
