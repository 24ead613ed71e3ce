"""The long-convolution oracle: the defining sum, one lag at a time."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference(u_BTC, kernel_TC, segment_ids):
  """``y_t = sum_j kernel_j * u_{t-j}`` over the lags ``j <= t`` whose token is in ``t``'s segment, float32."""
  batch, seq, _ = u_BTC.shape
  kernel = kernel_TC.astype(jnp.float32)
  if segment_ids is None:
    segment_ids = jnp.zeros((batch, seq), jnp.int32)
  # Left-padded by T: the slice starting at T - j holds the token j steps back (padding where t < j).
  padded_u = jnp.pad(u_BTC.astype(jnp.float32), ((0, 0), (seq, 0), (0, 0)))
  padded_seg = jnp.pad(segment_ids, ((0, 0), (seq, 0)))
  in_sequence = jnp.pad(jnp.ones((batch, seq), bool), ((0, 0), (seq, 0)))

  def add_lag(lag, y):
    back = lambda x: jax.lax.dynamic_slice_in_dim(x, seq - lag, seq, axis=1)
    visible = back(in_sequence) & (back(padded_seg) == segment_ids)
    return y + jnp.where(visible[..., None], kernel[lag] * back(padded_u), 0.0)

  y = jax.lax.fori_loop(0, seq, add_lag, jnp.zeros((batch, seq, u_BTC.shape[2]), jnp.float32))
  return y.astype(u_BTC.dtype)
