"""Tests for gated_jax.layers.gates: the design-space validation, activations, gate shapes and formulas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy import testing as npt

from gated_jax.layers import gates
from gated_jax.layers.gates import Gate, GateSpec

D_MODEL, H, D = 12, 3, 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(position="G6"), "gate_position: got 'G6'"),
    (dict(granularity="channel"), "granularity: got 'channel'"),
    (dict(mode="mult"), "gate_mode: got 'mult'"),
    (dict(activation="tanh"), "gate_activation: got 'tanh'"),
    (dict(head_shared=1), "head_shared: got 1"),
    (dict(input_dependent="yes"), "input_dependent"),
    (dict(position="G5", granularity="headwise"), "G5"),
    (dict(position="G5", head_shared=True), "G5"),
    (dict(granularity="headwise", head_shared=True), "head_shared: got True"),
    (dict(mode="additive"), "gate_activation: got 'sigmoid' with gate_mode='additive'"),
    (dict(mode="additive", activation="ns_sigmoid"), "additive"),
    (dict(mode="additive", activation="silu", granularity="headwise"), "granularity: got 'headwise'"),
    (dict(activation="identity"), "gate_activation: got 'identity' with gate_mode='multiplicative'"),
    (dict(activation="silu", granularity="headwise"), "gate_activation='silu'"),
])
def test_invalid_combinations_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    GateSpec(**kwargs).validate()


@pytest.mark.parametrize("kwargs", [
    dict(), dict(granularity="headwise"), dict(head_shared=True), dict(mode="additive", activation="silu"),
    dict(mode="additive", activation="identity"), dict(activation="silu"), dict(activation="ns_sigmoid"),
    dict(input_dependent=False), dict(position="G5"), dict(position="G2", granularity="headwise"),
    dict(position="none", granularity="headwise", head_shared=True),  # no gate: combination not checked
])
def test_paper_combinations_are_valid(kwargs):
  GateSpec(**kwargs).validate()


def test_ns_sigmoid_range_is_half_to_one():
  x = jnp.linspace(-60.0, 60.0, 1001)
  y = gates.ACTIVATIONS["ns_sigmoid"](x)
  assert float(y.min()) >= 0.5 and float(y.max()) <= 1.0
  npt.assert_allclose([y[0], y[500], y[-1]], [0.5, 0.75, 1.0], atol=1e-6)
  assert bool(jnp.all(jnp.diff(y) >= 0))


def test_apply_gate_formulas():
  y = jax.random.normal(jax.random.PRNGKey(0), (2, 3, H, D)).astype(jnp.bfloat16)
  score = jax.random.uniform(jax.random.PRNGKey(1), (2, 3, H, 1))
  y32 = np.asarray(y, np.float32)
  mult = gates.apply_gate(y, score, "multiplicative")
  add = gates.apply_gate(y, score, "additive")
  assert mult.dtype == add.dtype == jnp.bfloat16
  npt.assert_allclose(np.asarray(mult, np.float32), y32 * np.asarray(score), rtol=1e-2, atol=1e-2)
  npt.assert_allclose(np.asarray(add, np.float32), y32 + np.asarray(score), rtol=1e-2, atol=1e-2)


def _gate(spec, heads=H, width=D, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed), (2, 5, D_MODEL))
  gate = Gate(spec, heads, width)
  params = gate.init(jax.random.PRNGKey(1), x)["params"]
  return x, params, jax.jit(gate.apply)({"params": params}, x)


@pytest.mark.parametrize("spec,kernel_shape,names,score_shape", [
    (GateSpec(), (D_MODEL, H, D), ("embed", "heads", "head_dim"), (2, 5, H, D)),
    (GateSpec(granularity="headwise"), (D_MODEL, H), ("embed", "heads"), (2, 5, H, 1)),
    (GateSpec(head_shared=True), (D_MODEL, H, D), ("embed", "heads", "head_dim"), (2, 5, 1, D)),
])
def test_input_dependent_scores(spec, kernel_shape, names, score_shape):
  x, params, score = _gate(spec)
  kernel = params["kernel"]
  assert kernel.value.shape == kernel_shape and kernel.names == names
  assert 0.005 < float(jnp.std(kernel.value)) < 0.04  # N(0, 0.02)
  logits = np.einsum("btd,d...->bt...", np.asarray(x), np.asarray(kernel.value))
  if spec.head_shared:
    logits = logits.mean(axis=2, keepdims=True)
  if spec.granularity == "headwise":
    logits = logits[..., None]
  assert score.shape == score_shape
  npt.assert_allclose(score, 1 / (1 + np.exp(-logits)), rtol=1e-5)


def test_g5_gate_has_no_head_axis():
  _, params, score = _gate(GateSpec(position="G5"), heads=None, width=D_MODEL)
  assert params["kernel"].value.shape == (D_MODEL, D_MODEL) and score.shape == (2, 5, D_MODEL)


@pytest.mark.parametrize("head_shared,shape", [(False, (H, D)), (True, (1, D))])
def test_input_independent_gate_is_zero_init_tensor(head_shared, shape):
  x, params, score = _gate(GateSpec(input_dependent=False, head_shared=head_shared))
  assert set(params) == {"logits"} and params["logits"].value.shape == shape
  npt.assert_array_equal(nn.unbox(params["logits"]), np.zeros(shape))
  assert score.shape == (1, 1) + shape
  npt.assert_allclose(score, 0.5)
  other = Gate(GateSpec(input_dependent=False, head_shared=head_shared), H, D).apply({"params": params}, x * 3.0)
  npt.assert_array_equal(other, score)  # does not depend on x
