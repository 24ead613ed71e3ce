"""Step-by-step ``lax.scan`` of the LIF recurrence, differentiated by autodiff through the surrogate spike
function: the oracle every other implementation is tested against (its backward is not the hand-derived one
of ``_step``). Arguments arrive validated and canonical (see ``__init__``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.spiking_scan.surrogates import spike


def spiking_scan(current, beta, threshold, initial_membrane, *, config, return_membrane):
  """Shapes and returns as in :mod:`pallas_kernels.spiking_scan` (``(spikes, membrane | None, final)``)."""
  sur = config.surrogate
  beta_N, theta_N = beta.astype(jnp.float32), threshold.astype(jnp.float32)
  theta_BN = jnp.broadcast_to(theta_N, initial_membrane.shape)

  def step(u_BN, i_BN):
    r = spike(sur, u_BN - theta_N, theta_BN)
    if config.detach_reset or config.immediate:
      r = jax.lax.stop_gradient(r)
    if config.reset == "subtract":
      v = beta_N * u_BN + i_BN - r * theta_N
    elif config.reset == "zero":
      v = beta_N * ((1.0 - r) * u_BN) + i_BN
    else:
      v = beta_N * u_BN + i_BN
    s = spike(sur, v - theta_N, theta_BN)
    u_BN = v
    if config.immediate:
      s_reset = jax.lax.stop_gradient(s) if config.detach_reset else s
      u_BN = v - (s_reset - r) * theta_N if config.reset == "subtract" else v * (1.0 - s_reset + r)
    return u_BN, (s, u_BN)

  current_TBN = jnp.moveaxis(current.astype(jnp.float32), 1, 0)
  final_BN, (spikes_TBN, membrane_TBN) = jax.lax.scan(step, initial_membrane.astype(jnp.float32), current_TBN)
  spikes = jnp.moveaxis(spikes_TBN, 0, 1).astype(current.dtype)
  return spikes, jnp.moveaxis(membrane_TBN, 0, 1) if return_membrane else None, final_BN
