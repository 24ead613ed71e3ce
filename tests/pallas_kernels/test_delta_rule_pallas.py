"""Pallas gated delta rule kernels (TPU ``_pallas_delta``, Triton ``_pallas_delta_triton``) in interpret mode
against the reference oracle (outputs, final state and every gradient), plus cross-lowering of the real
forward and backward kernels for their platforms from this CPU host."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.linear_attention import _pallas_delta, delta_rule


def _inputs(key, *, seq, heads, kv_heads, key_dim, value_dim, dtype, decay, beta_max):
  ks = jax.random.split(key, 6)
  q = jax.random.normal(ks[0], (1, seq, heads, key_dim), jnp.float32)
  k = jax.random.normal(ks[1], (1, seq, kv_heads, key_dim), jnp.float32)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # L2-normalised keys, as the layers use
  v = jax.random.normal(ks[2], (1, seq, kv_heads, value_dim), jnp.float32)
  beta = beta_max * jax.nn.sigmoid(jax.random.normal(ks[3], (1, seq, heads)))
  u = jax.random.uniform(ks[4], (1, seq, heads))
  # a mix of strong (-20 per step) and near-zero decays
  log_decay = jnp.where(u < 0.2, -20.0, -1e-3 * u - 0.5 * (u > 0.7) * u) if decay else None
  state = jax.random.normal(ks[5], (1, heads, key_dim, value_dim), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), beta, log_decay, state


def _rel_rms(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.sqrt(np.mean((x - ref) ** 2)) / (np.sqrt(np.mean(ref ** 2)) + 1e-12))


CASES = [
    # dtype, decay, seq, chunk, kv_heads, segments, beta_max, tolerance (relative RMS)
    (jnp.float32, True, 40, 16, 1, True, 1.0, 1e-5),  # T % chunk != 0, GQA, packed sequences
    (jnp.bfloat16, False, 70, 64, 2, False, 2.0, 2e-3),  # 4 inverse blocks, negative eigenvalues
]


@functools.lru_cache(maxsize=None)
def _outputs_and_grads(implementation, case):
  """``(o, final_state, *grads)`` of a scalar loss for one case (cached: the reference serves both backends)."""
  dtype, decay, seq, chunk, kv_heads, segments, beta_max, _ = case
  q, k, v, beta, log_decay, state = _inputs(jax.random.PRNGKey(seq), seq=seq, heads=2, kv_heads=kv_heads,
                                            key_dim=16, value_dim=32, dtype=dtype, decay=decay,
                                            beta_max=beta_max)
  positions = jnp.arange(seq)[None]
  segment_ids = (positions >= 7).astype(jnp.int32) + (positions >= 26) if segments else None

  def f(q, k, v, beta, log_decay, state, segment_ids):
    o, final = delta_rule(q, k, v, beta, log_decay=log_decay, initial_state=state, return_final_state=True,
                          segment_ids=segment_ids, chunk_size=chunk, implementation=implementation)
    o32 = o.astype(jnp.float32)
    return jnp.sum(o32 * jnp.cos(o32)) + jnp.sum(final * jnp.sin(final)), (o, final)

  argnums = (0, 1, 2, 3, 5) if log_decay is None else (0, 1, 2, 3, 4, 5)
  with pallas_kernels.interpret():
    (_, outputs), grads = jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))(
        q, k, v, beta, log_decay, state, segment_ids)
  names = ["o", "final_state"] + [("dq", "dk", "dv", "dbeta", "dlog_decay", "dinitial_state")[i] for i in argnums]
  return dict(zip(names, (*outputs, *grads)))


@pytest.mark.parametrize("implementation,case", [("pallas_tpu", case) for case in CASES]
                         + [("pallas_triton", CASES[0])], ids=["tpu-f32", "tpu-bf16", "triton-f32"])
def test_matches_reference(implementation, case):
  got, want = _outputs_and_grads(implementation, case), _outputs_and_grads("reference", case)
  assert got.keys() == want.keys()
  for name in want:
    assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
    assert np.all(np.isfinite(np.asarray(got[name], np.float32))), name
    assert _rel_rms(got[name], want[name]) < case[-1], (name, _rel_rms(got[name], want[name]))


@pytest.mark.parametrize("chunk", [32, 128])  # 2 and 8 diagonal blocks
def test_unit_lower_inverse(chunk):
  a = np.tril(np.random.default_rng(chunk).uniform(-0.3, 0.3, (chunk, chunk)).astype(np.float32), -1)
  inverse = jax.jit(_pallas_delta.unit_lower_inverse)(a)
  np.testing.assert_allclose(np.asarray(inverse @ (jnp.eye(chunk) + a)), np.eye(chunk), atol=1e-5)
  np.testing.assert_array_equal(np.triu(np.asarray(inverse), 1), 0.0)


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_triton"])
def test_unsupported_chunk_size_raises(implementation):
  q = k = v = np.ones((1, 8, 1, 16), np.float32)
  beta = np.ones((1, 8, 1), np.float32)
  with pallas_kernels.interpret(), pytest.raises(NotImplementedError, match="chunk_size=24.*supported"):
    delta_rule(q, k, v, beta, chunk_size=24, implementation=implementation)


@pytest.mark.parametrize("module,platform,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                    ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_cross_lowers_forward_and_backward(module, platform, marker):
  """The real (non-interpret) kernels lower for their platform with realistic shapes and bf16 inputs."""
  impl = importlib.import_module(f"pallas_kernels.linear_attention.{module}").delta_rule
  batch, seq, heads, dim = 1, 256, 2, 128

  def f(q, k, v, beta, log_decay, state):
    o, final = impl(q, k, v, beta, log_decay, scale=dim ** -0.5, initial_state=state, return_final_state=True,
                    segment_ids=jnp.zeros((batch, seq), jnp.int32), chunk_size=64)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

  sds = jax.ShapeDtypeStruct
  args = ((sds((batch, seq, heads, dim), jnp.bfloat16),) * 3 + (sds((batch, seq, heads), jnp.float32),) * 2
          + (sds((batch, heads, dim, dim), jnp.float32),))
  text = jax.jit(jax.value_and_grad(f, argnums=range(6))).trace(*args).lower(
      lowering_platforms=(platform,)).as_text()
  assert text.count(marker) >= 3  # forward, state recomputation and backward kernels
  for kernel in ("fwd", "states", "bwd"):
    assert f"delta_rule_{kernel}" in text
