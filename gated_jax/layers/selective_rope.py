"""Selective RoPE: input-dependent rotations of queries and keys (Movahedi et al. arXiv 2511.17388 §3;
timurcarstensen/selective-rope ``SelectiveRoPE``).

Per head ``h`` and frequency pair ``j < K/2``:

    u_t       = l2norm(x_t) per head chunk of the layer input
    phi^_t    = W_up W_down u_t                          (low rank, no biases)
    phi_t     = CausalDepthwiseConv_4(phi^)_t            (no activation; ``conv_size = 0``: phi^_t - phi^_{t-1})
                [+ exp(beta)]  [* sigmoid(w_h . u_t + b_h)]   (optional positive bias, optional phase gate)
    Phi_t     = sum_{s <= t} phi_s                       (restarting at packed-segment boundaries)
    q_t, k_t <- rotate(q_t, omega_j Phi_t), rotate(k_t, omega_j Phi_t),    omega_j = base^(-2j/K) (frozen)

in the rotate-half pairing of ``gated_jax.layers.positional``. Then ``q_t . k_s`` depends on positions through
``omega_j (Phi_t - Phi_s) = omega_j sum_{s < r <= t} phi_r``, a data-dependent relative angle (``phi = 1``
gives RoPE). Inside a linear-attention recurrence this is a complex (rotating) transition on each channel
pair — the "RoPE trick" of the paper, exact when both channels of a pair share their decay (scalar-decay
mixers; per-channel GLA decays the two halves separately). The paper's language-model setting is rank 32,
base 500000, no bias or gate; its state-tracking runs use base 1 (every pair at frequency 1) with the
positive bias. Decode keeps the conv window and ``Phi`` of the last token in the ``"cache"`` collection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gated_jax.layers.conv import ShortConv
from gated_jax.layers.feature_maps import l2_normalize
from pallas_kernels import _checks


class SelectiveRoPE(nn.Module):
  """Rotates ``q`` and ``k`` ``(B, T, H, K)`` by angles accumulated from the layer input (module docstring).

  Attributes:
    num_heads: heads H of q and k.
    head_dim: K (even).
    rank: rank of the angle projection.
    base: ``omega_j = base^(-2j/K)`` (>= 1; 1: every pair at frequency 1).
    conv_size: taps of the causal conv on the angle increments (0: first difference instead).
    use_bias: add ``exp(beta)`` (``beta`` per head and pair, initialised to 0) to the increments.
    use_gate: multiply the increments by a per-head sigmoid phase gate.
    dtype: compute dtype of the projections (angles are float32).
  """
  num_heads: int
  head_dim: int
  rank: int = 32
  base: float = 500000.0
  conv_size: int = 4
  use_bias: bool = False
  use_gate: bool = False
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("num_heads", "head_dim", "rank"):
      _checks.check_positive_int(name, getattr(self, name), allow_none=False)
    if self.head_dim % 2:
      raise ValueError(f"head_dim: got {self.head_dim}; allowed: an even number (channels rotate in pairs)")
    if isinstance(self.base, bool) or not isinstance(self.base, (int, float)) or not self.base >= 1:
      raise ValueError(f"base: got {self.base!r}; allowed: a number >= 1")
    if isinstance(self.conv_size, bool) or not isinstance(self.conv_size, int) or self.conv_size < 0:
      raise ValueError(f"conv_size: got {self.conv_size!r}; allowed: an int >= 0 (0: first difference)")
    super().__post_init__()

  def frequencies(self) -> jax.Array:
    """``(K/2,)`` float32 ``omega_j``."""
    return self.base ** (-jnp.arange(0, self.head_dim, 2, dtype=jnp.float32) / self.head_dim)

  def _increments(self, x_BTD, segment_ids, mode):
    """``phi`` ``(B, T, H, K/2)`` float32 (before the cumulative sum)."""
    batch, seq, d_model = x_BTD.shape
    heads, pairs = self.num_heads, self.head_dim // 2
    if d_model % heads:
      raise ValueError(f"x_BTD: got width {d_model}; allowed: a multiple of num_heads={heads} (l2-normalised "
                       "per head chunk)")
    u = l2_normalize(x_BTD.reshape(batch, seq, heads, d_model // heads)).reshape(x_BTD.shape).astype(self.dtype)
    dense = lambda features, axes, name, bias=False: nn.DenseGeneral(
        features, use_bias=bias, dtype=self.dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes))
    low = dense(self.rank, ("embed", None), "phi_down")(u)
    phi = dense((heads, pairs), (None, "heads", "head_dim"), "phi_up")(low)
    if self.conv_size:
      phi = ShortConv(self.conv_size, False, self.dtype, name="phi_conv")(phi, segment_ids, mode)
      phi = phi.astype(jnp.float32)
    else:
      phi = phi.astype(jnp.float32)
      previous = jnp.pad(phi[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))
      if mode != "off":
        last = self.variable("cache", "phi_last", jnp.zeros, (batch, 1, heads, pairs), jnp.float32)
        if mode == "step":
          previous = previous.at[:, :1].set(last.value)
          last.value = phi[:, -1:]
      if segment_ids is not None:
        previous = jnp.where(_starts(segment_ids)[..., None, None], 0.0, previous)
      phi = phi - previous
    if self.use_bias:
      beta = self.param("phi_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")),
                        (heads, pairs), jnp.float32)
      phi = phi + jnp.exp(beta)
    if self.use_gate:
      gate = dense((heads,), ("embed", "heads"), "phase_gate", bias=True)(u).astype(jnp.float32)
      phi = phi * jax.nn.sigmoid(gate)[..., None]
    return phi

  @nn.compact
  def __call__(self, q_BTHK: jax.Array, k_BTHK: jax.Array, x_BTD: jax.Array, *,
               segment_ids: jax.Array | None = None, mode: str = "off") -> tuple[jax.Array, jax.Array]:
    """Rotated ``(q, k)`` in their dtypes. ``mode``: ``"off"`` (no cache), ``"init"`` (create the decode
    cache) or ``"step"`` (continue ``Phi`` and the conv window from the cache and update them)."""
    expected = (*x_BTD.shape[:2], self.num_heads, self.head_dim)
    for name, t in (("q_BTHK", q_BTHK), ("k_BTHK", k_BTHK)):
      if tuple(t.shape) != expected:
        raise ValueError(f"{name}: got shape {tuple(t.shape)}; allowed: {expected} (batch, seq, num_heads, "
                         "head_dim)")
    phi = self._increments(x_BTD, segment_ids, mode)
    phase = jnp.cumsum(phi, axis=1)
    if segment_ids is not None:  # restart the sum at each segment: subtract the sum before its first token
      phase = phase - _carry_forward(phase - phi, segment_ids)
    if mode != "off":
      cached = self.variable("cache", "phase", jnp.zeros, (x_BTD.shape[0], 1, *phi.shape[2:]), jnp.float32)
      if mode == "step":
        phase = phase + cached.value
        cached.value = phase[:, -1:]
    angle = phase * self.frequencies()
    return rotate(q_BTHK, angle), rotate(k_BTHK, angle)


OPTIONS = ("rank", "base", "conv_size", "use_bias", "use_gate")


def check_selective_rope(options: Any) -> None:
  """ValueError unless ``options`` (a layer's ``selective_rope`` field) is None or a mapping of ``OPTIONS``."""
  if options is None:
    return
  unknown = sorted(set(options) - set(OPTIONS)) if isinstance(options, Mapping) else None
  if unknown is None or unknown:
    raise ValueError(f"selective_rope: got {options!r}; allowed: None or a dict with keys from {OPTIONS}")


def _starts(segment_ids: jax.Array) -> jax.Array:
  """``(B, T)`` bool: the first token of each segment after the first."""
  return jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))


def _carry_forward(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """``values`` at each segment start, carried over the rest of its segment (0 in the first segment)."""
  index = jnp.where(_starts(segment_ids), jnp.arange(segment_ids.shape[1])[None], 0)
  index = jax.lax.cummax(index, axis=1)
  return jnp.take_along_axis(values, index[..., None, None], axis=1) * (index > 0)[..., None, None]


def rotate(x_BTHK: jax.Array, angle_BTHP: jax.Array) -> jax.Array:
  """Rotate-half rotation of the pairs ``(x_j, x_{j + K/2})`` by ``angle`` ``(B, T, H, K/2)``."""
  x = x_BTHK.astype(jnp.float32)
  half = x.shape[-1] // 2
  cos, sin = jnp.cos(angle_BTHP), jnp.sin(angle_BTHP)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTHK.dtype)
