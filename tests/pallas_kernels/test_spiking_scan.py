"""``pallas_kernels.spiking_scan``: the ``xla`` implementation against the ``reference`` oracle (outputs,
final membrane, gradients through the surrogate, float32/bfloat16, odd lengths), and argument checks."""

from __future__ import annotations

import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import spiking_scan
from tests.pallas_kernels._spiking_helpers import inputs, outputs_and_grads, rel_err

pytestmark = pytest.mark.usefixtures("fast_compile")

CONFIGS = [  # reset, reset_delay, detach_reset, surrogate, mpr: each reset rule and gradient path once
    ("subtract", True, True, "atan", False),
    ("subtract", False, False, "fast_sigmoid", False),
    ("zero", True, False, "sigmoid", False),
    ("zero", False, True, "triangle", True),
    ("none", True, True, "erf", False),
]


def _assert_matches(implementation, seed, tolerance=2e-6, **options):
  args = inputs(seed)
  (s, m, f), grads = outputs_and_grads(implementation, *args, **options)
  (s_ref, m_ref, f_ref), grads_ref = outputs_and_grads("reference", *args, **options)
  np.testing.assert_array_equal(s, s_ref)
  assert 0.05 < float(jnp.mean(s_ref)) < 0.95  # the case exercises spikes and silences
  np.testing.assert_allclose(m, m_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(f, f_ref, rtol=1e-6, atol=1e-6)
  for name, g, g_ref in zip(("current", "beta", "threshold", "initial_membrane"), grads, grads_ref):
    assert g.shape == g_ref.shape and float(jnp.max(jnp.abs(g_ref))) > 0, name
    assert rel_err(g, g_ref) < tolerance, (name, rel_err(g, g_ref))


@pytest.mark.parametrize("reset,reset_delay,detach_reset,surrogate,mpr", CONFIGS)
def test_xla_matches_reference(reset, reset_delay, detach_reset, surrogate, mpr):
  _assert_matches("xla", 1, reset=reset, reset_delay=reset_delay, detach_reset=detach_reset,
                  surrogate=surrogate, mpr=mpr)


def test_associative_no_reset_path_matches_reference(monkeypatch):
  """The accelerator path for ``reset="none"`` (associative scans both ways), forced on the CPU."""
  monkeypatch.setattr(importlib.import_module("pallas_kernels.spiking_scan.xla"), "ASSOCIATIVE_BACKENDS", ("cpu",))
  _assert_matches("xla", 2, reset="none", surrogate="atan", mpr=True)


@pytest.mark.slow
@pytest.mark.parametrize("reset,reset_delay,detach_reset,mpr", list(itertools.product(
    ("subtract", "zero", "none"), (True, False), (True, False), (True, False))))
@pytest.mark.parametrize("surrogate", ("atan", "sigmoid", "fast_sigmoid", "triangle", "rectangular", "erf",
                                       "straight_through"))
def test_xla_matches_reference_every_option(reset, reset_delay, detach_reset, mpr, surrogate):
  _assert_matches("xla", 3, reset=reset, reset_delay=reset_delay, detach_reset=detach_reset,
                  surrogate=surrogate, mpr=mpr)


def test_bfloat16_current_keeps_a_float32_membrane():
  current, beta, threshold, membrane = inputs(4, dtype=jnp.bfloat16)
  (s, m, f), grads = outputs_and_grads("xla", current, beta, threshold, membrane)
  (s_ref, m_ref, _), grads_ref = outputs_and_grads("reference", current.astype(jnp.float32), beta, threshold,
                                                   membrane)
  assert s.dtype == jnp.bfloat16 and m.dtype == f.dtype == jnp.float32 and grads[0].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(s, np.float32), s_ref)  # bf16 inputs are exact in float32
  np.testing.assert_allclose(m, m_ref, atol=1e-6)
  # The spikes' cotangent arrives in bfloat16 (the dtype of the spikes): gradients agree to its precision.
  assert rel_err(grads[0], grads_ref[0]) < 1e-2 and rel_err(grads[1], grads_ref[1]) < 1e-2


def test_single_step_scalar_parameters_and_defaults():
  current = jnp.array([[[0.5, 1.5, 2.5]]])
  spikes, final = spiking_scan(current, beta=0.9, return_final_membrane=True)
  np.testing.assert_array_equal(spikes, [[[0.0, 1.0, 1.0]]])  # threshold 1, strict: 1.5 > 1
  np.testing.assert_allclose(final, [[0.5, 1.5, 2.5]])  # reset_delay: the reset comes in the next step
  spikes, final = spiking_scan(current, beta=0.9, reset_delay=False, return_final_membrane=True)
  np.testing.assert_allclose(final, [[0.5, 0.5, 1.5]])


def test_traced_parameters_are_accepted_under_jit():
  current, beta, threshold, _ = inputs(5)
  run = jax.jit(lambda c, b, t: spiking_scan(c, beta=b, threshold=t))
  np.testing.assert_array_equal(run(current, beta, threshold),
                                spiking_scan(current, beta=beta, threshold=threshold, implementation="reference"))


@pytest.mark.parametrize("kwargs,match", [
    ({"surrogate": "gaussian"}, "surrogate: got 'gaussian'; allowed: 'atan'"),
    ({"beta": 1.2}, r"beta: got 1.2; allowed: values in \[0, 1\]"),
    ({"beta": jnp.array([0.5, -0.1, 0.5])}, r"beta: got -0.1"),
    ({"beta": jnp.ones((2,))}, r"beta: got shape \(2,\)"),
    ({"threshold": 0.0}, "threshold: got 0.0; allowed: positive"),
    ({"threshold": jnp.array([1.0, -1.0, 1.0])}, "threshold: got -1.0"),
    ({"reset": "soft"}, "reset: got 'soft'; allowed: 'subtract', 'zero', 'none'"),
    ({"surrogate_scale": 0.0}, "surrogate_scale: got 0.0"),
    ({"reset_delay": 1}, "reset_delay: got 1"),
    ({"initial_membrane": jnp.zeros((1, 2))}, r"initial_membrane: expected shape \(1, 3\)"),
    ({"implementation": "cuda"}, "implementation for spiking_scan: got 'cuda'"),
])
def test_bad_arguments_raise_value_errors(kwargs, match):
  kwargs = {"beta": 0.9, **kwargs}
  with pytest.raises(ValueError, match=match):
    spiking_scan(jnp.ones((1, 4, 3)), **kwargs)


def test_current_must_be_a_floating_rank_3_array():
  with pytest.raises(ValueError, match="current: expected shape"):
    spiking_scan(jnp.ones((4, 3)), beta=0.9)
  with pytest.raises(ValueError, match="current: expected a floating dtype"):
    spiking_scan(jnp.ones((1, 4, 3), jnp.int32), beta=0.9)
