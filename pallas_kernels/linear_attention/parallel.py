"""Quadratic ("parallel", attention-like) forms: the whole sequence is one chunk of :mod:`._chunk_math`.

Gated linear attention (arXiv 2312.06635 eq. 3, the parallel form): ``o = scale * [(P o D) V + (Q * exp(G)) S_0]``
with ``P = Q K^T`` and the ``T x T`` decay matrix ``D_ij = exp(sum_{j<s<=i} g_s)`` for ``j <= i`` (per key channel
inside the sum over ``K`` when the decay is per channel). The exponents are exact segment sums, masked before
``exp``. The (gated) delta rule uses the WY/UT transform over the whole sequence (arXiv 2412.06464 §3.3).
Time and memory are quadratic in ``T`` (times ``K`` for a per-channel decay): meant for short sequences
and as a second oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import _chunk_math
from pallas_kernels.linear_attention._chunk_math import Chunks, masked_exp


def _scores(c: Chunks) -> jax.Array:
  if c.g is not None and c.g.shape[-1] > 1:
    decay = masked_exp(_chunk_math.segment_sums(c.g), c.pair[..., None])  # (B, H, 1, T, T, K)
    return jnp.einsum("...ik,...jk,...ijk->...ij", c.q, c.k, decay)
  return _chunk_math.head_scores(c.q, c.k, c.g, c.pair)


def linear_attention(q, k, v, log_decay, *, scale, initial_state, return_final_state, segment_ids,
                     chunk_size):
  """Parallel gated linear attention; arguments and returns as in :mod:`pallas_kernels.linear_attention`."""
  del return_final_state, chunk_size
  return _chunk_math.linear_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                      segment_ids=segment_ids, chunk_size=q.shape[1], intra=_scores)


def delta_rule(q, k, v, beta, log_decay, *, scale, initial_state, return_final_state, segment_ids,
               chunk_size):
  """Parallel (gated) delta rule: one WY/UT transform over the whole sequence."""
  del return_final_state, chunk_size
  return _chunk_math.delta_rule(q, k, v, beta, log_decay, scale=scale, initial_state=initial_state,
                                segment_ids=segment_ids, chunk_size=q.shape[1])
