"""Early exit (gated_jax.models.early_exit): the exit distribution, the cascade and gate policies on hand-built
logits, the uncertainty features and ECE against numpy, stop-gradient isolation of gates and IMs, costs, the
oracle gate targets and balanced BCE by hand, a few training steps of each phase, and bad arguments."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gated_jax.models import VisionClassifier
from gated_jax.models import early_exit as ee

pytestmark = pytest.mark.usefixtures("fast_compile")

L, B, C = 3, 4, 5
COSTS = np.array([0.3, 0.65, 1.0])


def _backbone(**fields):
  return VisionClassifier(**{"image_size": (4, 4), "patch_size": 2, "num_classes": C, "d_model": 8,
                             "num_layers": L, "num_heads": 2, "mlp_hidden_dim": 16, **fields})


@pytest.fixture(scope="module", name="model")
def _model():
  """Two exits, no MLP: the fewest operations to compile."""
  model = ee.MultiExitClassifier(_backbone(num_layers=2, mlp="none"))
  images = jax.random.uniform(jax.random.key(0), (B, 4, 4, 1))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), images)["params"])
  params["gates"] = jax.tree.map(lambda p: p + 0.3, params["gates"])  # non-zero gates, so gradients could flow
  return model, params, images, jnp.array([0, 1, 2, 3])


def _one_hot_logits(winners, confidences):
  """``(L, B, C)`` logits whose softmax puts ``confidences[l][b]`` on class ``winners[l][b]``."""
  winners, confidences = np.asarray(winners), np.asarray(confidences, np.float64)
  rest = (1.0 - confidences) / (C - 1)
  probs = np.broadcast_to(rest[..., None], (*winners.shape, C)).copy()
  np.put_along_axis(probs, winners[..., None], confidences[..., None], axis=-1)
  return jnp.asarray(np.log(probs), jnp.float32)


def test_exit_distribution_sums_to_one_and_matches_product_formula():
  gates = np.random.default_rng(0).uniform(size=(L - 1, 6)).astype(np.float32)
  probs = np.asarray(ee.exit_distribution(jnp.asarray(gates)))
  expected = [gates[l] * np.prod(1.0 - gates[:l], axis=0) for l in range(L - 1)] + [np.prod(1.0 - gates, axis=0)]
  np.testing.assert_allclose(probs, np.stack(expected), rtol=1e-6)
  np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-6)


def test_cascade_exits_at_first_confident_imm_and_thresholds_extremes():
  winners = [[0, 1, 2, 3], [4, 1, 3, 3], [2, 2, 2, 0]]
  confidences = [[0.95, 0.5, 0.6, 0.3], [0.99, 0.91, 0.3, 0.4], [0.6, 0.7, 0.95, 0.5]]
  logits = _one_hot_logits(winners, confidences)
  decision = ee.confidence_cascade(logits, 0.9, COSTS)
  np.testing.assert_array_equal(decision.exit_B, [0, 1, 2, 2])
  np.testing.assert_array_equal(decision.prediction_B, [0, 1, 2, 0])
  np.testing.assert_allclose(decision.confidence_B, [0.95, 0.91, 0.95, 0.5], rtol=1e-5)
  np.testing.assert_allclose(decision.cost, np.mean(COSTS[[0, 1, 2, 2]]), rtol=1e-6)
  np.testing.assert_array_equal(ee.confidence_cascade(logits, 0.0, COSTS).exit_B, [0] * B)
  np.testing.assert_array_equal(ee.confidence_cascade(logits, 1.01, COSTS).exit_B, [L - 1] * B)
  gate_logits = jnp.array([[2.0, -1.0, -3.0, 0.1], [-1.0, 0.5, -2.0, 3.0]])
  np.testing.assert_array_equal(ee.gate_policy(logits, gate_logits, COSTS).exit_B, [0, 1, 2, 0])
  sweep = ee.threshold_sweep(logits, jnp.array([0, 1, 2, 0]), COSTS, [0.0, 0.9, 1.01])
  np.testing.assert_allclose(sweep["cost"], [0.3, np.mean(COSTS[[0, 1, 2, 2]]), 1.0], rtol=1e-6)
  np.testing.assert_allclose(sweep["accuracy"], [75.0, 100.0, 50.0])
  assert ee.at_cost(sweep, 0.5 * (0.3 + sweep["cost"][1]), "accuracy") == pytest.approx(87.5)


def test_uncertainty_features_and_ece_against_numpy():
  logits = np.random.default_rng(1).normal(size=(2, 3, C)).astype(np.float32)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.sort(p, -1)
  q = p ** 2 / (p ** 2).sum(-1, keepdims=True)
  expected = np.stack([top[..., -1], -(p * np.log(p)).sum(-1), top[..., -1] - top[..., -2],
                       -(q * np.log(q)).sum(-1)], -1)
  np.testing.assert_allclose(ee.uncertainty_features(jnp.asarray(logits)), expected, rtol=1e-5, atol=1e-6)
  # bins (14/15, 1] and (8/15, 9/15]: |1 - 1.9| + |2 - 1.1| over 4 examples
  ece = ee.expected_calibration_error(jnp.array([0.95, 0.95, 0.55, 0.55]), jnp.array([True, False, True, True]))
  assert float(ece) == pytest.approx(0.45, abs=1e-6)


def test_gates_and_ims_are_isolated_by_stop_gradient(model):
  module, params, images, labels = model

  @jax.jit
  def grads(p):
    def losses(p, which):
      logits, gate_logits = module.apply({"params": p}, images)
      im = ee.weighted_exit_loss(logits, labels, ee.exit_distribution(jax.nn.sigmoid(gate_logits)))
      return jnp.where(which == 0, im, ee.gate_loss(logits, gate_logits, labels, COSTS[1:], 0.7))
    return jax.grad(losses)(p, 0), jax.grad(losses)(p, 1)

  norm = lambda tree: float(optax.tree.norm(tree))
  im_grads, gate_grads = grads(params)
  assert norm(im_grads["gates"]) == 0.0 and norm(im_grads["ims_0"]) > 0 and norm(im_grads["backbone"]) > 0
  assert norm(gate_grads["gates"]) > 0
  assert all(norm(gate_grads[k]) == 0.0 for k in gate_grads if k != "gates")


def test_exit_costs_increase_by_equal_blocks_and_end_at_one():
  costs = ee.exit_costs(_backbone(num_layers=3))
  assert costs.shape == (3,) and costs[-1] == pytest.approx(1.0) and np.all(np.diff(costs) > 0)
  np.testing.assert_allclose(np.diff(costs), np.diff(costs)[0], rtol=1e-9)  # identical blocks cost the same
  assert costs[0] > np.diff(costs)[0]  # the first exit also pays for the patch embedding


def test_oracle_targets_and_balanced_bce_by_hand():
  ce = jnp.array([[2.0, 0.1, 0.5, 0.2], [0.5, 0.1, 0.5, 0.1], [0.1, 0.1, 0.1, 0.1]])
  # CE + 0.7 C: col 0 -> (2.21, 0.955, 0.8): exit 2; col 1 -> exit 0; col 2 -> (0.71, 0.955, 0.8): 0; col 3: 0
  np.testing.assert_array_equal(ee.oracle_exits(ce, COSTS, 0.7), [2, 0, 0, 0])
  np.testing.assert_array_equal(ee.oracle_exits(ce, COSTS, 0.0), [2, 0, 2, 1])
  targets = ee.gate_targets(jnp.array([2, 0, 2, 1]), L - 1)
  np.testing.assert_array_equal(targets, [[0, 1, 0, 0], [0, 1, 0, 1]])
  logits = jnp.array([[0.3, -0.2, 1.0, 0.0], [2.0, -1.0, 0.5, 0.4]])
  bce = np.asarray(optax.sigmoid_binary_cross_entropy(logits, targets))
  weights = np.array([[1, 3, 1, 1], [1, 1, 1, 1]], np.float64)  # gate 0: 3 negatives / 1 positive
  assert float(ee.balanced_bce(logits, targets)) == pytest.approx(float((weights * bce).mean()), rel=1e-6)


def test_few_steps_reduce_ims_and_gates_losses(model):
  module, params, _, labels = model
  states = jax.random.normal(jax.random.key(2), (2, B, 4, 8))  # stands in for a frozen backbone's block outputs
  batches = iter([(states, labels)] * 12)
  fitted, history = ee.fit_jei(module, params, batches, costs_L=COSTS[1:], tradeoff=0.7, steps=12, phase_steps=6,
                               ims_tx=optax.adam(1e-2), gates_tx=optax.adam(5e-2))
  gates_phase, ims_phase = history[:6], history[6:]
  assert [h["phase"] for h in history] == ["gates"] * 6 + ["ims"] * 6
  assert gates_phase[-1]["loss"] < gates_phase[0]["loss"] and ims_phase[-1]["loss"] < ims_phase[0]["loss"]
  assert float(optax.tree.norm(jax.tree.map(jnp.subtract, fitted["backbone"], params["backbone"]))) == 0.0


@pytest.mark.parametrize("call, match", [
    (lambda: ee.confidence_cascade(jnp.zeros((L, B, C)), float("nan"), COSTS), "threshold: got nan"),
    (lambda: ee.confidence_cascade(jnp.zeros((L, B, C)), 0.9, COSTS[:2]), r"costs_L: got shape \(2,\)"),
    (lambda: ee.gate_policy(jnp.zeros((L, B, C)), jnp.zeros((L - 1, B)), COSTS, 1.5), "threshold: got 1.5"),
    (lambda: ee.gate_policy(jnp.zeros((L, B, C)), jnp.zeros((L, B)), COSTS), r"gate_logits_GB: got shape \(3, 4\)"),
    (lambda: ee.oracle_exits(jnp.zeros((L, B)), COSTS, -0.1), "tradeoff: got -0.1"),
    (lambda: ee.per_exit_ce(jnp.zeros((L, B, C)), jnp.zeros((B + 1,), jnp.int32)), r"labels_B: got shape \(5,\)"),
    (lambda: ee.expected_calibration_error(jnp.zeros(B), jnp.zeros(B), num_bins=0), "num_bins: expected a positive"),
    (lambda: ee.group_optimizer(optax.adam(1e-3), ("head",)), r"train: got \['head'\]"),
    (lambda: ee.fit_jei(ee.MultiExitClassifier(_backbone()), {}, iter([]), costs_L=COSTS[::-1], tradeoff=0.7,
                        steps=1, phase_steps=1, ims_tx=optax.adam(1e-3), gates_tx=optax.adam(1e-3)),
     "costs_L: got"),
    (lambda: ee.fit_jei(ee.MultiExitClassifier(_backbone()), {}, iter([]), costs_L=COSTS, tradeoff=0.7,
                        steps=0, phase_steps=1, ims_tx=optax.adam(1e-3), gates_tx=optax.adam(1e-3)),
     "steps: got 0"),
    (lambda: ee.exit_costs(_backbone(image_size=(4, 3))), r"image_size: got \(4, 3\)"),
])
def test_bad_arguments_raise_named_value_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_from_states_rejects_wrong_depth(model):
  module, params, _, _ = model
  with pytest.raises(ValueError, match=r"states_LBTD: got shape \(3, 4, 4, 8\)"):
    module.apply({"params": params}, jnp.zeros((3, B, 4, 8)), method=module.from_states)
