"""Pallas linear-attention kernels (TPU and Triton) in interpret mode against the reference oracle, plus
cross-lowering of the real kernels for their platforms from this CPU host."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.linear_attention import linear_attention

IMPLS = ("pallas_tpu", "pallas_triton")


def _inputs(key, *, batch, seq, heads, kv_heads, key_dim, value_dim, dtype, decay):
  ks = jax.random.split(key, 6)
  q = jax.random.normal(ks[0], (batch, seq, heads, key_dim), dtype)
  k = jax.random.normal(ks[1], (batch, seq, kv_heads, key_dim), dtype)
  v = jax.random.normal(ks[2], (batch, seq, kv_heads, value_dim), dtype)
  shape = {"none": None, "head": (batch, seq, heads), "channel": (batch, seq, heads, key_dim)}[decay]
  if shape is None:
    log_decay = None
  else:  # a mix of strong (-20 per step) and near-zero decays
    u = jax.random.uniform(ks[3], shape)
    log_decay = jnp.where(u < 0.2, -20.0, -1e-3 * u - 0.5 * (u > 0.7) * u)
  state = jax.random.normal(ks[4], (batch, heads, key_dim, value_dim), jnp.float32)
  return q, k, v, log_decay, state


def _loss_and_outputs(implementation, segment_ids, chunk_size):
  def f(q, k, v, log_decay, state):
    o, final = linear_attention(q, k, v, log_decay=log_decay, initial_state=state, return_final_state=True,
                                segment_ids=segment_ids, chunk_size=chunk_size, implementation=implementation)
    o32 = o.astype(jnp.float32)
    return jnp.sum(o32 * jnp.cos(o32)) + jnp.sum(final * jnp.sin(final)), (o, final)
  return f


def _rel_rms(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.sqrt(np.mean((x - ref) ** 2)) / (np.sqrt(np.mean(ref ** 2)) + 1e-12))


CASES = [
    # decay, dtype, seq, chunk, kv_heads, segments, tolerance (relative RMS)
    ("channel", jnp.float32, 40, 16, 2, True, 1e-5),
    ("head", jnp.bfloat16, 45, 32, 2, False, 5e-3),
    ("none", jnp.float32, 20, 64, 1, True, 1e-5),
]


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("decay,dtype,seq,chunk,kv_heads,segments,tol", CASES)
def test_matches_reference(implementation, decay, dtype, seq, chunk, kv_heads, segments, tol):
  q, k, v, log_decay, state = _inputs(jax.random.PRNGKey(seq), batch=1, seq=seq, heads=2, kv_heads=kv_heads,
                                      key_dim=16, value_dim=32, dtype=dtype, decay=decay)
  positions = jnp.arange(seq)[None]
  segment_ids = (positions >= 7).astype(jnp.int32) + (positions >= 26) if segments else None
  argnums = (0, 1, 2, 4) if log_decay is None else (0, 1, 2, 3, 4)
  results = {}
  for impl in (implementation, "reference"):
    f = _loss_and_outputs(impl, segment_ids, chunk)
    with pallas_kernels.interpret():
      (_, outputs), grads = jax.value_and_grad(f, argnums=argnums, has_aux=True)(q, k, v, log_decay, state)
    results[impl] = (*outputs, *grads)
  names = ["o", "final_state"] + [("dq", "dk", "dv", "dlog_decay", "dinitial_state")[i] for i in argnums]
  for name, got, want in zip(names, results[implementation], results["reference"]):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    assert np.all(np.isfinite(np.asarray(got, np.float32))), name
    assert _rel_rms(got, want) < tol, (name, _rel_rms(got, want))


@pytest.mark.parametrize("implementation", IMPLS)
def test_unsupported_chunk_size_raises(implementation):
  q, k, v, _, _ = _inputs(jax.random.PRNGKey(0), batch=1, seq=8, heads=1, kv_heads=1, key_dim=16,
                          value_dim=16, dtype=jnp.float32, decay="none")
  with pallas_kernels.interpret(), pytest.raises(NotImplementedError, match="chunk_size=24.*supported"):
    linear_attention(q, k, v, chunk_size=24, implementation=implementation)


@pytest.mark.parametrize("module,platform,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                    ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_cross_lowers_forward_and_backward(module, platform, marker):
  """The real (non-interpret) kernels lower for their platform with realistic shapes and bf16 inputs."""
  impl = importlib.import_module(f"pallas_kernels.linear_attention.{module}").linear_attention
  batch, seq, heads, dim = 1, 256, 2, 128

  def f(q, k, v, log_decay, state):
    o, final = impl(q, k, v, log_decay, scale=dim ** -0.5, initial_state=state, return_final_state=True,
                    segment_ids=jnp.zeros((batch, seq), jnp.int32), chunk_size=64)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

  sds = jax.ShapeDtypeStruct
  args = (sds((batch, seq, heads, dim), jnp.bfloat16),) * 3 + (sds((batch, seq, heads, dim), jnp.float32),
                                                               sds((batch, heads, dim, dim), jnp.float32))
  text = jax.jit(jax.value_and_grad(f, argnums=range(5))).trace(*args).lower(
      lowering_platforms=(platform,)).as_text()
  assert text.count(marker) >= 3  # forward, state recomputation and backward kernels
  for kernel in ("fwd", "states", "bwd"):
    assert f"linear_attention_{kernel}" in text
