"""``pallas_kernels.grouped_matmul``: every implementation against the masked dense ``reference`` (outputs and
both gradients; float32 and bfloat16; empty groups, rows past the last group, sizes that are not a multiple of
any tile), the Pallas kernels in interpret mode and cross-lowered for their platforms; argument errors."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_op

pytestmark = pytest.mark.usefixtures("fast_compile")

# rows, k, n, group sizes (sum <= rows), dtype, tolerance (relative RMS)
F32 = (37, 20, 24, (10, 0, 15, 7, 0), jnp.float32, 1e-5)
BF16 = (70, 48, 33, (0, 40, 1, 25), jnp.bfloat16, 1e-2)


def _inputs(rows, k, n, sizes, dtype):
  kl, kr = jax.random.split(jax.random.PRNGKey(rows))
  lhs = jax.random.normal(kl, (rows, k)).astype(dtype)
  rhs = (jax.random.normal(kr, (len(sizes), k, n)) / k ** 0.5).astype(dtype)
  return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _value_and_grads(implementation, lhs, rhs, group_sizes):
  def f(lhs, rhs, group_sizes):
    out = grouped_matmul(lhs, rhs, group_sizes, implementation=implementation)
    o32 = out.astype(jnp.float32)
    return jnp.sum(o32 * jnp.cos(o32)), out
  with pallas_kernels.interpret():
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(lhs, rhs, group_sizes)
  return (out, *grads)


@functools.cache
def _reference(case):
  return _value_and_grads("reference", *_inputs(*case[:-1]))


def _rel_rms(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.sqrt(np.mean((x - ref) ** 2)) / (np.sqrt(np.mean(ref ** 2)) + 1e-12))


@pytest.mark.parametrize("implementation,case", [
    ("xla", F32), pytest.param("xla", BF16, marks=pytest.mark.slow), ("pallas_triton", F32),
    ("pallas_triton", BF16), ("pallas_tpu", F32), pytest.param("pallas_tpu", BF16, marks=pytest.mark.slow)])
def test_matches_reference(implementation, case):
  *shape, dtype, tol = case
  lhs, rhs, group_sizes = _inputs(*shape, dtype)
  got = _value_and_grads(implementation, lhs, rhs, group_sizes)
  want = _reference(case)
  for name, g, w in zip(("out", "dlhs", "drhs"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert _rel_rms(g, w) < tol, (name, _rel_rms(g, w))
  total = int(jnp.sum(group_sizes))
  out, dlhs, drhs = got
  assert not np.any(np.asarray(out[total:], np.float32)) and not np.any(np.asarray(dlhs[total:], np.float32))
  empty = np.flatnonzero(np.asarray(group_sizes) == 0)
  assert not np.any(np.asarray(drhs[empty], np.float32))


def test_reference_is_the_per_row_product():
  lhs, rhs, group_sizes = _inputs(*F32[:4], jnp.float32)
  out = np.asarray(grouped_matmul(lhs, rhs, group_sizes, implementation="reference"))
  groups = np.repeat(np.arange(5), np.asarray(group_sizes))
  want = np.zeros_like(out)
  for row, g in enumerate(groups):
    want[row] = np.asarray(lhs[row], np.float64) @ np.asarray(rhs[g], np.float64)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_auto_is_xla_and_output_dtype_follows_preferred_element_type():
  lhs, rhs, group_sizes = _inputs(*BF16[:4], jnp.bfloat16)
  assert grouped_matmul_op.validated() == {"pallas_tpu": (), "pallas_triton": ()}
  assert grouped_matmul_op.auto_order("gpu") == grouped_matmul_op.auto_order("tpu") == ("xla", "reference")
  out = jax.eval_shape(lambda l, r: grouped_matmul(l, r, group_sizes, preferred_element_type=jnp.float32), lhs, rhs)
  assert out.dtype == jnp.float32 and out.shape == (lhs.shape[0], rhs.shape[2])


@pytest.mark.parametrize("module,platform,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                    ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_cross_lowers_forward_and_backward(module, platform, marker):
  """The real kernels lower for their platform at an MoE shape (bf16, rows not a multiple of any tile)."""
  impl = importlib.import_module(f"pallas_kernels.grouped_matmul.{module}").grouped_matmul

  def f(lhs, rhs, group_sizes):
    return jnp.sum(impl(lhs, rhs, group_sizes, out_dtype=jnp.bfloat16).astype(jnp.float32) ** 2)

  sds = jax.ShapeDtypeStruct
  args = (sds((1000, 256), jnp.bfloat16), sds((8, 256, 384), jnp.bfloat16), sds((8,), jnp.int32))
  text = jax.jit(jax.grad(f, argnums=(0, 1))).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert text.count(marker) == 3  # forward, input gradient, weight gradient


@pytest.mark.parametrize("args,match", [
    (((4, 3, 2), (2, 3, 5), (2,)), "lhs: expected shape"),
    (((4, 3), (2, 4, 5), (2,)), "rhs: expected shape"),
    (((4, 3), (2, 3, 5), (3,)), "group_sizes: expected shape"),
])
def test_bad_shapes_raise(args, match):
  lhs, rhs, sizes = (jnp.zeros(s) for s in args)
  with pytest.raises(ValueError, match=match):
    grouped_matmul(lhs, rhs, sizes.astype(jnp.int32))


def test_bad_values_and_dtypes_raise():
  lhs, rhs = jnp.zeros((4, 3)), jnp.zeros((2, 3, 5))
  with pytest.raises(ValueError, match=r"group_sizes: got minimum -1 and sum 3"):
    grouped_matmul(lhs, rhs, jnp.array([4, -1], jnp.int32))
  with pytest.raises(ValueError, match=r"sum 5; allowed: .* the 4 rows"):
    grouped_matmul(lhs, rhs, jnp.array([2, 3], jnp.int32))
  with pytest.raises(ValueError, match="group_sizes: expected an integer dtype"):
    grouped_matmul(lhs, rhs, jnp.array([2.0, 1.0]))
  with pytest.raises(ValueError, match="rhs: got dtype bfloat16"):
    grouped_matmul(lhs, rhs.astype(jnp.bfloat16), jnp.array([2, 1], jnp.int32))
  with pytest.raises(ValueError, match="preferred_element_type: got 'float16'"):
    grouped_matmul(lhs, rhs, jnp.array([2, 1], jnp.int32), preferred_element_type=jnp.float16)
  with pytest.raises(ValueError, match="implementation for grouped_matmul: got 'cuda'"):
    grouped_matmul(lhs, rhs, jnp.array([2, 1], jnp.int32), implementation="cuda")


def test_traced_group_sizes_are_not_checked_eagerly():
  lhs, rhs, group_sizes = _inputs(*F32[:4], jnp.float32)
  out = jax.jit(lambda gs: grouped_matmul(lhs, rhs, gs, implementation="xla"))(group_sizes)
  np.testing.assert_allclose(out, grouped_matmul(lhs, rhs, group_sizes, implementation="reference"), atol=1e-5)
