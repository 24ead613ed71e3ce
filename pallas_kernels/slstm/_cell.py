"""The sLSTM cell's pointwise step and its block-diagonal recurrent product, shared by the implementations
(the recurrence is in :mod:`pallas_kernels.slstm`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.slstm import SLSTMState


def recurrent(h_BHD: jax.Array, r_HDGD: jax.Array) -> jax.Array:
  """``(B, H, 4, D)``: each head's hidden state through its own ``D x 4D`` block of ``R``."""
  return jnp.einsum("bhd,hdge->bhge", h_BHD, r_HDGD, precision=jax.lax.Precision.HIGHEST)


def restart(state: SLSTMState, reset_B: jax.Array) -> SLSTMState:
  """``state`` with the rows where ``reset_B`` is True replaced by the empty state."""
  empty = SLSTMState.empty(*state.h.shape)
  keep = reset_B[:, None, None]
  return SLSTMState(*(jnp.where(keep, e, s) for e, s in zip(empty, state)))


def log_forget(f_pre: jax.Array, forget_gate: str) -> jax.Array:
  return jax.nn.log_sigmoid(f_pre) if forget_gate == "sigmoid" else f_pre


def gates(pre_BHGD: jax.Array, prev: SLSTMState, forget_gate: str):
  """``(z, o, log_f, i', f', m)`` of one step from the full pre-activations (the stabiliser without gradient)."""
  z_pre, i_pre, f_pre, o_pre = (pre_BHGD[:, :, g] for g in range(4))
  log_f = log_forget(f_pre, forget_gate)
  m = jax.lax.stop_gradient(jnp.maximum(log_f + prev.m, i_pre))
  return jnp.tanh(z_pre), jax.nn.sigmoid(o_pre), log_f, jnp.exp(i_pre - m), jnp.exp(log_f + prev.m - m), m


def step(pre_BHGD: jax.Array, prev: SLSTMState, forget_gate: str) -> SLSTMState:
  """One stabilised sLSTM update (``pallas_kernels.slstm`` docstring)."""
  z, o, _, i_gate, f_gate, m = gates(pre_BHGD, prev, forget_gate)
  c = f_gate * prev.c + i_gate * z
  n = f_gate * prev.n + i_gate
  return SLSTMState(o * c / n, c, n, m)
