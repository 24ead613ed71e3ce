"""Layout, padding and ``jax.custom_vjp`` shared by the TPU and Triton linear-attention kernels.

The kernels work in ``(B, H, T, D)`` layout on whole chunks, with the within-chunk cumulative log gate
precomputed here (GLA arXiv 2312.06635 §4: ``G = cumsum(g)`` inside each chunk) and the state transposed
``(B, H, V, K)``. This module turns the canonical arguments into that form (padding T to a multiple of the
chunk, and K/V to powers of two where the backend needs it), and differentiates through the cumsum, the
padding and the decay broadcast with plain JAX; the kernels' own VJP covers everything in between.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention._pallas_chunk import SUB

SUPPORTED_CHUNKS = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class Kernels:
  """One backend's three ``pallas_call`` wrappers, all in kernel layout.

  Attributes:
    name: implementation name, for error messages.
    forward: ``(q, k, v, g, seg, s0, *, scale, chunk) -> (o, s_final)``.
    states: ``(q, k, v, g, seg, s0, *, chunk) -> h`` ``(B, H, NC, V, K)``, the state entering every chunk.
    backward: ``(q, k, v, g, seg, h, do, ds, *, scale, chunk) -> (dq, dk, dv, dg, ds0)``.
    pad_pow2: pad K and V to powers of two (>= 16), as Triton needs.
  """
  name: str
  forward: Callable
  states: Callable
  backward: Callable
  pad_pow2: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked(kernels: Kernels, scale: float, chunk: int, q, k, v, g, seg, s0):
  return kernels.forward(q, k, v, g, seg, s0, scale=scale, chunk=chunk)


def _chunked_fwd(kernels, scale, chunk, q, k, v, g, seg, s0):
  return kernels.forward(q, k, v, g, seg, s0, scale=scale, chunk=chunk), (q, k, v, g, seg, s0)


def _chunked_bwd(kernels, scale, chunk, residuals, cotangents):
  q, k, v, g, seg, s0 = residuals
  do, ds = cotangents
  h = kernels.states(q, k, v, g, seg, s0, chunk=chunk)
  dq, dk, dv, dg, ds0 = kernels.backward(q, k, v, g, seg, h, do.astype(q.dtype), ds.astype(jnp.float32),
                                         scale=scale, chunk=chunk)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, jnp.zeros_like(seg), ds0


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _pow2(n: int) -> int:
  return max(SUB, 1 << (n - 1).bit_length())


def linear_attention(kernels: Kernels, q, k, v, log_decay, *, scale, initial_state, return_final_state,
                     segment_ids, chunk_size):
  """Canonical-argument entry point (see ``pallas_kernels.linear_attention``); returns ``(o, final_state)``."""
  del return_final_state  # the final state is always computed
  if chunk_size not in SUPPORTED_CHUNKS:
    raise NotImplementedError(f"{kernels.name}: chunk_size={chunk_size} is unsupported; supported: "
                              f"{SUPPORTED_CHUNKS}")
  batch, seq, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  num_chunks = -(-seq // chunk_size)
  padded = num_chunks * chunk_size
  kp, vp = (_pow2(key_dim), _pow2(value_dim)) if kernels.pad_pow2 else (key_dim, value_dim)

  def to_kernel(x_BTHD, dim):
    x_BHTD = jnp.swapaxes(x_BTHD, 1, 2)
    return jnp.pad(x_BHTD, ((0, 0), (0, 0), (0, padded - seq), (0, dim - x_BTHD.shape[-1])))

  if log_decay is None:
    g_BHTK = jnp.zeros((batch, heads, padded, kp), jnp.float32)
  else:
    g = log_decay.astype(jnp.float32)
    g = jnp.broadcast_to(g[..., None] if g.ndim == 3 else g, q.shape)
    g = to_kernel(g, kp).reshape(batch, heads, num_chunks, chunk_size, kp)
    g_BHTK = jnp.cumsum(g, axis=3).reshape(batch, heads, padded, kp)
  if segment_ids is None:
    seg_BT1 = jnp.zeros((batch, padded, 1), jnp.float32)
  else:
    starts = jnp.concatenate([jnp.zeros((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    starts = jnp.pad(starts, ((0, 0), (0, padded - seq))).reshape(batch, num_chunks, chunk_size)
    seg_BT1 = jnp.cumsum(starts.astype(jnp.float32), axis=2).reshape(batch, padded, 1)
  if initial_state is None:
    s0_BHVK = jnp.zeros((batch, heads, vp, kp), jnp.float32)
  else:
    s0_BHVK = jnp.pad(jnp.swapaxes(initial_state.astype(jnp.float32), 2, 3),
                      ((0, 0), (0, 0), (0, vp - value_dim), (0, kp - key_dim)))
  o_BHTV, s_BHVK = _chunked(kernels, float(scale), chunk_size, to_kernel(q, kp), to_kernel(k, kp),
                            to_kernel(v, vp), g_BHTK, seg_BT1, s0_BHVK)
  o_BTHV = jnp.swapaxes(o_BHTV[:, :, :seq, :value_dim], 1, 2)
  return o_BTHV.astype(q.dtype), jnp.swapaxes(s_BHVK[:, :, :value_dim, :key_dim], 2, 3)
