"""Pallas Triton (GPU) kernels of :func:`pallas_kernels.grouped_matmul`: the forward product and both backward
products under one ``jax.custom_vjp`` (grouped GEMMs as in MegaBlocks, arXiv 2211.15841 §5).

* ``_product`` (forward, and the input gradient ``dlhs = dout @ rhs[g]^T`` with ``transpose_rhs``): grid
  ``(row tiles, output-column tiles)``. A row tile may straddle groups; the program loops over the groups its
  rows belong to (the range is computed outside the kernel), accumulates ``lhs_tile @ rhs[g]`` over
  contraction blocks in float32 (skipped for empty groups) and keeps the rows of group ``g``. Total work is
  ``(row tiles + groups - 1)`` tile products, not G times a dense product.
* ``_weight_grad`` (``drhs[g] = lhs[rows of g]^T @ dout[rows of g]``): grid ``(groups, K tiles, N tiles)``;
  each program walks its group's rows in blocks of ``bm`` from the group's first row (unaligned loads, the
  rows past the group's end zeroed), so an empty group writes zeros.

Refs are whole arrays indexed with ``pl.ds`` (Triton needs power-of-two loads, so every block is a power of two
>= 16, and the wrapper pads rows, contraction and output columns to whole blocks, plus one spare row block for
the unaligned loads). ``triton.CompilerParams`` is passed explicitly (without it the GPU lowering picks Mosaic
GPU). float32 products use ``Precision.HIGHEST`` (IEEE, not TF32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import dispatch
from pallas_kernels.grouped_matmul import group_ids

_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)
_MAX_BLOCK = 64
_MIN_BLOCK = 16


def _block(n: int) -> int:
  """The largest power-of-two block <= 64 that does not exceed ``n`` rounded up to a power of two (>= 16)."""
  return min(_MAX_BLOCK, max(_MIN_BLOCK, 1 << (max(n, 1) - 1).bit_length()))


def _round_up(n: int, block: int) -> int:
  return -(-n // block) * block


def _dot(a, b, contract):
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _offsets(group_sizes):
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes.astype(jnp.int32))])


def _product(lhs, rhs, group_sizes, blocks, *, transpose_rhs: bool, out_dtype):
  """``out[m] = lhs[m] @ rhs[g]`` (``rhs[g]^T`` if ``transpose_rhs``) for padded operands; ``(Mp, Np)``.

  ``blocks`` is ``(bm, bk, bn)``: rows, contraction and output columns per block."""
  num_groups = rhs.shape[0]
  rows, contraction = lhs.shape
  columns = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  bm, bk, bn = blocks
  row_tiles = rows // bm - 1  # the last row block is the spare one
  ids = group_ids(group_sizes, row_tiles * bm).reshape(row_tiles, bm)
  first, last = ids[:, 0], jnp.minimum(ids[:, -1], num_groups - 1)

  def kernel(offsets_ref, first_ref, last_ref, lhs_ref, rhs_ref, out_ref):
    i, j = pl.program_id(0), pl.program_id(1)
    r0, c0 = pl.multiple_of(i * bm, bm), pl.multiple_of(j * bn, bn)
    row = r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0)

    def one_group(g, out):
      start, end = offsets_ref[g], offsets_ref[g + 1]

      def k_block(kb, acc):
        k0 = pl.multiple_of(kb * bk, bk)
        x = lhs_ref[pl.ds(r0, bm), pl.ds(k0, bk)]
        if transpose_rhs:
          return acc + _dot(x, rhs_ref[g, pl.ds(c0, bn), pl.ds(k0, bk)], ((1,), (1,)))
        return acc + _dot(x, rhs_ref[g, pl.ds(k0, bk), pl.ds(c0, bn)], ((1,), (0,)))

      trips = jnp.where(end > start, contraction // bk, 0)
      acc = jax.lax.fori_loop(0, trips, k_block, jnp.zeros((bm, bn), jnp.float32))
      return out + jnp.where((row >= start) & (row < end), acc, 0.0)

    out = jax.lax.fori_loop(first_ref[i], last_ref[i] + 1, one_group, jnp.zeros((bm, bn), jnp.float32))
    out_ref[pl.ds(r0, bm), pl.ds(c0, bn)] = out.astype(out_ref.dtype)

  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((row_tiles * bm, columns), out_dtype),
      grid=(row_tiles, columns // bn), compiler_params=_PARAMS, interpret=dispatch.interpret_mode(),
      name="grouped_matmul_dlhs_triton" if transpose_rhs else "grouped_matmul_fwd_triton",
  )(_offsets(group_sizes), first, last, lhs, rhs)


def _weight_grad(lhs, dout, group_sizes, blocks, *, out_dtype):
  """``drhs[g] = lhs[rows of g]^T @ dout[rows of g]`` for padded operands; ``(G, Kp, Np)``.

  ``blocks`` is ``(bm, bk, bn)``: rows, K and N per block."""
  num_groups = group_sizes.shape[0]
  contraction, columns = lhs.shape[1], dout.shape[1]
  bm, bk, bn = blocks

  def kernel(offsets_ref, lhs_ref, dout_ref, out_ref):
    g, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k0, n0 = pl.multiple_of(a * bk, bk), pl.multiple_of(b * bn, bn)
    start, end = offsets_ref[g], offsets_ref[g + 1]
    offset = jax.lax.broadcasted_iota(jnp.int32, (bm, bk), 0)

    def row_block(t, acc):
      r0 = start + t * bm
      x = lhs_ref[pl.ds(r0, bm), pl.ds(k0, bk)]
      x = jnp.where(r0 + offset < end, x, jnp.zeros_like(x))
      return acc + _dot(x, dout_ref[pl.ds(r0, bm), pl.ds(n0, bn)], ((0,), (0,)))

    trips = (end - start + bm - 1) // bm
    acc = jax.lax.fori_loop(0, trips, row_block, jnp.zeros((bk, bn), jnp.float32))
    out_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)] = acc.astype(out_ref.dtype)

  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((num_groups, contraction, columns), out_dtype),
      grid=(num_groups, contraction // bk, columns // bn), compiler_params=_PARAMS,
      interpret=dispatch.interpret_mode(), name="grouped_matmul_drhs_triton",
  )(_offsets(group_sizes), lhs, dout)


def _pad(x, blocks):
  """Pads a 2-D operand to whole ``blocks`` (rows, columns) plus one spare row block (unaligned loads)."""
  bm, bc = blocks
  return jnp.pad(x, ((0, _round_up(x.shape[0], bm) + bm - x.shape[0]), (0, _round_up(x.shape[1], bc) - x.shape[1])))


def _pad_rhs(rhs, bk, bn):
  _, k, n = rhs.shape
  return jnp.pad(rhs, ((0, 0), (0, _round_up(k, bk) - k), (0, _round_up(n, bn) - n)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(lhs, rhs, group_sizes, out_dtype):
  (m, k), n = lhs.shape, rhs.shape[2]
  bm, bk, bn = _block(m), _block(k), _block(n)
  out = _product(_pad(lhs, (bm, bk)), _pad_rhs(rhs, bk, bn), group_sizes, (bm, bk, bn), transpose_rhs=False,
                 out_dtype=out_dtype)
  return out[:m, :n]


def _grouped_matmul_fwd(lhs, rhs, group_sizes, out_dtype):
  return _grouped_matmul(lhs, rhs, group_sizes, out_dtype), (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(out_dtype, residuals, dout):
  del out_dtype
  lhs, rhs, group_sizes = residuals
  (m, k), n = lhs.shape, rhs.shape[2]
  bm, bk, bn = _block(m), _block(k), _block(n)
  dout_p = _pad(dout.astype(lhs.dtype), (bm, bn))
  # dlhs: the forward kernel with N as the contraction and K as the output columns
  dlhs = _product(dout_p, _pad_rhs(rhs, bk, bn), group_sizes, (bm, bn, bk), transpose_rhs=True,
                  out_dtype=lhs.dtype)[:m, :k]
  drhs = _weight_grad(_pad(lhs, (bm, bk)), dout_p, group_sizes, (bm, bk, bn), out_dtype=rhs.dtype)[:, :k, :n]
  return dlhs, drhs, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(lhs, rhs, group_sizes, *, out_dtype):
  """Canonical ``grouped_matmul`` implementation (see ``pallas_kernels.grouped_matmul``)."""
  return _grouped_matmul(lhs, rhs, group_sizes, out_dtype)
