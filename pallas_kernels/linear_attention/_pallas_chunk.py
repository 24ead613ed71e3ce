"""In-kernel math of one chunk of gated linear attention, shared by the TPU (Mosaic) and Triton kernels.

Chunked GLA (arXiv 2312.06635 §4, eqs. 5-6; backward as in flash-linear-attention ``chunk_gla_bwd``). Inside
a chunk of ``C`` steps with within-chunk cumulative log gate ``G`` (``G_i = sum_{s<=i} g_s``, non-increasing):

    o_i = scale * [ alive_i (q_i * exp(G_i)) S + sum_{j<=i, same segment} (sum_k q_ik k_jk exp(G_ik - G_jk)) v_j ]
    S'  = alive_last * exp(G_last) * S + sum_{j in last segment} (k_j * exp(G_last - G_j)) v_j^T

Every exponent is <= 0: the query-key term is split into sub-chunks of ``SUB`` rows; off-diagonal sub-chunk
pairs factorise around the first row of the query sub-chunk (``exp(G_i - G_r) exp(G_r - G_j)``, both <= 1) and
run as matmuls, diagonal pairs use pairwise exponents masked (to -inf) before ``exp``. All math is float32.

Conventions of these functions (they run inside a kernel, on refs of one ``(batch, head)``):
  * refs are 2-D ``(rows, dim)``; the chunk starts at row ``base`` (a Python int or a traced int);
  * the state is kept transposed, ``St`` ``(V, K)``, so that per-key-channel decays ``(1, K)`` broadcast;
  * ``seg_ref`` ``(rows, 1)`` float32 holds, per step, how many segment starts the chunk has seen up to and
    including that step (0: still the sequence the incoming state belongs to);
  * only static slices of refs, 2-D dots and masked reductions are used (no value slicing or transposes),
    so the same code lowers through Mosaic and through Triton.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

SUB = 16  # sub-chunk rows: the factorisation granularity (and Triton's minimum dot size)
_HI = jax.lax.Precision.HIGHEST


def _dot(a, b, contract):
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=_HI, preferred_element_type=jnp.float32)


def mm(a, b):
  """a @ b."""
  return _dot(a, b, ((1,), (0,)))


def mm_nt(a, b):
  """a @ b.T."""
  return _dot(a, b, ((1,), (1,)))


def mm_tn(a, b):
  """a.T @ b."""
  return _dot(a, b, ((0,), (0,)))


def _iota(shape, dim):
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def row(x, r: int):
  """Row ``r`` of a 2-D value as ``(1, n)`` (a masked reduction: no value slicing)."""
  return jnp.sum(jnp.where(_iota(x.shape, 0) == r, x, 0.0), axis=0, keepdims=True)


def col(x, c: int):
  """Column ``c`` of a 2-D value as ``(m, 1)``."""
  return jnp.sum(jnp.where(_iota(x.shape, 1) == c, x, 0.0), axis=1, keepdims=True)


def transpose_col(x_n1):
  """``(n, 1)`` -> ``(1, n)`` via a masked reduction."""
  n = x_n1.shape[0]
  return jnp.sum(jnp.where(_iota((n, n), 0) == _iota((n, n), 1), x_n1, 0.0), axis=0, keepdims=True)


@dataclasses.dataclass(frozen=True)
class ChunkRefs:
  """Input refs of one ``(batch, head)``: q, k ``(rows, K)``, v ``(rows, V)``, cumulative gate g ``(rows, K)``
  float32, seg ``(rows, 1)`` float32 (see module docstring)."""
  q: object
  k: object
  v: object
  g: object
  seg: object


class _Chunk:
  """Loads of one chunk by sub-chunk, with the masks and decay factors every pass needs."""

  def __init__(self, refs: ChunkRefs, base, chunk: int):
    self.refs, self.base, self.n = refs, base, chunk // SUB
    self._cache = {}
    last = self.load("seg", self.n - 1)
    self.seg_last = row(last, SUB - 1)  # (1, 1)
    self.g_last = row(self.load("g", self.n - 1), SUB - 1)  # (1, K)
    self.alive_last = (self.seg_last == 0.0).astype(jnp.float32)

  def load(self, name: str, i: int):
    key = (name, i)
    if key not in self._cache:
      ref = getattr(self.refs, name)
      self._cache[key] = ref[pl.ds(self.base + i * SUB, SUB), :].astype(jnp.float32)
    return self._cache[key]

  def alive(self, i: int):
    """(SUB, 1): 1 where the incoming state still applies."""
    return (self.load("seg", i) == 0.0).astype(jnp.float32)

  def to_end(self, i: int):
    """(SUB, K): exp(G_last - G_j), zero for steps not in the chunk's last segment."""
    keep = self.load("seg", i) == self.seg_last
    return jnp.where(keep, jnp.exp(self.g_last - self.load("g", i)), 0.0)

  def seg_mask(self, i: int, j: int):
    """(SUB, SUB) float mask: same segment (and causal when i == j)."""
    mask = self.load("seg", i) == transpose_col(self.load("seg", j))
    if i == j:
      mask = mask & (_iota((SUB, SUB), 0) >= _iota((SUB, SUB), 1))
    return mask.astype(jnp.float32)

  def factors(self, i: int, j: int):
    """(q_i exp(G_i - G_r), k_j exp(G_r - G_j), exp(G_i - G_r), exp(G_r - G_j)) around r = first row of i."""
    g_ref = row(self.load("g", i), 0)
    up = jnp.exp(self.load("g", i) - g_ref)
    down = jnp.exp(g_ref - self.load("g", j))
    return self.load("q", i) * up, self.load("k", j) * down, up, down

  def diag_decay(self, i: int, b: int):
    """(SUB, K): exp(G_a - G_b) for rows a >= b of sub-chunk i, 0 above (masked before exp)."""
    g = self.load("g", i)
    diff = jnp.where(_iota((SUB, 1), 0) >= b, g - row(g, b), -jnp.inf)
    return jnp.exp(diff)

  def diag_scores(self, i: int):
    """(SUB, SUB): sum_k q_ak k_bk exp(G_ak - G_bk) for a >= b (unmasked by segment)."""
    q, k = self.load("q", i), self.load("k", i)
    scores = jnp.zeros((SUB, SUB), jnp.float32)
    for b in range(SUB):
      column = jnp.sum(q * row(k, b) * self.diag_decay(i, b), axis=1, keepdims=True)
      scores = jnp.where(_iota((SUB, SUB), 1) == b, column, scores)
    return scores

  def scores(self, i: int, j: int):
    """(SUB, SUB) masked query-key scores of query sub-chunk i against key sub-chunk j <= i."""
    if i == j:
      return self.diag_scores(i) * self.seg_mask(i, i)
    q_t, k_t, _, _ = self.factors(i, j)
    return mm_nt(q_t, k_t) * self.seg_mask(i, j)


def update_state(ch: _Chunk, st_VK):
  """The state after the chunk (transposed, (V, K))."""
  st_VK = st_VK * (jnp.exp(ch.g_last) * ch.alive_last)
  for j in range(ch.n):
    st_VK = st_VK + mm_tn(ch.load("v", j), ch.load("k", j) * ch.to_end(j))
  return st_VK


def forward_chunk(refs: ChunkRefs, o_ref, base, st_VK, *, scale: float, chunk: int):
  """Writes ``o`` for the chunk at ``base`` and returns the state after it."""
  ch = _Chunk(refs, base, chunk)
  for i in range(ch.n):
    q_e = ch.load("q", i) * jnp.exp(ch.load("g", i)) * ch.alive(i)
    acc = mm_nt(q_e, st_VK)
    for j in range(i + 1):
      acc = acc + mm(ch.scores(i, j), ch.load("v", j))
    o_ref[pl.ds(base + i * SUB, SUB), :] = (scale * acc).astype(o_ref.dtype)
  return update_state(ch, st_VK)


def state_chunk(refs: ChunkRefs, base, st_VK, *, chunk: int):
  """The state after the chunk at ``base`` (the backward's recomputation pass)."""
  return update_state(_Chunk(refs, base, chunk), st_VK)


def backward_chunk(refs: ChunkRefs, do_ref, grad_refs, base, st_VK, dst_VK, *, scale: float, chunk: int):
  """Gradients of one chunk.

  Args:
    refs: the forward inputs.
    do_ref: ``(rows, V)`` output cotangent.
    grad_refs: ``(dq, dk, dv, dg)`` output refs (float32), written for the chunk's rows.
    base: first row of the chunk.
    st_VK: state entering the chunk (recomputed), transposed.
    dst_VK: cotangent of the state leaving the chunk, transposed.
    scale: query scale.
    chunk: chunk length.
  Returns:
    The cotangent of the state entering the chunk, transposed.
  """
  ch = _Chunk(refs, base, chunk)
  n = ch.n
  do = [scale * do_ref[pl.ds(base + i * SUB, SUB), :].astype(jnp.float32) for i in range(n)]
  dq = [None] * n
  dk = [None] * n
  dv = [None] * n
  d_g_last = jnp.exp(ch.g_last) * ch.alive_last * jnp.sum(st_VK * dst_VK, axis=0, keepdims=True)
  dst_in = dst_VK * (jnp.exp(ch.g_last) * ch.alive_last)
  for j in range(n):  # state-update (inter-chunk) terms
    to_end = ch.to_end(j)
    dk[j] = mm(ch.load("v", j), dst_VK) * to_end
    dv[j] = mm_nt(ch.load("k", j) * to_end, dst_VK)
    d_g_last = d_g_last + jnp.sum(ch.load("k", j) * dk[j], axis=0, keepdims=True)
  for i in range(n):  # output terms
    q, decay = ch.load("q", i), jnp.exp(ch.load("g", i)) * ch.alive(i)
    dq[i] = mm(do[i], st_VK) * decay
    dst_in = dst_in + mm_tn(do[i], q * decay)
    for j in range(i + 1):
      mask = ch.seg_mask(i, j)
      d_scores = mm_nt(do[i], ch.load("v", j)) * mask
      dv[j] = dv[j] + mm_tn(ch.scores(i, j), do[i])
      if i == j:
        dq_d, dk_d = _diag_grads(ch, i, d_scores)
      else:
        q_t, k_t, up, down = ch.factors(i, j)
        dq_d, dk_d = mm(d_scores, k_t) * up, mm_tn(d_scores, q_t) * down
      dq[i] = dq[i] + dq_d
      dk[j] = dk[j] + dk_d
  dq_ref, dk_ref, dv_ref, dg_ref = grad_refs
  for i in range(n):
    rows = pl.ds(base + i * SUB, SUB)
    dg = ch.load("q", i) * dq[i] - ch.load("k", i) * dk[i]
    if i == n - 1:
      dg = dg + jnp.where(_iota((SUB, 1), 0) == SUB - 1, d_g_last, 0.0)
    dq_ref[rows, :] = dq[i]
    dk_ref[rows, :] = dk[i]
    dv_ref[rows, :] = dv[i]
    dg_ref[rows, :] = dg
  return dst_in


def _diag_grads(ch: _Chunk, i: int, d_scores):
  """dq, dk of the diagonal sub-chunk block from the score cotangent (already masked)."""
  q, k = ch.load("q", i), ch.load("k", i)
  dq = jnp.zeros_like(q)
  dk = jnp.zeros_like(k)
  for b in range(SUB):
    decay = ch.diag_decay(i, b)
    d_col = col(d_scores, b)
    dq = dq + d_col * row(k, b) * decay
    dk = dk + jnp.where(_iota((SUB, 1), 0) == b, jnp.sum(d_col * q * decay, axis=0, keepdims=True), 0.0)
  return dq, dk
