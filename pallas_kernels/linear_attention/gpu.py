"""Pallas Triton (GPU) kernels for chunked gated linear attention (GLA arXiv 2312.06635 §4, eqs. 5-6).

Grid ``(B, H)``: each program owns one sequence of one head and walks its chunks with ``lax.fori_loop``,
carrying the (transposed) ``(V, K)`` float32 state in registers (Triton programs cannot share state across
the grid). K and V are padded to powers of two (>= 16, for ``tl.dot``) and T to a multiple of the chunk by
the shared wrapper. Three kernels, as on TPU: forward, state recomputation for the backward, and the backward
(chunks in reverse). ``triton.CompilerParams`` is passed explicitly: without it the GPU lowering picks
Mosaic GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import dispatch
from pallas_kernels.linear_attention import _pallas_chunk as chunk_math
from pallas_kernels.linear_attention import _pallas_wrap

_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=1)


def _whole(x):
  """BlockSpec of one (batch, head)'s whole slab of a ``(B, H, ...)`` array."""
  return pl.BlockSpec((None, None) + x.shape[2:], lambda b, h: (b, h) + (0,) * (x.ndim - 2))


def _seg_spec(seg):
  return pl.BlockSpec((None,) + seg.shape[1:], lambda b, h: (b, 0, 0))


def _call(kernel, args, outs, name):
  batch, heads = args[0].shape[:2]
  return pl.pallas_call(
      kernel, out_shape=outs, grid=(batch, heads),
      in_specs=[_seg_spec(x) if x.ndim == 3 else _whole(x) for x in args],
      out_specs=[_whole(o) for o in outs], compiler_params=_PARAMS, interpret=dispatch.interpret_mode(),
      name=name)(*args)


def _loop(num_chunks, chunk, body, init, *, reverse=False):
  """fori_loop over chunks; ``body(n, base, carry)`` with ``base`` the chunk's first row."""
  def step(i, carry):
    n = num_chunks - 1 - i if reverse else i
    return body(n, pl.multiple_of(n * chunk, chunk), carry)
  return jax.lax.fori_loop(0, num_chunks, step, init)


def _forward(q, k, v, g, seg, s0, *, scale, chunk):
  num_chunks = q.shape[2] // chunk

  def kernel(q_ref, k_ref, v_ref, g_ref, seg_ref, s0_ref, o_ref, s_ref):
    refs = chunk_math.ChunkRefs(q_ref, k_ref, v_ref, g_ref, seg_ref)
    s_ref[...] = _loop(num_chunks, chunk, lambda n, base, st: chunk_math.forward_chunk(
        refs, o_ref, base, st, scale=scale, chunk=chunk), s0_ref[...])

  outs = [jax.ShapeDtypeStruct(v.shape, q.dtype), jax.ShapeDtypeStruct(s0.shape, jnp.float32)]
  return _call(kernel, (q, k, v, g, seg, s0), outs, "linear_attention_fwd_triton")


def _states(q, k, v, g, seg, s0, *, chunk):
  batch, heads, seq, _ = q.shape
  num_chunks = seq // chunk

  def kernel(q_ref, k_ref, v_ref, g_ref, seg_ref, s0_ref, h_ref):
    refs = chunk_math.ChunkRefs(q_ref, k_ref, v_ref, g_ref, seg_ref)

    def body(n, base, st):
      h_ref[n] = st
      return chunk_math.state_chunk(refs, base, st, chunk=chunk)

    _loop(num_chunks, chunk, body, s0_ref[...])

  outs = [jax.ShapeDtypeStruct((batch, heads, num_chunks) + s0.shape[2:], jnp.float32)]
  return _call(kernel, (q, k, v, g, seg, s0), outs, "linear_attention_states_triton")[0]


def _backward(q, k, v, g, seg, h, do, ds, *, scale, chunk):
  num_chunks = q.shape[2] // chunk

  def kernel(q_ref, k_ref, v_ref, g_ref, seg_ref, h_ref, do_ref, ds_ref, dq_ref, dk_ref, dv_ref, dg_ref,
             ds0_ref):
    refs = chunk_math.ChunkRefs(q_ref, k_ref, v_ref, g_ref, seg_ref)
    ds0_ref[...] = _loop(num_chunks, chunk, lambda n, base, dst: chunk_math.backward_chunk(
        refs, do_ref, (dq_ref, dk_ref, dv_ref, dg_ref), base, h_ref[n], dst, scale=scale, chunk=chunk),
        ds_ref[...], reverse=True)

  f32 = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)
  return _call(kernel, (q, k, v, g, seg, h, do, ds), [f32(q), f32(k), f32(v), f32(g), f32(ds)],
               "linear_attention_bwd_triton")


_KERNELS = _pallas_wrap.Kernels("pallas_triton", _forward, _states, _backward, pad_pow2=True)


def linear_attention(q, k, v, log_decay, **kwargs):
  """Canonical ``linear_attention`` implementation (see ``pallas_kernels.linear_attention``)."""
  return _pallas_wrap.linear_attention(_KERNELS, q, k, v, log_decay, **kwargs)


def delta_rule(q, k, v, beta, log_decay, **kwargs):
  """Canonical ``delta_rule`` implementation: the chunked WY/UT kernels of :mod:`._pallas_delta_triton`."""
  from pallas_kernels.linear_attention import _pallas_delta_triton  # imports this module's grid helpers
  return _pallas_delta_triton.delta_rule(q, k, v, beta, log_decay, **kwargs)
