"""Token-by-token recurrences in float32: the oracle every other implementation is tested against.

The step functions are the step ops' ``reference`` implementation and the body of the ``lax.scan`` of the
sequence ops. Arguments arrive validated (see ``__init__``); k, v (and beta) with fewer heads than q are
repeated to the query heads here, the one place that copies them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _per_query_head(x, heads: int, axis: int):
  """Repeats a key/value-head array to ``heads`` along ``axis`` (GQA), as float32."""
  x = x.astype(jnp.float32)
  return x if x.shape[axis] == heads else jnp.repeat(x, heads // x.shape[axis], axis=axis)


def _decay_factor(log_decay):
  """``exp(log_decay)`` (``(B, H)`` or ``(B, H, K)``) shaped to scale a ``(B, H, K, V)`` state; 1 without decay."""
  if log_decay is None:
    return 1.0
  decay = jnp.exp(log_decay.astype(jnp.float32))
  return decay[..., None, None] if decay.ndim == 2 else decay[..., None]


def linear_attention_step(q, k, v, state, log_decay, *, scale):
  """``S' = Diag(exp(g)) S + k v^T``; ``o = scale * S'^T q``. ``q`` ``(B, H, K)``, state ``(B, H, K, V)``."""
  heads = q.shape[1]
  k, v = _per_query_head(k, heads, 1), _per_query_head(v, heads, 1)
  state = _decay_factor(log_decay) * state + k[..., None] * v[..., None, :]
  o = jnp.einsum("bhk,bhkv->bhv", q.astype(jnp.float32) * scale, state)
  return o.astype(q.dtype), state


def delta_rule_step(q, k, v, beta, state, log_decay, *, scale):
  """``S' = exp(g)(I - b k k^T) S + b k v^T``; ``o = scale * S'^T q``."""
  heads = q.shape[1]
  k, v, beta = (_per_query_head(x, heads, 1) for x in (k, v, beta))
  state = _decay_factor(log_decay) * state
  delta = beta[..., None] * (v - jnp.einsum("bhk,bhkv->bhv", k, state))
  state = state + k[..., None] * delta[..., None, :]
  o = jnp.einsum("bhk,bhkv->bhv", q.astype(jnp.float32) * scale, state)
  return o.astype(q.dtype), state


def linear_attention(q, k, v, log_decay, *, scale, initial_state, return_final_state, segment_ids,
                     chunk_size, config):
  """:func:`linear_attention_step` over the sequence. Shapes as in ``__init__``."""
  del return_final_state, chunk_size, config
  step = lambda s, x: linear_attention_step(*x[:3], s, x[3], scale=scale)
  return _scan(step, (q, k, v, log_decay), initial_state, segment_ids, v.shape[-1])


def delta_rule(q, k, v, beta, log_decay, *, scale, initial_state, return_final_state, segment_ids,
               chunk_size, config):
  """:func:`delta_rule_step` over the sequence."""
  del return_final_state, chunk_size, config
  step = lambda s, x: delta_rule_step(*x[:4], s, x[4], scale=scale)
  return _scan(step, (q, k, v, beta, log_decay), initial_state, segment_ids, v.shape[-1])


def _scan(step, inputs, initial_state, segment_ids, value_dim):
  """Runs ``step(state, inputs_t) -> (o_t, state)`` over time, zeroing the state where a segment starts."""
  q = inputs[0]
  batch, seq, heads, key_dim = q.shape
  state = (jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))
  if segment_ids is None:
    starts = jnp.zeros((batch, seq), bool)
  else:
    starts = jnp.concatenate([jnp.zeros((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)

  def body(state, x):
    *x_t, start = x
    state = jnp.where(start[:, None, None, None], 0.0, state)
    o, state = step(state, x_t)
    return state, o

  time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
  final, o = jax.lax.scan(body, state, (*map(time_major, inputs), time_major(starts)))
  return jnp.moveaxis(o, 0, 1), final
