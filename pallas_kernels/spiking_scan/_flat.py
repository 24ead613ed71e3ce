"""Layout and ``jax.custom_vjp`` shared by the fast implementations (``xla`` and the Pallas kernels).

Neurons are independent, so the canonical ``(B, T, N)`` problem is flattened to time-major ``(T, M)`` with
``M = B·N`` neurons (``β`` and ``θ`` broadcast to ``(M,)``; their gradients are summed back over the batch by
autodiff of that broadcast). A backend supplies two functions on this layout:

* ``forward(x_TM, beta_M, theta_M, u0_M, *, config) -> (spikes_TM, pre_TM, final_M)``: spikes in ``x``'s dtype,
  ``pre_TM[t]`` the float32 membrane *entering* step ``t`` (the only residual the backward needs), the final
  membrane;
* ``backward(x_TM, beta_M, theta_M, pre_TM, g_spikes_TM, g_pre_TM | None, g_final_M, *, config) ->
  (g_x_TM, g_beta_M, g_theta_M, g_u0_M)``: the backward through time, applying the surrogate.

The membrane returned to callers (after each step) is ``pre`` shifted by one step plus the final membrane.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Kernels:
  """One implementation's forward and backward on the flat layout (module docstring)."""
  name: str
  forward: Callable
  backward: Callable


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan(kernels: Kernels, config, with_membrane: bool, x_TM, beta_M, theta_M, u0_M):
  spikes, pre, final = kernels.forward(x_TM, beta_M, theta_M, u0_M, config=config)
  return (spikes, pre, final) if with_membrane else (spikes, final)


def _scan_fwd(kernels, config, with_membrane, x_TM, beta_M, theta_M, u0_M):
  spikes, pre, final = kernels.forward(x_TM, beta_M, theta_M, u0_M, config=config)
  outputs = (spikes, pre, final) if with_membrane else (spikes, final)
  return outputs, (x_TM, beta_M, theta_M, pre)


def _scan_bwd(kernels, config, with_membrane, residuals, cotangents):
  x_TM, beta_M, theta_M, pre = residuals
  g_spikes, g_pre, g_final = cotangents if with_membrane else (cotangents[0], None, cotangents[1])
  g_x, g_beta, g_theta, g_u0 = kernels.backward(
      x_TM, beta_M, theta_M, pre, g_spikes, None if g_pre is None else g_pre.astype(jnp.float32),
      g_final.astype(jnp.float32), config=config)
  return g_x.astype(x_TM.dtype), g_beta, g_theta, g_u0


_scan.defvjp(_scan_fwd, _scan_bwd)


def spiking_scan(kernels: Kernels, current, beta, threshold, initial_membrane, *, config, return_membrane):
  """Canonical arguments (see ``pallas_kernels.spiking_scan``) -> ``(spikes, membrane | None, final)``."""
  batch, seq, neurons = current.shape
  flat = lambda a: jnp.broadcast_to(a, (batch, neurons)).reshape(batch * neurons)
  x_TM = jnp.swapaxes(current, 0, 1).reshape(seq, batch * neurons)
  outputs = _scan(kernels, config, return_membrane, x_TM, flat(beta), flat(threshold), flat(initial_membrane))
  unflat = lambda a_TM: jnp.swapaxes(a_TM.reshape(seq, batch, neurons), 0, 1)
  spikes = unflat(outputs[0])
  final = outputs[-1].reshape(batch, neurons)
  if not return_membrane:
    return spikes, None, final
  membrane_TM = jnp.concatenate([outputs[1][1:], outputs[-1][None]], axis=0)
  return spikes, unflat(membrane_TM), final
