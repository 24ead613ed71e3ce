"""Pallas TPU (Mosaic) kernels for the chunked gated delta rule (Gated DeltaNet arXiv 2412.06464 §3.3, eq. 10;
WY/UT form of DeltaNet arXiv 2406.06484 §3.2), forward and backward under ``jax.custom_vjp``.

Per chunk of ``C`` steps with inclusive cumulative log gate ``G`` (a column, non-increasing) and the state
entering the chunk ``S`` ``(K, V)`` (kept transposed, ``St`` ``(V, K)``, as in :mod:`.tpu`):

    D_ij = exp(G_i - G_j) for j <= i in the same segment, else 0       (masked before exp: exponents <= 0)
    A    = strict_lower(beta * (k k^T) * D),   T = (I + A)^-1           (unit lower triangular, in-kernel)
    W    = T (beta * exp(G) * k),   U = T (beta * v),   delta = U - W S
    o    = scale * [ (q * exp(G)) S + ((q k^T) * D) delta ]
    S'   = exp(G_C) S + (k * exp(G_C - G))^T delta

(``exp(G)`` is zeroed after a segment start, ``exp(G_C - G_j)`` for keys before the chunk's last segment
start). ``T`` comes from forward substitution on the 16x16 diagonal blocks, run on all blocks at once as the
fixed-point iteration ``T <- I - A_diag T`` (row ``i`` is final after ``i`` steps), then the off-diagonal
blocks from ``(I + A)^-1 = (I + N)^-1 T_diag`` with ``N = T_diag A_off`` nilpotent, expanded as the product
``(I - N)(I + N^2)(I + N^4)...`` (linear_attention.md §4.6). All math is float32 at HIGHEST precision.

Three TPU kernels on grid ``(B, H, num_chunks)`` (the chunk axis "arbitrary", state in VMEM scratch; the
grid, BlockSpecs and compiler params of :mod:`.tpu`): the forward, a pass recomputing the state entering
every chunk, and the backward running the chunks in reverse while carrying the state cotangent. Gradients
are with respect to ``G``; the within-chunk cumsum is differentiated by JAX outside the kernels. The chunk
functions (``forward_chunk``, ``state_chunk``, ``backward_chunk``: 2-D refs, a chunk at row ``base``, only
static-shape dots, masked reductions and elementwise ops) and ``chunked_delta_rule`` (layout, padding,
``custom_vjp``) are shared with the Triton kernels of :mod:`._pallas_delta_triton`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.linear_attention import _pallas_wrap, tpu
from pallas_kernels.linear_attention._pallas_chunk import SUB, mm, mm_nt, mm_tn, row, transpose_col
from pallas_kernels.linear_attention._pallas_wrap import SUPPORTED_CHUNKS


def _iota(shape, dim):
  """int32 indices along ``dim`` of an array of ``shape``."""
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _column_sums(x_CC):
  """``sum_i x[i, j]`` as a ``(C, 1)`` column (masked reductions: no transpose)."""
  c = x_CC.shape[0]
  sums_1C = jnp.sum(x_CC, axis=0, keepdims=True)
  return jnp.sum(jnp.where(_iota((c, c), 0) == _iota((c, c), 1), sums_1C, 0.0), axis=1, keepdims=True)


def unit_lower_inverse(a_CC):
  """``(I + a)^-1`` for strictly lower-triangular ``a`` (module docstring), exact up to rounding."""
  c = a_CC.shape[0]
  i, j = _iota((c, c), 0), _iota((c, c), 1)
  eye = (i == j).astype(jnp.float32)
  blk = min(SUB, c)
  same_block = functools.reduce(
      jnp.logical_or, [(i >= s) & (i < s + blk) & (j >= s) & (j < s + blk) for s in range(0, c, blk)])
  a_diag = jnp.where(same_block, a_CC, 0.0)
  t = jax.lax.fori_loop(0, blk - 1, lambda _, t: eye - mm(a_diag, t), eye)
  p = -mm(t, jnp.where(same_block, 0.0, a_CC))
  span = 1
  while span < c // blk:
    t = t + mm(p, t)
    span *= 2
    if span < c // blk:
      p = mm(p, p)
  return t


class _Chunk:
  """One chunk's inputs (float32) and the WY/UT quantities of the module docstring.

  Attributes:
    q, k ``(C, K)``, v ``(C, V)``, b (beta), g (cumulative log gate), seg ``(C, 1)``;
    d ``(C, C)`` decay mask D; kk ``k k^T``; strict (i > j); t ``(I + A)^-1``;
    e_g ``(C, 1)`` exp(G) (0 after a segment start); r ``(C, 1)`` exp(G_C - G) (0 before the last start);
    carry ``(1, 1)`` exp(G_C) (0 when the chunk starts a new segment); w ``(C, K)``, u ``(C, V)``.
  """

  def __init__(self, refs, base, chunk: int):
    self.rows = pl.ds(base, chunk)
    f32 = lambda ref: ref[self.rows, :].astype(jnp.float32)
    self.q, self.k, self.v, self.b, self.g, self.seg = map(f32, refs)
    i, j = _iota((chunk, chunk), 0), _iota((chunk, chunk), 1)
    causal = (i >= j) & (self.seg == transpose_col(self.seg))
    self.strict = i > j
    self.d = jnp.exp(jnp.where(causal, self.g - transpose_col(self.g), -jnp.inf))
    self.kk = mm_nt(self.k, self.k)
    self.t = unit_lower_inverse(jnp.where(self.strict, self.b * self.kk * self.d, 0.0))
    seg_last, g_last = row(self.seg, chunk - 1), row(self.g, chunk - 1)
    self.e_g = jnp.exp(jnp.where(self.seg == 0.0, self.g, -jnp.inf))
    self.r = jnp.exp(jnp.where(self.seg == seg_last, g_last - self.g, -jnp.inf))
    self.carry = jnp.exp(jnp.where(seg_last == 0.0, g_last, -jnp.inf))
    self.w = mm(self.t, self.b * self.e_g * self.k)
    self.u = mm(self.t, self.b * self.v)

  def delta(self, st_VK):
    return self.u - mm_nt(self.w, st_VK)

  def next_state(self, st_VK, delta_CV):
    return self.carry * st_VK + mm_tn(delta_CV, self.k * self.r)


def forward_chunk(refs, o_ref, base, st_VK, *, scale: float, chunk: int):
  """Writes ``o`` for the chunk at row ``base`` of ``refs`` ``(q, k, v, beta, G, seg)``; returns the next state."""
  ch = _Chunk(refs, base, chunk)
  delta = ch.delta(st_VK)
  scores = mm_nt(ch.q, ch.k) * ch.d
  o = mm_nt(ch.q * ch.e_g, st_VK) + mm(scores, delta)
  o_ref[ch.rows, :] = (scale * o).astype(o_ref.dtype)
  return ch.next_state(st_VK, delta)


def state_chunk(refs, base, st_VK, *, chunk: int):
  """The state after the chunk at ``base`` (the backward's recomputation pass)."""
  ch = _Chunk(refs, base, chunk)
  return ch.next_state(st_VK, ch.delta(st_VK))


def backward_chunk(refs, do_ref, grad_refs, base, st_VK, dst_VK, *, scale: float, chunk: int):
  """Writes ``(dq, dk, dv, dbeta, dG)`` of the chunk at ``base`` given the state entering it and the cotangent
  of the state leaving it (both transposed); returns the cotangent of the state entering it."""
  ch = _Chunk(refs, base, chunk)
  do = scale * do_ref[ch.rows, :].astype(jnp.float32)
  delta = ch.delta(st_VK)
  qk = mm_nt(ch.q, ch.k)
  kr = ch.k * ch.r
  # o = (q e_g) S + (qk D) delta;  S' = carry S + kr^T delta
  dqe = mm(do, st_VK)
  d_scores = mm_nt(do, delta)
  d_delta = mm_tn(qk * ch.d, do) + mm_nt(kr, dst_VK)
  dkr = mm(delta, dst_VK)
  d_carry = jnp.sum(jnp.sum(st_VK * dst_VK, axis=1, keepdims=True), axis=0, keepdims=True)
  # delta = U - W S;  W = T (b e_g k), U = T (b v);  A = strict(b kk D), dA = -(dX_w W^T + dX_u U^T)
  dx_w = -mm_tn(ch.t, mm(d_delta, st_VK))
  dx_u = mm_tn(ch.t, d_delta)
  d_a = -jnp.where(ch.strict, mm_nt(dx_w, ch.w) + mm_nt(dx_u, ch.u), 0.0)
  dst_in = (ch.carry * dst_VK + mm_tn(do, ch.q * ch.e_g) - mm_tn(d_delta, ch.w))
  d_qk = d_scores * ch.d
  d_kk = d_a * ch.b * ch.d
  dq = dqe * ch.e_g + mm(d_qk, ch.k)
  dk = (mm_tn(d_qk, ch.q) + mm(d_kk, ch.k) + mm_tn(d_kk, ch.k) + ch.b * ch.e_g * dx_w + ch.r * dkr)
  dv = ch.b * dx_u
  rowsum = lambda x: jnp.sum(x, axis=1, keepdims=True)
  db = rowsum(ch.e_g * ch.k * dx_w) + rowsum(ch.v * dx_u) + rowsum(d_a * ch.kk * ch.d)
  d_decay = (d_scores * qk + d_a * ch.b * ch.kk) * ch.d  # d/dG_i - d/dG_j of D_ij
  dr = rowsum(ch.k * dkr) * ch.r
  d_e_g = (rowsum(ch.q * dqe) + rowsum(ch.b * ch.k * dx_w)) * ch.e_g
  d_g_last = jnp.sum(dr, axis=0, keepdims=True) + d_carry * ch.carry
  c = ch.q.shape[0]
  dg = (rowsum(d_decay) - _column_sums(d_decay) + d_e_g - dr
        + jnp.where(_iota((c, 1), 0) == c - 1, d_g_last, 0.0))
  for ref, x in zip(grad_refs, (dq, dk, dv, db, dg)):
    ref[ch.rows, :] = x
  return dst_in


def _forward(q, k, v, b, g, seg, s0, *, scale, chunk):
  rows, seg_spec, state, _, _ = tpu._specs(q, v, chunk)

  def kernel(q_ref, k_ref, v_ref, b_ref, g_ref, seg_ref, s0_ref, o_ref, s_ref, st_scratch):
    refs = (q_ref, k_ref, v_ref, b_ref, g_ref, seg_ref)
    tpu._carry(st_scratch, s0_ref, lambda st: forward_chunk(refs, o_ref, 0, st, scale=scale, chunk=chunk), s_ref)

  in_specs = [rows(q.shape[-1])] * 2 + [rows(v.shape[-1]), rows(1), rows(1), seg_spec, state]
  return tpu._call(kernel, q, v, chunk, in_specs, [rows(v.shape[-1]), state],
                   [jax.ShapeDtypeStruct(v.shape, q.dtype), jax.ShapeDtypeStruct(s0.shape, jnp.float32)],
                   "delta_rule_fwd_tpu")(q, k, v, b, g, seg, s0)


def _states(q, k, v, b, g, seg, s0, *, chunk):
  rows, seg_spec, state, per_chunk_state, _ = tpu._specs(q, v, chunk)
  batch, heads, seq, _ = q.shape

  def kernel(q_ref, k_ref, v_ref, b_ref, g_ref, seg_ref, s0_ref, h_ref, st_scratch):
    def update(st):
      h_ref[...] = st
      return state_chunk((q_ref, k_ref, v_ref, b_ref, g_ref, seg_ref), 0, st, chunk=chunk)

    tpu._carry(st_scratch, s0_ref, update)

  in_specs = [rows(q.shape[-1])] * 2 + [rows(v.shape[-1]), rows(1), rows(1), seg_spec, state]
  return tpu._call(kernel, q, v, chunk, in_specs, per_chunk_state,
                   jax.ShapeDtypeStruct((batch, heads, seq // chunk) + s0.shape[2:], jnp.float32),
                   "delta_rule_states_tpu")(q, k, v, b, g, seg, s0)


def _backward(q, k, v, b, g, seg, h, do, ds, *, scale, chunk):
  rows, seg_spec, state, per_chunk_state, _ = tpu._specs(q, v, chunk, reverse=True)
  key_dim, value_dim = q.shape[-1], v.shape[-1]

  def kernel(q_ref, k_ref, v_ref, b_ref, g_ref, seg_ref, h_ref, do_ref, ds_ref,
             dq_ref, dk_ref, dv_ref, db_ref, dg_ref, ds0_ref, dst_scratch):
    refs = (q_ref, k_ref, v_ref, b_ref, g_ref, seg_ref)
    grads = (dq_ref, dk_ref, dv_ref, db_ref, dg_ref)
    tpu._carry(dst_scratch, ds_ref, lambda dst: backward_chunk(refs, do_ref, grads, 0, h_ref[...], dst,
                                                               scale=scale, chunk=chunk), ds0_ref)

  f32 = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)
  in_specs = [rows(key_dim)] * 2 + [rows(value_dim), rows(1), rows(1), seg_spec, per_chunk_state,
                                    rows(value_dim), state]
  out_specs = [rows(key_dim), rows(key_dim), rows(value_dim), rows(1), rows(1), state]
  return tpu._call(kernel, q, v, chunk, in_specs, out_specs, [f32(q), f32(k), f32(v), f32(b), f32(g), f32(ds)],
                   "delta_rule_bwd_tpu")(q, k, v, b, g, seg, h, do, ds)


_TPU = _pallas_wrap.Kernels("pallas_tpu", _forward, _states, _backward, pad_pow2=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked(kernels: _pallas_wrap.Kernels, scale: float, chunk: int, q, k, v, b, g, seg, s0):
  return kernels.forward(q, k, v, b, g, seg, s0, scale=scale, chunk=chunk)


def _chunked_fwd(kernels, scale, chunk, q, k, v, b, g, seg, s0):
  return kernels.forward(q, k, v, b, g, seg, s0, scale=scale, chunk=chunk), (q, k, v, b, g, seg, s0)


def _chunked_bwd(kernels, scale, chunk, residuals, cotangents):
  q, k, v, b, g, seg, s0 = residuals
  do, ds = cotangents
  h = kernels.states(q, k, v, b, g, seg, s0, chunk=chunk)
  dq, dk, dv, db, dg, ds0 = kernels.backward(q, k, v, b, g, seg, h, do.astype(q.dtype), ds.astype(jnp.float32),
                                             scale=scale, chunk=chunk)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), db, dg, jnp.zeros_like(seg), ds0


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_delta_rule(kernels: _pallas_wrap.Kernels, q, k, v, beta, log_decay, *, scale, initial_state,
                       return_final_state, segment_ids, chunk_size):
  """Canonical-argument entry point for one backend's kernels (their callables take ``beta`` after ``v``);
  returns ``(o, final_state)``."""
  del return_final_state  # the final state is always computed
  if chunk_size not in SUPPORTED_CHUNKS:
    raise NotImplementedError(f"{kernels.name}: delta_rule chunk_size={chunk_size} is unsupported; supported: "
                              f"{SUPPORTED_CHUNKS}")
  batch, seq, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  num_chunks = -(-seq // chunk_size)
  padded = num_chunks * chunk_size
  kp, vp = (_pallas_wrap._pow2(key_dim), _pallas_wrap._pow2(value_dim)) if kernels.pad_pow2 else (key_dim, value_dim)

  def to_kernel(x_BTHD, dim=None):
    pad = 0 if dim is None else dim - x_BTHD.shape[-1]
    return jnp.pad(jnp.swapaxes(x_BTHD, 1, 2), ((0, 0), (0, 0), (0, padded - seq), (0, pad)))

  beta_BHT1 = to_kernel(beta.astype(jnp.float32)[..., None])
  if log_decay is None:
    g_BHT1 = jnp.zeros((batch, heads, padded, 1), jnp.float32)
  else:
    g = to_kernel(log_decay.astype(jnp.float32)[..., None]).reshape(batch, heads, num_chunks, chunk_size, 1)
    g_BHT1 = jnp.cumsum(g, axis=3).reshape(batch, heads, padded, 1)
  if segment_ids is None:
    seg_BT1 = jnp.zeros((batch, padded, 1), jnp.float32)
  else:  # per step: segment starts seen so far inside its chunk
    starts = jnp.concatenate([jnp.zeros((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    starts = jnp.pad(starts, ((0, 0), (0, padded - seq))).reshape(batch, num_chunks, chunk_size)
    seg_BT1 = jnp.cumsum(starts.astype(jnp.float32), axis=2).reshape(batch, padded, 1)
  if initial_state is None:
    s0_BHVK = jnp.zeros((batch, heads, vp, kp), jnp.float32)
  else:
    s0_BHVK = jnp.pad(jnp.swapaxes(initial_state.astype(jnp.float32), 2, 3),
                      ((0, 0), (0, 0), (0, vp - value_dim), (0, kp - key_dim)))
  o_BHTV, s_BHVK = _chunked(kernels, float(scale), chunk_size, to_kernel(q, kp), to_kernel(k, kp),
                            to_kernel(v, vp), beta_BHT1, g_BHT1, seg_BT1, s0_BHVK)
  o_BTHV = jnp.swapaxes(o_BHTV[:, :, :seq, :value_dim], 1, 2)
  return o_BTHV.astype(q.dtype), jnp.swapaxes(s_BHVK[:, :, :value_dim, :key_dim], 2, 3)


def delta_rule(q, k, v, beta, log_decay, **kwargs):
  """Canonical ``delta_rule`` implementation on TPU (see ``pallas_kernels.linear_attention``)."""
  return chunked_delta_rule(_TPU, q, k, v, beta, log_decay, **kwargs)
