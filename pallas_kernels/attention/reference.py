"""Materialised attention in float32: the ``(B, H, T, S)`` scores, every normalizer, the mask. The oracle
every other implementation is tested against. Arguments arrive validated and canonical (see ``__init__``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention import masking
from pallas_kernels.attention.normalizers import Normalizer


def attention(q, k, v, *, normalizer: Normalizer, mask: masking.Mask, q_scale):
  """o_i = sum_j P_ij v_j with P = normalizer(q_scale_i * q_i . k_j) over visible keys.

  Args:
    q: ``(B, T, H, D)``; k: ``(B, S, KV, D)``; v: ``(B, S, KV, Dv)``.
    normalizer: a resolved (static) normalizer.
    mask: the canonical mask.
    q_scale: ``(B, T, H)`` float32 factor on each row's logits (the softmax scale times any row scaling).
  Returns:
    ``(B, T, H, Dv)`` in ``q.dtype``.
  """
  batch, seq, heads, _ = q.shape
  num_keys, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  k_BSHD = jnp.repeat(k.astype(jnp.float32), group, axis=2)
  v_BSHV = jnp.repeat(v.astype(jnp.float32), group, axis=2)
  s_BHTS = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k_BSHD, precision=jax.lax.Precision.HIGHEST)
  s_BHTS = s_BHTS * jnp.swapaxes(q_scale, 1, 2)[..., None]
  vis_BTS = masking.visible(mask.positions(seq), jnp.arange(num_keys), mask.q_segment_ids, mask.kv_segment_ids,
                            mask.key_mask, causal=mask.causal, window=mask.window, num_keys=num_keys)
  p_BHTS = normalizer.weights(s_BHTS, vis_BTS[:, None])
  o_BTHV = jnp.einsum("bhts,bshv->bthv", p_BHTS, v_BSHV, precision=jax.lax.Precision.HIGHEST)
  return o_BTHV.astype(q.dtype)
