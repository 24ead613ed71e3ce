"""Gated-SwinRMT (Maity, Mondal, Roy, arXiv 2604.06014): Swin's shifted windows with RMT's Manhattan-distance
retention decay, and its two gated variants. The paper was available as an abstract only; where it is silent
we follow RMT (Fan et al. arXiv 2309.11523 §3, qhfan/RMT ``VisRetention``) and Swin (Liu et al. arXiv
2103.14030 §3.2), and say so below.

Within each ``window x window`` window (odd layers shift the grid cyclically by ``window // 2`` and mask
pairs from different regions, as Swin; a grid no larger than the window is one unshifted window — the
"collapse to global scope" the abstract reports on small maps), attention is decomposed as in RMT: a pass
along each row, then a pass along each column of the first pass's output, each with a per-head 1-D decay, so
the two passes together decay as ``gamma_h^(|dx| + |dy|)`` (Manhattan distance). Per head
``gamma_h = 1 - 2^(-a - b h / H)`` (RMT's ``initial_value`` a = 2, ``heads_range`` b = 4), fixed.

* ``swin_rmt`` — the RMT baseline: softmax retention ``softmax(q k^T / sqrt(d) + |d| log gamma_h)`` (RMT's
  additive log-space decay), plus RMT's local context enhancement (LCE: a 5x5 depthwise conv of ``v`` added
  to the output), then ``W_O``.
* ``gated_swin_rmt_retention`` — the same with the G1 gate of "Gated Attention" (Qiu et al. arXiv 2505.06708
  eq. 5): ``o * sigmoid(x W_g)`` from the layer input, after LCE and before ``W_O`` (as the abstract places it).
* ``gated_swin_rmt_swat`` — SWAT-style sigmoid attention: ``sigmoid(q k^T / sqrt(d) + s_h |d|) * gamma_h^|d|``
  (the abstract's sigmoid attention, "balanced ALiBi slopes" and multiplicative decay; the placement of the
  decay after the sigmoid is our reading), SwiGLU-gated values ``silu(x W_u) * x W_v``, and a per-head RMSNorm
  of the output ("normalised output"); no LCE. Balanced slopes (our reading of SWAT, Fu et al. arXiv
  2502.18845): half the heads ``s_h = -2^(-8 i / (H/2))`` (prefer near keys), half ``+2^(-8 i / (H/2))``
  (prefer far keys), ``i = 1..H/2``.

The attention of every pass is ``pallas_kernels.biased_attention`` over ``window`` tokens.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from gated_jax.layers.linear_base import check_flag
from gated_jax.layers.norms import HeadRMSNorm
from gated_jax.layers.vision.common import VISION_MIXERS, DepthwiseConv2D, VisionMixer
from pallas_kernels import _checks

NORMALIZERS = ("softmax", "sigmoid")


def log_decay(num_heads: int, initial_value: float = 2.0, heads_range: float = 4.0) -> np.ndarray:
  """``(H,)`` RMT's per-head ``log gamma_h = log(1 - 2^(-a - b h / H))``."""
  return np.log1p(-(2.0 ** (-initial_value - heads_range * np.arange(num_heads) / num_heads)))


def balanced_alibi_slopes(num_heads: int) -> np.ndarray:
  """``(H,)``: negative ALiBi slopes on the first half of the heads, positive on the rest (module docstring)."""
  half = max(num_heads // 2, 1)
  magnitude = 2.0 ** (-8.0 * np.arange(1, half + 1) / half)
  slopes = np.concatenate([-magnitude, magnitude])[:num_heads]
  return np.pad(slopes, (0, num_heads - len(slopes)))


def window_layout(grid: tuple[int, int], window: int, layer_idx: int) -> tuple[int, int]:
  """``(window, shift)`` of a layer: Swin's shift on odd layers, one unshifted window when the grid is no
  larger than the window."""
  if window >= min(grid):
    return min(grid), 0
  for side in grid:
    if side % window:
      raise ValueError(f"window: got {window}; allowed: a divisor of the grid sides {grid} (or >= the grid)")
  return window, (window // 2 if layer_idx % 2 else 0)


def region_ids(grid: tuple[int, int], window: int, shift: int) -> np.ndarray:
  """``(rows, cols)`` Swin region of each position of the cyclically shifted grid (one region unshifted)."""
  ids = np.zeros(grid, np.int32)
  if shift:
    bounds = [(0, -window), (-window, -shift), (-shift, None)]
    for r, rows in enumerate(bounds):
      for c, cols in enumerate(bounds):
        ids[slice(*rows), slice(*cols)] = 3 * r + c
  return ids


def _to_windows(x_BRCX: jax.Array, window: int) -> jax.Array:
  """``(B, rows, cols, ...)`` -> ``(B * windows, window, window, ...)``."""
  batch, rows, cols = x_BRCX.shape[:3]
  rest = x_BRCX.shape[3:]
  x = x_BRCX.reshape(batch, rows // window, window, cols // window, window, *rest)
  x = jnp.moveaxis(x, 3, 2)
  return x.reshape(-1, window, window, *rest)


def _from_windows(x_WRCX: jax.Array, batch: int, grid: tuple[int, int]) -> jax.Array:
  window = x_WRCX.shape[1]
  rest = x_WRCX.shape[3:]
  x = x_WRCX.reshape(batch, grid[0] // window, grid[1] // window, window, window, *rest)
  return jnp.moveaxis(x, 2, 3).reshape(batch, *grid, *rest)


@VISION_MIXERS.register("swin_rmt")
class SwinRMT(VisionMixer):
  """Shifted-window Manhattan-decay attention (module docstring); the defaults are the RMT baseline.

  Attributes:
    window: window side (divides the grid sides, or covers the grid).
    layer_idx: this layer's index (odd layers shift).
    normalizer: ``"softmax"`` (retention) or ``"sigmoid"`` (SWAT).
    alibi: add the balanced ALiBi slopes to the scores (SWAT); else the log decay (retention).
    g1_gate: the G1 output gate.
    lce_size: side of the local-context-enhancement conv on ``v`` (0: none).
    swiglu_values: SwiGLU-gated values.
    output_norm: per-head RMSNorm of the attention output.
    initial_value, heads_range: RMT's decay parameters ``a``, ``b``.
    implementation: passed to ``pallas_kernels.biased_attention``.
  """
  window: int = 4
  layer_idx: int = 0
  normalizer: str = "softmax"
  alibi: bool = False
  g1_gate: bool = False
  lce_size: int = 5
  swiglu_values: bool = False
  output_norm: bool = False
  initial_value: float = 2.0
  heads_range: float = 4.0
  implementation: Any = None

  def __post_init__(self):
    _checks.check_positive_int("window", self.window, allow_none=False)
    if isinstance(self.layer_idx, bool) or not isinstance(self.layer_idx, int) or self.layer_idx < 0:
      raise ValueError(f"layer_idx: got {self.layer_idx!r}; allowed: an int >= 0")
    if isinstance(self.lce_size, bool) or not isinstance(self.lce_size, int) or self.lce_size < 0:
      raise ValueError(f"lce_size: got {self.lce_size!r}; allowed: an int >= 0 (0: no LCE)")
    _checks.check_choice("normalizer", self.normalizer, NORMALIZERS)
    for name in ("alibi", "g1_gate", "swiglu_values", "output_norm"):
      check_flag(name, getattr(self, name))
    super().__post_init__()
    window_layout(self.grid, self.window, self.layer_idx)

  def _pass_terms(self, side: int) -> tuple[jax.Array, jax.Array | None]:
    """``(bias, weight)`` ``(H, side, side)`` of one 1-D pass over ``side`` tokens."""
    distance = np.abs(np.arange(side)[:, None] - np.arange(side)[None, :])
    log_gamma = log_decay(self.num_heads, self.initial_value, self.heads_range)[:, None, None]
    if not self.alibi:
      return jnp.asarray(log_gamma * distance, jnp.float32), None
    slopes = balanced_alibi_slopes(self.num_heads)[:, None, None]
    return jnp.asarray(slopes * distance, jnp.float32), jnp.asarray(np.exp(log_gamma * distance), jnp.float32)

  def _attend_rows(self, q, k, v, mask_RCC, bias, weight):
    """Attention along the last spatial axis of ``(W, R, C, H, K)`` windows, one sequence per row."""
    windows, rows, cols = q.shape[:3]
    flat = lambda x: x.reshape(windows * rows, cols, *x.shape[3:])
    mask = jnp.broadcast_to(mask_RCC, (windows // mask_RCC.shape[0], *mask_RCC.shape)).reshape(-1, cols, cols)
    o = pallas_kernels.biased_attention(flat(q), flat(k), flat(v), bias=bias, weight=weight, mask=mask,
                                        normalizer=self.normalizer, implementation=self.implementation)
    return o.reshape(v.shape)

  @nn.compact
  def __call__(self, x_BND: jax.Array) -> jax.Array:
    x = self.check_input(x_BND)
    batch = x.shape[0]
    q, k = self.heads(x, "query"), self.heads(x, "key")
    v = self.heads(x, "value")
    if self.swiglu_values:
      v = nn.silu(self.heads(x, "value_gate")) * v
    window, shift = window_layout(self.grid, self.window, self.layer_idx)
    to_windows = lambda t: _to_windows(jnp.roll(t.reshape(batch, *self.grid, *t.shape[2:]), (-shift, -shift),
                                                (1, 2)), window)
    qw, kw, vw = to_windows(q), to_windows(k), to_windows(v)
    regions = jnp.asarray(_to_windows(region_ids(self.grid, window, shift)[None], window))  # (nW, w, w)
    same = regions[..., :, None] == regions[..., None, :]  # (nW, w, w, w): same region within a row
    same_t = jnp.swapaxes(regions, 1, 2)[..., :, None] == jnp.swapaxes(regions, 1, 2)[..., None, :]
    bias, weight = self._pass_terms(window)
    rows_out = self._attend_rows(qw, kw, vw, same, bias, weight)
    transpose = lambda t: jnp.swapaxes(t, 1, 2)
    out = transpose(self._attend_rows(transpose(qw), transpose(kw), transpose(rows_out), same_t, bias, weight))
    o = jnp.roll(_from_windows(out, batch, self.grid), (shift, shift), (1, 2)).reshape(q.shape)
    if self.lce_size:
      lce = DepthwiseConv2D(self.grid, self.lce_size, self.dtype, name="lce")(v.reshape(x.shape))
      o = o + lce.reshape(o.shape)
    if self.output_norm:
      o = HeadRMSNorm(dtype=self.dtype, name="o_norm")(o)
    if self.g1_gate:
      o = o * jax.nn.sigmoid(self.heads(x, "gate"))
    return self.out_proj(o).astype(x_BND.dtype)


@VISION_MIXERS.register("gated_swin_rmt_retention")
class GatedSwinRMTRetention(SwinRMT):
  """Softmax retention + LCE + G1 gate (module docstring)."""
  g1_gate: bool = True


@VISION_MIXERS.register("gated_swin_rmt_swat")
class GatedSwinRMTSWAT(SwinRMT):
  """Sigmoid attention with balanced ALiBi slopes and multiplicative decay, SwiGLU values, normalised
  output (module docstring)."""
  normalizer: str = "sigmoid"
  alibi: bool = True
  lce_size: int = 0
  swiglu_values: bool = True
  output_norm: bool = True
