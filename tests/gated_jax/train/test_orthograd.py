"""Tests for gated_jax.train.orthograd (⊥Grad, arXiv 2501.04697) against the numpy projection."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy import testing as npt

from gated_jax.train.orthograd import orthogonalize_gradients, orthograd

RNG = np.random.default_rng(0)
PARAMS = {"w": RNG.normal(size=(3, 4)).astype(np.float32), "b": RNG.normal(size=(5,)).astype(np.float32)}
GRADS = {"w": RNG.normal(size=(3, 4)).astype(np.float32), "b": RNG.normal(size=(5,)).astype(np.float32)}


def _numpy_orthograd(g, w, rescale=True):
  g, w = np.ravel(g).astype(np.float64), np.ravel(w).astype(np.float64)
  g_orth = g - (w @ g) / (w @ w) * w
  return g_orth * np.linalg.norm(g) / np.linalg.norm(g_orth) if rescale else g_orth


@pytest.mark.parametrize("rescale", [True, False])
def test_matches_numpy_projection_per_tensor(rescale):
  tx = orthogonalize_gradients(rescale=rescale)
  updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  for name in PARAMS:
    expected = _numpy_orthograd(GRADS[name], PARAMS[name], rescale)
    npt.assert_allclose(np.ravel(updates[name]), expected, rtol=1e-5, atol=1e-6)
    assert abs(float(jnp.vdot(updates[name], PARAMS[name]))) < 1e-4  # orthogonal to its own tensor


def test_removes_the_logit_scaling_direction_and_keeps_zero_weights_unchanged():
  """A gradient along w (naive loss minimisation: scaling the weights) is removed entirely (rescale off);
  a zero weight tensor (w·w = 0) passes its gradient through."""
  w = jnp.asarray(PARAMS["w"])
  updates, _ = orthogonalize_gradients(rescale=False).update({"w": 3.0 * w}, optax.EmptyState(), {"w": w})
  npt.assert_allclose(updates["w"], np.zeros((3, 4)), atol=1e-5)
  zero = {"w": jnp.zeros((3, 4))}
  updates, _ = orthogonalize_gradients().update({"w": jnp.asarray(GRADS["w"])}, optax.EmptyState(), zero)
  npt.assert_allclose(updates["w"], GRADS["w"], rtol=1e-6)


def test_orthograd_sgd_step_is_minus_lr_times_projection():
  tx = orthograd(optax.sgd(0.5))
  updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  npt.assert_allclose(np.ravel(updates["b"]), -0.5 * _numpy_orthograd(GRADS["b"], PARAMS["b"]), rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [(dict(eps=-1.0), "eps: got -1.0"), (dict(eps=float("nan")), "eps"),
                                           (dict(rescale=1), "rescale: got 1")])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    orthogonalize_gradients(**kwargs)


def test_update_without_params_raises():
  tx = orthogonalize_gradients()
  with pytest.raises(ValueError, match="params: got None"):
    tx.update(GRADS, tx.init(PARAMS))
