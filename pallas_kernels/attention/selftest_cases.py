"""Self-test cases of :func:`pallas_kernels.attention` (``python -m pallas_kernels.selftest``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.attention import attention
from pallas_kernels.selftest import Case


def _qkv(key, *, batch=2, seq=200, heads=4, kv_heads=2, dim=64, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  shape_q, shape_kv = (batch, seq, heads, dim), (batch, seq, kv_heads, dim)
  return tuple(jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in ((kq, shape_q), (kk, shape_kv),
                                                                            (kv, shape_kv)))


def _case(name, tolerance, dtype=jnp.float32, **kwargs):
  return Case("attention", name, functools.partial(attention, **kwargs),
              functools.partial(_qkv, dtype=dtype), grad_argnums=(0, 1, 2), tolerance=tolerance)


CASES = (
    _case("causal softmax GQA f32 T=200", 1e-4, normalizer="softmax"),
    _case("causal softmax GQA bf16 T=200", 2e-2, jnp.bfloat16, normalizer="softmax"),
    _case("window 64 sigmoid f32", 1e-4, normalizer="sigmoid", window=64),
    _case("causal softpick f32", 1e-4, normalizer="softpick"),
    _case("non-causal ssmax f32", 1e-4, normalizer="ssmax", causal=False),
)
