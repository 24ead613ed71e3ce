"""Tests for gated_jax.train.losses: StableMax cross-entropy and the Softmax Collapse measure
(arXiv 2501.04697) against numpy and the reference facts (StableMax([-2, 0, 0.5]), z = (40, 0, 0) in float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy import testing as npt

from gated_jax.train import losses


def _numpy_stablemax(z):
  s = np.where(z >= 0, z + 1.0, 1.0 / (1.0 - np.minimum(z, 0.0)))
  return s / s.sum(-1, keepdims=True)


def test_stablemax_values_and_cross_entropy_match_numpy():
  npt.assert_allclose(np.exp(losses.log_stablemax(jnp.array([-2.0, 0.0, 0.5]))), [0.118, 0.353, 0.529], atol=1e-3)
  z = np.random.default_rng(0).normal(size=(6, 5)) * 4
  labels = np.array([0, 1, 2, 3, 4, 0])
  expected = -np.mean(np.log(_numpy_stablemax(z)[np.arange(6), labels]))
  npt.assert_allclose(losses.stablemax_cross_entropy(jnp.asarray(z, jnp.float32), jnp.asarray(labels)), expected,
                      rtol=1e-5)
  grad = jax.grad(lambda x: losses.stablemax_cross_entropy(x, jnp.asarray(labels)))(jnp.asarray(z, jnp.float32))
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_softmax_collapse_in_float32_not_in_float64_nor_stablemax():
  """z = (40, 0, 0) gives a float32 loss of exactly 0 (the reference fact); at a gap of 20, e^-20 = 2e-9 is
  absorbed by 1 in float32 (half an ulp is 6e-8) but not in float64; StableMax's s(0) = 1 is never absorbed."""
  labels = jnp.array([0, 0])
  assert float(losses.softmax_cross_entropy(jnp.array([[40.0, 0.0, 0.0]]), labels[:1], jnp.float32)) == 0.0
  z = jnp.array([[20.0, 0.0, 0.0], [1.0, 0.5, 0.0]])
  npt.assert_allclose(losses.absorbed_fraction(z, "softmax", jnp.float32), 0.5)
  with jax.enable_x64(True):
    z64 = jnp.asarray(z, jnp.float64)
    npt.assert_allclose(losses.softmax_cross_entropy(z64[:1], labels[:1], jnp.float64), 2 * np.exp(-20.0),
                        rtol=1e-6)
    npt.assert_allclose(losses.absorbed_fraction(z64, "softmax", jnp.float64), 0.0)
  npt.assert_allclose(losses.absorbed_fraction(z, "stablemax", jnp.float32), 0.0)


@pytest.mark.parametrize("call, match", [
    (lambda: losses.softmax_cross_entropy(jnp.zeros((2, 3, 4)), jnp.zeros((2,), jnp.int32)), "logits"),
    (lambda: losses.stablemax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32)), "labels"),
    (lambda: losses.stablemax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2,))), "labels"),
    (lambda: losses.absorbed_fraction(jnp.zeros((2, 3)), "sparsemax"), "normalizer"),
])
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()
