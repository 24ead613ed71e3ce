"""Tests for gated_jax.train.metrics: Table-4 diagnostics from synthetic sown intermediates."""

import numpy as np
import pytest
from numpy import testing as npt

from gated_jax.train import metrics


def _intermediates(calls: int = 1):
  def sown(value):
    return tuple(np.asarray(value, np.float32) for _ in range(calls))

  return {
      "layer_0": {"mixer": {"first_token_attention": sown([0.5, 0.1]), "gate_mean": sown(0.2)},
                  "max_abs_activation": sown(3.0), "kurtosis": sown(4.0)},
      "layer_1": {"mixer": {"first_token_attention": sown([0.4, 0.2]), "gate_mean": sown(0.4)},
                  "max_abs_activation": sown(5.0), "kurtosis": sown(6.0)},
  }


@pytest.mark.parametrize("calls", [1, 3])
def test_summary_known_answers(calls):
  summary = metrics.summarize_intermediates(_intermediates(calls))
  expected = {"first_token_attention": 0.3, "sink_rate": 0.5, "max_activation": 4.0, "kurtosis": 5.0,
              "gate_mean": 0.3}
  assert set(summary) == set(expected)
  for key, value in expected.items():
    npt.assert_allclose(summary[key], value, rtol=1e-6, err_msg=key)


def test_repeated_calls_are_averaged():
  inter = {"layer_0": {"max_abs_activation": (np.float32(2.0), np.float32(4.0)),
                       "mixer": {"first_token_attention": (np.array([0.2, 0.2]), np.array([0.6, 0.2]))}}}
  summary = metrics.summarize_intermediates(inter)
  npt.assert_allclose(summary["max_activation"], 3.0)
  npt.assert_allclose(summary["sink_rate"], 0.5)  # head 0 averages to 0.4 > 0.3, head 1 stays at 0.2


def test_missing_leaves_are_skipped():
  summary = metrics.summarize_intermediates({"layer_0": {"kurtosis": (np.float32(7.0),)}})
  assert summary == {"kurtosis": pytest.approx(7.0)}
  assert metrics.summarize_intermediates({}) == {}


def test_kurtosis_and_max_abs():
  rng = np.random.default_rng(0)
  npt.assert_allclose(float(metrics.kurtosis(rng.normal(size=200_000))), 3.0, atol=0.05)
  npt.assert_allclose(float(metrics.kurtosis(np.array([-1.0, 1.0] * 50))), 1.0, rtol=1e-5)
  npt.assert_allclose(float(metrics.max_abs(np.array([[1.0, -7.5], [3.0, 2.0]]))), 7.5)
