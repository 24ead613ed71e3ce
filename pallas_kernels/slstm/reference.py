"""The sLSTM oracle: a ``lax.scan`` over time of the stabilised step, differentiated by JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.slstm import SLSTMState, _cell


def slstm(x_BTHGD, r_HDGD, initial_state: SLSTMState, resets_BT, *, forget_gate: str):
  """``(h (B, T, H, D) float32, final state)`` from the input pre-activations ``x`` (gates z, i, f, o on axis
  3), the recurrent kernel, the initial state and the optional ``(B, T)`` restart flags."""
  batch, seq = x_BTHGD.shape[:2]
  if resets_BT is None:
    resets_BT = jnp.zeros((batch, seq), bool)

  def body(state, inputs):
    x_BHGD, reset_B = inputs
    prev = _cell.restart(state, reset_B)
    new = _cell.step(x_BHGD + _cell.recurrent(prev.h, r_HDGD), prev, forget_gate)
    return new, new.h

  final, h_TBHD = jax.lax.scan(body, initial_state, (jnp.swapaxes(x_BTHGD, 0, 1), jnp.swapaxes(resets_BT, 0, 1)))
  return jnp.swapaxes(h_TBHD, 0, 1), final
