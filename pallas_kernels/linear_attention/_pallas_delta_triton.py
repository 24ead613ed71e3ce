"""Pallas Triton (GPU) kernels for the chunked gated delta rule (Gated DeltaNet arXiv 2412.06464 §3.3, eq. 10).

The chunk math (WY/UT transform, in-kernel unit-lower-triangular inverse, backward) is that of
:mod:`._pallas_delta`; the grid, BlockSpecs and chunk loop are those of :mod:`.gpu`: grid ``(B, H)``, one
program per sequence and head walking its chunks with ``lax.fori_loop`` with the transposed ``(V, K)`` float32
state in registers, K and V padded to powers of two (>= 16, for ``tl.dot``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import _pallas_delta, _pallas_wrap, gpu


def _forward(q, k, v, b, g, seg, s0, *, scale, chunk):
  num_chunks = q.shape[2] // chunk

  def kernel(q_ref, k_ref, v_ref, b_ref, g_ref, seg_ref, s0_ref, o_ref, s_ref):
    refs = (q_ref, k_ref, v_ref, b_ref, g_ref, seg_ref)
    s_ref[...] = gpu._loop(num_chunks, chunk, lambda n, base, st: _pallas_delta.forward_chunk(
        refs, o_ref, base, st, scale=scale, chunk=chunk), s0_ref[...])

  outs = [jax.ShapeDtypeStruct(v.shape, q.dtype), jax.ShapeDtypeStruct(s0.shape, jnp.float32)]
  return gpu._call(kernel, (q, k, v, b, g, seg, s0), outs, "delta_rule_fwd_triton")


def _states(q, k, v, b, g, seg, s0, *, chunk):
  batch, heads, seq, _ = q.shape
  num_chunks = seq // chunk

  def kernel(q_ref, k_ref, v_ref, b_ref, g_ref, seg_ref, s0_ref, h_ref):
    refs = (q_ref, k_ref, v_ref, b_ref, g_ref, seg_ref)

    def body(n, base, st):
      h_ref[n] = st
      return _pallas_delta.state_chunk(refs, base, st, chunk=chunk)

    gpu._loop(num_chunks, chunk, body, s0_ref[...])

  outs = [jax.ShapeDtypeStruct((batch, heads, num_chunks) + s0.shape[2:], jnp.float32)]
  return gpu._call(kernel, (q, k, v, b, g, seg, s0), outs, "delta_rule_states_triton")[0]


def _backward(q, k, v, b, g, seg, h, do, ds, *, scale, chunk):
  num_chunks = q.shape[2] // chunk

  def kernel(q_ref, k_ref, v_ref, b_ref, g_ref, seg_ref, h_ref, do_ref, ds_ref, dq_ref, dk_ref, dv_ref, db_ref,
             dg_ref, ds0_ref):
    refs = (q_ref, k_ref, v_ref, b_ref, g_ref, seg_ref)
    grads = (dq_ref, dk_ref, dv_ref, db_ref, dg_ref)
    ds0_ref[...] = gpu._loop(num_chunks, chunk, lambda n, base, dst: _pallas_delta.backward_chunk(
        refs, do_ref, grads, base, h_ref[n], dst, scale=scale, chunk=chunk), ds_ref[...], reverse=True)

  f32 = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)
  return gpu._call(kernel, (q, k, v, b, g, seg, h, do, ds), [f32(q), f32(k), f32(v), f32(b), f32(g), f32(ds)],
                   "delta_rule_bwd_triton")


_TRITON = _pallas_wrap.Kernels("pallas_triton", _forward, _states, _backward, pad_pow2=True)


def delta_rule(q, k, v, beta, log_decay, **kwargs):
  """Canonical ``delta_rule`` implementation with Triton (see ``pallas_kernels.linear_attention``)."""
  return _pallas_delta.chunked_delta_rule(_TRITON, q, k, v, beta, log_decay, **kwargs)
