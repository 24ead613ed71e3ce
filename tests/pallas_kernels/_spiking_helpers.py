"""Inputs and a forward+gradient runner shared by the ``spiking_scan`` tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import spiking_scan


def inputs(seed, batch=2, seq=13, neurons=5, dtype=jnp.float32):
  """Currents around the threshold (with some large ones, to leave membranes over threshold after a reset),
  per-neuron β and θ, an initial membrane (numpy-generated: no compilation)."""
  rng = np.random.default_rng(seed)
  current = 0.8 * rng.standard_normal((batch, seq, neurons)) + 0.3
  current = np.where(rng.uniform(size=current.shape) < 0.1, 3.0, current)
  beta, threshold = rng.uniform(0.3, 1.0, neurons), rng.uniform(0.5, 1.5, neurons)
  membrane = 2.0 * rng.standard_normal((batch, neurons))
  return (jnp.asarray(current, dtype),) + tuple(jnp.asarray(a, jnp.float32) for a in (beta, threshold, membrane))


def outputs_and_grads(implementation, current, beta, threshold, membrane, **options):
  """``(spikes, membrane trace, final membrane)`` and the gradients of a loss that weighs all three with
  fixed random weights, w.r.t. current, β, θ and the initial membrane."""
  rng = np.random.default_rng(0)
  weights = [jnp.asarray(rng.standard_normal(current.shape), jnp.float32) for _ in range(2)]

  def loss(c, b, t, u):
    s, m, f = spiking_scan(c, beta=b, threshold=t, initial_membrane=u, return_membrane=True,
                           return_final_membrane=True, implementation=implementation, **options)
    value = jnp.sum(s.astype(jnp.float32) * weights[0]) + 0.1 * jnp.sum(m * weights[1]) + jnp.sum(f * f)
    return value, (s, m, f)

  run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
  (_, outs), grads = run(current, beta, threshold, membrane)
  return outs, grads


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / (np.max(np.abs(ref)) + 1e-12))
