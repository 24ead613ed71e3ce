"""The vision-mixer registry and what its mixers share: the token grid and the base fields.

A vision mixer is a non-causal token mixer over the ``N = h * w`` patch tokens of an image, in row-major
order. It is built as ``VISION_MIXERS.get(name)(d_model=..., num_heads=..., grid=(h, w), **kwargs)`` (plus
``layer_idx`` when it declares the field, e.g. Swin's alternating shifts) and called as
``mixer(x_BND) -> y_BND``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gated_jax.layers.registry import Registry
from pallas_kernels import _checks

VISION_MIXERS = Registry("vision mixer")


def grid_coordinates(grid: tuple[int, int]) -> np.ndarray:
  """``(N, 2)`` int ``(row, col)`` of each token in row-major order."""
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  return np.stack([rows.ravel(), cols.ravel()], axis=-1)


def check_grid(grid: Any) -> tuple[int, int]:
  if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(
      isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
    raise ValueError(f"grid: got {grid!r}; allowed: (rows, cols), two positive ints")
  return tuple(grid)


class DepthwiseConv2D(nn.Module):
  """``size x size`` depthwise conv (zero padding, no bias) of tokens laid out on ``grid``. Either summed tap by
  tap (``size**2`` shifted multiply-adds: on a CPU far cheaper than a grouped convolution, forward and
  backward), or, on grids of at most ``4 size**2`` tokens, as one per-channel ``(N, N)`` token-mixing matrix
  gathered from the kernel: there the matrix has no more entries per output than the taps, in one contraction
  (RMT's 5x5 LCE on a 4x4 grid: ``vision_gating``'s Swin-RMT runs went from about 26 s to 16 s each).

  Attributes:
    grid: ``(rows, cols)`` of the tokens.
    size: odd kernel side.
    dtype: compute dtype.
  """
  grid: tuple[int, int]
  size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BND: jax.Array) -> jax.Array:
    batch, _, channels = x_BND.shape
    fan_in = self.size * self.size
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(fan_in ** -0.5),
                                                               (None, None, "embed")),
                        (self.size, self.size, channels), jnp.float32).astype(self.dtype)
    if self.grid[0] * self.grid[1] <= 4 * self.size ** 2:
      taps_NM = _tap_indices(self.grid, self.size)
      table = jnp.concatenate([kernel.reshape(self.size ** 2, channels), jnp.zeros((1, channels), kernel.dtype)])
      return jnp.einsum("bmc,nmc->bnc", x_BND, table[taps_NM])
    pad = self.size // 2
    x = jnp.pad(x_BND.reshape(batch, *self.grid, channels), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = sum(x[:, i:i + self.grid[0], j:j + self.grid[1]] * kernel[i, j]
              for i in range(self.size) for j in range(self.size))
    return out.reshape(x_BND.shape)


def _tap_indices(grid: tuple[int, int], size: int) -> np.ndarray:
  """``(N, N)``: the flat kernel tap joining output token ``n`` to input token ``m`` on ``grid``, or ``size**2``
  (a zero entry) where ``m`` is outside ``n``'s window."""
  rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
  dy = rows[None, :] - rows[:, None] + size // 2
  dx = cols[None, :] - cols[:, None] + size // 2
  inside = (dy >= 0) & (dy < size) & (dx >= 0) & (dx < size)
  return np.where(inside, dy * size + dx, size ** 2)


class VisionMixer(nn.Module):
  """Fields and checks every vision mixer shares.

  Attributes:
    d_model: token width D.
    num_heads: heads H (``D % H == 0``).
    grid: ``(rows, cols)`` of the token grid (``N = rows * cols``).
    dtype: compute dtype (parameters are float32).
  """
  d_model: int
  num_heads: int
  grid: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32

  def __post_init__(self):
    _checks.check_positive_int("d_model", self.d_model, allow_none=False)
    _checks.check_positive_int("num_heads", self.num_heads, allow_none=False)
    if self.d_model % self.num_heads:
      raise ValueError(f"num_heads: got {self.num_heads!r}; allowed: a divisor of d_model={self.d_model}")
    object.__setattr__(self, "grid", check_grid(self.grid))
    super().__post_init__()

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def check_input(self, x_BND: jax.Array) -> jax.Array:
    """``x_BND`` in the compute dtype, after checking it is ``(batch, rows * cols, d_model)``."""
    _checks.check_array("x_BND", x_BND, rank=3, layout="(batch, tokens, d_model)")
    expected = (self.grid[0] * self.grid[1], self.d_model)
    if tuple(x_BND.shape[1:]) != expected:
      raise ValueError(f"x_BND: got shape {tuple(x_BND.shape)}; allowed: (batch, {expected[0]}, {expected[1]}) "
                       f"for grid {self.grid} and d_model {self.d_model}")
    return x_BND.astype(self.dtype)

  def dense(self, x: jax.Array, features: tuple[int, ...], axes: tuple[str | None, ...], name: str, *,
            use_bias: bool = False, in_axes: tuple[int, ...] = (-1,), kernel_init=None) -> jax.Array:
    """DenseGeneral with logical axes ``axes`` (input axes first) on its kernel."""
    init = kernel_init or nn.initializers.lecun_normal()
    return nn.DenseGeneral(features, axis=in_axes, use_bias=use_bias, dtype=self.dtype, name=name,
                           kernel_init=nn.with_logical_partitioning(init, axes),
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[len(in_axes):]))(x)

  def heads(self, x_BND: jax.Array, name: str, *, use_bias: bool = False, kernel_init=None) -> jax.Array:
    """``(B, N, D) -> (B, N, H, D/H)``."""
    return self.dense(x_BND, (self.num_heads, self.head_dim), ("embed", "heads", "head_dim"), name,
                      use_bias=use_bias, kernel_init=kernel_init)

  def out_proj(self, o_BNHK: jax.Array, *, use_bias: bool = True) -> jax.Array:
    return self.dense(o_BNHK, (self.d_model,), ("heads", "head_dim", "embed"), "out", use_bias=use_bias,
                      in_axes=(-2, -1))
