"""MoDES calibration (``gated_jax.layers.moe.calibration``): the calibrated thresholds skip the target fraction
of expert slots on the calibration batch, over all layers or in each; threshold 0 is no skipping."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from gated_jax.layers.collections import LAYER_METRICS
from gated_jax.layers.moe import SKIP_THRESHOLDS, MoE, calibrate_skip_thresholds
from gated_jax.layers.moe.calibration import threshold_for_fraction

pytestmark = pytest.mark.usefixtures("fast_compile")


class _TwoMoE(nn.Module):
  """Two residual MoE layers and a readout to 16 logits: the smallest model with per-layer thresholds."""

  @nn.compact
  def __call__(self, x_BTD):
    for i in range(2):
      x_BTD = x_BTD + MoE(d_model=8, hidden_dim=8, num_experts=4, k=2, name=f"layer_{i}")(x_BTD)
    return nn.Dense(16)(x_BTD)


_MODEL = _TwoMoE()
_X = jax.random.normal(jax.random.PRNGKey(1), (2, 10, 8))  # 20 tokens x 2 slots = 40 slots per layer
# experts and routers 30 times their 0.02 init: skipping a layer then changes the output and routing is uneven
_PARAMS = {k: v if k == "Dense_0" else jax.tree.map(lambda w: 30 * w, v)
           for k, v in jax.jit(_MODEL.init)(jax.random.PRNGKey(0), _X)["params"].items()}


@jax.jit
def _apply(collection):
  return _MODEL.apply({"params": _PARAMS, **collection}, _X, mutable=[LAYER_METRICS])


def _skipped(collection):
  logits, sown = _apply(collection)
  return logits, [float(sown[LAYER_METRICS][f"layer_{i}"]["skipped_fraction"][0]) for i in range(2)]


@pytest.mark.parametrize("mode", ["kl", "per_layer"])
def test_calibrated_thresholds_skip_the_target_fraction(mode):
  thresholds = calibrate_skip_thresholds(_MODEL, _PARAMS, _X, 0.3, mode=mode)
  _, skipped = _skipped(thresholds)
  if mode == "per_layer":
    assert skipped == pytest.approx([0.3, 0.3], abs=1e-6)  # 12 of each layer's 40 slots (1 slot: 0.025)
  else:  # one threshold on α_l · weight, searched on the model: 24 of the 80 slots, spread by the KL factors
    assert np.mean(skipped) == pytest.approx(0.3, abs=1e-6) and skipped[0] != skipped[1]


def test_threshold_zero_is_no_skipping():
  plain = jax.jit(_MODEL.apply)({"params": _PARAMS}, _X)
  logits, skipped = _skipped({SKIP_THRESHOLDS: {f"layer_{i}": {"threshold": np.float32(0.0)} for i in range(2)}})
  assert skipped == [0.0, 0.0]
  np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)  # another program: float32 rounding only
  assert threshold_for_fraction(np.array([0.2, 0.1, 0.4]), 0.0) == float("-inf")
  assert threshold_for_fraction(np.array([0.2, 0.1, 0.4]), 1 / 3) == pytest.approx(0.15)


@pytest.mark.parametrize("kwargs, match", [({"target_fraction": 1.5}, "target_fraction: got 1.5"),
                                           ({"target_fraction": 0.5, "mode": "top"}, "mode: got 'top'")])
def test_bad_calibration_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    calibrate_skip_thresholds(_MODEL, _PARAMS, _X, **kwargs)
