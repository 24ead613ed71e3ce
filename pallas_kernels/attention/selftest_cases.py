"""Self-test cases of :func:`pallas_kernels.attention` (``python -m pallas_kernels.selftest``): every normalizer
the kernels take with a mask kind each, bf16, GQA, an odd head dim, the fused gate in both forms, segments with
a key mask, a decode step. Default tiles of the device (lengths are not multiples of them)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.attention import attention
from pallas_kernels.selftest import Case

_SEQ = 200
_SEGMENTS = jnp.concatenate([jnp.zeros((2, 70), jnp.int32), jnp.ones((2, 130), jnp.int32)], axis=1)
_KEY_MASK = (jnp.arange(_SEQ) % 7 != 3)[None].repeat(2, 0)


def _inputs(key, *, batch=2, seq=_SEQ, keys=_SEQ, heads=4, kv_heads=2, dim=64, dtype=jnp.float32, gate=None):
  kq, kk, kv, kg = jax.random.split(key, 4)
  shape_q, shape_kv = (batch, seq, heads, dim), (batch, keys, kv_heads, dim)
  qkv = tuple(jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in ((kq, shape_q), (kk, shape_kv),
                                                                            (kv, shape_kv)))
  if gate is None:
    return qkv
  width = dim if gate == "elementwise" else 1
  return qkv + (jax.nn.sigmoid(jax.random.normal(kg, (batch, seq, heads, width))).astype(dtype),)


def _gated(q, k, v, gate, **kwargs):
  return attention(q, k, v, gate=gate, **kwargs)


def _case(name, tolerance, dtype=jnp.float32, inputs=None, gate=None, **kwargs):
  fn = functools.partial(_gated if gate else attention, **kwargs)
  make = functools.partial(_inputs, dtype=dtype, gate=gate, **(inputs or {}))
  return Case("attention", name, fn, make, grad_argnums=(0, 1, 2, 3) if gate else (0, 1, 2), tolerance=tolerance)


CASES = (
    _case("causal softmax GQA f32 T=200", 1e-4, normalizer="softmax"),
    _case("causal softmax GQA bf16 T=200", 2e-2, jnp.bfloat16, normalizer="softmax"),
    _case("window 64 sigmoid f32", 1e-4, normalizer="sigmoid", window=64),
    _case("causal softpick f32", 1e-4, normalizer="softpick"),
    _case("non-causal ssmax f32", 1e-4, normalizer="ssmax", causal=False),
    _case("segments selective f32", 1e-4, normalizer="selective", segment_ids=_SEGMENTS),
    _case("window 48 stablemax f32", 1e-4, normalizer="stablemax", window=48),
    _case("causal relu f32", 1e-4, normalizer="relu"),
    _case("causal lssa f32", 1e-4, normalizer="lssa", scale=1.0),
    _case("segments + key mask self_adjust f32", 1e-4, normalizer="self_adjust", segment_ids=_SEGMENTS,
          key_mask=_KEY_MASK),
    _case("causal softmax elementwise gate bf16", 2e-2, jnp.bfloat16, gate="elementwise", normalizer="softmax"),
    _case("causal sigmoid headwise gate f32", 1e-4, gate="headwise", normalizer="sigmoid"),
    _case("causal softmax head dim 72 bf16", 2e-2, jnp.bfloat16, inputs=dict(dim=72), normalizer="softmax"),
    _case("decode step softpick T=1 S=200 f32", 1e-4, inputs=dict(seq=1), normalizer="softpick",
          query_offset=jnp.array([199, 120])),
)
