"""Tests for gated_jax.models.lm.DecoderLM: shapes, embeddings, per-layer mixers, diagnostics, errors.

Shape-only checks trace with ``jax.eval_shape`` (no compilation) to keep the file fast.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from numpy import testing as npt

from gated_jax.layers import MIXERS
from gated_jax.models import DecoderLM, lm_from_config

V, D, H = 40, 32, 2
_KEY = jax.random.PRNGKey(0)


class _Probe(nn.Module):
  """A mixer that declares layer_idx/num_layers and records them in a parameter's shape."""
  d_model: int
  num_heads: int
  layer_idx: int = -1
  num_layers: int = -1

  @nn.compact
  def __call__(self, x_BTD, *, segment_ids=None, positions=None, decode=False):
    marker = self.param("marker", nn.initializers.zeros, (self.layer_idx + 1, self.num_layers))
    return x_BTD * (1.0 + jnp.sum(marker))


@pytest.fixture(name="probe")
def _probe(monkeypatch):
  monkeypatch.setitem(MIXERS._entries, "probe", _Probe)  # pylint: disable=protected-access
  return "probe"


def _lm(**kwargs):
  return DecoderLM(**{"vocab_size": V, "d_model": D, "num_layers": 2, "num_heads": H, "max_len": 16,
                      "mlp_hidden_dim": 64, **kwargs})


def _shapes(model, b=1, t=4):
  """Parameter shapes of ``model`` without running it."""
  return jax.eval_shape(model.init, _KEY, jnp.zeros((b, t), jnp.int32))["params"]


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _tokens(b, t, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, V)


@pytest.mark.parametrize("b, t, dtype", [(1, 1, jnp.float32), (3, 7, jnp.bfloat16)])
def test_logits_shape_and_dtype(b, t, dtype):
  model = _lm(dtype=dtype)
  variables = jax.eval_shape(model.init, _KEY, _tokens(b, t))
  logits = jax.eval_shape(model.apply, variables, _tokens(b, t))
  assert logits.shape == (b, t, V) and logits.dtype == jnp.float32


def test_tied_vs_untied_param_count():
  tied, untied = _shapes(_lm(tie_embeddings=True)), _shapes(_lm(tie_embeddings=False))
  assert _count(untied) - _count(tied) == V * D
  assert nn.unbox(untied["unembed"]["kernel"]).shape == (D, V) and "unembed" not in tied
  assert nn.unbox(tied["embed"]["embedding"]).shape == (V, D)


def test_mixers_cycle_over_layers_with_layer_idx(probe):
  model = _lm(num_layers=4, mixer=("gated_attention", probe))
  assert [name for name, _ in model.layer_specs()] == ["gated_attention", probe] * 2
  params = _shapes(model)
  for i in (1, 3):  # the probe got its own layer index and the depth
    assert nn.unbox(params[f"layer_{i}"]["mixer"]["marker"]).shape == (i + 1, 4)
  assert _count(params["layer_0"]) == _count(params["layer_2"]) != _count(params["layer_1"])


def test_per_layer_kwargs_are_parallel_to_mixer():
  model = _lm(num_layers=3, mixer=("gated_attention", "gated_attention"),
              mixer_kwargs=({"gate_position": "G1"}, {"gate_position": "none"}))
  assert [kw["gate_position"] for _, kw in model.layer_specs()] == ["G1", "none", "G1"]
  params = _shapes(model)
  assert _count(params["layer_0"]) == _count(params["layer_2"]) > _count(params["layer_1"])


def test_mlp_none_has_no_mlp():
  assert set(_shapes(_lm(mlp="none"))["layer_0"]) == {"mixer_norm", "mixer"}


def test_forward_sows_diagnostics():
  tokens = _tokens(2, 6)
  model = _lm()
  params = jax.jit(model.init)(_KEY, tokens)["params"]
  logits, state = jax.jit(lambda p: model.apply({"params": p}, tokens, mutable=["intermediates"]))(params)
  chex.assert_tree_all_finite(logits)
  for i in range(2):
    layer = state["intermediates"][f"layer_{i}"]
    (max_abs,), (kurt,) = layer["max_abs_activation"], layer["kurtosis"]
    assert max_abs.shape == () and float(max_abs) > 0 and float(kurt) > 0
    assert "gate_mean" in layer["mixer"] and "first_token_attention" in layer["mixer"]


def test_remat_matches():
  tokens = _tokens(2, 6)
  model = _lm(num_layers=1, mlp="none")
  params = jax.jit(model.init)(_KEY, tokens)["params"]
  grads = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, tokens) ** 2)))(params)  # noqa: E731
  jax.tree.map(lambda a, b: npt.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads(model),
               grads(model.clone(remat=True)))


def test_lm_from_config_is_hashable():
  config = ml_collections.ConfigDict({
      "vocab_size": V, "d_model": D, "num_layers": 2, "num_heads": H, "mixer": ["gated_attention"],
      "mixer_kwargs": {"gate_position": "G1"}, "dtype": "bfloat16", "max_len": 16})
  model = lm_from_config(config)
  assert model.mixer == ("gated_attention",) and dict(model.mixer_kwargs) == {"gate_position": "G1"}
  assert hash(model) == hash(lm_from_config(config))
  assert jax.eval_shape(model.apply, jax.eval_shape(model.init, _KEY, _tokens(1, 3)), _tokens(1, 3)).dtype == (
      jnp.float32)
  config.depth = 3
  with pytest.raises(ValueError, match="depth"):
    lm_from_config(config)


@pytest.mark.parametrize("kwargs, match", [
    ({"mixer": "nope"}, "gated_attention"),
    ({"mixer": ()}, "mixer"),
    ({"mixer": ("gated_attention",), "mixer_kwargs": ({}, {})}, "mixer_kwargs"),
    ({"mixer_kwargs": {"d_model": 8}}, "d_model"),
    ({"mlp": "nope"}, "swiglu"),
    ({"num_layers": 0}, "num_layers"),
    ({"mlp_hidden_dim": -2}, "mlp_hidden_dim"),
])
def test_bad_fields_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _shapes(_lm(**kwargs))


def test_bad_tokens_raise():
  model = _lm()
  with pytest.raises(ValueError, match="tokens_BT"):
    model.init(_KEY, jnp.zeros((1, 3), jnp.float32))
