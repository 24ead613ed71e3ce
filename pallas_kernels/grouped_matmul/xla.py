"""``xla`` implementation of :func:`pallas_kernels.grouped_matmul`: ``jax.lax.ragged_dot`` (native on TPU and
GPU; XLA:CPU lowers it to a masked dense batched product). Rows past ``sum(group_sizes)`` are zeroed
explicitly, as not every backend guarantees it."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(lhs, rhs, group_sizes, *, out_dtype):
  """Canonical ``grouped_matmul`` implementation (see ``pallas_kernels.grouped_matmul``)."""
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)
  valid = jnp.arange(lhs.shape[0], dtype=jnp.int32) < jnp.sum(group_sizes)
  return jnp.where(valid[:, None], out, 0.0).astype(out_dtype)
