"""Chunk math of gated linear attention, shared by every chunked backend (``xla``, ``pallas_tpu``,
``pallas_triton``): GLA's chunkwise form (arXiv 2312.06635 §4, eqs. 5-6) and its backward (the structure of
flash-linear-attention's ``chunk_gla_bwd``).

One head, one chunk of ``C`` steps: ``q``, ``k`` ``(C, K)``, ``v`` ``(C, V)``, ``G`` ``(C, K')`` the inclusive
within-chunk cumulative log decay (``K' = K`` per key channel, ``1`` per head, ``None`` without decay; float32,
non-increasing), ``G_C`` its last row, ``S`` the state entering the chunk, stored value-major ``(V, K)`` so that
per-key decays broadcast along rows:

    o_i = scale * [ (q_i * exp(G_i)) S^T + sum_{j <= i} A_ij v_j ],    A_ij = sum_k q_ik k_jk exp(G_ik - G_jk)
    S'  = exp(G_C) * S + v^T (k * exp(G_C - G))

Backward, with ``do`` already multiplied by ``scale`` and ``dS'`` the cotangent of ``S'``:

    dv = A^T do + (k * exp(G_C - G)) dS'^T        dA = tril(do v^T)
    dq = (do S) * exp(G) + dq_A                    dk = (v dS') * exp(G_C - G) + dk_A
    dS = exp(G_C) * dS' + do^T (q * exp(G))        (the reverse state pass)
    dG = q * dq - k * dk + [last row] (sum_j k_j * (v dS')_j exp(G_C - G_j) + exp(G_C) * sum_v S * dS')

(``dq_A``, ``dk_A``: the gradients through ``A``; ``dG`` holds because every factor is ``exp`` of a difference
of ``G`` rows; summed over ``K`` for a per-head decay). The wrapper turns ``dG`` into the gradient of the
per-step log decays (a reverse cumulative sum, by autodiff).

Intra-chunk scores ``A`` with every exponent <= 0 ("secondary chunking"): the chunk is cut into sub-chunks;
an off-diagonal pair (query sub-chunk ``I`` after key sub-chunk ``J``) factorises around a row ``r`` between
them, ``exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j)``, and runs as a matmul; diagonal pairs need the
pairwise exponent. On batched arrays (the ``xla`` backend picks per call with :func:`is_mild`) either one
matmul around the chunk's middle row (mild decays, :class:`MidScores`) or :class:`SecondaryChunkScores`, which
computes the diagonal sub-chunks diagonal by diagonal (offset ``d``: a ``(C, K)`` product with
``exp(G_i - G_{i-d})``) and the rest by recursive halving, never a ``(sub, sub, K)`` pairwise tensor;
:class:`BlockScores` (kernels: 16-row blocks loaded from refs) loops over the key columns of a diagonal block,
as flash-linear-attention does. Without decay or with a per-head one, every backend (kernels included) holds a
chunk's scores as one ``(C, C)`` matrix (:class:`HeadScores`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.linear_attention._tiles import (MIN_LOG_DECAY, as_row, causal_mask, col_dot, iota, last_row_mask,
                                                    masked_exp, mm, mm_nt, mm_tn, precision, row_dot, wide)

# ---- the inter-chunk terms (whole chunks or tiles of K / V) ------------------------------------------------


def decayed(x, log_factor):
  """``x * exp(log_factor)`` (``x`` when there is no decay)."""
  return x if log_factor is None else x * jnp.exp(log_factor)


def key_to_end(k, G, G_last):
  """``k * exp(G_C - G)``: how much of key ``j`` reaches the end of the chunk."""
  return k if G is None else k * jnp.exp(G_last - G)


def carry(G_last):
  """``exp(G_C)`` ``(1, K')``: the decay of the incoming state over the chunk (None without decay)."""
  return None if G_last is None else jnp.exp(G_last)


def advance(state_VK, carry_1K, write_VK):
  """``S' = carry * S + write`` (the state pass, forward; also the reverse pass with cotangents)."""
  return write_VK + (state_VK if carry_1K is None else carry_1K * state_VK)


def state_write(k, v, G, G_last, dtype):
  """``v^T (k * exp(G_C - G))`` ``(V, K)``: the chunk's contribution to the outgoing state."""
  return mm_tn(v, key_to_end(k, G, G_last), dtype)


def state_grad_write(q, G, do, dtype):
  """``do^T (q * exp(G))`` ``(V, K)``: the chunk's contribution to the cotangent of its incoming state."""
  return mm_tn(do, decayed(q, G), dtype)


def inter_output(q, G, state_VK, dtype):
  """``(q * exp(G)) S^T`` ``(C, V)``: what the incoming state contributes to the outputs."""
  return mm_nt(decayed(q, G), state_VK, dtype)


def inter_grads(q, k, v, G, G_last, state_VK, dstate_VK, do, dtype):
  """Gradients through the incoming state and the state write: ``(dq, dk, dv, d_last)``, ``d_last`` ``(1, K')``
  the keys' part of ``dG`` on the last row (``sum_j k_j * dk_j``; add :func:`carry_grad`)."""
  dq = decayed(mm(do, state_VK, dtype), G)
  dk = key_to_end(mm(v, dstate_VK, dtype), G, G_last)
  dv = mm_nt(key_to_end(k, G, G_last), dstate_VK, dtype)
  d_last = None if G is None else reduce_to(col_dot(k, dk), G)
  return dq, dk, dv, d_last


def carry_grad(G_last, state_VK, dstate_VK):
  """The carry's part of ``dG`` on the last row: ``exp(G_C) * sum_v S * dS'`` ``(1, K')``."""
  if G_last is None:
    return None
  return reduce_to(jnp.exp(G_last) * col_dot(state_VK, dstate_VK), G_last)


def gate_grad(q, k, dq, dk, G, d_last):
  """``dG = q * dq - k * dk`` plus ``d_last`` on the last row (``None`` without decay)."""
  if G is None:
    return None
  if G.shape[-1] == 1:
    d = row_dot(q, dq) - row_dot(k, dk)
  else:
    d = q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk
  return d + jnp.where(last_row_mask(G.shape[-2]), d_last, 0.0)


def chunk_output(q, v, G, state_VK, scores, dtype):
  """``o / scale`` of a chunk: the incoming state's part plus ``A v`` (``scores``: an intra object below)."""
  return inter_output(q, G, state_VK, dtype) + scores.apply(v)


def end_state_grad(state_out_VK, dstate_VK, G_last):
  """``sum_v S' * dS'`` ``(1, K')`` from the state leaving a chunk and its cotangent: the last row's extra ``dG``
  (None without decay). It equals the keys' part plus the carry's (:func:`inter_grads`, :func:`carry_grad`):
  with ``W = v^T (k * exp(G_C - G))`` the state write, ``sum_j k_j * (v dS')_j exp(G_C - G_j) = sum_v W * dS'``,
  and ``exp(G_C) S + W = S'``. A backend that holds ``S'`` (the state entering the next chunk) saves the keys'
  ``(C, K)`` reduction, which XLA:CPU runs on a transposed copy of both operands."""
  return None if G_last is None else reduce_to(col_dot(state_out_VK, dstate_VK), G_last)


def chunk_grads(q, k, v, G, G_last, state_VK, dstate_VK, do, scores, dtype, d_last=None):
  """``(dq, dk, dv, dG)`` of a chunk (``do`` already scaled) from the state entering it, the cotangent of the
  state leaving it and its intra object; ``dG`` None without decay. ``d_last``: :func:`end_state_grad` of the
  chunk where the caller has it (else summed from the keys and the carry)."""
  dq_a, dk_a, dv_a = scores.backward(do, v)
  dq, dk, dv, d_keys = inter_grads(q, k, v, G, G_last, state_VK, dstate_VK, do, dtype)
  dq, dk, dv = dq + dq_a, dk + dk_a, dv + dv_a
  if G is not None and d_last is None:
    d_last = d_keys + carry_grad(G_last, state_VK, dstate_VK)
  return dq, dk, dv, gate_grad(q, k, dq, dk, G, d_last)


def reduce_to(x, G):
  """Sums ``x`` over its last axis when the decay is per head (``G`` has one column)."""
  return jnp.sum(x, axis=-1, keepdims=True) if G.shape[-1] == 1 and x.shape[-1] != 1 else x


# ---- intra-chunk scores on batched arrays (the xla backend) -------------------------------------------------
#
# An intra object offers ``apply(v) = A v`` and ``backward(do, v) = (dq, dk, dv)`` through ``o = A v`` (``dv =
# A^T do``; ``dq``, ``dk`` through ``dA = tril(do v^T)``), per query head (keys may carry a size-1 group axis).


def head_decay(G):
  """``(C, C)`` ``exp(G_i - G_j)`` for ``j <= i`` (0 above), per head (``G`` ``(..., C, 1)``)."""
  return masked_exp(G - as_row(G), causal_mask(G.shape[-2]))


def head_scores(q, k, D, dtype):
  """``A = (q k^T) * D`` for no decay (``D`` None: the causal mask) or a per-head decay."""
  scores = mm_nt(q, k, dtype)
  return jnp.where(causal_mask(q.shape[-2]), scores, 0.0) if D is None else scores * D


class HeadScores:
  """``A`` for no decay or a per-head decay, held as a ``(C, C)`` matrix."""

  def __init__(self, q, k, G, dtype):
    self.q, self.k, self.dtype = q, k, dtype
    self.D = None if G is None else head_decay(G)
    self.A = head_scores(q, k, self.D, dtype)

  def apply(self, v):
    return mm(self.A, v, self.dtype)

  def backward(self, do, v):
    dA = mm_nt(do, v, self.dtype)
    dP = jnp.where(causal_mask(dA.shape[-1]), dA, 0.0) if self.D is None else dA * self.D
    w = wide(self.dtype)
    return mm(dP, self.k, w), mm_tn(dP, self.q, w), mm_tn(self.A, do, w)


def _shift(x, d: int):
  """``y[..., i, :] = x[..., i - d, :]`` (zeros for ``i < d``)."""
  if d == 0:
    return x
  pad = [(0, 0)] * (x.ndim - 2) + [(d, 0), (0, 0)]
  return jnp.pad(x, pad)[..., :x.shape[-2], :]


def _unshift(x, d: int):
  """Adjoint of :func:`_shift`: ``y[..., j, :] = x[..., j + d, :]`` (zeros for ``j >= C - d``)."""
  if d == 0:
    return x
  pad = [(0, 0)] * (x.ndim - 2) + [(0, d), (0, 0)]
  return jnp.pad(x, pad)[..., d:, :]


MILD_SPREAD = 20.0  # largest within-chunk log-decay span (nats) of MidScores


def is_mild(g):
  """Whether every chunk's cumulative log decay spans at most :data:`MILD_SPREAD` nats in every channel (always
  true for GLA's ``logsigmoid(x) / 16`` gates at ``C <= 64``), from the per-step log decays ``g`` ``(..., C, K)``,
  before or after the clamp at :data:`._tiles.MIN_LOG_DECAY` (a clamped value spans more than ``MILD_SPREAD``
  either way): a scalar bool.

  The span ``G_1 - G_C`` is minus the sum of rows 2..C, taken as the sum of all rows less the first (clamped, so
  that ``-inf`` there gives ``-inf`` rather than NaN: not mild, which is always safe). It is one reduction over
  ``g`` itself: XLA:CPU copies whatever it reduces, a slice of rows 2..C or a clamped or masked ``g``."""
  span = jnp.sum(g, axis=-2) - jnp.maximum(g[..., 0, :], MIN_LOG_DECAY)
  return -jnp.min(span) <= MILD_SPREAD


class MidScores(HeadScores):
  """``A`` for a per-key-channel decay whose span is mild (:func:`is_mild`), as one matmul around the chunk's
  middle row ``r``: ``(q * exp(G - G_r)) (k * exp(G_r - G))^T``, every factor in ``[e^-20, e^20]`` (the same
  trade as flash-linear-attention's ``safe_gate`` for bounded gates). Larger spans overflow: use
  :class:`SecondaryChunkScores` there."""

  def __init__(self, q, k, G, dtype):
    ref = G[..., (G.shape[-2] - 1) // 2:(G.shape[-2] + 1) // 2, :]
    self.up, self.down = jnp.exp(G - ref), jnp.exp(ref - G)
    super().__init__(q * self.up, k * self.down, None, dtype)

  def backward(self, do, v):
    dq, dk, dv = super().backward(do, v)
    return dq * self.up, dk * self.down, dv


class SecondaryChunkScores:
  """``A`` for a per-key-channel decay on batched chunks, exact for any decay and never materialised: diagonal
  blocks of ``sub`` rows diagonal by diagonal, the rest by recursive halving.

  * Diagonal blocks: for each offset ``d < sub``, ``A_{i, i-d} = sum_k q_ik k_{i-d,k} exp(G_ik - G_{i-d,k})``
    is one ``(C, K)`` product (the pairwise exponent of exactly those pairs; no ``(sub, sub, K)`` tensor).
  * Levels ``b = sub, 2 sub, ...``: in every diagonal block of ``2b`` rows, the lower-left ``b x b`` quadrant
    factorises around the last row ``r`` of the upper half, ``exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j)``
    (both exponents <= 0, no cancellation of large factors), one batched matmul per level; each row is a
    query in one quadrant and a key in one other per level, so a level costs one ``exp`` pass over ``(C, K)``.

  Every off-diagonal pair belongs to exactly one quadrant, so ``A`` is covered once, with ``log2(C / sub)``
  levels (the chunk is padded to ``sub * 2^m`` rows with zero keys and queries). Work: ``C^2 K / 2`` in
  matmuls plus ``(sub + log2(C / sub))`` elementwise passes over ``(C, K)``.
  """

  def __init__(self, q, k, G, dtype, sub: int):
    self.chunk, self.dtype = G.shape[-2], dtype
    self.sub = min(sub, self.chunk)
    padded = self.sub
    while padded < self.chunk:
      padded *= 2
    pad = lambda x, mode="constant": jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, padded - self.chunk), (0, 0)],
                                             mode=mode)
    self.q, self.k, self.G = pad(q.astype(jnp.float32)), pad(k.astype(jnp.float32)), pad(G, "edge")
    self.padded = padded
    rows = iota((padded, 1), 0) % self.sub
    self.offsets = [(d, masked_exp(self.G - _shift(self.G, d), rows >= d)) for d in range(1, self.sub)]
    self.levels = []
    half = self.sub
    while half < padded:
      G_b = self._blocks(self.G, half)
      ref = G_b[..., half - 1:half, :]
      lower = iota((2 * half, 1), 0) >= half
      factor = jnp.exp(-jnp.abs(G_b - ref))  # exp(G_i - G_r) below r, exp(G_r - G_j) above (both <= 1)
      q_t = jnp.where(lower, self._blocks(self.q, half) * factor, 0.0)
      k_t = jnp.where(lower, 0.0, self._blocks(self.k, half) * factor)
      self.levels.append((half, q_t, k_t, factor))
      half *= 2

  def _blocks(self, x, half):
    return x.reshape(*x.shape[:-2], self.padded // (2 * half), 2 * half, x.shape[-1])

  def _pad(self, x):
    return jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 2) + [(0, self.padded - self.chunk), (0, 0)])

  def _unpad(self, x):
    return x[..., :self.chunk, :]

  def _level_dot(self, spec, a, b, backward=False):
    dtype = wide(self.dtype) if backward else self.dtype
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=precision(dtype),
                      preferred_element_type=jnp.float32)

  def _diagonals(self):
    """``[(d, E_d, a_d)]``: ``a_d[i] = A_{i, i-d}`` ``(..., C, 1)``."""
    return [(d, e, row_dot(self.q * e, _shift(self.k, d))) for d, e in self.offsets]

  def apply(self, v):
    v = self._pad(v)
    out = row_dot(self.q, self.k) * v
    for d, _, a in self._diagonals():
      out = out + a * _shift(v, d)
    for half, q_t, k_t, _ in self.levels:  # q_t is zero above r and k_t below: one quadrant per block
      scores = self._level_dot("...Bik,...Bjk->...Bij", q_t, k_t)
      out = out + self._level_dot("...Bij,...Bjv->...Biv", scores, self._blocks(v, half)).reshape(out.shape)
    return self._unpad(out)

  def backward(self, do, v):
    do, v = self._pad(do), self._pad(v)
    diag = row_dot(self.q, self.k)
    dv, d_diag = diag * do, row_dot(do, v)
    dq, dk = d_diag * self.k, d_diag * self.q
    for d, e, a in self._diagonals():
      dv = dv + _unshift(a * do, d)
      dA_d = row_dot(do, _shift(v, d))  # dA_{i, i-d}
      dq = dq + dA_d * _shift(self.k, d) * e
      dk = dk + _unshift(dA_d * self.q * e, d)
    for half, q_t, k_t, factor in self.levels:
      do_b, v_b = self._blocks(do, half), self._blocks(v, half)
      quadrant = (iota((2 * half, 2 * half), 0) >= half) & (iota((2 * half, 2 * half), 1) < half)
      scores = self._level_dot("...Bik,...Bjk->...Bij", q_t, k_t)
      dA = jnp.where(quadrant, self._level_dot("...Biv,...Bjv->...Bij", do_b, v_b), 0.0)
      dv = dv + self._level_dot("...Bij,...Biv->...Bjv", scores, do_b, True).reshape(dv.shape)
      dq = dq + (self._level_dot("...Bij,...Bjk->...Bik", dA, k_t, True) * factor).reshape(dq.shape)
      dk = dk + (self._level_dot("...Bij,...Bik->...Bjk", dA, q_t, True) * factor).reshape(dk.shape)
    return self._unpad(dq), self._unpad(dk), self._unpad(dv)


# ---- inside a kernel: one chunk (or a K / V tile of it) in refs -------------------------------------------------

BLOCK = 16  # rows of a kernel sub-chunk (Triton's smallest dot)


def _rows(ref, start, size: int):
  return ref[pl.ds(start, size), :]


def _chunk_decay(G_ref, base, chunk: int):
  """``(G, G_C)`` of the chunk at row ``base`` (``(None, None)`` without decay)."""
  if G_ref is None:
    return None, None
  return _rows(G_ref, base, chunk), _rows(G_ref, base + chunk - 1, 1)


def kernel_state_step(k_ref, v_ref, G_ref, base, chunk: int, state_VK, dtype):
  """The states pass over the chunk at row ``base`` (refs may be K / V tiles): the state after it."""
  G, G_last = _chunk_decay(G_ref, base, chunk)
  write = state_write(_rows(k_ref, base, chunk), _rows(v_ref, base, chunk), G, G_last, dtype)
  return advance(state_VK, carry(G_last), write)


def kernel_state_grad_step(q_ref, G_ref, do_ref, base, chunk: int, dstate_VK, scale: float, dtype):
  """The reverse state pass over the chunk at row ``base``: the cotangent of the state entering it."""
  G, G_last = _chunk_decay(G_ref, base, chunk)
  do = scale * _rows(do_ref, base, chunk).astype(jnp.float32)
  return advance(dstate_VK, carry(G_last), state_grad_write(_rows(q_ref, base, chunk), G, do, dtype))


class BlockScores:
  """``A`` of one chunk with a per-key-channel decay inside a kernel, 16-row block by block, from refs ``q``,
  ``k`` ``(C, K)`` and ``G`` ``(C, K)`` float32. Off-diagonal blocks factorise around the first row of the
  query block (both factors <= 1, one dot); a diagonal block loops over its 16 key columns with the pairwise
  exponent masked before ``exp`` (flash-linear-attention ``chunk_gla_fwd_kernel_intra``)."""

  def __init__(self, q_ref, k_ref, G_ref, chunk: int, dtype):
    self.refs, self.num, self.dtype = dict(q=q_ref, k=k_ref, G=G_ref), chunk // BLOCK, dtype
    self._cache = {}

  def load(self, name: str, i: int):
    """Rows of block ``i`` of ``q``/``k`` (their dtype) or ``G``."""
    if (name, i) not in self._cache:
      self._cache[name, i] = _rows(self.refs[name], i * BLOCK, BLOCK)
    return self._cache[name, i]

  @staticmethod
  def _row(x, r: int):
    return jnp.sum(jnp.where(iota(x.shape, 0) == r, x, 0.0), axis=0, keepdims=True)

  def _factors(self, i: int, j: int):
    """``(q_i exp(G_i - G_r), k_j exp(G_r - G_j), exp(G_i - G_r), exp(G_r - G_j))``, ``r`` the first row of i."""
    G_i = self.load("G", i)
    first = self._row(G_i, 0)
    up, down = jnp.exp(G_i - first), jnp.exp(first - self.load("G", j))
    return self.load("q", i) * up, self.load("k", j) * down, up, down

  def _column_decay(self, i: int, col: int):
    """``(16, K)``: ``exp(G_a - G_col)`` for rows ``a >= col`` of block ``i``, 0 above."""
    G = self.load("G", i)
    return masked_exp(G - self._row(G, col), iota((BLOCK, 1), 0) >= col)

  def block(self, i: int, j: int):
    """``A`` block (query block ``i``, key block ``j <= i``), float32 ``(16, 16)``, zero above the diagonal."""
    if i != j:
      q_t, k_t, _, _ = self._factors(i, j)
      return mm_nt(q_t, k_t, self.dtype)
    q, k = self.load("q", i).astype(jnp.float32), self.load("k", i).astype(jnp.float32)
    cols = iota((BLOCK, BLOCK), 1)
    scores = jnp.zeros((BLOCK, BLOCK), jnp.float32)
    for col in range(BLOCK):
      column = jnp.sum(q * self._row(k, col) * self._column_decay(i, col), axis=1, keepdims=True)
      scores = jnp.where(cols == col, column, scores)
    return scores

  def block_grads(self, i: int, j: int, dA):
    """``(dq_i, dk_j)`` through block ``(i, j)`` given its cotangent ``dA`` (zero above the diagonal)."""
    w = wide(self.dtype)
    if i != j:
      q_t, k_t, up, down = self._factors(i, j)
      return mm(dA, k_t, w) * up, mm_tn(dA, q_t, w) * down
    q, k = self.load("q", i).astype(jnp.float32), self.load("k", i).astype(jnp.float32)
    dq, dk = jnp.zeros_like(q), jnp.zeros_like(k)
    for col in range(BLOCK):
      decay = self._column_decay(i, col)
      d_col = jnp.sum(jnp.where(iota(dA.shape, 1) == col, dA, 0.0), axis=1, keepdims=True)
      dq = dq + d_col * self._row(k, col) * decay
      dk = dk + jnp.where(iota((BLOCK, 1), 0) == col, jnp.sum(d_col * q * decay, axis=0, keepdims=True), 0.0)
    return dq, dk


def _per_channel(G_ref) -> bool:
  """Whether a kernel's chunk takes 16-row blocks (a per-key-channel decay); without decay or with a per-head
  one, its scores are one ``(C, C)`` matrix (:class:`HeadScores`): whole-chunk dots, as wide as the tensor
  cores / MXU take them, with every exponent ``<= 0`` (masked before ``exp``)."""
  return G_ref is not None and G_ref.shape[-1] != 1


def kernel_output(q_ref, k_ref, v_ref, G_ref, state_VK, o_ref, *, chunk: int, scale: float, dtype):
  """Writes ``o`` of one chunk (``v``, ``o`` and the state may be V tiles)."""
  if not _per_channel(G_ref):
    q, G = q_ref[...], None if G_ref is None else G_ref[...]
    o = chunk_output(q, v_ref[...], G, state_VK, HeadScores(q, k_ref[...], G, dtype), dtype)
    o_ref[...] = (scale * o).astype(o_ref.dtype)
    return
  scores = BlockScores(q_ref, k_ref, G_ref, chunk, dtype)
  for i in range(scores.num):
    acc = inter_output(scores.load("q", i), scores.load("G", i), state_VK, dtype)
    for j in range(i + 1):
      acc = acc + mm(scores.block(i, j), _rows(v_ref, j * BLOCK, BLOCK), dtype)
    o_ref[pl.ds(i * BLOCK, BLOCK), :] = (scale * acc).astype(o_ref.dtype)


def kernel_grads(q_ref, k_ref, v_ref, G_ref, state_VK, dstate_VK, do_ref, grad_refs, *, chunk: int,
                 scale: float, dtype):
  """Writes ``(dq, dk, dv[, dG])`` of one chunk given the state entering it and the cotangent of the state
  leaving it (whole K and V)."""
  G, G_last = _chunk_decay(G_ref, 0, chunk)
  if not _per_channel(G_ref):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    grads = chunk_grads(q, k, v, G, G_last, state_VK, dstate_VK, scale * do_ref[...].astype(jnp.float32),
                        HeadScores(q, k, G, dtype), dtype)
    for ref, x in zip(grad_refs, grads):
      ref[...] = x.astype(ref.dtype)
    return
  scores = BlockScores(q_ref, k_ref, G_ref, chunk, dtype)
  n = scores.num
  do = [scale * _rows(do_ref, i * BLOCK, BLOCK).astype(jnp.float32) for i in range(n)]
  v = [_rows(v_ref, i * BLOCK, BLOCK) for i in range(n)]
  dq, dk, dv, d_last = [], [], [], carry_grad(G_last, state_VK, dstate_VK)
  for i in range(n):
    dq_i, dk_i, dv_i, d_keys = inter_grads(scores.load("q", i), scores.load("k", i), v[i], scores.load("G", i),
                                           G_last, state_VK, dstate_VK, do[i], dtype)
    dq.append(dq_i), dk.append(dk_i), dv.append(dv_i)
    d_last = d_last + d_keys
  causal = causal_mask(BLOCK)
  for i in range(n):
    for j in range(i + 1):
      dA = mm_nt(do[i], v[j], dtype)
      dA = jnp.where(causal, dA, 0.0) if i == j else dA
      dv[j] = dv[j] + mm_tn(scores.block(i, j), do[i], wide(dtype))
      dq_ij, dk_ij = scores.block_grads(i, j, dA)
      dq[i], dk[j] = dq[i] + dq_ij, dk[j] + dk_ij
  for i in range(n):
    rows = pl.ds(i * BLOCK, BLOCK)
    dG = gate_grad(scores.load("q", i), scores.load("k", i), dq[i], dk[i], scores.load("G", i),
                   d_last if i == n - 1 else 0.0)
    for ref, x in zip(grad_refs, (dq[i], dk[i], dv[i], dG)):
      ref[rows, :] = x.astype(ref.dtype)
