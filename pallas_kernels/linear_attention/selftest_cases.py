"""Self-test cases of :func:`pallas_kernels.linear_attention` and :func:`pallas_kernels.delta_rule` (the step ops
have no Pallas kernel, so no case): per-head and per-channel decays, GQA (k/v read per group), log decays of
-inf, -1e4 and 0 mixed in, float32 and bfloat16 (bf16 operands in the kernels' dots: a looser tolerance). The
delta rule has no per-channel decay, so no such case."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import delta_rule, linear_attention
from pallas_kernels.selftest import Case

_B, _T, _H, _KV, _K, _V = 2, 200, 4, 2, 64, 64


def _inputs(key, *, decay: str, delta: bool = False, dtype=jnp.float32, special: bool = False):
  """q (H heads), k, v (KV heads; k L2-normalised for the delta rule), log decay (per head or per key channel;
  with ``special`` about 2% each of -inf, -1e4 and 0), then beta per key/value head (delta rule)."""
  kq, kk, kv, kd, kb, ks = jax.random.split(key, 6)
  q = jax.random.normal(kq, (_B, _T, _H, _K))
  k = jax.random.normal(kk, (_B, _T, _KV, _K))
  if delta:
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(kv, (_B, _T, _KV, _V))
  shape = (_B, _T, _H) if decay == "head" else (_B, _T, _H, _K)
  log_decay = jax.nn.log_sigmoid(jax.random.normal(kd, shape) + 2.0)
  if special:
    pick = jax.random.randint(ks, shape, 0, 50)
    log_decay = jnp.where(pick == 0, -jnp.inf, jnp.where(pick == 1, -1e4, jnp.where(pick == 2, 0.0, log_decay)))
  inputs = (q.astype(dtype), k.astype(dtype), v.astype(dtype), log_decay)
  return inputs + (jax.nn.sigmoid(jax.random.normal(kb, (_B, _T, _KV))).astype(dtype),) if delta else inputs


def _linear(q, k, v, log_decay, *, implementation):
  return linear_attention(q, k, v, log_decay=log_decay, return_final_state=True, implementation=implementation)


def _delta(q, k, v, log_decay, beta, *, implementation):
  return delta_rule(q, k, v, beta, log_decay=log_decay, return_final_state=True, implementation=implementation)


CASES = (
    Case("linear_attention", "per-head decay GQA f32 T=200", _linear, functools.partial(_inputs, decay="head"),
         (0, 1, 2, 3), 1e-4),
    Case("linear_attention", "per-channel decay GQA, -inf/-1e4/0 mixed in, f32 T=200", _linear,
         functools.partial(_inputs, decay="channel", special=True), (0, 1, 2, 3), 1e-4),
    Case("linear_attention", "per-channel decay GQA bf16 T=200", _linear,
         functools.partial(_inputs, decay="channel", dtype=jnp.bfloat16), (0, 1, 2, 3), 2e-2),
    Case("delta_rule", "gated delta rule GQA, beta per kv head, -inf/-1e4/0 mixed in, f32 T=200", _delta,
         functools.partial(_inputs, decay="head", delta=True, special=True), (0, 1, 2, 3, 4), 1e-4),
)
