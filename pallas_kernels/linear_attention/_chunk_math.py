"""Chunked forms of gated linear attention and the (gated) delta rule in plain ``jnp``, shared by ``xla``
(chunks of ``chunk_size`` steps) and ``parallel`` (one chunk holding the whole sequence).

GLA chunkwise form (arXiv 2312.06635 §4, eqs. 5-6). The sequence is cut into ``N`` chunks of ``C`` steps;
inside a chunk ``G_i = sum_{s<=i} g_s`` is the inclusive cumulative log decay (float32, non-increasing) and
``S_n`` the state entering chunk ``n``:

    o_i     = scale * [ alive_i (q_i * exp(G_i)) S_n + sum_{j<=i, same segment} A_ij v_j ]
    S_{n+1} = carry_n exp(G_C) * S_n + sum_{j in last segment} (k_j * exp(G_C - G_j)) v_j^T

with ``A_ij = sum_k q_ik k_jk exp(G_ik - G_jk)`` computed by an ``intra`` function (the only part that differs
between implementations). Gated delta rule (arXiv 2412.06464 §3.3, WY/UT form): per chunk
``(I + A_kk) delta = beta * v - (beta * exp(G) * k) S_n`` with ``A_kk`` strictly lower triangular, then the same
output and state formulas with ``v`` replaced by ``delta``.

Segments: ``segment_ids`` resets the state where the id changes. Per chunk, ``resets_i`` counts the resets at
steps ``<= i`` inside the chunk; pairs ``(i, j)`` interact only when ``resets_i == resets_j``, the incoming
state reaches step ``i`` only when ``resets_i == 0`` ("alive"), key ``j`` reaches the outgoing state only when
``resets_j == resets_C``. Resets are masks, never ``-inf`` log decays. Padding (T not a multiple of C) uses zero
q/k/v/beta and zero log decay, so it changes neither the outputs nor the final state.

Every exponent is masked (``jnp.where`` to ``-inf``) before ``exp``: forward and gradients stay finite.
Gradients come from autodiff; memory is linear in ``T`` for a fixed chunk size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf
# Log decays are clamped here: exp(-150) is 0 in float32 like exp(-inf), but sums of clamped values stay finite.
_MIN_LOG_DECAY = -150.0
_MATMUL_SEGMENT_SUMS = 128  # longest chunk whose segment sums use the (C, C, C) mask matmul


@dataclasses.dataclass(frozen=True)
class Chunks:
  """Inputs cut into chunks, layout ``(B, H, N, C, dim)``, all float32.

  Attributes:
    q, k, v: ``(B, H, N, C, K|V)``.
    g: per-step log decay ``(B, H, N, C, 1|K)`` or ``None`` (no decay).
    cum: inclusive within-chunk cumulative log decay ``G`` (same shape as ``g``) or ``None``.
    to_last: ``G_C - G_j`` (a suffix sum, computed without cancellation) or ``None``.
    pair: ``(B, 1, N, C, C)`` or ``(C, C)`` bool, ``j <= i`` and same segment.
    alive: ``(B, 1, N, C, 1)`` bool (the incoming state reaches step i) or ``None`` (always).
    to_end: ``(B, 1, N, C, 1)`` bool (key j reaches the outgoing state) or ``None`` (always).
    carry: ``(B, 1, N, 1, 1)`` bool (the incoming state survives the chunk) or ``None`` (always).
  """
  q: jax.Array
  k: jax.Array
  v: jax.Array
  g: jax.Array | None
  cum: jax.Array | None
  to_last: jax.Array | None
  pair: jax.Array
  alive: jax.Array | None
  to_end: jax.Array | None
  carry: jax.Array | None


def _to_chunks(x, chunk: int):
  """``(B, T, H, *rest)`` -> zero-padded float32 ``(B, H, N, C, *rest)``."""
  batch, seq = x.shape[:2]
  num = -(-seq // chunk)
  x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, num * chunk - seq)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(batch, num, chunk, *x.shape[2:])
  return jnp.moveaxis(x, 3, 1)


def from_chunks(x_BHNCD, seq: int):
  """Inverse of :func:`_to_chunks`: ``(B, H, N, C, D)`` -> ``(B, T, H, D)`` without the padding."""
  batch, heads, num, chunk, dim = x_BHNCD.shape
  x = jnp.moveaxis(x_BHNCD, 1, 3).reshape(batch, num * chunk, heads, dim)
  return x[:, :seq]


def _sum_steps(which_CC, g):
  """``out_i = sum_s which[i, s] g_s`` over the chunk axis, as a matmul (XLA's CPU cumsum is a slow
  reduce-window)."""
  return jnp.einsum("is,bhnsd->bhnid", which_CC.astype(g.dtype), g, precision=jax.lax.Precision.HIGHEST)


def make_chunks(q, k, v, log_decay, segment_ids, chunk: int) -> Chunks:
  """Cuts canonical ``(B, T, H, D)`` inputs into :class:`Chunks` of ``chunk`` steps."""
  q_c, k_c, v_c = (_to_chunks(x, chunk) for x in (q, k, v))
  g = cum = to_last = None
  if log_decay is not None:
    g = _to_chunks(log_decay if log_decay.ndim == 4 else log_decay[..., None], chunk)
    g = jnp.maximum(g, _MIN_LOG_DECAY)
    steps = jnp.arange(chunk)
    cum = _sum_steps(steps[:, None] >= steps[None, :], g)  # sum_{s <= i} g_s
    to_last = _sum_steps(steps[:, None] < steps[None, :], g)  # sum_{s > j} g_s (no cancellation)
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  if segment_ids is None:
    return Chunks(q_c, k_c, v_c, g, cum, to_last, causal, None, None, None)
  batch, seq = segment_ids.shape
  reset = jnp.concatenate([jnp.zeros((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  reset = _to_chunks(reset[..., None, None], chunk).astype(jnp.int32)  # (B, 1, N, C, 1)
  resets = jnp.cumsum(reset, axis=3)
  last = resets[:, :, :, -1:, :]
  pair = causal & (resets == jnp.swapaxes(resets, 3, 4))
  return Chunks(q_c, k_c, v_c, g, cum, to_last, pair, resets == 0, resets == last, last == 0)


def masked_exp(log_x, mask):
  """``exp(log_x)`` where ``mask``, else 0, with the mask applied to the exponent (finite gradients)."""
  return jnp.exp(jnp.where(mask, log_x, _NEG_INF))


def segment_sums(g, rows=None):
  """Exact ``L[..., r, j, d] = sum_{j < s <= rows[r]} g[..., s, d]`` for ``g`` ``(..., C, D)`` (0 where
  ``j >= rows[r]``); ``rows`` defaults to every step (the ``(C, C)`` pairwise log decays).

  A sum over exactly the steps between ``j`` and ``i``, never a difference of two large cumulative sums, so
  it is accurate for long chunks and strong decays. Short chunks use one matmul with a constant 0/1 mask;
  long ones (the parallel form) a masked cumulative sum (``O(C^2 D)`` memory).
  """
  chunk = g.shape[-2]
  steps = jnp.arange(chunk)
  rows = steps if rows is None else jnp.asarray(rows)
  if chunk <= _MATMUL_SEGMENT_SUMS:
    mask = (steps[None, :, None] < steps[None, None, :]) & (steps[None, None, :] <= rows[:, None, None])
    return jnp.einsum("rjs,...sd->...rjd", mask.astype(g.dtype), g, precision=jax.lax.Precision.HIGHEST)
  later = (steps[:, None] > steps[None, :])[:, :, None]
  sums = jnp.cumsum(jnp.where(later, g[..., :, None, :], 0.0), axis=-3)
  return sums if rows is None else sums[..., rows, :, :]


def head_scores(a, b, g, mask):
  """``(a_i . b_j) exp(sum_{j<s<=i} g_s)`` where ``mask`` (else 0), for no decay or a per-head ``g``."""
  scores = jnp.einsum("...ik,...jk->...ij", a, b)
  if g is None:
    return jnp.where(mask, scores, 0.0)
  return scores * masked_exp(segment_sums(g)[..., 0], mask)


def _decay_by(x, log_factor, mask):
  """``x * exp(log_factor)`` masked (``None`` entries mean: no factor / no mask)."""
  if log_factor is not None:
    x = x * (jnp.exp(log_factor) if mask is None else masked_exp(log_factor, mask))
  elif mask is not None:
    x = jnp.where(mask, x, 0.0)
  return x


def _state_terms(c: Chunks):
  """Per-chunk factors of the state recurrence: ``(q * exp(G))`` for the outputs, ``(k * exp(G_C - G))`` for
  the writes and the ``(B, H, N, K|1, 1)`` carry factor ``exp(G_C)`` (0 across a reset)."""
  q_in = _decay_by(c.q, c.cum, c.alive)
  k_out = _decay_by(c.k, c.to_last, c.to_end)
  carry = None if c.cum is None else jnp.exp(c.cum[:, :, :, -1:, :])
  if c.carry is not None:
    carry = jnp.where(c.carry, 1.0 if carry is None else carry, 0.0)
  if carry is not None:
    carry = jnp.swapaxes(carry, 3, 4)  # decay per key channel: rows of the (K, V) state
  return q_in, k_out, carry


def _initial(initial_state, q, v):
  if initial_state is not None:
    return initial_state.astype(jnp.float32)
  return jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)


def _scan_chunks(step, state, xs):
  """``lax.scan`` over the chunk axis (axis 2) of every array in ``xs``."""
  moved = jax.tree.map(lambda x: None if x is None else jnp.moveaxis(x, 2, 0), xs)
  final, ys = jax.lax.scan(step, state, moved)
  return final, jax.tree.map(lambda y: jnp.moveaxis(y, 0, 2), ys)


def unit_lower_inverse(a):
  """``(I + a)^-1`` for strictly lower-triangular ``a`` ``(..., C, C)`` by recursive block doubling: with the
  inverses ``P^-1``, ``R^-1`` of two diagonal blocks, ``[[P, 0], [B, R]]^-1 = [[P^-1, 0], [-R^-1 B P^-1, R^-1]]``;
  the block size doubles from 1 to ``C`` (padded to a power of two). The recursive form of the triangular
  inverse flash-linear-attention assembles from 16 x 16 blocks (reference §4.3-4.6): ``O(C^3 / 3)`` work in
  batched matmuls only, so XLA CPU runs forward and backward as dense GEMMs (``solve_triangular``'s backward
  is pathologically slow there), with the rounding behaviour of forward substitution."""
  size = a.shape[-1]
  full = 1 << max(size - 1, 0).bit_length()
  lead = a.shape[:-2]
  a = jnp.pad(a, [(0, 0)] * len(lead) + [(0, full - size)] * 2)
  inverse = jnp.ones((*lead, full, 1, 1), a.dtype)  # (..., blocks, s, s): inverses of the diagonal blocks
  block = 1
  while block < full:
    pairs = full // (2 * block)
    lower = a.reshape(*lead, pairs, 2, block, pairs, 2, block)
    lower = jnp.diagonal(lower[..., 1, :, :, 0, :], axis1=-4, axis2=-2)  # (..., s, s, pairs): B blocks
    lower = jnp.moveaxis(lower, -1, -3)
    first, second = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
    off = -jnp.einsum("...ij,...jk,...kl->...il", second, lower, first, precision=jax.lax.Precision.HIGHEST)
    top = jnp.concatenate([first, jnp.zeros_like(first)], axis=-1)
    inverse = jnp.concatenate([top, jnp.concatenate([off, second], axis=-1)], axis=-2)
    block *= 2
  return inverse[..., 0, :size, :size]


IntraFn = Callable[[Chunks], jax.Array]


def linear_attention(q, k, v, log_decay, *, scale, initial_state, segment_ids, chunk_size: int,
                     intra: IntraFn):
  """Chunked GLA (module docstring); ``intra(chunks)`` returns ``A`` ``(B, H, N, C, C)`` (unmasked above
  the diagonal is fine: the pair mask is applied here). Returns ``(o (B, T, H, V) q.dtype, state float32)``."""
  c = make_chunks(q, k, v, log_decay, segment_ids, chunk_size)
  q_in, k_out, carry = _state_terms(c)
  writes = jnp.einsum("bhnck,bhncv->bhnkv", k_out, c.v)

  def step(state, xs):
    carry_n, write_n = xs
    new = (state if carry_n is None else carry_n * state) + write_n
    return new, state

  final, states = _scan_chunks(step, _initial(initial_state, q, v), (carry, writes))
  scores = jnp.where(c.pair, intra(c), 0.0)
  o = jnp.einsum("bhnck,bhnkv->bhncv", q_in, states) + jnp.einsum("bhnij,bhnjv->bhniv", scores, c.v)
  return from_chunks(scale * o, q.shape[1]).astype(q.dtype), final


def delta_rule(q, k, v, beta, log_decay, *, scale, initial_state, segment_ids, chunk_size: int):
  """Chunked gated delta rule via the WY/UT transform (module docstring). Returns ``(o, final_state)``."""
  c = make_chunks(q, k, v, log_decay, segment_ids, chunk_size)
  beta_c = _to_chunks(beta[..., None], chunk_size)  # (B, H, N, C, 1)
  q_in, k_out, carry = _state_terms(c)
  strict = c.pair & ~jnp.eye(chunk_size, dtype=bool)
  a_kk = beta_c * head_scores(c.k, c.k, c.g, strict)
  inverse = unit_lower_inverse(a_kk)
  k_in = _decay_by(c.k, c.cum, c.alive)
  w = jnp.einsum("...ij,...jk->...ik", inverse, beta_c * k_in)
  u = jnp.einsum("...ij,...jv->...iv", inverse, beta_c * c.v)

  def step(state, xs):
    carry_n, w_n, u_n, k_n = xs
    delta = u_n - jnp.einsum("bhck,bhkv->bhcv", w_n, state)
    new = (state if carry_n is None else carry_n * state) + jnp.einsum("bhck,bhcv->bhkv", k_n, delta)
    return new, (state, delta)

  final, (states, delta) = _scan_chunks(step, _initial(initial_state, q, v), (carry, w, u, k_out))
  scores = head_scores(c.q, c.k, c.g, c.pair)
  o = jnp.einsum("bhnck,bhnkv->bhncv", q_in, states) + jnp.einsum("bhnij,bhnjv->bhniv", scores, delta)
  return from_chunks(scale * o, q.shape[1]).astype(q.dtype), final
