"""Non-causal mixers against direct float64 numpy formulas on a tiny case: ViG's bidirectional GLA with
direction-wise gates (arXiv 2405.18425 §3.2) and LINA's KV-gated bidirectional linear attention
(arXiv 2601.22630). Both must also let every output depend on future tokens."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from gated_jax.layers import MIXERS

B, T, D, H = 2, 6, 8, 2


def as_numpy(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(tree))


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def head_rms_norm(o_BTHV, scale_V, eps=1e-5):  # the mixers' norm_eps (fla's 1e-5)
  return o_BTHV / np.sqrt(np.mean(o_BTHV ** 2, axis=-1, keepdims=True) + eps) * scale_V


def setup(name, **kwargs):
  """The jitted apply, the float64 numpy params (random KV-gate scalars for LINA, not the all-ones init), x and y."""
  mixer = MIXERS.get(name)(d_model=D, num_heads=H, implementation="reference", **kwargs)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  params = nn.meta.unbox(jax.jit(mixer.init)(jax.random.PRNGKey(1), x)["params"])
  for gate in ("kv_gate_k", "kv_gate_v"):
    if gate in params:
      params[gate] = jax.random.uniform(jax.random.PRNGKey(len(gate)), params[gate].shape, minval=0.5, maxval=1.5)
  apply = jax.jit(mixer.apply)
  return apply, params, x, apply({"params": params}, x)


def vig_formula(p, x):
  """o_t = (o_fwd + o_bwd) / 2 with o_fwd[t] = K^-1/2 sum_{j<=t} q_t^T Diag(prod_{j<r<=t} a_f[r]) k_j v_j^T and
  o_bwd[t] = K^-1/2 sum_{j>=t} q_t^T Diag(prod_{t<=r<j} a_b[r]) k_j v_j^T; RMSNorm(o) * swish(g), o_proj."""
  q, k, v = (np.einsum("btd,dhk->bthk", x, p[f"{n}_proj"]["kernel"]) for n in "qkv")
  logits = np.einsum("btr,rshk->btshk", x @ p["gk_down_proj"]["kernel"], p["gk_proj"]["kernel"])
  log_a = log_sigmoid(logits + p["gk_proj"]["bias"]) / 16.0
  fwd, bwd = log_a[:, :, 0], log_a[:, :, 1]
  o = np.zeros(v.shape)
  for t in range(T):
    for j in range(T):
      decay = np.exp(fwd[:, j + 1:t + 1].sum(1)) if j <= t else np.zeros_like(fwd[:, 0])
      decay = decay + (np.exp(bwd[:, t:j].sum(1)) if j >= t else 0.0)
      score = np.einsum("bhk,bhk->bh", q[:, t] * decay, k[:, j]) * q.shape[-1] ** -0.5 / 2
      o[:, t] += score[..., None] * v[:, j]
  g = np.einsum("btd,dhv->bthv", x, p["g_proj"]["kernel"])
  o = head_rms_norm(o, p["o_norm"]["scale"]) * g / (1 + np.exp(-g))
  return np.einsum("bthv,hvd->btd", o, p["o_proj"]["kernel"])


def lina_formula(p, x):
  """o_i = phi(q_i) . (sum_j w_k[j] phi(k_j) (w_v[j] v_j)^T / N) / (phi(q_i) . mean_j w_k[j] phi(k_j) + 1e-6),
  phi = ReLU + 1e-6; RMSNorm(o), o_proj."""
  q, k, v = (np.einsum("btd,dhk->bthk", x, p[f"{n}_proj"]["kernel"]) for n in "qkv")
  q, k = np.maximum(q, 0) + 1e-6, np.maximum(k, 0) + 1e-6
  k = k * p["kv_gate_k"][:, :T].T[None, :, :, None]
  v = v * p["kv_gate_v"][:, :T].T[None, :, :, None]
  memory = np.einsum("bjhk,bjhv->bhkv", k, v) / T
  o = np.einsum("bihk,bhkv->bihv", q, memory) / (np.einsum("bihk,bhk->bih", q, k.mean(1))[..., None] + 1e-6)
  return np.einsum("bthv,hvd->btd", head_rms_norm(o, p["o_norm"]["scale"]), p["o_proj"]["kernel"])


@pytest.mark.parametrize("name, kwargs, formula", [
    # LeCun-normal init (init_std=None): fla's N(0, 0.02) makes outputs too small to test sharply
    ("gla", dict(bidirectional=True, init_std=None), vig_formula),
    ("lina", dict(max_len=T + 2, init_std=None), lina_formula),
])
def test_matches_direct_formula_and_sees_the_future(name, kwargs, formula):
  apply, params, x, y = setup(name, **kwargs)
  np.testing.assert_allclose(y, formula(as_numpy(params), np.asarray(x, np.float64)), atol=2e-5, rtol=2e-4)
  y_changed = apply({"params": params}, x.at[:, -1].add(1.0))
  assert np.all(np.abs(np.asarray(y_changed - y))[:, 0].max(-1) > 1e-4)  # token 0 sees token T-1
