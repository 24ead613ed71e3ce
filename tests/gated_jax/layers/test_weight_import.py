"""Tests for gated_jax.layers.weight_import: synthetic PyTorch-layout weights, split in numpy exactly as the
original code does (qiuzh20 per-KV-group packing, Qwen3-Next per-head interleaving), against the imported
layer's query and gate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy import testing as npt

from gated_jax.layers import weight_import
from gated_jax.layers.attention import GatedAttention

B, T, DM, H, KV, D = 2, 3, 16, 4, 2, 4
RNG = np.random.default_rng(0)
X = RNG.normal(size=(B, T, DM)).astype(np.float32)


def _state(q_out):
  return {"q_proj.weight": RNG.normal(size=(q_out, DM)).astype(np.float32),
          "k_proj.weight": RNG.normal(size=(KV * D, DM)).astype(np.float32),
          "v_proj.weight": RNG.normal(size=(KV * D, DM)).astype(np.float32),
          "o_proj.weight": RNG.normal(size=(DM, H * D)).astype(np.float32),
          "q_norm.weight": RNG.normal(size=(D,)).astype(np.float32),
          "k_norm.weight": RNG.normal(size=(D,)).astype(np.float32)}


def _qiuzh20_split(weight, granularity):
  """modeling_qwen3.py: q_proj output viewed as (B, T, KV, -1), split per group into query | gate."""
  group = H // KV
  y = (X @ weight.T).reshape(B, T, KV, -1)
  gate_width = group if granularity == "headwise" else group * D
  query, gate = y[..., :group * D], y[..., group * D:group * D + gate_width]
  assert y.shape[-1] == group * D + gate_width
  gate = gate.reshape(B, T, H, 1) if granularity == "headwise" else gate.reshape(B, T, H, D)
  return query.reshape(B, T, H, D), gate


def _qwen3_next_split(weight):
  """modular_qwen3_next.py: q_proj output viewed as (B, T, H, 2D), chunked in two along the last axis."""
  y = (X @ weight.T).reshape(B, T, H, 2 * D)
  return y[..., :D], y[..., D:]


def _layer_outputs(params, granularity):
  layer = GatedAttention(DM, H, num_kv_heads=KV, head_dim=D, granularity=granularity)
  params = jax.tree.map(jnp.asarray, params)
  _, state = jax.jit(lambda p: layer.apply({"params": p}, jnp.asarray(X), capture_intermediates=True,
                                           mutable=["intermediates"]))(params)
  inter = state["intermediates"]
  return inter["query"]["__call__"][0], inter["gate"]["__call__"][0]


@pytest.mark.parametrize("granularity", ["headwise", "elementwise"])
def test_qiuzh20_layout(granularity):
  state = _state(H * D + (H if granularity == "headwise" else H * D))
  params = weight_import.attention_params(state, layout="qiuzh20", num_heads=H, num_kv_heads=KV, head_dim=D,
                                          granularity=granularity)
  query, gate = _qiuzh20_split(state["q_proj.weight"], granularity)
  ours_q, ours_gate = _layer_outputs(params, granularity)
  npt.assert_allclose(ours_q, query, rtol=1e-4, atol=1e-4)
  npt.assert_allclose(ours_gate, 1 / (1 + np.exp(-gate)), rtol=1e-4, atol=1e-5)
  npt.assert_array_equal(params["q_norm"]["scale"], state["q_norm.weight"])
  npt.assert_allclose(np.einsum("btd,dhk->bthk", X, params["key"]["kernel"]),
                      (X @ state["k_proj.weight"].T).reshape(B, T, KV, D), rtol=1e-5, atol=1e-5)


def test_qwen3_next_layout():
  state = _state(2 * H * D)
  params = weight_import.attention_params(state, layout="qwen3_next", num_heads=H, num_kv_heads=KV, head_dim=D)
  query, gate = _qwen3_next_split(state["q_proj.weight"])
  ours_q, ours_gate = _layer_outputs(params, "elementwise")
  npt.assert_allclose(ours_q, query, rtol=1e-4, atol=1e-4)
  npt.assert_allclose(ours_gate, 1 / (1 + np.exp(-gate)), rtol=1e-4, atol=1e-5)
  npt.assert_allclose(params["k_norm"]["scale"], 1.0 + state["k_norm.weight"])  # zero-centred RMSNorm
  o = RNG.normal(size=(B, T, H, D)).astype(np.float32)  # o_proj on flattened heads
  npt.assert_allclose(np.einsum("bthk,hkd->btd", o, params["out"]["kernel"]),
                      o.reshape(B, T, H * D) @ state["o_proj.weight"].T, rtol=1e-4, atol=1e-4)


def test_errors():
  with pytest.raises(ValueError, match="layout"):
    weight_import.attention_params(_state(2 * H * D), layout="megatron", num_heads=H, num_kv_heads=KV, head_dim=D)
  with pytest.raises(ValueError, match="q_proj.weight: got shape"):
    weight_import.qiuzh20_q_proj(np.zeros((H * D, DM)), num_heads=H, num_kv_heads=KV, head_dim=D,
                                 granularity="headwise")
  with pytest.raises(ValueError, match="missing"):
    weight_import.attention_params({}, layout="qiuzh20", num_heads=H, num_kv_heads=KV, head_dim=D)
  with pytest.raises(ValueError, match="granularity"):
    weight_import.qiuzh20_q_proj(np.zeros((2 * H * D, DM)), num_heads=H, num_kv_heads=KV, head_dim=D,
                                 granularity="rowwise")
