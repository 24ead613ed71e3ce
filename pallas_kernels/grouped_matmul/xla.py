"""``xla`` implementation of :func:`pallas_kernels.grouped_matmul`, pure XLA.

* On GPU and TPU: ``jax.lax.ragged_dot``, which XLA lowers natively (its speed there is not yet measured in
  this repository's benchmarks).
* On CPU: XLA:CPU lowers ``ragged_dot`` to a masked dense batched product, every group on every row (G times
  the work; ``experiments/benchmarks/moe.py`` measures it), so the CPU path is a block-sparse product instead
  (MegaBlocks arXiv 2211.15841 §3): each group's rows are gathered into whole tiles of ``bm`` rows (a group's
  last tile padded with a zero row), every tile is multiplied by its group's matrix in one batched product,
  and the rows are gathered back. The work is ``(M + G·bm)·K·N``; autodiff turns the gathers into
  scatter-adds.

Either way rows past ``sum(group_sizes)`` are zeroed explicitly, as not every backend guarantees it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import current_backend
from pallas_kernels.grouped_matmul import group_ids

_HIGHEST = jax.lax.Precision.HIGHEST


def tile_rows(rows: int, groups: int) -> int:
  """``bm`` of the block-sparse path: 64, or a smaller power of two (>= 8) when the groups are short."""
  bm = 64
  while bm > 8 and bm * groups > rows:
    bm //= 2
  return bm


def ragged(lhs, rhs, group_sizes):
  """``jax.lax.ragged_dot`` in float32 (rows past the groups zeroed)."""
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=_HIGHEST, preferred_element_type=jnp.float32)
  valid = jnp.arange(lhs.shape[0], dtype=jnp.int32) < jnp.sum(group_sizes)
  return jnp.where(valid[:, None], out, 0.0)


def block_sparse(lhs, rhs, group_sizes):
  """The tiled product of the module docstring, in float32."""
  (m, k), (g, _, n) = lhs.shape, rhs.shape
  bm = tile_rows(m, g)
  tiles = -(-m // bm) + g  # static bound: every group may end in a partial tile
  group_tiles = (group_sizes + bm - 1) // bm
  tile_end = jnp.cumsum(group_tiles)
  tile_start, row_start = tile_end - group_tiles, jnp.cumsum(group_sizes) - group_sizes
  # padded slot -> source row (m: the zero row appended to lhs)
  slot = jnp.arange(tiles * bm, dtype=jnp.int32)
  tile = slot // bm
  tile_group = jnp.minimum(jnp.searchsorted(tile_end, tile, side="right"), g - 1)
  row = row_start[tile_group] + slot - tile_start[tile_group] * bm
  used = (tile < tile_end[-1]) & (row < row_start[tile_group] + group_sizes[tile_group])
  padded = jnp.concatenate([lhs, jnp.zeros((1, k), lhs.dtype)])[jnp.where(used, row, m)]
  tile_group = tile_group.reshape(tiles, bm)[:, 0]
  out = jnp.einsum("tbk,tkn->tbn", padded.reshape(tiles, bm, k), rhs[tile_group], precision=_HIGHEST,
                   preferred_element_type=jnp.float32).reshape(tiles * bm, n)
  # row -> padded slot
  groups = group_ids(group_sizes, m)
  clipped = jnp.minimum(groups, g - 1)
  back = tile_start[clipped] * bm + jnp.arange(m, dtype=jnp.int32) - row_start[clipped]
  return jnp.where((groups < g)[:, None], out[back], 0.0)


def grouped_matmul(lhs, rhs, group_sizes, *, out_dtype):
  """Canonical ``grouped_matmul`` implementation (see ``pallas_kernels.grouped_matmul``)."""
  product = block_sparse if current_backend() == "cpu" else ragged
  return product(lhs, rhs, group_sizes).astype(out_dtype)
