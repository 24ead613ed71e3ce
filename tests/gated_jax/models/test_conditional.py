"""GateSkip and skip-the-middle in DecoderLM (gated_jax.layers.residual_gates, gated_jax.models.gateskip):
open gates equal the plain model, the skip rules, decode = full forward on the same skip pattern, causality,
key weights against a direct numpy formula, the all-skipped stack, and bad arguments."""

import functools
import pathlib
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gated_jax.layers import MIXERS
from gated_jax.layers.attention import GatedAttention
from gated_jax.layers.residual_gates import GateSkipSpec, ResidualGate
from gated_jax.models import DecoderLM

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _random_params import random_params  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.usefixtures("fast_compile")

V, T, KEY = 32, 10, jax.random.PRNGKey(0)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, V)
CAUSAL_MIXERS = tuple(n for n in MIXERS.names() if n not in ("lina",))  # LINA is non-causal (no decode path)
# Non-default settings that keep the gates' spread (head_dim 2: H3 as Zoology's MQAR runs it, outer products).
_MIXER_KWARGS = {"gated_attention": {"gate_position": "none"}, "h3": {"head_dim": 2}}


def _lm(**kwargs):
  return DecoderLM(**{"vocab_size": V, "d_model": 16, "num_layers": 2, "num_heads": 2, "max_len": 12,
                      "mlp_hidden_dim": 32, **kwargs})


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(model, params, tokens, mutable=()):
  """``model.apply`` under jit, compiled once per (model, shapes): eager applies dispatch op by op."""
  if mutable:
    return model.apply({"params": params}, tokens, mutable=list(mutable))
  return model.apply({"params": params}, tokens)


def _init(model):
  return random_params(model, TOKENS)


def _sown(tree, suffix):
  flat = traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
  return {k: float(v[0]) for k, v in flat.items() if k.endswith(suffix)}


def _decode(model, params, tokens, prefill=4):
  """Logits of a prefill of ``prefill`` tokens then one token per call, concatenated. The cache comes from a
  decode call without one (the mixers create it, as ``init(..., decode=True)`` does)."""
  zeros = jnp.zeros((tokens.shape[0], model.max_len), jnp.int32)
  cache = jax.jit(lambda p: model.apply({"params": p}, zeros, decode=True, mutable=["cache"])[1]["cache"])(params)
  step = jax.jit(lambda p, c, x: model.apply({"params": p, "cache": c}, x, decode=True, mutable=["cache"]))
  outs = []
  for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, tokens.shape[1])]:
    logits, state = step(params, cache, tokens[:, start:stop])
    cache = state["cache"]
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


def _threshold_model(mixer):
  """Noisy gates (importance spread around 1/2) and the causal threshold rule at 1/2 in every module."""
  return _lm(mixer=mixer, mixer_kwargs=_MIXER_KWARGS.get(mixer, {}),
             gateskip={"kernel_stddev": 1.0, "bias_init": 0.0, "rule": "threshold", "thresholds": (0.5,) * 4})


@pytest.fixture(scope="module", name="gated")
def _gated():
  model = _threshold_model("gated_attention")
  return model, _init(model)


def test_open_gates_equal_the_plain_model_and_sow_the_regulariser(gated):
  model, params = gated
  plain = {k: {n: v for n, v in layer.items() if not n.endswith("skip_gate")} if k.startswith("layer_") else layer
           for k, layer in params.items()}
  open_gates = flax.core.unfreeze(params)
  for name in (n for n in params if n.startswith("layer_")):
    for gate in ("mixer_skip_gate", "mlp_skip_gate"):
      open_gates[name][gate]["proj"] = {"kernel": jnp.zeros((16, 16)), "bias": jnp.full(16, 40.0)}  # sigma = 1
  logits, sown = _apply(model, open_gates, TOKENS, ("aux_loss", "layer_metrics"))
  np.testing.assert_allclose(logits, _apply(_lm(mixer_kwargs={"gate_position": "none"}), plain, TOKENS),
                             rtol=0, atol=1e-6)
  losses = _sown(sown["aux_loss"], "gateskip_sparsity")
  assert len(losses) == 4 and sum(losses.values()) == pytest.approx(1.0)  # mean over modules of mean g^2 = 1
  assert sum(_sown(sown["layer_metrics"], "gateskip_skipped").values()) == 0


def _gate_outputs(spec, importance_BT, train_step=None):
  """ResidualGate on a scalar gate whose logit is the input's first channel; y = 1: returns g * keep."""
  u = jnp.zeros(importance_BT.shape + (4,)).at[..., 0].set(jax.scipy.special.logit(importance_BT))
  params = {"params": {"proj": {"kernel": jnp.zeros((4, 1)).at[0, 0].set(1.0), "bias": jnp.zeros(1)}}}
  positions = jnp.broadcast_to(jnp.arange(importance_BT.shape[1]), importance_BT.shape)
  out = ResidualGate(spec, 0).apply(params, u, jnp.ones_like(u), positions_BT=positions, segment_ids=None,
                                    train_step=train_step)
  return out[..., 0]


def test_skip_rules_skip_the_lowest_gated_tokens_never_position_zero():
  importance = jnp.array([[0.05, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6, 0.5, 0.95]])
  scalar = {"granularity": "scalar"}
  training = GateSkipSpec(**scalar, train_budget=2 / 3, budget_start=10, budget_steps=20)  # 0 at 10, 2/3 at 30

  @jax.jit
  def outputs(importance, many):  # every rule in one compiled program
    return (_gate_outputs(GateSkipSpec(**scalar, rule="quantile", budget=1 / 3), importance),
            _gate_outputs(GateSkipSpec(**scalar, rule="threshold", thresholds=(0.45,)), importance),
            [_gate_outputs(training, importance, jnp.int32(s)) for s in (10, 20, 99)],
            _gate_outputs(GateSkipSpec(**scalar, rule="random", budget=0.3), many))
  quantile, threshold, trained, random = jax.tree.map(np.asarray, outputs(importance, jnp.full((64, 50), 0.5)))
  skipped = quantile == 0
  assert not skipped[0, 0] and skipped.sum() == 3  # position 0 has the lowest gate but is kept
  np.testing.assert_array_equal(np.flatnonzero(skipped[0]), [2, 4, 6])  # the three lowest of positions 1..9
  np.testing.assert_allclose(quantile[~skipped], importance[~skipped], rtol=1e-6)
  np.testing.assert_array_equal(np.flatnonzero(threshold[0] == 0), [2, 4, 6])
  assert [int((t == 0).sum()) for t in trained] == [0, 3, 6]
  random = random == 0
  assert not random[:, 0].any() and abs(random[:, 1:].mean() - 0.3) < 0.03


def _check_threshold_decoding(model, params):
  future = TOKENS.at[:, 6:].set((TOKENS[:, 6:] + 7) % V)  # causal: later tokens change nothing before them
  both, sown = _apply(model, params, jnp.concatenate([TOKENS, future]), ("aux_loss", "layer_metrics"))
  full, changed = both[:2], both[2:]
  skipped = _sown(sown["layer_metrics"], "gateskip_skipped")
  assert len(skipped) == 4 and 0.2 < np.mean(list(skipped.values())) < 0.8
  np.testing.assert_allclose(_decode(model, params, TOKENS), full, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(changed[:, :6], full[:, :6], rtol=1e-5, atol=1e-5)


def test_threshold_skipping_decodes_like_the_full_forward_and_is_causal(gated):
  _check_threshold_decoding(*gated)


@pytest.mark.slow
@pytest.mark.parametrize("mixer", CAUSAL_MIXERS)
def test_threshold_skipping_decodes_like_the_full_forward_for_every_causal_mixer(mixer):
  model = _threshold_model(mixer)
  _check_threshold_decoding(model, _init(model))


def test_key_weights_add_log_weight_to_the_scores_and_decode_through_the_cache():
  x = jax.random.normal(KEY, (2, 6, 8))
  w = jnp.array([[1.0, 0.5, 0.0, 1.0, 0.25, 1.0], [0.0, 1.0, 1.0, 0.1, 1.0, 0.7]])
  layer = GatedAttention(d_model=8, num_heads=2, gate_position="none", rope=False, qk_norm=False, max_len=6)
  params = random_params(layer, x, key_weights=w)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xn = np.asarray(x, np.float64)
  q, k, v = (np.einsum("btd,dhk->bthk", xn, p[n]["kernel"]) for n in ("query", "key", "value"))
  scores = np.einsum("bthk,bshk->bhts", q, k) / 2.0
  weights = np.exp(scores) * np.tril(np.ones((6, 6))) * np.asarray(w, np.float64)[:, None, None]  # e^{s + log w}
  total = weights.sum(-1, keepdims=True)
  probs = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)  # all-zero rows output 0
  expected = np.einsum("bhkd,hde->bke", np.einsum("bhts,bshd->bhtd", probs, v), p["out"]["kernel"])
  out = jax.jit(lambda x, w: layer.apply({"params": params}, x, key_weights=w))(x, w)
  np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-5)
  step = jax.jit(lambda x, w, c: layer.apply({"params": params, "cache": c}, x, key_weights=w, decode=True,
                                             mutable=["cache"]))
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), flax.core.meta.unbox(jax.eval_shape(
      lambda: layer.init(KEY, x, key_weights=w, decode=True)))["cache"])  # empty KV cache, index 0
  decoded = []
  for t in range(6):  # the cache keeps each key's weight with its value
    y, state = step(x[:, t:t + 1], w[:, t:t + 1], cache)
    cache = state["cache"]
    decoded.append(y)
  np.testing.assert_allclose(jnp.concatenate(decoded, 1), expected, rtol=2e-4, atol=2e-5)


def test_skip_middle_routers_past_one_skip_every_layer():
  model = _lm(mixer_kwargs={"gate_position": "none"}, skip_middle={"router_stddev": 0.5})
  params = flax.core.unfreeze(_init(model))
  _, sown = _apply(model, params, TOKENS, ("aux_loss",))
  assert set(_sown(sown["aux_loss"], "skip_middle_sparsity")) == {"skip_router_0/skip_middle_sparsity"}
  params["skip_router_0"]["proj"]["bias"] = jnp.full(1, 3.0)  # m_0 >= 1: every gate 0, the stack is skipped
  logits, _ = _apply(model, params, TOKENS, ("aux_loss",))
  embed = params["embed"]["embedding"]
  x = embed[TOKENS]
  x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * params["final_norm"]["scale"]
  np.testing.assert_allclose(logits, x @ embed.T, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_skip_middle_decodes_like_the_full_forward():
  model = _lm(num_layers=4, mixer_kwargs={"gate_position": "none"}, skip_middle={"router_stddev": 0.5})
  params = _init(model)
  full, sown = _apply(model, params, TOKENS, ("layer_metrics",))
  assert min(_sown(sown["layer_metrics"], "skip_middle_gate").values()) < 1.0
  np.testing.assert_allclose(_decode(model, params, TOKENS), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    ({"gateskip": {"rule": "best"}}, "gateskip.rule: got 'best'"),
    ({"gateskip": {"budget": 1.5}}, r"gateskip.budget: got 1.5"),
    ({"gateskip": {"rule": "threshold", "thresholds": (0.5,)}}, r"gateskip.thresholds: got \(0.5,\); allowed: 4"),
    ({"gateskip": {"sparsity": 1.0}}, r"gateskip: got unknown fields \['sparsity'\]"),
    ({"skip_middle": {}, "num_layers": 3}, "num_layers: got 3 with skip_middle"),
    ({"skip_middle": {}, "mixer": "gla"}, "mixer: got 'gla' with skip_middle"),
    ({"branch_post_norm": 1}, "branch_post_norm: got 1"),
])
def test_bad_arguments_raise_named_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(_lm(**kwargs).init, KEY, TOKENS)


def test_whole_sequence_rules_refuse_to_decode():
  model = _lm(gateskip={"rule": "quantile", "budget": 0.2})
  with pytest.raises(ValueError, match="gateskip.rule: got 'quantile' with decode=True"):
    jax.eval_shape(lambda: model.init(KEY, TOKENS, decode=True))
  with pytest.raises(ValueError, match="key_weights: given with normalizer='sigmoid'"):
    GatedAttention(d_model=8, num_heads=2, normalizer="sigmoid").init(KEY, jnp.zeros((1, 3, 8)),
                                                                    key_weights=jnp.ones((1, 3)))


def test_models_without_mlp_have_one_gated_module_per_layer():
  model = _lm(mlp="none", gateskip={"rule": "threshold", "thresholds": (0.5, 0.5)})
  shapes = jax.eval_shape(model.init, KEY, TOKENS)["params"]
  assert set(shapes["layer_1"]) == {"mixer_norm", "mixer", "mixer_skip_gate"}
