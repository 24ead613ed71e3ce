"""The materialised biased attention of :mod:`pallas_kernels.biased_attention`, at two precisions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _attend(q, k, v, bias, weight, mask, *, normalizer: str, scale: float, exact: bool):
  """``exact``: every matmul in float32 at the highest precision (the oracle); otherwise the inputs' dtype
  with float32 accumulation. Scores, bias, normaliser and weight are float32 either way."""
  out_dtype = v.dtype
  if exact:
    q, k, v = (None if x is None else x.astype(jnp.float32) for x in (q, k, v))
  dot = functools.partial(jnp.einsum, preferred_element_type=jnp.float32,
                          precision=jax.lax.Precision.HIGHEST if exact else None)
  batch, num_keys, heads, _ = v.shape
  s_BHTS = jnp.zeros((batch, heads, num_keys, num_keys), jnp.float32) if q is None else \
      scale * dot("bthd,bshd->bhts", q, k)
  if bias is not None:
    s_BHTS = s_BHTS + bias.astype(jnp.float32)
  visible = None if mask is None else jnp.broadcast_to(mask[..., None, :, :] if mask.ndim == 3 else mask,
                                                        s_BHTS.shape)
  if normalizer == "softmax":
    p_BHTS = jax.nn.softmax(s_BHTS, axis=-1, where=visible)
  else:
    p_BHTS = jax.nn.sigmoid(s_BHTS)
  if visible is not None:
    p_BHTS = jnp.where(visible, p_BHTS, 0.0)
  if weight is not None:
    p_BHTS = p_BHTS * weight.astype(jnp.float32)
  o = dot("bhts,bshv->bthv", p_BHTS if exact else p_BHTS.astype(v.dtype), v)
  return o.astype(out_dtype)


reference = functools.partial(_attend, exact=True)
xla = functools.partial(_attend, exact=False)
