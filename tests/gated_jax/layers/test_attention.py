"""Tests for gated_jax.layers.attention.GatedAttention: gate positions, parameter counts, controls, learnable
normalizer parameters, diagnostics, errors, and KV-cache decode vs the full forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy import testing as npt

from gated_jax.layers import MIXERS
from gated_jax.layers.attention import ATTENTION_WEIGHTS, GatedAttention

D_MODEL, H, KV, D = 16, 4, 2, 4


def _layer(**kwargs):
  return MIXERS.get("gated_attention")(**{"d_model": D_MODEL, "num_heads": H, "num_kv_heads": KV,
                                           "head_dim": D, **kwargs})


def _x(b=2, t=6, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, t, D_MODEL))


def _params(layer, x):
  return nn.unbox(jax.jit(layer.init)(jax.random.PRNGKey(1), x)["params"])


def _shapes(layer, x):
  """Parameter shapes without running anything."""
  return nn.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(1), x)["params"])


def _filled(layer, x, value):
  return jax.tree.map(lambda s: jnp.full(s.shape, value, s.dtype), _shapes(layer, x)["gate"])


def _run(layer, params, x, **kwargs):
  return jax.jit(lambda p, x: layer.apply({"params": p}, x, **kwargs))(params, x)


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def test_gate_positions_against_baseline():
  """A zero gate kernel gives σ(0) = 0.5: exactly half the baseline where the map to the output is linear in
  the gated tensor (G1, G2, G5); a saturated input-independent gate (σ(30) = 1) is the baseline everywhere;
  an additive identity gate with a zero kernel is the baseline."""
  x = _x()
  base_layer = _layer(gate_position="none")
  params = _params(base_layer, x)
  baseline = _run(base_layer, params, x)
  for position in ("G1", "G2", "G3", "G4", "G5"):
    layer = _layer(gate_position=position)
    half = _run(layer, {**params, "gate": _filled(layer, x, 0.0)}, x)
    if position in ("G1", "G2", "G5"):
      npt.assert_allclose(half, 0.5 * baseline, rtol=1e-5, atol=1e-6)
    else:  # a gate on q or k changes the attention pattern
      assert float(jnp.max(jnp.abs(half - 0.5 * baseline))) > 1e-4
      saturated = _layer(gate_position=position, input_dependent=False)
      ones = _filled(saturated, x, 30.0)
      npt.assert_allclose(_run(saturated, {**params, "gate": ones}, x), baseline, rtol=1e-5, atol=1e-6)
  additive = _layer(gate_mode="additive", gate_activation="identity")
  zero = _filled(additive, x, 0.0)
  npt.assert_allclose(_run(additive, {**params, "gate": zero}, x), baseline, rtol=1e-5, atol=1e-6)


def test_additive_silu_and_ns_sigmoid_formulas():
  """G1 additive SiLU: y = baseline + (SiLU(X W_θ) per head) W_O; NS-sigmoid with a zero kernel scales by 0.75."""
  x = _x()
  params = _params(_layer(gate_position="none"), x)
  baseline = _run(_layer(gate_position="none"), params, x)
  layer = _layer(gate_mode="additive", gate_activation="silu")
  gate = {"kernel": 0.3 * jax.random.normal(jax.random.PRNGKey(5), (D_MODEL, H, D))}
  out = _run(layer, {**params, "gate": gate}, x)
  added = jnp.einsum("bthk,hkd->btd", jax.nn.silu(jnp.einsum("btd,dhk->bthk", x, gate["kernel"])),
                     params["out"]["kernel"])
  npt.assert_allclose(out, baseline + added, rtol=1e-4, atol=1e-5)
  ns = _layer(gate_activation="ns_sigmoid")
  out = _run(ns, {**params, "gate": jax.tree.map(jnp.zeros_like, gate)}, x)
  npt.assert_allclose(out, 0.75 * baseline, rtol=1e-5, atol=1e-6)


def test_gate_parameter_counts_follow_the_paper_arithmetic():
  """Table 1's arithmetic (d_model·q·d_k elementwise G1/G4, d_model·q headwise, d_model·k·d_k for G2/G3,
  d_model² for G5, head-shared as G1) on a scaled-down config: d_model 32, q 8, k 2, d_k 4."""
  d_model, q, k, dk = 32, 8, 2, 4
  x = jnp.zeros((1, 2, d_model))
  count = lambda **kw: _count(_shapes(GatedAttention(d_model, q, num_kv_heads=k, head_dim=dk, **kw), x))  # noqa: E731
  base = count(gate_position="none")
  expected = {("G1", "elementwise", False): d_model * q * dk, ("G4", "elementwise", False): d_model * q * dk,
              ("G1", "headwise", False): d_model * q, ("G2", "elementwise", False): d_model * k * dk,
              ("G3", "elementwise", False): d_model * k * dk, ("G2", "headwise", False): d_model * k,
              ("G5", "elementwise", False): d_model * d_model, ("G1", "elementwise", True): d_model * q * dk}
  for (position, granularity, shared), added in expected.items():
    assert count(gate_position=position, granularity=granularity, head_shared=shared) - base == added
  assert count(input_dependent=False) - base == q * dk
  assert count(sdpa_norm=True, gate_position="none") - base == q * dk
  assert count(sdpa_silu=True, gate_position="none") == base


def test_controls_act_on_sdpa_output():
  x = _x()
  params = _params(_layer(gate_position="none"), x)
  baseline = _run(_layer(gate_position="none"), params, x)
  silu = _run(_layer(gate_position="none", sdpa_silu=True), params, x)
  assert silu.shape == baseline.shape and float(jnp.max(jnp.abs(silu - baseline))) > 1e-4
  norm_layer = _layer(gate_position="none", sdpa_norm=True)
  normed = _run(norm_layer, {**params, "sdpa_norm": {"scale": jnp.ones((H, D))}}, x)
  assert float(jnp.max(jnp.abs(normed - baseline))) > 1e-4


def test_learnable_normalizer_parameters_get_gradients():
  x = _x()
  for normalizer, name, init in (("ssmax", "ssmax_s", 1 / np.log(64)), ("selective", "selective_beta", 1.5),
                                 ("entmax", "entmax_alpha", 0.0)):
    layer = _layer(normalizer=normalizer, max_len=64, implementation="reference")
    params = _params(layer, x)
    npt.assert_allclose(params[name], np.full((H,), init), rtol=1e-6)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2)))(params)  # noqa: B023
    assert float(jnp.max(jnp.abs(grads[name]))) > 0 and float(jnp.max(jnp.abs(grads["gate"]["kernel"]))) > 0


def test_diagnostics_are_sown_only_when_mutable():
  """Zero query kernel: uniform causal attention, so the weight on key 0 of query i is 1/(i+1)."""
  t = 5
  x = _x(t=t)
  layer = _layer(qk_norm=False)
  params = _params(layer, x)
  params["query"]["kernel"] = jnp.zeros_like(params["query"]["kernel"])
  y, state = jax.jit(lambda p: layer.apply({"params": p}, x, mutable=["intermediates"]))(params)
  inter = state["intermediates"]
  (first,), (gate_mean,) = inter["first_token_attention"], inter["gate_mean"]
  npt.assert_allclose(first, np.full((H,), np.mean(1 / np.arange(1, t + 1))), rtol=1e-5)
  logits = jnp.einsum("btd,dhk->bthk", x, params["gate"]["kernel"])
  npt.assert_allclose(gate_mean, jnp.mean(jax.nn.sigmoid(logits)), rtol=1e-5)
  npt.assert_allclose(y, _run(layer, params, x), rtol=1e-6)
  ungated = _layer(qk_norm=False, gate_position="none")
  ungated_params = {k: v for k, v in params.items() if k != "gate"}
  _, state = jax.jit(lambda p: ungated.apply({"params": p}, x, mutable=["intermediates"]))(ungated_params)
  assert set(state["intermediates"]) == {"first_token_attention"}


def test_attention_weights_are_sown_on_request():
  """Zero query kernel: every logit is 0, so sigmoid attention's sown ``(B, T, H, S)`` weights are
  sigma(0 - log max_len) = 1/9 on the visible keys (max_len 8; unnormalised rows) and exactly 0 on masked ones."""
  t = 5
  x = _x(t=t)
  layer = _layer(qk_norm=False, normalizer="sigmoid", max_len=8)
  params = _params(layer, x)
  params["query"]["kernel"] = jnp.zeros_like(params["query"]["kernel"])
  _, state = jax.jit(lambda p: layer.apply({"params": p}, x, mutable=[ATTENTION_WEIGHTS]))(params)
  (weights,) = state[ATTENTION_WEIGHTS]["weights"]
  expected = np.tril(np.full((t, t), 1.0 / 9.0))
  npt.assert_allclose(weights, np.broadcast_to(expected[None, :, None, :], (2, t, H, t)), rtol=1e-5, atol=1e-7)


def test_lssa_uses_cosine_logits_and_lssar_shares_its_parameters():
  """LSSA's weights from l2-normalised q, k with logits log(head_dim) log(i + 1) q̂·k̂ (arXiv 2501.13428 §3);
  the "lssar" layer runs on the same parameters and zeroes the keys below uniform on rows past the third."""
  t = 6
  x = _x(t=t)
  kwargs = dict(qk_norm=False, rope=False, gate_position="none", implementation="reference")
  layer = _layer(normalizer="lssa", **kwargs)
  params = _params(layer, x)
  weights = {}
  for name in ("lssa", "lssar"):
    _, state = jax.jit(lambda p, layer=_layer(normalizer=name, **kwargs): layer.apply(
        {"params": p}, x, mutable=[ATTENTION_WEIGHTS]))(params)
    weights[name] = np.asarray(state[ATTENTION_WEIGHTS]["weights"][0])
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  q = unit(np.einsum("btd,dhk->bthk", x, params["query"]["kernel"]))
  k = unit(np.repeat(np.einsum("btd,dhk->bthk", x, params["key"]["kernel"]), H // KV, axis=2))
  cosine = np.einsum("bthk,bshk->bths", q, k)
  logits = np.log(D) * np.log(np.arange(1, t + 1))[None, :, None, None] * cosine
  a = np.tril(np.ones((t, t)))[None, :, None, :] * np.log1p(np.exp(logits))
  npt.assert_allclose(weights["lssa"], a / a.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
  rows = weights["lssar"][:, 3:]
  assert np.all((rows == 0) == (weights["lssa"][:, 3:] * np.arange(4, t + 1)[None, :, None, None] <= 1))


def test_segment_ids_match_separate_sequences():
  x = _x(b=1, t=6)
  layer = _layer()
  params = _params(layer, x)
  segment_ids = jnp.array([[0, 0, 0, 1, 1, 1]])
  positions = jnp.array([[0, 1, 2, 0, 1, 2]])
  packed = _run(layer, params, x, segment_ids=segment_ids, positions=positions)
  npt.assert_allclose(packed[:, :3], _run(layer, params, x[:, :3]), rtol=1e-5, atol=1e-6)
  npt.assert_allclose(packed[:, 3:], _run(layer, params, x[:, 3:]), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_input_dtype():
  x = _x().astype(jnp.bfloat16)
  layer = _layer(dtype=jnp.bfloat16)
  y = _run(layer, _params(layer, x), x)
  assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


@pytest.mark.parametrize("kwargs", [
    dict(),  # GQA, softmax, G1
    dict(window=3, normalizer="softpick", gate_position="G2", granularity="headwise"),
    pytest.param(dict(normalizer="ssmax", gate_position="G3", rope_fraction=0.5), marks=pytest.mark.slow),
    pytest.param(dict(normalizer="sigmoid", num_kv_heads=1, gate_mode="additive", gate_activation="silu"),
                 marks=pytest.mark.slow),
])
def test_decode_matches_full_forward(kwargs):
  """Prefill 3 tokens, then one token at a time, against one full-sequence call."""
  t, max_len = 7, 10
  x = _x(t=t)
  layer = _layer(max_len=max_len, **kwargs)
  params = _params(layer, x)
  full = _run(layer, params, x)
  cache = layer.init(jax.random.PRNGKey(0), jnp.zeros((2, max_len, D_MODEL)), decode=True)["cache"]
  assert cache["cached_key"].shape == (2, max_len, layer.kv_heads, D) and int(cache["cache_index"]) == 0
  step = jax.jit(lambda p, c, x: layer.apply({"params": p, "cache": c}, x, decode=True, mutable=["cache"]))
  outputs = []
  for start, stop in [(0, 3)] + [(i, i + 1) for i in range(3, t)]:
    y, mutated = step(params, cache, x[:, start:stop])
    cache = mutated["cache"]
    outputs.append(y)
  assert int(cache["cache_index"]) == t
  npt.assert_allclose(jnp.concatenate(outputs, axis=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gate_position="G0"), "gate_position"),
    (dict(granularity="rowwise"), "granularity"),
    (dict(gate_mode="additive"), "gate_activation"),
    (dict(normalizer="softermax"), "normalizer: got 'softermax'"),
    (dict(num_kv_heads=3), "num_kv_heads: got 3"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(head_dim=None, d_model=18), "head_dim"),
    (dict(window=0), "window"),
    (dict(max_len=0), "max_len"),
    (dict(qk_norm="yes"), "qk_norm"),
    (dict(sdpa_silu=None), "sdpa_silu"),
    (dict(rope_fraction=0.0), "fraction"),
    (dict(rope_base=1.0), "base"),
])
def test_constructor_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _layer(**kwargs)


def test_call_errors():
  layer = _layer()
  x = _x()
  params = _params(layer, x)
  with pytest.raises(ValueError, match="x_BTD"):
    layer.apply({"params": params}, jnp.ones((2, 6, D_MODEL + 1)))
  with pytest.raises(ValueError, match="positions"):
    layer.apply({"params": params}, x, positions=jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids"):
    layer.init(jax.random.PRNGKey(0), x, segment_ids=jnp.zeros((2, 6), jnp.int32), decode=True)
