"""The oracle of :func:`pallas_kernels.grouped_matmul`: every group's product on every row, masked to the rows
of that group, in float32 at the highest precision (G times the work of one product; tests only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import group_ids


def grouped_matmul(lhs, rhs, group_sizes, *, out_dtype):
  """Canonical ``grouped_matmul`` implementation (see ``pallas_kernels.grouped_matmul``)."""
  rows = group_ids(group_sizes, lhs.shape[0])
  products_GMN = jnp.einsum("mk,gkn->gmn", lhs.astype(jnp.float32), rhs.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
  member_GM = rows[None, :] == jnp.arange(rhs.shape[0], dtype=jnp.int32)[:, None]
  return jnp.sum(jnp.where(member_GM[..., None], products_GMN, 0.0), axis=0).astype(out_dtype)
