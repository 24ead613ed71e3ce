"""Chunk math of the gated delta rule, shared by every chunked backend (``xla``, ``pallas_tpu``,
``pallas_triton``): the WY/UT chunkwise form (DeltaNet arXiv 2406.06484 §3.2; Gated DeltaNet arXiv 2412.06464
§3.3, eq. 10) and its backward (the structure of flash-linear-attention's ``chunk_gated_delta_rule_bwd``).

One head, one chunk of ``C`` steps: ``q``, ``k`` ``(C, K)``, ``v`` ``(C, V)``, ``beta`` ``(C, 1)``, ``G`` ``(C, 1)``
the inclusive within-chunk cumulative log decay (``None``: no decay), ``S`` ``(V, K)`` the state entering the
chunk (value-major, as in :mod:`._gla_math`):

    D_ij = exp(G_i - G_j) for j <= i, else 0                (masked before exp: every exponent <= 0)
    A    = strict_lower(beta * (k k^T) * D),   T = (I + A)^-1       (:func:`unit_lower_inverse`)
    w    = T (beta * exp(G) * k),   u = T (beta * v)                 ("prepare", parallel over chunks)
    delta = u - w S^T,   S' = exp(G_C) * S + delta^T (k * exp(G_C - G))        (the state pass)
    o    = scale * [ (q * exp(G)) S^T + ((q k^T) * D) delta ]

Backward (``do`` scaled, ``dS'`` the cotangent of ``S'``): the reverse state pass carries
``d delta = ((q k^T) * D)^T do + (k * exp(G_C - G)) dS'^T`` and ``dS = exp(G_C) dS' + do^T (q * exp(G)) -
d delta^T w``; the parallel pass differentiates ``delta = u - w S^T`` through ``w``, ``u`` and ``T``
(``dA = -(T^T dU u^T + T^T dW w^T)``, strictly lower) down to q, k, v, beta and ``G``.
"""

from __future__ import annotations

import typing

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.linear_attention import _gla_math
from pallas_kernels.linear_attention._tiles import (as_col, causal_mask, col_sum, iota, last_row_mask, mm, mm_nt,
                                                    mm_tn, row_dot, row_sum, sym_mm, wide)

_F32 = jnp.float32


def unit_lower_inverse(a, *, blocked: bool = True):
  """``(I + a)^-1`` for strictly lower-triangular ``a`` ``(..., C, C)``, by recursive block doubling.

  With ``T_s`` the inverse restricted to the diagonal blocks of size ``s`` (``T_1 = I``) and ``M_s`` the entries
  of ``a`` in the lower-left quadrant of each diagonal block of size ``2s``, ``T_2s = T_s - T_s M_s T_s``
  (``[[P, 0], [B, R]]^-1 = [[P^-1, 0], [-R^-1 B P^-1, R^-1]]``): forward substitution's rounding, dots only,
  ``log2 C`` levels — the recursive form of the block formulas flash-linear-attention assembles from 16 x 16
  blocks. ``blocked=True`` (batched arrays, any ``C``, padded to a power of two) multiplies only the blocks
  involved (``O(C^3 / 3)`` work in reshaped batched matmuls, which XLA CPU runs as dense GEMMs);
  ``blocked=False`` (inside kernels: no reshapes; ``C`` a power of two) uses masked full-size dots.
  """
  size = a.shape[-1]
  if not blocked:
    i, j = iota((size, size), 0), iota((size, size), 1)
    inverse = (i == j).astype(_F32)
    half, level = 1, 0  # i >> level: the block of size ``half`` holding row i (shifts: Mosaic has no int div)
    while half < size:
      quadrant = (((i >> (level + 1)) == (j >> (level + 1))) & (((i >> level) & 1) == 1)
                  & (((j >> level) & 1) == 0))
      inverse = inverse - mm(inverse, mm(jnp.where(quadrant, a, 0.0), inverse, _F32), _F32)
      half, level = 2 * half, level + 1
    return inverse
  full = 1 << max(size - 1, 0).bit_length()
  lead = a.shape[:-2]
  a = jnp.pad(a, [(0, 0)] * len(lead) + [(0, full - size)] * 2)
  inverse = jnp.ones((*lead, full, 1, 1), a.dtype)  # (..., blocks, s, s): inverses of the diagonal blocks
  half = 1
  while half < full:
    pairs = full // (2 * half)
    lower = a.reshape(*lead, pairs, 2, half, pairs, 2, half)
    lower = jnp.moveaxis(jnp.diagonal(lower[..., 1, :, :, 0, :], axis1=-4, axis2=-2), -1, -3)  # (.., pairs, s, s)
    first, second = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
    off = -mm(second, mm(lower, first, _F32), _F32)
    top = jnp.concatenate([first, jnp.zeros_like(first)], axis=-1)
    inverse = jnp.concatenate([top, jnp.concatenate([off, second], axis=-1)], axis=-2)
    half *= 2
  return inverse[..., 0, :size, :size]


def decay_matrix(G, chunk: int):
  """``D`` ``(C, C)`` (module docstring); the causal 0/1 mask without decay."""
  if G is None:
    return causal_mask(chunk).astype(_F32)
  return _gla_math.head_decay(G)


class Factors(typing.NamedTuple):
  """The WY/UT factors of one chunk (or a batch of chunks): ``w`` ``(C, K)``, ``u`` ``(C, V)``, ``t`` = ``T``
  ``(C, C)`` and ``keys`` = ``(k k^T) * D`` ``(C, C)``, which the backward reuses."""
  w: typing.Any
  u: typing.Any
  t: typing.Any
  keys: typing.Any


def prepare(k, v, beta, G, dtype, *, blocked: bool = True) -> Factors:
  """The :class:`Factors` of one chunk (or a batch of chunks); ``blocked`` as in :func:`unit_lower_inverse`."""
  chunk = k.shape[-2]
  beta = beta.astype(_F32)
  keys = mm_nt(k, k, dtype) * decay_matrix(G, chunk)
  t = unit_lower_inverse(jnp.where(causal_mask(chunk, strict=True), beta * keys, 0.0), blocked=blocked)
  w = mm(t, _gla_math.decayed(beta * k.astype(_F32), G), wide(dtype))
  u = mm(t, beta * v.astype(_F32), wide(dtype))
  return Factors(w, u, t, keys)


def state_step(w, u, k_end, carry, state_VK, dtype):
  """One chunk of the state pass: ``(delta, S')`` from ``S`` (``k_end = k * exp(G_C - G)``, ``carry = exp(G_C)``)."""
  delta = u - mm_nt(w, state_VK, wide(dtype))  # cancels: not in 16 bits
  return delta, _gla_math.advance(state_VK, carry, mm_tn(delta, k_end, dtype))


def output(q, k, G, delta, state_VK, dtype):
  """``(q * exp(G)) S^T + ((q k^T) * D) delta`` (unscaled)."""
  scores = mm_nt(q, k, dtype) * decay_matrix(G, q.shape[-2])
  return _gla_math.inter_output(q, G, state_VK, dtype) + mm(scores, delta, dtype)


def state_grad_inputs(q, k, G, do, dtype):
  """The parts of the reverse state pass that do not depend on the state: ``(scores, scores^T do,
  do^T (q * exp(G)))`` with ``scores = (q k^T) * D`` (``do`` scaled)."""
  scores = mm_nt(q, k, dtype) * decay_matrix(G, q.shape[-2])
  return scores, mm_tn(scores, do, wide(dtype)), _gla_math.state_grad_write(q, G, do, dtype)


def state_grad_step(d_delta_intra, dstate_write, k_end, w, carry, dstate_VK, dtype):
  """One chunk of the reverse state pass: ``(d delta, dS)`` from ``dS'``."""
  d_delta = d_delta_intra + mm_nt(k_end, dstate_VK, dtype)
  return d_delta, _gla_math.advance(dstate_VK, carry, dstate_write) - mm_tn(d_delta, w, wide(dtype))


def grads(q, k, v, beta, G, G_last, state_VK, delta, d_delta, dstate_VK, do, dtype, *, blocked: bool = True,
          factors: Factors | None = None, scores=None):
  """``(dq, dk, dv, dbeta, dG)`` of one chunk (per query head; ``dG`` None without decay).

  ``state_VK``: the state entering the chunk; ``delta``/``d delta``: from the state passes; ``dstate_VK``: the
  cotangent of the state leaving it; ``do`` scaled; ``factors`` (:func:`prepare`) and ``scores``
  (``(q k^T) * D``, :func:`state_grad_inputs`) when the caller has them (else recomputed).
  """
  chunk = q.shape[-2]
  q32, k32, v32, beta = (x.astype(_F32) for x in (q, k, v, beta))
  D = decay_matrix(G, chunk)
  w_dtype = wide(dtype)
  w, u, t, keys = prepare(k, v, beta, G, dtype, blocked=blocked) if factors is None else factors
  if scores is None:
    scores = mm_nt(q, k, dtype) * D
  strict = causal_mask(chunk, strict=True)
  # o = (q e^G) S^T + (qk D) delta;  S' = carry S + delta^T k_end
  dq_state = mm(do, state_VK, dtype)
  d_qk = mm_nt(do, delta, w_dtype)  # cotangent of (q k^T) * D
  d_scores = d_qk * D  # cotangent of q k^T
  dk_end = mm(delta, dstate_VK, w_dtype)
  # delta = u - w S^T;  w = T X_w, u = T X_u;  A = strict(beta kk D)
  dx_w = -mm_tn(t, mm(d_delta, state_VK, w_dtype), _F32)
  dx_u = mm_tn(t, d_delta, _F32)
  dA = -jnp.where(strict, mm_nt(dx_w, w, _F32) + mm_nt(dx_u, u, _F32), 0.0)
  d_kk = dA * beta * D
  dq = _gla_math.decayed(dq_state, G) + mm(d_scores, k, w_dtype)
  dk = (mm_tn(d_scores, q, w_dtype) + sym_mm(d_kk, k, w_dtype) + _gla_math.decayed(beta, G) * dx_w
        + _gla_math.key_to_end(dk_end, G, G_last))
  dv = beta * dx_u
  dbeta = row_dot(_gla_math.decayed(k32, G), dx_w) + row_dot(v32, dx_u) + row_dot(dA, keys)
  if G is None:
    return dq, dk, dv, dbeta, None
  d_pairs = d_qk * scores + dA * beta * keys  # d/dG_i - d/dG_j of D_ij
  to_end = _gla_math.key_to_end(row_dot(k32, dk_end), G, G_last)
  d_carry = jnp.exp(G_last) * col_sum(row_dot(state_VK, dstate_VK))
  d_start = jnp.exp(G) * (row_dot(q32, dq_state) + beta * row_dot(k32, dx_w))
  d_last = jnp.sum(to_end, axis=-2, keepdims=True) + d_carry
  dG = (row_sum(d_pairs) - as_col(col_sum(d_pairs)) + d_start - to_end
        + jnp.where(last_row_mask(chunk), d_last, 0.0))
  return dq, dk, dv, dbeta, dG


# ---- inside a kernel: one chunk (or a V tile of it) in refs --------------------------------------------------


def _chunk(refs, base, chunk: int):
  """Loads the rows of the chunk at ``base`` from each ref (None stays None)."""
  return [None if ref is None else ref[pl.ds(base, chunk), :] for ref in refs]


def _last_row(G_ref, base, chunk: int):
  return None if G_ref is None else G_ref[pl.ds(base + chunk - 1, 1), :]


def kernel_prepare(k_ref, v_ref, beta_ref, G_ref, w_ref, u_ref, *, chunk: int, dtype):
  """Writes ``w``, ``u`` of one chunk (the in-kernel masked-dot inverse)."""
  k, v, beta, G = _chunk((k_ref, v_ref, beta_ref, G_ref), 0, chunk)
  w, u, _, _ = prepare(k, v, beta, G, dtype, blocked=False)
  w_ref[...], u_ref[...] = w.astype(w_ref.dtype), u.astype(u_ref.dtype)


def kernel_state_step(w_ref, u_ref, k_ref, G_ref, delta_ref, base, chunk: int, state_VK, dtype):
  """The states pass over the chunk at row ``base`` (``u``, ``delta`` and the state may be V tiles): writes its
  ``delta`` rows, returns the state after it."""
  w, u, k, G = _chunk((w_ref, u_ref, k_ref, G_ref), base, chunk)
  G_last = _last_row(G_ref, base, chunk)
  delta, new = state_step(w, u, _gla_math.key_to_end(k, G, G_last), _gla_math.carry(G_last), state_VK, dtype)
  delta_ref[pl.ds(base, chunk), :] = delta.astype(delta_ref.dtype)
  return new


def kernel_output(q_ref, k_ref, G_ref, delta_ref, state_VK, o_ref, *, chunk: int, scale: float, dtype):
  """Writes ``o`` of one chunk (``delta``, ``o`` and the state may be V tiles)."""
  q, k, G, delta = _chunk((q_ref, k_ref, G_ref, delta_ref), 0, chunk)
  o_ref[...] = (scale * output(q, k, G, delta, state_VK, dtype)).astype(o_ref.dtype)


def kernel_state_grad_step(q_ref, k_ref, w_ref, G_ref, do_ref, d_delta_ref, base, chunk: int, dstate_VK,
                           scale: float, dtype):
  """The reverse state pass over the chunk at row ``base`` (``do``, ``d delta`` and the state cotangent may be
  V tiles): writes its ``d delta`` rows, returns the cotangent of the state entering it."""
  q, k, w, G, do = _chunk((q_ref, k_ref, w_ref, G_ref, do_ref), base, chunk)
  G_last = _last_row(G_ref, base, chunk)
  _, d_delta_intra, write = state_grad_inputs(q, k, G, scale * do.astype(_F32), dtype)
  d_delta, dstate = state_grad_step(d_delta_intra, write, _gla_math.key_to_end(k, G, G_last),
                                    w, _gla_math.carry(G_last), dstate_VK, dtype)
  d_delta_ref[pl.ds(base, chunk), :] = d_delta.astype(d_delta_ref.dtype)
  return dstate


def kernel_grads(q_ref, k_ref, v_ref, beta_ref, G_ref, state_VK, delta_ref, d_delta_ref, dstate_VK, do_ref,
                 grad_refs, *, chunk: int, scale: float, dtype):
  """Writes ``(dq, dk, dv, dbeta[, dG])`` of one chunk (whole K and V)."""
  q, k, v, beta, G, delta, d_delta, do = _chunk((q_ref, k_ref, v_ref, beta_ref, G_ref, delta_ref, d_delta_ref,
                                                 do_ref), 0, chunk)
  grads_ = grads(q, k, v, beta, G, _last_row(G_ref, 0, chunk), state_VK, delta, d_delta, dstate_VK,
                 scale * do.astype(_F32), dtype, blocked=False)
  for ref, x in zip(grad_refs, grads_):
    if x is not None:
      ref[...] = x.astype(ref.dtype)
