"""Pure-XLA ``spiking_scan`` (the auto default on every backend), on the flat ``(T, B·N)`` layout of
:mod:`._flat`.

* Any reset: a ``lax.scan`` over time whose backward is a second, reversed scan applying the hand-derived
  step VJP (:mod:`._step`), so only the float32 membrane entering each step is kept for the backward
  (autodiff through the scan stores every intermediate of every step).
* ``reset="none"`` on accelerators: the membrane is the linear recurrence ``U_t = β U_{t-1} + I_t`` and runs
  as ``lax.associative_scan`` (O(log T) depth, as spyx's ``PSU_LIF``); its backward is the reversed linear
  recurrence ``c_t = β c_{t+1} + e_t`` of the membrane cotangent, also associative. On a CPU the sequential
  scan's forward+backward was faster at every size measured (1.6-2.2x at >= 4M neuron-steps;
  ``experiments/benchmarks/results/spiking_cpu.md``, ``xla[assoc]``), so ``ASSOCIATIVE_BACKENDS`` leaves it out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.spiking_scan import _flat
from pallas_kernels.spiking_scan._step import backward_step, forward_step

ASSOCIATIVE_BACKENDS = ("gpu", "tpu")  # backends where reset="none" uses the associative scan


def _combine(earlier, later):
  """Composition of two affine maps ``u -> a u + b`` (``earlier`` applied first)."""
  return earlier[0] * later[0], later[0] * earlier[1] + later[1]


def _linear_membranes(beta_M, inputs_TM, start_M, *, reverse=False):
  """``y_t = β y_{t-1} + inputs_t`` from ``y_{-1} = start`` (or the reverse recurrence), all ``t`` at once."""
  b = inputs_TM.at[-1 if reverse else 0].add(beta_M * start_M)
  a = jnp.broadcast_to(beta_M, b.shape)
  return jax.lax.associative_scan(_combine, (a, b), reverse=reverse)[1]


def _sequential_forward(x_TM, beta_M, theta_M, u0_M, *, config):
  def step(u_M, x_M):
    s_M, new_M = forward_step(u_M, x_M.astype(jnp.float32), beta_M, theta_M, config)
    return new_M, (s_M.astype(x_TM.dtype), u_M)

  final_M, (spikes_TM, pre_TM) = jax.lax.scan(step, u0_M, x_TM)
  return spikes_TM, pre_TM, final_M


def _sequential_backward(x_TM, beta_M, theta_M, pre_TM, g_spikes_TM, g_pre_TM, g_final_M, *, config):
  def step(carry, inputs):
    g_u, g_beta, g_theta = carry
    u_prev, x_M, g_s = inputs[:3]
    g_x, g_u_prev, d_beta, d_theta = backward_step(u_prev, x_M.astype(jnp.float32), beta_M, theta_M, g_u,
                                                   g_s.astype(jnp.float32), config)
    if g_pre_TM is not None:
      g_u_prev = g_u_prev + inputs[3]
    return (g_u_prev, g_beta + d_beta, g_theta + d_theta), g_x

  inputs = (pre_TM, x_TM, g_spikes_TM) + (() if g_pre_TM is None else (g_pre_TM,))
  zeros = jnp.zeros_like(beta_M)
  (g_u0, g_beta, g_theta), g_x_TM = jax.lax.scan(step, (g_final_M, zeros, zeros), inputs, reverse=True)
  return g_x_TM, g_beta, g_theta, g_u0


def _associative_forward(x_TM, beta_M, theta_M, u0_M, *, config):
  del config
  membrane_TM = _linear_membranes(beta_M, x_TM.astype(jnp.float32), u0_M)
  spikes_TM = (membrane_TM - theta_M > 0).astype(x_TM.dtype)
  return spikes_TM, jnp.concatenate([u0_M[None], membrane_TM[:-1]]), membrane_TM[-1]


def _associative_backward(x_TM, beta_M, theta_M, pre_TM, g_spikes_TM, g_pre_TM, g_final_M, *, config):
  last_M = beta_M * pre_TM[-1] + x_TM[-1].astype(jnp.float32)
  membrane_TM = jnp.concatenate([pre_TM[1:], last_M[None]])
  d_spike_TM = g_spikes_TM.astype(jnp.float32) * config.surrogate.grad(membrane_TM - theta_M, theta_M)
  g_membrane_TM = jnp.zeros_like(d_spike_TM).at[-1].set(g_final_M)  # cotangent of U_t besides its spike
  if g_pre_TM is not None:
    g_membrane_TM = g_membrane_TM.at[:-1].add(g_pre_TM[1:])
  c_TM = _linear_membranes(beta_M, d_spike_TM + g_membrane_TM, jnp.zeros_like(beta_M), reverse=True)
  g_u0 = beta_M * c_TM[0] + (0.0 if g_pre_TM is None else g_pre_TM[0])
  return c_TM, jnp.sum(c_TM * pre_TM, axis=0), -jnp.sum(d_spike_TM, axis=0), g_u0


def _forward(x_TM, beta_M, theta_M, u0_M, *, config):
  fn = _associative_forward if _associative(config) else _sequential_forward
  return fn(x_TM, beta_M, theta_M, u0_M, config=config)


def _backward(*args, config):
  fn = _associative_backward if _associative(config) else _sequential_backward
  return fn(*args, config=config)


def _associative(config) -> bool:
  return config.reset == "none" and dispatch.current_backend() in ASSOCIATIVE_BACKENDS


_KERNELS = _flat.Kernels("xla", _forward, _backward)


def spiking_scan(current, beta, threshold, initial_membrane, *, config, return_membrane):
  """Canonical ``spiking_scan`` implementation (see ``pallas_kernels.spiking_scan``)."""
  return _flat.spiking_scan(_KERNELS, current, beta, threshold, initial_membrane, config=config,
                            return_membrane=return_membrane)
