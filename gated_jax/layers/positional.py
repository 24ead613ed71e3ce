"""Rotary position embedding, RoPE (Su et al. 2021, RoFormer, arXiv 2104.09864 eq. 34).

Channel pairs ``(x_i, x_{i + r/2})`` of the first ``r`` channels of each head are rotated by the angle
``pos * base^(-2i/r)`` (the "rotate-half" pairing of GPT-NeoX / Llama / Qwen, so imported weights line up);
the other ``D - r`` channels pass through (partial rotary, ``r = D * fraction`` rounded down to even, e.g.
Qwen3-Next's ``partial_rotary_factor = 0.25``). The rotation makes ``<rope(q, m), rope(k, n)>`` depend on
positions only through ``m - n``. Arithmetic is float32; the output keeps the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_dim(head_dim: int, fraction: float = 1.0) -> int:
  """Number of rotated channels: ``head_dim * fraction`` rounded down to an even number (at least 2)."""
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction: got {fraction!r}; allowed: a float in (0, 1]")
  dim = int(head_dim * fraction) // 2 * 2
  if dim < 2:
    raise ValueError(f"fraction: got {fraction!r} with head_dim {head_dim}, which rotates {dim} channels; "
                     "allowed: head_dim * fraction >= 2")
  return dim


def inverse_frequencies(dim: int, base: float = 10000.0) -> jax.Array:
  """``(dim // 2,)`` float32 ``base^(-2i/dim)``."""
  if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1.0:
    raise ValueError(f"base: got {base!r}; allowed: a float > 1")
  return base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)


def default_positions(batch: int, length: int, offset: jax.Array | int = 0) -> jax.Array:
  """``(B, T)`` int32 positions ``offset + arange(T)``."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset, (batch, length)).astype(jnp.int32)


def apply_rope(x_BTHK: jax.Array, positions_BT: jax.Array, *, base: float = 10000.0,
               fraction: float = 1.0) -> jax.Array:
  """Rotates ``x_BTHK`` ``(B, T, H, D)`` by its ``(B, T)`` integer positions (see module doc)."""
  if x_BTHK.ndim != 4:
    raise ValueError(f"x_BTHK: got shape {tuple(x_BTHK.shape)}; allowed: (batch, seq, heads, head_dim)")
  if tuple(positions_BT.shape) != tuple(x_BTHK.shape[:2]):
    raise ValueError(f"positions_BT: got shape {tuple(positions_BT.shape)}; allowed: {tuple(x_BTHK.shape[:2])} "
                     "(batch, seq) matching x")
  dim = rotary_dim(x_BTHK.shape[-1], fraction)
  angle_BTF = positions_BT.astype(jnp.float32)[..., None] * inverse_frequencies(dim, base)
  cos, sin = jnp.cos(angle_BTF)[:, :, None, :], jnp.sin(angle_BTF)[:, :, None, :]
  x32 = x_BTHK.astype(jnp.float32)
  x1, x2, rest = x32[..., :dim // 2], x32[..., dim // 2:dim], x32[..., dim:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return rotated.astype(x_BTHK.dtype)
