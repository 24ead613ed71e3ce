"""Self-test cases of :func:`pallas_kernels.grouped_matmul` (an MoE expert layer's shapes, awkward sizes)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.selftest import Case


def _inputs(key, *, rows: int, k: int, n: int, sizes: tuple[int, ...], dtype=jnp.float32):
  """lhs (rows, k), rhs (G, k, n) and the given group sizes (may be empty, may sum to less than rows)."""
  kl, kr = jax.random.split(key)
  lhs = jax.random.normal(kl, (rows, k)).astype(dtype)
  rhs = (jax.random.normal(kr, (len(sizes), k, n)) / k ** 0.5).astype(dtype)
  return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _gmm(lhs, rhs, group_sizes, *, implementation):
  return grouped_matmul(lhs, rhs, group_sizes, implementation=implementation)


CASES = (
    Case("grouped_matmul", "f32 M=300 K=96 N=160 G=8, empty groups, 20 padding rows", _gmm,
         functools.partial(_inputs, rows=300, k=96, n=160, sizes=(50, 0, 70, 33, 0, 64, 63, 0)), (0, 1), 1e-4),
    Case("grouped_matmul", "bf16 M=1024 K=256 N=512 G=8", _gmm,
         functools.partial(_inputs, rows=1024, k=256, n=512, sizes=(128, 96, 160, 128, 1, 255, 128, 128),
                           dtype=jnp.bfloat16), (0, 1), 2e-2),
)
