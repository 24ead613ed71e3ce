"""``pallas_kernels.long_conv``: the ``reference`` lag loop against a float64 numpy double sum, and ``xla``
(FFT without segments, masked Toeplitz with them) against ``reference`` — outputs and gradients, float32 and
bfloat16, packed segments, a length that is not a power of two, a single token — plus bad arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels

pytestmark = pytest.mark.usefixtures("fast_compile")

SEGMENTS = np.array([[0] * 5 + [1] * 3 + [2] * 5, [7] * 13], np.int32)


def _inputs(seq=13, channels=3, dtype=jnp.float32):
  u = jax.random.normal(jax.random.key(0), (2, seq, channels)).astype(dtype)
  kernel = jax.random.normal(jax.random.key(1), (seq, channels)).astype(dtype)
  return u, kernel


def _numpy_conv(u, kernel, segment_ids):
  u, kernel = np.asarray(u, np.float64), np.asarray(kernel, np.float64)
  y = np.zeros_like(u)
  for b in range(u.shape[0]):
    for t in range(u.shape[1]):
      for s in range(t + 1):
        if segment_ids is None or segment_ids[b, s] == segment_ids[b, t]:
          y[b, t] += kernel[t - s] * u[b, s]
  return y


@pytest.mark.parametrize("segment_ids", [None, SEGMENTS])
def test_reference_is_the_causal_sum(segment_ids):
  u, kernel = _inputs()
  got = pallas_kernels.long_conv(u, kernel, segment_ids=segment_ids, implementation="reference")
  np.testing.assert_allclose(got, _numpy_conv(u, kernel, segment_ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("segment_ids", [None, SEGMENTS])
def test_xla_matches_reference_forward_and_gradients(dtype, tol, segment_ids):
  u, kernel = _inputs(dtype=dtype)
  cotangent = jax.random.normal(jax.random.key(2), u.shape)

  def loss(impl):
    return jax.jit(jax.value_and_grad(
        lambda u, k: jnp.sum(pallas_kernels.long_conv(u, k, segment_ids=segment_ids, implementation=impl)
                             .astype(jnp.float32) * cotangent), argnums=(0, 1)))(u, kernel)

  (want, want_grads), (got, got_grads) = loss("reference"), loss("xla")
  scale = float(jnp.abs(want)) + 1.0
  assert abs(float(got) - float(want)) <= tol * scale
  for g, w in zip(got_grads, want_grads):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.linalg.norm(g - w) <= tol * np.linalg.norm(w)
  assert pallas_kernels.long_conv(u, kernel, implementation="xla").dtype == dtype


def test_single_token_is_the_first_tap():
  u, kernel = _inputs(seq=1)
  np.testing.assert_allclose(pallas_kernels.long_conv(u, kernel), u * kernel[0], rtol=1e-6)


@pytest.mark.parametrize("args, match", [
    (dict(u=jnp.zeros((2, 5)), kernel=jnp.zeros((5, 3))), "u"),
    (dict(u=jnp.zeros((2, 5, 3)), kernel=jnp.zeros((4, 3))), "kernel"),
    (dict(u=jnp.zeros((2, 5, 3)), kernel=jnp.zeros((5, 3)), segment_ids=jnp.zeros((2, 4), jnp.int32)), "segment_ids"),
    (dict(u=jnp.zeros((2, 5, 3)), kernel=jnp.zeros((5, 3)), segment_ids=jnp.zeros((2, 5))), "segment_ids"),
])
def test_bad_arguments_raise(args, match):
  with pytest.raises(ValueError, match=match):
    pallas_kernels.long_conv(**args)
