"""Self-test cases of :func:`pallas_kernels.linear_attention` and :func:`pallas_kernels.delta_rule`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import delta_rule, linear_attention
from pallas_kernels.selftest import Case

_B, _T, _H, _K, _V = 2, 200, 4, 64, 64


def _inputs(key, *, decay: str, delta: bool = False, dtype=jnp.float32):
  """q, k, v (k/v L2-normalised for the delta rule), then log decay (per head or per key channel), then beta."""
  kq, kk, kv, kd, kb = jax.random.split(key, 5)
  q = jax.random.normal(kq, (_B, _T, _H, _K))
  k = jax.random.normal(kk, (_B, _T, _H, _K))
  if delta:
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(kv, (_B, _T, _H, _V))
  shape = (_B, _T, _H) if decay == "head" else (_B, _T, _H, _K)
  log_decay = jax.nn.log_sigmoid(jax.random.normal(kd, shape) + 2.0)
  inputs = (q.astype(dtype), k.astype(dtype), v.astype(dtype), log_decay)
  return inputs + (jax.nn.sigmoid(jax.random.normal(kb, (_B, _T, _H))).astype(dtype),) if delta else inputs


def _linear(q, k, v, log_decay, *, implementation):
  return linear_attention(q, k, v, log_decay=log_decay, return_final_state=True, implementation=implementation)


def _delta(q, k, v, log_decay, beta, *, implementation):
  return delta_rule(q, k, v, beta, log_decay=log_decay, return_final_state=True, implementation=implementation)


CASES = (
    Case("linear_attention", "per-head decay f32 T=200", _linear, functools.partial(_inputs, decay="head"),
         (0, 1, 2, 3), 1e-4),
    Case("linear_attention", "per-channel decay f32 T=200", _linear, functools.partial(_inputs, decay="channel"),
         (0, 1, 2, 3), 1e-4),
    Case("linear_attention", "per-channel decay bf16 T=200", _linear,
         functools.partial(_inputs, decay="channel", dtype=jnp.bfloat16), (0, 1, 2, 3), 2e-2),
    Case("delta_rule", "gated delta rule f32 T=200", _delta,
         functools.partial(_inputs, decay="head", delta=True), (0, 1, 2, 3, 4), 1e-4),
)
