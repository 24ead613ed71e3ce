"""Grouped matrix multiplication, the expert computation of a dropless mixture of experts.

``grouped_matmul(lhs (M, K), rhs (G, K, N), group_sizes (G,))``: the rows of ``lhs`` are sorted by group, the
first ``group_sizes[0]`` rows belong to group 0, the next ``group_sizes[1]`` to group 1, and so on; row ``m`` of
group ``g`` becomes ``lhs[m] @ rhs[g]``. Rows past ``sum(group_sizes)`` (buffer padding, dropped assignments)
come back as zeros, and a group with no rows gets a zero gradient. Products accumulate in float32; the output
has ``preferred_element_type`` (default: the inputs' dtype). This is ``jax.lax.ragged_dot``'s contract and
megablox's ``gmm`` (MegaBlocks, Gale et al. 2022, arXiv 2211.15841 §5: block-sparse grouped GEMMs).

Implementations (``pallas_kernels.dispatch``):

* ``reference``: every group's product on every row, masked (the test oracle; G times the work).
* ``xla``: ``jax.lax.ragged_dot`` on GPU and TPU (native there; its speed is not yet measured in this
  repository, and it is the auto choice only because no kernel has been validated). XLA:CPU lowers
  ``ragged_dot`` to a masked dense product (G times the work), so on CPU ``xla`` is a block-sparse product of
  gathered row tiles instead (:mod:`.xla`).
* ``pallas_tpu``: megablox's ``gmm``/``tgmm`` kernels (jax's ``pallas.ops.tpu.megablox``) with their
  ``custom_vjp``, behind this op's padding and masking.
* ``pallas_triton``: this package's own Triton kernels (:mod:`.gpu`): the forward product, the input gradient
  (the same kernel on the transposed weights) and the weight gradient (one program per group and output tile).

Both Pallas kernels are opt-in by name (``validated_on`` is empty: neither has run compiled here).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import _checks
from pallas_kernels.dispatch import Op

grouped_matmul_op = Op.public("grouped_matmul")
grouped_matmul_op.register("reference", "pallas_kernels.grouped_matmul.reference:grouped_matmul")
grouped_matmul_op.register("xla", "pallas_kernels.grouped_matmul.xla:grouped_matmul", auto_priority=100)
grouped_matmul_op.register("pallas_tpu", "pallas_kernels.grouped_matmul.tpu:grouped_matmul", platforms=("tpu",),
                           auto_priority=0, pallas=True)
grouped_matmul_op.register("pallas_triton", "pallas_kernels.grouped_matmul.gpu:grouped_matmul",
                           platforms=("gpu",), auto_priority=1, pallas=True)

_DTYPES = ("float32", "bfloat16")


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None,
                   implementation: str | Sequence[str] | None = None):
  """``out[m] = lhs[m] @ rhs[group of m]`` for rows sorted by group (module docstring).

  Args:
    lhs: ``(M, K)`` float32 or bfloat16, rows sorted by group.
    rhs: ``(G, K, N)``, the same dtype as ``lhs``.
    group_sizes: ``(G,)`` integer rows per group, each >= 0, summing to at most M (checked when concrete).
    preferred_element_type: output dtype (float32 or bfloat16); default ``lhs.dtype``.
    implementation: see :mod:`pallas_kernels.dispatch`.
  Returns:
    ``(M, N)`` in ``preferred_element_type``; rows past ``sum(group_sizes)`` are zero.
  """
  _checks.check_array("lhs", lhs, rank=2, layout="(rows, in_features)")
  _checks.check_array("rhs", rhs, rank=3, layout="(groups, in_features, out_features)")
  _checks.check_array("group_sizes", group_sizes, rank=1, layout="(groups,)", floating=False)
  _checks.check_choice("lhs.dtype", jnp.dtype(lhs.dtype).name, _DTYPES)
  if rhs.dtype != lhs.dtype:
    raise ValueError(f"rhs: got dtype {rhs.dtype}; allowed: the dtype of lhs ({lhs.dtype})")
  if rhs.shape[1] != lhs.shape[1]:
    raise ValueError(f"rhs: expected shape (groups, {lhs.shape[1]}, out_features) to match lhs "
                     f"{tuple(lhs.shape)}, got {tuple(rhs.shape)}")
  _checks.check_shape("group_sizes", group_sizes, (rhs.shape[0],), "(groups,) with groups = rhs.shape[0]")
  out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
  _checks.check_choice("preferred_element_type", out_dtype.name, _DTYPES)
  if not isinstance(group_sizes, jax.core.Tracer):  # only concrete values can be checked (not jit arguments)
    with jax.ensure_compile_time_eval():
      low, total = int(jnp.min(group_sizes, initial=0)), int(jnp.sum(group_sizes))
    if low < 0 or total > lhs.shape[0]:
      raise ValueError(f"group_sizes: got minimum {low} and sum {total}; allowed: sizes >= 0 summing to at "
                       f"most the {lhs.shape[0]} rows of lhs")
  return grouped_matmul_op(lhs, rhs, group_sizes.astype(jnp.int32), implementation=implementation,
                           out_dtype=out_dtype)


def group_ids(group_sizes, num_rows: int):
  """``(num_rows,)`` int32: the group of every row, ``G`` for rows past ``sum(group_sizes)``."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right").astype(jnp.int32)
