"""Token-by-token ``lax.scan`` recurrences in float32: the oracle every other implementation is tested
against. Arguments arrive validated and canonical (k/v already have H heads; see ``__init__``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def linear_attention(q, k, v, log_decay, *, scale, initial_state, return_final_state, segment_ids,
                     chunk_size):
  """S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T;  o_t = scale * S_t^T q_t.  Shapes as in ``__init__``."""
  del return_final_state, chunk_size

  def step(state_BHKV, inputs):
    q_BHK, k_BHK, v_BHV, decay_BHK, reset_B = inputs
    state_BHKV = jnp.where(reset_B[:, None, None, None], 0.0, state_BHKV)
    state_BHKV = decay_BHK[..., None] * state_BHKV + k_BHK[..., None] * v_BHV[..., None, :]
    o_BHV = jnp.einsum("bhk,bhkv->bhv", q_BHK * scale, state_BHKV)
    return state_BHKV, o_BHV

  return _scan(step, q, k, v, _decay_factor(log_decay, k.shape), initial_state, segment_ids)


def delta_rule(q, k, v, beta, log_decay, *, scale, initial_state, return_final_state, segment_ids,
               chunk_size):
  """S_t = exp(g_t)(I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T;  o_t = scale * S_t^T q_t."""
  del return_final_state, chunk_size
  batch, seq, heads, key_dim = k.shape
  decay_BTHK = _decay_factor(log_decay, (batch, seq, heads, 1))
  beta_BTHK = beta.astype(jnp.float32)[..., None]

  def step(state_BHKV, inputs):
    q_BHK, k_BHK, v_BHV, decay_BH1, beta_BH1, reset_B = inputs
    state_BHKV = jnp.where(reset_B[:, None, None, None], 0.0, state_BHKV) * decay_BH1[..., None]
    predicted_BHV = jnp.einsum("bhk,bhkv->bhv", k_BHK, state_BHKV)
    delta_BHV = beta_BH1 * (v_BHV - predicted_BHV)
    state_BHKV = state_BHKV + k_BHK[..., None] * delta_BHV[..., None, :]
    o_BHV = jnp.einsum("bhk,bhkv->bhv", q_BHK * scale, state_BHKV)
    return state_BHKV, o_BHV

  return _scan(step, q, k, v, (decay_BTHK, beta_BTHK), initial_state, segment_ids)


def _decay_factor(log_decay, shape_BTHK):
  """exp(log_decay) broadcast to ``(B, T, H, K)``-compatible shape (ones when there is no decay)."""
  if log_decay is None:
    return jnp.ones(shape_BTHK[:3] + (1,), jnp.float32)
  decay = jnp.exp(log_decay.astype(jnp.float32))
  return decay if decay.ndim == 4 else decay[..., None]


def _scan(step, q, k, v, extras, initial_state, segment_ids):
  batch, seq, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  extras = extras if isinstance(extras, tuple) else (extras,)
  if segment_ids is None:
    reset_BT = jnp.zeros((batch, seq), bool)
  else:
    reset_BT = jnp.concatenate([jnp.zeros((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  state = (jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))
  time_major = lambda x: jnp.moveaxis(x.astype(jnp.float32) if x.dtype != bool else x, 1, 0)
  inputs = tuple(time_major(x) for x in (q, k, v, *extras, reset_BT))
  final_state, o_TBHV = jax.lax.scan(step, state, inputs)
  return jnp.moveaxis(o_TBHV, 0, 1).astype(q.dtype), final_state
