"""Fast pure-XLA chunked implementations (the CPU default): chunked GLA (arXiv 2312.06635 §4) and the
chunked WY/UT gated delta rule (arXiv 2412.06464 §3.3). The chunk formulas live in :mod:`._chunk_math`; this
module adds the numerically safe intra-chunk scores for per-key-channel decays ("secondary chunking",
flash-linear-attention ``chunk_gla_fwd``): the chunk is split into sub-chunks of ``_SUB`` steps; an
off-diagonal sub-chunk pair factorises around the first step ``r`` of the query sub-chunk,
``exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j)`` with both exponents <= 0, and runs as one matmul; a
diagonal pair uses masked pairwise exponents. Memory is linear in ``T``; gradients come from autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import _chunk_math
from pallas_kernels.linear_attention._chunk_math import Chunks, masked_exp

_SUB = 8  # sub-chunk length of the secondary chunking


def _sub_chunk(chunk: int) -> int:
  """The largest divisor of ``chunk`` that is at most ``_SUB``."""
  return max(d for d in range(1, min(_SUB, chunk) + 1) if chunk % d == 0)


def _channel_scores(c: Chunks) -> jax.Array:
  """``A_ij = sum_k q_ik k_jk exp(G_ik - G_jk)`` for ``j <= i`` with every exponent <= 0 (module docstring).

  Exponents are exact segment sums of the per-step log decays (no difference of cumulative sums).
  """
  *lead, chunk, key_dim = c.q.shape
  sub = _sub_chunk(chunk)
  num = chunk // sub
  split = lambda x: x.reshape(*lead, num, sub, key_dim)
  q_s, k_s = split(c.q), split(c.k)
  pair_log = _chunk_math.segment_sums(split(c.g))  # (..., num, sub, sub, K): sum_{j<s<=i} g_s in a sub-chunk
  q_first = q_s * jnp.exp(pair_log[..., :, 0, :])  # exp(G_i - G_rI), rI the first step of sub-chunk I
  starts = sub * jnp.arange(num)
  earlier = (jnp.arange(chunk)[None, :] < starts[:, None])[..., None]  # (num, C, 1)
  to_first = _chunk_math.segment_sums(c.g, starts)  # (..., num, C, K): G_rI - G_j
  k_first = c.k[..., None, :, :] * masked_exp(to_first, earlier)
  off = jnp.einsum("...nik,...njk->...nij", q_first, k_first).reshape(*lead, chunk, chunk)
  lower = jnp.tril(jnp.ones((sub, sub), bool))[..., None]
  diag = jnp.einsum("...nik,...njk,...nijk->...nij", q_s, k_s, masked_exp(pair_log, lower))
  diag = jnp.einsum("...nij,nm->...nimj", diag, jnp.eye(num, dtype=diag.dtype)).reshape(*lead, chunk, chunk)
  return off + diag


def _scores(c: Chunks) -> jax.Array:
  if c.g is not None and c.g.shape[-1] > 1:
    return _channel_scores(c)
  return _chunk_math.head_scores(c.q, c.k, c.g, c.pair)


def linear_attention(q, k, v, log_decay, *, scale, initial_state, return_final_state, segment_ids,
                     chunk_size):
  """Chunked gated linear attention; arguments and returns as in :mod:`pallas_kernels.linear_attention`."""
  del return_final_state
  return _chunk_math.linear_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                      segment_ids=segment_ids, chunk_size=chunk_size, intra=_scores)


def delta_rule(q, k, v, beta, log_decay, *, scale, initial_state, return_final_state, segment_ids,
               chunk_size):
  """Chunked (gated) delta rule via the per-chunk WY/UT transform and a state scan over chunks."""
  del return_final_state
  return _chunk_math.delta_rule(q, k, v, beta, log_decay, scale=scale, initial_state=initial_state,
                                segment_ids=segment_ids, chunk_size=chunk_size)
