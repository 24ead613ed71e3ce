"""Pallas TPU (Mosaic) kernels for chunked gated linear attention (GLA arXiv 2312.06635 §4, eqs. 5-6).

Grid ``(B, H, num_chunks)``: batch and heads "parallel", the chunk axis last and "arbitrary", carrying the
(transposed) ``(V, K)`` float32 state in a VMEM scratch initialised under ``pl.when(chunk == 0)``. Blocks are
``(1, 1, C, K)`` over ``(B, H, T, K)`` arrays (C a multiple of 16, K and V whole), so they satisfy the (8, 128)
tiling rule for any head size. Three kernels: the forward (outputs and final state), a state pass that
recomputes the state entering every chunk for the backward, and the backward, which runs the chunks in
reverse carrying the state cotangent in VMEM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import dispatch
from pallas_kernels.linear_attention import _pallas_chunk as chunk_math
from pallas_kernels.linear_attention import _pallas_wrap

_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _specs(q, v, chunk, *, reverse=False):
  """BlockSpecs for (q, k, v, g, seg) and for a per-(b, h) state, over grid (B, H, NC)."""
  num_chunks = q.shape[2] // chunk
  at = (lambda n: num_chunks - 1 - n) if reverse else (lambda n: n)
  rows = lambda d: pl.BlockSpec((None, None, chunk, d), lambda b, h, n: (b, h, at(n), 0))
  seg = pl.BlockSpec((None, chunk, 1), lambda b, h, n: (b, at(n), 0))
  state = pl.BlockSpec((None, None, v.shape[-1], q.shape[-1]), lambda b, h, n: (b, h, 0, 0))
  per_chunk_state = pl.BlockSpec((None, None, None, v.shape[-1], q.shape[-1]),
                                 lambda b, h, n: (b, h, at(n), 0, 0))
  return rows, seg, state, per_chunk_state, at


def _call(kernel, q, v, chunk, in_specs, out_specs, out_shape, name):
  batch, heads, seq, key_dim = q.shape
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(batch, heads, seq // chunk), in_specs=in_specs,
      out_specs=out_specs, scratch_shapes=[pltpu.VMEM((v.shape[-1], key_dim), jnp.float32)],
      compiler_params=_PARAMS, interpret=dispatch.interpret_mode(), name=name)


def _carry(scratch, initial_ref, update, last_ref=None):
  """Runs ``update(state) -> new`` for this chunk with the state carried in ``scratch``."""
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    scratch[...] = initial_ref[...]

  new = update(scratch[...])
  scratch[...] = new
  if last_ref is not None:
    @pl.when(n == pl.num_programs(2) - 1)
    def _():
      last_ref[...] = new


def _forward(q, k, v, g, seg, s0, *, scale, chunk):
  rows, seg_spec, state, _, _ = _specs(q, v, chunk)

  def kernel(q_ref, k_ref, v_ref, g_ref, seg_ref, s0_ref, o_ref, s_ref, st_scratch):
    refs = chunk_math.ChunkRefs(q_ref, k_ref, v_ref, g_ref, seg_ref)
    _carry(st_scratch, s0_ref,
           lambda st: chunk_math.forward_chunk(refs, o_ref, 0, st, scale=scale, chunk=chunk), s_ref)

  return _call(kernel, q, v, chunk,
               [rows(q.shape[-1])] * 2 + [rows(v.shape[-1]), rows(q.shape[-1]), seg_spec, state],
               [rows(v.shape[-1]), state],
               [jax.ShapeDtypeStruct(v.shape, q.dtype), jax.ShapeDtypeStruct(s0.shape, jnp.float32)],
               "linear_attention_fwd_tpu")(q, k, v, g, seg, s0)


def _states(q, k, v, g, seg, s0, *, chunk):
  rows, seg_spec, state, per_chunk_state, _ = _specs(q, v, chunk)
  batch, heads, seq, _ = q.shape

  def kernel(q_ref, k_ref, v_ref, g_ref, seg_ref, s0_ref, h_ref, st_scratch):
    refs = chunk_math.ChunkRefs(q_ref, k_ref, v_ref, g_ref, seg_ref)

    def update(st):
      h_ref[...] = st
      return chunk_math.state_chunk(refs, 0, st, chunk=chunk)

    _carry(st_scratch, s0_ref, update)

  return _call(kernel, q, v, chunk,
               [rows(q.shape[-1])] * 2 + [rows(v.shape[-1]), rows(q.shape[-1]), seg_spec, state],
               per_chunk_state,
               jax.ShapeDtypeStruct((batch, heads, seq // chunk) + s0.shape[2:], jnp.float32),
               "linear_attention_states_tpu")(q, k, v, g, seg, s0)


def _backward(q, k, v, g, seg, h, do, ds, *, scale, chunk):
  rows, seg_spec, state, per_chunk_state, _ = _specs(q, v, chunk, reverse=True)
  key_dim, value_dim = q.shape[-1], v.shape[-1]

  def kernel(q_ref, k_ref, v_ref, g_ref, seg_ref, h_ref, do_ref, ds_ref,
             dq_ref, dk_ref, dv_ref, dg_ref, ds0_ref, dst_scratch):
    refs = chunk_math.ChunkRefs(q_ref, k_ref, v_ref, g_ref, seg_ref)
    _carry(dst_scratch, ds_ref,
           lambda dst: chunk_math.backward_chunk(refs, do_ref, (dq_ref, dk_ref, dv_ref, dg_ref), 0, h_ref[...],
                                                 dst, scale=scale, chunk=chunk), ds0_ref)

  f32 = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)
  return _call(kernel, q, v, chunk,
               [rows(key_dim)] * 2 + [rows(value_dim), rows(key_dim), seg_spec, per_chunk_state,
                                      rows(value_dim), state],
               [rows(key_dim), rows(key_dim), rows(value_dim), rows(key_dim), state],
               [f32(q), f32(k), f32(v), f32(g), f32(ds)],
               "linear_attention_bwd_tpu")(q, k, v, g, seg, h, do, ds)


_KERNELS = _pallas_wrap.Kernels("pallas_tpu", _forward, _states, _backward, pad_pow2=False)


def linear_attention(q, k, v, log_decay, **kwargs):
  """Canonical ``linear_attention`` implementation (see ``pallas_kernels.linear_attention``)."""
  return _pallas_wrap.linear_attention(_KERNELS, q, k, v, log_decay, **kwargs)


def delta_rule(q, k, v, beta, log_decay, **kwargs):
  """Canonical ``delta_rule`` implementation: the chunked WY/UT kernels of :mod:`._pallas_delta`."""
  from pallas_kernels.linear_attention import _pallas_delta  # imports this module's grid helpers
  return _pallas_delta.delta_rule(q, k, v, beta, log_decay, **kwargs)
