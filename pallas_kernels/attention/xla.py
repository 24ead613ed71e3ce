"""Blockwise attention in pure XLA: an online normalizer over key blocks, O(T * block) memory.

Forward (FlashAttention-2, arXiv 2307.08691 Alg. 1, generalised as in reference/attention.md §9.3): for each
key block, scores ``s = q_scale * q k^T`` (float32), the running shift ``m`` (row max, for exp-based
normalizers), ``l = e^{m_old - m} l + sum_j h(s_j)``, ``acc = e^{m_old - m} acc + g(s) v``; finally
``o = acc / Z`` with ``Z = l + offset``. Clipped softmax takes a second pass ``acc = sum_j phi(g / Z) v``.
Only the row statistics ``m`` and ``1 / Z`` are saved.

Backward (FA-2 Alg. 2, under ``jax.custom_vjp``): per key block, recompute ``p = g(s) / Z``, ``P = phi(p)``;
``dV += P^T dO``, ``dP = dO V^T``, ``dp = phi'(p) dP`` and

    dS = (g'(s) dp - h'(s) D) / Z,      D_i = sum_j p_ij dp_ij   (= rowsum(dO * O) when phi is the identity)

(a separate pass computes ``D`` when ``phi`` is not the identity), then ``dQ += (q_scale dS) K``,
``dK += (q_scale dS)^T Q`` and ``d q_scale = rowsum(dS * q k^T)``. No ``(T, S)`` array exists in either
direction. Query heads of a GQA group are stacked as extra rows of their key/value head. The key block is
``masking.BLOCK_KV`` (128; the whole key set when shorter); a last partial block is padded and masked.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.attention import masking
from pallas_kernels.attention.normalizers import Normalizer

class _Config(NamedTuple):
  normalizer: Normalizer
  causal: bool
  window: int | None
  num_keys: int
  block: int


def attention(q, k, v, *, normalizer: Normalizer, mask: masking.Mask, q_scale):
  """Same contract as :func:`pallas_kernels.attention.reference.attention`."""
  if not normalizer.blockwise:
    raise NotImplementedError(
        f"normalizer {normalizer.name!r} has no blockwise (online) form in xla; pass "
        f"implementation=\"reference\" or a sequence (\"xla\", \"reference\")")
  batch, seq, heads, dim = q.shape
  num_keys, kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[3]
  group = heads // kv_heads
  block = min(masking.BLOCK_KV, num_keys)
  padded = -(-num_keys // block) * block
  pad_keys = lambda x: jnp.pad(x, [(0, 0), (0, padded - num_keys)] + [(0, 0)] * (x.ndim - 2))
  # Rows r = g * T + t of key/value head k hold query head k * G + g at time t.
  q_BKRD = q.reshape(batch, seq, kv_heads, group, dim).transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, -1, dim)
  c_BKR = q_scale.reshape(batch, seq, kv_heads, group).transpose(0, 2, 3, 1).reshape(batch, kv_heads, -1)
  k_BKSD = pad_keys(k).transpose(0, 2, 1, 3)
  v_BKSV = pad_keys(v).transpose(0, 2, 1, 3)
  pos_BR = jnp.tile(mask.positions(seq), (1, group))
  q_seg_BR = None if mask.q_segment_ids is None else jnp.tile(mask.q_segment_ids, (1, group))
  kv_seg_BS = None if mask.kv_segment_ids is None else pad_keys(mask.kv_segment_ids)
  key_ok_BS = None if mask.key_mask is None else pad_keys(mask.key_mask)
  config = _Config(normalizer, mask.causal, mask.window, num_keys, block)
  o_BKRV = _blockwise(config, q_BKRD, k_BKSD, v_BKSV, c_BKR, pos_BR, q_seg_BR, (kv_seg_BS, key_ok_BS))
  o_BTHV = o_BKRV.reshape(batch, kv_heads, group, seq, value_dim).transpose(0, 3, 1, 2, 4)
  return o_BTHV.reshape(batch, seq, heads, value_dim).astype(q.dtype)


def _dot(spec: str, a, b):
  """einsum in the narrower of the two dtypes (bf16 matmuls stay bf16), accumulated in float32."""
  dtype = a.dtype if jnp.finfo(a.dtype).bits <= jnp.finfo(b.dtype).bits else b.dtype
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _key_blocks(config: _Config, k, v, kv_keys):
  """Scan inputs: per block ``(k (B, KV, J, D), v (B, KV, J, Dv), key index (J,), kv segment ids (B, J),
  key mask (B, J))``; ``kv_keys`` is the pair (kv segment ids, key mask), each ``(B, S)`` or None."""
  batch, kv_heads, padded, _ = k.shape
  num_blocks = padded // config.block
  split = lambda x: jnp.moveaxis(x.reshape(batch, kv_heads, num_blocks, config.block, -1), 2, 0)
  key_idx = jnp.arange(padded, dtype=jnp.int32).reshape(num_blocks, config.block)
  per_block = lambda x: None if x is None else jnp.moveaxis(x.reshape(batch, num_blocks, config.block), 1, 0)
  return (split(k), split(v), key_idx, *map(per_block, kv_keys))


def _scores(config: _Config, q, c, pos, q_seg, block):
  """``(raw q.k, s = c * raw, visible (B, 1, R, J))`` for one key block."""
  k_j, _, key_idx, kv_seg_j, key_ok_j = block
  raw = _dot("bkrd,bkjd->bkrj", q, k_j)
  vis = masking.visible(pos, key_idx, q_seg, kv_seg_j, key_ok_j, causal=config.causal, window=config.window,
                        num_keys=config.num_keys)[:, None]
  return raw, raw * c[..., None], vis


def _forward(config: _Config, q, k, v, c, pos, q_seg, kv_keys):
  """Returns ``o`` (B, KV, R, Dv) float32 and the row statistics ``m`` (shift) and ``1 / Z``."""
  norm = config.normalizer
  blocks = _key_blocks(config, k, v, kv_keys)
  rows = q.shape[:3]
  acc0 = jnp.zeros(rows + (v.shape[-1],), jnp.float32)

  def stats_body(carry, block):
    m, l, acc = carry
    _, s, vis = _scores(config, q, c, pos, q_seg, block)
    if norm.uses_max:
      m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, -jnp.inf), -1))
      alpha = jnp.exp(jnp.minimum(norm.shift(m) - norm.shift(m_new), 0.0))  # 1 while nothing is accumulated
    else:
      m_new, alpha = m, jnp.ones_like(m)
    g, h = norm.masked_terms(s, vis, norm.shift(m_new)[..., None] if norm.uses_max else 0.0)
    if norm.normalized:
      l = alpha * l + h.sum(-1)
    if not norm.has_transform:
      acc = alpha[..., None] * acc + _dot("bkrj,bkjv->bkrv", g, block[1])
    return (m_new, l, acc), None

  m0 = jnp.full(rows, norm.max_floor if norm.uses_max else 0.0, jnp.float32)
  (m, l, acc), _ = jax.lax.scan(stats_body, (m0, jnp.zeros(rows, jnp.float32), acc0), blocks)
  m = norm.shift(m) if norm.uses_max else m
  inv_z = norm.inverse_total(l, m)
  if not norm.has_transform:
    return acc * inv_z[..., None], m, inv_z

  def transform_body(acc, block):
    _, s, vis = _scores(config, q, c, pos, q_seg, block)
    g, _ = norm.masked_terms(s, vis, m[..., None])
    p = jnp.where(vis, norm.transform(g * inv_z[..., None]), 0.0)
    return acc + _dot("bkrj,bkjv->bkrv", p, block[1]), None

  acc, _ = jax.lax.scan(transform_body, acc0, blocks)
  return acc, m, inv_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(config: _Config, q, k, v, c, pos, q_seg, kv_keys):
  return _forward(config, q, k, v, c, pos, q_seg, kv_keys)[0]


def _blockwise_fwd(config, q, k, v, c, pos, q_seg, kv_keys):
  o, m, inv_z = _forward(config, q, k, v, c, pos, q_seg, kv_keys)
  return o, (q, k, v, c, pos, q_seg, kv_keys, o, m, inv_z)


def _blockwise_bwd(config, residuals, do):
  q, k, v, c, pos, q_seg, kv_keys, o, m, inv_z = residuals
  norm = config.normalizer
  blocks = _key_blocks(config, k, v, kv_keys)

  def recompute(block):
    """Per block: raw scores, visibility, P, g', h' (or None), phi'(p) (or None), dP."""
    raw, s, vis = _scores(config, q, c, pos, q_seg, block)
    g, dg, _, dh = norm.masked_terms(s, vis, m[..., None], with_grad=True)
    p = g * inv_z[..., None]
    dphi = None
    if norm.has_transform:
      p, dphi = jax.jvp(norm.transform, (p,), (jnp.ones_like(p),))
      p = jnp.where(vis, p, 0.0)
    dp = _dot("bkrv,bkjv->bkrj", do, block[1])
    return raw, g * inv_z[..., None], p, dg, dh, dphi, dp

  if norm.has_transform:
    def d_body(total, block):
      _, p_pre, _, _, _, dphi, dp = recompute(block)
      return total + jnp.sum(p_pre * dphi * dp, -1), None
    d_rows, _ = jax.lax.scan(d_body, jnp.zeros(q.shape[:3], jnp.float32), blocks)
  elif norm.normalized:
    d_rows = jnp.sum(do * o, -1)

  def grad_body(carry, block):
    dq, dc = carry
    raw, _, p, dg, dh, dphi, dp = recompute(block)
    dv_j = _dot("bkrj,bkrv->bkjv", p, do)
    if dphi is not None:
      dp = dp * dphi
    ds = dg * dp
    if norm.normalized:
      ds = (ds - dh * d_rows[..., None]) * inv_z[..., None]
    dc = dc + jnp.sum(ds * raw, -1)
    draw = ds * c[..., None]
    dq = dq + _dot("bkrj,bkjd->bkrd", draw, block[0])
    return (dq, dc), (_dot("bkrj,bkrd->bkjd", draw, q), dv_j)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(c.shape, jnp.float32))
  (dq, dc), (dk, dv) = jax.lax.scan(grad_body, init, blocks)
  merge = lambda x, like: jnp.moveaxis(x, 0, 2).reshape(like.shape).astype(like.dtype)
  return dq.astype(q.dtype), merge(dk, k), merge(dv, v), dc, None, None, (None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
