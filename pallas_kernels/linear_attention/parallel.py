"""Quadratic ("parallel", attention-like) forms: the ``xla`` passes with the whole sequence as one chunk.

Gated linear attention (arXiv 2312.06635 eq. 3, the parallel form): ``o = scale * [(P o D) V + (Q * exp(G)) S_0]``
with ``P = Q K^T`` and the ``T x T`` decay matrix ``D_ij = exp(G_i - G_j)`` (per key channel inside the sum over
``K`` when the decay is per channel); the (gated) delta rule is one WY/UT transform over the whole sequence
(arXiv 2412.06464 §3.3). Time and memory are quadratic in ``T``: meant for short sequences, and as a check
that the chunked passes do not depend on the chunk length.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.linear_attention import _chunked, xla

BACKEND = dataclasses.replace(xla.BACKEND, name="parallel",
                              plan=lambda q, chunk_size: (q.shape[1],) + xla.BACKEND.plan(q, chunk_size)[1:])


def linear_attention(q, k, v, log_decay, *, config=None, **kwargs):
  """Parallel gated linear attention; arguments and returns as in :mod:`pallas_kernels.linear_attention`."""
  del config  # Pallas settings
  return _chunked.linear_attention(BACKEND, q, k, v, log_decay, **kwargs)


def delta_rule(q, k, v, beta, log_decay, *, config=None, **kwargs):
  """Parallel (gated) delta rule: one WY/UT transform over the whole sequence."""
  del config  # Pallas settings
  return _chunked.delta_rule(BACKEND, q, k, v, beta, log_decay, **kwargs)
