"""``spiking_scan`` against other libraries' LIF semantics, transcribed here in numpy / JAX (no torch, spyx):

* snnTorch ``Leaky.forward`` (``snntorch/_neurons/leaky.py`` and ``neurons.py``: ``mem_reset``, ``fire``,
  ``_base_sub`` / ``_base_zero`` / ``_base_int`` and the ``reset_delay=False`` branch): identical spikes and
  membranes for every reset mechanism x ``reset_delay`` x β, including β = 1.2, which snnTorch clamps to 1;
* spyx ``LIF`` (``spyx/nn.py``: the spike is taken from the *previous* membrane, then ``V = βV + x - sθ`` with
  the gradient through the reset): identical membranes and gradients with ``reset_delay=True,
  detach_reset=False``, and spikes one step earlier than spyx's — the one-step offset.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import spiking_scan
from pallas_kernels.spiking_scan.surrogates import Surrogate, spike

pytestmark = pytest.mark.usefixtures("fast_compile")

_SEQ, _NEURONS = 50, 6


def snntorch_leaky(inputs_TN, beta, threshold, reset_mechanism, reset_delay):
  """snnTorch ``Leaky`` stepped over time from ``mem = 0`` (graded_spikes_factor 1), in float32 numpy."""
  f32 = np.float32
  beta, threshold = f32(np.clip(beta, 0, 1)), f32(threshold)
  mem = np.zeros(inputs_TN.shape[1], f32)
  spikes, mems = [], []
  for input_ in inputs_TN.astype(f32):
    reset = (mem - threshold > 0).astype(f32)  # mem_reset(): Heaviside of the stored membrane, detached
    if reset_mechanism == "subtract":  # _base_sub
      mem = beta * mem + input_ - reset * threshold
    elif reset_mechanism == "zero":  # _base_zero: zero the old membrane, then decay and add the input
      mem = (1 - reset) * mem
      mem = beta * mem + input_
    else:  # _base_int
      mem = beta * mem + input_
    spk = (mem - threshold > 0).astype(f32)  # fire()
    if not reset_delay:
      do_reset = spk - reset  # "avoid double reset"
      if reset_mechanism == "subtract":
        mem = mem - do_reset * threshold
      elif reset_mechanism == "zero":
        mem = mem - do_reset * mem
    spikes.append(spk)
    mems.append(mem)
  return np.stack(spikes), np.stack(mems)


def _currents(seed):
  """Currents that make neurons fire, stay silent, and sometimes jump far over threshold."""
  rng = np.random.default_rng(seed)
  current = 0.7 * rng.standard_normal((_SEQ, _NEURONS)) + 0.35
  return np.where(rng.uniform(size=current.shape) < 0.08, 2.8, current).astype(np.float32)


@functools.cache
def _ours(reset, reset_delay):
  """The op jitted with β traced (so β = 1.2 reaches the op and is clamped, as in snnTorch)."""
  def run(current_TN, beta):
    spikes, membrane = spiking_scan(current_TN[None], beta=beta, threshold=1.0, reset=reset,
                                    reset_delay=reset_delay, return_membrane=True)
    return spikes[0], membrane[0]
  return jax.jit(run)


@pytest.mark.parametrize("reset,reset_delay", list(itertools.product(("subtract", "zero", "none"), (True, False))))
def test_matches_snntorch_leaky(reset, reset_delay):
  current = _currents(0)
  for beta in (0.5, 0.9, 1.2):
    want_spikes, want_mem = snntorch_leaky(current, beta, 1.0, reset, reset_delay)
    spikes, membrane = _ours(reset, reset_delay)(jnp.asarray(current), jnp.float32(beta))
    assert 0.0 < want_spikes.mean() < 1.0, beta  # spikes and silences
    np.testing.assert_array_equal(spikes, want_spikes, err_msg=f"beta={beta}")
    np.testing.assert_allclose(membrane, want_mem, rtol=1e-6, atol=1e-6, err_msg=f"beta={beta}")


def test_the_double_reset_correction_is_exercised():
  """With reset_delay=False a membrane still over threshold after its reset sets r_t = 1 next step (snnTorch's
  "avoid double reset"); the inputs above produce such steps, so the test above covers that branch."""
  _, mem = snntorch_leaky(_currents(0), 0.9, 1.0, "subtract", False)
  assert np.any(mem > 1.0)


def spyx_lif(current_TN, beta, threshold, surrogate):
  """spyx ``LIF.__call__`` stepped over time in JAX: ``s = spike(V - θ)`` from the old membrane, then
  ``V = βV + x - sθ`` (gradient through s). Returns spikes for steps 0..T (one more than inputs) and the
  membranes."""
  def step(v, x):
    s = spike(surrogate, v - threshold, jnp.full_like(v, threshold))
    v = beta * v + x - s * threshold
    return v, (s, v)
  final, (spikes, membranes) = jax.lax.scan(step, jnp.zeros(current_TN.shape[1]), current_TN)
  last = spike(surrogate, final - threshold, jnp.full_like(final, threshold))
  return jnp.concatenate([spikes, last[None]]), membranes


def test_spyx_membranes_match_and_spikes_are_one_step_later():
  current = jnp.asarray(_currents(1))
  surrogate = Surrogate("atan", 2.0)
  rng = np.random.default_rng(2)
  w_spike, w_mem = (jnp.asarray(rng.standard_normal(current.shape), jnp.float32) for _ in range(2))

  def ours(c, beta):
    s, m = spiking_scan(c[None], beta=beta, reset_delay=True, detach_reset=False, surrogate=surrogate,
                        return_membrane=True)
    return jnp.sum(s[0] * w_spike) + jnp.sum(m[0] * w_mem), (s[0], m[0])

  def theirs(c, beta):
    s, m = spyx_lif(c, beta, 1.0, surrogate)
    return jnp.sum(s[1:] * w_spike) + jnp.sum(m * w_mem), (s, m)

  beta = jnp.float32(0.8)
  (_, (s, m)), grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(current, beta)
  (_, (s_spyx, m_spyx)), grads_spyx = jax.jit(jax.value_and_grad(theirs, argnums=(0, 1), has_aux=True))(current,
                                                                                                      beta)
  np.testing.assert_allclose(m, m_spyx, rtol=1e-6, atol=1e-6)
  assert not np.any(s_spyx[0])  # spyx's first spike reads the initial membrane
  np.testing.assert_array_equal(s_spyx[1:], s)  # spyx_spikes[t + 1] == our_spikes[t]
  assert not np.array_equal(s_spyx[:-1], s)  # ...so without the shift they differ
  for g, g_spyx in zip(grads, grads_spyx):
    np.testing.assert_allclose(g, g_spyx, rtol=1e-5, atol=1e-6)
