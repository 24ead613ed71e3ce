"""The fast pure-XLA sLSTM: a time-major, unrolled forward scan under a ``custom_vjp`` whose backward is a
hand-derived reverse scan.

JAX's own derivative of the reference scan saves every intermediate of every step and accumulates the
``R`` gradient inside the loop, one small ``(B, D) x (B, 4D)`` product per step. Here the forward saves the
states ``(h, c, n, m)`` and the pre-activations of each step; the backward recomputes the gates from them (no
recurrent product) and carries ``(dh, dc, dn)`` back in time, one ``R dpre`` product per step:

    dh  = dh_out_t + R dpre_{t+1}                 (the recurrent path)
    do~ = dh (c/n) o (1 - o)
    dc += dh o / n,    dn -= dh o c / n^2
    dz~ = dc i' (1 - z^2),   di~ = (dc z + dn) i',   dlog f = (dc c_{t-1} + dn n_{t-1}) f'
    df~ = dlog f sigmoid(-f~)  ("sigmoid" gate; ``dlog f`` for "exp")
    dc_{t-1} = dc f',   dn_{t-1} = dn f'

(the stabiliser ``m_t`` carries no gradient: ``h`` does not depend on it; only the initial state's ``m``, which
scales its ``c`` and ``n``, gets ``dm_0 = dlog f`` of the first step). ``dR = sum_t h_{t-1}^T dpre_t`` is then one
contraction over all steps, and the input gradient is ``dpre`` itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.slstm import SLSTMState, _cell

UNROLL = 4  # time steps per loop iteration (experiments/benchmarks/slstm.py)


def slstm(x_BTHGD, r_HDGD, initial_state: SLSTMState, resets_BT, *, forget_gate: str):
  """Same contract as :func:`pallas_kernels.slstm.reference.slstm`."""
  batch, seq = x_BTHGD.shape[:2]
  if resets_BT is None:
    resets_BT = jnp.zeros((batch, seq), bool)
  h_TBHD, final = _scan(jnp.swapaxes(x_BTHGD, 0, 1), r_HDGD, initial_state, jnp.swapaxes(resets_BT, 0, 1),
                        forget_gate)
  return jnp.swapaxes(h_TBHD, 0, 1), final


def _forward(x_TBHGD, r_HDGD, initial_state, resets_TB, forget_gate: str, keep_states: bool):
  def body(state, inputs):
    x_BHGD, reset_B = inputs
    prev = _cell.restart(state, reset_B)
    pre = x_BHGD + _cell.recurrent(prev.h, r_HDGD)
    new = _cell.step(pre, prev, forget_gate)
    return new, ((new, pre) if keep_states else new.h)

  return jax.lax.scan(body, initial_state, (x_TBHGD, resets_TB), unroll=min(UNROLL, x_TBHGD.shape[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _scan(x_TBHGD, r_HDGD, initial_state, resets_TB, forget_gate):
  final, h_TBHD = _forward(x_TBHGD, r_HDGD, initial_state, resets_TB, forget_gate, keep_states=False)
  return h_TBHD, final


def _scan_fwd(x_TBHGD, r_HDGD, initial_state, resets_TB, forget_gate):
  final, (states, pre) = _forward(x_TBHGD, r_HDGD, initial_state, resets_TB, forget_gate, keep_states=True)
  return (states.h, final), (pre, r_HDGD, initial_state, resets_TB, states)


def _scan_bwd(forget_gate, residuals, cotangents):
  pre_TBHGD, r_HDGD, initial_state, resets_TB, states = residuals
  dh_TBHD, d_final = cotangents
  # The state each step started from: the previous step's (the initial state first), restarted where flagged.
  before = SLSTMState(*(jnp.concatenate([s0[None], s[:-1]]) for s0, s in zip(initial_state, states)))
  prev = jax.vmap(_cell.restart)(before, resets_TB)

  def body(carry, inputs):
    dh_next, dc, dn, _ = carry
    pre, prev_t, c, n, m, dh_out, reset_B = inputs
    f_pre = pre[:, :, 2]
    z, o = jnp.tanh(pre[:, :, 0]), jax.nn.sigmoid(pre[:, :, 3])
    log_f = _cell.log_forget(f_pre, forget_gate)
    i_gate, f_gate = jnp.exp(pre[:, :, 1] - m), jnp.exp(log_f + prev_t.m - m)
    dh = dh_out + dh_next
    ratio = c / n
    do_pre = dh * ratio * o * (1.0 - o)
    dc = dc + dh * o / n
    dn = dn - dh * o * ratio / n
    dz_pre = dc * i_gate * (1.0 - z * z)
    di_pre = (dc * z + dn) * i_gate
    dlog_f = (dc * prev_t.c + dn * prev_t.n) * f_gate
    df_pre = dlog_f * jax.nn.sigmoid(-f_pre) if forget_gate == "sigmoid" else dlog_f
    dpre = jnp.stack([dz_pre, di_pre, df_pre, do_pre], axis=2)
    keep = ~reset_B[:, None, None]
    dh_prev = jnp.einsum("bhge,hdge->bhd", dpre, r_HDGD, precision=jax.lax.Precision.HIGHEST)
    return (dh_prev * keep, dc * f_gate * keep, dn * f_gate * keep, dlog_f * keep), dpre

  carry = (d_final.h, d_final.c, d_final.n, jnp.zeros_like(d_final.m))
  inputs = (pre_TBHGD, prev, states.c, states.n, states.m, dh_TBHD, resets_TB)
  d_initial, dpre_TBHGD = jax.lax.scan(body, carry, inputs, reverse=True,
                                             unroll=min(UNROLL, pre_TBHGD.shape[0]))
  dr = jnp.einsum("tbhd,tbhge->hdge", prev.h, dpre_TBHGD, precision=jax.lax.Precision.HIGHEST)
  return dpre_TBHGD, dr, SLSTMState(*d_initial), None


_scan.defvjp(_scan_fwd, _scan_bwd)
