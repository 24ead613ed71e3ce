"""Surrogate spike functions: a strict Heaviside forward, and a backward equal to each surrogate's closed form
(snnTorch / SpikingJelly code, not their docstrings) at several points; MPR leaves spikes unchanged."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_jax.layers.spiking import surrogates
from pallas_kernels.spiking_scan.surrogates import mpr, mpr_derivative

POINTS = np.array([-1.3, -0.7, -0.2, -0.05, 0.0, 0.02, 0.1, 0.3, 0.45, 1.2], np.float32)


def _sig(z):
  return 1.0 / (1.0 + np.exp(-z))


CLOSED_FORMS = {  # name -> (scale, dS/dx as a numpy function)
    "atan": (2.0, lambda x, a: (a / 2) / (1 + (math.pi / 2 * a * x) ** 2)),
    "sigmoid": (25.0, lambda x, k: k * _sig(k * x) * (1 - _sig(k * x))),
    "fast_sigmoid": (25.0, lambda x, k: 1 / (k * np.abs(x) + 1) ** 2),
    "triangle": (1.0, lambda x, a: np.maximum(0, a - a * a * np.abs(x))),
    "rectangular": (1.0, lambda x, a: a * (np.abs(x) < 0.5 / a)),
    "erf": (2.0, lambda x, a: a / math.sqrt(math.pi) * np.exp(-(a * x) ** 2)),
    "straight_through": (1.0, lambda x, s: np.full_like(x, s)),
}


@pytest.mark.parametrize("name", CLOSED_FORMS)
def test_heaviside_forward_and_closed_form_backward(name):
  default, closed = CLOSED_FORMS[name]
  fn = getattr(surrogates, name)
  for scale in (default, 3.0 * default):
    values, grads = jax.vmap(jax.value_and_grad(lambda x: fn(x, scale)))(jnp.asarray(POINTS))
    np.testing.assert_array_equal(values, (POINTS > 0).astype(np.float32))  # H(0) = 0: strict
    np.testing.assert_allclose(grads, closed(POINTS.astype(np.float64), scale), rtol=1e-5, atol=1e-7)


def test_reference_values_and_aliases():
  grad = lambda fn, x: float(jax.grad(fn)(jnp.float32(x)))
  assert grad(surrogates.atan, 0.0) == pytest.approx(1.0)  # snnTorch atan(2): peak 1
  assert grad(surrogates.atan, 0.1) == pytest.approx(0.91017, abs=1e-5)
  assert grad(surrogates.fast_sigmoid, 0.1) == pytest.approx(1 / 3.5 ** 2)  # 0.0816
  assert grad(surrogates.sigmoid, 0.0) == pytest.approx(6.25)
  assert surrogates.superspike is surrogates.fast_sigmoid
  big = jax.vmap(jax.grad(surrogates.sigmoid))(jnp.array([-1e3, 1e3]))
  assert np.all(np.isfinite(big)) and np.all(np.asarray(big) >= 0)  # stable form: no overflow
  # spyx's arctan(k) is snnTorch's atan(2k) / (π k): peak 1/π at k = 2.
  assert grad(lambda x: surrogates.atan(x, 4.0), 0.3) / (2 * math.pi) == pytest.approx(
      1 / (math.pi * (1 + (2 * math.pi * 0.3) ** 2)), rel=1e-5)


def test_spike_fn_by_name_and_bad_names():
  fn = surrogates.spike_fn("erf", 3.0)
  np.testing.assert_allclose(jax.grad(fn)(jnp.float32(0.2)), jax.grad(lambda x: surrogates.erf(x, 3.0))(0.2))
  with pytest.raises(ValueError, match="surrogate: got 'gauss'; allowed: 'atan'"):
    surrogates.spike_fn("gauss")
  with pytest.raises(ValueError, match="surrogate_scale: got -1"):
    surrogates.spike_fn("atan", -1)


def test_mpr_rectifier_keeps_spikes_and_reshapes_the_gradient():
  u = jnp.linspace(-2.0, 3.0, 501)
  phi = np.asarray(mpr(u))
  assert np.all(np.diff(phi) > 0)  # monotone
  np.testing.assert_allclose(mpr(jnp.array([0.0, 0.5, 1.0])), [0.0, 0.5, 1.0], atol=1e-6)
  smooth = (np.abs(u) > 0.02) & (np.abs(u - 1.0) > 0.02)  # φ' jumps where the branches meet
  np.testing.assert_allclose(mpr_derivative(u)[smooth][1:-1], np.gradient(phi, u)[smooth][1:-1], rtol=2e-2,
                             atol=2e-3)
  threshold = 0.5  # the paper's V_th: u = U, g(x) = φ(U) - 1/2
  fn = surrogates.spike_fn("atan", None, mpr=True)
  x = jnp.asarray(POINTS)
  values, grads = jax.vmap(jax.value_and_grad(lambda v: fn(v, threshold)))(x)
  np.testing.assert_array_equal(values, (POINTS > 0).astype(np.float32))
  membrane = POINTS + threshold
  expected = CLOSED_FORMS["atan"][1](np.asarray(mpr(membrane), np.float64) - 0.5, 2.0) * mpr_derivative(membrane)
  np.testing.assert_allclose(grads, expected, rtol=1e-5)
