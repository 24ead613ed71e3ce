"""Array helpers of the chunk-math modules (:mod:`._gla_math`, :mod:`._delta_math`).

Every helper is valid on two kinds of operand: batched arrays ``(..., rows, cols)`` (the ``xla`` backend runs
the chunk math on a group of chunks at once; a leading axis of size 1 broadcasts, which is how a key/value head is
shared by its group of query heads without a copy) and plain 2-D tiles inside a Pallas kernel (Mosaic or
Triton): contractions are ``dot_general``s with explicit contracting dimensions (no transposes), masks come
from 2-D iotas, and nothing slices or reshapes a value.

Dot policy (``dtype``): operands are cast to the compute dtype and accumulate in float32; a float32 compute
dtype runs at ``HIGHEST`` precision (IEEE on GPUs, no TF32; exact passes on the MXU), a 16-bit one at the
native rate (tensor cores / MXU). With 16-bit inputs, the forward's dots and those of the inputs themselves
run in 16 bits, as flash-linear-attention's kernels do; the dots of float32 intermediates where 16 bits lose
too much (score cotangents, the WY/UT factors, the delta-rule correction ``w S^T``, which cancels) take
:func:`wide`: float32 at ``HIGHEST``. Decay arithmetic (``exp`` of cumulative log decays) is always float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Log decays are clamped here (no -inf - -inf anywhere). exp(-30) ~ 9e-14 is below float32 resolution
# (1.2e-7) relative to whatever the state holds, so -inf, -1e4 and a segment start all empty the state to
# working precision; a smaller magnitude also keeps the within-chunk cumulative sums, whose differences are
# the exponents, small (float32 rounding of a difference grows with the magnitude of the sums).
MIN_LOG_DECAY = -30.0


def wide(dtype):
  """The dot dtype of the backward's float32 intermediates: float32 whatever the inputs (see above)."""
  del dtype
  return jnp.float32


def precision(dtype):
  """The ``lax.Precision`` of dots in ``dtype`` (see the module docstring)."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _dot(spec: str, a, b, dtype):
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=precision(dtype),
                    preferred_element_type=jnp.float32)


def mm(a, b, dtype):
  """``a @ b`` (float32)."""
  return _dot("...ik,...kj->...ij", a, b, dtype)


def mm_nt(a, b, dtype):
  """``a @ b^T`` (float32)."""
  return _dot("...ik,...jk->...ij", a, b, dtype)


def mm_tn(a, b, dtype):
  """``a^T @ b`` (float32)."""
  return _dot("...ki,...kj->...ij", a, b, dtype)


def sym_mm(a, b, dtype):
  """``(a + a^T) @ b`` for square ``a`` (float32): one dot on batched arrays, two inside a kernel (where this
  module does not transpose)."""
  if a.ndim == 2:
    return mm(a, b, dtype) + mm_tn(a, b, dtype)
  return mm(a + jnp.swapaxes(a, -1, -2), b, dtype)


# Sums of products over one axis. On batched arrays (the ``xla`` backend) they run as dots: XLA:CPU executes a
# fused multiply-and-reduce over an axis of a ``(..., C, K)`` array about 20x slower than the same contraction
# as a batched dot. On the 2-D tiles of a kernel (where batched dots and 1-wide dots do not exist) they are
# plain reductions.


def row_dot(a, b):
  """``sum_k a_ik b_ik`` as ``(..., C, 1)`` float32 (``a``, ``b`` broadcast like ``a * b``)."""
  a, b = jnp.broadcast_arrays(a.astype(jnp.float32), b.astype(jnp.float32))
  if a.ndim == 2:
    return jnp.sum(a * b, axis=-1, keepdims=True)
  return jnp.einsum("...ck,...ck->...c", a, b, precision=jax.lax.Precision.HIGHEST)[..., None]


def col_dot(a, b):
  """``sum_i a_ik b_ik`` as ``(..., 1, K)`` float32 (``a``, ``b`` broadcast like ``a * b``)."""
  a, b = jnp.broadcast_arrays(a.astype(jnp.float32), b.astype(jnp.float32))
  if a.ndim == 2:
    return jnp.sum(a * b, axis=-2, keepdims=True)
  return jnp.einsum("...ck,...ck->...k", a, b, precision=jax.lax.Precision.HIGHEST)[..., None, :]


def row_sum(x):
  """``sum_k x_ik`` as ``(..., C, 1)`` (a matrix-vector product on batched arrays)."""
  if x.ndim == 2:
    return jnp.sum(x, axis=-1, keepdims=True)
  return jnp.matmul(x, jnp.ones((x.shape[-1], 1), x.dtype), precision=jax.lax.Precision.HIGHEST)


def col_sum(x):
  """``sum_i x_ik`` as ``(..., 1, K)`` (a vector-matrix product on batched arrays)."""
  if x.ndim == 2:
    return jnp.sum(x, axis=-2, keepdims=True)
  return jnp.matmul(jnp.ones((1, x.shape[-2]), x.dtype), x, precision=jax.lax.Precision.HIGHEST)


def iota(shape, dim: int):
  """int32 indices along ``dim`` of a 2-D ``shape``."""
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def causal_mask(rows: int, *, strict: bool = False):
  """``(rows, rows)`` bool: ``j <= i`` (``j < i`` when ``strict``)."""
  i, j = iota((rows, rows), 0), iota((rows, rows), 1)
  return i > j if strict else i >= j


def masked_exp(log_x, mask):
  """``exp(log_x)`` where ``mask``, else 0, masked before ``exp`` (no overflow, finite gradients)."""
  return jnp.exp(jnp.where(mask, log_x, -jnp.inf))


def last_row_mask(rows: int):
  """``(rows, 1)`` bool, true on the last row."""
  return iota((rows, 1), 0) == rows - 1


def as_row(col_C1):
  """``(..., C, 1)`` -> ``(..., 1, C)`` without a transpose (a masked reduction)."""
  rows = col_C1.shape[-2]
  eye = iota((rows, rows), 0) == iota((rows, rows), 1)
  return jnp.sum(jnp.where(eye, col_C1, 0.0), axis=-2, keepdims=True)


def as_col(row_1C):
  """``(..., 1, C)`` -> ``(..., C, 1)`` without a transpose (a masked reduction)."""
  cols = row_1C.shape[-1]
  eye = iota((cols, cols), 0) == iota((cols, cols), 1)
  return jnp.sum(jnp.where(eye, row_1C, 0.0), axis=-1, keepdims=True)
