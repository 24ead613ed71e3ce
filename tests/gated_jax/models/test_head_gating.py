"""Causal head gating (gated_jax.models.head_gating): a zero gate removes exactly one head (softmax attention's
``out`` and a linear mixer's ``o_proj``), the taxonomy and score, the regularisers' direction, ablation
effects, contrastive CHG, and bad arguments."""

import itertools
import pathlib
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_jax.models import DecoderLM
from gated_jax.models import head_gating as chg

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _random_params import random_params  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.usefixtures("fast_compile")

V, T, KEY = 32, 8, jax.random.PRNGKey(0)


def _batch(seed, tokens=None):
  tokens = jax.random.randint(jax.random.PRNGKey(seed), (4, T + 1), 0, V) if tokens is None else tokens
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((4, T))}


@pytest.fixture(scope="module", name="lm")
def _lm():
  """Layer 0 softmax attention (projection ``out``), layer 1 GLA (``o_proj``); 2 heads each."""
  model = DecoderLM(vocab_size=V, d_model=16, num_layers=2, num_heads=2, max_len=T, mlp_hidden_dim=32,
                    mixer=("gated_attention", "gla"), mixer_kwargs=({"gate_position": "none"}, {}))
  return model, random_params(model, jnp.zeros((1, T), jnp.int32))


def _without_values(params, layer, head):
  """The parameters with one head's value projection zeroed: that head's output is 0 by construction."""
  params = flax.core.unfreeze(params)
  name = "value" if layer == 0 else "v_proj"
  params[f"layer_{layer}"]["mixer"][name]["kernel"] = params[f"layer_{layer}"]["mixer"][name]["kernel"].at[
      :, head].set(0.0)
  return params


def test_a_zero_gate_removes_exactly_that_head_and_ablation_effects_measure_it(lm):
  model, params = lm
  assert chg.head_shape(params) == (2, 2)
  batch = _batch(1)
  base, delta = chg.ablation_effects(model, params, [batch])  # every loss through mean_nll_jit: one compile
  for layer, head in ((0, 1), (1, 0)):
    removed, _ = chg.ablation_effects(model, _without_values(params, layer, head), [batch])
    assert delta[layer, head] == pytest.approx(removed - base, abs=1e-5)
  assert np.abs(delta).min() > 1e-5


def test_taxonomy_and_causal_score():
  g_plus = np.array([0.9, 0.2, 0.95, 0.1])
  g_minus = np.array([0.8, 0.1, 0.05, 0.7])
  np.testing.assert_array_equal(chg.taxonomy(g_plus, g_minus),
                                ["facilitating", "interfering", "irrelevant", "ambiguous"])
  np.testing.assert_allclose(chg.causal_score(g_plus, g_minus), [0.7, -0.7, 0.0, -0.2], atol=1e-12)


def test_chg_stages_follow_their_regulariser(lm):
  model, params = lm
  result = chg.chg(model, params, itertools.repeat(_batch(2)), key=KEY, steps=3, reg_weight=10.0, lr=0.2)
  assert result.fit.shape == result.plus.shape == result.minus.shape == (2, 2)
  # A strong lambda dominates the NLL: retention raises the gates, removal lowers them, except where the
  # logits sit beyond the clip (|logit| > 4), which the regulariser does not see.
  inside = np.abs(result.fit) < 3.0
  assert inside.any()
  assert np.all(result.plus[inside] > result.fit[inside]) and np.all(result.minus[inside] < result.fit[inside])


@pytest.mark.slow  # the default run exercises contrastive CHG through the head_gating table's micro run
def test_contrastive_chg_forgets_the_negative_set_more_than_the_positive(lm):
  model, params = lm
  repeated = jnp.tile(jnp.arange(4), (4, (T + 4) // 4))[:, :T + 1]
  positive, negative = _batch(0, repeated), _batch(3)
  logits = chg.contrastive_chg(model, params, itertools.repeat(positive), itertools.repeat(negative), key=KEY,
                               steps=30, lr=0.1, lr_end=0.01, reg_weight=0.0)
  gap = lambda gates: float(chg.mean_nll_jit(model, params, negative, gates)
                            - chg.mean_nll_jit(model, params, positive, gates))
  assert gap(jax.nn.sigmoid(jnp.asarray(logits))) > gap(jnp.ones((2, 2))) + 0.01


@pytest.mark.parametrize("call, match", [
    (lambda p: chg.gate_heads(p, jnp.ones((2, 3))), r"gates_LH: got shape \(2, 3\)"),
    (lambda p: chg.head_shape({"embed": p["embed"]}), "params: got no layer_<i>"),
    (lambda p: chg.chg(None, p, iter(()), key=KEY, reg_weight=-1.0), "reg_weight: got -1.0"),
])
def test_bad_arguments_raise_named_errors(lm, call, match):
  with pytest.raises(ValueError, match=match):
    call(lm[1])
