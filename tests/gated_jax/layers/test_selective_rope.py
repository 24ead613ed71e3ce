"""Selective RoPE: the module against a float64 numpy transcription of its equations (with the conv, the
positive bias and the phase gate), segment restarts, decode with its cache inside a linear mixer and inside
softmax attention (prefill + steps equals the full call), and bad arguments."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_jax.layers import MIXERS
from gated_jax.layers.selective_rope import SelectiveRoPE

pytestmark = pytest.mark.usefixtures("fast_compile")
B, T, H, K, D = 2, 7, 2, 4, 8


def _numpy_rope(p, q, k, x, base, segment_ids):
  u = x.reshape(B, T, H, D // H)
  u = (u / np.sqrt(np.sum(u ** 2, -1, keepdims=True) + 1e-6)).reshape(B, T, D)
  phi_hat = np.einsum("btr,rhj->bthj", u @ p["phi_down"]["kernel"], p["phi_up"]["kernel"])
  taps = p["phi_conv"]["kernel"]  # (4, H, K/2): y_t = sum_i w_i phi_{t-3+i}, within the segment
  phi = np.zeros_like(phi_hat)
  for t in range(T):
    for i in range(4):
      s = t - 3 + i
      if s >= 0:
        phi[:, t] += taps[i] * phi_hat[:, s] * (segment_ids[:, s] == segment_ids[:, t])[:, None, None]
  phi = phi + np.exp(p["phi_bias"])
  gate = u @ p["phase_gate"]["kernel"] + p["phase_gate"]["bias"]
  phi = phi / (1 + np.exp(-gate))[..., None]
  phase = np.zeros_like(phi)
  for t in range(T):
    same = segment_ids[:, :t + 1] == segment_ids[:, t:t + 1]  # the tokens of t's segment up to t
    phase[:, t] = np.einsum("bs,bshj->bhj", same, phi[:, :t + 1])
  angle = phase * base ** (-np.arange(0, K, 2) / K)
  cos, sin = np.cos(angle), np.sin(angle)
  rot = lambda a: np.concatenate([a[..., :K // 2] * cos - a[..., K // 2:] * sin,
                                  a[..., K // 2:] * cos + a[..., :K // 2] * sin], -1)
  return rot(q), rot(k)


@pytest.mark.parametrize("base", (1.0, 500000.0))
def test_matches_numpy_with_segments(base):
  keys = jax.random.split(jax.random.key(0), 3)
  q, k = (jax.random.normal(kk, (B, T, H, K)) for kk in keys[:2])
  x = jax.random.normal(keys[2], (B, T, D))
  segment_ids = jnp.array([[0, 0, 0, 1, 1, 1, 1], [0] * T], jnp.int32)
  rope = SelectiveRoPE(H, K, rank=3, base=base, use_bias=True, use_gate=True)
  params = nn.unbox(rope.init(jax.random.key(1), q, k, x, segment_ids=segment_ids))["params"]
  params["phi_bias"] = 0.5 * jax.random.normal(jax.random.key(2), params["phi_bias"].shape)
  got = jax.jit(rope.apply)({"params": params}, q, k, x, segment_ids=segment_ids)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = _numpy_rope(p64, *(np.asarray(a, np.float64) for a in (q, k, x)), base, np.asarray(segment_ids))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  # A rotation: norms are kept, and q_t . k_t (one token, one angle) is unchanged.
  np.testing.assert_allclose(jnp.linalg.norm(got[0], axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(got[0] * got[1], -1), jnp.sum(q * k, -1), rtol=1e-4, atol=1e-5)


def _decode_matches_full(mixer, x):
  params = nn.unbox(mixer.init(jax.random.key(1), x))["params"]
  full = jax.jit(mixer.apply)({"params": params}, x)
  cache = nn.unbox(mixer.init(jax.random.key(1), x, decode=True))["cache"]
  step = jax.jit(lambda cache, x: mixer.apply({"params": params, "cache": cache}, x, decode=True, mutable=["cache"]))
  outputs = []
  for chunk in (x[:, :4], x[:, 4:5], x[:, 5:6]):
    y, variables = step(cache, chunk)
    outputs.append(y)
    cache = variables["cache"]
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full[:, :6], rtol=2e-5, atol=2e-5)


def test_decode_in_a_linear_mixer():
  options = {"rank": 4, "conv_size": 0, "use_bias": True}  # first difference instead of the conv
  mixer = MIXERS.get("linear_attention")(d_model=D, num_heads=H, implementation="reference", selective_rope=options)
  _decode_matches_full(mixer, jax.random.normal(jax.random.key(0), (B, 6, D)))


def test_decode_in_softmax_attention():
  mixer = MIXERS.get("gated_attention")(d_model=D, num_heads=H, rope=False, gate_position="none", max_len=6,
                                        selective_rope={"rank": 4})
  _decode_matches_full(mixer, jax.random.normal(jax.random.key(0), (B, 6, D)))


@pytest.mark.parametrize("build, match", [
    (lambda: MIXERS.get("gla")(d_model=D, num_heads=H, selective_rope={"rnak": 4}), "selective_rope: got"),
    (lambda: MIXERS.get("gated_attention")(d_model=D, num_heads=H, selective_rope={}), "allowed: rope=False"),
    (lambda: MIXERS.get("gated_attention")(d_model=D, num_heads=H, num_kv_heads=1, rope=False, selective_rope={}),
     "num_kv_heads == num_heads"),
    (lambda: SelectiveRoPE(H, 3), "head_dim: got 3"),
    (lambda: SelectiveRoPE(H, K, base=0.5), "base: got 0.5"),
])
def test_bad_arguments(build, match):
  with pytest.raises(ValueError, match=match):
    build()
