"""Pallas TPU (Mosaic) implementation of :func:`pallas_kernels.grouped_matmul`: jax's megablox kernels
(``jax.experimental.pallas.ops.tpu.megablox``: ``gmm`` forward and input gradient, ``tgmm`` weight gradient,
under megablox's own ``custom_vjp``; MegaBlocks arXiv 2211.15841 §5).

This module only adapts the op's contract to megablox's: rows are padded to a whole row tile (megablox
requires ``M % tm == 0``), tiles respect Mosaic's (8, 128) rule (``tk``/``tn`` are the whole dimension up to
512, else 512, a multiple of 128; megablox masks a partial last contraction tile), products accumulate in
float32, and rows past ``sum(group_sizes)``, which megablox leaves unwritten in the output and in the input
gradient, are zeroed in both (a ``where`` on the input selects zeros, not the unwritten values, backwards).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from pallas_kernels import dispatch

_MAX_TILE = 512
_ROW_TILE = 128
_SUBLANES = 16  # a multiple of the float32 (8) and bfloat16 (16) sublane tiling


def tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  """``(tm, tk, tn)`` for an ``(m, k) x (k, n)`` problem (module docstring)."""
  tm = min(_ROW_TILE, -(-m // _SUBLANES) * _SUBLANES)
  return tm, (k if k <= _MAX_TILE else _MAX_TILE), (n if n <= _MAX_TILE else _MAX_TILE)


def grouped_matmul(lhs, rhs, group_sizes, *, out_dtype):
  """Canonical ``grouped_matmul`` implementation (see ``pallas_kernels.grouped_matmul``)."""
  m, k = lhs.shape
  tm, tk, tn = tiling(m, k, rhs.shape[2])
  padded = -(-m // tm) * tm
  valid = (jnp.arange(m, dtype=jnp.int32) < jnp.sum(group_sizes))[:, None]
  lhs = jnp.pad(jnp.where(valid, lhs, jnp.zeros_like(lhs)), ((0, padded - m), (0, 0)))
  out = megablox.gmm(lhs, rhs, group_sizes, jnp.float32, (tm, tk, tn), None, None, False,
                     dispatch.interpret_mode())
  return jnp.where(valid, out[:m], 0.0).astype(out_dtype)
