"""Spiking mixers and MLP: decode equals the full sequence, causality, gradients through the surrogates, the
spike-gated key mask and silent queries of SparseTCAM, the spiking MLP's formula, GatedAttention's spike gate."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from gated_jax.layers import MIXERS, MLPS
from gated_jax.layers.collections import LAYER_METRICS

pytestmark = pytest.mark.usefixtures("fast_compile")

_B, _T, _D = 2, 10, 16


def _x(seed=0, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal((_B, _T, _D)), jnp.float32)


@pytest.mark.parametrize("name,kwargs", [
    ("sparse_tcam", {"window": 4, "max_len": _T}),
    # Unnormalised QKᵀV sums stay under Spikformer's 0.5 threshold over 10 positions: lower it so it spikes.
    ("spiking_self_attention", {"attention_threshold": 0.02}),
])
def test_decode_matches_full_sequence_and_is_causal(name, kwargs):
  mixer = MIXERS.get(name)(d_model=_D, num_heads=2, **kwargs)
  x = _x()
  variables = nn.unbox(mixer.init(jax.random.PRNGKey(0), x, decode=True))
  params = {"params": variables["params"]}
  run = jax.jit(lambda p, x: mixer.apply(p, x, mutable=[LAYER_METRICS]))
  full, sown = run(params, x)
  rates = jax.tree.leaves(sown)
  assert rates and all(0.0 < float(r) < 1.0 for r in rates)  # every neuron spikes and stays silent somewhere
  assert float(jnp.max(jnp.abs(full))) > 0
  step = jax.jit(lambda v, x: mixer.apply(v, x, decode=True, mutable=["cache"]))
  cache, outs = variables["cache"], []
  for chunk in (slice(0, 4), slice(4, 5), slice(5, 6), slice(6, _T)):
    out, mutated = step({**params, "cache": cache}, x[:, chunk])
    cache, outs = mutated["cache"], outs + [out]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-6)
  later = x.at[:, 6:].add(3.0)  # perturb steps >= 6: outputs before 6 must not move
  moved, _ = run(params, later)
  np.testing.assert_array_equal(moved[:, :6], full[:, :6])
  assert not np.allclose(moved[:, 6:], full[:, 6:])
  grads = jax.jit(jax.grad(lambda p: jnp.sum(mixer.apply(p, x) ** 2)))(params)
  norms = {"/".join(map(str, k)): float(jnp.linalg.norm(g)) for k, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert all(np.isfinite(v) for v in norms.values()) and sum(v > 0 for v in norms.values()) >= len(norms) - 1


def test_spike_masked_keys_match_a_dense_reference():
  """SparseTCAM's attention: causal, a local window and keys masked by spikes (the op's ``key_mask``) together;
  rows with no visible key output 0."""
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 7, 2, 4)), jnp.float32) for _ in range(3))
  key_active = np.array([[0, 1, 0, 1, 1, 0, 1]])
  out = pallas_kernels.attention(q, k, v, causal=True, window=3, key_mask=jnp.asarray(key_active, bool))
  scores = np.einsum("bthd,bshd->bhts", q, k) / 2.0
  i, j = np.arange(7)[:, None], np.arange(7)[None, :]
  visible = (j <= i) & (i - j < 3) & key_active[0][None, :].astype(bool)
  weights = np.where(visible, np.exp(scores - scores.max(-1, keepdims=True)), 0.0)
  total = weights.sum(-1, keepdims=True)
  want = np.einsum("bhts,bshd->bthd", np.where(total > 0, weights / np.where(total > 0, total, 1), 0.0), v)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(out)[0, 0])  # query 0 sees only key 0, which is silent


def test_sparse_tcam_attention_path_is_zero_at_silent_positions():
  mixer = MIXERS.get("sparse_tcam")(d_model=_D, num_heads=2, threshold=2.5)
  x = _x(1)
  params = nn.unbox(mixer.init(jax.random.PRNGKey(0), x))["params"]
  only_attention = {**params, "attn_gate": jnp.float32(60.0)}  # g = 1: the decay path is switched off
  out = mixer.apply({"params": only_attention}, x)
  # The encoder is a LIF with β = 0.95, θ = 2.5 and a zero reset in the same step.
  spikes = pallas_kernels.spiking_scan(x, beta=0.95, threshold=2.5, reset="zero", reset_delay=False)
  active = np.asarray(jnp.any(spikes > 0, axis=-1))
  assert 0 < active.mean() < 1
  np.testing.assert_array_equal(np.asarray(out)[~active], 0.0)
  assert np.all(np.abs(np.asarray(out)[active]).max(-1) > 0)


def test_spiking_mlp_is_a_thresholded_projection():
  mlp = MLPS.get("spiking")(d_model=_D, hidden_dim=24, threshold=0.8)
  x = _x(2)
  params = nn.unbox(mlp.init(jax.random.PRNGKey(0), x))["params"]
  y, sown = mlp.apply({"params": params}, x, mutable=[LAYER_METRICS])
  hidden = np.asarray(x) @ np.asarray(params["wi"]["kernel"]) > 0.8
  np.testing.assert_allclose(y, hidden.astype(np.float32) @ np.asarray(params["wo"]["kernel"]), rtol=1e-5,
                             atol=1e-6)
  assert sown[LAYER_METRICS]["spike_rate"][0] == pytest.approx(hidden.mean())
  grads = jax.jit(jax.grad(lambda p: jnp.sum(mlp.apply({"params": p}, x) ** 2)))(params)
  assert float(jnp.linalg.norm(grads["wi"]["kernel"])) > 0  # through the surrogate


def test_gated_attention_spike_gate_is_binary_and_trainable():
  attention = MIXERS.get("gated_attention")(d_model=_D, num_heads=2, gate_activation="spike")
  x = _x(3)
  params = nn.unbox(attention.init(jax.random.PRNGKey(0), x))["params"]
  run = jax.jit(lambda p: attention.apply({"params": p}, x, mutable=["intermediates"]))
  closed = {**params, "gate": {"kernel": jnp.zeros_like(params["gate"]["kernel"])}}
  np.testing.assert_array_equal(run(closed)[0], 0.0)  # H(0) = 0: every gate shut
  _, state = run(params)
  assert 0.0 < float(state["intermediates"]["gate_mean"][0]) < 1.0
  grads = jax.jit(jax.grad(lambda p: jnp.sum(attention.apply({"params": p}, x) ** 2)))(params)
  assert float(jnp.linalg.norm(grads["gate"]["kernel"])) > 0
  with pytest.raises(ValueError, match="gate_activation: got 'spike' with gate_mode='additive'"):
    MIXERS.get("gated_attention")(d_model=_D, num_heads=2, gate_activation="spike", gate_mode="additive")


@pytest.mark.parametrize("name,kwargs,match", [
    ("sparse_tcam", {"leak": 1.5}, r"leak: got 1.5"),
    ("sparse_tcam", {"window": 0}, "window: expected a positive int"),
    ("spiking_self_attention", {"scale": 0.0}, "scale: got 0.0"),
    ("spiking_self_attention", {"surrogate": "gauss"}, "surrogate: got 'gauss'"),
])
def test_bad_arguments_raise_value_errors(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    mixer = MIXERS.get(name)(d_model=_D, num_heads=2, **kwargs)
    mixer.init(jax.random.PRNGKey(0), _x())


def test_packed_sequences_are_refused():
  mixer = MIXERS.get("sparse_tcam")(d_model=_D, num_heads=2)
  with pytest.raises(ValueError, match="segment_ids: got an array"):
    mixer.init(jax.random.PRNGKey(0), _x(), segment_ids=jnp.zeros((_B, _T), jnp.int32))
